package qupath.lib.io

import groovy.json.JsonGenerator
import qupath.lib.objects.PathObject

/** GsonTools.getInstance(): a JSON reader and writer as QuPath's Gson (GsonTools.java v0.4.4:78-83, v0.7.0:80-84: no
 * number policy set, so Gson's own, ToNumberPolicy.DOUBLE): fromJson(String, Class) gives every number as a Double,
 * objects as Maps and arrays as Lists; toJson(Object) and toJson(Object, Appendable) write a Map or List as JSON, a
 * PathObject as a GeoJSON Feature (its ID, geometry, objectType, name, classification and measurements; a TMA core's
 * isMissing), non-ASCII
 * characters as they are. */
class GsonTools {
    static StandInGson getInstance() {
        return new StandInGson()
    }
}

class StandInGson {
    private static final JsonGenerator JSON = new JsonGenerator.Options().disableUnicodeEscaping().build()

    def fromJson(String text, Class type) {
        return asGson(new groovy.json.JsonSlurper().parseText(text))
    }

    String toJson(Object value) {
        def out = new StringBuilder()
        toJson(value, out)
        return out.toString()
    }

    void toJson(Object value, Appendable writer) {
        writer.append(JSON.toJson(value instanceof PathObject ? feature(value) : value))
    }

    // JsonSlurper's Integer, Long and BigDecimal as the Double Gson reads every number as.
    private static Object asGson(Object value) {
        if (value instanceof Map)
            return value.collectEntries(new LinkedHashMap()) { k, v -> [(k): asGson(v)] }
        if (value instanceof List)
            return value.collect { asGson(it) }
        if (value instanceof Number)
            return Double.valueOf(value as double)
        return value
    }

    // A TMA core as QuPath's Gson writes one: objectType "tmaCore" and its "isMissing" (QuPathTypeAdapters.java
    // v0.4.4:311, 398-400; v0.7.0:308, 390-392).
    private static Map feature(PathObject obj) {
        def properties = new LinkedHashMap([objectType: obj.isTMACore() ? "tmaCore" : obj.kind])
        if (obj.isTMACore())
            properties.isMissing = obj.isMissing()
        if (obj.name != null)
            properties.name = obj.name
        if (obj.pathClass != null)
            properties.classification = [name: obj.pathClass.toString()]
        properties.measurements = obj.measurements.values
        return [type: "Feature", id: obj.id.toString(), geometry: obj.geometry, properties: properties]
    }
}
