package qupath.lib.objects.hierarchy

import qupath.lib.objects.PathObject

/** PathObjectHierarchy as the scripts call it: getRootObject(), getTMAGrid() (null without a grid), every annotation
 * or detection below the root (getAnnotationObjects(), getDetectionObjects(): a new ArrayList each call,
 * getObjects: PathObjectHierarchy.java v0.4.4:726-758, v0.7.0:623-655), and removeObjects(Collection, boolean
 * keepChildren) as v0.4.4:458-497 and v0.7.0:413-449 do it: each object leaves its parent, and with keepChildren its
 * children that are not removed too are added again under the root where they have a ROI (addPathObjectImpl:
 * v0.4.4:632-636, v0.7.0:527-531), not where they were. The detections come in PathObjectTools.getDescendantObjects'
 * order (depth first, v0.4.4:990-1015); the annotations, once the hierarchy's tile cache is built (the viewer builds
 * it as it paints, and it stays until the hierarchy changes), in its Quadtree's order (getObjects v0.4.4:749-752,
 * v0.7.0:646-649; PathObjectTileCache.getObjectsForRegion), which is spatial, not the hierarchy's: the stand-in gives
 * them in the reverse of the hierarchy's order, so that nothing here can rely on it. */
class PathObjectHierarchy {
    PathObject root = new PathObject(kind: "root")
    def grid

    PathObject getRootObject() { root }
    def getTMAGrid() { grid }
    Collection<PathObject> getAnnotationObjects() { new ArrayList(descendants().findAll { it.isAnnotation() }.reverse()) }
    Collection<PathObject> getDetectionObjects() { new ArrayList(descendants().findAll { it.isDetection() }) }

    // QuPath takes the objects deepest first, groups them by parent in a HashMap and adds the kept children back in the
    // order of its entries, identity hashes (v0.7.0:413-449): the stand-in takes the parents in the reverse of the
    // order they are met in, so that nothing here can rely on the order the children come back in.
    void removeObjects(Collection<? extends PathObject> objects, boolean keepChildren) {
        def going = Collections.newSetFromMap(new IdentityHashMap())
        going.addAll(objects)
        def byParent = []  // [parent, [its objects removed]], by identity
        new ArrayList(objects).sort { -level(it) }.findAll { it.parent != null }.each { obj ->
            def group = byParent.find { it[0].is(obj.parent) }
            if (group == null)
                byParent << (group = [obj.parent, []])
            group[1] << obj
        }
        def kept = []
        byParent.reverse().each { parent, children ->
            children.each { obj ->
                parent.children.removeIf { it.is(obj) }
                obj.parent = null
                if (keepChildren)
                    kept.addAll(obj.children.findAll { !going.contains(it) && !kept.any { k -> k.is(it) } })
            }
        }
        root.addChildObjects(kept.findAll { it.getROI() != null })
    }

    private static int level(PathObject obj) {
        def n = 0
        for (def up = obj.parent; up != null; up = up.parent)
            n++
        return n
    }

    private List<PathObject> descendants() {
        def out = []
        def visit
        visit = { PathObject obj -> obj.children.each { out << it; visit(it) } }
        visit(root)
        return out
    }
}
