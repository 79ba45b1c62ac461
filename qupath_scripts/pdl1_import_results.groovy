/*
 * pdl1_import_results.groovy - import pdl1-bridge batch results into QuPath (0.4.4 to 0.7).
 *
 * `pdl1 run PROJECT` without QuPath writes, for each image, <project>/pdl1/<entryID>/objects.geojson
 * (a "PD-L1 analysis" annotation with its measurements, then its children: PD-L1 positive regions,
 * SUA false-negative candidates, uncertainty tiles and nuclei) and summary.json (entry metadata).
 * This script puts them into the open image, under the right parent, replacing what an earlier
 * pdl1-bridge run wrote and leaving every other object alone. Where `pdl1 run` went through QuPath and analysed
 * annotations or TMA cores, their results are in the image already: nothing is imported, and the log says so.
 * Where it read them from pdl1_export_labels.groovy's export (no QuPath on its machine: QuPath 0.7), each one's
 * results are in <project>/pdl1/<entryID>/target_objects/<object ID>.geojson, and go under the annotation or core of
 * that ID, provided it is still where it was when exported.
 * `pdl1 review-queue PROJECT` ranks the entries for labelling: their "PD-L1 review rank" and "PD-L1 review score"
 * are in summary.json, and for an image analysed in QuPath alone (pdl1_analyze.groovy with `pdl1 serve`: no
 * objects.geojson) in <project>/pdl1/<entryID>/review.json; this script sets them as the entry's metadata (on
 * QuPath 0.7 too, which `pdl1 review-queue` cannot write to itself).
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
// pdl1_analyze.groovy's records of its analyses, in each entry's results folder (bridge/analysis_record.py)
def RECORDS_FOLDER = "qupath_analyses"
// Each exported target's results, by its object's ID, in an entry's results folder (bridge/exported_targets.py:
// TARGET_OBJECTS_FOLDER)
def TARGET_OBJECTS_FOLDER = "target_objects"
// ------------------------------------------------------------------------------------------

// ---- helpers: plain Groovy, no QuPath classes (tests/test_groovy_scripts.py runs this part) ----
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
// A `pdl1 review-queue` stopped while renaming its files leaves review_queue.unfinished in the results folder
// (bridge/review_queue.py: UNFINISHED_FILE): some summaries then carry its review rank and others an older one, so
// their "PD-L1 review ..." keys are left out and QuPath keeps the ranks it has. Returns the metadata to set.
def REVIEW_UNFINISHED = "review_queue.unfinished"
def REVIEW_KEYS = ["PD-L1 review rank", "PD-L1 review score"]
def metadataToImport = { Map metadata, File resultsFolder ->
    if (!new File(resultsFolder, REVIEW_UNFINISHED).isFile())
        return metadata
    return metadata.findAll { key, value -> !(key in REVIEW_KEYS) }
}
// An entry analysed in QuPath alone (pdl1_analyze.groovy's records: no summary.json, no objects.geojson) has its
// review keys in <entryID>/review.json (bridge/review_queue.py: REVIEW_FILE): {"metadata": {key: value}, ...}, a null
// value where the entry is no longer ranked (the key is then removed, as review-queue removes it through QuPath).
// Returns the review keys it holds (others are not taken); throws IllegalArgumentException saying what was expected.
def REVIEW_FILE = "review.json"
def reviewMetadataOf = { sidecar ->
    def metadata = sidecar instanceof Map ? sidecar.get("metadata") : null
    def review = metadata instanceof Map ? metadata.findAll { key, value -> key in REVIEW_KEYS } : [:]
    if (review.isEmpty())
        throw new IllegalArgumentException("expected an object whose \"metadata\" holds ${REVIEW_KEYS.join(' and ')}")
    return review
}
// Sets the review keys of values on an entry and removes those whose value is null, the entry's own map where it has
// one (QuPath 0.6+), else putMetadataValue and removeMetadataValue (0.4.4 and 0.5), as putEntryMetadata; not
// putEntryMetadata itself, which removes this tool's run keys that values lack (the TPS pdl1_analyze.groovy set).
// Other keys stay. Returns [how: the API used, set: the keys set, removed: the keys removed].
def putReviewMetadata = { entry, Map values ->
    def map = entry.metaClass.respondsTo(entry, "getMetadata") ? entry.getMetadata() : null
    def review = values.findAll { key, value -> key in REVIEW_KEYS }
    def set = review.findAll { key, value -> value != null }
    def has = { key -> map instanceof Map ? map.containsKey(key) : key in entry.getMetadataKeys() }
    def removed = review.findAll { key, value -> value == null && has(key) }.keySet().toList()
    if (map instanceof Map) {
        removed.each { map.remove(it) }
        set.each { key, value -> map.put(key as String, value as String) }
        return [how: "getMetadata", set: set.keySet().toList(), removed: removed]
    }
    removed.each { entry.removeMetadataValue(it as String) }
    set.each { key, value -> entry.putMetadataValue(key as String, value as String) }
    return [how: "putMetadataValue", set: set.keySet().toList(), removed: removed]
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
// What to say when whole-image results go into an image with a TMA grid (hierarchy.getTMAGrid(), null without one:
// PathObjectHierarchy.java v0.4.4:183, v0.7.0:152): `pdl1 run` without QuPath cannot read the grid from data.qpdata
// (only QuPath reads it) and found no export of the image's objects holding it, so it analysed the image as one
// region and its one TPS is over all cores. null when there is no grid.
def tmaGridNote = { grid, String image ->
    if (grid == null)
        return null
    return ("pdl1: ${image} has a TMA grid, but these results are of the whole image analysed as one region (`pdl1 " +
            "run` without QuPath saw no grid: the image's objects were not exported), so the TPS is over all cores, " +
            "not per core. To score each core on its own, run pdl1_export_labels.groovy on this image and `pdl1 run` " +
            "on the project again, or run pdl1_analyze.groovy on this image with `pdl1 serve` running, or `pdl1 run` " +
            "on the project with QuPath installed (paquo finds it through PAQUO_QUPATH_DIR)").toString()
}
// The annotations and TMA cores a summary.json's run analysed (its "targets": bridge/targets.py's rows, target_type
// "annotation" or "TMA core"), none where it analysed the whole image. Only `pdl1 run` through QuPath (paquo) reads
// them, and it writes their results into the image itself, keeping beside them objects.geojson of the first target
// alone under a whole-image "PD-L1 analysis": imported, that target's objects went in twice, the second time on an
// outline of the whole image carrying the first target's TPS. Their names, in the summary's order.
def targetsInQuPath = { Map summary ->
    return (summary.get("targets") ?: []).findAll { it.target_type != "whole image" && it.object_id == null }
            .collect { it.target as String }
}
// Where a record set aside goes, in the entry's RECORDS_FOLDER: qupath_analyses/removed/<parent ID>.json, as
// pdl1_analyze.groovy sets aside its stale records (bridge/analysis_record.py: SET_ASIDE), which `pdl1 report`,
// `pdl1 review-queue` and `pdl1 run` do not read, and pdl1_analyze.groovy moves back where the analysis's output is in
// the image again (QuPath closed without saving).
def REMOVED_FOLDER = "removed"
// What went wrong, for the log: the message of the error or of its first cause that has one, else their class names.
def whyFailed = { Throwable error ->
    def names = new LinkedHashSet()
    for (def e = error; e != null; e = e.getCause() == e ? null : e.getCause()) {
        if (e.getMessage())
            return e.getMessage()
        names << e.getClass().getSimpleName()
    }
    return names.join(", ")
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
// The area a java.awt.Shape covers: its outlines flattened to lines (within 0.05 px) and summed by the shoelace
// formula, signed, so the holes of a java.awt.geom.Area (each outlined the other way round) count off.
def shapeArea = { java.awt.Shape shape ->
    double sum = 0, x0 = 0, y0 = 0, px = 0, py = 0
    double[] c = new double[6]
    for (def it = shape.getPathIterator(null, 0.05); !it.isDone(); it.next()) {
        int type = it.currentSegment(c)
        if (type == java.awt.geom.PathIterator.SEG_MOVETO) {
            x0 = px = c[0]; y0 = py = c[1]
        } else if (type == java.awt.geom.PathIterator.SEG_LINETO) {
            sum += px * c[1] - c[0] * py; px = c[0]; py = c[1]
        } else if (type == java.awt.geom.PathIterator.SEG_CLOSE) {
            sum += px * y0 - x0 * py; px = x0; py = y0
        }
    }
    return Math.abs(sum) / 2
}
// Whether an annotation's or core's ROI has the outline a run analysed (the ROI of its stand-in, the first object of
// its results): the area inside one outline and not the other at most 0.5 % of the larger (ROI.getShape() and
// getArea(), 0.4.4 to 0.7; a core's ellipse against the 100-point polygon QuPath's GeoJSON gives it, JTS's
// GeometricShapeFactory through GeometryTools v0.4.4:836-846, differs by 0.07 %). Moved or redrawn since the export,
// the results would lie beside it, or cut off by its new edge; an outline redrawn within the same bounds to the same
// area is caught as well.
def sameOutline = { roi, analysed ->
    // The same vertices within 0.01 px (ROI.getAllPoints(), 0.4.4 to 0.7): an outline as exported and read back, the
    // common case, told without java.awt.geom.Area, whose exclusiveOr took 1 s for an outline of 20 000 vertices
    // against itself and 16-47 s for 100 000 (Java 17; a brush annotation's). A polygon read from GeoJSON keeps its
    // closing point (GeometryTools.geometryToROI v0.7.0:1500-1507), one drawn with the polygon tool has none.
    def open = { List points ->
        def closed = points.size() > 1 && points[0].getX() == points[-1].getX() && points[0].getY() == points[-1].getY()
        return closed ? points.subList(0, points.size() - 1) : points
    }
    def mine = open(roi.getAllPoints())
    def theirs = open(analysed.getAllPoints())
    if (mine.size() == theirs.size() && (0..<mine.size()).every {
        Math.abs(mine[it].getX() - theirs[it].getX()) <= 0.01 && Math.abs(mine[it].getY() - theirs[it].getY()) <= 0.01
    })
        return true
    double mineArea = roi.getArea(), theirArea = analysed.getArea()
    def tolerance = Math.max(0.005 * Math.max(mineArea, theirArea), 1.0)
    // The area inside one outline and not the other is at least the difference of their areas: an outline redrawn
    // to another area is told without java.awt.geom.Area.
    if (Math.abs(mineArea - theirArea) > tolerance)
        return false
    def differ = new java.awt.geom.Area(roi.getShape())
    differ.exclusiveOr(new java.awt.geom.Area(analysed.getShape()))
    return shapeArea(differ) <= tolerance
}
// The rows of a summary's targets whose results are in TARGET_OBJECTS_FOLDER: read from an export (each with the
// object_id of its annotation or core), the TMA cores marked missing left out (no results).
def exportedTargets = { Map summary ->
    return (summary.get("targets") ?: []).findAll { it instanceof Map && it.object_id != null && it.state != "missing" }
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
def reviewFile = new File(folder, REVIEW_FILE)
if (!geojson.isFile() && reviewFile.isFile()) {
    // Analysed in QuPath alone: its objects are in the image already; only its review rank comes from here.
    def sidecar
    def review
    try {
        sidecar = GsonTools.getInstance().fromJson(reviewFile.getText("UTF-8"), Map.class)
        review = reviewMetadataOf(sidecar)
    } catch (Exception e) {  // Gson's JsonSyntaxException (not JSON, not an object), reviewMetadataOf's refusal
        def why = (e.getMessage() ?: e.getClass().getSimpleName()).replaceAll(/\s*\n\s*/, " ")  // one log line
        println "pdl1: ${reviewFile} does not read (${why}); run pdl1 review-queue for the project again"
        return
    }
    if (metadataToImport(review, folder.getParentFile()).size() < review.size()) {
        println "pdl1: ${new File(folder.getParentFile(), REVIEW_UNFINISHED)}: a pdl1 review-queue was stopped while " +
                "renaming its files, so the review ranks are part its, part older; ${entry.getImageName()}'s in " +
                "${reviewFile} is not imported (QuPath keeps the one it has): run pdl1 review-queue for the project " +
                "again"
        return
    }
    def done = putReviewMetadata(entry, review)
    try {
        project.syncChanges()
    } catch (IOException e) {
        println "pdl1: the review rank is set but ${project.getPath()} could not be saved (${e.getMessage()}); " +
                "save the project from QuPath"
    }
    def said = done.set.collect { "${it} ${review.get(it)}" } + done.removed.collect { "${it} removed" }
    def why = sidecar.get("not_ranked") == null ? "" : " (not ranked: ${sidecar.get('not_ranked')})"
    println "pdl1: ${entry.getImageName()}: ${said.isEmpty() ? 'no review rank to set or remove' : said.join(', ')}" +
            "${why}, from ${reviewFile}; no objects to import: it was analysed in QuPath, its results are in the image"
    return
}
if (!geojson.isFile()) {
    println "pdl1: no results for ${entry.getImageName()} (expected ${geojson}); run `pdl1 run` on the project first"
    return
}
def summaryFile = new File(folder, "summary.json")
def summary = summaryFile.isFile() ? GsonTools.getInstance().fromJson(summaryFile.getText("UTF-8"), Map.class) : null
def inQuPath = summary == null ? [] : targetsInQuPath(summary)
if (!inQuPath.isEmpty()) {
    println "pdl1: nothing imported for ${entry.getImageName()}: `pdl1 run` analysed its ${inQuPath.size()} " +
            "annotations or TMA cores (${inQuPath.join(', ')}) through QuPath and wrote their results into the image " +
            "itself; ${geojson} holds the first one's alone. Open the image again (File > Reload data) to see them"
    return
}

// Sets aside the records of pdl1_analyze.groovy's analyses of these parents whose output this import replaced (named
// by the parent's ID): kept, pdl1 report and review-queue counted that analysis, newer than these results, in place of
// what the image now holds. Set aside (qupath_analyses/removed/, as pdl1_analyze.groovy sets aside its stale records:
// moveRecords, one that was there replaced), not deleted: close QuPath without saving and the parent holds that
// analysis's output again, and a deleted record was gone for good (`pdl1 train --from-review` then counted its nuclei
// as written by no recorded analysis). pdl1_analyze.groovy's next run on the image moves it back where that output is
// under the parent (its recordOutputIn), and training takes it meanwhile where the labels exported hold the parent
// (and tells by what lies under it which output is there).
def setAsideRecordsOf = { List parents ->
    def records = new File(folder, RECORDS_FOLDER).toPath()
    def names = parents.collect { "${it.getID()}.json".toString() }.findAll {
        java.nio.file.Files.isRegularFile(records.resolve(it))
    }
    if (names.isEmpty())
        return
    def aside = records.resolve(REMOVED_FOLDER)
    def setAside = moveRecords(records, aside, names)
    setAside.failed.each { name, why ->
        println "pdl1: could not set aside ${records.resolve(name)}, the record of the pdl1_analyze.groovy analysis " +
                "these results replaced, into ${aside} (${why}); move it there by hand, or pdl1 report and " +
                "review-queue count that analysis in place of these results"
    }
    setAside.moved.each { name ->
        println "pdl1: set aside ${records.resolve(name)}, the record of the pdl1_analyze.groovy analysis these " +
                "results replaced, into ${aside}: pdl1 report and review-queue no longer read it. Close QuPath " +
                "without saving and that analysis's objects are back: pdl1_analyze.groovy's next run on the image " +
                "moves the record back"
    }
}

// The entry metadata of the run's summary.json (none without one).
def importMetadata = { ->
    def metadata = summary?.get("metadata")
    if (metadata == null)
        return
    def values = metadataToImport(metadata, folder.getParentFile())  // not `imported`: the objects' name below
    if (values.size() < metadata.size())
        println "pdl1: ${new File(folder.getParentFile(), REVIEW_UNFINISHED)}: a pdl1 review-queue was stopped " +
                "while renaming its files, so the summaries' review ranks are part its, part older; they are not " +
                "imported (QuPath keeps the ones it has): run pdl1 review-queue for the project again"
    putEntryMetadata(entry, values)
    // QuPath 0.4.4 and 0.5 do not save the project after a headless script (0.6+ do with -s): save it now.
    try {
        project.syncChanges()
    } catch (IOException e) {
        println "pdl1: the entry metadata is set but ${project.getPath()} could not be saved (${e.getMessage()}); " +
                "save the project from QuPath"
    }
}

// Objects this tool wrote carry its signature measurements (see bridge/objects.py: is_own_object).
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

// The 'PD-L1 analysis' annotation a whole-image run puts its results under (bridge/objects.py: analysis_annotation).
def isWholeImageAnalysis = { PathObject obj ->
    obj.getPathClass() != null && obj.getPathClass().toString() == ANALYSIS_CLASS && obj.getName() == ANALYSIS_CLASS
}

def hierarchy = getCurrentHierarchy()
// Replaces this tool's earlier objects under an analysed parent (and those Resolve hierarchy moved out of it) with a
// run's: its measurements from what stood for it in the file (written), then its new children.
def replaceResults = { parent, written, List children ->
    def old = ownDescendants(parent, isOwn)
    // The hierarchy's removeObjects(objects, keepChildren): the same on 0.4.4 to 0.7 (QP's two-argument
    // removeObjects is deprecated since 0.6, its one-argument form is 0.6+).
    if (!old.isEmpty()) {
        rehomeOthers(old, parent)  // what is not ours inside them stays where it was, not at the root
        hierarchy.removeObjects(old, true)
    }
    def measured = written.getMeasurementList()
    setParentMeasurements(parent.getMeasurementList(), measurementNames(measured).collectEntries { [(it): measured.get(it)] })
    parent.addChildObjects(children)
}
def fromExport = summary == null ? [] : exportedTargets(summary)
if (!fromExport.isEmpty()) {
    // Each target's results under the annotation or core of its ID, as the whole image's go under 'PD-L1 analysis'.
    def byId = [:]
    hierarchy.getAnnotationObjects().each { byId[it.getID().toString()] = it }
    hierarchy.getTMAGrid()?.getTMACoreList()?.each { byId[it.getID().toString()] = it }
    def done = []
    def placed = []  // the annotations and cores whose results were put in
    def notDone = []
    def count = 0
    fromExport.each { row ->
        def file = new File(new File(folder, TARGET_OBJECTS_FOLDER), "${row.object_id}.geojson")
        def target = byId[row.object_id as String]
        if (target == null) {
            notDone << "${row.target}: no annotation or TMA core of ID ${row.object_id} in the image (deleted since " +
                    "the export?)"
            return
        }
        def objects = file.isFile() ? PathIO.readObjects(file) : []
        if (objects.isEmpty() || objects[0].getID().toString() != row.object_id) {
            notDone << "${row.target}: ${file} is missing or not of this target; run `pdl1 run` on the project again"
            return
        }
        if (!sameOutline(target.getROI(), objects[0].getROI())) {
            notDone << "${row.target}: moved or redrawn since it was exported and analysed; export it again " +
                    "(pdl1_export_labels.groovy) and run `pdl1 run` on the project again"
            return
        }
        replaceResults(target, objects[0], objects.subList(1, objects.size()))
        count += objects.size() - 1
        done << row.target
        placed << target
    }
    fireHierarchyUpdate()
    setAsideRecordsOf(placed)
    notDone.each { println "pdl1: ${entry.getImageName()}: not imported: ${it}" }
    if (placed.any { it.isTMACore() }) {  // as pdl1 run through QuPath and pdl1_analyze.groovy do for the cores
        def analyses = hierarchy.getAnnotationObjects().findAll(isWholeImageAnalysis)
        def gone = removeWholeImageAnalysis(analyses, isOwn, hierarchy)
        if (gone > 0) {
            fireHierarchyUpdate()
            setAsideRecordsOf(analyses)
            println "pdl1: removed the earlier whole-image analysis ('${ANALYSIS_CLASS}' and what this tool put under " +
                    "it: ${gone} objects), which scored all TMA cores as one; each core's analysis replaces it"
        }
    }
    importMetadata()
    println "pdl1: imported ${count} objects under ${done.size()} of ${fromExport.size()} targets for " +
            "${entry.getImageName()}${done.isEmpty() ? '' : ': ' + done.join(', ')}"
    return
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

def parent = hierarchy.getAnnotationObjects().find(isWholeImageAnalysis)
def replaced = parent != null
if (parent == null) {
    parent = newParent
    addObjects([parent])
    parent.addChildObjects(children)
} else {
    replaceResults(parent, newParent, children)
}
fireHierarchyUpdate()
// Where pdl1_analyze.groovy had analysed the whole image under this annotation, its record describes the output
// just replaced (setAsideRecordsOf).
if (replaced)
    setAsideRecordsOf([parent])
def tmaNote = tmaGridNote(hierarchy.getTMAGrid(), entry.getImageName())
if (tmaNote != null)
    println tmaNote

importMetadata()
println "pdl1: imported ${children.size()} objects under '${ANALYSIS_CLASS}' for ${entry.getImageName()}"
