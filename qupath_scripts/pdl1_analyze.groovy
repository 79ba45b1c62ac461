/*
 * pdl1_analyze.groovy - PD-L1 analysis with uncertainty from a running `pdl1 serve` (QuPath 0.4.4 to 0.7).
 *
 * Analyses the selected annotations or TMA cores; if none are selected, all annotations of the target
 * classes or names (those without an area, points or lines, are skipped and named); if there are none and
 * the image has a TMA grid (TMA > TMA dearrayer), every core not marked missing, each on its own (missing
 * cores are named and left alone); else, when no target classes or names are set, the whole image (under a
 * "PD-L1 analysis" annotation), and when they are, nothing (the log says so, as `pdl1 run` fails it). Results
 * go under each analysed annotation or core, replacing what an earlier pdl1-bridge run put there; a
 * core's TPS, CPS and counts are its measurements, which QuPath's TMA data viewer and Export TMA data
 * show per core. Nothing else is touched. An annotation the service refuses (an outline that crosses
 * itself, ...) is named and the others are analysed. Stop the script (Kill running script) and the job is cancelled
 * on the server, and what it added so far is shown; close QuPath while a job runs and QuPath exits at once: the job
 * runs to its end on the service, which keeps its result unread until newer jobs push it out (pdl1 serve
 * --keep-results). The service reads the image's file by its path; where it cannot (no local file, a view QuPath
 * rotates, crops or combines, another series of the file than its first, a region on another z-slice or timepoint
 * than the first, a format it has no reader for), each region's pixels as QuPath renders them are sent instead (POST
 * /v1/jobs/pixels; the log says so, and why), and the results go on the region's plane. In a project, a record of
 * what each analysis put under its annotation or core (GET /v1/jobs/{id}/record: when, the outline, the FN
 * candidates, the nuclei, and its scores) is saved as <project>/pdl1/<entry ID>/qupath_analyses/<parent ID>.json,
 * replaced when the parent is analysed again: `pdl1 train seg|nuclei PROJECT --from-review` tells by it the nuclei you
 * reclassified and the FN candidates you deleted (export the labels with pdl1_export_labels.groovy), and `pdl1 report
 * PROJECT` and `pdl1 review-queue PROJECT` report and rank the project by these records as by `pdl1 run`'s results
 * (the newer of the two for an image that has both). Not saved, it is named in the log. Once it has written an
 * image's analyses, it sets aside that image's records whose annotation or core is no longer in it (the whole-image
 * analysis the TMA cores' analyses replace, an annotation you deleted) in qupath_analyses/removed/, which those
 * commands do not read, and says how many and why; not one while objects this tool wrote lie in its area under no
 * analysed annotation or core (you deleted its annotation keeping them: the log names it), nor the folder's other
 * files. Close QuPath without saving (or undo) and the annotation is back: the next run moves its record back (or
 * deletes it, where the annotation was analysed again), and says which; meanwhile `pdl1 train seg|nuclei PROJECT
 * --from-review` takes it where the labels exported hold the annotation. pdl1_import_results.groovy sets aside there
 * the record of the whole-image analysis whose output it replaces: that one comes back only with the analysis's output
 * (QuPath closed without saving the import), not while `pdl1 run`'s results are under the annotation. Records set aside
 * are kept until then (or until their annotation is analysed again). One that cannot be moved is named in the log, and
 * the analysis stands.
 *
 * Settings: the project's pdl1-config.toml (beside project.qpproj; `pdl1 init-project` writes it, and
 * `pdl1 run` reads the same file) when there is one: [service] url, token, model and [analysis] outputs,
 * target_classes, target_names (its other keys are `pdl1 run`'s: the service runs with its own models and sizes,
 * and the log says so where the file sets others; [pairs] is the batch's pairing of H&E with IHC). Without it, and for the keys it leaves out, the settings block
 * below (PAGE_SIZE and POLL_MS always).
 *
 * Works from the script editor, "Run for project", and headless (-s is --save: write each image's data):
 *   QuPath script -p project.qpproj -s pdl1_analyze.groovy
 */
import qupath.lib.common.GeneralTools
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjectTools
import qupath.lib.regions.RegionRequest

import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import java.time.Duration

// ---- settings (where the project's pdl1-config.toml has none of these keys, or there is no such file) ------
def SERVER_URL = "http://127.0.0.1:8765"      // where `pdl1 serve` listens
def TOKEN = ""                                // the --token the service was started with, if any
def MODEL = "default"
def OUTPUTS = ["regions", "uncertainty_tiles", "sua", "nuclei"]
def TARGET_CLASSES = []                       // e.g. ["Tumor"] to analyse every Tumor annotation
def TARGET_NAMES = []                         // e.g. ["core 1"]
def PAGE_SIZE = 50000                         // features per result page
def POLL_MS = 1000
// ------------------------------------------------------------------------------------------

def ANALYSIS_CLASS = "PD-L1 analysis"
def OWN_ANNOTATION_CLASSES = ["PD-L1 positive", "PD-L1 FN candidate"]
def OWN_DETECTION_CLASSES = ["Tumor: Positive", "Tumor: Negative", "Other", "Tumor: 1+", "Tumor: 2+", "Tumor: 3+",
        "Immune cells: PD-L1 positive", "Immune cells: PD-L1 negative"]
def TILE_NAME = "PD-L1 uncertainty"
def CONFIG_NAME = "pdl1-config.toml"

// ---- helpers: plain Groovy, no QuPath classes (tests/test_groovy_scripts.py runs this part) ----
// pdl1-config.toml, read with the little TOML this needs: [tables], key = "string", 'string', number,
// true/false, and arrays of those (also over several lines). Returns [values: ["table.key": value],
// lines: ["table.key": line]]; anything else is refused naming the file and the line.
def readToml = { File file ->
    def values = new LinkedHashMap<String, Object>()
    def lines = new LinkedHashMap<String, Integer>()
    def fail = { int n, String what -> throw new IllegalArgumentException("${file}, line ${n}: ${what}".toString()) }
    // Outside strings: where a comment starts (-1: none) and how many [ are still open before it.
    def scan = { String t ->
        int d = 0
        def quote = null
        for (int k = 0; k < t.length(); k++) {
            def c = t.charAt(k)
            if (quote == null && c == '#' as char)
                return [k, d]
            if (quote == null && (c == '"' as char || c == '\'' as char))
                quote = c
            else if (quote == '"' as char && c == '\\' as char)
                k++
            else if (quote != null && c == quote)
                quote = null
            else if (quote == null && c == '[' as char)
                d++
            else if (quote == null && c == ']' as char)
                d--
        }
        return [-1, d]
    }
    // The text before a comment, strings kept whole.
    def uncommented = { String line ->
        int at = scan(line)[0] as int
        return at < 0 ? line : line.substring(0, at)
    }
    // What to do about a backslash in a double-quoted string that starts no escape TOML knows: most often a path.
    def backslashFix = "a backslash in double quotes starts an escape: write a Windows path in single quotes " +
            "('C:\\Users\\me\\seg', which keep backslashes as they are) or with forward slashes (\"C:/Users/me/seg\")"
    // One value starting at text[p]: [value, index after it].
    def scalar = { String text, int p, int n ->
        def c = text.charAt(p)
        if (text.startsWith('"""', p) || text.startsWith("'''", p))
            fail(n, "multi-line strings are not read here; keep the string on one line")
        if (c == '"' as char) {
            def out = new StringBuilder()
            int k = p + 1
            while (k < text.length() && text.charAt(k) != '"' as char) {
                def ch = text.charAt(k)
                if (ch == '\\' as char && k + 1 < text.length()) {
                    def e = text.charAt(k + 1)
                    def simple = ['n': '\n', 't': '\t', 'r': '\r', 'b': '\b', 'f': '\f', '"': '"', '\\': '\\']
                    if (simple.containsKey(e as String)) {
                        out.append(simple[e as String])
                        k += 2
                    } else if (e == 'u' as char || e == 'U' as char) {
                        // A Windows path in double quotes ("C:\Users\me") starts one: Integer.parseInt's
                        // NumberFormatException named neither the file nor the line.
                        int len = e == 'u' as char ? 4 : 8
                        def hex = text.substring(k + 2, Math.min(text.length(), k + 2 + len)).takeWhile { it != '"' }
                        if (!(hex ==~ /[0-9A-Fa-f]{${len}}/))
                            fail(n, "\\${e} in a string starts a Unicode escape of ${len} hex digits, got " +
                                    "\\${e}${hex}; ${backslashFix}")
                        long code = Long.parseLong(hex, 16)  // 8 hex digits may be over Integer.MAX_VALUE
                        if (code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF))  // as tomllib refuses it
                            fail(n, "\\${e}${hex} in a string is no Unicode character; ${backslashFix}")
                        out.appendCodePoint((int) code)
                        k += 2 + len
                    } else {
                        fail(n, "unknown escape \\${e} in a string; ${backslashFix}")
                    }
                } else {
                    out.append(ch)
                    k++
                }
            }
            if (k >= text.length())
                fail(n, "a string without its closing \"")
            return [out.toString(), k + 1]
        }
        if (c == '\'' as char) {
            int end = text.indexOf('\'', p + 1)
            if (end < 0)
                fail(n, "a string without its closing '")
            return [text.substring(p + 1, end), end + 1]
        }
        def m = (text.substring(p) =~ /^[^,\]\s]+/)
        def word = m.find() ? m.group() : ""
        if (word == "true" || word == "false")
            return [word == "true", p + word.length()]
        if (word ==~ /[+-]?\d[\d_]*/)
            return [Long.parseLong(word.replace("_", "")), p + word.length()]
        if (word ==~ /[+-]?\d[\d_]*(\.\d[\d_]*)?([eE][+-]?\d+)?/)
            return [Double.parseDouble(word.replace("_", "")), p + word.length()]
        fail(n, "expected a string in quotes, a number, true/false or an array, got `${text.substring(p).trim()}`")
    }
    def value = { String text, int n ->
        int p = 0
        def skip = { while (p < text.length() && Character.isWhitespace(text.charAt(p))) p++ }
        skip()
        if (p >= text.length())
            fail(n, "a key without a value")
        def result
        if (text.charAt(p) == '[' as char) {
            result = []
            p++
            skip()
            while (p < text.length() && text.charAt(p) != ']' as char) {
                if (text.charAt(p) == '[' as char)
                    fail(n, "arrays of arrays are not read here")
                def item = scalar(text, p, n)
                result << item[0]
                p = item[1] as int
                skip()
                if (p < text.length() && text.charAt(p) == ',' as char) {
                    p++
                    skip()
                } else if (p >= text.length() || text.charAt(p) != ']' as char) {
                    fail(n, "expected , or ] in the array")
                }
            }
            if (p >= text.length())
                fail(n, "an array without its closing ]")
            p++
        } else {
            def item = scalar(text, p, n)
            result = item[0]
            p = item[1] as int
        }
        skip()
        if (p < text.length())
            fail(n, "unexpected `${text.substring(p)}` after the value")
        return result
    }
    def table = ""
    def seenTables = [] as Set
    def all = file.getText("UTF-8").replaceFirst("^\uFEFF", "").split("\r?\n", -1)  // Notepad's BOM
    int i = 0
    while (i < all.length) {
        int n = i + 1
        def line = uncommented(all[i]).trim()
        i++
        if (line.isEmpty())
            continue
        if (line.startsWith("[")) {
            def header = (line =~ /^\[\s*([A-Za-z0-9_-]+)\s*\]$/)
            def array = (line =~ /^\[\[\s*([A-Za-z0-9_-]+)\s*\]\]$/)
            if (array.matches())  // as bridge/project_config.py says it
                fail(n, "[[${array.group(1)}]] is an array of tables; write [${array.group(1)}] (one pair of brackets): each table appears once")
            if (!header.matches())
                fail(n, "expected a table header such as [service], got `${line}`")
            table = header.group(1)
            if (!seenTables.add(table))
                fail(n, "[${table}] appears twice")
            lines.put("[" + table + "]", n)
            continue
        }
        def kv = (line =~ /^([A-Za-z0-9_-]+|"[^"]*")\s*=(.*)$/)
        if (!kv.matches())
            fail(n, "expected key = value, got `${line}`")
        def key = kv.group(1).replace('"', '')
        def text = kv.group(2)
        // An array may go on over the next lines, until its brackets close (comments are already cut off).
        while ((scan(text)[1] as int) > 0 && i < all.length) {
            text += " " + uncommented(all[i])
            i++
        }
        def full = table.isEmpty() ? key : table + "." + key
        if (values.containsKey(full))
            fail(n, "${key} is set twice")
        // put, not map[key] = ...: Groovy 5 (QuPath 0.7) sets a Map's own property for a key named as one
        // (`properties`, `metaClass`), which a typo in the file may be, and the script failed with a stack trace.
        values.put(full, value(text, n))
        lines.put(full, n)
    }
    return [values: values, lines: lines]
}

// The keys pdl1-config.toml may hold and what each must be (bridge/project_config.py checks the same).
def CONFIG_KEYS = [
    "service.url": "a string", "service.token": "a string", "service.model": "a string",
    "analysis.device": "a string", "analysis.runtime": "a string", "analysis.outputs": "an array of strings",
    "analysis.target_classes": "an array of strings", "analysis.target_names": "an array of strings",
    "analysis.uncertainty_tile_um": "a number", "analysis.min_region_area_um2": "a number",
    "models.segmentation": "a string", "models.nuclei": "a string", "models.ihc_nuclei": "a string",
    "pairs.case_key": "a string",
]
def KNOWN_OUTPUTS = ["regions", "uncertainty_tiles", "sua", "nuclei"]
def readPdl1Config = { File file ->
    def toml = readToml(file)
    def tables = CONFIG_KEYS.keySet().collect { it.split("\\.")[0] } as LinkedHashSet
    toml.lines.each { key, n ->
        if (key.startsWith("[") && !(key[1..-2] in tables))
            throw new IllegalArgumentException("${file}, line ${n}: unknown table ${key}; expected ${tables.collect { '[' + it + ']' }.join(', ')}".toString())
    }
    toml.values.each { key, value ->
        // get, not a subscript: Groovy 5 (QuPath 0.7) reads a String subscript of a Map as a property, and a top-level
        // key named `properties` was named by the map's own meta-properties, not its line (GROOVY-12024).
        def where = "${file}, line ${toml.lines.get(key)}: ${key}"
        if (!CONFIG_KEYS.containsKey(key))
            throw new IllegalArgumentException("${where}: unknown key; pdl1-config.toml holds ${CONFIG_KEYS.keySet().join(', ')}".toString())
        def expected = CONFIG_KEYS[key]
        def ok = expected == "a string" ? value instanceof String :
                expected == "a number" ? (value instanceof Number) :
                value instanceof List && value.every { it instanceof String }
        if (!ok)
            throw new IllegalArgumentException("${where}: expected ${expected}, got ${value.inspect()}".toString())
        if (key == "analysis.outputs" && value.isEmpty())  // the service refuses an empty list: no results to replace
            throw new IllegalArgumentException(("${where}: expected some of ${KNOWN_OUTPUTS.join(', ')}, got an empty " +
                    "list; name those to compute, or leave outputs out for all of them").toString())
        if (key == "analysis.outputs" && !value.every { it in KNOWN_OUTPUTS })
            throw new IllegalArgumentException("${where}: expected some of ${KNOWN_OUTPUTS.join(', ')}, got ${value.inspect()}".toString())
    }
    return toml.values
}

// pdl1-config.toml's keys that only `pdl1 run` uses: the service analyses with what `pdl1 serve` was started with
// (--models, --device, --runtime) and with the pipeline's own uncertainty tile and smallest region (inference/
// pipeline.py: PipelineConfig, for which pdl1 serve has no option; a test keeps the numbers equal). A file naming other
// models or sizes was followed by `pdl1 run` and silently not here. The lines to log, one per such key.
def SERVICE_SIZES = ["analysis.uncertainty_tile_um": [64.0d, "64 \u00b5m"], "analysis.min_region_area_um2": [200.0d, "200 \u00b5m\u00b2"]]
// pdl1 serve --models takes the folder that holds the models, each in a folder of its own by these names.
def SERVE_MODEL_FOLDERS = ["models.segmentation": "seg", "models.nuclei": "nuclei", "models.ihc_nuclei": "nuclei-ihc"]
def runOnlyNotes = { Map values ->
    def notes = []
    SERVE_MODEL_FOLDERS.findAll { key, folder -> values[key] }.each { key, folder ->
        notes << ("pdl1: pdl1-config.toml's ${key} (${values[key]}) is `pdl1 run`'s; this analysis runs the models " +
                "`pdl1 serve` loaded: to run it, start pdl1 serve with --models DIR, DIR holding it as ${folder}/ " +
                "(DIR holds seg/, nuclei/ and nuclei-ihc/ model folders, as the shipped demo's)").toString()
    }
    SERVICE_SIZES.each { key, size ->
        if (values.containsKey(key) && (values[key] as double) != (size[0] as double))
            notes << ("pdl1: pdl1-config.toml's ${key} = ${values[key]} is `pdl1 run`'s; the service analyses with " +
                    "${size[1]} (pdl1 serve has no option for it)").toString()
    }
    return notes
}
// What went wrong, for the log: the first message in the exception's causes, else their class names. Java's HttpClient
// throws a ConnectException without a message where nothing listens, and the log said "no service at ... (null)".
def whyFailed = { Throwable error ->
    def names = new LinkedHashSet()
    for (def e = error; e != null; e = e.getCause() == e ? null : e.getCause()) {
        if (e.getMessage())
            return e.getMessage()
        names << e.getClass().getSimpleName()
    }
    return names.join(", ")
}
// The service's address as the base of its paths, without the slash a pasted address may end with: every path was
// then //v1/..., which the service answers 404, and the log said there was no service.
def serviceBase = { String url -> url.trim().replaceAll('/+$', '') }
// What the log says when GET /v1/health gives nothing to go on: status is the service's HTTP status, 0 when nothing
// answered, -1 when url is no address to call; detail the answer's detail or the error's message; tokenSetting where
// this run's token is set. A missing or wrong token (401) was told as no service at all.
def healthProblem = { String url, int status, String detail, String tokenSetting ->
    if (status < 0)
        return ("pdl1: ${url} is no address to call (${detail}); set the address `pdl1 serve` prints when it " +
                "starts, such as http://127.0.0.1:8765").toString()
    if (status == 0)
        return "pdl1: no service at ${url} (${detail}); start it with `pdl1 serve --allow-root <slides folder>`".toString()
    if (status == 401)
        return ("pdl1: the service at ${url} wants the token it was started with (${detail}); set ${tokenSetting} " +
                "to it (pdl1 serve's --token, --token-file or PDL1_TOKEN)").toString()
    return ("pdl1: ${url} answered ${status} to GET /v1/health (${detail}); is it the address `pdl1 serve` prints " +
            "when it starts, such as http://127.0.0.1:8765?").toString()
}

// Why QuPath shows this image other than its file, read as it is, would show it; null when it does not.
// Decided by what the server is on every QuPath version: no class is imported that 0.4.4 lacks
// (TiledTransformingImageServer is 0.6+ and is not a TransformingImageServer).
def transformedBy = { server ->
    def name = server.getClass().getSimpleName()
    for (def c = server.getClass(); c != null; c = c.getSuperclass()) {
        if (c.getSimpleName().contains("Transforming"))
            return "a ${name} (a ${c.getSimpleName()}: rotated, cropped, flipped or otherwise transformed)".toString()
    }
    def uris = server.getURIs()
    if (uris.size() != 1)
        return "a ${name} made from ${uris.size()} files".toString()
    def builder = server.getBuilder()
    def kind = builder == null ? null : builder.getClass().getSimpleName()
    if (kind != null && !(kind in ["DefaultImageServerBuilder", "PyramidGeneratingServerBuilder"]))
        return "a ${name} built by a ${kind}".toString()
    return null
}
// The series of a multi-image file QuPath shows (Bio-Formats' --series N in its DefaultImageServerBuilder's args:
// getArgs(), ImageServerBuilder.java v0.4.4:340, v0.7.0:356; BioFormatsImageServer.java v0.4.4:1707-1713) where it
// is not the first; null for the first or a file of one image. The service reads a file's first series, as `pdl1 run`
// does (it refuses another: bridge/project.py, file_builder), so a path job analysed another image than QuPath's.
// A pyramid QuPath builds on import (a large image of one level) wraps the file's builder in a private field with no
// getter (ImageServers.java v0.4.4:166-172, v0.7.0:188-194), read with Groovy's .@ (QuPath's classes are on the class
// path, no module closes them): a multi-image file's series there went unseen. A QuPath whose field is another's
// is read as before.
def otherSeries = { server ->
    def builder = server.getBuilder()
    if (builder != null && builder.getClass().getSimpleName() == "PyramidGeneratingServerBuilder") {
        try {
            builder = builder.@builder
        } catch (RuntimeException ignored) {  // a MissingFieldException, or access refused
            return null
        }
    }
    if (builder == null || builder.getClass().getSimpleName() != "DefaultImageServerBuilder")
        return null
    def args = (builder.getArgs() ?: []).toList()
    int at = args.indexOf("--series")
    return at >= 0 && at + 1 < args.size() && args[at + 1] != "0" ? args[at + 1] as String : null
}

// The entry metadata keys a run of this tool writes, for either stain (bridge/run.py: RUN_METADATA_KEYS; a test
// keeps the two equal). A list, not every "PD-L1 ..." key: a pathologist's own "PD-L1 TPS (manual)" stays, and so
// do the "PD-L1 review ..." keys of `pdl1 review-queue`.
def RUN_METADATA_KEYS = ["PD-L1 TPS %", "PD-L1 TPS category", "PD-L1 Predicted TPS % (H&E)",
        "PD-L1 Predicted TPS category (H&E)", "PD-L1 CPS", "PD-L1 CPS category", "PD-L1 stain", "PD-L1 model",
        "PD-L1 run"]
// Entry metadata: the entry's own map where it has one (QuPath 0.6+: getMetadata() returns it, mutable),
// else putMetadataValue and removeMetadataValue (0.4.4 and 0.5; deprecated since 0.6). This tool's keys that an
// earlier run wrote and this run has not are removed first (bridge/run.py: stale_entry_metadata): after the stain
// was corrected, an entry kept the H&E's predicted TPS beside the IHC's TPS. Others' keys stay.
// Returns [how: the API used, removed: the keys removed].
def putEntryMetadata = { entry, Map values ->
    def map = entry.metaClass.respondsTo(entry, "getMetadata") ? entry.getMetadata() : null
    def isStale = { key -> key in RUN_METADATA_KEYS && !values.containsKey(key) }
    if (map instanceof Map) {
        def stale = map.keySet().findAll(isStale).toList()
        stale.each { map.remove(it) }
        values.each { key, value -> map.put(key as String, value as String) }
        return [how: "getMetadata", removed: stale]
    }
    def stale = entry.getMetadataKeys().findAll(isStale).toList()
    stale.each { entry.removeMetadataValue(it as String) }
    values.each { key, value -> entry.putMetadataValue(key as String, value as String) }
    return [how: "putMetadataValue", removed: stale]
}
// The entry metadata over every annotation analysed so far, as bridge/run.py's merge_entry_metadata (a test keeps
// the two equal): the last one's, with the TPS, its category and the CPS from the summed cell counts where every
// part has them (the service's metadata_counts), so two tumour annotations give the image's TPS, not the last one's.
// parts: [[metadata: Map, counts: Map], ...] in the order analysed.
def MIN_TUMOUR_CELLS = 100  // inference/analysis/points.py: MIN_TUMOUR_NUCLEI
// v as pdl1 writes a score (inference/analysis/tps.py: _text_keeping): one decimal, more while the rounded number lies
// on another side of a cut-off than v (side: which side of them a number lies on), cut down where four more would.
def textKeeping = { double v, Closure side ->
    for (int places = 1; places < 6; places++) {
        def text = new BigDecimal(v).setScale(places, java.math.RoundingMode.HALF_EVEN).toPlainString()
        if (side(text as double) == side(v))
            return text
    }
    return new BigDecimal(v).setScale(1, java.math.RoundingMode.FLOOR).toPlainString()
}
// A CPS as pdl1 writes it (tps.py: cps_text; a test keeps the two equal): never rounded up to a whole number it lies
// below (the CPS cut-offs: 9.96 shown as 10.0 reads as CPS >= 10).
def cpsText = { double v -> textKeeping(v, { double p -> Math.floor(p) }) }
// A TPS as pdl1 writes it (tps.py: tps_text; a test keeps the two equal): never rounded across a cut-off (0.96 shown
// as 1.0 reads as 1-49%).
def tpsText = { double v -> textKeeping(v, { double p -> p < 1.0d ? 0 : (p < 50.0d ? 1 : 2) }) }
// Which of this run's targets lie within another's outline (a hotspot analysed inside an analysed tissue outline),
// whose cells that one counts: the image's score counts each cell once (bridge/targets.py: nested_targets, 0.5 px of
// tolerance); of two of one outline, the first. outlines: JTS geometries (ROI.getGeometry()), null for none.
def NESTED_TOLERANCE_PX = 0.5d
def nestedTargets = { List outlines ->
    def areas = outlines.collect { it == null || it.isEmpty() ? null : (it.getArea() as double) }
    def grown = [outlines, areas].transpose().collect { g, a -> a == null ? null : g.buffer(NESTED_TOLERANCE_PX) }
    return (0..<outlines.size()).collect { int i ->
        areas[i] != null && (0..<outlines.size()).any { int j ->
            j != i && areas[j] != null && (areas[j] > areas[i] || (areas[j] == areas[i] && j < i)) &&
                    grown[j].covers(outlines[i])
        }
    }
}
// Whether metadata holds an IHC's measured TPS, not an H&E's predicted one: either of its keys (its number is left out
// without a tumour cell), as bridge/run.py's merge_entry_metadata tells them.
def isMeasuredTps = { Map metadata ->
    return metadata.containsKey("PD-L1 TPS %") || metadata.containsKey("PD-L1 TPS category")
}
// The entry metadata over the parts ([metadata:, counts:, nested:]) as bridge/run.py's merge_entry_metadata: the last
// part's, with the TPS, its category and the CPS from the counts summed over the parts not nested in another.
def mergeEntryMetadata = { List parts ->
    def meta = new LinkedHashMap(parts[-1].metadata as Map)
    def counts = parts.findAll { !it.nested }.collect { (it.counts ?: [:]) as Map }
    if (parts.size() < 2 || counts.any { it.isEmpty() })
        return meta
    long positive = counts.sum { it.tumour_positive as long } as long
    long negative = counts.sum { it.tumour_negative as long } as long
    long total = positive + negative
    Double percent = total > 0 ? 100.0d * positive / total : null
    def category = (total < MIN_TUMOUR_CELLS || percent == null) ? "insufficient tumour cells" :
            (percent < 1.0d ? "<1%" : (percent < 50.0d ? "1-49%" : ">=50%"))
    // Without a tumour cell there is no number: its key is left out, never written empty (an empty value in QuPath's
    // metadata reads as a fault), and the category says why (bridge/run.py: _tps_metadata, _cps_metadata).
    def ihc = isMeasuredTps(meta)
    def percentKey = ihc ? "PD-L1 TPS %" : "PD-L1 Predicted TPS % (H&E)"
    meta.remove(percentKey)  // the last part's: the summed cells may have no tumour cell
    if (percent != null)
        meta.put(percentKey, tpsText(percent))
    meta.put(ihc ? "PD-L1 TPS category" : "PD-L1 Predicted TPS category (H&E)", category)
    if (counts.every { it.containsKey("immune_positive") }) {
        long immune = counts.sum { it.immune_positive as long } as long
        meta.remove("PD-L1 CPS")
        if (total > 0)
            meta.put("PD-L1 CPS", cpsText(Math.min(100.0d, 100.0d * (positive + immune) / total)))
        // The CPS's category where it has one (bridge/run.py: _cps_metadata): the last part's may not hold.
        meta.remove("PD-L1 CPS category")
        if (total < MIN_TUMOUR_CELLS)
            meta.put("PD-L1 CPS category", "insufficient tumour cells")
    }
    return meta
}
// A measurement list's names, in order: getNames() on 0.6+ (getMeasurementNames() is deprecated there), else
// getMeasurementNames() (0.4.4 and 0.5 have no getNames). keySet() is on every version but unordered on 0.6+.
def measurementNames = { ml ->
    return ml.metaClass.respondsTo(ml, "getNames") ? ml.getNames() : ml.getMeasurementNames()
}
// The analysed parent's measurements from this run. Those an earlier run wrote (named "PD-L1: ...") that this run
// has not are removed first (bridge/objects.py: stale_parent_measurements): a re-run without nuclei, or after the
// stain was corrected, kept the earlier run's TPS. Others' measurements stay. removeAll is 0.6+ (removeMeasurements
// is deprecated there); 0.4.4 and 0.5 have removeMeasurements only. Returns the names removed.
def setParentMeasurements = { ml, Map fresh ->
    def stale = measurementNames(ml).findAll { it.startsWith("PD-L1: ") && !fresh.containsKey(it) }
    if (!stale.isEmpty()) {
        def names = stale as String[]
        if (ml.metaClass.respondsTo(ml, "removeAll", String[]))
            ml.removeAll(names)
        else
            ml.removeMeasurements(names)
    }
    fresh.each { name, value -> ml.put(name as String, value as double) }
    return stale
}
// The targets the service can analyse, and the others: an annotation without an area (points, a line) has no
// pixels inside it, and the service refuses its ROI (422), which stopped the script before the remaining targets.
// [analysable, skipped]; each object needs getROI() (its isArea(), getRoiName()).
def splitByArea = { List objects ->
    def hasArea = { obj -> obj.getROI() != null && obj.getROI().isArea() }
    return [objects.findAll { hasArea(it) }, objects.findAll { !hasArea(it) }]
}
// What to analyse, as bridge/targets.py's choose_targets (a test keeps the two equal): the selected annotations and
// TMA cores, else the annotations of the target classes or names, else the cores of the image's TMA grid (TMA > TMA
// dearrayer), else the whole image (no targets). Cores marked missing are never analysed: they come back in missing,
// also when selected (isMissing is asked of the selected objects and the cores). A grid whose every core is missing
// gives no targets, not the whole image: one TPS over all cores means nothing. [source, targets, missing].
def chooseTargets = { List selected, List annotations, List cores, Closure isMissing ->
    if (!annotations.isEmpty() && selected.isEmpty())
        return [source: "annotations", targets: annotations, missing: []]
    for (choice in [["selection", selected], ["TMA cores", cores]]) {
        List objects = choice[1]
        if (!objects.isEmpty())
            return [source: choice[0], targets: objects.findAll { !isMissing(it) }, missing: objects.findAll { isMissing(it) }]
    }
    return [source: "whole image", targets: [], missing: []]
}
// One target's score for the log, from its result's metadata (bridge/run.py: entry_metadata): ", TPS 12.0% (1-49%)",
// the predicted TPS on H&E, the CPS too on an IHC (with its category under 100 tumour cells, as the TPS's: ", CPS 12.5
// (insufficient tumour cells)"); "" without nuclei. Each core's is its own (the entry's is merged).
def targetScore = { Map metadata ->
    def ihc = isMeasuredTps(metadata)
    def percent = metadata.get(ihc ? "PD-L1 TPS %" : "PD-L1 Predicted TPS % (H&E)")
    def category = metadata.get(ihc ? "PD-L1 TPS category" : "PD-L1 Predicted TPS category (H&E)")
    if (!category)  // no nuclei run: no TPS
        return ""
    // No tumour cell at all: no number, its category said all the same (the log said nothing of the score).
    percent = percent ? "${percent}%" : "n/a"
    def cps = metadata.get("PD-L1 CPS")
    def cpsCategory = metadata.get("PD-L1 CPS category")  // under 100 tumour cells, as the TPS's (bridge: cps_shown)
    def cpsShown = cps ? ", CPS ${cps}${cpsCategory ? ' (' + cpsCategory + ')' : ''}" : ""
    return ", ${ihc ? 'TPS' : 'predicted TPS (H&E)'} ${percent} (${category})${cpsShown}".toString()
}
// A number to three significant digits as bridge/project.py's _three_digits writes it: no trailing zeros, plain digits
// below a billion ("57", "0.0932", "12300", "1.23e+09").
// Gson reads every JSON number as a Double, and the log said "(57.0, limit 100.0)".
def threeDigits = { double v ->
    if (v == 0.0d)
        return 1.0d / v < 0 ? "-0" : "0"
    def rounded = new BigDecimal(v).round(new java.math.MathContext(3, java.math.RoundingMode.HALF_EVEN))
    int exponent = rounded.precision() - rounded.scale() - 1
    def digits = rounded.stripTrailingZeros()
    if (exponent >= -4 && exponent < 9)  // plain digits below a billion, as bridge/project.py's _three_digits
        return digits.toPlainString()
    def unscaled = digits.unscaledValue().abs().toString()
    return (v < 0 ? "-" : "") + unscaled[0] + (unscaled.length() > 1 ? "." + unscaled.substring(1) : "") + "e" +
            String.format(Locale.ROOT, "%+03d", exponent)
}
def finiteNumber = { value ->
    return value instanceof Number && !Double.isNaN(value as double) && !Double.isInfinite(value as double)
}
// One review reason of a result as a person reads it, as bridge/project.py's review_reason_text (a test keeps the two
// equal): "segmentation uncertainty (0.0932, limit 0.0873)"; a reason without a value and a limit without the
// parentheses (the log said "(null, limit null)"); led by its target's name where it names one.
def reviewReasonText = { Map reason ->
    def value = reason.get("value"), limit = reason.get("limit")
    def numbers = finiteNumber(value) && finiteNumber(limit) ?
            " (${threeDigits(value as double)}, limit ${threeDigits(limit as double)})" : ""
    def target = reason.get("target")
    return "${target == null ? '' : target + ': '}${reason.get('reason')}${numbers}".toString()
}
// A reading of the domain guard (an out-of-domain score, a stain distance) with its limit, each number as a review
// reason's: "1.23 (limit 1)", "12 deg (limit 15 deg)"; "not measured" without one (the log said "null deg").
def readingText = { value, limit, String unit ->
    if (!finiteNumber(value))
        return "not measured"
    def of = finiteNumber(limit) ? " (limit ${threeDigits(limit as double)}${unit})" : ""
    return threeDigits(value as double) + unit + of
}
// The plane of an ROI (its z-slice and timepoint, ROI.getZ() and getT() on 0.4.4 to 0.7) for the log, null for the
// first (z=0, t=0), the one plane a path job reads (the service reads a file's first plane).
def planeName = { int z, int t -> z == 0 && t == 0 ? null : "z=${z}, t=${t}".toString() }
// A TMA core's name as QuPath shows it ("A-1" from the dearrayer), else its place in the grid (bridge/targets.py:
// core_label).
def coreLabel = { String name, int index -> name ? name : "core ${index + 1}".toString() }
// This tool's earlier objects of a parent's analysis, as bridge's _own_descendants finds them (a test keeps the two
// equal): anywhere under it, except under another analysed annotation (it carries ANALYSED_SIGNATURE; its results
// are its own), and those QuPath's Resolve hierarchy moved out of it. Resolve hierarchy moves the nuclei and tiles
// under the regions (or your annotations) they lie in, so removing only the parent's own children, with their
// children kept, put the earlier run's objects back beside the new ones. It also puts each object in the smallest
// annotation covering it, a detection in the one holding its centroid (PathObjectHierarchy.java v0.4.4:349-362):
// a region of ours over the edge of a drawn ROI went beside the ROI, under its parent or the root, and a re-run kept
// it beside its new ones; so did a tile whose centroid lies outside the ROI (tiles are trimmed to it, but one its
// outline cuts in two or into an L may have its centroid outside; an earlier version's tiles were whole cells over
// the edge). One of ours outside every analysed annotation that overlaps the parent (more
// than a shared edge) is the parent's too, and so is what of ours lies in it, each unless another analysed
// annotation holds as much of it or more (heldMostBy): an analysis makes its objects from its own ROI's pixels, so of
// two analysed ROIs that touch or overlap, each one's region over the edge between them lies mostly in its own, and
// taking every one that overlapped the parent, a re-run removed its neighbour's (and taking all of ours in such a
// region, the smaller neighbour's nuclei in it). own: the isOwn test. Measurement lists are read only
// of annotations and TMA cores here (PathObject.getMeasurementList() creates an empty one on an object without).
def ANALYSED_SIGNATURE = "PD-L1: Uncertainty flag"  // bridge/objects.py: every analysed parent carries it
// An analysed parent is an annotation or a TMA core (isTMACore(): PathObject.java v0.4.4:621, v0.5.1:621, v0.6.0:563,
// v0.7.0:561; a core is no annotation), as bridge's _own_or_analysed: an analysed core's results are its own.
def isAnalysed = { obj ->
    return (obj.isAnnotation() || obj.isTMACore()) &&
            !Double.isNaN(obj.getMeasurementList().get(ANALYSED_SIGNATURE) as double)
}
def ownUnder = { top, Closure own ->
    def out = []
    def stack = [top]
    while (!stack.isEmpty()) {
        stack.remove(stack.size() - 1).getChildObjectsAsArray().each { child ->
            if (own(child))
                out << child
            if (!isAnalysed(child))
                stack << child
        }
    }
    return out
}
// Whether a JTS geometry (ROI.getGeometry(), 0.4.4 to 0.7) shares more than a boundary with the area.
def overlaps = { geometry, area -> area.intersects(geometry) && !area.touches(geometry) }
// Every analysed annotation or TMA core below top, as bridge's _analysed_under: only annotations and TMA cores hold
// annotations (PathObjectHierarchy.insertPathObject puts none under a detection, v0.4.4:336-350): detections are not
// looked into.
def analysedUnder = { top ->
    def out = []
    def stack = [top]
    while (!stack.isEmpty()) {
        stack.remove(stack.size() - 1).getChildObjectsAsArray().each { child ->
            if (child.isDetection())
                return
            if (isAnalysed(child))
                out << child
            stack << child
        }
    }
    return out
}
// Whether the area holds more of a JTS geometry (by area) than each of others (JTS geometries) that overlaps it, as
// bridge's _held_most_by. A tie is not more: an object held as much by another analysed annotation may be that one's.
def heldMostBy = { geometry, area, List others ->
    def share = null
    for (other in others) {
        if (!overlaps(geometry, other))
            continue
        if (share == null)
            share = area.intersection(geometry).getArea()
        if (other.intersection(geometry).getArea() >= share)
            return false
    }
    return true
}
def ownDescendants = { parent, Closure own ->
    def out = ownUnder(parent, own)
    def ancestors = []
    for (def above = parent.getParent(); above != null; above = above.getParent())
        ancestors << above
    if (ancestors.isEmpty())
        return out
    def area = null  // the parent's outline, read only once an object of ours lies beside it
    def others = null
    def stack = [ancestors[-1]]  // the root
    while (!stack.isEmpty()) {
        def above = stack.remove(stack.size() - 1)
        def theirs = isAnalysed(above)  // an analysed annotation around the parent: its results are its own
        above.getChildObjectsAsArray().each { child ->
            if (child.is(parent))
                return
            if (ancestors.any { it.is(child) }) {
                stack << child
                return
            }
            if (theirs)
                return
            def mine = own(child)
            if (mine && area == null)
                area = parent.getROI().getGeometry()
            def geometry = mine ? child.getROI().getGeometry() : null
            if (mine && overlaps(geometry, area)) {
                // The other analysed annotations' outlines, read once one of ours overlaps; not those the parent lies
                // in: they hold all of it that the parent holds, and their own objects beside it are theirs (above).
                if (others == null) {
                    def around = { a -> ancestors.any { it.is(a) } }
                    others = analysedUnder(ancestors[-1]).findAll { !it.is(parent) && !around(it) }*.getROI()*.getGeometry()
                }
                if (heldMostBy(geometry, area, others)) {
                    out << child
                    // What of ours lies under it by the same rule: Resolve hierarchy inserts annotations largest first,
                    // each taking from its new parent the children that lie in it (PathObjectHierarchy.java v0.4.4:277,
                    // 372-381; v0.7.0:232, 327-335), so a region of ours beside the parent inserted before a smaller
                    // analysed ROI beside it takes that ROI's nuclei (and regions it covers) that lie in it.
                    out.addAll(ownUnder(child, { o -> own(o) && heldMostBy(o.getROI().getGeometry(), area, others) }))
                    return
                }
            }
            if (!isAnalysed(child))  // also one of ours that is another's: the parent's may lie in it
                stack << child
        }
    }
    return out
}
// Whether QuPath's Resolve hierarchy would put an object in the area (filterObjectsForROI, PathObjectHierarchy.java
// v0.4.4:863-880), as bridge's _lies_in: a detection (a tile too) where the area holds its centroid, on the boundary
// too (QuPath takes any point locator answer but EXTERIOR: PathObjectTileCache.java v0.4.4:298-313, RoiRelate.java
// v0.6.0 and v0.7.0:156-186; so covers, not contains), anything else where it covers it (v0.4.4 and v0.5; since v0.6,
// RoiRelate.coversWithTolerance, RoiRelate.java v0.6.0:90-149, also counts one out by less than 0.02 px).
def liesIn = { obj, area ->
    def geometry = obj.getROI().getGeometry()
    return obj.isDetection() ? area.covers(geometry.getCentroid()) : area.covers(geometry)
}
// Moves the children of old (the objects a re-run removes) that are not in old (your annotations, QuPath's
// detections that Resolve hierarchy put inside one of our regions) to their nearest ancestor that stays, as
// bridge's _rehome_others: the hierarchy's removeObjects(objects, keepChildren=true) adds kept children again under
// the root (PathObjectHierarchy.java v0.4.4:483-496, 632-636), out of the annotation they were in, and
// PathObject.addChildObjects takes each from its old parent first (PathObject.java v0.4.4:330-380, 410). Those of
// one of ours that Resolve hierarchy had moved out of the parent go back into the parent where they lie in it.
def rehomeOthers = { List old, parent ->
    def going = Collections.newSetFromMap(new IdentityHashMap())
    going.addAll(old)
    def area = null
    old.each { obj ->
        def others = obj.getChildObjectsAsArray().findAll { !going.contains(it) }
        if (others.isEmpty())
            return
        def home = obj.getParent()
        while (going.contains(home))
            home = home.getParent()
        def inside = []
        def within = false
        for (def up = home; up != null && !within; up = up.getParent())
            within = up.is(parent)
        if (!within) {
            if (area == null)
                area = parent.getROI().getGeometry()
            inside = others.findAll { liesIn(it, area) }
            others = others.findAll { other -> !inside.any { it.is(other) } }
        }
        [[home, others], [parent, inside]].each { target, children ->
            if (!children.isEmpty())
                target.addChildObjects(children)
        }
    }
}
// ---- pixel upload (POST /v1/jobs/pixels): a region QuPath renders, for an image the service cannot open ----
// QuPath's image types the service runs a model on, and the stain each means (bridge/project.py: IMAGE_TYPE_STAINS).
def STAIN_OF_IMAGE_TYPE = ["BRIGHTFIELD_H_E": "H&E", "BRIGHTFIELD_H_DAB": "H-DAB"]
// The µm/px an upload must reach for every model the analysis runs (GET /v1/models: task, stain, input_mpp): the
// finest of them. An H-DAB image runs the PD-L1 IHC nuclei model; an H&E image the segmentation ensemble, and the
// nuclei model where outputs name nuclei; an image of no stated stain (its colour decides) any of them. null: none
// listed for that stain.
def uploadModels = { List models, String imageType, List outputs ->
    def stain = STAIN_OF_IMAGE_TYPE[imageType]
    return models.findAll { m ->
        (stain == null || m.stain == stain) && (m.task != "nuclei" || m.stain == "H-DAB" || "nuclei" in outputs)
    }
}
def uploadModelMpp = { List models, String imageType, List outputs ->
    def used = uploadModels(models, imageType, outputs)
    return used.isEmpty() ? null : used.collect { it.input_mpp as double }.min()
}
// How much of the tissue around an ROI an upload carries as context, in µm: the largest tile (GET /v1/models:
// tile_size_px x input_mpp) of the models the analysis runs, as above. A model's tile over the ROI reaches at most
// a tile beyond it, so with this margin every tile sees what a path job's sees (the segmentation ensemble's 512 µm
// with the shipped models, the IHC model's 256 µm): measured against path jobs, the domain guard's score of a
// 100 µm annotation matches only then (the positive regions, TPS and nuclei already from 32 µm). 0 where the
// service lists no tile sizes (older than context).
def uploadContextUm = { List models, String imageType, List outputs ->
    def tiles = uploadModels(models, imageType, outputs).findAll { it.tile_size_px != null }
    return tiles.isEmpty() ? 0.0d : tiles.collect { (it.tile_size_px as double) * (it.input_mpp as double) }.max()
}
// The context margins (µm) to try, largest first, where the region with the whole one passes the service's upload
// limits: halved down to 32 µm, then none.
def uploadContextMargins = { double um ->
    def margins = []
    for (def m = um; m >= 32.0d; m /= 2.0d)
        margins << m
    return margins + [0.0d]
}
// The alpha of an upload's context pixels (bridge/service/uploads.py): 255 is the ROI, analysed and reported; 1 to
// 254 the tissue around it, which the service sees (the tiles over the ROI's edge, the tissue detector) but
// reports nothing in; 0 absent.
def UPLOAD_CONTEXT_ALPHA = 128
// Level-0 px per uploaded px: the model's resolution, never finer than level 0 (an upload is never enlarged).
def uploadDownsample = { double imageMpp, double modelMpp -> Math.max(1.0d, modelMpp / imageMpp) }
// The region to render for an ROI's bounds grown by margin level-0 px on every side (its context), in level-0 px of
// the image as QuPath shows it, clamped to the image, and the size QuPath renders it at: max(1, round(width /
// downsample)) (AbstractTileableImageServer.readRegion, v0.4.4 and v0.5.1:299-300, v0.6.0:301-302, v0.7.0:295-296).
// Its pixel (i, j) covers level-0 x + i * downsample, y + j * downsample, which is how the service maps results back
// (origin_x, origin_y, downsample); rounding the rendered size moves the far edge by less than half an uploaded
// pixel. null when the bounds miss the image.
def uploadRegion = { double boundsX, double boundsY, double boundsWidth, double boundsHeight, long imageWidth,
        long imageHeight, double downsample, double margin ->
    long x = Math.max(0L, (long) Math.floor(boundsX - margin))
    long y = Math.max(0L, (long) Math.floor(boundsY - margin))
    long x1 = Math.min(imageWidth, (long) Math.ceil(boundsX + boundsWidth + margin))
    long y1 = Math.min(imageHeight, (long) Math.ceil(boundsY + boundsHeight + margin))
    if (x1 <= x || y1 <= y)
        return null
    return [x: x, y: y, width: x1 - x, height: y1 - y,
            widthPx: Math.max(1L, Math.round((x1 - x) / downsample)), heightPx: Math.max(1L, Math.round((y1 - y) / downsample))]
}
// Why a region is not sent (null: it may be): over the service's upload limits (GET /v1/health: upload_limits, fixed
// in the service), in pixels before it is rendered, in bytes once it is a PNG (bytes < 0: not yet encoded). Says how
// big it is, the limit, and what to do.
def uploadTooLarge = { long widthPx, long heightPx, long bytes, Map limits, double downsample ->
    def fix = "draw smaller annotations around the tissue to analyse (or split this one), or let the service open " +
            "the image: export it from QuPath as OME-TIFF (File > Export images...) into a folder the service " +
            "opens (pdl1 serve --allow-root) and analyse that"
    def mib = { long n -> String.format(Locale.ROOT, "%.1f MiB", n / 1048576.0d) }
    def size = "${widthPx} x ${heightPx} px at downsample ${String.format(Locale.ROOT, '%.3g', downsample)}"
    long maxPx = limits.max_px as long
    if (widthPx * heightPx > maxPx)
        return ("the region is ${size} (${widthPx * heightPx} px), over the ${maxPx} px the service takes in an " +
                "upload (upload_limits.max_px of GET /v1/health): ${fix}").toString()
    long maxBytes = limits.max_bytes as long
    if (bytes > maxBytes)
        return ("the region's PNG (${size}) is ${mib(bytes)}, over the ${mib(maxBytes)} the service takes in an " +
                "upload (upload_limits.max_bytes of GET /v1/health): ${fix}").toString()
    return null
}
// The rendered region as an ARGB image, its colours kept, with alpha 255 where a pixel's centre lies in the shape (a
// java.awt.Shape in level-0 px, as ROI.getShape() gives it, 0.4.4 to 0.7: ROI.java v0.4.4:165, v0.7.0:166) and
// outsideAlpha elsewhere: the service reports only what lies in the ROI, as a path job in its ROI, and sees the
// pixels outside it as context (UPLOAD_CONTEXT_ALPHA) or not at all (0: no part of the image, not glass).
// x, y: the region's level-0 corner.
def maskOutside = { java.awt.image.BufferedImage image, java.awt.Shape shape, double x, double y, double downsample,
        int outsideAlpha ->
    int w = image.getWidth(), h = image.getHeight()
    def out = new java.awt.image.BufferedImage(w, h, java.awt.image.BufferedImage.TYPE_INT_ARGB)
    def g = out.createGraphics()
    try {
        g.setComposite(java.awt.AlphaComposite.Src)  // the pixels as they are, not blended
        g.drawImage(image, 0, 0, null)
        int[] outside = new int[w]
        Arrays.fill(outside, outsideAlpha)
        def alpha = out.getAlphaRaster()
        for (int row = 0; row < h; row++)
            alpha.setSamples(0, row, w, 1, 0, outside)
        // No anti-aliasing and no stroke normalisation: a pixel is in the clip where its centre lies in the shape.
        g.setRenderingHint(java.awt.RenderingHints.KEY_ANTIALIASING, java.awt.RenderingHints.VALUE_ANTIALIAS_OFF)
        g.setRenderingHint(java.awt.RenderingHints.KEY_STROKE_CONTROL, java.awt.RenderingHints.VALUE_STROKE_PURE)
        def toRegion = new java.awt.geom.AffineTransform()
        toRegion.scale(1.0d / downsample, 1.0d / downsample)
        toRegion.translate(-x, -y)
        g.setClip(toRegion.createTransformedShape(shape))
        g.drawImage(image, 0, 0, null)
    } finally {
        g.dispose()
    }
    return out
}
// An image's PNG bytes (ImageIO keeps an ARGB image's alpha).
def pngBytes = { java.awt.image.BufferedImage image ->
    def out = new ByteArrayOutputStream()
    if (!javax.imageio.ImageIO.write(image, "png", out))
        throw new IOException("no PNG writer for a ${image.getClass().getSimpleName()} of type ${image.getType()}")
    return out.toByteArray()
}
// The query of an upload: its µm per uploaded px, where its top-left corner lies in level-0 px and at what
// downsample, so the service maps the results back to where QuPath shows them; the outputs; QuPath's image type; the
// model set where it is not "default" (as a path job sends it: uploads ran the default one whatever MODEL said; left
// out for "default", so a service older than the parameter, which refuses unknown ones, still takes the upload).
def uploadQuery = { double mpp, double originX, double originY, double downsample, List outputs, String imageType,
                    String model ->
    def enc = { v -> URLEncoder.encode(v as String, "UTF-8") }
    def parts = ["mpp=" + enc(mpp), "origin_x=" + enc(originX), "origin_y=" + enc(originY), "downsample=" + enc(downsample)]
    outputs.each { parts << "outputs=" + enc(it) }
    if (imageType != null)
        parts << "image_type=" + enc(imageType)
    if (model != null && model != "default")
        parts << "model=" + enc(model)
    return parts.join("&")
}
// An earlier run's whole-image analysis (the "PD-L1 analysis" annotations in analyses) and this tool's objects under
// it, removed when the cores of the image's TMA grid are analysed, as bridge's remove_whole_image_analysis: an
// analysed annotation's results are its own, so the cores' analysis left it, and every nucleus in a core was there
// twice, under the core and under "PD-L1 analysis", which kept its one TPS over all cores. Not what lies under
// another analysed annotation inside it; your annotations and QuPath's detections under it go where it was
// (rehomeOthers). Returns how many objects went.
def removeWholeImageAnalysis = { List analyses, Closure own, hierarchy ->
    def removed = 0
    analyses.each { top ->
        def going = [top] + ownUnder(top, own)
        rehomeOthers(going, top.getParent())  // its parent stays: no area test
        hierarchy.removeObjects(going, true)
        removed += going.size()
    }
    return removed
}
// The parts of mergeEntryMetadata for the analysed TMA cores that a run on a selection of cores leaves out, so that
// the entry's score stays the image's over every analysed core (pdl1 run analyses them all): each core's counts as
// bridge/run.py's metadata_counts has them, from the measurements bridge/objects.py's parent_measurements wrote on it
// ("PD-L1: Num <class>" for every nucleus class), and no metadata of its own (the merge takes the last part's). A core
// marked missing is left out (pdl1 run does not analyse it); one analysed without nuclei has no counts, so the merge
// sums none (as pdl1 run's, where a target has no TPS). gridCores: the grid's; analysed: this run's targets;
// withImmune: whether this run's counts have immune_positive (a PD-L1 IHC; a core without the immune cells' count
// has 0, as metadata_counts gives for a model without that class).
def otherCoreParts = { List gridCores, List analysed, boolean withImmune ->
    return gridCores.findAll { c -> !c.isMissing() && isAnalysed(c) && !analysed.any { it.is(c) } }.collect { core ->
        def ml = core.getMeasurementList()
        double positive = ml.get("PD-L1: Num Tumor: Positive")
        double negative = ml.get("PD-L1: Num Tumor: Negative")
        if (Double.isNaN(positive) || Double.isNaN(negative))
            return [metadata: [:], counts: [:]]
        def counts = [tumour_positive: positive as long, tumour_negative: negative as long]
        if (withImmune) {
            double cells = ml.get("PD-L1: Num Immune cells: PD-L1 positive")
            counts.immune_positive = Double.isNaN(cells) ? 0L : cells as long
        }
        return [metadata: [:], counts: counts]
    }
}
// Where the record of what an analysis wrote goes, in the project folder: pdl1/<entry ID>/qupath_analyses/<parent
// ID>.json (bridge/analysis_record.py: record_path), one per analysed annotation or TMA core (a re-analysis replaces
// it); `pdl1 train --from-review` tells a review (a nucleus reclassified, an FN candidate deleted) from it.
def RECORDS_FOLDER = "qupath_analyses"
def recordFolder = { java.nio.file.Path projectFolder, String entryId ->
    return projectFolder.resolve("pdl1").resolve(entryId).resolve(RECORDS_FOLDER)
}
// The `pdl1 run` output in an entry's folder (pdl1/<entry ID>) as a record is asked for: its summary.json's run_id,
// "none" where there is none, null where it does not read or holds no run id (then nothing is said, and the clocks
// order the record against it: recordQuery). parseJson: text to a Map (QuPath's Gson in the script).
def runSeen = { java.nio.file.Path entryFolder, Closure parseJson ->
    def summary = entryFolder.resolve("summary.json")
    if (!java.nio.file.Files.exists(summary))
        return "none"
    try {
        def data = parseJson(new String(java.nio.file.Files.readAllBytes(summary), "UTF-8"))
        def runId = data instanceof Map ? data.get("run_id") : null
        return runId instanceof String && runId ==~ /[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}/ ? runId : null
    } catch (Exception ignored) {  // damaged, not JSON: nothing is said, and the clocks order this record against it
        return null
    }
}
// Saves a record (GET /v1/jobs/{id}/record, as the service gave it) as folder/<name>.json: written beside it as a
// .part file and moved over it in one step, as pdl1_export_labels.groovy writes, so a reader finds the earlier
// record or this one, never half of one. Returns the file.
def saveRecord = { java.nio.file.Path folder, String name, byte[] bytes ->
    Files.createDirectories(folder)
    def target = folder.resolve(name + ".json")
    def part = folder.resolve(name + ".json.part")
    Files.write(part, bytes)
    Files.move(part, target, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
    return target
}
// The tidy of an image's records (tidyRecords below): a record whose parent is gone from the image was kept on disk,
// and `pdl1 report` counted a deleted annotation's TPS, and named a whole-image analysis the cores replaced forever;
// so it sets them aside (REMOVED_FOLDER).
// A record's file name as saveRecord names it: its parent's QuPath ID (UUID.toString(), lowercase) and .json. Only
// such files are records of this tool; the folder's others (your notes, the .part of a save cut short) stay.
def RECORD_NAME = ~/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.json/
// An object this tool wrote, whatever its class now (a reviewed nucleus, a candidate made PD-L1 negative), by the
// signature measurements bridge/labels.py's _tool_written_class goes by (bridge/objects.py); tiles carry neither,
// and no record holds them. Measurement lists are read of annotations and detections only.
def OWN_ANNOTATION_SIGNATURE = "PD-L1 probability mean"
def OWN_DETECTION_SIGNATURE = "PD-L1 positive probability"
def toolWritten = { obj ->
    if (obj.isAnnotation())
        return !Double.isNaN(obj.getMeasurementList().get(OWN_ANNOTATION_SIGNATURE) as double)
    return obj.isDetection() && !Double.isNaN(obj.getMeasurementList().get(OWN_DETECTION_SIGNATURE) as double)
}
// What the tidy goes by, from the hierarchy's root (every object descends from it, TMA cores too): ids, the QuPath
// IDs of the image's annotations and TMA cores (records are named by them); leftovers, the bounds (x, y, width,
// height in level-0 px) of the objects this tool wrote that lie under no analysed annotation or core, which may be
// a deleted parent's: QuPath keeps them when you delete it keeping its descendants (under its parent, removeObject:
// PathObjectHierarchy.java v0.4.4:439, v0.7.0:394; at the root, removeObjects: v0.4.4:491-498, v0.7.0:442-449), and
// Resolve hierarchy moves some out of it.
// What lies under an analysed annotation or core is its own, as for ownDescendants (its re-analysis replaces it).
// parents: those annotations and cores by ID, for the records set aside whose parent is back (recordsBack,
// recordOutputIn).
def recordsLookup = { root ->
    def ids = new HashSet<String>()
    def parents = [:]
    def leftovers = []
    def stack = [[root, false]]
    while (!stack.isEmpty()) {
        def (above, held) = stack.remove(stack.size() - 1)
        above.getChildObjectsAsArray().each { child ->
            if (!child.isDetection()) {
                ids << child.getID().toString()
                parents[child.getID().toString()] = child
            }
            def roi = child.getROI()
            if (!held && roi != null && toolWritten(child))
                leftovers << [roi.getBoundsX(), roi.getBoundsY(), roi.getBoundsWidth(), roi.getBoundsHeight()]
            stack << [child, held || isAnalysed(child)]
        }
    }
    return [ids: ids, parents: parents, leftovers: leftovers]
}
// A record's outline (a GeoJSON Polygon or MultiPolygon in level-0 px: bridge/analysis_record.py) as a Path2D,
// inside where the polygons are (even-odd: a hole is outside); IllegalArgumentException for anything else.
def outlineShape = { geometry ->
    def type = geometry instanceof Map ? geometry.get("type") : null
    def polygons = type == "Polygon" ? [geometry.get("coordinates")] :
            (type == "MultiPolygon" ? geometry.get("coordinates") : null)
    if (!(polygons instanceof List) || polygons.any { !(it instanceof List) })
        throw new IllegalArgumentException("its outline is no GeoJSON Polygon or MultiPolygon")
    def path = new java.awt.geom.Path2D.Double(java.awt.geom.Path2D.WIND_EVEN_ODD)
    polygons.each { rings ->
        rings.each { ring ->
            ring.eachWithIndex { xy, i ->
                if (i == 0)
                    path.moveTo(xy[0] as double, xy[1] as double)
                else
                    path.lineTo(xy[0] as double, xy[1] as double)
            }
            path.closePath()
        }
    }
    return path
}
// Which of an image's records are stale (names: the files in its qupath_analyses folder): those of this tool
// (RECORD_NAME) whose parent is no object of the image (lookup.ids, recordsLookup) and whose objects cannot be
// there either: none of this tool's objects under no analysed annotation or core (lookup.leftovers) lies in the
// record's outline (outlineOf(name): a java.awt.Shape; it may throw, and the record is then kept), its bounds grown by
// half a pixel (a point's are empty). Removed while its objects are there, a record turned your review of them into
// "not told" for `pdl1 train --from-review`. replaced: the IDs of the whole-image analyses this run removed.
// Returns [replaced: names, gone: names (their parent is no longer in the image), kept: [name: why]], by name.
def staleRecords = { List names, Map lookup, Set replaced, Closure outlineOf ->
    def out = [replaced: [], gone: [], kept: new LinkedHashMap<String, String>()]
    names.findAll { it ==~ RECORD_NAME && !lookup.ids.contains(it[0..-6]) }.sort().each { name ->
        def id = name[0..-6]
        if (!lookup.leftovers.isEmpty()) {
            def shape
            try {
                shape = outlineOf(name)
            } catch (Exception e) {
                out.kept[name] = ("its outline does not read (${whyFailed(e)}), so whether its objects are still in " +
                        "the image cannot be told").toString()
                return
            }
            int inside = lookup.leftovers.count { b ->
                shape.intersects((b[0] as double) - 0.5d, (b[1] as double) - 0.5d, (b[2] as double) + 1.0d,
                        (b[3] as double) + 1.0d)
            }
            if (inside > 0) {
                def one = inside == 1
                out.kept[name] = ("${inside} object${one ? '' : 's'} this tool wrote ${one ? 'lies' : 'lie'} in its " +
                        "area under no analysed annotation or TMA core (kept when its parent was deleted, or moved by " +
                        "Resolve hierarchy), and `pdl1 train seg|nuclei PROJECT --from-review` needs it to tell " +
                        "your review of " +
                        "${one ? 'it' : 'them'}; delete ${one ? 'it' : 'them'}, or analyse an annotation around " +
                        "${one ? 'it' : 'them'}, and a later run sets the record aside").toString()
                return
            }
        }
        out[replaced.contains(id) ? "replaced" : "gone"] << name
    }
    return out
}
// Removes the named files from folder, each on its own (one that cannot go stops none of the others): [removed:
// names, failed: [name: why]]. A file already gone is neither.
def removeRecords = { java.nio.file.Path folder, List names ->
    def removed = []
    def failed = new LinkedHashMap<String, String>()
    names.each { name ->
        try {
            if (java.nio.file.Files.deleteIfExists(folder.resolve(name)))
                removed << name
        } catch (IOException | SecurityException e) {
            failed[name] = whyFailed(e)
        }
    }
    return [removed: removed, failed: failed]
}
// Where the tidy puts a stale record (tidyRecords below): qupath_analyses/removed/<parent ID>.json, set aside, not
// deleted. The hierarchy it judges by is QuPath's in memory: delete an annotation, run the script, close QuPath
// without saving, and the annotation and its objects come back from the saved data; a deleted record was lost for
// good (`pdl1 train --from-review` then counted its nuclei "not read", and `pdl1 report` left the annotation out).
// bridge/analysis_record.py reads the folder's own *.json alone, so nothing reads a record set aside but training,
// where the labels exported hold its parent (bridge/labels.py), and the tidy, which moves it back (recordsBack).
def REMOVED_FOLDER = "removed"
// Which records set aside (asideNames: the files in removed/) the tidy takes back, by the records in the folder
// (names: its files) and the image's annotations and TMA cores (ids: recordsLookup's): [restore: those whose parent
// is in the image again (QuPath closed without saving, an undo) and has no record in the folder (moved back where
// recordOutputIn finds their output there too), superseded: those
// whose parent has a record in the folder (analysed again since: that record is the newer one)], by name. Only
// files named as records (RECORD_NAME); the others stay where they are.
def recordsBack = { List asideNames, List names, Set ids ->
    def out = [restore: [], superseded: []]
    def inFolder = names.findAll { it ==~ RECORD_NAME } as Set
    asideNames.findAll { it ==~ RECORD_NAME }.sort().each { name ->
        if (inFolder.contains(name))
            out.superseded << name
        else if (ids.contains(name[0..-6]))
            out.restore << name
    }
    return out
}
// Whether the output of an analysis whose record was set aside is under its parent, which is in the image again
// (recordsBack's restore). pdl1_import_results.groovy sets aside the record of the whole-image analysis whose output
// it replaces with `pdl1 run`'s under the same "PD-L1 analysis" annotation, so that annotation is in the image
// whether the import was saved (the record is then of nothing there: moved back, `pdl1 report` and `pdl1
// review-queue` counted the analysis it replaced) or QuPath was closed without saving (that analysis's output is
// back, and its record must come back with it). Its output is there as bridge/labels.py tells an analysis's output
// still in the image (_WrittenInImage): one of its positive regions or FN candidates among the tool's annotations,
// whatever their class now, by its bounds (x0, y0, x1, y1: region_bounds, a candidate's outline) within
// SAME_OUTPUT_PX; or one of its nuclei at its place (within SAME_OUTPUT_PX) with the class it wrote. Only what the
// tool wrote under the parent counts, not under another analysed annotation or core in it (ownUnder): that one's
// analysis found the same nuclei in the same pixels. record: the record as read (its region_bounds, candidates and
// nuclei: bridge/analysis_record.py). true or false; null where it holds none of these to tell by (an analysis that
// found nothing); a field of another shape throws.
def SAME_OUTPUT_PX = 1.0d  // bridge/labels.py: _SAME_NUCLEUS_PX, _SAME_REGION_BOUNDS_PX
// The bounds [x0, y0, x1, y1] of a GeoJSON geometry's coordinates; IllegalArgumentException where it has none.
def geometryBounds = { geometry ->
    double x0 = Double.POSITIVE_INFINITY, y0 = Double.POSITIVE_INFINITY
    double x1 = Double.NEGATIVE_INFINITY, y1 = Double.NEGATIVE_INFINITY
    def stack = [geometry instanceof Map ? geometry.get("coordinates") : null]
    while (!stack.isEmpty()) {
        def c = stack.remove(stack.size() - 1)
        if (c instanceof List && c.size() >= 2 && c[0] instanceof Number && c[1] instanceof Number) {
            x0 = Math.min(x0, c[0] as double)
            y0 = Math.min(y0, c[1] as double)
            x1 = Math.max(x1, c[0] as double)
            y1 = Math.max(y1, c[1] as double)
        } else if (c instanceof List) {
            stack.addAll(c)
        }
    }
    if (x0 > x1)
        throw new IllegalArgumentException("a geometry without coordinates")
    return [x0, y0, x1, y1]
}
def recordOutputIn = { Map record, parent ->
    def boxes = (record.get("region_bounds") ?: []).collect { b -> (b as List).collect { it as double } }
    boxes.addAll((record.get("candidates") ?: []).collect { geometryBounds(it) })
    def nuclei = record.get("nuclei") ?: [:]
    List xs = nuclei.get("x") ?: [], ys = nuclei.get("y") ?: [], classes = nuclei.get("class") ?: []
    List names = nuclei.get("class_names") ?: []
    if (xs.size() != ys.size() || xs.size() != classes.size())
        throw new IllegalArgumentException("nuclei arrays of different lengths")
    if (boxes.isEmpty() && xs.isEmpty())
        return null
    // The tool's objects under the parent, in cells of SAME_OUTPUT_PX: a whole image's nuclei are many.
    def key = { double x, double y ->
        "${Math.floor(x / SAME_OUTPUT_PX) as long} ${Math.floor(y / SAME_OUTPUT_PX) as long}".toString()
    }
    def annotations = new HashMap<String, List>()
    def written = new HashMap<String, List>()
    ownUnder(parent, toolWritten).each { obj ->
        def roi = obj.getROI()
        if (roi == null)
            return
        if (obj.isAnnotation()) {
            def b = [roi.getBoundsX(), roi.getBoundsY(), roi.getBoundsX() + roi.getBoundsWidth(),
                     roi.getBoundsY() + roi.getBoundsHeight()].collect { it as double }
            annotations.computeIfAbsent(key(b[0], b[1]), { [] }) << b
        } else {
            double x = roi.getCentroidX(), y = roi.getCentroidY()
            written.computeIfAbsent(key(x, y), { [] }) << [x, y, obj.getPathClass()?.toString()]
        }
    }
    def near = { Map grid, double x, double y ->
        def out = []
        for (dx in -1..1)
            for (dy in -1..1)
                out.addAll(grid.get(key(x + dx * SAME_OUTPUT_PX, y + dy * SAME_OUTPUT_PX)) ?: [])
        return out
    }
    for (b in boxes) {
        if (near(annotations, b[0], b[1]).any { a -> (0..3).every { Math.abs(a[it] - b[it]) <= SAME_OUTPUT_PX } })
            return true
    }
    for (int k = 0; k < xs.size(); k++) {
        double x = xs[k] as double, y = ys[k] as double
        def cls = names[classes[k] as int] as String
        if (near(written, x, y).any { n -> Math.hypot(n[0] - x, n[1] - y) <= SAME_OUTPUT_PX && n[2] == cls })
            return true
    }
    return false
}
// Moves the named files from one folder into another (made where missing), each in one step (ATOMIC_MOVE: a reader
// finds the record in one folder or the other, never in both or half) and on its own (one that cannot move stops
// none of the others), replacing a file of that name there (a record set aside again replaces its older copy):
// [moved: names, failed: [name: why]]. A file already gone is neither.
def moveRecords = { java.nio.file.Path from, java.nio.file.Path to, List names ->
    def moved = []
    def failed = new LinkedHashMap<String, String>()
    names.each { name ->
        def source = from.resolve(name)
        if (!java.nio.file.Files.exists(source))
            return
        try {
            java.nio.file.Files.createDirectories(to)
            java.nio.file.Files.move(source, to.resolve(name), java.nio.file.StandardCopyOption.REPLACE_EXISTING,
                    java.nio.file.StandardCopyOption.ATOMIC_MOVE)
            moved << name
        } catch (java.nio.file.NoSuchFileException e) {  // gone meanwhile (another QuPath's tidy) is neither
            if (java.nio.file.Files.exists(source))
                failed[name] = whyFailed(e)
        } catch (IOException | SecurityException e) {
            failed[name] = whyFailed(e)
        }
    }
    return [moved: moved, failed: failed]
}
// ---- end of helpers ------------------------------------------------------------------------

def imageData = getCurrentImageData()
if (imageData == null) {
    println "pdl1: open an image first"
    return
}

// The project's pdl1-config.toml, when there is one, overrides the settings block key by key.
def project = getProject()
def projectFile = project == null ? null : project.getPath()
def configFile = projectFile == null ? null : projectFile.getParent().resolve(CONFIG_NAME).toFile()
if (configFile != null && configFile.isFile()) {
    def config
    try {
        config = readPdl1Config(configFile)
    } catch (IllegalArgumentException e) {
        println "pdl1: ${e.getMessage()}; fix ${CONFIG_NAME} (project_templates/pdl1/config.toml shows every key)"
        return
    }
    SERVER_URL = config.getOrDefault("service.url", SERVER_URL)
    TOKEN = config.getOrDefault("service.token", TOKEN)
    MODEL = config.getOrDefault("service.model", MODEL)
    OUTPUTS = config.getOrDefault("analysis.outputs", OUTPUTS)
    TARGET_CLASSES = config.getOrDefault("analysis.target_classes", TARGET_CLASSES)
    TARGET_NAMES = config.getOrDefault("analysis.target_names", TARGET_NAMES)
    println "pdl1: settings from ${configFile}"
    runOnlyNotes(config).each { println it }
}
SERVER_URL = serviceBase(SERVER_URL)
def fromFile = configFile != null && configFile.isFile()
def tokenSetting = fromFile ? "service.token in ${configFile}".toString() : "TOKEN in the script's settings block"

def server = imageData.getServer()
// The service reads the image file as it is: a view QuPath rotates, crops or builds from several files, and an image
// that is no local file (OMERO, a web server), are sent as the pixels QuPath renders of each region instead, in the
// view's own coordinates (submitPixels). So are another series than a file's first (otherSeries), and the images of a
// file the service cannot open (submitPath).
def transformed = transformedBy(server)
def series = transformed == null ? otherSeries(server) : null
def imagePath = transformed == null && server.getURIs().size() == 1 ? GeneralTools.toPath(server.getURIs()[0]) : null
def uploadWhy = transformed != null ? "QuPath shows it through ${transformed}, which the service would read as the file is" :
        series != null ? "QuPath shows series ${series} of a multi-image file (--series ${series}), and the service " +
                "reads the file's first" :
        (imagePath == null ? "it is not a local file (${server.getURIs().join(', ')})" : null)
def mpp = server.getPixelCalibration().getAveragedPixelSizeMicrons()
def imageType = imageData.getImageType()?.name()
def gson = GsonTools.getInstance()
def client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build()

def request = { String path ->
    def builder = HttpRequest.newBuilder(URI.create(SERVER_URL + path)).timeout(Duration.ofMinutes(5))
    if (TOKEN)
        builder.header("Authorization", "Bearer " + TOKEN)
    return builder
}
// An error answer's detail (every error of the service is {"detail": ...}), else its body (text or bytes).
def detailOf = { HttpResponse response ->
    def detail = response.body() instanceof byte[] ? new String(response.body() as byte[], "UTF-8") : response.body()
    try { detail = gson.fromJson(detail as String, Map.class).get("detail") } catch (Exception ignored) { }
    return detail
}
def send = { HttpRequest req ->
    def response = client.send(req, HttpResponse.BodyHandlers.ofString())
    if (response.statusCode() >= 400)
        throw new IOException("pdl1 service answered ${response.statusCode()}: ${detailOf(response)}")
    return gson.fromJson(response.body(), Map.class)
}
def health = null  // GET /v1/health's answer: the models (their input_mpp) and the upload limits
// A job on the image's path, which the service reads at full resolution: the first choice. null where the service
// says it cannot open the image ("cannot_open" in its answer: a format it has no reader for, another series of the
// file than QuPath shows, not on its machine); this and every later region then go as pixels.
def submitPath = { Map body ->
    def response = client.send(request("/v1/jobs").header("Content-Type", "application/json")
            .POST(HttpRequest.BodyPublishers.ofString(gson.toJson(body))).build(), HttpResponse.BodyHandlers.ofString())
    def answer = null
    try { answer = gson.fromJson(response.body(), Map.class) } catch (Exception ignored) { }
    if (response.statusCode() >= 400 && answer instanceof Map && answer.get("cannot_open") == true) {
        uploadWhy = "the service cannot open the file: ${answer.get('detail')}"
        println "pdl1: sending the pixels of each region as QuPath renders them, since ${uploadWhy}"
        return null
    }
    if (response.statusCode() >= 400)
        throw new IOException("pdl1 service answered ${response.statusCode()}: " +
                "${answer instanceof Map ? answer.get('detail') : response.body()}")
    return answer
}
// A job on the pixels of the parent's ROI (an annotation's or a TMA core's; name: as the log names it) as QuPath
// renders them (its bounds grown by the context the models' tiles see, uploadContextUm; pixels outside the ROI
// context), at the resolution the models need (GET /v1/models: input_mpp), never finer than level 0; sent with the
// region's origin and downsample, so the results come back in level-0 px of the image as QuPath shows it. Where the
// grown region passes the service's upload limits, the context shrinks (uploadContextMargins), and the log says so;
// a region over them even without context is not sent: the IOException says how big it is, the limit and what to do.
def submitPixels = { parent, String name ->
    if (Double.isNaN(mpp))
        throw new IOException("QuPath has no pixel size for this image, and an upload needs one to be analysed at " +
                "the models' resolution: set it in the Image tab (Pixel width/height) and run the script again")
    if (!server.isRGB())  // ImageServer.isRGB(), nChannels(), getPixelType(): 0.4.4 to 0.7
        throw new IOException("an upload takes 8-bit RGB brightfield pixels, and QuPath reads this image as " +
                "${server.nChannels()} channels of ${server.getPixelType()}; pdl1-bridge analyses RGB H&E and H-DAB images")
    def modelMpp = uploadModelMpp(health.get("models") as List, imageType, OUTPUTS)
    if (modelMpp == null)
        throw new IOException("the service lists no model for the image type ${imageType} (GET /v1/models)")
    def downsample = uploadDownsample(mpp, modelMpp)
    def roi = parent.getROI()
    def bounds = [roi.getBoundsX(), roi.getBoundsY(), roi.getBoundsWidth(), roi.getBoundsHeight(), server.getWidth(),
            server.getHeight(), downsample]
    if (uploadRegion(*bounds, 0.0d) == null)
        throw new IOException("${name} lies outside the image".toString())
    // The limits of a service that does not state them are its defaults (bridge/service/settings.py).
    def limits = (health.get("upload_limits") ?: [max_px: 8192 * 8192, max_bytes: 64 * 1048576]) as Map
    def contextUm = uploadContextUm(health.get("models") as List, imageType, OUTPUTS)
    def region = null
    def pixels = null
    def png = null
    def tooLarge = null
    double contextSent = 0.0d
    double bytesPerPx = 0.0d  // of the last PNG made: a margin whose estimate is over max_bytes is not rendered
    for (margin in uploadContextMargins(contextUm)) {
        region = uploadRegion(*bounds, margin / mpp)
        long px = (region.widthPx as long) * (region.heightPx as long)
        tooLarge = uploadTooLarge(region.widthPx as long, region.heightPx as long,
                margin > 0 ? (long) (bytesPerPx * px) : -1L, limits, downsample)
        if (tooLarge == null) {
            // RegionRequest.createInstance(String, double, int, int, int, int, int z, int t) and ImageServer.readRegion
            // (RegionRequest): RegionRequest.java v0.4.4:175, v0.7.0:174; ImageServer.java v0.4.4:218, v0.7.0:217.
            pixels = server.readRegion(RegionRequest.createInstance(server.getPath(), downsample, region.x as int,
                    region.y as int, region.width as int, region.height as int, roi.getZ(), roi.getT()))
            if (pixels == null)  // an empty region of a sparse image (AbstractTileableImageServer.readRegion)
                throw new IOException("QuPath has no pixels for this region")
            png = pngBytes(maskOutside(pixels, roi.getShape(), region.x as double, region.y as double, downsample,
                    UPLOAD_CONTEXT_ALPHA))
            bytesPerPx = png.length / (double) px
            tooLarge = uploadTooLarge(pixels.getWidth(), pixels.getHeight(), png.length, limits, downsample)
        }
        if (tooLarge == null) {
            contextSent = margin
            break
        }
    }
    if (tooLarge != null)
        throw new IOException(tooLarge)
    def um = { double v -> String.format(Locale.ROOT, "%.0f \u00b5m", v) }
    if (contextSent < contextUm)
        println "pdl1: ${name} goes with ${um(contextSent)} of the tissue around it, not the ${um(contextUm)} the " +
                "models' tiles see: with more, the region is over the service's upload limits (GET /v1/health)"
    println "pdl1: sending ${pixels.getWidth()} x ${pixels.getHeight()} px (${String.format(Locale.ROOT, '%.2f', mpp * downsample)} " +
            "\u00b5m/px, ${String.format(Locale.ROOT, '%.1f', png.length / 1048576.0d)} MiB) of " +
            "${name} with ${um(contextSent)} of context"
    def query = uploadQuery(mpp * downsample, region.x as double, region.y as double, downsample, OUTPUTS, imageType,
            MODEL)
    return send(request("/v1/jobs/pixels?" + query).header("Content-Type", "image/png")
            .POST(HttpRequest.BodyPublishers.ofByteArray(png)).build())
}

def isOwn = { PathObject obj ->
    def cls = obj.getPathClass() == null ? null : obj.getPathClass().toString()
    if (obj.isTile())
        return obj.getName() == TILE_NAME
    // The measurement list only of our classes: getMeasurementList() creates an empty one on an object without.
    if (obj.isAnnotation())
        return cls in OWN_ANNOTATION_CLASSES && !Double.isNaN(obj.getMeasurementList().get("PD-L1 probability mean"))
    if (obj.isDetection())
        return cls in OWN_DETECTION_CLASSES && !Double.isNaN(obj.getMeasurementList().get("PD-L1 positive probability"))
    return false
}

// What to analyse (chooseTargets). A TMA core is analysed as an annotation is: its ROI is sent, the results go under
// it and its measurements are the core's, which QuPath's TMA data viewer and Export TMA data show per core. Calls the
// same on 0.4.4 to 0.7: hierarchy.getTMAGrid() (null without a grid; PathObjectHierarchy.java v0.4.4:183, v0.5.1:184,
// v0.6.0:153, v0.7.0:152), TMAGrid.getTMACoreList() (TMAGrid.java:78 on all four), TMACoreObject.isMissing()
// (v0.4.4:103, v0.5.1:103, v0.6.0:102, v0.7.0:101), PathObject.isTMACore() (PathObject.java v0.4.4:621, v0.7.0:561).
def hierarchy = imageData.getHierarchy()
def grid = hierarchy.getTMAGrid()
def cores = grid == null ? [] : grid.getTMACoreList().toList()
def coreMissing = { obj -> obj.isTMACore() && obj.isMissing() }
def label = { obj ->
    if (obj.isTMACore())
        return "TMA core " + coreLabel(obj.getName(), cores.findIndexOf { it.is(obj) })
    return (obj.getName() ?: obj.getPathClass() ?: "annotation").toString()
}
// The query of a record's request (GET /v1/jobs/{id}/record): the parent's name as pdl1 run names its targets (a
// core's name, an annotation's as the log gives it) and what it is, kept with the record's scores for `pdl1 report`
// and `pdl1 review-queue` (bridge/service/record.py: record_scores); and the `pdl1 run` output in the entry's folder
// as the record is asked for (afterRun: its summary.json's run_id, "none" where there is none; null where it does not
// read, and not sent): the record is newer than that output whatever this machine's and the batch run's clocks say
// (bridge/analysis_record.py: record_is_newer).
def recordQuery = { obj, String source, String afterRun ->
    def enc = { v -> URLEncoder.encode(v as String, "UTF-8") }
    def name = obj.isTMACore() ? coreLabel(obj.getName(), cores.findIndexOf { it.is(obj) }) : label(obj)
    def type = obj.isTMACore() ? "TMA core" : (source == "whole image" ? "whole image" : "annotation")
    return "target=" + enc(name) + "&target_type=" + enc(type) + (afterRun == null ? "" : "&after_run=" + enc(afterRun))
}
// QuPath's selection is an unmodifiable Set (PathObjectSelectionModel.java v0.4.4 to v0.7.0), and its findAll a Set,
// which chooseTargets' List parameter refuses (MissingMethodException on every run): a List, in the selection's order.
def selected = getSelectedObjects().findAll { (it.isAnnotation() || it.isTMACore()) && !isOwn(it) }.toList()
def configured = (TARGET_CLASSES.isEmpty() && TARGET_NAMES.isEmpty()) ? [] : hierarchy.getAnnotationObjects().findAll {
    !isOwn(it) && ((it.getPathClass() != null && it.getPathClass().toString() in TARGET_CLASSES) ||
            (it.getName() != null && it.getName() in TARGET_NAMES))
}
// Selected objects that are no target (detections, this tool's own regions) are left out; said, since the run then
// goes by the target annotations, the grid or the whole image as if nothing were selected.
def notTargets = getSelectedObjects().size() - selected.size()
if (selected.isEmpty() && notTargets > 0)
    println "pdl1: the ${notTargets} selected objects are no annotations or TMA cores of yours, so none is analysed as " +
            "a selection; select annotations (or TMA cores) to analyse those"
def choice = chooseTargets(selected, configured, cores, coreMissing)
// Target classes or names set and none in the image: `pdl1 run` fails such an image (bridge/run.py: entry_targets),
// and so does the script now; it analysed the whole image, as if none were set. A TMA grid's cores are analysed
// instead, as pdl1 run does.
def asked = !(TARGET_CLASSES.isEmpty() && TARGET_NAMES.isEmpty())
def askedFor = "no annotation of class ${TARGET_CLASSES.inspect()} or name ${TARGET_NAMES.inspect()} (the target " +
        "classes and names of ${fromFile ? configFile : "the script's settings block"})"
if (asked && choice.source == "whole image") {
    println "pdl1: nothing analysed: ${server.getMetadata().getName()} has ${askedFor}; draw or select the " +
            "annotations to analyse, or empty the target classes and names to analyse the whole image"
    return
}
if (asked && choice.source == "TMA cores")
    println "pdl1: ${askedFor}; the TMA cores are analysed instead"
// A core marked missing after it was analysed keeps that run's results, and Export TMA data still writes its stored
// measurements (getStringValue reads them: ObservableMeasurementTableData.java v0.4.4:1904-1919, v0.6.0:338-355).
choice.missing.each {
    println "pdl1: skipped ${label(it)}: it is marked missing" + (isAnalysed(it) ? "; it keeps an earlier run's " +
            "results (delete them in QuPath, or mark it not missing and run again)" : "")
}
if (choice.source == "TMA cores")
    println "pdl1: TMA grid: analysing ${choice.targets.size()} of its ${cores.size()} cores one by one"
if (choice.source in ["selection", "TMA cores"] && choice.targets.isEmpty()) {
    println "pdl1: nothing analysed: every ${choice.source == 'selection' ? 'selected ' : ''}TMA core is marked missing; " +
            "mark the cores that hold tissue as not missing" + (choice.source == "selection" ? ", or select others" : "")
    return
}
def targets = choice.targets
def (analysable, skipped) = splitByArea(targets)
skipped.each {
    println "pdl1: skipped ${it.getName() ?: it.getPathClass() ?: 'an annotation'}: a ${it.getROI()?.getRoiName() ?: 'ROI-less'} " +
            "annotation has no area to analyse; draw an area annotation (rectangle, ellipse, polygon, brush) around the tissue"
}
if (analysable.isEmpty() && !skipped.isEmpty()) {
    println "pdl1: nothing analysed: none of the ${skipped.size()} target annotations has an area"
    return
}
targets = analysable
def wholeImage = targets.isEmpty()

try {
    def response = client.send(request("/v1/health").GET().build(), HttpResponse.BodyHandlers.ofString())
    if (response.statusCode() >= 400) {
        println healthProblem(SERVER_URL, response.statusCode(), detailOf(response) as String, tokenSetting)
        return
    }
    health = gson.fromJson(response.body(), Map.class)
} catch (IllegalArgumentException e) {  // URI.create and HttpRequest.newBuilder: no http(s) address
    println healthProblem(SERVER_URL, -1, whyFailed(e), tokenSetting)
    return
} catch (Exception e) {
    println healthProblem(SERVER_URL, 0, whyFailed(e), tokenSetting)
    return
}
// The whole image's parent only once the service answers: made before, it stayed behind, empty, when it did not.
def madeWholeImage = null
if (wholeImage) {
    def existing = hierarchy.getAnnotationObjects().find {
        it.getPathClass() != null && it.getPathClass().toString() == ANALYSIS_CLASS && it.getName() == ANALYSIS_CLASS
    }
    if (existing == null) {
        existing = createFullImageAnnotation(false)
        existing.setPathClass(getPathClass(ANALYSIS_CLASS))
        existing.setName(ANALYSIS_CLASS)
        madeWholeImage = existing
    }
    targets = [existing]
}
if (uploadWhy != null)
    println "pdl1: sending the pixels of each region as QuPath renders them, since ${uploadWhy}"

def entry = getProjectEntry()
def metadataWritten = false
def wholeImageRemoved = false
// The QuPath IDs of the whole-image analyses this run removed: their records are set aside too (tidyRecords).
def replacedAnalyses = new HashSet<String>()
// The records' folder (recordFolder), a project's only. The record, named by the parent's QuPath ID
// (PathObject.getID(): PathObject.java v0.4.4:937, v0.5.1:938, v0.6.0:930, v0.7.0:928; kept in the image's data,
// v0.4.4:1080) in the folder of the entry's ID (ProjectImageEntry.getID(): ProjectImageEntry.java v0.4.4:62,
// v0.5.1:62, v0.6.0:57, v0.7.0:57) beside the project file (Project.getPath(): Project.java v0.4.4:140, v0.5.1:140,
// v0.6.0:141, v0.7.0:141).
def recordsFolder = project != null && entry != null ?
        recordFolder(project.getPath().getParent(), entry.getID() as String) : null
// A selection of TMA cores: the entry's score stays over every analysed core, those of earlier runs too (not with
// annotations selected: one inside an analysed core would count its cells twice).
def otherCores = (choice.source == "selection" && targets.every { it.isTMACore() }) ? cores : []
def metadataParts = []
def done = 0
// The whole image's parent this run made, removed again when nothing came under it (refused, failed or stopped):
// left, it was an empty "PD-L1 analysis" annotation over the image, with no measurements.
def dropUnanalysedParent = {
    if (madeWholeImage != null && done == 0)
        hierarchy.removeObjects([madeWholeImage], true)
    madeWholeImage = null
}
// Stopping the script (the script editor's Run > Kill running script: Future.cancel(true), DefaultScriptEditor.java
// v0.4.4:1410, v0.7.0:1492) interrupts this thread: while it sleeps between polls, or inside an HTTP call, which then
// throws InterruptedException (HttpClient.send). Wherever it comes, the run stops alike (stop): the job (jobId; null
// before the service gave one) is cancelled on the server, not left running there; the parent made for this run is
// removed where nothing came under it; the objects added so far are shown (fireHierarchyUpdate: they stayed off the
// viewer); and the log says what was stopped. Thread.interrupted() clears the flag, which would otherwise stop the
// cancelling request too.
def stopped = { Throwable e -> e instanceof InterruptedException || Thread.currentThread().isInterrupted() }
def stop = { String what, jobId ->
    Thread.interrupted()
    dropUnanalysedParent()
    fireHierarchyUpdate()
    if (jobId == null) {
        println "pdl1: stopped ${what}"
        return
    }
    try {
        send(request("/v1/jobs/" + jobId).DELETE().build())
        println "pdl1: stopped ${what}; job ${jobId} cancelled on the server"
    } catch (IOException | InterruptedException e) {
        println "pdl1: stopped ${what}; job ${jobId} could not be cancelled on the server (${whyFailed(e)})"
    }
}
// What an analysis without its record costs the review loop: a reclassified nucleus trains the nuclei model, a deleted
// FN candidate the segmentation ensemble.
def NO_RECORD_NO_REVIEW = "`pdl1 train nuclei PROJECT --from-review` cannot tell its nuclei reclassified, nor " +
        "`pdl1 train seg PROJECT --from-review` its FN candidates deleted"
eachTarget:
for (parent in targets) {
    def body = new LinkedHashMap()
    body.put("image", imagePath?.toString())
    body.put("roi", wholeImage ? null : gson.fromJson(gson.toJson(parent.getROI().getGeometry()), Map.class))
    body.put("mpp", Double.isNaN(mpp) ? null : mpp)
    body.put("image_size_px", [server.getWidth(), server.getHeight()])
    // The stain as QuPath knows it (Image tab: Image type): the service runs no model on another stain.
    body.put("image_type", imageType)
    body.put("outputs", OUTPUTS)
    body.put("model", MODEL)
    // An ROI on another plane than the first (a z-slice, a timepoint): a path job names no plane, and the service read
    // the file's first; the pixels QuPath renders of the ROI's plane go instead (submitPixels reads its getZ() and
    // getT()), and what comes back is put on that plane (below).
    def plane = planeName(parent.getROI().getZ(), parent.getROI().getT())
    if (plane != null && uploadWhy == null)
        println "pdl1: sending the pixels of ${label(parent)} as QuPath renders them, since it lies on the plane " +
                "${plane} and the service reads a file's first (z=0, t=0)"
    def accepted
    try {
        accepted = uploadWhy == null && plane == null ? submitPath(body) : null  // null: the service cannot open it
        if (accepted == null)
            accepted = submitPixels(parent, label(parent))
    } catch (IOException | InterruptedException e) {
        if (stopped(e)) {
            stop("while sending ${label(parent)} (a job the service took meanwhile runs to its end there)", null)
            return
        }
        // A request the service refuses (an ROI that crosses itself, ...) is this target's problem: go on with the next.
        println "pdl1: ${label(parent)} not analysed: ${whyFailed(e)}"
        continue
    }
    def jobId = accepted.get("job_id")
    def statusPath = "/v1/jobs/" + jobId
    def status = null
    def lastShown = -1
    def analysing = "while ${label(parent)} was analysed".toString()
    while (true) {
        if (Thread.currentThread().isInterrupted()) {
            stop(analysing, jobId)
            return
        }
        try {
            status = send(request(statusPath).GET().build())
        } catch (IOException | InterruptedException e) {
            if (stopped(e)) {
                stop(analysing, jobId)
                return
            }
            // The service stopped or restarted (its jobs do not survive that) while the job ran: said, not a Java
            // stack trace that ended the script; the next targets say so too if it stays away.
            println "pdl1: ${label(parent)} not analysed: lost job ${jobId} on the service (${whyFailed(e)})"
            continue eachTarget
        }
        def state = status.get("state")
        if (state in ["done", "failed", "cancelled"])
            break
        def percent = Math.round(100 * (status.get("progress") as double)) as int
        if (percent != lastShown) {
            println "pdl1: ${state} ${percent}% (${status.get('tiles_done') as int}/${status.get('tiles_total') as int} tiles)"
            lastShown = percent
        }
        try {
            Thread.sleep(POLL_MS)
        } catch (InterruptedException e) {
            stop(analysing, jobId)
            return
        }
    }
    if (status.get("state") != "done") {
        println "pdl1: ${label(parent)} not analysed: job ${jobId} ${status.get('state')}: ${status.get('error')}"
        continue
    }

    // Fetch every page, then replace this tool's earlier children of the parent.
    def objects = []
    def pdl1 = null
    def offset = 0
    try {
        while (offset != null) {
            def response = client.send(request(statusPath + "/result?offset=" + offset + "&limit=" + PAGE_SIZE).GET()
                    .build(), HttpResponse.BodyHandlers.ofByteArray())
            if (response.statusCode() >= 400)  // 410: released, with many jobs of others (pdl1 serve --keep-results)
                throw new IOException("the service answered ${response.statusCode()}: ${detailOf(response)}")
            def bytes = response.body()
            objects.addAll(PathIO.readObjectsFromGeoJSON(new ByteArrayInputStream(bytes)))
            pdl1 = gson.fromJson(new String(bytes, "UTF-8"), Map.class).get("pdl1")
            def next = pdl1.get("next_offset")
            offset = next == null ? null : (next as int)
        }
    } catch (IOException | InterruptedException e) {  // an exception, not a message, ended the script
        if (stopped(e)) {
            stop("while ${label(parent)}'s result was fetched", jobId)
            return
        }
        println "pdl1: ${label(parent)} not analysed: job ${jobId}'s result could not be fetched (${whyFailed(e)})"
        continue eachTarget
    }
    // PathIO reads every object onto the first plane (z=0, t=0) whatever its parent's: the service's GeoJSON names
    // none (ROITypeAdapters.java v0.4.4:115-119, v0.7.0:122-126). Those of a parent on another plane go onto its
    // plane, or the viewer showed them on the first: PathObjectTools.updatePlaneRecursive(object, plane,
    // copyMeasurements, createNewIDs) makes each anew with its children on that plane, the original unchanged
    // (PathObjectTools.java v0.4.4:396, v0.7.0:469); measurements and IDs kept.
    if (plane != null) {
        def onItsPlane = parent.getROI().getImagePlane()
        objects = objects.collect { PathObjectTools.updatePlaneRecursive(it, onItsPlane, true, false) }
    }
    // The record of what the pages put into QuPath, saved below once they are under the parent (a project's only: it
    // goes beside it). Without it the analysis is done all the same; its reviews then cannot be told for training.
    def record = null
    if (recordsFolder != null) {
        try {
            def seen = runSeen(recordsFolder.getParent(), { String text -> gson.fromJson(text, Map.class) })
            def recordRequest = request(statusPath + "/record?" + recordQuery(parent, choice.source, seen)).GET()
                    .build()
            def response = client.send(recordRequest,
                    HttpResponse.BodyHandlers.ofByteArray())
            if (response.statusCode() >= 400)  // 404 from a service older than records
                throw new IOException("the service answered ${response.statusCode()}: ${detailOf(response)}")
            record = response.body()
        } catch (IOException | InterruptedException e) {
            if (stopped(e)) {
                stop("while ${label(parent)}'s record was fetched", jobId)
                return
            }
            println "pdl1: ${label(parent)}: no record of what this analysis writes (${whyFailed(e)}); " +
                    "${NO_RECORD_NO_REVIEW} (update pdl1-bridge and analyse it again)"
        }
    }
    try {
        send(request(statusPath).DELETE().build())  // the result is here now: let the service release it
    } catch (IOException | InterruptedException e) {  // the service releases old results itself (--keep-results)
        if (stopped(e)) {
            stop("before ${label(parent)}'s result went under it", jobId)
            return
        }
    }
    if (choice.source == "TMA cores" && !wholeImageRemoved) {  // once, when the first core's results are here
        def analyses = hierarchy.getAnnotationObjects().findAll {
            it.getPathClass() != null && it.getPathClass().toString() == ANALYSIS_CLASS &&
                    it.getName() == ANALYSIS_CLASS
        }
        def gone = removeWholeImageAnalysis(analyses, isOwn, hierarchy)
        analyses.each { replacedAnalyses << it.getID().toString() }
        if (gone > 0)
            println "pdl1: removed the earlier whole-image analysis ('${ANALYSIS_CLASS}' and what this tool put under " +
                    "it: ${gone} objects), which scored all TMA cores as one; each core's analysis replaces it"
        wholeImageRemoved = true
    }
    def old = ownDescendants(parent, isOwn)
    // The hierarchy's removeObjects(objects, keepChildren): the same on 0.4.4 to 0.7 (QP's two-argument
    // removeObjects is deprecated since 0.6, its one-argument form is 0.6+).
    if (!old.isEmpty()) {
        rehomeOthers(old, parent)  // what is not ours inside them stays where it was, not at the root
        hierarchy.removeObjects(old, true)
    }
    parent.addChildObjects(objects)
    setParentMeasurements(parent.getMeasurementList(), pdl1.get("parent_measurements"))
    if (entry != null) {
        // JTS's geometry in QuPath; a Map's metaClass would be its key, so the type is asked first.
        def outline = parent.getROI() == null ? null : parent.getROI().getGeometry()
        // TMA cores lie side by side, never within one another: no outline, no n² tests over a grid's cores.
        def jts = choice.source != "TMA cores" && outline != null && !(outline instanceof Map) &&
                outline.respondsTo("covers")
        metadataParts << [metadata: pdl1.get("metadata"), counts: pdl1.get("metadata_counts"),
                          outline: jts ? outline : null]
        def nested = nestedTargets(metadataParts.collect { it.outline })
        def parts = [metadataParts, nested].transpose().collect { part, inside -> part + [nested: inside] }
        def immune = ((metadataParts[-1].counts ?: [:]) as Map).containsKey("immune_positive")
        putEntryMetadata(entry, mergeEntryMetadata(otherCoreParts(otherCores, targets, immune) + parts))
        metadataWritten = true
    }
    done++
    def onPlane = plane == null ? "" : " (${plane})"
    println "pdl1: ${objects.size()} objects under ${label(parent)}${onPlane}${targetScore(pdl1.get('metadata'))}"
    if (record != null) {
        try {
            saveRecord(recordsFolder, parent.getID().toString(), record as byte[])
        } catch (Exception e) {  // a full drive, a read-only project: said; the analysis is in QuPath all the same
            println "pdl1: ${label(parent)}: the record of what this analysis wrote could not be saved in " +
                    "${recordsFolder} (${whyFailed(e)}); ${NO_RECORD_NO_REVIEW}"
        }
    }
    // Why a result needs a pathologist's look, each with its value and limit (the flag says only that it does).
    (pdl1.get("review_reasons") ?: []).each { r -> println "pdl1: review: ${reviewReasonText(r as Map)}" }
    // And what to check for each kind of reason, once (bridge/review_advice.py; absent from a service before it).
    (pdl1.get("review_advice") ?: []).each { a -> println "pdl1: what to check: ${a}" }
    // How far the image lies from what the model was trained on (over a limit, it is a review reason above).
    def domain = pdl1.get("domain")
    if (domain != null && domain.get("out_of_domain_score") != null)
        println "pdl1: out-of-domain score ${readingText(domain.get('out_of_domain_score'), domain.get('limit'), '')}" +
                ", stain distance ${readingText(domain.get('stain_distance_deg'), domain.get('stain_limit_deg'), ' deg')}"
    else if (domain != null)
        println "pdl1: out-of-domain score not measured: ${domain.get('why_not')}"
}
dropUnanalysedParent()
fireHierarchyUpdate()
// The image's records, tidied once its analyses are written (or a whole-image one removed), from the hierarchy as it
// is now (PathObjectHierarchy.getRootObject(): v0.4.4:175, v0.5.1:176, v0.6.0:145, v0.7.0:144): first the records
// set aside in removed/ whose parent is back are moved back (recordsBack; one whose parent was analysed again since
// is deleted), then the stale ones (staleRecords) are set aside there. Each file on its own; one that cannot be
// moved or deleted is named, and the analysis stands. Set aside records are kept until their parent comes back or
// is analysed again: which annotations the saved data holds is known only to QuPath, and a record is small.
def tidyRecords = { java.nio.file.Path folder ->
    def files = folder.toFile().listFiles()  // null: no folder (no record saved), or it cannot be listed
    if (files == null)
        return
    def names = files.findAll { it.isFile() }*.getName()
    def aside = folder.resolve(REMOVED_FOLDER)
    def asideNames = (aside.toFile().listFiles() ?: [] as File[]).findAll { it.isFile() }*.getName()
    def lookup = recordsLookup(hierarchy.getRootObject())
    def plural = { int n, String one, String many -> n == 1 ? one : many }
    def back = recordsBack(asideNames, names, lookup.ids)
    // Of those whose parent is back, the ones whose output is not under it stay aside: pdl1_import_results.groovy
    // imported `pdl1 run`'s results over it, and saved (recordOutputIn). One that does not read is moved back by its
    // parent alone, as before: `pdl1 report` and training name it.
    def replacedOutput = back.restore.findAll { name ->
        try {
            def record = gson.fromJson(aside.resolve(name).toFile().getText("UTF-8"), Map.class)
            return recordOutputIn(record, lookup.parents[name[0..-6]]) == false
        } catch (Exception ignored) {
            return false
        }
    }
    if (!replacedOutput.isEmpty())
        println "pdl1: left ${replacedOutput.size()} ${plural(replacedOutput.size(), 'record', 'records')} set aside " +
                "in ${aside}: ${plural(replacedOutput.size(), 'its', 'their')} annotation is in the image, but not " +
                "what that analysis wrote under it (pdl1_import_results.groovy put `pdl1 run`'s results there in its " +
                "place): " + replacedOutput.collect { it[0..-6] }.join(", ") + "; `pdl1 report` and `pdl1 " +
                "review-queue` count what the image holds"
    def dropped = removeRecords(aside, back.superseded)
    dropped.failed.each { name, why ->
        println "pdl1: the older record ${aside.resolve(name)} could not be deleted (${why}); its annotation or TMA " +
                "core has a newer one in ${folder}: delete it by hand"
    }
    int older = dropped.removed.size()
    if (older > 0)
        println "pdl1: deleted ${older} older ${plural(older, 'record', 'records')} from ${aside}: " +
                "${plural(older, 'its', 'their')} annotation or TMA core was analysed again, and the record in " +
                "${folder} replaces ${plural(older, 'it', 'them')}"
    def restored = moveRecords(aside, folder, back.restore - replacedOutput)
    restored.failed.each { name, why ->
        println "pdl1: the record ${aside.resolve(name)}, whose annotation or TMA core is in the image again, could " +
                "not be moved back (${why}); move it into ${folder} by hand, or `pdl1 report` leaves its analysis out"
    }
    int again = restored.moved.size()
    if (again > 0)
        println "pdl1: moved ${again} ${plural(again, 'record', 'records')} back from ${aside} into ${folder}: " +
                "${plural(again, 'its', 'their')} annotation or TMA core is in the image again (QuPath closed without " +
                "saving, or an undo, after an earlier run set ${plural(again, 'it', 'them')} aside): " +
                restored.moved.collect { it[0..-6] }.join(", ") + "; `pdl1 report`, `pdl1 review-queue` and " +
                "`pdl1 train seg|nuclei PROJECT --from-review` read ${plural(again, 'it', 'them')} again"
    def outlineOf = { String name ->
        outlineShape(gson.fromJson(folder.resolve(name).toFile().getText("UTF-8"), Map.class).get("outline"))
    }
    def stale = staleRecords(names, lookup, replacedAnalyses, outlineOf)
    stale.kept.each { name, why ->
        println "pdl1: kept the record ${folder.resolve(name)}, whose annotation or TMA core is no longer in the " +
                "image: ${why}"
    }
    def result = moveRecords(folder, aside, stale.replaced + stale.gone)
    result.failed.each { name, why ->
        println "pdl1: the stale record ${folder.resolve(name)} could not be moved into ${aside} (${why}); " +
                "`pdl1 report` and `pdl1 review-queue` still read it: move it there by hand"
    }
    def movedOf = { List of -> of.count { it in result.moved } as int }
    def whys = [[movedOf(stale.replaced), "of the whole-image analysis the TMA cores' analyses replaced"],
                [movedOf(stale.gone), "whose annotation or TMA core is no longer in the image, nor its objects"]]
    int moved = result.moved.size()
    if (moved > 0)
        println "pdl1: set ${moved} stale ${plural(moved, 'record', 'records')} aside from ${folder} into ${aside}: " +
                whys.findAll { it[0] > 0 }.collect { "${it[0]} ${it[1]}" }.join("; ") +
                "; `pdl1 report` and `pdl1 review-queue` no longer read ${plural(moved, 'it', 'them')}. Close " +
                "QuPath without saving and the next run moves ${plural(moved, 'it', 'them')} back (training takes " +
                "${plural(moved, 'it', 'them')} meanwhile where the labels exported hold the annotation)"
}
if (recordsFolder != null && (done > 0 || !replacedAnalyses.isEmpty())) {
    try {
        tidyRecords(recordsFolder)
    } catch (Exception e) {  // the analyses are written: an error here must not keep the project from being saved
        println "pdl1: the records in ${recordsFolder} were not tidied (${whyFailed(e)}); the next run tries again"
    }
}
// QuPath 0.4.4 and 0.5 do not save the project after a headless script (0.6+ do with -s): save the metadata now.
if (metadataWritten && project != null) {
    try {
        project.syncChanges()
    } catch (IOException e) {
        println "pdl1: the entry metadata is set but ${project.getPath()} could not be saved (${e.getMessage()}); " +
                "save the project from QuPath"
    }
}
println "pdl1: analysed ${done} of ${targets.size()} ${choice.source == 'TMA cores' ? 'TMA cores' : 'regions'} of ${server.getMetadata().getName()}"
