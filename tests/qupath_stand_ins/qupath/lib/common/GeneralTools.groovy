package qupath.lib.common

/** GeneralTools.toPath(URI) as QuPath has it (GeneralTools.java v0.4.4:450-462, v0.7.0:472-484): null for another
 * scheme than file; a URI without a scheme is tried as a file's; its query and fragment dropped; null (with a logged
 * warning) where Paths.get refuses it (a relative URI: "Missing scheme"). */
class GeneralTools {
    static java.nio.file.Path toPath(URI uri) {
        String scheme = uri.getScheme()
        if (scheme != null && "file" != scheme)
            return null
        try {
            if (uri.getFragment() != null || uri.getQuery() != null)
                uri = new URI(uri.getScheme(), uri.getHost(), uri.getPath(), null)
            return java.nio.file.Paths.get(uri)
        } catch (URISyntaxException | IllegalArgumentException | java.nio.file.FileSystemNotFoundException e) {
            return null
        }
    }
}
