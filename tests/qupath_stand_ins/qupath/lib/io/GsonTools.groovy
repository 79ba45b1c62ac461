package qupath.lib.io

import qupath.lib.objects.PathObject

/** GsonTools.getInstance(): a JSON reader and writer as QuPath's Gson (GsonTools.java v0.4.4:78-83, v0.7.0:80-84:
 * serializeSpecialFloatingPointValues and lenient, no number policy set, so Gson's own, ToNumberPolicy.DOUBLE; no
 * serializeNulls, no disableHtmlEscaping). fromJson(String, Class) gives every number as a Double, objects as Maps and
 * arrays as Lists; null for null, empty or blank text (Gson.fromJson(JsonReader, TypeToken): an empty document reads
 * as null, Gson 2.10 to 2.13); a JsonSyntaxException for text that is not JSON, or for JSON that is not an object where
 * a Map is asked for ("Expected BEGIN_OBJECT but was ..."). toJson(Object) and toJson(Object, Appendable) write as
 * Gson's JsonWriter does: a Map's entries whose value is null are left out (no serializeNulls: JsonWriter.nullValue
 * drops the pending name), a list's nulls written; NaN and Infinity as bare words; <, >, &, = and ' as \u escapes
 * (htmlSafe), non-ASCII characters as they are; an enum by its name; a PathObject as a GeoJSON Feature (its ID,
 * geometry, objectType, name, classification and measurements; a TMA core's isMissing); and an object Gson has no
 * adapter for by its fields (ReflectiveTypeAdapterFactory): a Groovy GString is no String to Gson, and is written as
 * its strings and values; a JDK class's (a Path, a File) refused on Java 17+ with a JsonIOException. */
class GsonTools {
    static StandInGson getInstance() {
        return new StandInGson()
    }
}

class StandInGson {
    def fromJson(String text, Class type) {
        if (text == null || text.trim().isEmpty())
            return null
        def value
        try {
            value = new groovy.json.JsonSlurper().parseText(text)
        } catch (Exception e) {
            throw new com.google.gson.JsonSyntaxException(e.getMessage(), e)
        }
        if (value != null && Map.isAssignableFrom(type) && !(value instanceof Map))
            throw new com.google.gson.JsonSyntaxException("java.lang.IllegalStateException: Expected BEGIN_OBJECT but " +
                    "was ${value instanceof List ? 'BEGIN_ARRAY' : value instanceof Number ? 'NUMBER' : value instanceof Boolean ? 'BOOLEAN' : 'STRING'}")
        return asGson(value)
    }

    String toJson(Object value) {
        def out = new StringBuilder()
        toJson(value, out)
        return out.toString()
    }

    void toJson(Object value, Appendable writer) {
        write(value, writer)
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

    // JsonWriter.string (Gson 2.10 to 2.13), htmlSafe: the characters it escapes, others as they are (the runs
    // between them appended whole: a name of megabytes goes through as a few appends).
    private static final Map<Character, String> ESCAPES = [
            ('\n' as char): '\\n', ('\r' as char): '\\r', ('\t' as char): '\\t', ('\b' as char): '\\b',
            ('\f' as char): '\\f'] as Map<Character, String>

    @groovy.transform.CompileStatic
    private static void writeString(String text, Appendable out) {
        out.append((char) '"')
        int last = 0
        int n = text.length()
        for (int i = 0; i < n; i++) {
            char c = text.charAt(i)
            String escaped = null
            if (c == (char) '"')
                escaped = '\\"'
            else if (c == (char) '\\')
                escaped = '\\\\'
            else if (c < (char) 0x20 || c == (char) '<' || c == (char) '>' || c == (char) '&' || c == (char) '=' ||
                    c == (char) "'" || c == (char) 0x2028 || c == (char) 0x2029)
                escaped = ESCAPES.getOrDefault(c, String.format("\\u%04x", (int) c))
            if (escaped != null) {
                out.append(text, last, i)
                out.append(escaped)
                last = i + 1
            }
        }
        out.append(text, last, n)
        out.append((char) '"')
    }

    private static void write(Object value, Appendable out) {
        if (value == null) {
            out.append("null")
        } else if (value instanceof PathObject) {
            write(feature(value), out)
        } else if (value instanceof String || value instanceof Character) {
            writeString(value.toString(), out)
        } else if (value instanceof Double || value instanceof Float) {
            // serializeSpecialFloatingPointValues: NaN, Infinity, -Infinity as bare words; a whole double as "1.0"
            out.append(value.toString())
        } else if (value instanceof Number || value instanceof Boolean) {
            out.append(value.toString())
        } else if (value instanceof Enum) {
            writeString(((Enum) value).name(), out)
        } else if (value instanceof Map) {
            out.append('{')
            boolean first = true
            value.each { k, v ->
                if (v == null)
                    return  // no serializeNulls: the name goes with its null
                if (!first)
                    out.append(',')
                first = false
                writeString(String.valueOf(k), out)
                out.append(':')
                write(v, out)
            }
            out.append('}')
        } else if (value instanceof Collection || value.getClass().isArray()) {
            out.append('[')
            boolean first = true
            (value as List).each { v ->
                if (!first)
                    out.append(',')
                first = false
                write(v, out)
            }
            out.append(']')
        } else if (value.getClass().getName().startsWith("java.") || value.getClass().getName().startsWith("sun.")) {
            throw new com.google.gson.JsonIOException("Failed making field of ${value.getClass().getName()} " +
                    "accessible; either increase its visibility or write a custom TypeAdapter for its declaring type.")
        } else {
            // ReflectiveTypeAdapterFactory: every field not static nor transient, the class's own first, then its
            // superclasses' (a GStringImpl's strings, then GString's values)
            def fields = new LinkedHashMap()
            for (def cls = value.getClass(); cls != null && cls != Object; cls = cls.getSuperclass()) {
                cls.getDeclaredFields().findAll {
                    !java.lang.reflect.Modifier.isStatic(it.getModifiers()) &&
                            !java.lang.reflect.Modifier.isTransient(it.getModifiers()) && !it.isSynthetic()
                }.each { f ->
                    f.setAccessible(true)
                    fields.put(f.getName(), f.get(value))
                }
            }
            write(fields, out)
        }
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
