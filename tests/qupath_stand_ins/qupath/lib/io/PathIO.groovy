package qupath.lib.io

import qupath.lib.objects.PathObject

/** PathIO.readObjectsFromGeoJSON(InputStream) and readObjects(File) (PathIO.java v0.4.4:737, 824; v0.7.0:796, 883):
 * the features of a FeatureCollection as objects. */
class PathIO {
    static List<PathObject> readObjectsFromGeoJSON(InputStream stream) {
        def collection = new groovy.json.JsonSlurper().parse(stream)
        return collection.features.collect { PathObject.fromFeature(it) }
    }

    static List<PathObject> readObjects(File file) {
        return file.withInputStream { readObjectsFromGeoJSON(it) }
    }
}
