/*
 * pdl1_export_labels.groovy - export an image's labels for `pdl1 train seg|nuclei PROJECT` (QuPath 0.4.4 to 0.7).
 *
 * Writes every annotation, TMA core and detection of the open image, as QuPath's own GeoJSON, to
 * <project>/pdl1/labels/<entryID>.geojson. `pdl1 train seg|nuclei PROJECT` reads these files where
 * QuPath (paquo) is not installed, and reads the same objects through QuPath where it is: the labels
 * are the same either way. What counts as a label (Training region, PD-L1 positive / negative,
 * Ignore*, nucleus points) is decided in Python (bridge/labels.py), not here.
 * `pdl1 run PROJECT` without QuPath (QuPath 0.7) reads its targets from the same files: the annotations of
 * --class/--name (or pdl1-config.toml's target_classes/target_names), else the TMA cores; then
 * pdl1_import_results.groovy puts each one's results under the annotation or core of that ID.
 * Export again after drawing or changing targets: a run refuses an export older than QuPath's last save
 * where the annotations changed since.
 *
 * Run it for the whole project: Automate > Project scripts (or Script editor) > Run for project,
 * or headless (-s is --save: write each image's data): QuPath script -p project.qpproj -s pdl1_export_labels.groovy
 *
 * Nothing to edit below: `pdl1 train` looks for the files in <project>/pdl1/labels alone, so LABELS_FOLDER stays so.
 */
import java.nio.charset.StandardCharsets
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import qupath.lib.io.GsonTools

// ---- settings ----------------------------------------------------------------------------
def LABELS_FOLDER = "pdl1/labels"   // in the project folder, where pdl1 train reads (bridge/labels.py: EXPORT_FOLDER)
// ------------------------------------------------------------------------------------------

def project = getProject()
def entry = getProjectEntry()
if (project == null || entry == null) {
    println "pdl1: open a project and an image first (this script exports per project entry)"
    return
}
def folder = new File(project.getPath().getParent().toFile(), LABELS_FOLDER)
folder.mkdirs()
def target = new File(folder, entry.getID() + ".geojson")

def hierarchy = getCurrentHierarchy()
def objects = []
objects.addAll(hierarchy.getAnnotationObjects())
// The cores of the TMA grid, in the grid's order (TMAGrid.getTMACoreList(), TMAGrid.java:78 on 0.4.4 to 0.7): no
// annotations, so not above; QuPath's Gson writes each as a "tmaCore" with "isMissing" (QuPathTypeAdapters.java
// v0.4.4:300-311, 398-400; v0.7.0:297-308, 390-392). getTMAGrid() is null without a grid.
def grid = hierarchy.getTMAGrid()
if (grid != null)
    objects.addAll(grid.getTMACoreList())
objects.addAll(hierarchy.getDetectionObjects())
// One object at a time through QuPath's own GeoJSON writer (what paquo's to_geojson calls too), each written out as it
// is made: the whole export as one String was GBs for a slide with QuPath's cell detection (a million cells), and
// QuPath ran out of memory. Written beside the target and renamed over it, so an interrupted export leaves the old
// file whole. An OutputStreamWriter, as String.getBytes did, writes a character UTF-8 cannot encode as '?'
// (Files.newBufferedWriter would throw).
def gson = GsonTools.getInstance()
def part = new File(folder, entry.getID() + ".geojson.part")
def writer = new BufferedWriter(new OutputStreamWriter(Files.newOutputStream(part.toPath()), StandardCharsets.UTF_8))
try {
    writer.write("[\n")
    objects.eachWithIndex { obj, i ->
        if (i > 0)
            writer.write(",\n")
        gson.toJson(obj, writer)
    }
    writer.write("\n]\n")
} finally {
    writer.close()
}
Files.move(part.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
println "pdl1: exported ${objects.size()} objects of ${entry.getImageName()} to ${target}"
