package qupath.lib.regions

/** ImagePlane: a channel (-1: all), z-slice and timepoint; getDefaultPlane() is c=-1, z=0, t=0 (ImagePlane.java
 * v0.4.4 and v0.7.0:161-216), the plane of every ROI read from GeoJSON without a "plane". */
@groovy.transform.Immutable
class ImagePlane {
    int c, z, t

    static ImagePlane getDefaultPlane() { new ImagePlane(-1, 0, 0) }
    static ImagePlane getPlane(int z, int t) { new ImagePlane(-1, z, t) }
    static ImagePlane getPlaneWithChannel(int c, int z, int t) { new ImagePlane(c, z, t) }
}
