/*
 * pdl1_setup_classes.groovy - add the pdl1-bridge classes (with their colours) to the project (QuPath 0.4.4 to 0.7).
 *
 * Run once per project (Script editor > Run). Existing classes are kept; missing ones are added, to the
 * project and to the class list of QuPath's window (Annotations tab) at once. The colours match what pdl1-bridge
 * writes (bridge/classes.py); a class of the same name that is already there takes its pdl1-bridge colour.
 */
import qupath.lib.common.ColorTools

// ---- settings ----------------------------------------------------------------------------
def CLASSES = [
    ["PD-L1 positive", 200, 80, 0],
    ["PD-L1 FN candidate", 230, 0, 230],
    ["PD-L1 analysis", 0, 150, 200],
    ["Tumor: Positive", 200, 50, 50],
    ["Tumor: Negative", 90, 90, 180],
    ["Other", 255, 200, 0],
    ["Tumor: 1+", 255, 215, 0],
    ["Tumor: 2+", 225, 150, 50],
    ["Tumor: 3+", 200, 50, 50],
    ["Immune cells: PD-L1 positive", 160, 60, 160],
    ["Immune cells: PD-L1 negative", 60, 160, 160],
    ["PD-L1 IHC positive (registered)", 120, 60, 0],
    ["Training region", 0, 160, 255],
    ["PD-L1 negative", 90, 90, 200],
    ["Ignore*", 180, 180, 180],
]
// ------------------------------------------------------------------------------------------

// ---- helpers: plain Groovy, no QuPath classes (tests/test_groovy_scripts.py runs this part) ----
// QuPath's window keeps its own class list (QuPathGUI.getAvailablePathClasses(), 0.4.4 to 0.7): it reads the
// project's list only when the project opens, and writes itself over the project's list whenever it changes. Set on
// the project alone, the classes were missing from the Annotations tab until the project was opened again, and the
// next class added there dropped them from the project. Adds the classes the window lacks, on the window's thread
// (runLater); false without a window (headless, getQuPath() is null).
def showInWindow = { gui, List pathClasses, Closure runLater ->
    if (gui == null)
        return false
    runLater {
        def shown = gui.getAvailablePathClasses()
        def missing = pathClasses.findAll { !shown.contains(it) }
        if (!missing.isEmpty())
            shown.addAll(missing)
    }
    return true
}
// ---- end of helpers ------------------------------------------------------------------------

def project = getProject()
if (project == null) {
    println "pdl1: open a project first"
    return
}
def classes = new ArrayList(project.getPathClasses())
def have = classes.collect { it.toString() } as Set
def added = []
CLASSES.each { spec ->
    def name = spec[0] as String
    def pathClass = getPathClass(name)
    pathClass.setColor(ColorTools.packRGB(spec[1] as int, spec[2] as int, spec[3] as int))
    if (!have.contains(name)) {
        classes.add(pathClass)
        added << name
    }
}
project.setPathClasses(classes)
// In QuPath's window, its own class list too (JavaFX lists change on the JavaFX thread).
showInWindow(getQuPath(), classes, { Runnable r -> javafx.application.Platform.runLater(r) })
println added.isEmpty() ? "pdl1: all classes were already there" : "pdl1: added ${added.join(', ')}"
