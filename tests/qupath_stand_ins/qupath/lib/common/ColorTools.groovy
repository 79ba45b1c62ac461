package qupath.lib.common

/** ColorTools.packRGB(int, int, int): a colour as QuPath packs it (ColorTools.java v0.4.4:132, v0.7.0:132). */
class ColorTools {
    static int packRGB(int r, int g, int b) {
        return (255 << 24) | ((r & 0xff) << 16) | ((g & 0xff) << 8) | (b & 0xff)
    }
}
