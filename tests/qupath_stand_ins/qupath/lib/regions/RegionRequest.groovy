package qupath.lib.regions

/** RegionRequest.createInstance(String, double, int, int, int, int, int, int) (RegionRequest.java v0.4.4:175). */
class RegionRequest {
    String path
    double downsample
    int x, y, width, height, z, t

    static RegionRequest createInstance(String path, double downsample, int x, int y, int width, int height, int z,
            int t) {
        return new RegionRequest(path: path, downsample: downsample, x: x, y: y, width: width, height: height, z: z, t: t)
    }
}
