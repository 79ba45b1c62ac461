/*
 * pdl1_setup_classes.groovy - add the pdl1-bridge classes (with their colours) to the project (QuPath 0.4.4 to 0.7).
 *
 * Run once per project (Script editor > Run). Existing classes are kept; missing ones are added.
 * The colours match what pdl1-bridge writes (bridge/classes.py).
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
println added.isEmpty() ? "pdl1: all classes were already there" : "pdl1: added ${added.join(', ')}"
