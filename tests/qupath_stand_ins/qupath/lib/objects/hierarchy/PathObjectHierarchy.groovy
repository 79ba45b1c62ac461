package qupath.lib.objects.hierarchy

import qupath.lib.objects.PathObject

/** PathObjectHierarchy as the scripts call it: getRootObject(), getTMAGrid() (null without a grid), every annotation
 * or detection below the root (getAnnotationObjects(), getDetectionObjects(): PathObjectTools.getDescendantObjects'
 * order, PathObjectHierarchy.java v0.4.4:726-736), and removeObjects(Collection, boolean keepChildren) as
 * v0.4.4:458-497 and v0.7.0:413-449 do it: each object leaves its parent, and with keepChildren its children that are
 * not removed too are added again under the root (addPathObjectImpl: v0.4.4:632-636), not where they were. */
class PathObjectHierarchy {
    PathObject root = new PathObject(kind: "root")
    def grid

    PathObject getRootObject() { root }
    def getTMAGrid() { grid }
    List<PathObject> getAnnotationObjects() { descendants().findAll { it.isAnnotation() } }
    List<PathObject> getDetectionObjects() { descendants().findAll { it.isDetection() } }

    void removeObjects(Collection<? extends PathObject> objects, boolean keepChildren) {
        def going = Collections.newSetFromMap(new IdentityHashMap())
        going.addAll(objects)
        def kept = []
        objects.findAll { it.parent != null }.each { obj ->
            obj.parent.children.removeIf { it.is(obj) }
            obj.parent = null
            if (keepChildren)
                kept.addAll(obj.children.findAll { !going.contains(it) })
        }
        root.addChildObjects(kept)
    }

    private List<PathObject> descendants() {
        def out = []
        def visit
        visit = { PathObject obj -> obj.children.each { out << it; visit(it) } }
        visit(root)
        return out
    }
}
