/*
 * pdl1_analyze.groovy - PD-L1 analysis with uncertainty from a running `pdl1 serve` (QuPath 0.4.4, 0.5, 0.6).
 *
 * Analyses the selected annotations; if none are selected, all annotations of TARGET_CLASS;
 * if that is null too, the whole image (under a "PD-L1 analysis" annotation). Results go under
 * each analysed annotation, replacing what an earlier pdl1-bridge run put there; nothing else
 * is touched. Stop the script (or close QuPath) and the job is cancelled on the server.
 *
 * Works from the script editor, "Run for project", and headless:
 *   QuPath script -p project.qpproj -s pdl1_analyze.groovy --save
 *
 * Edit the settings below: where the service runs, its token, what to compute.
 */
import qupath.lib.common.GeneralTools
import qupath.lib.images.servers.TransformingImageServer
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.time.Duration

// ---- settings ----------------------------------------------------------------------------
def SERVER_URL = "http://127.0.0.1:8765"      // where `pdl1 serve` listens
def TOKEN = ""                                // the --token the service was started with, if any
def MODEL = "default"
def OUTPUTS = ["regions", "uncertainty_tiles", "sua", "nuclei"]
def TARGET_CLASS = null                       // e.g. "Tumor" to analyse every Tumor annotation
def PAGE_SIZE = 50000                         // features per result page
def POLL_MS = 1000
// ------------------------------------------------------------------------------------------

def ANALYSIS_CLASS = "PD-L1 analysis"
def OWN_ANNOTATION_CLASSES = ["PD-L1 positive", "PD-L1 FN candidate"]
def OWN_DETECTION_CLASSES = ["Tumor: Positive", "Tumor: Negative", "Other"]
def TILE_NAME = "PD-L1 uncertainty"

def imageData = getCurrentImageData()
if (imageData == null) {
    println "pdl1: open an image first"
    return
}
def server = imageData.getServer()
// The service reads the image file as it is: a view QuPath rotates, crops or builds from several files
// would put the ROI and the results in the wrong place.
if (server instanceof TransformingImageServer || server.getURIs().size() != 1) {
    println "pdl1: QuPath shows this image through a ${server.getClass().getSimpleName()} (rotated, cropped or " +
            "combined from files); the service reads files as they are, so results would land in the wrong place. " +
            "Add the file to the project without the transform, or export the image as OME-TIFF and analyse that."
    return
}
def imagePath = GeneralTools.toPath(server.getURIs()[0])
if (imagePath == null) {
    println "pdl1: this image is not a local file; the service can only open files (use the pixel upload API)"
    return
}
def mpp = server.getPixelCalibration().getAveragedPixelSizeMicrons()
def gson = GsonTools.getInstance()
def client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build()

def request = { String path ->
    def builder = HttpRequest.newBuilder(URI.create(SERVER_URL + path)).timeout(Duration.ofMinutes(5))
    if (TOKEN)
        builder.header("Authorization", "Bearer " + TOKEN)
    return builder
}
def send = { HttpRequest req ->
    def response = client.send(req, HttpResponse.BodyHandlers.ofString())
    if (response.statusCode() >= 400) {
        def detail = response.body()
        try { detail = gson.fromJson(response.body(), Map.class).get("detail") } catch (Exception ignored) { }
        throw new IOException("pdl1 service answered ${response.statusCode()}: ${detail}")
    }
    return gson.fromJson(response.body(), Map.class)
}

def isOwn = { PathObject obj ->
    def cls = obj.getPathClass() == null ? null : obj.getPathClass().toString()
    def ml = obj.getMeasurementList()
    if (obj.isTile())
        return obj.getName() == TILE_NAME
    if (obj.isAnnotation())
        return cls in OWN_ANNOTATION_CLASSES && !Double.isNaN(ml.get("PD-L1 probability mean"))
    if (obj.isDetection())
        return cls in OWN_DETECTION_CLASSES && !Double.isNaN(ml.get("PD-L1 positive probability"))
    return false
}

// What to analyse.
def hierarchy = imageData.getHierarchy()
def targets = getSelectedObjects().findAll { it.isAnnotation() && !isOwn(it) }
if (targets.isEmpty() && TARGET_CLASS != null)
    targets = hierarchy.getAnnotationObjects().findAll { it.getPathClass() != null && it.getPathClass().toString() == TARGET_CLASS }
def wholeImage = targets.isEmpty()
if (wholeImage) {
    def existing = hierarchy.getAnnotationObjects().find {
        it.getPathClass() != null && it.getPathClass().toString() == ANALYSIS_CLASS && it.getName() == ANALYSIS_CLASS
    }
    if (existing == null) {
        existing = createFullImageAnnotation(false)
        existing.setPathClass(getPathClass(ANALYSIS_CLASS))
        existing.setName(ANALYSIS_CLASS)
    }
    targets = [existing]
}

try {
    send(request("/v1/health").GET().build())
} catch (Exception e) {
    println "pdl1: no service at ${SERVER_URL} (${e.getMessage()}); start it with `pdl1 serve --allow-root <slides folder>`"
    return
}

def entry = getProjectEntry()
def done = 0
for (parent in targets) {
    def body = new LinkedHashMap()
    body.put("image", imagePath.toString())
    body.put("roi", wholeImage ? null : gson.fromJson(gson.toJson(parent.getROI().getGeometry()), Map.class))
    body.put("mpp", Double.isNaN(mpp) ? null : mpp)
    body.put("image_size_px", [server.getWidth(), server.getHeight()])
    body.put("outputs", OUTPUTS)
    body.put("model", MODEL)
    def accepted = send(request("/v1/jobs").header("Content-Type", "application/json")
            .POST(HttpRequest.BodyPublishers.ofString(gson.toJson(body))).build())
    def jobId = accepted.get("job_id")
    def statusPath = "/v1/jobs/" + jobId
    def status = null
    def lastShown = -1
    while (true) {
        if (Thread.currentThread().isInterrupted()) {
            send(request(statusPath).DELETE().build())
            println "pdl1: stopped; job ${jobId} cancelled on the server"
            return
        }
        status = send(request(statusPath).GET().build())
        def state = status.get("state")
        if (state in ["done", "failed", "cancelled"])
            break
        def percent = Math.round(100 * (status.get("progress") as double)) as int
        if (percent != lastShown) {
            println "pdl1: ${state} ${percent}% (${status.get('tiles_done') as int}/${status.get('tiles_total') as int} tiles)"
            lastShown = percent
        }
        try {
            Thread.sleep(POLL_MS)
        } catch (InterruptedException e) {
            send(request(statusPath).DELETE().build())
            println "pdl1: stopped; job ${jobId} cancelled on the server"
            return
        }
    }
    if (status.get("state") != "done") {
        println "pdl1: job ${jobId} ${status.get('state')}: ${status.get('error')}"
        continue
    }

    // Fetch every page, then replace this tool's earlier children of the parent.
    def objects = []
    def pdl1 = null
    def offset = 0
    while (offset != null) {
        def response = client.send(request(statusPath + "/result?offset=" + offset + "&limit=" + PAGE_SIZE).GET().build(),
                HttpResponse.BodyHandlers.ofByteArray())
        if (response.statusCode() >= 400)
            throw new IOException("pdl1 result: HTTP ${response.statusCode()}")
        def bytes = response.body()
        objects.addAll(PathIO.readObjectsFromGeoJSON(new ByteArrayInputStream(bytes)))
        pdl1 = gson.fromJson(new String(bytes, "UTF-8"), Map.class).get("pdl1")
        def next = pdl1.get("next_offset")
        offset = next == null ? null : (next as int)
    }
    send(request(statusPath).DELETE().build())  // the result is here now: let the service release it
    def old = parent.getChildObjects().findAll { isOwn(it) }
    if (!old.isEmpty())
        removeObjects(old, true)
    parent.addChildObjects(objects)
    def ml = parent.getMeasurementList()
    pdl1.get("parent_measurements").each { name, value -> ml.put(name as String, value as double) }
    if (entry != null)
        pdl1.get("metadata").each { key, value -> entry.putMetadataValue(key as String, value as String) }
    done++
    println "pdl1: ${objects.size()} objects under ${parent.getName() ?: parent.getPathClass() ?: 'annotation'}"
}
fireHierarchyUpdate()
println "pdl1: analysed ${done} of ${targets.size()} regions of ${server.getMetadata().getName()}"
