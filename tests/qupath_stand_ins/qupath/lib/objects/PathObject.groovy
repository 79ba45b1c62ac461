package qupath.lib.objects

/** A path object as the script uses it: its ID, ROI, class, name, measurements, parent and children. */
class PathObject {
    UUID id = UUID.randomUUID()  // PathObject.getID(): a random UUID unless set
    String kind = "annotation"  // annotation, detection, tile, cell, tma core
    def roi
    def pathClass
    String name
    Map geometry  // GeoJSON, for an object read from the service's answer
    StandInMeasurements measurements = new StandInMeasurements()
    PathObject parent
    List<PathObject> children = []

    static PathObject fromFeature(Map feature) {
        // get, not feature.properties: since Groovy 5 (QuPath 0.7 runs 5.0.4) a getter may win over a Map's entry
        // of the same name; with Groovy 6.0.0 feature.properties was the getProperties() extension method's bean
        // map: every object read had no class, name or measurements, and the import script refused its file.
        def props = feature.get("properties")
        def cls = props.classification == null ? null :
                (props.classification.name ?: props.classification.names.join(": "))
        // The feature's ID where it is a UUID, as QuPath 0.4+ reads it (QuPathTypeAdapters.java v0.4.4:475-486,
        // v0.7.0:467-478, 591-592); else a new one.
        def id = feature.get("id") instanceof String && feature.get("id") ==~ /\p{XDigit}{8}(-\p{XDigit}{4}){3}-\p{XDigit}{12}/ ?
                UUID.fromString(feature.get("id")) : UUID.randomUUID()
        def made = new PathObject(id: id, kind: props.objectType, pathClass: cls == null ? null : new StandInPathClass(cls),
                name: props.name, geometry: feature.geometry, roi: StandInFeatureROI.of(feature.geometry))
        (props.measurements ?: [:]).each { name, value -> made.measurements.put(name as String, value as double) }
        return made
    }

    // A detection's measurements are floats (StandInMeasurements); set with its kind, as QuPath's class fixes it.
    void setKind(String kind) {
        this.kind = kind
        measurements.floats = isDetection()
    }

    UUID getID() { id }
    def getROI() { roi }
    def getPathClass() { pathClass }
    String getName() { name }
    void setName(String value) { name = value }
    void setPathClass(value) { pathClass = value }
    boolean isAnnotation() { kind == "annotation" }
    boolean isDetection() { kind in ["detection", "tile", "cell"] }
    boolean isTile() { kind == "tile" }
    boolean isTMACore() { kind == "tma core" }
    boolean missing  // TMACoreObject.isMissing(), for a "tma core"
    boolean isMissing() { missing }
    StandInMeasurements getMeasurementList() { measurements }
    PathObject getParent() { parent }
    PathObject[] getChildObjectsAsArray() { children as PathObject[] }

    void addChildObjects(Collection<? extends PathObject> objects) {
        objects.each { it.parent?.children?.remove(it); it.parent = this; children << it }
    }
}

class StandInPathClass {
    String name
    StandInPathClass(String name) { this.name = name }
    String toString() { name }
}

/** MeasurementList as on QuPath 0.4.4 and 0.5: getMeasurementNames(), removeMeasurements(String...), put, get (NaN
 * for a name it does not hold: MeasurementList.java v0.4.4:296-303, v0.7.0:207-214). The names an unmodifiable list
 * (DefaultMeasurementList.java v0.4.4:64-69, NumericMeasurementList.java v0.4.4:181-196; List.copyOf and toList on
 * 0.6+): add or remove on it throws. A detection's list holds floats (PathDetectionObject.createEmptyMeasurementList:
 * MeasurementListType.FLOAT, PathDetectionObject.java v0.4.4:90-91, v0.7.0:86-87; also one read from GeoJSON, put into
 * the object's own list: QuPathTypeAdapters.java v0.4.4:602-604, v0.7.0:594-596): a value comes back as the float
 * nearest it; an annotation's or TMA core's (GENERAL) doubles. */
class StandInMeasurements {
    Map<String, Double> values = [:]
    boolean floats  // a detection's (FloatList)
    List<String> getMeasurementNames() { Collections.unmodifiableList(new ArrayList(values.keySet())) }
    void removeMeasurements(String... names) { names.each { values.remove(it) } }
    void put(String name, double value) { values[name] = floats ? (double) (float) value : value }
    double get(String name) { values.containsKey(name) ? values[name] : Double.NaN }
}

/** The ROI of an object read from GeoJSON, as far as the scripts read one they did not draw: its bounds and centroid
 * (ROI.getBoundsX/Y/Width/Height, getCentroidX/Y: ROI.java v0.4.4 to v0.7.0), a point's its coordinates, another
 * geometry's the mean of its vertices (not QuPath's area centroid: no script reads that of an area); its plane, the
 * default one as QuPath reads GeoJSON without a "plane" (ROITypeAdapters.java v0.4.4:115-119, v0.7.0:122-126), and
 * updatePlane(ImagePlane): a copy on another plane (ROI.java v0.4.4:321, v0.7.0:377). */
class StandInFeatureROI {
    double x0, y0, x1, y1, cx, cy, area
    Map geometry
    qupath.lib.regions.ImagePlane plane = qupath.lib.regions.ImagePlane.getDefaultPlane()

    static StandInFeatureROI of(Map geometry) {
        def points = []
        def stack = [geometry?.get("coordinates")]
        while (!stack.isEmpty()) {
            def c = stack.remove(stack.size() - 1)
            if (c instanceof List && c.size() >= 2 && c[0] instanceof Number)
                points << [c[0] as double, c[1] as double]
            else if (c instanceof List)
                stack.addAll(c)
        }
        if (points.isEmpty())
            return null
        return new StandInFeatureROI(x0: points*.get(0).min(), y0: points*.get(1).min(), x1: points*.get(0).max(),
                y1: points*.get(1).max(), cx: points*.get(0).sum() / points.size(), cy: points*.get(1).sum() / points.size(),
                area: areaOf(geometry), geometry: geometry)
    }

    // ROI.getAllPoints() of what QuPath makes of a GeoJSON geometry (GeometryTools.geometryToROI v0.7.0:1491-1507):
    // a polygon's vertices with its closing point (a PolygonROI), every ring's of one with holes or of several parts
    // (a GeometryROI), in order.
    List<java.awt.geom.Point2D> getAllPoints() {
        def positions = []
        def stack = [geometry?.get("coordinates")]
        while (!stack.isEmpty()) {
            def c = stack.remove(0)
            if (c instanceof List && c.size() >= 2 && c[0] instanceof Number)
                positions << new java.awt.geom.Point2D.Double(c[0] as double, c[1] as double)
            else if (c instanceof List)
                stack.addAll(0, c)
        }
        return positions
    }

    // ROI.getShape(): a Polygon's or MultiPolygon's rings as one path, holes cut out (even-odd); empty else.
    java.awt.Shape getShape() {
        def path = new java.awt.geom.Path2D.Double(java.awt.geom.Path2D.WIND_EVEN_ODD)
        def polygons = [Polygon: [geometry?.get("coordinates")], MultiPolygon: geometry?.get("coordinates")]
        (polygons[geometry?.get("type")] ?: []).each { rings ->
            rings.each { ring ->
                path.moveTo(ring[0][0] as double, ring[0][1] as double)
                ring.drop(1).each { path.lineTo(it[0] as double, it[1] as double) }
                path.closePath()
            }
        }
        return path
    }

    // ROI.getArea() of a Polygon or MultiPolygon (its outer rings less its holes, by the shoelace formula); 0 else.
    static double areaOf(Map geometry) {
        def ring = { List c -> Math.abs((0..<c.size() - 1).sum(0.0) { i ->
            (c[i][0] as double) * (c[i + 1][1] as double) - (c[i + 1][0] as double) * (c[i][1] as double) } / 2) }
        def polygon = { List rings -> rings.isEmpty() ? 0.0 : ring(rings[0]) - rings.drop(1).sum(0.0) { ring(it) } }
        switch (geometry?.get("type")) {
            case "Polygon": return polygon(geometry.get("coordinates"))
            case "MultiPolygon": return geometry.get("coordinates").sum(0.0) { polygon(it) }
            default: return 0.0
        }
    }

    double getBoundsX() { x0 }
    double getBoundsY() { y0 }
    double getBoundsWidth() { x1 - x0 }
    double getBoundsHeight() { y1 - y0 }
    double getCentroidX() { cx }
    double getCentroidY() { cy }
    double getArea() { area }
    qupath.lib.regions.ImagePlane getImagePlane() { plane }
    int getZ() { plane.z }
    int getT() { plane.t }
    StandInFeatureROI updatePlane(qupath.lib.regions.ImagePlane plane) {
        return new StandInFeatureROI(x0: x0, y0: y0, x1: x1, y1: y1, cx: cx, cy: cy, area: area, geometry: geometry,
                plane: plane)
    }
}
