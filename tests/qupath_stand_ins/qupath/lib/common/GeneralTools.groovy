package qupath.lib.common

/** GeneralTools.toPath(URI): the local file of a file: URI, else null (QuPath: GeneralTools.java v0.4.4:450). */
class GeneralTools {
    static java.nio.file.Path toPath(URI uri) {
        return uri.getScheme() == "file" ? java.nio.file.Paths.get(uri) : null
    }
}
