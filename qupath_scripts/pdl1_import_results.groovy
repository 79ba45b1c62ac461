/*
 * pdl1_import_results.groovy - import pdl1-bridge batch results into QuPath (0.4.4, 0.5, 0.6).
 *
 * `pdl1 run PROJECT` without QuPath writes, for each image, <project>/pdl1/<entryID>/objects.geojson
 * (a "PD-L1 analysis" annotation with its measurements, then its children: PD-L1 positive regions,
 * SUA false-negative candidates, uncertainty tiles and nuclei) and summary.json (entry metadata).
 * This script puts them into the open image, under the right parent, replacing what an earlier
 * pdl1-bridge run wrote and leaving every other object alone.
 *
 * Run it for the whole project: Automate > Project scripts (or Script editor) > Run for project,
 * or headless: QuPath script -p project.qpproj -s pdl1_import_results.groovy --save
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
def OWN_DETECTION_CLASSES = ["Tumor: Positive", "Tumor: Negative", "Other"]
def TILE_NAME = "PD-L1 uncertainty"
// ------------------------------------------------------------------------------------------

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
    def old = parent.getChildObjects().findAll { isOwn(it) }
    if (!old.isEmpty())
        removeObjects(old, true)
    def ml = parent.getMeasurementList()
    newParent.getMeasurementList().getMeasurementNames().each { name -> ml.put(name, newParent.getMeasurementList().get(name)) }
}
parent.addChildObjects(children)
fireHierarchyUpdate()

def summaryFile = new File(folder, "summary.json")
if (summaryFile.isFile()) {
    def summary = GsonTools.getInstance().fromJson(summaryFile.getText("UTF-8"), Map.class)
    def metadata = summary.get("metadata")
    if (metadata != null)
        metadata.each { key, value -> entry.putMetadataValue(key as String, value as String) }
}
println "pdl1: imported ${children.size()} objects under '${ANALYSIS_CLASS}' for ${entry.getImageName()}"
