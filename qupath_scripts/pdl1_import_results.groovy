/*
 * pdl1_import_results.groovy - import pdl1-bridge batch results into QuPath (0.4.4 to 0.7).
 *
 * `pdl1 run PROJECT` without QuPath writes, for each image, <project>/pdl1/<entryID>/objects.geojson
 * (a "PD-L1 analysis" annotation with its measurements, then its children: PD-L1 positive regions,
 * SUA false-negative candidates, uncertainty tiles and nuclei) and summary.json (entry metadata).
 * This script puts them into the open image, under the right parent, replacing what an earlier
 * pdl1-bridge run wrote and leaving every other object alone.
 *
 * Run it for the whole project: Automate > Project scripts (or Script editor) > Run for project,
 * or headless (-s is --save: write each image's data): QuPath script -p project.qpproj -s pdl1_import_results.groovy
 *
 * Nothing to edit below unless you moved the results folder.
 */
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

// ---- settings ----------------------------------------------------------------------------
def RESULTS_FOLDER = "pdl1"          // relative to the project folder
def ANALYSIS_CLASS = "PD-L1 analysis"
def OWN_ANNOTATION_CLASSES = ["PD-L1 positive", "PD-L1 FN candidate"]
def OWN_DETECTION_CLASSES = ["Tumor: Positive", "Tumor: Negative", "Other", "Tumor: 1+", "Tumor: 2+", "Tumor: 3+",
        "Immune cells: PD-L1 positive", "Immune cells: PD-L1 negative"]
def TILE_NAME = "PD-L1 uncertainty"
// ------------------------------------------------------------------------------------------

// ---- helpers: plain Groovy, no QuPath classes (tests/test_groovy_scripts.py runs this part) ----
// The entry metadata keys a run of this tool writes, for either stain (bridge/run.py: RUN_METADATA_KEYS; a test
// keeps the two equal). A list, not every "PD-L1 ..." key: a pathologist's own "PD-L1 TPS (manual)" stays, and so
// do the "PD-L1 review ..." keys of `pdl1 review-queue`.
def RUN_METADATA_KEYS = ["PD-L1 TPS %", "PD-L1 TPS category", "PD-L1 Predicted TPS % (H&E)",
        "PD-L1 Predicted TPS category (H&E)", "PD-L1 CPS", "PD-L1 stain", "PD-L1 model", "PD-L1 run"]
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
// This tool's objects anywhere under a parent, except under another analysed annotation (it carries
// ANALYSED_SIGNATURE, as bridge's _own_descendants tells it): QuPath's Resolve hierarchy moves the nuclei and tiles
// under the regions (or your annotations) they lie in, and removing only the parent's own children, with their
// children kept, put the earlier run's objects back beside the new ones. own: the isOwn test.
def ANALYSED_SIGNATURE = "PD-L1: Uncertainty flag"  // bridge/objects.py: every analysed parent carries it
def ownDescendants = { parent, Closure own ->
    def out = []
    def stack = [parent]
    while (!stack.isEmpty()) {
        stack.remove(stack.size() - 1).getChildObjects().each { child ->
            if (own(child))
                out << child
            if (Double.isNaN(child.getMeasurementList().get(ANALYSED_SIGNATURE) as double))
                stack << child
        }
    }
    return out
}
// ---- end of helpers ------------------------------------------------------------------------

def project = getProject()
def entry = getProjectEntry()
if (project == null || entry == null) {
    println "pdl1: open a project and an image first (this script imports per project entry)"
    return
}
def projectDir = project.getPath().getParent().toFile()
def folder = new File(new File(projectDir, RESULTS_FOLDER), entry.getID())
def geojson = new File(folder, "objects.geojson")
if (!geojson.isFile()) {
    println "pdl1: no results for ${entry.getImageName()} (expected ${geojson}); run `pdl1 run` on the project first"
    return
}

// Objects this tool wrote carry its signature measurements (see bridge/objects.py: is_own_object).
def isOwn = { PathObject obj ->
    def cls = obj.getPathClass() == null ? null : obj.getPathClass().toString()
    def ml = obj.getMeasurementList()
    if (obj.isTile())
        return obj.getName() == TILE_NAME
    if (obj.isAnnotation())
        return cls in OWN_ANNOTATION_CLASSES && !Double.isNaN(ml.get("PD-L1 probability mean"))
    if (obj.isDetection())
        return cls in OWN_DETECTION_CLASSES && !Double.isNaN(ml.get("PD-L1 positive probability"))
    return false
}

def imported = PathIO.readObjects(geojson)
if (imported.isEmpty()) {
    println "pdl1: ${geojson} holds no objects"
    return
}
def newParent = imported[0]
def children = imported.subList(1, imported.size())
if (newParent.getPathClass() == null || newParent.getPathClass().toString() != ANALYSIS_CLASS) {
    println "pdl1: ${geojson} does not start with a '${ANALYSIS_CLASS}' annotation; was it written by pdl1-bridge?"
    return
}

def hierarchy = getCurrentHierarchy()
def parent = hierarchy.getAnnotationObjects().find {
    it.getPathClass() != null && it.getPathClass().toString() == ANALYSIS_CLASS && it.getName() == ANALYSIS_CLASS
}
if (parent == null) {
    parent = newParent
    addObjects([parent])
} else {
    def old = ownDescendants(parent, isOwn)
    // The hierarchy's removeObjects(objects, keepChildren): the same on 0.4.4 to 0.7 (QP's two-argument
    // removeObjects is deprecated since 0.6, its one-argument form is 0.6+).
    if (!old.isEmpty())
        hierarchy.removeObjects(old, true)
    def written = newParent.getMeasurementList()
    setParentMeasurements(parent.getMeasurementList(), measurementNames(written).collectEntries { [(it): written.get(it)] })
}
parent.addChildObjects(children)
fireHierarchyUpdate()

def summaryFile = new File(folder, "summary.json")
if (summaryFile.isFile()) {
    def summary = GsonTools.getInstance().fromJson(summaryFile.getText("UTF-8"), Map.class)
    def metadata = summary.get("metadata")
    if (metadata != null) {
        putEntryMetadata(entry, metadata)
        // QuPath 0.4.4 and 0.5 do not save the project after a headless script (0.6+ do with -s): save it now.
        try {
            project.syncChanges()
        } catch (IOException e) {
            println "pdl1: the entry metadata is set but ${project.getPath()} could not be saved (${e.getMessage()}); " +
                    "save the project from QuPath"
        }
    }
}
println "pdl1: imported ${children.size()} objects under '${ANALYSIS_CLASS}' for ${entry.getImageName()}"
