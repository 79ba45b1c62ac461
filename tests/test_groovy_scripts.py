"""The Groovy scripts' own logic, run with the Groovy 4 that npm-groovy-lint ships.

QuPath 0.4.4 to 0.6 run Groovy 4; QuPath 0.7 runs Groovy 5.0.4 (gradle/libs.versions.toml at v0.7.0), not available
here. pdl1_analyze.groovy keeps what can run without QuPath between two marker lines: the pdl1-config.toml
reader, the transformed-view check and the entry-metadata write. These tests run that part with fake
QuPath objects, and check the reader against tomllib and bridge.project_config on the same files. The scripts run
one after another in one JVM (:func:`groovy_run`, tests/groovy_runner.groovy), as QuPath runs its scripts.
"""

import atexit
import collections
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import tomllib

from bridge.project_config import SCHEMA, ConfigError, read_project_config
from bridge.review_queue import RANK_KEY, REVIEW_FILE, SCORE_KEY, UNFINISHED_FILE, review_sidecar
from bridge.run import RUN_METADATA_KEYS
from project_templates import PDL1_TEMPLATE
from tests.helpers import JavaPathObject, paquo_stand_ins

SCRIPTS = Path(__file__).resolve().parents[1] / "qupath_scripts"
ANALYZE = SCRIPTS / "pdl1_analyze.groovy"
IMPORT = SCRIPTS / "pdl1_import_results.groovy"
SETUP = SCRIPTS / "pdl1_setup_classes.groovy"
BEGIN = "// ---- helpers: plain Groovy"
END = "// ---- end of helpers"
STAND_INS = Path(__file__).resolve().parent / "qupath_stand_ins"  # QuPath classes, as the whole scripts call them
RUNNER = Path(__file__).resolve().parent / "groovy_runner.groovy"


def _groovy_classpath() -> str | None:
    lint = os.environ.get("PDL1_GROOVY_LINT")
    if not lint or shutil.which("java") is None:
        return None
    node_modules = Path(lint).expanduser().absolute().parent.parent
    jars = sorted((node_modules / "npm-groovy-lint" / "lib" / "java" / "groovy" / "lib").glob("*.jar"))
    # Groovy 4 or later (QuPath 0.4.4-0.6 run 4, 0.7 runs 5): .ci/run installs npm-groovy-lint unpinned, and a
    # release shipping Groovy 5 would have skipped every test here without a word.
    return os.pathsep.join(map(str, jars)) if any(_groovy_major(j.name) >= 4 for j in jars) else None


def _groovy_major(jar: str) -> int:
    """The major version of a Groovy core jar's name (``groovy-4.0.26.jar``: 4), 0 for any other jar.

    >>> _groovy_major("groovy-4.0.26.jar"), _groovy_major("groovy-5.0.4.jar"), _groovy_major("groovy-json-4.0.26.jar")
    (4, 5, 0)
    """
    found = re.fullmatch(r"groovy-(\d+)\.[\d.]+(?:-\w+)?\.jar", jar)
    return int(found.group(1)) if found else 0


CLASSPATH = _groovy_classpath()
# The tests run their scripts in one JVM (groovy_run), and start a JVM of their own for a few: the client compiler
# alone and the serial collector start one and compile a script in about two thirds of the default's time and half
# its CPU (measured on 2 cores, Java 17).
JVM_FLAGS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


def groovy_command(script: Path, *args: str, stand_ins: bool = False) -> list[str]:
    """The command that runs ``script`` (with ``args``) on the Groovy jars, and the QuPath stand-ins where asked."""
    classpath = f"{CLASSPATH}{os.pathsep}{STAND_INS}" if stand_ins else str(CLASSPATH)
    return ["java", *JVM_FLAGS, "-cp", classpath, "groovy.ui.GroovyMain", str(script), *args]


class _GroovyJvm:
    """One JVM running tests/groovy_runner.groovy: scripts sent to it run one after another, each in a class loader
    and on a thread of its own, as QuPath runs its scripts in one JVM. Started at the first script, again after a
    script ran past its time (the JVM is killed then), stopped when the tests end."""

    def __init__(self, stand_ins: bool) -> None:
        self.stand_ins = stand_ins
        self.process: subprocess.Popen | None = None
        self.answers: queue.Queue[str | None] = queue.Queue()
        self.log: collections.deque[str] = collections.deque(maxlen=200)  # the JVM's own stderr, for a crash

    def _start(self) -> subprocess.Popen:
        process = subprocess.Popen(
            groovy_command(RUNNER, stand_ins=self.stand_ins),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        )  # fmt: skip
        self.answers = queue.Queue()
        answers, log = self.answers, self.log
        threading.Thread(target=lambda: [*map(answers.put, process.stdout), answers.put(None)], daemon=True).start()
        threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
        return process

    def run(self, script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        self.process.stdin.write(json.dumps({"script": str(script), "args": list(args)}) + "\n")
        self.process.stdin.flush()
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise subprocess.TimeoutExpired(str(script), timeout) from None
        if line is None:
            raise RuntimeError(f"the Groovy runner's JVM died running {script}:\n" + "".join(self.log))
        answer = json.loads(line)
        return subprocess.CompletedProcess(str(script), answer["rc"], answer["stdout"], answer["stderr"])

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


_JVMS = {stand_ins: _GroovyJvm(stand_ins) for stand_ins in (False, True)}
atexit.register(lambda: [jvm.stop() for jvm in _JVMS.values()])


def groovy_run(script: Path, *args: str, stand_ins: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """``script`` run with ``args`` as ``groovy_command`` runs it (exit code 1 and the stack trace on stderr where it
    throws), in the tests' one JVM (with the stand-ins or without) instead of a JVM of its own."""
    return _JVMS[stand_ins].run(script, *args, timeout=timeout)


needs_groovy = pytest.mark.skipif(
    CLASSPATH is None,
    reason="set PDL1_GROOVY_LINT to npm-groovy-lint's path (its Groovy 4 or later jars run these) and have java",
)


def helpers(script: Path = ANALYZE) -> str:
    text = script.read_text()
    start, end = text.index(BEGIN), text.index(END)
    return text[start:end]


def run_groovy(tmp_path: Path, driver: str, script: Path = ANALYZE) -> list:
    """A script's helpers, then ``driver`` (which prints one JSON line per result); the parsed lines."""
    path = tmp_path / "driver.groovy"
    path.write_text("import groovy.json.JsonOutput\n" + helpers(script) + "\n" + driver)
    out = groovy_run(path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith(("{", "["))]


def read_with_groovy(tmp_path: Path, files: list[Path]) -> list[dict]:
    listed = ", ".join(json.dumps(str(f)) for f in files)
    driver = f"""
for (name in [{listed}]) {{
    try {{
        println JsonOutput.toJson([ok: readPdl1Config(new File(name))])
    }} catch (IllegalArgumentException e) {{
        println JsonOutput.toJson([error: e.getMessage()])
    }}
}}
"""
    return run_groovy(tmp_path, driver)


def flat(data: dict) -> dict:
    return {f"{table}.{key}": value for table, keys in data.items() for key, value in keys.items()}


def test_the_helpers_use_no_qupath_class_and_the_script_imports_none_missing_on_0_4_4():
    part = helpers()
    assert "qupath." not in part
    script = ANALYZE.read_text()
    imports = set(re.findall(r"^import (\S+)", script, flags=re.M))
    # TiledTransformingImageServer (0.6+) would fail the whole script at compile time on 0.4.4.
    assert imports <= {
        "qupath.lib.common.GeneralTools",
        "qupath.lib.io.GsonTools",
        "qupath.lib.io.PathIO",
        "qupath.lib.objects.PathObject",
        "qupath.lib.objects.PathObjectTools",  # updatePlaneRecursive: PathObjectTools.java v0.4.4:396, v0.7.0:469
        "qupath.lib.regions.RegionRequest",  # RegionRequest.java v0.4.4:175, v0.7.0:174
        "java.net.URI",
        "java.net.http.HttpClient",
        "java.net.http.HttpRequest",
        "java.net.http.HttpResponse",
        "java.nio.file.Files",
        "java.nio.file.StandardCopyOption",
        "java.time.Duration",
    }, imports
    assert "instanceof TransformingImageServer" not in script


def test_the_groovy_reader_knows_the_keys_python_knows():
    keys = set(re.findall(r'"(\w+\.\w+)": "(?:a string|a number|an array of strings)"', helpers()))
    assert keys == {f"{t}.{k}" for t, ks in SCHEMA.items() for k in ks}


def test_the_sizes_the_script_says_the_service_analyses_with_are_the_pipelines():
    # pdl1-config.toml's uncertainty_tile_um and min_region_area_um2 are pdl1 run's; the service (pdl1 serve has no
    # option for them) uses PipelineConfig's, which the script names when the file sets others.
    from inference.pipeline import PipelineConfig

    sizes = dict(re.findall(r'"analysis\.(\w+)": \[([\d.]+)d, "', helpers()))
    pipeline = PipelineConfig()
    assert {k: float(v) for k, v in sizes.items()} == {
        "uncertainty_tile_um": pipeline.uncertainty_tile_um,
        "min_region_area_um2": pipeline.min_region_area_um2,
    }


@needs_groovy
def test_a_model_pdl1_config_names_is_said_how_pdl1_serve_would_run_it(tmp_path):
    # "start it with --models for others" read as giving the model folder itself, which pdl1 serve refuses
    # ("it is a model folder itself"): --models takes the folder holding seg/, nuclei/ and nuclei-ihc/.
    from inference.models.manifest import DEMO_MODEL_KINDS

    driver = """
println JsonOutput.toJson(runOnlyNotes(["models.segmentation": "my-seg", "models.nuclei": "my-nuclei",
        "models.ihc_nuclei": "my-ihc"]))
"""
    (notes,) = run_groovy(tmp_path, driver)
    named = (("models.segmentation", "my-seg", "seg"), ("models.nuclei", "my-nuclei", "nuclei"))
    named += (("models.ihc_nuclei", "my-ihc", "nuclei-ihc"),)
    assert tuple(folder for _, _, folder in named) == DEMO_MODEL_KINDS  # the folders pdl1 serve --models reads
    assert notes == [
        f"pdl1: pdl1-config.toml's {key} ({model}) is `pdl1 run`'s; this analysis runs the models `pdl1 serve` "
        f"loaded: to run it, start pdl1 serve with --models DIR, DIR holding it as {folder}/ (DIR holds seg/, "
        "nuclei/ and nuclei-ihc/ model folders, as the shipped demo's)"
        for key, model, folder in named
    ]


def test_the_scripts_name_the_pdl1_train_subcommand_they_mean():
    # `pdl1 train --from-review`, as the scripts told a QuPath user, is refused: pdl1 train needs seg or nuclei.
    # Their code comments (after //) speak to developers; the header comment and the messages to users.
    said = [
        (script.name, line.strip())
        for script in sorted(SCRIPTS.glob("*.groovy"))
        for line in script.read_text(encoding="utf-8").splitlines()
        if re.search(r"pdl1 train (?!seg\b|nuclei\b|report\b)", re.split(r"(?:^|\s)//", line)[0])
    ]
    assert said == []


@needs_groovy
def test_what_went_wrong_is_said_without_null(tmp_path):
    # Java's HttpClient throws a ConnectException without a message where nothing listens: "no service at ... (null)".
    driver = """
def refused = new java.net.ConnectException()
refused.initCause(new java.nio.channels.ClosedChannelException())
println JsonOutput.toJson([whyFailed(refused), whyFailed(new IOException("pdl1 service answered 409: busy")),
        whyFailed(new IOException(new java.net.ConnectException("Connection refused")))])
"""
    (said,) = run_groovy(tmp_path, driver)
    assert said == [
        "ConnectException, ClosedChannelException",
        "pdl1 service answered 409: busy",
        "java.net.ConnectException: Connection refused",
    ]


@needs_groovy
def test_the_groovy_reader_reads_what_tomllib_reads(tmp_path):
    rich = tmp_path / "rich.toml"
    rich.write_text(
        "# a comment\n"
        "[service]\n"
        "url = 'http://10.0.0.2:8765/#x'   # literal string with a hash\n"
        'token = "t\\"ok\\\\en\\u00e9"\n'
        "[analysis]\n"
        "outputs = [\n"
        '    "regions",  # the positive regions\n'
        '    "nuclei",\n'
        "]\n"
        'target_classes = ["Tumor", "Stroma [core]"]\n'
        "target_names=[]\n"
        "uncertainty_tile_um = 32\n"
        "min_region_area_um2 = 1_000.5\n"
    )
    (template, rich_read) = read_with_groovy(tmp_path, [PDL1_TEMPLATE / "config.toml", rich])
    assert template == {"ok": flat(tomllib.loads((PDL1_TEMPLATE / "config.toml").read_text()))}
    assert rich_read == {"ok": flat(tomllib.loads(rich.read_text()))}
    read_project_config(rich)  # and bridge reads it too


@needs_groovy
def test_the_groovy_reader_reads_a_config_saved_with_a_byte_order_mark(tmp_path):
    """Windows Notepad saves UTF-8 with a BOM: bridge reads it, and so must the script."""
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + b'[service]\nurl = "http://x"\n')
    (read,) = read_with_groovy(tmp_path, [bom])
    assert read == {"ok": flat(tomllib.loads('[service]\nurl = "http://x"\n'))}
    read_project_config(bom)


BAD = {
    "not_toml.toml": ('[service]\nurl = "http://x"\n\n[analysis]\ndevice = auto\n', 5),
    "open_array.toml": ('[analysis]\noutputs = ["regions",\n', 2),
    "open_string.toml": ('[service]\nurl = "http://x\n', 2),
    "unknown_table.toml": ("[service]\nurl = 'x'\n[anaylsis]\ndevice = 'cpu'\n", 3),
    "unknown_key.toml": ('[analysis]\ndevice = "cpu"\ntarget_class = ["Tumor"]\n', 3),
    "outside_table.toml": ('device = "cpu"\n', 1),
    "string_not_array.toml": ('[analysis]\noutputs = "regions"\n', 2),
    "numbers_not_strings.toml": ("[analysis]\ntarget_classes = [1, 2]\n", 2),
    "string_not_number.toml": ('[analysis]\nuncertainty_tile_um = "64"\n', 2),
    "number_not_string.toml": ("[service]\ntoken = 1234\n", 2),
    "unknown_output.toml": ('[analysis]\noutputs = ["regions", "tiles"]\n', 2),
    "empty_outputs.toml": ('[analysis]\ndevice = "cpu"\noutputs = []\n', 3),
    "twice.toml": ('[service]\nurl = "a"\nurl = "b"\n', 3),
    "array_of_tables.toml": ('[service]\nurl = "a"\n\n[[analysis]]\ndevice = "cpu"\n', 4),
    # keys named as a Groovy Map's own properties: Groovy 5 (QuPath 0.7) set those for map[key] = value
    "properties_key.toml": ('properties = "x"\n', 1),
    "metaclass_key.toml": ('[service]\nurl = "a"\nmetaClass = "x"\n', 3),
}


@needs_groovy
def test_the_groovy_reader_refuses_what_bridge_refuses_naming_file_and_line(tmp_path):
    files = []
    for name, (text, _) in BAD.items():
        (tmp_path / name).write_text(text)
        files.append(tmp_path / name)
    results = read_with_groovy(tmp_path, files)
    for path, result in zip(files, results, strict=True):
        line = BAD[path.name][1]
        with pytest.raises(ConfigError):
            read_project_config(path)
        assert "error" in result, (path.name, result)
        assert result["error"].startswith(f"{path}, line {line}: "), (path.name, result["error"])
        if path.name == "array_of_tables.toml":  # the same words as bridge's
            with pytest.raises(ConfigError) as bridge_said:
                read_project_config(path)
            assert result["error"] == str(bridge_said.value), (result["error"], str(bridge_said.value))


def test_the_config_reader_reads_its_maps_by_get_not_by_subscript():
    # Groovy 5 (QuPath 0.7; not runnable here) takes map[key] with a String key as property access: a top-level key
    # named `properties` was refused naming the map's own meta-properties, not line 1 (GROOVY-12024; properties_key.toml
    # above passes on the Groovy 4 these tests run). Keys from the file are read with get and written with put.
    part = helpers()
    reader = part[part.index("def readToml") : part.index("def runOnlyNotes")]
    assert not re.findall(r"\b(?:toml\.lines|toml\.values|lines|values)\[", reader), reader


@needs_groovy
def test_a_backslash_that_starts_no_escape_is_refused_naming_file_line_and_the_fix(tmp_path):
    # "C:\Users\me\seg" in double quotes: \U took the next 8 characters for hex digits, and the log showed only
    # Integer.parseInt's NumberFormatException (For input string: "sers\me\" under radix 16), no file, no line.
    fix = (
        "a backslash in double quotes starts an escape: write a Windows path in single quotes ('C:\\Users\\me\\seg', "
        'which keep backslashes as they are) or with forward slashes ("C:/Users/me/seg")'
    )
    cases = {
        "users.toml": (
            '"C:\\Users\\me\\seg"',
            "\\U in a string starts a Unicode escape of 8 hex digits, got \\Users\\me\\",
        ),
        "short.toml": ('"D:\\u12"', "\\u in a string starts a Unicode escape of 4 hex digits, got \\u12"),
        "surrogate.toml": ('"D:\\uD800"', "\\uD800 in a string is no Unicode character"),
        "too_large.toml": ('"D:\\UFFFFFFFF"', "\\UFFFFFFFF in a string is no Unicode character"),
        "unknown.toml": ('"C:\\models\\seg"', "unknown escape \\m in a string"),
    }
    files = []
    for name, (value, _) in cases.items():
        (tmp_path / name).write_text(f"[models]\nsegmentation = {value}\n", encoding="utf-8")
        files.append(tmp_path / name)
    results = read_with_groovy(tmp_path, files)
    for path, result in zip(files, results, strict=True):
        assert result == {"error": f"{path}, line 2: {cases[path.name][1]}; {fix}"}, result
        with pytest.raises(ConfigError):  # bridge refuses each too (tomllib: "Invalid hex value", ...)
            read_project_config(path)
    # What the fix says reads, and as the path.
    good = tmp_path / "good.toml"
    good.write_text("[models]\nsegmentation = 'C:\\Users\\me\\seg'\nnuclei = \"C:/Users/me/nuclei\"\n")
    (read,) = read_with_groovy(tmp_path, [good])
    assert read == {"ok": {"models.segmentation": "C:\\Users\\me\\seg", "models.nuclei": "C:/Users/me/nuclei"}}


@needs_groovy
def test_another_series_of_a_multi_image_file_is_told_as_pdl1_run_tells_it(tmp_path):
    # Bio-Formats' --series N (a .czi's or .vsi's other images) is in the DefaultImageServerBuilder's args, which the
    # transformed-view check did not read: the path job analysed the file's first series.
    from bridge.project import file_builder

    argses = [None, [], ["--series", "0"], ["--series", "2"], ["--dims", "XYCZT", "--series", "11"], ["--series"]]
    listed = ", ".join("null" if a is None else json.dumps(a) for a in argses)
    driver = f"""
class DefaultImageServerBuilder {{ String[] args; String[] getArgs() {{ args?.clone() }} }}  // v0.4.4:340, v0.7.0:356
// The pyramid QuPath builds on import holds the file's builder in a private field (ImageServers.java v0.7.0:190)
class PyramidGeneratingServerBuilder {{ private def builder }}
class Server {{ def builder; def getBuilder() {{ builder }} }}
for (args in [{listed}])
    println JsonOutput.toJson([otherSeries(new Server(builder: new DefaultImageServerBuilder(args: args as String[])))])
println JsonOutput.toJson([otherSeries(new Server(builder: null))])
println JsonOutput.toJson([otherSeries(new Server(builder: new PyramidGeneratingServerBuilder()))])
for (args in [["--series", "3"], ["--series", "0"]])
    println JsonOutput.toJson([otherSeries(new Server(builder: new PyramidGeneratingServerBuilder(
            builder: new DefaultImageServerBuilder(args: args as String[]))))])
"""
    said = [r[0] for r in run_groovy(tmp_path, driver)]
    assert said == [None, None, None, "2", "11", None, None, None, "3", None]
    for args, series in zip(argses, said, strict=False):  # pdl1 run refuses the same entries
        why = file_builder({"builderType": "uri", "uri": "file:/a.czi", "args": args})[1]
        assert (why is None) == (series is None), (args, why)


@needs_groovy
def test_the_review_reasons_read_as_pdl1_writes_them(tmp_path):
    # Gson reads every JSON number as a Double: the log said "(57.0, limit 100.0)", and "(null, limit null)".
    import random

    from bridge.project import review_reason_text

    rng = random.Random(0)
    numbers = [0.0, 57, 100, 57.0, 0.0932, 0.0873, 1e-5, 0.0001, 999.5, 1234.5, 12345.0, 123456, -0.5, 2.5e-7, 1e21,
               1.125, 1.135, 2.675, 0.00012345, 99.95, 9.995, 5739.2, -5739.2, 999999999.9, 999499999.0,
               123456789.0]  # fmt: skip
    numbers += [rng.uniform(1, 10) * 10.0 ** rng.randint(-7, 7) for _ in range(200)]
    reasons = [{"reason": "r", "value": v, "limit": numbers[i - 1]} for i, v in enumerate(numbers)]
    reasons += [
        {"reason": "no tumour", "value": None, "limit": None},
        {"reason": "half", "value": 0.5, "limit": None},
        {"reason": "flag", "value": True, "limit": 1},
        {"reason": "text", "value": "0.5", "limit": 1},
        {"reason": "fewer than 100 tumour cells", "value": 40, "limit": 100, "target": "C-4"},
    ]
    (tmp_path / "reasons.json").write_text(json.dumps(reasons))
    driver = f"""
for (r in new groovy.json.JsonSlurper().parse(new File("{tmp_path / "reasons.json"}")))
    println JsonOutput.toJson([reviewReasonText(r)])
"""
    said = [r[0] for r in run_groovy(tmp_path, driver)]
    assert said == [review_reason_text(r) for r in reasons]
    assert said[1:3] == ["r (57, limit 0)", "r (100, limit 57)"] and said[-5] == "no tumour"
    # Plain digits below a billion: a share of a tiny positive area read "5.74e+03".
    assert "r (5740, limit 9.99)" in said and "r (1e+09, limit -5740)" in said


@needs_groovy
def test_the_stand_in_hierarchy_removes_objects_as_qupath_does(tmp_path):
    # The pixel tests' stand-in dropped the removed objects' children; QuPath's removeObjects(objects, true) adds them
    # again under the root, not where they were (PathObjectHierarchy.java v0.4.4:483-496, v0.7.0:437-449), which
    # the scripts' rehomeOthers must undo. Both whole-script tests run on this one stand-in now. Only those with a
    # ROI: addPathObjectImpl refuses one without (v0.4.4:632-636, v0.7.0:527-531), so "f" is gone with its parent.
    driver = """
import qupath.lib.objects.PathObject
import qupath.lib.objects.hierarchy.PathObjectHierarchy

def tree = { ->
    def h = new PathObjectHierarchy()
    def n = [:]
    [["A", "annotation", null], ["B", "annotation", "A"], ["c", "detection", "B"], ["d", "detection", "A"],
     ["e", "annotation", null], ["f", "detection", "B"]].each { name, kind, parent ->
        n[name] = new PathObject(kind: kind, name: name, roi: name == "f" ? null : [name])
        (parent == null ? h.getRootObject() : n[parent]).addChildObjects([n[name]])
    }
    return [h, n]
}
def shape
shape = { PathObject o -> o.children.collectEntries { [(it.name): shape(it)] } }
for (c in [[["B"], true], [["A", "B"], true], [["A"], false]]) {
    def (h, n) = tree()
    h.removeObjects(c[0].collect { n[it] }, c[1])
    println groovy.json.JsonOutput.toJson([shape(h.getRootObject()), h.getAnnotationObjects()*.name.sort(),
                                           h.getDetectionObjects()*.name.sort()])  // QuPath's order: a HashMap's
}
"""
    out = _groovy_main(tmp_path, driver)
    assert out.returncode == 0, out.stdout + out.stderr
    said = [json.loads(line) for line in out.stdout.splitlines()]
    assert said == [
        [{"A": {"d": {}}, "e": {}, "c": {}}, ["A", "e"], ["c", "d"]],  # B's nucleus at the root, not in A; f gone
        [{"e": {}, "c": {}, "d": {}}, ["e"], ["c", "d"]],
        [{"e": {}}, ["e"], []],
    ]


EXPORT_RUN = r"""
import qupath.lib.objects.PathObject
import qupath.lib.objects.hierarchy.PathObjectHierarchy

class Project { java.nio.file.Path path; java.nio.file.Path getPath() { path } }
class Entry { String id; String getID() { id }; String getImageName() { "image.svs" } }
class Grid { List cores; List getTMACoreList() { new ArrayList(cores) } }  // a copy: DefaultTMAGrid.java v0.4.4:110-114

def setup = new groovy.json.JsonSlurper().parseText(new File(args[0]).text)
def hierarchy = new PathObjectHierarchy()
def made = [hierarchy.getRootObject()]
def big = setup.big ? "x" * setup.big : null  // one name, shared: the objects are small, their GeoJSON is not
setup.objects.each { o ->
    def obj = new PathObject(id: new UUID(0L, made.size()), kind: o.kind, name: big ?: o.name, geometry: o.geometry,
            pathClass: o.cls == null ? null : new qupath.lib.objects.StandInPathClass(o.cls))
    (o.measurements ?: [:]).each { k, v -> obj.measurements.put(k as String, v as double) }
    made[o.parent].addChildObjects([obj])
    made << obj
}
if (setup.cores) {  // a dearrayed TMA: its cores under the root, and the grid listing them
    def cores = setup.cores.collect { c ->
        new PathObject(id: UUID.fromString(c.id), kind: "tma core", name: c.name, geometry: c.geometry,
                missing: c.missing)
    }
    hierarchy.getRootObject().addChildObjects(cores)
    hierarchy.grid = new Grid(cores: cores)
}
def binding = new Binding([
    getProject: { -> new Project(path: java.nio.file.Paths.get(setup.project)) },
    getProjectEntry: { -> new Entry(id: "7") },
    getCurrentHierarchy: { -> hierarchy },
])
new GroovyShell(this.class.classLoader, binding).evaluate(new File(setup.script))
if (!setup.big) {  // what the one-String export wrote: each object through Gson, joined
    def gson = qupath.lib.io.GsonTools.getInstance()
    def objects = hierarchy.getAnnotationObjects() + (hierarchy.grid?.getTMACoreList() ?: []) +
            hierarchy.getDetectionObjects()
    println groovy.json.JsonOutput.toJson([json: objects.collect { gson.toJson(it) }])
}
"""
EXPORT = SCRIPTS / "pdl1_export_labels.groovy"
EXPORTED = [  # [kind, name, class, geometry, measurements, parent (index into the made list: 0 is the root)]
    ("annotation", "Tumour é", None, {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}, {}, 0),
    ("detection", None, "Tumor: Positive", {"type": "Point", "coordinates": [1.5, 2]}, {"µ area": 0.25}, 1),
    (
        "annotation",
        "PD-L1 positive",
        "PD-L1 positive",
        {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [1, 1]]]},
        {"PD-L1 probability mean": 0.9},
        1,
    ),
    ("detection", None, "Other", {"type": "Point", "coordinates": [1, 1]}, {}, 3),
    ("annotation", "Ignore*", "Ignore*", {"type": "Polygon", "coordinates": [[[5, 5], [6, 5], [5, 5]]]}, {}, 0),
]


def _export(tmp_path: Path, objects: list, *, big: int = 0, cores: list = ()) -> subprocess.CompletedProcess:
    keys = ("kind", "name", "cls", "geometry", "measurements", "parent")
    setup = {"script": str(EXPORT), "project": str(tmp_path / "project.qpproj"), "big": big,
             "objects": [dict(zip(keys, o, strict=True)) for o in objects], "cores": list(cores)}  # fmt: skip
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    (tmp_path / "export_run.groovy").write_text(EXPORT_RUN)
    if not big:
        return groovy_run(tmp_path / "export_run.groovy", str(tmp_path / "setup.json"), stand_ins=True)
    # In a JVM of its own with a heap smaller than the export: as a slide with a million cells in QuPath's.
    command = groovy_command(tmp_path / "export_run.groovy", str(tmp_path / "setup.json"), stand_ins=True)
    command.insert(1, "-Xmx96m")
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@needs_groovy
@pytest.mark.parametrize("objects", [EXPORTED, []], ids=["objects", "none"])
def test_the_label_export_writes_each_object_as_qupaths_gson_writes_it(tmp_path, objects):
    out = _export(tmp_path, objects)
    assert out.returncode == 0, out.stdout + out.stderr
    target = tmp_path / "pdl1" / "labels" / "7.geojson"
    assert out.stdout.splitlines()[0] == f"pdl1: exported {len(objects)} objects of image.svs to {target}"
    # Byte for byte what the one-String export wrote (UTF-8, "[", the objects one a line, "]"); no .part left.
    written = json.loads(out.stdout.splitlines()[-1])["json"]
    assert target.read_bytes() == ("[\n" + ",\n".join(written) + "\n]\n").encode("utf-8")
    assert sorted(p.name for p in target.parent.iterdir()) == ["7.geojson"]
    features = json.loads(target.read_text(encoding="utf-8"))
    # Every annotation, then every detection, wherever it lies in the hierarchy: the detections depth first, the
    # annotations in the order QuPath's getAnnotationObjects() gives (its tile cache's, spatial: the stand-in's is not
    # the hierarchy's either), which the export keeps.
    said = [(f["properties"]["objectType"], f["properties"].get("name")) for f in features]
    annotations = [(o[0], o[1]) for o in objects if o[0] == "annotation"]
    assert said[len(annotations) :] == [(o[0], o[1]) for o in objects if o[0] == "detection"]
    assert sorted(said[: len(annotations)], key=str) == sorted(annotations, key=str)


def _square_geometry(x: float, y: float, size: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]}


@needs_groovy
def test_the_export_writes_the_tma_cores_in_the_grids_order_which_pdl1_run_reads_as_its_targets(tmp_path):
    # `pdl1 run PROJECT` without QuPath (QuPath 0.7) reads its targets from this export: the annotations of the target
    # classes, else the TMA cores, by the ID pdl1_import_results.groovy finds each one by again.
    from bridge.exported_targets import annotation_targets, read_exported_entry, tma_cores

    cores = [
        {
            "id": str(uuid.UUID(int=100 + i)),
            "name": name,
            "missing": missing,
            "geometry": _square_geometry(i * 50, 0, 40),
        }
        for i, (name, missing) in enumerate([("A-1", False), ("A-2", True), ("B-1", False)])
    ]
    objects = [("annotation", "nest", "Tumor", _square_geometry(5, 5, 20), {}, 0), *EXPORTED[1:2]]
    out = _export(tmp_path, objects, cores=cores)
    assert out.returncode == 0, out.stdout + out.stderr
    features = json.loads((tmp_path / "pdl1" / "labels" / "7.geojson").read_text(encoding="utf-8"))
    assert [f["properties"]["objectType"] for f in features] == [
        "annotation",
        "tmaCore",
        "tmaCore",
        "tmaCore",
        "detection",
    ]
    exported = read_exported_entry(tmp_path, "7", "image.svs")
    assert [(c.name, c.missing, c.object_id) for c in tma_cores(exported)] == [
        (c["name"], c["missing"], c["id"]) for c in cores
    ]
    (nest,) = annotation_targets(exported, classes=("Tumor",))
    assert (nest.name, nest.object_id, nest.roi.bounds) == ("nest", str(uuid.UUID(int=1)), (5.0, 5.0, 25.0, 25.0))


@needs_groovy
def test_the_label_export_streams_an_export_larger_than_the_heap(tmp_path):
    # The whole export was one String (and its bytes): GBs for a slide with QuPath's cell detection (0.5 to 1 million
    # cells), and QuPath ran out of memory. 48 objects of 2 MB of GeoJSON each, in a 96 MB heap.
    objects = [("detection", f"cell {i}", "Other", {"type": "Point", "coordinates": [i, i]}, {}, 0) for i in range(48)]
    out = _export(tmp_path, objects, big=2 * 2**20)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    target = tmp_path / "pdl1" / "labels" / "7.geojson"
    assert target.stat().st_size > 96 * 2**20
    with target.open("rb") as f:
        assert f.read(2) == b"[\n"
        f.seek(-3, os.SEEK_END)
        assert f.read() == b"\n]\n"


@needs_groovy
def test_transformed_views_are_recognised_on_every_version(tmp_path):
    driver = """
class TransformingImageServer { }                       // QuPath 0.4.4-0.7: rotated, cropped, affine...
class TiledTransformingImageServer { }                  // QuPath 0.6+: not a TransformingImageServer
class AbstractTileableImageServer { }
class DefaultImageServerBuilder { }
class PyramidGeneratingServerBuilder { }
class SparseImageServerBuilder { }
class Server {
    List uris = [new URI("file:/slides/a.svs")]
    def builder = new DefaultImageServerBuilder()
    Collection getURIs() { uris }
    def getBuilder() { builder }
}
class OpenslideImageServer extends Server { }
class RotatedImageServer extends TransformingImageServer {
    Collection getURIs() { [new URI("file:/slides/a.svs")] }
    def getBuilder() { null }
}
class FlippedTiledServer extends TiledTransformingImageServer {
    Collection getURIs() { [new URI("file:/slides/a.svs")] }
    def getBuilder() { new DefaultImageServerBuilder() }
}
class SparseImageServer extends Server { }
def plain = new OpenslideImageServer()
def pyramid = new OpenslideImageServer(builder: new PyramidGeneratingServerBuilder())
def sparse = new SparseImageServer(uris: [new URI("file:/a.tif"), new URI("file:/b.tif")])
def oneFileSparse = new SparseImageServer(builder: new SparseImageServerBuilder())
for (server in [plain, pyramid, new RotatedImageServer(), new FlippedTiledServer(), sparse, oneFileSparse])
    println JsonOutput.toJson([transformed: transformedBy(server)])
"""
    results = [r["transformed"] for r in run_groovy(tmp_path, driver)]
    assert results[:2] == [None, None]
    assert "TransformingImageServer" in results[2]
    assert "TiledTransformingImageServer" in results[3]
    assert "2 files" in results[4]
    assert "SparseImageServerBuilder" in results[5]


# Project entries as QuPath has them, for the entry-metadata helper.
ENTRIES = """
class OldEntry {                                        // QuPath 0.4.4, 0.5: no getMetadata()
    Map stored = [:]
    Collection<String> getMetadataKeys() { Collections.unmodifiableSet(stored.keySet()) }
    String putMetadataValue(String key, String value) { stored.put(key, value) }
    String removeMetadataValue(String key) { stored.remove(key) }
}
class NewEntry {                                        // QuPath 0.6+: getMetadata() is the entry's mutable map
    Map metadata = Collections.synchronizedMap(new LinkedHashMap())  // DefaultProject.java v0.7.0:445, 611-613
    Map getMetadata() { metadata }
    String putMetadataValue(String key, String value) { throw new IllegalStateException("deprecated call used") }
    String removeMetadataValue(String key) { throw new IllegalStateException("deprecated call used") }
}
"""


@needs_groovy
@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_entry_metadata_goes_into_the_entrys_map_where_it_has_one(tmp_path, script):
    driver = """
def values = ["PD-L1 TPS %": "12.5", "PD-L1 run": "r1"]
def old = new OldEntry()
def now = new NewEntry()
println JsonOutput.toJson([how: putEntryMetadata(old, values).how, stored: old.stored])
println JsonOutput.toJson([how: putEntryMetadata(now, values).how, stored: now.metadata])
"""
    old, new = run_groovy(tmp_path, ENTRIES + driver, script)
    assert old == {"how": "putMetadataValue", "stored": {"PD-L1 TPS %": "12.5", "PD-L1 run": "r1"}}
    assert new == {"how": "getMetadata", "stored": {"PD-L1 TPS %": "12.5", "PD-L1 run": "r1"}}


@needs_groovy
@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_a_rerun_removes_the_entry_metadata_of_the_earlier_run_it_does_not_write(tmp_path, script):
    # After the stain was corrected (an IHC run, then the H&E it is), the entry kept the IHC's TPS, category and
    # stain beside the H&E's predicted TPS. A user's keys, "PD-L1 ..." ones too, and the review queue's stay.
    driver = """
for (entry in [new OldEntry(), new NewEntry()]) {
    def store = entry instanceof NewEntry ? entry.metadata : entry.stored
    store.putAll(["case": "B12", "PD-L1 TPS (pathologist)": "40", "PD-L1 review rank": "3",
                  "PD-L1 TPS %": "55.0", "PD-L1 TPS category": ">=50%", "PD-L1 stain": "H-DAB", "PD-L1 run": "r1"])
    def done = putEntryMetadata(entry, ["PD-L1 Predicted TPS % (H&E)": "12.0", "PD-L1 run": "r2"])
    println JsonOutput.toJson([removed: done.removed.sort(), kept: new TreeMap(store)])
}
"""
    for result in run_groovy(tmp_path, ENTRIES + driver, script):
        assert result == {
            "removed": ["PD-L1 TPS %", "PD-L1 TPS category", "PD-L1 stain"],
            "kept": {
                "PD-L1 Predicted TPS % (H&E)": "12.0",
                "PD-L1 TPS (pathologist)": "40",
                "PD-L1 review rank": "3",
                "PD-L1 run": "r2",
                "case": "B12",
            },
        }


@needs_groovy
def test_the_import_leaves_out_the_review_ranks_of_a_review_queue_stopped_while_renaming(tmp_path):
    # Killed between its renames, a review-queue left some summaries with its rank and others with an older one;
    # the import set both in QuPath, two entries ranked 1. Its marker now tells the script to leave them out.
    results = tmp_path / "pdl1"
    results.mkdir()
    driver = f"""
def metadata = ["PD-L1 TPS %": "12.5", "PD-L1 review rank": "1", "PD-L1 review score": "2.500", "case": "B12"]
def results = new File('{results.as_posix()}')
println JsonOutput.toJson(metadataToImport(metadata, results))
new File(results, "{UNFINISHED_FILE}").text = "{{}}"
println JsonOutput.toJson(metadataToImport(metadata, results))
"""
    whole, unfinished = run_groovy(tmp_path, driver, IMPORT)
    assert whole == {"PD-L1 TPS %": "12.5", "PD-L1 review rank": "1", "PD-L1 review score": "2.500", "case": "B12"}
    assert unfinished == {"PD-L1 TPS %": "12.5", "case": "B12"}


@needs_groovy
def test_review_keys_are_set_and_removed_without_touching_the_run_keys_of_an_analysis_in_qupath(tmp_path):
    # An entry analysed in QuPath alone has its rank in review.json: set (a null value: removed) where the entry has
    # a map (0.6+) or not (0.4.4, 0.5); the TPS pdl1_analyze.groovy set stays (putEntryMetadata would remove it).
    driver = """
for (entry in [new OldEntry(), new NewEntry()]) {
    def store = entry instanceof NewEntry ? entry.metadata : entry.stored
    store.putAll(["case": "B12", "PD-L1 TPS %": "55.0", "PD-L1 run": "r1", "PD-L1 review rank": "3",
                  "PD-L1 review score": "0.900"])
    def sidecar = new groovy.json.JsonSlurper().parseText('{"metadata": {"PD-L1 review rank": "1", ' +
            '"PD-L1 review score": null, "PD-L1 TPS %": "0.0"}}')
    def done = putReviewMetadata(entry, reviewMetadataOf(sidecar))
    println JsonOutput.toJson([how: done.how, set: done.set, removed: done.removed, kept: new TreeMap(store)])
}
for (bad in ['{"metadata": {"case": "B12"}}', '[1]', '{"metadata": "1"}']) {
    try {
        reviewMetadataOf(new groovy.json.JsonSlurper().parseText(bad))
        println JsonOutput.toJson([refused: null])
    } catch (IllegalArgumentException e) {
        println JsonOutput.toJson([refused: e.getMessage()])
    }
}
"""
    old, new, *refused = run_groovy(tmp_path, ENTRIES + driver, IMPORT)
    kept = {"case": "B12", "PD-L1 TPS %": "55.0", "PD-L1 run": "r1", RANK_KEY: "1"}
    assert old == {"how": "putMetadataValue", "set": [RANK_KEY], "removed": [SCORE_KEY], "kept": kept}
    assert new == {"how": "getMetadata", "set": [RANK_KEY], "removed": [SCORE_KEY], "kept": kept}
    expected = f'expected an object whose "metadata" holds {RANK_KEY} and {SCORE_KEY}'
    assert refused == [{"refused": expected}] * 3


def test_the_import_script_knows_the_review_queues_marker_and_keys():
    text = IMPORT.read_text()
    assert f'def REVIEW_UNFINISHED = "{UNFINISHED_FILE}"' in text
    assert f'def REVIEW_FILE = "{REVIEW_FILE}"' in text
    assert f'def REVIEW_KEYS = ["{RANK_KEY}", "{SCORE_KEY}"]' in text
    assert "putEntryMetadata(entry, values)" in text.replace(helpers(IMPORT), "")


@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_the_scripts_know_the_entry_metadata_keys_a_run_writes(script):
    (listed,) = re.findall(r"def RUN_METADATA_KEYS = \[(.*?)\]", script.read_text(), flags=re.S)
    assert tuple(re.findall(r'"([^"]+)"', listed)) == RUN_METADATA_KEYS


@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_metadata_is_written_through_the_helper_and_the_project_synced(script):
    text = script.read_text()
    body = text.replace(helpers(script), "")
    # putMetadataValue (deprecated since 0.6) only as the helper's fallback for entries without getMetadata().
    assert "putMetadataValue" not in body and "removeMetadataValue" not in body
    assert "putEntryMetadata(entry, " in body
    # QuPath 0.4.4 and 0.5 do not save the project after a headless script: the script syncs it after the metadata
    # (each sync after a helper's write: the import's of review.json too), only where there is a project.
    syncs = [m.start() for m in re.finditer(re.escape("project.syncChanges()"), body)]
    assert syncs
    writes = ("putEntryMetadata(entry, ", "putReviewMetadata(entry, ")
    for since, sync in zip([0, *syncs[:-1]], syncs, strict=True):
        assert any(body.find(call, since, sync) >= 0 for call in writes)
    assert re.search(r"project (==|!=) null", body[: syncs[0]])


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.groovy")), ids=lambda p: p.name)
def test_headers_name_qupath_0_7_and_the_usage_line_passes_save_once(script):
    header = script.read_text().split("*/")[0]
    assert "0.7" in header
    for usage in re.findall(r"QuPath script .*", header):
        assert "--save" not in usage and usage.count(" -s ") == 1, usage


@needs_groovy
@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_a_rerun_removes_the_parent_measurements_of_the_earlier_run_it_does_not_write(tmp_path, script):
    # A re-run without nuclei kept the earlier run's "PD-L1: Predicted TPS % (H&E)" beside the new results (and
    # after the stain was corrected, the H&E's predicted TPS beside the IHC's TPS). Others' measurements stay.
    driver = """
class OldList {                                         // QuPath 0.4.4, 0.5: removeMeasurements, getMeasurementNames
    Map values = new LinkedHashMap()
    // unmodifiable: DefaultMeasurementList.java v0.4.4:64-69 (0.6+: toList(), v0.7.0:66-70)
    List<String> getMeasurementNames() { Collections.unmodifiableList(new ArrayList(values.keySet())) }
    void removeMeasurements(String... names) { names.each { values.remove(it) } }
    void put(String name, double value) { values.put(name, value) }
}
class NewList extends OldList {                         // QuPath 0.6+: removeAll, getNames; the old two deprecated
    void removeAll(String... names) { names.each { values.remove(it) } }
    List<String> getNames() { List.copyOf(values.keySet()) }
    void removeMeasurements(String... names) { throw new IllegalStateException("deprecated call used") }
    List<String> getMeasurementNames() { throw new IllegalStateException("deprecated call used") }
}
for (ml in [new OldList(), new NewList()]) {
    ml.put("Area µm^2", 100d)
    ml.put("PD-L1: Predicted TPS % (H&E)", 30d)
    ml.put("PD-L1: Num Tumor: Positive", 3d)
    ml.put("PD-L1: Uncertainty flag", 1d)
    def removed = setParentMeasurements(ml, ["PD-L1: Uncertainty flag": 0d, "PD-L1: Positive area %": 5d])
    println JsonOutput.toJson([removed: removed, kept: ml.values])
}
"""
    for result in run_groovy(tmp_path, driver, script):
        assert result == {
            "removed": ["PD-L1: Predicted TPS % (H&E)", "PD-L1: Num Tumor: Positive"],
            "kept": {"Area µm^2": 100.0, "PD-L1: Uncertainty flag": 0.0, "PD-L1: Positive area %": 5.0},
        }


def test_parent_measurements_are_replaced_through_the_helper():
    for script in (ANALYZE, IMPORT):
        body = script.read_text().replace(helpers(script), "")
        assert "setParentMeasurements(parent.getMeasurementList(), " in body
        assert ".put(name" not in body  # no measurement written to the parent beside the helper
        # MeasurementList.getMeasurementNames() is @Deprecated since 0.6 (getNames() is 0.6+): only the helper calls it.
        assert "getMeasurementNames" not in body and "getNames" not in body


@needs_groovy
def test_annotations_without_an_area_are_not_sent_to_the_service(tmp_path):
    # A Points annotation of a target class (a pathologist's marked nuclei, class "Tumor") was sent as the ROI,
    # refused with a 422, and the script stopped before analysing the remaining annotations.
    driver = """
class Roi { boolean area; String name; boolean isArea() { area }; String getRoiName() { name } }
class Obj { Roi roi; String label; Roi getROI() { roi } }
def objects = [new Obj(roi: new Roi(area: true, name: "Polygon"), label: "core 1"),
               new Obj(roi: new Roi(area: false, name: "Points"), label: "marked nuclei"),
               new Obj(roi: new Roi(area: false, name: "Line"), label: "a ruler"),
               new Obj(roi: new Roi(area: true, name: "Rectangle"), label: "core 2")]
def (analysable, skipped) = splitByArea(objects)
println JsonOutput.toJson([analysable: analysable*.label, skipped: skipped*.label])
"""
    assert run_groovy(tmp_path, driver) == [
        {"analysable": ["core 1", "core 2"], "skipped": ["marked nuclei", "a ruler"]}
    ]
    body = ANALYZE.read_text().replace(helpers(), "")
    assert "splitByArea(targets)" in body
    # One target the service refuses does not stop the others: its submission failure is caught and the loop goes on.
    post = body.index("accepted = uploadWhy == null && plane == null ? submitPath(body) : null")
    assert "try {" in body[post - 80 : post] and "continue" in body[post : post + 800]


@needs_groovy
def test_the_script_chooses_its_targets_as_pdl1_run_does(tmp_path):
    # A dearrayed TMA was analysed as one region (one TPS over every core). The script's rule, and bridge's
    # (choose_targets, which pdl1 run follows without a selection): the selection, the target annotations, the TMA
    # cores not marked missing, the whole image; a name ending in * is a core marked missing.
    from bridge.targets import choose_targets, core_label
    from tests.test_targets import CHOICES

    cases = json.dumps([[selected, annotations, cores] for selected, annotations, cores, _ in CHOICES])
    driver = (
        "for (c in new groovy.json.JsonSlurper().parseText('" + cases + "')) {\n"
        '    def chosen = chooseTargets(c[0], c[1], c[2], { String it -> it.endsWith("*") })\n'
        "    println JsonOutput.toJson([chosen.source, chosen.targets, chosen.missing])\n"
        "}\n"
        'println JsonOutput.toJson([coreLabel("A-1", 0), coreLabel(null, 4), coreLabel("", 1)])\n'
    )
    *chosen, labels = run_groovy(tmp_path, driver)
    expected = [
        choose_targets(selected=s, annotations=a, cores=c, is_missing=lambda n: n.endswith("*"))
        for s, a, c, _ in CHOICES
    ]
    assert chosen == [[e.source, list(e.targets), list(e.missing)] for e in expected]
    assert chosen == [list(e) for *_, e in CHOICES]
    assert labels == [core_label("A-1", 0), core_label(None, 4), core_label("", 1)] == ["A-1", "core 5", "core 2"]


def test_the_script_offers_the_selection_the_target_annotations_and_the_tma_grid_to_the_rule():
    code = re.sub(r"//.*", "", ANALYZE.read_text().replace(helpers(), ""))
    assert "def grid = hierarchy.getTMAGrid()" in code and "grid.getTMACoreList()" in code
    assert "def coreMissing = { obj -> obj.isTMACore() && obj.isMissing() }" in code
    assert "getSelectedObjects().findAll { (it.isAnnotation() || it.isTMACore()) && !isOwn(it) }.toList()" in code
    assert "def choice = chooseTargets(selected, configured, cores, coreMissing)" in code
    assert "def targets = choice.targets" in code and "splitByArea(targets)" in code
    # A grid whose every core is missing is not analysed as one region: the script stops before the whole image.
    stop = code.index('choice.source in ["selection", "TMA cores"] && choice.targets.isEmpty()')
    assert "return" in code[stop : stop + 400] and stop < code.index("createFullImageAnnotation(")


@needs_groovy
def test_the_import_says_when_whole_image_results_go_into_an_image_with_a_tma_grid(tmp_path):
    # pdl1 run without QuPath cannot read the TMA grid (in data.qpdata): its one TPS over all cores was imported as if
    # nothing were amiss.
    driver = (
        'println JsonOutput.toJson([none: tmaGridNote(null, "tma.svs"), grid: tmaGridNote(new Object(), "tma.svs")])\n'
    )
    (said,) = run_groovy(tmp_path, driver, IMPORT)
    assert said["none"] is None
    assert said["grid"].startswith("pdl1: tma.svs has a TMA grid, but these results are of the whole image")
    assert "pdl1_analyze.groovy" in said["grid"] and "`pdl1 run` on the project with QuPath installed" in said["grid"]
    assert "run pdl1_export_labels.groovy on this image and `pdl1 run` on the project again" in said["grid"]
    code = re.sub(r"//.*", "", IMPORT.read_text().replace(helpers(IMPORT), ""))
    assert "tmaGridNote(hierarchy.getTMAGrid(), entry.getImageName())" in code


MERGE_CASES = [
    # (stain, [(counts of one analysed annotation) ...]); the metadata is what bridge.run.entry_metadata writes.
    ("H&E", [{"tumour_positive": 40, "tumour_negative": 60}, {"tumour_positive": 10, "tumour_negative": 40}]),
    ("H&E", [{"tumour_positive": 1, "tumour_negative": 399}, {"tumour_positive": 0, "tumour_negative": 0}]),  # 0.25
    ("H&E", [{"tumour_positive": 3, "tumour_negative": 7}, {"tumour_positive": 5, "tumour_negative": 20}]),  # < 100
    ("H&E", [{"tumour_positive": 0, "tumour_negative": 0}, {"tumour_positive": 0, "tumour_negative": 0}]),
    ("H&E", [{"tumour_positive": 30, "tumour_negative": 70}, {}]),  # no counts (no nuclei): the last one's
    (
        "H-DAB",
        [
            {"tumour_positive": 60, "tumour_negative": 40, "immune_positive": 90},
            {"tumour_positive": 2, "tumour_negative": 98, "immune_positive": 1},
        ],
    ),
    ("H-DAB", [{"tumour_positive": 1, "tumour_negative": 199, "immune_positive": 0}]),
    # Under 100 tumour cells each, 110 summed: no CPS category (the last one's "insufficient tumour cells" goes).
    (
        "H-DAB",
        [
            {"tumour_positive": 30, "tumour_negative": 40, "immune_positive": 5},
            {"tumour_positive": 10, "tumour_negative": 30, "immune_positive": 2},
        ],
    ),
    # 65 summed: the CPS's category is "insufficient tumour cells", as the TPS's.
    (
        "H-DAB",
        [
            {"tumour_positive": 3, "tumour_negative": 7, "immune_positive": 1},
            {"tumour_positive": 5, "tumour_negative": 50, "immune_positive": 2},
        ],
    ),
    # No tumour cell in any: no TPS or CPS number (never an empty one), the categories say why.
    (
        "H-DAB",
        [
            {"tumour_positive": 0, "tumour_negative": 0, "immune_positive": 4},
            {"tumour_positive": 0, "tumour_negative": 0, "immune_positive": 0},
        ],
    ),
    # The last one without a tumour cell (no number of its own), the sum with 150: the numbers are written.
    (
        "H-DAB",
        [
            {"tumour_positive": 60, "tumour_negative": 90, "immune_positive": 15},
            {"tumour_positive": 0, "tumour_negative": 0, "immune_positive": 0},
        ],
    ),
]


def _metadata_of(stain: str, counts: dict, run: str) -> dict:
    from bridge.run import entry_metadata
    from inference import combined_positive_score, tumour_proportion_score

    class Result:  # what entry_metadata reads of a SlideResult
        pass

    result = Result()
    result.stain, result.run_id, result.seg_model, result.nuclei_model = stain, run, None, None
    result.tps = tumour_proportion_score(counts["tumour_positive"], counts["tumour_negative"]) if counts else None
    positive, negative = counts.get("tumour_positive", 0), counts.get("tumour_negative", 0)
    immune = counts.get("immune_positive")
    result.cps = None if immune is None else combined_positive_score(positive, immune, positive + negative)
    return entry_metadata(result)


@needs_groovy
def test_the_script_merges_the_entry_metadata_of_several_annotations_as_pdl1_run_does(tmp_path):
    # It wrote each annotation's TPS over the last one's: two tumour annotations gave the second's TPS as the image's.
    from bridge.run import merge_entry_metadata

    cases = [[(_metadata_of(stain, c, f"r{i}"), c) for i, c in enumerate(parts)] for stain, parts in MERGE_CASES]
    listed = json.dumps([[{"metadata": m, "counts": c} for m, c in parts] for parts in cases])
    driver = f"""
def cases = new groovy.json.JsonSlurper().parseText('''{listed}''')
for (parts in cases)
    println JsonOutput.toJson([merged: mergeEntryMetadata(parts)])
"""
    merged = [row["merged"] for row in run_groovy(tmp_path, driver)]
    assert merged == [merge_entry_metadata(parts) for parts in cases]
    assert merged[0]["PD-L1 Predicted TPS % (H&E)"] == "33.3" and merged[1]["PD-L1 Predicted TPS % (H&E)"] == "0.2"
    assert merged[5]["PD-L1 TPS %"] == "31.0" and merged[5]["PD-L1 CPS"] == "76.5"
    assert "PD-L1 CPS category" not in merged[5] and "PD-L1 CPS category" not in merged[7]
    assert merged[8]["PD-L1 CPS category"] == merged[8]["PD-L1 TPS category"] == "insufficient tumour cells"
    # 0 tumour cells wrote the numbers as empty text (a blank in QuPath's Project > metadata reads as a fault).
    assert all(value for m in merged for value in m.values())
    assert "PD-L1 Predicted TPS % (H&E)" not in merged[3] and merged[3]["PD-L1 Predicted TPS category (H&E)"]
    assert "PD-L1 TPS %" not in merged[9] and "PD-L1 CPS" not in merged[9]
    assert merged[9]["PD-L1 TPS category"] == merged[9]["PD-L1 CPS category"] == "insufficient tumour cells"
    assert (merged[10]["PD-L1 TPS %"], merged[10]["PD-L1 CPS"]) == ("40.0", "50.0")
    assert "PD-L1 CPS category" not in merged[10]


@needs_groovy
def test_a_rerun_with_tumour_cells_writes_the_scores_a_run_without_them_left_out_as_pdl1_run_does(tmp_path):
    # An image analysed with enough tumour cells, then with none, then with enough again: the script and pdl1 run
    # (bridge.run's set_entry_metadata) leave the same keys, on either QuPath's entry, and the numbers come back.
    from bridge.run import merge_entry_metadata, set_entry_metadata

    runs = [
        {"tumour_positive": 60, "tumour_negative": 90, "immune_positive": 15},
        {"tumour_positive": 0, "tumour_negative": 0, "immune_positive": 2},
        {"tumour_positive": 30, "tumour_negative": 120, "immune_positive": 0},
    ]
    parts = [[(_metadata_of("H-DAB", c, f"r{i}"), c)] for i, c in enumerate(runs)]
    listed = json.dumps([[{"metadata": m, "counts": c} for m, c in run] for run in parts])
    driver = (
        "for (entry in [new OldEntry(), new NewEntry()]) {\n"
        "    def store = entry instanceof NewEntry ? entry.metadata : entry.stored\n"
        '    store.put("case", "B12")\n'
        f"    for (run in new groovy.json.JsonSlurper().parseText('{listed}')) {{\n"
        "        putEntryMetadata(entry, mergeEntryMetadata(run))\n"
        "        println JsonOutput.toJson(new TreeMap(store))\n"
        "    }\n"
        "}\n"
    )
    written = run_groovy(tmp_path, ENTRIES + driver)
    expected = []
    metadata = {"case": "B12"}
    for run in parts:
        set_entry_metadata(metadata, merge_entry_metadata(run))
        expected.append(dict(sorted(metadata.items())))
    assert written == expected + expected  # QuPath 0.4.4/0.5's entry, then 0.6+'s
    enough, none, again = expected
    assert "PD-L1 TPS %" not in none and "PD-L1 CPS" not in none
    assert none["PD-L1 TPS category"] == none["PD-L1 CPS category"] == "insufficient tumour cells"
    assert (enough["PD-L1 TPS %"], again["PD-L1 TPS %"], again["PD-L1 TPS category"]) == ("40.0", "20.0", "1-49%")
    assert "PD-L1 CPS category" not in again and "PD-L1 CPS" in again


@needs_groovy
def test_the_script_counts_the_cells_of_a_target_nested_in_another_once_as_pdl1_run_does(tmp_path):
    # helper-156: a hotspot analysed inside an analysed tissue outline had its cells counted twice in the image's
    # TPS (49.1 % over the outline, written 44.3 %). Which targets lie within another (a stand-in of JTS's geometry
    # for boxes), and the merge leaving them out, as bridge's nested_targets and merge_entry_metadata.
    from shapely.geometry import box

    from bridge.run import merge_entry_metadata
    from bridge.targets import nested_targets

    boxes = [(0, 0, 2048, 2048), (512, 512, 1024, 1024), (2000, 2000, 2049, 2048.3), (0, 0, 2048, 2048), None]
    counts = [
        {"tumour_positive": 1401, "tumour_negative": 1454, "immune_positive": 105},
        {"tumour_positive": 123, "tumour_negative": 461, "immune_positive": 20},
        {"tumour_positive": 1, "tumour_negative": 1, "immune_positive": 0},
        {"tumour_positive": 1401, "tumour_negative": 1454, "immune_positive": 105},
        {"tumour_positive": 7, "tumour_negative": 3, "immune_positive": 0},
    ]
    parts = [(_metadata_of("H-DAB", c, f"r{i}"), c) for i, c in enumerate(counts)]
    listed = json.dumps([{"metadata": m, "counts": c} for m, c in parts])
    driver = (
        "class Box {\n"
        "    double x0, y0, x1, y1\n"
        "    boolean isEmpty() { false }\n"
        "    double getArea() { (x1 - x0) * (y1 - y0) }\n"
        "    Box buffer(double d) { new Box(x0: x0 - d, y0: y0 - d, x1: x1 + d, y1: y1 + d) }\n"
        "    boolean covers(Box o) { x0 <= o.x0 && y0 <= o.y0 && o.x1 <= x1 && o.y1 <= y1 }\n"
        "}\n"
        f"def boxes = new groovy.json.JsonSlurper().parseText('{json.dumps(boxes)}')\n"
        "def outlines = boxes.collect { it == null ? null : new Box(x0: it[0], y0: it[1], x1: it[2], y1: it[3]) }\n"
        "def nested = nestedTargets(outlines)\n"
        f"def parts = new groovy.json.JsonSlurper().parseText('{listed}')\n"
        "def flagged = [parts, nested].transpose().collect { p, n -> p + [nested: n] }\n"
        "println JsonOutput.toJson([nested: nested, merged: mergeEntryMetadata(flagged)])\n"
    )
    (groovy,) = run_groovy(tmp_path, driver)
    nested = nested_targets([None if b is None else box(*b) for b in boxes])
    assert groovy["nested"] == nested == [False, True, False, True, False]
    merged = merge_entry_metadata(parts, nested=nested)
    assert groovy["merged"] == merged
    assert merged["PD-L1 TPS %"] == "49.1"  # the outline's 1401 of 2855, the corner's 1 of 2 and the 7 of 10
    assert merge_entry_metadata(parts)["PD-L1 TPS %"] != "49.1"  # every part summed: the nested ones twice


@needs_groovy
def test_the_script_writes_a_cps_as_pdl1_does_never_rounded_up_to_a_whole_number(tmp_path):
    # helper-156: a CPS of 9.96 was written "10.0" (and 0.952 "1.0", 19.96 "20.0"), across the whole-number cut-offs
    # CPS is read at, by pdl1 and the script alike.
    import numpy as np

    from inference import cps_text

    values = [0.0, 0.952, 0.96, 1.0, 4.96, 9.949, 9.96, 19.96, 19.9996, 52.749, 99.96, 100.0]
    values += [float(np.nextafter(10.0, 0.0)), *np.random.default_rng(3).uniform(0, 100, 500).tolist()]
    driver = f"println JsonOutput.toJson({json.dumps(values)}.collect {{ cpsText(it as double) }})"
    (written,) = run_groovy(tmp_path, driver)
    assert written == [cps_text(v) for v in values]
    shown = ["0.0", "0.95", "0.96", "1.0", "4.96", "9.9", "9.96", "19.96", "19.9996", "52.7", "99.96", "100.0"]
    assert written[:12] == shown
    assert written[12] == "9.9"


@needs_groovy
def test_the_script_writes_a_tps_as_pdl1_does_never_rounded_across_a_cut_off(tmp_path):
    # helper-129: 0.96 % was written as "1.0" beside the category "<1%", and 49.96 % as "50.0" beside "1-49%".
    import numpy as np

    from inference import tps_text

    values = [0.0, 0.04, 0.95, 0.96, 0.999, 1.0, 12.34, 12.35, 49.94, 49.96, 49.9996, 50.0, 99.96, 100.0]
    values.append(float(np.nextafter(1.0, 0.0)))
    driver = f"println JsonOutput.toJson({json.dumps(values)}.collect {{ tpsText(it as double) }})"
    (written,) = run_groovy(tmp_path, driver)
    assert written == [tps_text(v) for v in values]
    assert written[3] == "0.96" and written[9] == "49.96" and written[-1] == "0.9"


@needs_groovy
def test_the_log_names_each_targets_own_score(tmp_path):
    # With the cores of a TMA each analysed on its own, the log said only how many objects went under each core.
    he = _metadata_of("H&E", {"tumour_positive": 30, "tumour_negative": 70}, "r1")
    ihc = _metadata_of("H-DAB", {"tumour_positive": 2, "tumour_negative": 38, "immune_positive": 4}, "r2")
    assert ihc["PD-L1 CPS"] == "15.0"  # (2 + 4) / 40 cells
    none = _metadata_of("H&E", {}, "r3")  # no nuclei: no TPS
    empty = _metadata_of("H-DAB", {"tumour_positive": 0, "tumour_negative": 0, "immune_positive": 0}, "r4")
    listed = json.dumps([he, ihc, none, empty])
    driver = (
        "for (m in new groovy.json.JsonSlurper().parseText('" + listed + "'))\n"
        "    println JsonOutput.toJson([targetScore(m)])\n"
    )
    assert run_groovy(tmp_path, driver) == [
        [", predicted TPS (H&E) 30.0% (1-49%)"],
        [", TPS 5.0% (insufficient tumour cells), CPS 15.0 (insufficient tumour cells)"],  # the CPS's 40 cells too
        [""],
        # No tumour cell: the log said nothing of the score; its category is said.
        [", TPS n/a (insufficient tumour cells)"],
    ]
    assert "${targetScore(pdl1.get('metadata'))}" in ANALYZE.read_text()


@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_earlier_results_are_removed_through_the_hierarchy_not_qps_deprecated_call(script):
    # QP.removeObjects(Collection, boolean) is @Deprecated(since="0.6.0") (QP.java in v0.6.0 and v0.7.0); its
    # one-argument replacement is 0.6+. PathObjectHierarchy.removeObjects(Collection, boolean) is what QP's
    # called, undeprecated from 0.4.4 to 0.7: the scripts call that, keeping children (others' objects stay).
    body = script.read_text().replace(helpers(script), "")
    code = re.sub(r"//.*", "", body)
    assert "hierarchy.removeObjects(old, true)" in code
    assert not re.search(r"(?<![.\w])removeObjects\(", code)


@needs_groovy
def test_the_setup_script_puts_the_classes_in_qupaths_window_too(tmp_path):
    # QuPath's window keeps its own class list (QuPathGUI.getAvailablePathClasses(), 0.4.4 to 0.7), read from the
    # project only when the project opens and written over the project's list when it changes: classes set on the
    # project alone were missing from the Annotations tab, and the next class added there dropped them again.
    driver = """
class Window { List classes = ["None", "Tumor", "Other"]; List getAvailablePathClasses() { classes } }
def window = new Window()
def later = []
def shown = showInWindow(window, ["Tumor", "Other", "PD-L1 positive", "Training region"], { Runnable r -> later << r })
println JsonOutput.toJson([shown: shown, before: window.classes.clone()])
later.each { it.run() }                                 // the JavaFX thread's turn
println JsonOutput.toJson([after: window.classes])
println JsonOutput.toJson([headless: showInWindow(null, ["PD-L1 positive"], { Runnable r -> r.run() })])
"""
    first, after, headless = run_groovy(tmp_path, driver, SETUP)
    assert first == {"shown": True, "before": ["None", "Tumor", "Other"]}  # nothing off the JavaFX thread
    assert after == {"after": ["None", "Tumor", "Other", "PD-L1 positive", "Training region"]}
    assert headless == {"headless": False}
    body = SETUP.read_text().replace(helpers(SETUP), "")
    assert "qupath." not in helpers(SETUP)
    assert body.index("project.setPathClasses(classes)") < body.index("showInWindow(getQuPath(), classes, ")
    assert "javafx.application.Platform.runLater(r)" in body


@needs_groovy
@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_a_rerun_finds_its_objects_that_resolve_hierarchy_moved_under_its_regions(tmp_path, script):
    # QuPath's Resolve hierarchy moves nuclei and tiles under the regions (or your annotations) they lie in; the
    # re-run removed only the parent's own children, keeping theirs, so the earlier run's nuclei came back beside the
    # new ones. Not under another analysed annotation (it carries "PD-L1: Uncertainty flag"): those are its results.
    driver = """
class Ml { Map m = [:]; double get(String k) { m.containsKey(k) ? m[k] : Double.NaN } }
class Node { String name; boolean own; boolean annotation = true; Ml ml = new Ml(); List kids = []; Node up
    Object[] getChildObjectsAsArray() { kids.toArray() }; Ml getMeasurementList() { ml }; Node getParent() { up }
    boolean isAnnotation() { annotation }; boolean isTMACore() { false } }
def n = { String name, boolean own, List kids = [] ->
    def node = new Node(name: name, own: own, kids: kids, annotation: !(name =~ /nucleus|tile/))
    kids.each { it.up = node }
    return node
}
def inner = n("inner tumour annotation", false, [n("its nucleus", true)])
inner.ml.m["PD-L1: Uncertainty flag"] = 0.0d
def parent = n("parent", false, [
    n("region", true, [n("nucleus 2", true), n("tile 2", true), n("your note", false, [n("nucleus 5", true)])]),
    n("nucleus 1", true),
    n("your other note", false, [n("nucleus 6", true)]),
    inner,
])
n("root", false, [parent])  // nothing of ours beside the parent: what lies under it is all
println JsonOutput.toJson([found: ownDescendants(parent, { it.own }).collect { it.name }.sort()])
"""
    (found,) = run_groovy(tmp_path, driver, script)
    assert found == {"found": ["nucleus 1", "nucleus 2", "nucleus 5", "nucleus 6", "region", "tile 2"]}
    assert "ownDescendants(parent, isOwn)" in script.read_text()


def test_bridge_finds_the_same_objects_of_its_earlier_run_as_the_scripts(monkeypatch):
    # bridge.qupath._own_descendants (pdl1 run through paquo) is the Python side of the scripts' ownDescendants, and
    # was tested only against a real QuPath (skipped without one): the same tree as the test above, in Java's calls.
    from types import SimpleNamespace

    from bridge import qupath
    from bridge.objects import ANALYSED_SIGNATURE, TILE_NAME

    class Obj:  # what _own_descendants calls of a Java PathObject
        def __init__(self, name, kind, cls=None, measurements=(), kids=()):
            self.label, self.kind, self.names, self.kids = name, kind, list(measurements), list(kids)
            self.cls = None if cls is None else SimpleNamespace(toString=lambda: cls)  # a Java PathClass
            self.up = None
            for kid in self.kids:
                kid.up = self

        def getParent(self):  # noqa: N802
            return self.up

        def getChildObjectsAsArray(self):  # noqa: N802
            return self.kids

        def getPathClass(self):  # noqa: N802
            return self.cls

        def getName(self):  # noqa: N802
            return TILE_NAME if self.kind == "tile" else None

        def isTile(self):  # noqa: N802
            return self.kind == "tile"

        def isAnnotation(self):  # noqa: N802
            return self.kind == "annotation"

        def isTMACore(self):  # noqa: N802
            return False

    def nucleus(name):
        return Obj(name, "detection", "Tumor: Positive", ["PD-L1 positive probability"])

    def yours(name, kids):
        return Obj(name, "annotation", "Tumor", ["Area µm^2"], kids)

    region = Obj(
        "region",
        "annotation",
        "PD-L1 positive",
        ["PD-L1 probability mean"],
        [nucleus("nucleus 2"), Obj("tile 2", "tile"), yours("your note", [nucleus("nucleus 5")])],
    )
    inner = Obj("inner tumour annotation", "annotation", "Tumor", [ANALYSED_SIGNATURE], [nucleus("its nucleus")])
    parent = yours("parent", [region, nucleus("nucleus 1"), yours("your other note", [nucleus("nucleus 6")]), inner])
    Obj("root", "root", kids=[parent])  # nothing of ours beside the parent: what lies under it is all
    monkeypatch.setattr(qupath, "_paquo", lambda: {"annotation": lambda obj: SimpleNamespace(measurements=obj.names)})
    found = qupath._own_descendants(SimpleNamespace(java_object=parent))
    assert sorted(o.label for o in found) == ["nucleus 1", "nucleus 2", "nucleus 5", "nucleus 6", "region", "tile 2"]


# What Resolve hierarchy leaves around a round ROI (PathObjectHierarchy.java v0.4.4:349-385: each object in the
# smallest annotation covering it, a detection in the one holding its centroid), for the scripts and bridge alike:
# (label, kind, class, name, measurements, geometry, parent label). Ours carry the signatures of bridge/objects.py.
# Resolve hierarchy takes the annotations out, their children to the root, and inserts them again largest first
# (v0.4.4:276-277, 294-317; v0.7.0:231-232, 249-271), each taking from its new parent only the children that lie in it
# (v0.4.4:372-381, v0.7.0:327-335): an ROI takes its nuclei before its smaller regions are inserted, so a region over
# its edge, which goes beside it, takes none whose centroid lies in the ROI; a detection lies under a region beside an
# ROI only where its centroid is outside the ROI, or where an annotation larger than the ROI held it first.
def _ours(label, kind, geometry, parent, cls=None):
    from bridge.objects import OWN_ANNOTATION_SIGNATURE, OWN_DETECTION_SIGNATURE, TILE_NAME

    signature = {"annotation": OWN_ANNOTATION_SIGNATURE, "detection": OWN_DETECTION_SIGNATURE}.get(kind, "x")
    return (label, kind, cls, TILE_NAME if kind == "tile" else None, {signature: 0.5}, geometry, parent)


def _yours(label, kind, geometry, parent, cls=None):
    return (label, kind, cls, label, {"Area µm^2": 9.0}, geometry, parent)


def _analysed(label, geometry, parent):
    from bridge.objects import ANALYSED_SIGNATURE

    return (label, "annotation", "Tumor", label, {ANALYSED_SIGNATURE: 0.0, "Area µm^2": 1.0}, geometry, parent)


def _resolved_tree(nested: bool = False, neighbour: bool = False):
    """``nested``: the Tissue outline around the ROI was analysed too (its results are its own). ``neighbour``: an
    analysed ROI beside the ROI overlaps it, with a region of each over the other's edge."""
    from shapely.geometry import Point, box

    from bridge.objects import ANALYSED_SIGNATURE

    ours, yours = _ours, _yours
    roi = Point(1000, 1000).buffer(700)  # a vertex at (1700, 1000)
    beside = [
        # Overlapping the ROI's left edge (x 300 to 350); both beside each other under Tissue.
        _analysed("neighbour ROI", box(0, 700, 350, 1300), "Tissue"),
        # Its region a little over its right edge, into the ROI: 30000 px² in the neighbour, some 11000 in the ROI.
        ours("its region over our ROI", "annotation", box(200, 900, 360, 1100), "Tissue", "PD-L1 positive"),
        ours("its nucleus in that region", "detection", box(250, 990, 260, 1000), "neighbour ROI", "Other"),
        # The ROI's region a little over its edge, into the neighbour: 2000 px² in the neighbour, most in the ROI.
        ours("our region over its edge", "annotation", box(330, 1150, 500, 1250), "Tissue", "PD-L1 positive"),
    ]
    return [
        ("root", "root", None, None, {}, None, None),
        yours("Tissue", "annotation", box(0, 0, 3000, 3000), "root")
        if not nested
        else (
            "Tissue",
            "annotation",
            None,
            "Tissue",
            {ANALYSED_SIGNATURE: 0.0, "Area µm^2": 9.0},
            box(0, 0, 3000, 3000),
            "root",
        ),
        ("ROI", "annotation", "Tumor", "ROI", {ANALYSED_SIGNATURE: 0.0, "Area µm^2": 1.0}, roi, "Tissue"),
        ours("nucleus in the ROI", "detection", box(995, 995, 1005, 1005), "ROI", "Tumor: Positive"),
        ours("region in the ROI", "annotation", box(900, 900, 1100, 1100), "ROI", "PD-L1 positive"),
        ours("FN candidate in it", "annotation", box(920, 920, 990, 990), "region in the ROI", "PD-L1 FN candidate"),
        yours("yours in the candidate", "annotation", box(940, 940, 950, 950), "FN candidate in it"),
        yours("yours in the region", "annotation", box(1050, 1050, 1060, 1060), "region in the ROI", "Stroma"),
        yours("your note in the ROI", "annotation", box(700, 700, 800, 800), "ROI"),
        ours("nucleus in your note", "detection", box(750, 750, 760, 760), "your note in the ROI", "Tumor: Negative"),
        # Over the ROI's edge, so beside it under Tissue: a region (with what lies in it), a tile whose centre is out.
        ours("region over the edge", "annotation", box(1580, 700, 1800, 880), "Tissue", "PD-L1 positive"),
        # In the ROI and in that region: the ROI took it first, and keeps it.
        ours("nucleus in that region", "detection", box(1600, 800, 1610, 810), "ROI", "Other"),
        yours("yours covered by the ROI", "annotation", box(1600, 750, 1630, 780), "region over the edge"),
        yours("yours out of the ROI", "detection", box(1785, 800, 1795, 810), "region over the edge", "Other"),
        ours("tile over the edge", "tile", box(1650, 1100, 1780, 1230), "Tissue"),
        ours("tile touching the ROI", "tile", box(1700, 900, 1800, 1000), "Tissue"),  # a corner on its vertex only
        yours("your note over the edge", "annotation", box(1450, 1400, 1700, 1700), "Tissue"),
        ours("tile in that note", "tile", box(1500, 1450, 1600, 1550), "your note over the edge"),
        ours("tile far away", "tile", box(2500, 2500, 2600, 2600), "root"),
        ("other ROI", "annotation", "Tumor", "other", {ANALYSED_SIGNATURE: 1.0}, box(1400, 0, 2900, 600), "root"),
        ours("its tile over our ROI", "tile", box(1450, 450, 1600, 560), "other ROI"),
        *(beside if neighbour else []),
    ]


def _side_by_side_tree():
    """Two analysed ROIs side by side, sharing the edge x = 1000, and what Resolve hierarchy left beside them: each
    object of ours over that edge belongs to the ROI holding more of it; one held half and half by each is left."""
    from shapely.geometry import box

    ours = _ours
    return [
        ("root", "root", None, None, {}, None, None),
        _analysed("left ROI", box(0, 100, 1000, 1100), "root"),
        _analysed("right ROI", box(1000, 100, 2000, 1100), "root"),
        ours("left's nucleus", "detection", box(500, 500, 510, 510), "left ROI", "Tumor: Positive"),
        ours("right's nucleus", "detection", box(1500, 500, 1510, 510), "right ROI", "Tumor: Negative"),
        # Regions over the shared edge: 60000 px² on their own side, 2000 or 4000 px² on the other.
        ours("left's region over the edge", "annotation", box(700, 500, 1010, 700), "root", "PD-L1 positive"),
        ours("right's region over the edge", "annotation", box(980, 200, 1300, 400), "root", "PD-L1 positive"),
        ours("a nucleus in that region", "detection", box(1100, 300, 1110, 310), "right ROI", "Other"),  # kept by it
        # Tiles over both ROIs' top edge (their centres above it, in neither): 1200 px² in one, 400 or 800 in the other.
        ours("left's tile over the top", "tile", box(940, 40, 1020, 120), "root"),
        ours("a tile held half and half", "tile", box(960, 40, 1040, 120), "root"),
        ours("right's tile over the top", "tile", box(980, 40, 1060, 120), "root"),
    ]


def _hotspot_tree():
    """An analysed hotspot inside an analysed outline, sharing its right edge x = 1000, and the hotspot's region over
    that edge, which Resolve hierarchy put beside both (covered by neither): the outline holds as much of it as the
    hotspot, being around it, so it is the hotspot's still; the outline's own region beside the hotspot stays."""
    from shapely.geometry import box

    ours = _ours
    return [
        ("root", "root", None, None, {}, None, None),
        _analysed("outline", box(0, 0, 1000, 1000), "root"),
        _analysed("hotspot", box(800, 100, 1000, 300), "outline"),
        ours("hotspot's nucleus", "detection", box(900, 200, 910, 210), "hotspot", "Tumor: Positive"),
        ours("hotspot's region over both edges", "annotation", box(900, 150, 1010, 250), "root", "PD-L1 positive"),
        ours("outline's region beside it", "annotation", box(600, 400, 900, 600), "outline", "PD-L1 positive"),
    ]


def _small_neighbour_tree():
    """A small analysed ROI beside the left one, sharing its edge x = 1000, and the left's region over that edge,
    larger than it: Resolve hierarchy inserted the region first (largest first), which took the small ROI's nuclei
    and tile whose centroids lie in it (and a region of the small ROI's it covers), out of the small ROI's reach."""
    from shapely.geometry import box

    ours = _ours
    return [
        ("root", "root", None, None, {}, None, None),
        _analysed("left ROI", box(0, 100, 1000, 1100), "root"),
        _analysed("small ROI", box(1000, 500, 1100, 600), "root"),
        ours("left's nucleus", "detection", box(500, 500, 510, 510), "left ROI", "Tumor: Positive"),
        # 30000 px²: 20000 in the left ROI, 5000 in the small one.
        ours("left's region over the edge", "annotation", box(900, 450, 1050, 650), "root", "PD-L1 positive"),
        # An earlier run's tile over the left's edge (1200 px² in it, none in the small ROI), its centre in neither.
        ours("left's old tile over the edge", "tile", box(970, 600, 1046, 640), "left's region over the edge"),
        ours("small's nucleus in that region", "detection", box(1020, 540, 1030, 550), "left's region over the edge"),
        ours("small's tile in that region", "tile", box(1000, 500, 1040, 540), "left's region over the edge"),
        # 1500 px²: 1200 in the small ROI, 300 in the left; covered by the left's region, the smallest that covers it.
        ours("small's region", "annotation", box(990, 560, 1040, 590), "left's region over the edge", "PD-L1 positive"),
        ours("small's nucleus in its region", "detection", box(1010, 570, 1020, 580), "small's region", "Other"),
    ]


def _centroid_on_the_edge_tree():
    """Your detections under a region of ours over an ROI's right edge (x = 2000), inside your note larger than the
    ROI (inserted first, it took them; the ROI, not inside it, takes none of its children; the region, inside it,
    took those in the region): one centred on the ROI's edge, which QuPath counts in the ROI."""
    from shapely.geometry import box

    ours, yours = _ours, _yours
    return [
        ("root", "root", None, None, {}, None, None),
        yours("Tissue", "annotation", box(0, 0, 3000, 3000), "root"),
        _analysed("ROI", box(1000, 1000, 2000, 2000), "Tissue"),
        ours("nucleus in the ROI", "detection", box(1500, 1500, 1510, 1510), "ROI", "Tumor: Positive"),
        yours("your note across the edge", "annotation", box(1500, 200, 3000, 1800), "Tissue"),
        ours(
            "region over the edge",
            "annotation",
            box(1900, 1400, 2100, 1600),
            "your note across the edge",
            "PD-L1 positive",
        ),
        yours("yours centred in the ROI", "detection", box(1945, 1495, 1955, 1505), "region over the edge"),
        yours("yours centred on its edge", "detection", box(1995, 1495, 2005, 1505), "region over the edge"),
        yours("yours centred out of it", "detection", box(2045, 1495, 2055, 1505), "region over the edge"),
    ]


# After the re-run removed its earlier objects: what, and where everything else is (removeObjects(objects,
# keepChildren=true) puts the kept children under the root, PathObjectHierarchy.java v0.4.4:483-496, 632-636).
RERUN_REMOVES = [
    "FN candidate in it",
    "nucleus in that region",
    "nucleus in the ROI",
    "nucleus in your note",
    "region in the ROI",
    "region over the edge",
    "tile in that note",
    "tile over the edge",
]
RERUN_LEAVES = {
    "Tissue": "root",
    "ROI": "Tissue",
    "yours in the candidate": "ROI",
    "yours in the region": "ROI",
    "your note in the ROI": "ROI",
    "yours covered by the ROI": "ROI",  # back in the ROI: Resolve hierarchy would put it there without our region
    "yours out of the ROI": "Tissue",  # its centroid is outside the ROI
    "tile touching the ROI": "Tissue",  # a shared corner is no overlap
    "your note over the edge": "Tissue",
    "tile far away": "root",
    "other ROI": "root",
    "its tile over our ROI": "other ROI",  # another analysis's
}
# The same where the Tissue outline around the ROI was analysed too: what lies beside the ROI under it is that
# analysis's, which its own re-run replaces.
NESTED_RERUN_REMOVES = [
    "FN candidate in it",
    "nucleus in that region",
    "nucleus in the ROI",
    "nucleus in your note",
    "region in the ROI",
]
NESTED_RERUN_LEAVES = RERUN_LEAVES | {
    "region over the edge": "Tissue",
    "yours covered by the ROI": "region over the edge",
    "yours out of the ROI": "region over the edge",
    "tile over the edge": "Tissue",
    "tile in that note": "your note over the edge",
}


# The same where an analysed ROI beside the ROI overlaps it: its region over our ROI's edge (it holds more of it)
# stays; ours over its edge (our ROI holds more of it) goes.
NEIGHBOUR_RERUN_REMOVES = sorted([*RERUN_REMOVES, "our region over its edge"])
NEIGHBOUR_RERUN_LEAVES = RERUN_LEAVES | {
    "neighbour ROI": "Tissue",
    "its region over our ROI": "Tissue",
    "its nucleus in that region": "neighbour ROI",
}
# Re-running the left of two ROIs side by side: the right's results, over the edge too, stay, and so does a tile held
# half and half by each (never remove what may be another's).
SIDE_BY_SIDE_RERUN_REMOVES = ["left's nucleus", "left's region over the edge", "left's tile over the top"]
SIDE_BY_SIDE_RERUN_LEAVES = {
    "left ROI": "root",
    "right ROI": "root",
    "right's nucleus": "right ROI",
    "right's region over the edge": "root",
    "a nucleus in that region": "right ROI",
    "a tile held half and half": "root",
    "right's tile over the top": "root",
}
# Re-running a hotspot inside an analysed outline: its region sticking out of both is its own (compared with the
# outline around it, which holds all of it the hotspot holds, it was left on every re-run and piled up).
HOTSPOT_RERUN_REMOVES = ["hotspot's nucleus", "hotspot's region over both edges"]
HOTSPOT_RERUN_LEAVES = {"outline": "root", "hotspot": "outline", "outline's region beside it": "outline"}
# Re-running the left ROI beside a smaller analysed ROI: the left's region over the edge goes, with the left's tile in
# it; the small ROI's nuclei, tile and region in it (the small ROI holds more of each) stay, at the region's parent.
SMALL_NEIGHBOUR_RERUN_REMOVES = ["left's nucleus", "left's old tile over the edge", "left's region over the edge"]
SMALL_NEIGHBOUR_RERUN_LEAVES = {
    "left ROI": "root",
    "small ROI": "root",
    "small's nucleus in that region": "root",
    "small's tile in that region": "root",
    "small's region": "root",
    "small's nucleus in its region": "small's region",
}
# Re-running the ROI: your detections in the region over its edge go back into it where their centroids lie in it, on
# its edge too (PathObjectTileCache.java v0.4.4:298-313, RoiRelate.java v0.7.0:156-186: all but EXTERIOR).
CENTROID_ON_THE_EDGE_RERUN_REMOVES = ["nucleus in the ROI", "region over the edge"]
CENTROID_ON_THE_EDGE_RERUN_LEAVES = {
    "Tissue": "root",
    "ROI": "Tissue",
    "your note across the edge": "Tissue",
    "yours centred in the ROI": "ROI",
    "yours centred on its edge": "ROI",
    "yours centred out of it": "your note across the edge",
}


def _core(label, geometry, parent="root"):
    """A TMA core (TMACoreObject: no annotation, no detection) analysed by this tool: it carries the signature."""
    from bridge.objects import ANALYSED_SIGNATURE

    return (label, "TMA core", None, label, {ANALYSED_SIGNATURE: 0.0, "PD-L1: TPS %": 5.0}, geometry, parent)


def _tma_tree():
    """Two analysed TMA cores of a dearrayed grid, a hotspot analysed inside the first, and what Resolve hierarchy
    left: the first core's region over its edge beside it, at the root; the core's region reaching into the hotspot
    (not covered by it) stays in the core. A core's results are its own, as an analysed annotation's."""
    from shapely.geometry import Point, box

    ours = _ours
    return [
        ("root", "root", None, None, {}, None, None),
        _core("A-1", Point(1000, 1000).buffer(500)),
        _core("A-2", Point(2200, 1000).buffer(500)),
        ours("core's region", "annotation", box(1000, 900, 1300, 1100), "A-1", "PD-L1 positive"),
        ours("core's nucleus", "detection", box(1248, 998, 1252, 1002), "A-1", "Tumor: Positive"),
        ours("core's tile", "tile", box(1200, 1150, 1300, 1250), "A-1"),
        ours("core's region over its edge", "annotation", box(1400, 950, 1550, 1050), "root", "PD-L1 positive"),
        _analysed("hotspot", box(800, 800, 1100, 1200), "A-1"),
        ours("hotspot's nucleus", "detection", box(948, 998, 952, 1002), "hotspot", "Tumor: Negative"),
        ours("hotspot's region", "annotation", box(850, 850, 950, 950), "hotspot", "PD-L1 positive"),
        ours("A-2's nucleus", "detection", box(2198, 998, 2202, 1002), "A-2", "Other"),
    ]


TMA_CORE_RERUN_REMOVES = ["core's nucleus", "core's region", "core's region over its edge", "core's tile"]
TMA_CORE_RERUN_LEAVES = {
    "A-1": "root",
    "A-2": "root",
    "A-2's nucleus": "A-2",
    "hotspot": "A-1",
    "hotspot's nucleus": "hotspot",
    "hotspot's region": "hotspot",
}
# The hotspot's re-run leaves the core's results, also its region reaching into the hotspot: taken for no analysed
# parent, the core was walked into and that region, overlapping the hotspot, was removed as the hotspot's.
HOTSPOT_IN_CORE_RERUN_REMOVES = ["hotspot's nucleus", "hotspot's region"]
HOTSPOT_IN_CORE_RERUN_LEAVES = {
    "A-1": "root",
    "A-2": "root",
    "A-2's nucleus": "A-2",
    "hotspot": "A-1",
    "core's region": "A-1",
    "core's nucleus": "A-1",
    "core's tile": "A-1",
    "core's region over its edge": "root",
}


def _touching_cores_tree():
    """Two analysed TMA cores whose circles overlap a little (a dearrayer's core diameter set large), and each one's
    region over the edge between them, beside both: each belongs to the core holding more of it."""
    from shapely.geometry import Point, box

    ours = _ours
    return [
        ("root", "root", None, None, {}, None, None),
        _core("A-1", Point(1000, 1000).buffer(520)),
        _core("A-2", Point(2000, 1000).buffer(520)),
        ours("A-1's nucleus", "detection", box(998, 998, 1002, 1002), "A-1", "Tumor: Positive"),
        ours("A-1's region over the edge", "annotation", box(1300, 950, 1510, 1050), "root", "PD-L1 positive"),
        ours("A-2's region over the edge", "annotation", box(1490, 950, 1700, 1050), "root", "PD-L1 positive"),
    ]


TOUCHING_CORES_RERUN_REMOVES = ["A-1's nucleus", "A-1's region over the edge"]
TOUCHING_CORES_RERUN_LEAVES = {"A-1": "root", "A-2": "root", "A-2's region over the edge": "root"}
# case: (tree, the annotation re-run, what it removes, where everything else is after it)
RERUN_CASES = {
    "tma-core": (_tma_tree, "A-1", TMA_CORE_RERUN_REMOVES, TMA_CORE_RERUN_LEAVES),
    "hotspot-in-an-analysed-tma-core": (
        _tma_tree,
        "hotspot",
        HOTSPOT_IN_CORE_RERUN_REMOVES,
        HOTSPOT_IN_CORE_RERUN_LEAVES,
    ),
    "tma-cores-overlapping": (_touching_cores_tree, "A-1", TOUCHING_CORES_RERUN_REMOVES, TOUCHING_CORES_RERUN_LEAVES),
    "roi": (lambda: _resolved_tree(), "ROI", RERUN_REMOVES, RERUN_LEAVES),
    "roi-in-an-analysed-outline": (
        lambda: _resolved_tree(nested=True),
        "ROI",
        NESTED_RERUN_REMOVES,
        NESTED_RERUN_LEAVES,
    ),
    "roi-beside-an-analysed-roi": (
        lambda: _resolved_tree(neighbour=True),
        "ROI",
        NEIGHBOUR_RERUN_REMOVES,
        NEIGHBOUR_RERUN_LEAVES,
    ),
    "rois-side-by-side": (_side_by_side_tree, "left ROI", SIDE_BY_SIDE_RERUN_REMOVES, SIDE_BY_SIDE_RERUN_LEAVES),
    "hotspot-in-an-analysed-outline": (_hotspot_tree, "hotspot", HOTSPOT_RERUN_REMOVES, HOTSPOT_RERUN_LEAVES),
    "roi-beside-a-smaller-analysed-roi": (
        _small_neighbour_tree,
        "left ROI",
        SMALL_NEIGHBOUR_RERUN_REMOVES,
        SMALL_NEIGHBOUR_RERUN_LEAVES,
    ),
    "centroid-on-the-roi-edge": (
        _centroid_on_the_edge_tree,
        "ROI",
        CENTROID_ON_THE_EDGE_RERUN_REMOVES,
        CENTROID_ON_THE_EDGE_RERUN_LEAVES,
    ),
}


def _stand_in_tree(monkeypatch, tree):
    """``tree`` as Java path objects in a paquo stand-in entry whose hierarchy removes objects as QuPath's does;
    (nodes by label, the removed objects as they go, paquo's wrapper, the entry)."""
    nodes = {}
    for label, kind, cls, name, measurements, geometry, parent in tree:
        nodes[label] = JavaPathObject(kind, geometry, cls, name, measurements, label=label)
        if parent is not None:
            nodes[parent].addChildObjects([nodes[label]])
    removed = []

    def remove_objects(objects, keep_children):  # PathObjectHierarchy.removeObjects as v0.4.4:458-497 does it
        removed.extend(objects)
        kept = [kid for obj in objects for kid in obj.kids if kid not in objects]
        for obj in objects:
            obj.parent.kids.remove(obj)
        if keep_children:
            nodes["root"].addChildObjects(kept)

    wrapper, entry = paquo_stand_ins(monkeypatch, remove_objects)
    return nodes, removed, wrapper, entry


def _rerun_in_python(monkeypatch, tree, rerun="ROI"):
    """bridge.qupath.write_children's removal of ``rerun``'s earlier results on ``tree``, in Java's calls;
    (removed labels, {label: parent label})."""
    from bridge import qupath

    nodes, removed, wrapper, entry = _stand_in_tree(monkeypatch, tree)
    qupath.write_children(entry, wrapper(nodes[rerun]), [], {"PD-L1: x": 1.0})
    gone = {obj.label for obj in removed}
    return sorted(gone), {n.label: n.parent.label for n in nodes.values() if n.parent and n.label not in gone}


def _script_part(script: Path, start: str) -> str:
    """A script's text from the line starting ``start`` to the closing brace at the line's start."""
    text = script.read_text()
    begin = text.index("\n" + start) + 1
    return text[begin : text.index("\n}\n", begin) + 3]


@pytest.mark.parametrize("case", RERUN_CASES)
def test_a_rerun_through_bridge_replaces_what_resolve_hierarchy_moved_out_of_the_roi_and_no_other_analysis(
    monkeypatch, case
):
    # Resolve hierarchy put a tile whose centre lies outside a round ROI, and a region over its edge (with what lies
    # in it), beside the ROI: the re-run kept them beside its new ones. Taking every one of ours beside the ROI that
    # overlapped it, the re-run of one of two analysed ROIs side by side removed the other's results over the edge
    # between them. bridge.qupath.write_children, in Java's calls; the scripts must do the same (the test below).
    build, parent, removes, leaves = RERUN_CASES[case]
    assert _rerun_in_python(monkeypatch, build(), parent) == (removes, leaves)


@needs_groovy
@pytest.mark.parametrize("case", RERUN_CASES)
@pytest.mark.parametrize("script", [ANALYZE, IMPORT], ids=lambda p: p.name)
def test_a_rerun_of_the_scripts_replaces_what_resolve_hierarchy_moved_out_of_the_roi_as_bridge_does(
    tmp_path, script, case
):
    # As the test above, for the scripts: removeObjects(old, keepChildren=true) also put your objects inside the
    # regions it removed at the image's root. The script's isOwn, its settings, its helpers and the body's calls, on
    # stand-ins whose geometry is java.awt.geom.Area (JTS's calls: intersects, touches, covers, contains,
    # getCentroid, intersection, getArea; of a point, covers counts the boundary and contains does not);
    # bridge.qupath.write_children on the same trees does the same (above).
    build, parent, removes, leaves = RERUN_CASES[case]
    tree = build()
    body = script.read_text().replace(helpers(script), "")
    code = re.sub(r"//.*", "", body)
    assert re.search(  # the driver below makes these calls: the script must make them so
        r"def old = ownDescendants\(parent, isOwn\)\s*if \(!old\.isEmpty\(\)\) \{\s*"
        r"rehomeOthers\(old, parent\)\s*hierarchy\.removeObjects\(old, true\)\s*\}",
        code,
    ), "the script does not rehome others' objects before removing its earlier ones"
    settings = "\n".join(
        re.search(rf"^def {name} = .*?(?=\n(?:def |//))", script.read_text(), flags=re.M | re.S).group(0)
        for name in ("OWN_ANNOTATION_CLASSES", "OWN_DETECTION_CLASSES", "TILE_NAME")
    )
    is_own = _script_part(script, "def isOwn = { PathObject obj ->").replace("{ PathObject obj ->", "{ obj ->")
    listed = json.dumps(
        [
            {
                "label": label,
                "kind": kind,
                "cls": cls,
                "name": name,
                "ml": measurements,
                "xy": None if geometry is None else [list(p) for p in geometry.exterior.coords],
                "centroid": None if geometry is None else [geometry.centroid.x, geometry.centroid.y],
                "parent": parent,
            }
            for label, kind, cls, name, measurements, geometry, parent in tree
        ]
    )
    driver = f"""
{settings}
{is_own}
class Pt {{ double x; double y }}
class Geom {{                                           // a JTS Geometry's calls, on java.awt.geom.Area
    java.awt.geom.Area shape; Pt centre
    boolean intersects(Geom o) {{ def a = new java.awt.geom.Area(shape); a.intersect(o.shape); !a.isEmpty() }}
    boolean touches(Geom o) {{ false }}                   // an Area shared by a corner or an edge is empty above
    boolean covers(Geom o) {{ def a = new java.awt.geom.Area(o.shape); a.subtract(shape); a.isEmpty() }}
    boolean covers(Pt p) {{ shape.contains(p.x, p.y) || onBoundary(p) }}
    boolean contains(Pt p) {{ shape.contains(p.x, p.y) && !onBoundary(p) }}  // Area's insideness takes some edges
    boolean onBoundary(Pt p) {{                         // on one of the Area's outlines' segments (lines only)
        double x0 = 0, y0 = 0, px = 0, py = 0
        double[] c = new double[6]
        def on = {{ double ax, double ay, double bx, double by ->
            (bx - ax) * (p.y - ay) == (by - ay) * (p.x - ax) &&
                Math.min(ax, bx) <= p.x && p.x <= Math.max(ax, bx) && Math.min(ay, by) <= p.y && p.y <= Math.max(ay, by)
        }}
        for (def it = shape.getPathIterator(null); !it.isDone(); it.next()) {{
            int type = it.currentSegment(c)
            if (type == java.awt.geom.PathIterator.SEG_MOVETO) {{
                x0 = px = c[0]; y0 = py = c[1]
            }} else if (type == java.awt.geom.PathIterator.SEG_LINETO) {{
                if (on(px, py, c[0], c[1])) return true
                px = c[0]; py = c[1]
            }} else {{                                    // SEG_CLOSE
                if (on(px, py, x0, y0)) return true
                px = x0; py = y0
            }}
        }}
        false
    }}
    Pt getCentroid() {{ centre }}
    Geom intersection(Geom o) {{ def a = new java.awt.geom.Area(shape); a.intersect(o.shape); new Geom(shape: a) }}
    double getArea() {{                                 // the shoelace sum over the Area's outlines (lines only)
        double sum = 0, x0 = 0, y0 = 0, px = 0, py = 0
        double[] c = new double[6]
        for (def it = shape.getPathIterator(null); !it.isDone(); it.next()) {{
            int type = it.currentSegment(c)
            if (type == java.awt.geom.PathIterator.SEG_MOVETO) {{
                x0 = px = c[0]; y0 = py = c[1]
            }} else if (type == java.awt.geom.PathIterator.SEG_LINETO) {{
                sum += px * c[1] - c[0] * py; px = c[0]; py = c[1]
            }} else {{                                    // SEG_CLOSE
                sum += px * y0 - x0 * py; px = x0; py = y0
            }}
        }}
        Math.abs(sum) / 2
    }}
}}
class Roi {{ Geom geom; Geom getGeometry() {{ geom }} }}
class Ml {{ Map m = [:]; double get(String k) {{ m.containsKey(k) ? m[k] as double : Double.NaN }} }}
class Node {{                                           // a PathObject's calls (PathObject.java v0.4.4)
    String label; String kind; String cls; String name; Ml ml = new Ml(); Roi roi; Node up; List kids = []
    Node getParent() {{ up }}
    Object[] getChildObjectsAsArray() {{ kids.toArray() }}
    String getPathClass() {{ cls }}
    String getName() {{ name }}
    Ml getMeasurementList() {{ ml }}
    Roi getROI() {{ roi }}
    boolean isTile() {{ kind == "tile" }}
    boolean isAnnotation() {{ kind == "annotation" }}
    boolean isDetection() {{ kind in ["detection", "tile"] }}
    boolean isTMACore() {{ kind == "TMA core" }}
    void addChildObjects(Collection objects) {{         // takes each from its old parent first
        objects.each {{ o -> if (o.up != null) o.up.kids.removeIf {{ it.is(o) }}; o.up = this; kids << o }}
    }}
}}
def nodes = [:]
for (n in new groovy.json.JsonSlurper().parseText('''{listed}''')) {{
    def shape = null
    if (n.xy != null) {{
        def path = new java.awt.geom.Path2D.Double()
        path.moveTo(n.xy[0][0] as double, n.xy[0][1] as double)
        n.xy.drop(1).each {{ path.lineTo(it[0] as double, it[1] as double) }}
        path.closePath()
        shape = new Geom(shape: new java.awt.geom.Area(path), centre: new Pt(x: n.centroid[0], y: n.centroid[1]))
    }}
    def node = new Node(label: n.label, kind: n.kind, cls: n.cls, name: n.name, roi: new Roi(geom: shape))
    n.ml.each {{ k, v -> node.ml.m[k] = v as double }}
    nodes[n.label] = node
    if (n.parent != null)
        nodes[n.parent].addChildObjects([node])
}}
def root = nodes["root"]
def hierarchy = [removeObjects: {{ Collection objects, boolean keepChildren ->  // v0.4.4:458-497
    def kept = objects.collectMany {{ o -> o.kids.findAll {{ k -> !objects.any {{ it.is(k) }} }} }}
    objects.each {{ o -> o.up.kids.removeIf {{ it.is(o) }} }}
    if (keepChildren)
        root.addChildObjects(kept)
}}]
def parent = nodes["{parent}"]
def old = ownDescendants(parent, isOwn)
if (!old.isEmpty()) {{
    rehomeOthers(old, parent)
    hierarchy.removeObjects(old, true)
}}
def gone = old*.label as Set
def left = nodes.values().findAll {{ it.up != null && !(it.label in gone) }}
println JsonOutput.toJson([removed: gone.sort(), parents: left.collectEntries {{ [(it.label): it.up.label] }}])
"""
    (groovy,) = run_groovy(tmp_path, driver, script)
    assert groovy["removed"] == removes
    assert groovy["parents"] == leaves


def _definitions(text: str) -> dict[str, str]:
    """Each top-level ``def NAME = ...`` of a Groovy text: its lines up to the next top-level line that is not
    part of it (another def, a marker comment), trailing blank and comment lines left out."""
    found: dict[str, str] = {}
    name, lines = None, []
    for line in [*text.splitlines(), "def _end_ = null"]:
        start = re.match(r"def (\w+) =", line)
        if start or line.startswith("// ----"):
            if name is not None:
                while lines and (not lines[-1].strip() or lines[-1].startswith("//")):
                    lines.pop()
                found[name] = "\n".join(lines)
            name, lines = (start.group(1), [line]) if start else (None, [])
        elif name is not None:
            lines.append(line)
    return found


def test_definitions_both_standalone_scripts_carry_are_the_same_text():
    # Each script must stand alone in QuPath, so the settings and helpers they share are written twice; the
    # parity tests run each copy, this keeps a change made to one copy from going unnoticed in the other.
    analyze, imported = (_definitions(s.read_text().split(END)[0]) for s in (ANALYZE, IMPORT))  # settings, helpers
    shared = sorted(set(analyze) & set(imported))
    assert {"ownDescendants", "rehomeOthers", "liesIn", "OWN_DETECTION_CLASSES", "setParentMeasurements"} <= set(shared)
    different = [name for name in shared if analyze[name] != imported[name]]
    assert different == [], f"defined differently in {ANALYZE.name} and {IMPORT.name}: {', '.join(different)}"


def test_the_definition_reader_sees_a_changed_copy():
    text = helpers(IMPORT)
    changed = text.replace("def liesIn = { obj, area ->", "def liesIn = { obj, area ->\n    // changed", 1)
    assert changed != text
    assert _definitions(changed)["liesIn"] != _definitions(text)["liesIn"]
    assert _definitions(text)["liesIn"] == _definitions(helpers(ANALYZE))["liesIn"]


def _whole_image_tree():
    """A TMA analysed whole before its cores were (an earlier version, or pdl1 run without QuPath and the import
    script): its "PD-L1 analysis" annotation over the image, this tool's objects under it, your annotations among
    them, an analysed hotspot inside it, and a core into which Resolve hierarchy moved one of its nuclei."""
    from shapely.geometry import Point, box

    from bridge.objects import ANALYSED_SIGNATURE

    ours, yours, analysis = _ours, _yours, "PD-L1 analysis"
    return [
        ("root", "root", None, None, {}, None, None),
        (analysis, "annotation", analysis, analysis, {ANALYSED_SIGNATURE: 0.0}, box(0, 0, 4000, 2000), "root"),
        ours("its nucleus", "detection", box(98, 98, 102, 102), analysis, "Tumor: Positive"),
        ours("its tile", "tile", box(0, 0, 100, 100), analysis),
        ours("its region", "annotation", box(2800, 200, 3200, 400), analysis, "PD-L1 positive"),
        yours("your note in its region", "annotation", box(2900, 250, 3000, 350), "its region", "Tumor"),
        yours("your annotation", "annotation", box(2600, 1400, 3400, 1800), analysis, "Tumor"),
        ours("its nucleus in yours", "detection", box(2998, 1598, 3002, 1602), "your annotation", "Tumor: Negative"),
        _analysed("hotspot", box(3400, 200, 3800, 600), analysis),
        ours("hotspot's nucleus", "detection", box(3598, 398, 3602, 402), "hotspot", "Tumor: Positive"),
        ("A-1", "TMA core", None, "A-1", {}, Point(1000, 1000).buffer(500), "root"),
        ours("its nucleus in A-1", "detection", box(998, 998, 1002, 1002), "A-1", "Tumor: Positive"),
    ]


# What goes with the whole-image analysis, and where the rest is after it: the nucleus Resolve hierarchy moved into a
# core is that core's re-run's to replace (ownDescendants of the core), the hotspot's results the hotspot's.
WHOLE_IMAGE_REMOVES = ["PD-L1 analysis", "its nucleus", "its nucleus in yours", "its region", "its tile"]
WHOLE_IMAGE_LEAVES = {
    "your note in its region": "root",
    "your annotation": "root",
    "hotspot": "root",
    "hotspot's nucleus": "hotspot",
    "A-1": "root",
    "its nucleus in A-1": "A-1",
}


def test_analysing_a_tmas_cores_removes_its_earlier_whole_image_analysis_in_bridge(monkeypatch):
    # An analysed annotation's results are its own, so analysing the cores left the whole-image analysis of a TMA
    # (its TPS over all cores on "PD-L1 analysis", every nucleus in a core twice); the import script's notice sends
    # you to exactly that per-core analysis.
    from types import SimpleNamespace

    from bridge import qupath

    nodes, removed, _, entry = _stand_in_tree(monkeypatch, _whole_image_tree())
    entry.hierarchy.annotations = [  # paquo's proxy: getAnnotationObjects(), no TMA core among them
        SimpleNamespace(java_object=n, name=n.name, path_class=None if n.cls is None else SimpleNamespace(id=c))
        for n, c in ((n, None if n.cls is None else n.cls.toString()) for n in nodes.values())
        if n.kind == "annotation"
    ]
    assert qupath.remove_whole_image_analysis(entry) == len(WHOLE_IMAGE_REMOVES)
    assert sorted(obj.label for obj in removed) == WHOLE_IMAGE_REMOVES
    left = {n.label: n.parent.label for n in nodes.values() if n.parent is not None and n not in removed}
    assert left == WHOLE_IMAGE_LEAVES


@needs_groovy
def test_analysing_a_tmas_cores_removes_its_earlier_whole_image_analysis_in_the_script(tmp_path):
    script = ANALYZE
    code = re.sub(r"//.*", "", script.read_text().replace(helpers(script), ""))
    assert re.search(  # once, before the first core's earlier results are looked for
        r'if \(choice\.source == "TMA cores" && !wholeImageRemoved\) \{\s*'
        r"def analyses = hierarchy\.getAnnotationObjects\(\)\.findAll \{\s*"
        r"it\.getPathClass\(\) != null && it\.getPathClass\(\)\.toString\(\) == ANALYSIS_CLASS &&\s*"
        r"it\.getName\(\) == ANALYSIS_CLASS\s*\}\s*"
        r"def gone = removeWholeImageAnalysis\(analyses, isOwn, hierarchy\).*?wholeImageRemoved = true\s*\}\s*"
        r"def old = ownDescendants\(parent, isOwn\)",
        code,
        flags=re.S,
    ), "the script does not remove the whole-image analysis before writing the first core's results"
    settings = "\n".join(
        re.search(rf"^def {name} = .*?(?=\n(?:def |//))", script.read_text(), flags=re.M | re.S).group(0)
        for name in ("OWN_ANNOTATION_CLASSES", "OWN_DETECTION_CLASSES", "TILE_NAME", "ANALYSIS_CLASS")
    )
    is_own = _script_part(script, "def isOwn = { PathObject obj ->").replace("{ PathObject obj ->", "{ obj ->")
    listed = json.dumps(
        [
            {"label": label, "kind": kind, "cls": cls, "name": name, "ml": measurements, "parent": parent}
            for label, kind, cls, name, measurements, _, parent in _whole_image_tree()
        ]
    )
    driver = f"""
{settings}
{is_own}
class Ml {{ Map m = [:]; double get(String k) {{ m.containsKey(k) ? m[k] as double : Double.NaN }} }}
class Node {{                                           // a PathObject's calls (PathObject.java v0.4.4)
    String label; String kind; String cls; String name; Ml ml = new Ml(); Node up; List kids = []
    Node getParent() {{ up }}
    Object[] getChildObjectsAsArray() {{ kids.toArray() }}
    String getPathClass() {{ cls }}
    String getName() {{ name }}
    Ml getMeasurementList() {{ ml }}
    boolean isTile() {{ kind == "tile" }}
    boolean isAnnotation() {{ kind == "annotation" }}
    boolean isDetection() {{ kind in ["detection", "tile"] }}
    boolean isTMACore() {{ kind == "TMA core" }}
    void addChildObjects(Collection objects) {{         // takes each from its old parent first
        objects.each {{ o -> if (o.up != null) o.up.kids.removeIf {{ it.is(o) }}; o.up = this; kids << o }}
    }}
}}
def nodes = [:]
for (n in new groovy.json.JsonSlurper().parseText('''{listed}''')) {{
    def node = new Node(label: n.label, kind: n.kind, cls: n.cls, name: n.name)
    n.ml.each {{ k, v -> node.ml.m[k] = v as double }}
    nodes[n.label] = node
    if (n.parent != null)
        nodes[n.parent].addChildObjects([node])
}}
def root = nodes["root"]
def removed = []
def hierarchy = [removeObjects: {{ Collection objects, boolean keepChildren ->  // v0.4.4:458-497
    removed.addAll(objects)
    def kept = objects.collectMany {{ o -> o.kids.findAll {{ k -> !objects.any {{ it.is(k) }} }} }}
    objects.each {{ o -> o.up.kids.removeIf {{ it.is(o) }} }}
    if (keepChildren)
        root.addChildObjects(kept)
}}]
def analyses = nodes.values().findAll {{ it.isAnnotation() && it.cls == ANALYSIS_CLASS && it.name == ANALYSIS_CLASS }}
def gone = removeWholeImageAnalysis(analyses, isOwn, hierarchy)
def left = nodes.values().findAll {{ it.up != null && !removed.any {{ r -> r.is(it) }} }}
def parents = left.collectEntries {{ [(it.label): it.up.label] }}
println JsonOutput.toJson([gone: gone, removed: (removed*.label).sort(), parents: parents])
"""
    (groovy,) = run_groovy(tmp_path, driver, script)
    assert groovy == {"gone": len(WHOLE_IMAGE_REMOVES), "removed": WHOLE_IMAGE_REMOVES, "parents": WHOLE_IMAGE_LEAVES}


def test_the_tidy_of_records_knows_what_the_tool_wrote_by_bridges_signatures():
    # Which objects may be a deleted parent's output (pdl1_analyze.groovy's toolWritten) is what bridge.labels reads
    # as the tool's (its _tool_written_class), by the signature measurements bridge.objects writes.
    from bridge.objects import OWN_ANNOTATION_SIGNATURE, OWN_DETECTION_SIGNATURE

    part = helpers()
    assert f'def OWN_ANNOTATION_SIGNATURE = "{OWN_ANNOTATION_SIGNATURE}"' in part
    assert f'def OWN_DETECTION_SIGNATURE = "{OWN_DETECTION_SIGNATURE}"' in part


def test_the_script_sets_records_aside_where_bridge_knows_they_are_not_the_entrys():
    # bridge.analysis_record lists the records folder's own files (entry_records) and the ones set aside apart
    # (set_aside_records, which training takes where the objects hold their parent): the script's folders are those.
    from bridge.analysis_record import QUPATH_ANALYSES, SET_ASIDE

    part = helpers()
    assert f'def RECORDS_FOLDER = "{QUPATH_ANALYSES}"' in part and f'def REMOVED_FOLDER = "{SET_ASIDE}"' in part
    assert "def aside = folder.resolve(REMOVED_FOLDER)" in ANALYZE.read_text()


def _square_outline(x: float, y: float, size: float) -> list:
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


@needs_groovy
def test_a_record_is_stale_only_where_its_parent_and_every_object_it_may_have_left_are_gone(tmp_path):
    # What pdl1_analyze.groovy's tidy removes of an image's records: those of this tool whose annotation or core is
    # no longer in the image, unless an object the tool wrote lies in the record's outline under no analysed
    # annotation or core (kept when its parent was deleted keeping its descendants): removed, the record turned your
    # review of them into "not told" for training. Under an analysed annotation or core, an object is that one's.
    import uuid

    def uid(name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, name))

    own_annotation, own_detection = {"PD-L1 probability mean": 0.9}, {"PD-L1 positive probability": 0.4}
    # label, kind, QuPath ID, bounds (x, y, width, height), measurements, parent
    tree = [
        ("root", "root", None, None, {}, None),
        ("analysed", "annotation", uid("analysed"), [100, 100, 200, 200], {"PD-L1: Uncertainty flag": 0}, "root"),
        ("its nucleus", "detection", None, [150, 150, 0, 0], own_detection, "analysed"),
        ("its region", "annotation", uid("its region"), [120, 120, 50, 50], own_annotation, "analysed"),
        ("core", "TMA core", uid("core"), [400, 400, 100, 100], {"PD-L1: Uncertainty flag": 1}, "root"),
        ("its core nucleus", "detection", None, [450, 450, 0, 0], own_detection, "core"),
        ("kept nucleus", "detection", None, [1010, 1010, 0, 0], own_detection, "root"),
        ("on an edge", "detection", None, [6100, 6050, 0, 0], own_detection, "root"),
        ("yours", "annotation", uid("yours"), [2900, 2900, 300, 300], {}, "root"),
        ("in a hole", "detection", None, [3010, 3010, 0, 0], own_detection, "yours"),
        ("kept region", "annotation", uid("kept region"), [7020, 7020, 30, 30], own_annotation, "root"),
        ("a tile", "tile", None, [5000, 5000, 100, 100], {"PD-L1 probability": 0.5}, "root"),
        ("QuPath's cell", "detection", None, [5050, 5050, 0, 0], {"Nucleus: Area": 30.0}, "root"),
    ]
    outlines = {
        "analysed": {"type": "Polygon", "coordinates": [_square_outline(100, 100, 200)]},
        "core": {"type": "Polygon", "coordinates": [_square_outline(400, 400, 100)]},
        "deleted, objects kept": {"type": "Polygon", "coordinates": [_square_outline(1000, 1000, 100)]},
        "deleted": {"type": "Polygon", "coordinates": [_square_outline(5000, 5000, 100)]},
        "holed": {
            "type": "Polygon",
            "coordinates": [_square_outline(2950, 2950, 200), _square_outline(3000, 3000, 20)],
        },
        "touching": {"type": "Polygon", "coordinates": [_square_outline(6000, 6000, 100)]},
        "two parts": {
            "type": "MultiPolygon",
            "coordinates": [[_square_outline(8000, 8000, 10)], [_square_outline(7000, 7000, 40)]],
        },
        "whole image": {"type": "Polygon", "coordinates": [_square_outline(0, 0, 9000)]},
        "unreadable": {"type": "Point", "coordinates": [5, 5]},
    }
    by_name = {f"{uid(k)}.json": k for k in outlines}
    # Not records: your notes, the .part of a save cut short, an ID not as the script writes it (upper case).
    names = [*by_name, "notes.txt", f"{uid('deleted')}.json.part", f"{uid('deleted').upper()}.json"]
    listed = json.dumps([dict(zip(("label", "kind", "id", "bounds", "ml", "parent"), n, strict=True)) for n in tree])
    driver = f"""
class Ml {{ Map m = [:]; double get(String k) {{ m.containsKey(k) ? m[k] as double : Double.NaN }} }}
class Roi {{
    List b
    double getBoundsX() {{ b[0] }}
    double getBoundsY() {{ b[1] }}
    double getBoundsWidth() {{ b[2] }}
    double getBoundsHeight() {{ b[3] }}
}}
class Node {{                                           // a PathObject's calls (PathObject.java v0.4.4)
    String label; String kind; UUID id; Ml ml = new Ml(); Roi roi; List kids = []
    UUID getID() {{ id }}
    Roi getROI() {{ roi }}
    Object[] getChildObjectsAsArray() {{ kids.toArray() }}
    Ml getMeasurementList() {{ ml }}
    boolean isAnnotation() {{ kind == "annotation" }}
    boolean isDetection() {{ kind in ["detection", "tile"] }}
    boolean isTMACore() {{ kind == "TMA core" }}
}}
def nodes = [:]
for (n in new groovy.json.JsonSlurper().parseText('''{listed}''')) {{
    def node = new Node(label: n.label, kind: n.kind, id: n.id == null ? UUID.randomUUID() : UUID.fromString(n.id),
            roi: n.bounds == null ? null : new Roi(b: n.bounds))
    n.ml.each {{ k, v -> node.ml.m[k] = v as double }}
    nodes[n.label] = node
    if (n.parent != null)
        nodes[n.parent].kids << node
}}
def outlines = new groovy.json.JsonSlurper().parseText('''{json.dumps({n: outlines[k] for n, k in by_name.items()})}''')
def read = []
def outlineOf = {{ String name -> read << name; outlineShape(outlines[name]) }}
def names = new groovy.json.JsonSlurper().parseText('''{json.dumps(names)}''')
def lookup = recordsLookup(nodes["root"])
def replaced = ["{uid("whole image")}"] as Set
println JsonOutput.toJson([leftovers: lookup.leftovers, ids: lookup.ids.sort()])
println JsonOutput.toJson(staleRecords(names, lookup, replaced, outlineOf))
read.clear()
println JsonOutput.toJson(staleRecords(names, [ids: lookup.ids, leftovers: []], replaced, outlineOf) + [read: read])
"""
    looked, stale, without = run_groovy(tmp_path, driver)
    # The tool's objects under no analysed annotation or core, by their bounds; not a tile, not QuPath's cell.
    assert sorted(looked["leftovers"]) == [
        [1010, 1010, 0, 0],
        [3010, 3010, 0, 0],
        [6100, 6050, 0, 0],
        [7020, 7020, 30, 30],
    ]
    assert set(looked["ids"]) >= {uid("analysed"), uid("core"), uid("yours"), uid("its region"), uid("kept region")}
    # A nucleus in an outline's hole is outside it; one on its edge is in it, as a region in one of its polygons.
    assert sorted(by_name[n] for n in stale["gone"]) == ["deleted", "holed"]
    assert stale["replaced"] == []  # the whole-image analysis this run removed: objects it may have left are there
    kept = {by_name[n]: why for n, why in stale["kept"].items()}
    assert sorted(kept) == ["deleted, objects kept", "touching", "two parts", "unreadable", "whole image"]
    assert kept["deleted, objects kept"] == (
        "1 object this tool wrote lies in its area under no analysed annotation or TMA core (kept when its parent was "
        "deleted, or moved by Resolve hierarchy), and `pdl1 train seg|nuclei PROJECT --from-review` needs it to tell "
        "your review of it; delete it, or analyse an annotation around it, and a later run sets the record aside"
    )
    assert kept["whole image"].startswith("4 objects this tool wrote lie in its area")
    assert kept["unreadable"] == (
        "its outline does not read (its outline is no GeoJSON Polygon or MultiPolygon), so whether its objects are "
        "still in the image cannot be told"
    )
    # With none of the tool's objects outside analysed ones, every record of a parent gone is stale, and none is read.
    assert sorted(by_name[n] for n in without["gone"]) == sorted(
        ["deleted, objects kept", "deleted", "holed", "touching", "two parts", "unreadable"]
    )
    assert [by_name[n] for n in without["replaced"]] == ["whole image"]
    assert without["kept"] == {} and without["read"] == []


@needs_groovy
def test_records_set_aside_come_back_where_their_parent_is_back_and_go_where_it_was_analysed_again(tmp_path):
    # The tidy judges by QuPath's hierarchy in memory: delete an annotation, run the script, close QuPath without
    # saving, and the annotation is back with its objects. Its record, set aside, comes back into the folder unless
    # the annotation was analysed again since (its record there is the newer one: the copy set aside goes).
    import uuid

    back, again, gone, tma = (str(uuid.uuid4()) for _ in range(4))
    aside = [f"{back}.json", f"{again}.json", f"{gone}.json", f"{tma}.json", "notes.txt", f"{back.upper()}.json"]
    names = [f"{again}.json", "notes.txt"]
    ids = [back, again, tma, str(uuid.uuid4())]  # tma: a TMA core's ID, which the lookup holds as an annotation's
    driver = f"""
def slurp = {{ new groovy.json.JsonSlurper().parseText(it) }}
println JsonOutput.toJson(recordsBack(slurp('{json.dumps(aside)}'), slurp('{json.dumps(names)}'),
        slurp('{json.dumps(ids)}') as Set))
"""
    (said,) = run_groovy(tmp_path, driver)
    assert said == {"restore": sorted([f"{back}.json", f"{tma}.json"]), "superseded": [f"{again}.json"]}


@needs_groovy
def test_a_record_set_aside_comes_back_only_where_what_it_wrote_is_under_its_parent(tmp_path):
    # pdl1_import_results.groovy sets aside the record of the whole-image analysis whose output it replaces, under the
    # same annotation: that annotation is in the image whether the import was saved or not, and the tidy moved the
    # record back on the parent alone. Its output tells: a region or FN candidate by its bounds (whatever its class
    # now), a nucleus at its place with the class it wrote, as bridge.labels tells an analysis's output in the image;
    # not what the tool wrote under another analysed annotation in the parent (that analysis found the same nuclei).
    from bridge.labels import _SAME_NUCLEUS_PX, _SAME_REGION_BOUNDS_PX

    assert _SAME_NUCLEUS_PX == _SAME_REGION_BOUNDS_PX == 1.0 and "def SAME_OUTPUT_PX = 1.0d" in helpers()
    own_annotation, own_detection = {"PD-L1 probability mean": 0.9}, {"PD-L1 positive probability": 0.4}
    # label, kind, class, bounds (x, y, width, height) or a point, measurements, parent
    tree = [
        ("root", "root", None, None, {}, None),
        ("whole", "annotation", "PD-L1 analysis", [0, 0, 5000, 5000], {"PD-L1: Uncertainty flag": 0}, "root"),
        ("region", "annotation", "PD-L1 negative", [100, 200, 50, 40], own_annotation, "whole"),  # reclassified
        ("nucleus", "detection", "Tumor: Positive", [1000.4, 1000.4], own_detection, "whole"),
        ("tumour", "annotation", "Tumor", [3000, 3000, 1000, 1000], {"PD-L1: Uncertainty flag": 1}, "whole"),
        ("its nucleus", "detection", "Other", [3500, 3500], own_detection, "tumour"),
        ("QuPath's", "detection", "Other", [2000, 2000], {"Nucleus: Area": 30.0}, "whole"),
    ]

    def nuclei(*found):
        names = ["Tumor: Positive", "Other"]
        return {"class_names": names, "x": [x for (x, _), _ in found], "y": [y for (_, y), _ in found],
                "class": [names.index(c) for _, c in found]}  # fmt: skip

    ring = [[100.6, 199.5], [150.4, 199.5], [150.4, 240.3], [100.6, 240.3], [100.6, 199.5]]
    square = {"type": "Polygon", "coordinates": [ring]}  # the region's bounds, within 1 px
    records = {
        "a nucleus at its place": {"nuclei": nuclei(((4, 4), "Other"), ((1000.9, 1000.9), "Tumor: Positive"))},
        "a nucleus reclassified": {"nuclei": nuclei(((1000.4, 1000.4), "Other"))},
        "a nucleus 1.5 px away": {"nuclei": nuclei(((1001.5, 1001.5), "Tumor: Positive"))},
        "another analysis's": {"nuclei": nuclei(((3500, 3500), "Other"))},
        "QuPath's nucleus": {"nuclei": nuclei(((2000, 2000), "Other"))},
        "a region": {"region_bounds": [[900, 900, 950, 950], [100.5, 200.5, 150.5, 239.5]], "nuclei": nuclei()},
        "a region 2 px away": {"region_bounds": [[102, 200, 150, 240]]},
        "a candidate": {"candidates": [square], "region_bounds": []},
        "nothing found": {"candidates": [], "region_bounds": [], "nuclei": nuclei()},
        "no fields": {},
    }
    listed = json.dumps([dict(zip(("label", "kind", "cls", "at", "ml", "parent"), n, strict=True)) for n in tree])
    driver = f"""
class Ml {{ Map m = [:]; double get(String k) {{ m.containsKey(k) ? m[k] as double : Double.NaN }} }}
class Roi {{                                            // ROI.getBounds*, getCentroid* (ROI.java v0.4.4 to v0.7.0)
    List at
    double getBoundsX() {{ at[0] }}
    double getBoundsY() {{ at[1] }}
    double getBoundsWidth() {{ at.size() == 4 ? at[2] : 0 }}
    double getBoundsHeight() {{ at.size() == 4 ? at[3] : 0 }}
    double getCentroidX() {{ at[0] + getBoundsWidth() / 2 }}
    double getCentroidY() {{ at[1] + getBoundsHeight() / 2 }}
}}
class Cls {{ String name; String toString() {{ name }} }}
class Node {{                                           // a PathObject's calls (PathObject.java v0.4.4)
    String label; String kind; Cls cls; Ml ml = new Ml(); Roi roi; List kids = []
    Roi getROI() {{ roi }}
    Cls getPathClass() {{ cls }}
    Object[] getChildObjectsAsArray() {{ kids.toArray() }}
    Ml getMeasurementList() {{ ml }}
    boolean isAnnotation() {{ kind == "annotation" }}
    boolean isDetection() {{ kind == "detection" }}
    boolean isTMACore() {{ false }}
}}
def nodes = [:]
for (n in new groovy.json.JsonSlurper().parseText('''{listed}''')) {{
    def node = new Node(label: n.label, kind: n.kind, cls: n.cls == null ? null : new Cls(name: n.cls),
            roi: n.at == null ? null : new Roi(at: n.at))
    n.ml.each {{ k, v -> node.ml.m[k] = v as double }}
    nodes[n.label] = node
    if (n.parent != null)
        nodes[n.parent].kids << node
}}
new groovy.json.JsonSlurper().parseText('''{json.dumps(records)}''').each {{ name, record ->
    println JsonOutput.toJson([(name): recordOutputIn(record, nodes["whole"])])
}}
try {{
    recordOutputIn([nuclei: [x: [1], y: [], "class": [0], class_names: ["Other"]]], nodes["whole"])
}} catch (IllegalArgumentException e) {{
    println JsonOutput.toJson([refused: e.getMessage()])
}}
"""
    said = {k: v for line in run_groovy(tmp_path, driver) for k, v in line.items()}
    assert said == {
        "a nucleus at its place": True,
        "a nucleus reclassified": False,
        "a nucleus 1.5 px away": False,
        "another analysis's": False,
        "QuPath's nucleus": False,
        "a region": True,
        "a region 2 px away": False,
        "a candidate": True,
        "nothing found": None,
        "no fields": None,
        "refused": "nuclei arrays of different lengths",
    }


@needs_groovy
def test_records_are_moved_each_in_one_step_replacing_an_older_copy_and_one_that_cannot_move_stops_no_other(tmp_path):
    folder = tmp_path / "qupath_analyses"
    folder.mkdir()
    for name, text in {"a.json": "new a", "b.json": "b", "c.json": "c", "notes.txt": "mine"}.items():
        (folder / name).write_text(text)
    aside = folder / "removed"
    driver = f"""
def folder = java.nio.file.Paths.get('{folder}')
def aside = folder.resolve("removed")
println JsonOutput.toJson(moveRecords(folder, aside, ["a.json", "gone.json"]))
aside.resolve("a.json").toFile().text = "older a"
folder.resolve("a.json").toFile().text = "newer a"
java.nio.file.Files.createDirectories(aside.resolve("c.json").resolve("in the way"))  // a folder where c.json goes
println JsonOutput.toJson(moveRecords(folder, aside, ["a.json", "c.json", "b.json"]))
println JsonOutput.toJson(moveRecords(aside, folder, ["b.json"]))
"""
    first, second, back = run_groovy(tmp_path, driver)
    assert first == {"moved": ["a.json"], "failed": {}}  # the folder made; a name already gone is neither
    assert second["moved"] == ["a.json", "b.json"] and list(second["failed"]) == ["c.json"]
    assert second["failed"]["c.json"].startswith(f"{folder / 'c.json'} -> {aside / 'c.json'}: ")  # why, named
    assert (aside / "a.json").read_text() == "newer a"  # the copy set aside again replaces the older one
    assert back == {"moved": ["b.json"], "failed": {}}
    assert sorted(p.name for p in folder.iterdir()) == ["b.json", "c.json", "notes.txt", "removed"]
    assert sorted(p.name for p in aside.iterdir()) == ["a.json", "c.json"] and (aside / "c.json").is_dir()
    assert [p.name for p in folder.glob("*.part")] == []


@needs_groovy
@pytest.mark.parametrize("stain", ["H&E", "H-DAB"])
def test_a_run_on_selected_cores_keeps_the_entrys_score_over_every_analysed_core(tmp_path, stain):
    # Re-running one selected core of an analysed TMA wrote that core's TPS as the image's: the merge took this run's
    # targets only, while pdl1 run (and the README) give the image's score over every analysed core.
    from bridge.objects import ANALYSED_SIGNATURE
    from bridge.run import merge_entry_metadata

    immune = stain == "H-DAB"

    def counts(positive, negative, cells=None):
        out = {"tumour_positive": positive, "tumour_negative": negative}
        return {**out, "immune_positive": cells} if immune else out

    def measured(c):  # what parent_measurements wrote on an analysed core: "PD-L1: Num <class>", the signature
        ml = {ANALYSED_SIGNATURE: 0.0, "PD-L1: Num Tumor: Positive": c["tumour_positive"]}
        ml["PD-L1: Num Tumor: Negative"] = c["tumour_negative"]
        if "immune_positive" in c:
            ml["PD-L1: Num Immune cells: PD-L1 positive"] = c["immune_positive"]
        return ml

    earlier = counts(40, 60, 30)
    selected = counts(10, 40, 5)
    cores = [  # (name, missing, measurements)
        ("A-1", False, measured(earlier)),  # analysed by an earlier run
        ("A-2", True, measured(counts(100, 0, 50))),  # analysed, then marked missing: left out
        ("B-1", False, {}),  # selected: this run's
        ("B-2", False, {"Area µm^2": 5.0}),  # never analysed
    ]
    part = {"metadata": _metadata_of(stain, selected, "r2"), "counts": selected}
    listed = json.dumps([{"name": n, "missing": m, "ml": ml} for n, m, ml in cores])
    driver = f"""
class Ml {{ Map m = [:]; double get(String k) {{ m.containsKey(k) ? m[k] as double : Double.NaN }} }}
class Core {{                                           // a TMACoreObject's calls
    String name; boolean missing; Ml ml = new Ml()
    boolean isMissing() {{ missing }}
    boolean isTMACore() {{ true }}
    boolean isAnnotation() {{ false }}
    Ml getMeasurementList() {{ ml }}
}}
def cores = new groovy.json.JsonSlurper().parseText('''{listed}''').collect {{ c ->
    def core = new Core(name: c.name, missing: c.missing)
    c.ml.each {{ k, v -> core.ml.m[k] = v as double }}
    core
}}
def part = new groovy.json.JsonSlurper().parseText('''{json.dumps(part)}''')
def targets = [cores[2]]
def parts = otherCoreParts(cores, targets, part.counts.containsKey("immune_positive")) + [part]
println JsonOutput.toJson([merged: mergeEntryMetadata(parts), others: parts.size() - 1])
"""
    (groovy,) = run_groovy(tmp_path, driver)
    assert groovy["others"] == 1  # A-1 only
    expected = merge_entry_metadata([(_metadata_of(stain, earlier, "r1"), earlier), (part["metadata"], selected)])
    assert groovy["merged"] == expected
    key = "PD-L1 TPS %" if immune else "PD-L1 Predicted TPS % (H&E)"
    assert expected[key] == "33.3" and expected["PD-L1 run"] == "r2"  # 50 of 150 tumour cells, this run's id


def test_the_script_merges_the_cores_a_selection_left_out_into_the_entrys_score():
    code = re.sub(r"//.*", "", ANALYZE.read_text().replace(helpers(ANALYZE), ""))
    assert 'def otherCores = (choice.source == "selection" && targets.every { it.isTMACore() }) ? cores : []' in code
    assert "putEntryMetadata(entry, mergeEntryMetadata(otherCoreParts(otherCores, targets, immune) + parts))" in code
    assert "def parts = [metadataParts, nested].transpose().collect { part, inside -> part + [nested: inside] }" in code


def test_the_script_says_when_a_core_marked_missing_keeps_an_earlier_runs_results():
    # A core analysed and then marked missing is skipped, and kept its results silently: QuPath 0.4.4 and 0.5 still
    # export its stored PD-L1 measurements with Export TMA data, beside "Missing core: True".
    code = re.sub(r"//.*", "", ANALYZE.read_text().replace(helpers(ANALYZE), ""))
    said = re.search(r"choice\.missing\.each \{\s*println (.*?)\n\}", code, flags=re.S)
    assert said is not None and "isAnalysed(it) ?" in said.group(1) and "keeps an earlier run" in said.group(1)


def test_the_script_makes_the_whole_image_parent_only_once_the_service_answers():
    # Made before the health check, an empty "PD-L1 analysis" annotation stayed behind when no service answered.
    code = re.sub(r"//.*", "", ANALYZE.read_text().replace(helpers(), ""))
    health = code.index('client.send(request("/v1/health").GET().build()')
    assert "return" in code[health : health + 300] and health < code.index("createFullImageAnnotation(")


# ------------------------------------------------------------------- whole scripts, QuPath stood in for


def _groovy_main(tmp_path: Path, driver: str, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "main.groovy"
    path.write_text(driver)
    return groovy_run(path, *args, stand_ins=True)


@needs_groovy
def test_the_run_a_record_is_asked_after_is_the_summarys_run_id_none_or_unsaid(tmp_path):
    # A damaged or hand-edited summary.json must not make the service refuse the record's request (a 422 on
    # after_run) and lose the record: nothing is said, and the clocks order that record.
    uuid = "3f2b1c9e-4d5a-4e6f-8a7b-9c0d1e2f3a4b"
    summaries = {
        "none": None,
        "run": json.dumps({"run_id": uuid}),
        "not_a_uuid": json.dumps({"run_id": "r1"}),
        "no_run_id": json.dumps({"image": "a.svs"}),
        "an_array": json.dumps([uuid]),
        "not_json": '{"run_id": "3f2b',
    }
    for name, text in summaries.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "summary.json").write_text(text)
    names = ", ".join(json.dumps(n) for n in summaries)
    driver = f"""
def parse = {{ String text -> new groovy.json.JsonSlurper().parseText(text) }}
[{names}].each {{ name ->
    println JsonOutput.toJson([(name): runSeen(java.nio.file.Paths.get("{tmp_path}", name), parse)])
}}
"""
    said = {k: v for line in run_groovy(tmp_path, driver) for k, v in line.items()}
    assert said == {"none": "none", "run": uuid, "not_a_uuid": None, "no_run_id": None, "an_array": None,
                    "not_json": None}  # fmt: skip


@needs_groovy
def test_the_tests_one_jvm_runs_each_script_as_a_jvm_of_its_own_would(tmp_path):
    # The Groovy tests run their scripts in one JVM (groovy_run): each must see what a JVM of its own would show it,
    # whatever ran before it there: its own classes of a name another script declared, no interrupt left set, its
    # own args, its output, and exit code 1 with the stack trace where it throws.
    scripts = {
        "a": 'class Entry { String name() { "a" } }\nprintln "${new Entry().name()} ${args.toList()}"\n'
        "Thread.currentThread().interrupt()\n",
        "b": 'class Entry { String name() { "b" } }\nprintln "${new Entry().name()} ${args.toList()}"\n'
        'println "interrupted: ${Thread.currentThread().isInterrupted()}"\nSystem.err.println "to stderr"\n',
        "throws": 'println "before"\nthrow new IllegalStateException("a script that throws")\n',
    }
    for name, text in scripts.items():
        (tmp_path / f"{name}.groovy").write_text(text)
    for name, args in [("a", ["1"]), ("b", ["2", "ü"]), ("throws", []), ("b", [])]:
        alone = subprocess.run(groovy_command(tmp_path / f"{name}.groovy", *args), capture_output=True, text=True)
        shared = groovy_run(tmp_path / f"{name}.groovy", *args)
        assert (shared.returncode, shared.stdout) == (alone.returncode, alone.stdout), (shared, alone)
        assert shared.stderr.splitlines()[:1] == alone.stderr.splitlines()[:1], (shared.stderr, alone.stderr)
    assert groovy_run(tmp_path / "b.groovy").stdout == "b []\ninterrupted: false\n"
    assert groovy_run(tmp_path / "throws.groovy").returncode == 1
    assert "java.lang.IllegalStateException: a script that throws" in groovy_run(tmp_path / "throws.groovy").stderr


@needs_groovy
def test_every_script_compiles_with_groovy_4(tmp_path):
    # pdl1_import_results.groovy declared `imported` twice (the objects, then the metadata to import): Groovy refused
    # the whole script ("The current scope already contains a variable of the name imported"), so it imported nothing
    # in any QuPath. npm-groovy-lint (test_service.py) reports no error for that; compiling the script does.
    scripts = sorted(SCRIPTS.glob("*.groovy"))
    assert len(scripts) == 4
    driver = """
def shell = new GroovyShell(this.class.classLoader)
args.each { name ->
    try {
        shell.parse(new File(name))
        println groovy.json.JsonOutput.toJson([(new File(name).getName()): "compiles"])
    } catch (org.codehaus.groovy.control.CompilationFailedException e) {
        println groovy.json.JsonOutput.toJson([(new File(name).getName()): e.getMessage()])
    }
}
"""
    out = _groovy_main(tmp_path, driver, *map(str, scripts))
    assert out.returncode == 0, out.stdout + out.stderr
    said = {k: v for line in out.stdout.splitlines() for k, v in json.loads(line).items()}
    assert said == {s.name: "compiles" for s in scripts}


IMPORT_RUN = r"""
import qupath.lib.objects.PathObject
import qupath.lib.objects.hierarchy.PathObjectHierarchy

class Entry {                                           // a ProjectImageEntry of QuPath 0.6+: getMetadata() is its map
    String id; String name; Map metadata
    String getID() { id }
    String getImageName() { name }
    Map getMetadata() { metadata }
}
class Project {
    java.nio.file.Path path; int synced
    java.nio.file.Path getPath() { path }
    void syncChanges() { synced++ }
}

def setup = new groovy.json.JsonSlurper().parseText(new File(args[0]).text)
def root = new PathObject(kind: "root")
def hierarchy = new PathObjectHierarchy(root: root, grid: setup.grid ? new Object() : null)
def entry = new Entry(id: setup.entry, name: "tma.svs", metadata: new LinkedHashMap(setup.metadata))
def project = new Project(path: java.nio.file.Paths.get(setup.project))
def binding = new Binding([
    getProject: { -> project },
    getProjectEntry: { -> entry },
    getCurrentHierarchy: { -> hierarchy },
    addObjects: { Collection objects -> root.addChildObjects(objects) },  // QP.addObjects: QP.java v0.4.4:1084
    fireHierarchyUpdate: { -> },
])
setup.runs.times { run ->
    new GroovyShell(this.class.classLoader, binding).evaluate(new File(setup.script))
    println groovy.json.JsonOutput.toJson([
        top: root.children.collect { [name: it.name, cls: it.pathClass?.toString(), children: it.children.size(),
                                      measurements: it.measurements.values] },
        metadata: entry.metadata, synced: project.synced])
    if (run == 0 && setup.records_after_first) {  // as if pdl1_analyze.groovy then analysed each top object
        def records = new File(new File(setup.project).parentFile, "pdl1/${setup.entry}/qupath_analyses")
        records.mkdirs()
        root.children.each { new File(records, "${it.getID()}.json").text = "{}" }
        // And set aside an earlier record of each: a file there ("older copy"), or a folder in its place ("blocked").
        def aside = new File(records, "removed")
        root.children.each {
            if (setup.aside_after_first == "older copy") {
                aside.mkdirs()
                new File(aside, "${it.getID()}.json").text = "an older copy"
            } else if (setup.aside_after_first == "blocked") {
                new File(new File(aside, "${it.getID()}.json"), "in the way").mkdirs()
            }
        }
    }
}
"""


@needs_groovy
def test_the_import_script_puts_a_batch_runs_sidecars_under_its_analysis_and_a_rerun_replaces_them(tmp_path):
    from shapely.geometry import Point, box

    from bridge.qupath_geojson import QuPathObject, to_feature, write_features

    project = tmp_path / "project"
    results = project / "pdl1" / "7"
    results.mkdir(parents=True)
    parent = {"PD-L1: Predicted TPS % (H&E)": 40.0, "PD-L1: Uncertainty flag": 0.0}
    objects = [
        QuPathObject(box(0, 0, 1000, 800), "annotation", "PD-L1 analysis", parent, name="PD-L1 analysis"),
        QuPathObject(box(10, 10, 90, 90), "annotation", "PD-L1 positive", {"PD-L1 probability mean": 0.9}),
        QuPathObject(box(0, 0, 64, 64), "tile", None, {"PD-L1 probability": 0.4}, name="PD-L1 uncertainty"),
        QuPathObject(Point(20, 20), "detection", "Tumor: Positive", {"PD-L1 positive probability": 0.8}),
    ]
    write_features(results / "objects.geojson", (to_feature(o) for o in objects))
    metadata = {"PD-L1 Predicted TPS % (H&E)": "40.0", "PD-L1 Predicted TPS category (H&E)": "1-49%", "PD-L1 run": "r2"}
    (results / "summary.json").write_text(json.dumps({"metadata": metadata}))
    setup = {
        "script": str(IMPORT),
        "project": str(project / "project.qpproj"),
        "entry": "7",
        "grid": True,
        "runs": 2,
        # An earlier run's IHC TPS (after the stain was corrected) goes; the case and your own keys stay.
        "metadata": {"PD-L1 TPS %": "3.0", "case": "B12", "PD-L1 TPS (manual)": "5"},
    }
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    out = _groovy_main(tmp_path, IMPORT_RUN, str(tmp_path / "setup.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    log = [line for line in out.stdout.splitlines() if line.startswith("pdl1:")]
    first, second = (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
    imported = "pdl1: imported 3 objects under 'PD-L1 analysis' for tma.svs"
    assert [line for line in log if line.startswith("pdl1: imported")] == [imported, imported]
    grid_note = "pdl1: tma.svs has a TMA grid, but these results are of the whole image"
    assert sum(line.startswith(grid_note) for line in log) == 2
    # One "PD-L1 analysis" with its three objects, the second run's in place of the first's, not beside them.
    expected = [{"name": "PD-L1 analysis", "cls": "PD-L1 analysis", "children": 3, "measurements": parent}]
    assert first["top"] == second["top"] == expected
    assert second["metadata"] == {"case": "B12", "PD-L1 TPS (manual)": "5", **metadata}
    assert (first["synced"], second["synced"]) == (1, 2)


def _whole_image_sidecar(project: Path, *, name: str | None = None) -> Path:
    """Entry 7's results folder of ``project`` with a batch run's objects.geojson: a whole-image ``PD-L1 analysis``
    (named ``name``) and one nucleus under it."""
    from shapely.geometry import Point, box

    from bridge.qupath_geojson import QuPathObject, to_feature, write_features

    results = project / "pdl1" / "7"
    results.mkdir(parents=True)
    objects = [
        QuPathObject(box(0, 0, 1000, 800), "annotation", "PD-L1 analysis", {"PD-L1: Uncertainty flag": 0.0}, name=name),
        QuPathObject(Point(20, 20), "detection", "Tumor: Positive", {"PD-L1 positive probability": 0.8}),
    ]
    write_features(results / "objects.geojson", (to_feature(o) for o in objects))
    return results


@needs_groovy
@pytest.mark.parametrize("aside", [None, "older copy", "blocked"])
def test_the_import_script_sets_aside_the_record_of_the_analysis_whose_output_it_replaced(tmp_path, aside):
    # pdl1_analyze.groovy had analysed the whole image under "PD-L1 analysis"; importing pdl1 run's results replaced
    # that analysis's output in the image, but its record stayed, and pdl1 report and review-queue counted it (newer)
    # in place of what the image held. The import deleted it then, for good: closed without saving, QuPath had the
    # analysis's output back, and `pdl1 train --from-review` counted its nuclei as written by no recorded analysis.
    # It is set aside now, where pdl1_analyze.groovy sets aside its stale records (an older copy there replaced).
    from bridge.analysis_record import QUPATH_ANALYSES, SET_ASIDE, entry_records, records_found, set_aside_records

    project = tmp_path / "project"
    results = _whole_image_sidecar(project, name="PD-L1 analysis")
    records = results / QUPATH_ANALYSES
    records.mkdir()
    (records / "other-annotation.json").write_text("{}")  # another parent's: stays
    setup = {"script": str(IMPORT), "project": str(project / "project.qpproj"), "entry": "7", "grid": False,
             "runs": 2, "records_after_first": True, "aside_after_first": aside, "metadata": {}}  # fmt: skip
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    out = _groovy_main(tmp_path, IMPORT_RUN, str(tmp_path / "setup.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    (record,) = [p for p in records.glob("*.json") if p.name != "other-annotation.json"] or [
        p for p in (records / SET_ASIDE).iterdir()
    ]
    said = [line for line in out.stdout.splitlines() if line.startswith(("pdl1: set aside ", "pdl1: could not "))]
    if aside == "blocked":  # a folder where it goes: named, with why and the fix; the record stays where it was
        assert len(said) == 1 and said[0].startswith(
            f"pdl1: could not set aside {record}, the record of the pdl1_analyze.groovy analysis these results "
            f"replaced, into {records / SET_ASIDE} ({record} -> {records / SET_ASIDE / record.name}: "
        ), said
        assert said[0].endswith(
            "); move it there by hand, or pdl1 report and review-queue count that analysis in place of these results"
        )
        assert record.parent == records and (records / SET_ASIDE / record.name / "in the way").is_dir()
        return
    assert said == [
        f"pdl1: set aside {records / record.name}, the record of the pdl1_analyze.groovy analysis these results "
        f"replaced, into {records / SET_ASIDE}: pdl1 report and review-queue no longer read it. Close QuPath without "
        "saving and that analysis's objects are back: pdl1_analyze.groovy's next run on the image moves the record "
        "back"
    ]
    assert record == records / SET_ASIDE / record.name and record.read_text() == "{}"  # the record, not a copy
    assert sorted(p.name for p in records.iterdir()) == ["other-annotation.json", SET_ASIDE]
    # Where every reader here knows the records set aside: not the entry's (pdl1 report, review-queue, the records a
    # run lists as found), one that training takes where the labels exported hold its annotation.
    assert entry_records(results) == [records / "other-annotation.json"]
    assert list(records_found(results)) == ["other-annotation"]
    assert set_aside_records(results) == [record]


@needs_groovy
def test_the_import_script_leaves_alone_results_pdl1_run_wrote_into_qupath_itself(tmp_path):
    # pdl1 run through QuPath (paquo) writes each TMA core's (or annotation's) objects into the image, and keeps
    # objects.geojson of the first core alone under a whole-image "PD-L1 analysis": imported, that core's objects went
    # in a second time on an outline of the whole image, with its TPS.
    from bridge.targets import TMA_CORE, WHOLE_IMAGE

    project = tmp_path / "project"
    results = _whole_image_sidecar(project)
    setup = {"script": str(IMPORT), "project": str(project / "project.qpproj"), "entry": "7", "grid": True, "runs": 1,
             "metadata": {"case": "B12"}}  # fmt: skip
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    said = {}
    for kind in (TMA_CORE, WHOLE_IMAGE):
        rows = [{"target": "A-1", "target_type": kind}, {"target": "A-2", "target_type": kind}]
        if kind == WHOLE_IMAGE:
            rows = [{"target": "PD-L1 analysis", "target_type": kind}]
        (results / "summary.json").write_text(json.dumps({"metadata": {"PD-L1 run": "r1"}, "targets": rows}))
        out = _groovy_main(tmp_path, IMPORT_RUN, str(tmp_path / "setup.json"))
        assert out.returncode == 0, out.stdout + out.stderr
        said[kind] = [line for line in out.stdout.splitlines() if line.startswith(("pdl1:", "{"))]
    assert said[TMA_CORE] == [
        "pdl1: nothing imported for tma.svs: `pdl1 run` analysed its 2 annotations or TMA cores (A-1, A-2) through "
        f"QuPath and wrote their results into the image itself; {results / 'objects.geojson'} holds the first one's "
        "alone. Open the image again (File > Reload data) to see them",
        json.dumps({"top": [], "metadata": {"case": "B12"}, "synced": 0}, separators=(",", ":")),
    ]
    assert said[WHOLE_IMAGE][-2] == "pdl1: imported 1 objects under 'PD-L1 analysis' for tma.svs"


def _import_review(tmp_path: Path, sidecar: str | None, *, geojson: bool = False, unfinished: bool = False) -> list:
    """pdl1_import_results.groovy run on entry 7, whose metadata holds pdl1_analyze.groovy's TPS and an earlier
    rank, with ``sidecar`` as its review.json (none where None): its log lines and the entry after it."""
    project = tmp_path / "project"
    results = project / "pdl1" / "7"
    results.mkdir(parents=True, exist_ok=True)
    review = results / REVIEW_FILE
    review.unlink(missing_ok=True)
    if sidecar is not None:
        review.write_text(sidecar)
    (project / "pdl1" / UNFINISHED_FILE).unlink(missing_ok=True)
    if unfinished:
        (project / "pdl1" / UNFINISHED_FILE).write_text("{}")
    if geojson:  # an entry `pdl1 run` analysed: its summary carries its rank
        from shapely.geometry import Point, box

        from bridge.qupath_geojson import QuPathObject, to_feature, write_features

        objects = [
            QuPathObject(box(0, 0, 100, 80), "annotation", "PD-L1 analysis", {"PD-L1: Uncertainty flag": 0.0},
                         name="PD-L1 analysis"),
            QuPathObject(Point(20, 20), "detection", "Tumor: Positive", {"PD-L1 positive probability": 0.8}),
        ]  # fmt: skip
        write_features(results / "objects.geojson", (to_feature(o) for o in objects))
        ranked = {"PD-L1 run": "r2", RANK_KEY: "1", SCORE_KEY: "2.000"}
        (results / "summary.json").write_text(json.dumps({"metadata": ranked}))
    metadata = {"PD-L1 TPS %": "12.5", "PD-L1 run": "r1", "case": "B12", RANK_KEY: "5", SCORE_KEY: "0.500"}
    setup = {"script": str(IMPORT), "project": str(project / "project.qpproj"), "entry": "7", "grid": False, "runs": 1,
             "metadata": metadata}  # fmt: skip
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    out = _groovy_main(tmp_path, IMPORT_RUN, str(tmp_path / "setup.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("pdl1:", "{"))]
    return [line if line.startswith("pdl1:") else json.loads(line) for line in lines]


@needs_groovy
def test_the_import_script_sets_the_review_rank_of_an_entry_analysed_in_qupath_alone_from_its_review_json(tmp_path):
    # Such an entry (records of pdl1_analyze.groovy, no objects.geojson) had its rank in the CSV only: "no results".
    review = tmp_path / "project" / "pdl1" / "7" / REVIEW_FILE
    queue = tmp_path / "project" / "pdl1" / "review_queue.csv"
    ranked = review_sidecar({RANK_KEY: "2", SCORE_KEY: "1.250"}, written_at="2026-03-01T09:00:00+00:00", queue=queue)
    said, after = _import_review(tmp_path, ranked)
    assert said == (
        f"pdl1: tma.svs: {RANK_KEY} 2, {SCORE_KEY} 1.250, from {review}; no objects to import: it was analysed in "
        "QuPath, its results are in the image"
    )
    # The TPS pdl1_analyze.groovy set, the run and the case stay; nothing is added to the image.
    metadata = {"PD-L1 TPS %": "12.5", "PD-L1 run": "r1", "case": "B12"}
    assert after == {"top": [], "metadata": {**metadata, RANK_KEY: "2", SCORE_KEY: "1.250"}, "synced": 1}

    # No longer ranked (its records no longer read): its rank goes from QuPath too.
    why = "qupath_analyses/a.json does not read"
    cleared = review_sidecar({RANK_KEY: None, SCORE_KEY: None}, written_at="2026-03-02T09:00:00+00:00", queue=queue,
                             why=why)  # fmt: skip
    said, after = _import_review(tmp_path, cleared)
    assert said == (
        f"pdl1: tma.svs: {RANK_KEY} removed, {SCORE_KEY} removed (not ranked: {why}), from {review}; no objects to "
        "import: it was analysed in QuPath, its results are in the image"
    )
    assert after == {"top": [], "metadata": metadata, "synced": 1}

    # A review.json that does not read is named, and the entry's metadata left as it was.
    said, after = _import_review(tmp_path, '{"metadata": ')
    assert said.startswith(f"pdl1: {review} does not read (") and said.endswith(
        "run pdl1 review-queue for the project again"
    )
    assert after["metadata"][RANK_KEY] == "5" and after["synced"] == 0

    # Neither objects.geojson nor review.json: what it said before.
    said, after = _import_review(tmp_path, None)
    assert said.startswith("pdl1: no results for tma.svs (expected ") and after["synced"] == 0

    # Both (an entry `pdl1 run` analysed): the summary's rank, as before; review.json is not read.
    *_, said, after = _import_review(tmp_path, ranked, geojson=True)
    assert said == "pdl1: imported 1 objects under 'PD-L1 analysis' for tma.svs"
    assert after["metadata"] == {"PD-L1 run": "r2", "case": "B12", RANK_KEY: "1", SCORE_KEY: "2.000"}


@needs_groovy
def test_the_import_leaves_the_review_rank_from_review_json_alone_while_a_review_queue_is_unfinished(tmp_path):
    queue = tmp_path / "project" / "pdl1" / "review_queue.csv"
    ranked = review_sidecar({RANK_KEY: "2", SCORE_KEY: "1.250"}, written_at="2026-03-01T09:00:00+00:00", queue=queue)
    said, after = _import_review(tmp_path, ranked, unfinished=True)
    marker = tmp_path / "project" / "pdl1" / UNFINISHED_FILE
    assert said == (
        f"pdl1: {marker}: a pdl1 review-queue was stopped while renaming its files, so the review ranks are part its, "
        f"part older; tma.svs's in {tmp_path / 'project' / 'pdl1' / '7' / REVIEW_FILE} is not imported (QuPath keeps "
        "the one it has): run pdl1 review-queue for the project again"
    )
    metadata = {"PD-L1 TPS %": "12.5", "PD-L1 run": "r1", "case": "B12", RANK_KEY: "5", SCORE_KEY: "0.500"}
    assert after == {"top": [], "metadata": metadata, "synced": 0}
