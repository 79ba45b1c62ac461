package qupath.lib.io

import qupath.lib.objects.PathObject

/** PathIO.readObjectsFromGeoJSON(InputStream): the features of a FeatureCollection as objects. */
class PathIO {
    static List<PathObject> readObjectsFromGeoJSON(InputStream stream) {
        def collection = new groovy.json.JsonSlurper().parse(stream)
        return collection.features.collect { PathObject.fromFeature(it) }
    }
}
