package qupath.lib.objects

/** PathObjectTools.updatePlaneRecursive(PathObject, ImagePlane, boolean copyMeasurements, boolean createNewIDs)
 * (PathObjectTools.java v0.4.4:396-406, v0.7.0:469-479; transformObjectImpl: v0.4.4:1254-1291): a new object of the
 * same kind, class and name, its ROI on the plane (ROI.updatePlane), its measurements where copyMeasurements, its ID
 * unless createNewIDs, and its children made so too; the original unchanged. */
class PathObjectTools {
    static PathObject updatePlaneRecursive(PathObject pathObject, plane, boolean copyMeasurements,
            boolean createNewIDs) {
        def made = new PathObject(kind: pathObject.kind, roi: pathObject.roi.updatePlane(plane),
                pathClass: pathObject.pathClass, name: pathObject.name, geometry: pathObject.geometry)
        if (!createNewIDs)
            made.id = pathObject.id
        if (copyMeasurements)
            made.measurements.values.putAll(pathObject.measurements.values)
        made.addChildObjects(pathObject.children.collect {
            updatePlaneRecursive(it, plane, copyMeasurements, createNewIDs)
        })
        return made
    }
}
