package qupath.lib.common

/** GeneralTools.toPath(URI), behaving as QuPath's (GeneralTools.java v0.4.4:450-462, v0.7.0:472-484): null for a
 * scheme other than file; a URI without a scheme is tried as a file's; a query or fragment does not count; null where
 * the JDK makes no local path of it (a relative URI: "Missing scheme"). */
class GeneralTools {
    static java.nio.file.Path toPath(URI uri) {
        if (!(uri.getScheme() in [null, "file"]))
            return null
        try {
            def bare = uri.getQuery() == null && uri.getFragment() == null ? uri :
                    new URI(uri.getScheme(), uri.getHost(), uri.getPath(), null)
            return java.nio.file.Paths.get(bare)
        } catch (URISyntaxException | IllegalArgumentException | java.nio.file.FileSystemNotFoundException ignored) {
            return null
        }
    }
}
