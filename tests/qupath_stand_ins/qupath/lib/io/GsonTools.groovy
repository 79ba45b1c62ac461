package qupath.lib.io

/** GsonTools.getInstance(): a JSON reader and writer (fromJson(String, Class), toJson(Object)). */
class GsonTools {
    static StandInGson getInstance() {
        return new StandInGson()
    }
}

class StandInGson {
    def fromJson(String text, Class type) {
        return new groovy.json.JsonSlurper().parseText(text)
    }

    String toJson(Object value) {
        return groovy.json.JsonOutput.toJson(value)
    }
}
