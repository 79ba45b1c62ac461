"""One pdl1 run per project: a second is refused, naming the first; a dead run's lock is taken over."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge import run_lock as run_lock_module
from bridge.project import ProjectError
from bridge.run import RunConfig, run_batch
from bridge.run_lock import RunLockBusyError, project_read_lock, run_lock
from inference.pipeline import PipelineConfig


def _lock_file(folder, **holder):
    path = folder / "pdl1" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "2026-11-23 09:00:00", **holder}))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_is_refused_while_the_first_runs_and_nothing_is_written(tmp_path, phantom_svs):
    out = tmp_path / "out"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            _lock_file(out, pid=other.pid)
            config = RunConfig(pipeline=PipelineConfig(device="cpu"), qupath="never", out=out)
            refused = rf"another pdl1 run is writing here \(pid {other.pid} on .*run.lock"
            with pytest.raises(ProjectError, match=refused):
                run_batch([phantom_svs], config)
        finally:
            other.kill()
    assert sorted(p.name for p in out.rglob("*")) == ["pdl1", "run.lock"]


def test_the_lock_is_released_when_the_run_ends_or_fails(tmp_path):
    with run_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] > 0
        with pytest.raises(ProjectError, match="another pdl1 run"), run_lock(tmp_path):
            pass
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt), run_lock(tmp_path):
        raise KeyboardInterrupt
    assert not path.exists()


def test_a_folder_that_cannot_be_written_says_so_before_anything_starts(tmp_path, monkeypatch):
    # A read-only --out was "error: [Errno 30] Read-only file system: 'out'". Simulated: chmod does not stop root.
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ProjectError) as err, run_lock(tmp_path / "out"):
        pass
    assert str(err.value) == (
        f"{tmp_path / 'out'}: cannot write there (Read-only file system: {tmp_path / 'out' / 'pdl1'}); nothing was "
        f"started; the run writes its results and its lock under {tmp_path / 'out' / 'pdl1'}: give a folder you can "
        "write to (--out for plain slides), or make this one writable"
    )


def test_a_file_where_the_pdl1_folder_goes_is_named_with_the_fix(tmp_path):
    # Was "cannot write there (File exists: proj/pdl1) ... or make this one writable": permissions were not the cause.
    (tmp_path / "pdl1").write_text("notes")
    with pytest.raises(ProjectError) as err, run_lock(tmp_path):
        pass
    assert str(err.value) == (
        f"{tmp_path}: {tmp_path / 'pdl1'} is a file, but the run keeps its results and its lock in a folder there; "
        "nothing was started: move or rename that file, and run again"
    )
    assert (tmp_path / "pdl1").read_text() == "notes"


def test_a_lock_left_by_a_run_that_died_here_is_taken_over(tmp_path):
    _lock_file(tmp_path, pid=_dead_pid())
    with run_lock(tmp_path) as path:
        assert json.loads(path.read_text())["command"]
    assert not path.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a process's start is read from Linux's /proc")
def test_a_lock_whose_pid_went_to_another_process_is_taken_over_and_a_live_runs_is_not(tmp_path):
    # The run died and its pid went to another process (after a reboot, often): "another pdl1 run is writing here"
    # kept every run out until someone deleted the lock.
    from bridge.run_lock import _process_start

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = _process_start(other.pid)
        assert started is not None and started != _process_start(os.getpid())
        _lock_file(tmp_path, pid=other.pid, process_start=started)  # the live run's own
        with pytest.raises(ProjectError, match=rf"pid {other.pid} on .* since 2026-11-23"), run_lock(tmp_path):
            pass
        _lock_file(tmp_path, pid=other.pid, process_start=started.split("/")[0] + "/1")  # a pid's earlier process
        with run_lock(tmp_path) as path:
            assert json.loads(path.read_text())["process_start"] == _process_start(os.getpid())
        _lock_file(tmp_path, pid=other.pid)  # a lock written before the start was kept: the pid alone decides
        with pytest.raises(ProjectError), run_lock(tmp_path):
            pass
    finally:
        other.kill()
        other.wait()


def test_a_lock_from_another_machine_is_not_second_guessed(tmp_path):
    path = _lock_file(tmp_path, pid=_dead_pid(), host="scanner-pc-07")
    theirs = r"pid \d+ on scanner-pc-07 since 2026-11-23 09:00:00.*delete"
    with pytest.raises(ProjectError, match=theirs), run_lock(tmp_path):
        pass
    assert path.exists()  # still theirs


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, r"free some space on that drive, and run again"),
        # a read-only drive was told to free some space
        (errno.EROFS, r"the drive \(or mount\) is read-only: make it writable"),
    ],
)
def test_a_full_disk_leaves_no_lock_behind(tmp_path, monkeypatch, code, fix):
    def disk_full(obj, fh, *args, **kwargs):
        fh.write("{")
        raise OSError(code, os.strerror(code))

    full = rf"cannot write the run lock \({os.strerror(code)}\); nothing was started or left behind; {fix}"
    with monkeypatch.context() as patch:
        patch.setattr(json, "dump", disk_full)
        with pytest.raises(ProjectError, match=full), run_lock(tmp_path):
            pass
    assert list((tmp_path / "pdl1").iterdir()) == []
    with run_lock(tmp_path) as path:  # the next run is not blocked
        assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("content", ["", '{"pid": 12'])
def test_an_empty_or_unreadable_lock_is_taken_over_once_a_minute_old(tmp_path, content):
    path = tmp_path / "pdl1" / "run.lock"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(ProjectError, match="an empty or unreadable lock, less than a minute old"), run_lock(tmp_path):
        pass  # a run may be writing it this instant
    old = time.time() - 61
    os.utime(path, (old, old))
    with run_lock(tmp_path) as taken:
        assert json.loads(taken.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_stale_lock_that_cannot_be_removed_is_named_with_the_fix(tmp_path):
    # A folder named run.lock (or a dead run's lock we may not delete) was "[Errno 21] Is a directory".
    path = tmp_path / "pdl1" / "run.lock"
    path.mkdir(parents=True)
    (path / "x").write_text("")
    old = time.time() - 3600
    os.utime(path, (old, old))
    refused = r"run\.lock: a folder where the run lock goes, which cannot be removed \("
    with pytest.raises(ProjectError, match=refused), run_lock(tmp_path):
        pass
    assert path.is_dir() and not [p for p in path.parent.iterdir() if p.name != "run.lock"]


# ----------------------------------------------------------------------------- a project read under the run lock


def test_a_read_holds_the_run_lock_and_a_run_started_meanwhile_is_refused_naming_it(tmp_path):
    # `pdl1 train PROJECT` read the project's objects while a `pdl1 run` could be replacing them: a read saw the run
    # half-way, and a run started during the read was not refused.
    path = tmp_path / "pdl1" / "run.lock"
    with project_read_lock(tmp_path, reader="pdl1 train"):
        holder = json.loads(path.read_text())
        assert (holder["pid"], holder["doing"]) == (os.getpid(), "pdl1 train is reading the project's objects here")
        with pytest.raises(RunLockBusyError) as err, run_lock(tmp_path):
            pass
        assert str(err.value) == (
            f"{tmp_path}: pdl1 train is reading the project's objects here (pid {os.getpid()} on "
            f"{socket.gethostname()} since {holder['started']}); wait for it to finish, or delete {path} if it is no "
            "longer going"
        )
        with pytest.raises(RunLockBusyError) as err, project_read_lock(tmp_path, reader="pdl1 export nnunet"):
            pass
        assert str(err.value).startswith(f"{tmp_path}: pdl1 train is reading the project's objects here (pid ")
        assert str(err.value).endswith(
            "; pdl1 export nnunet reads the project while nothing else holds its run lock: wait for that to finish (a "
            f"read takes seconds to minutes) and run pdl1 export nnunet again, or delete {path} if it is no longer "
            "going"
        )
    # Released once read, and the pdl1 folder made for it removed: a read leaves a project as it was.
    assert not (tmp_path / "pdl1").exists()
    with run_lock(tmp_path):
        pass


def test_a_read_is_refused_while_a_run_writes_and_takes_over_a_dead_runs_lock(tmp_path):
    (tmp_path / "pdl1" / "labels").mkdir(parents=True)  # the exports' folder: stays
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            path = _lock_file(tmp_path, pid=other.pid)
            with pytest.raises(RunLockBusyError) as err, project_read_lock(tmp_path, reader="pdl1 train"):
                pytest.fail("read while a run writes")
        finally:
            other.kill()
    assert str(err.value) == (
        f"{tmp_path}: a pdl1 run is writing here (pid {other.pid} on {socket.gethostname()} since 2026-11-23 "
        "09:00:00), and pdl1 train reads the project only while no run writes it (a run replaces the objects it "
        f"reads); wait for the run to finish and run pdl1 train again, or delete {path} if that run is no longer going"
    )
    assert json.loads(path.read_text())["pid"] == other.pid  # still the run's
    _lock_file(tmp_path, pid=_dead_pid())
    with project_read_lock(tmp_path, reader="pdl1 train"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists() and (tmp_path / "pdl1" / "labels").is_dir()


_READ_ELSEWHERE = """
import sys, time
from pathlib import Path
from bridge.run_lock import project_read_lock
with project_read_lock(Path(sys.argv[1]), reader="pdl1 export nnunet"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _read_elsewhere(folder: Path, hold_s: float) -> subprocess.Popen:
    """Another process reading ``folder``'s objects for ``hold_s`` seconds; returns once it holds the lock."""
    other = subprocess.Popen(
        [sys.executable, "-c", _READ_ELSEWHERE, str(folder), str(hold_s)], stdout=subprocess.PIPE, text=True
    )
    assert other.stdout.readline() == "held\n"
    return other


@pytest.mark.parametrize("second", ["read", "run"])
def test_a_read_in_another_process_is_waited_for_saying_so(tmp_path, caplog, second):
    # Two `pdl1 train` of one project started together (or a run started during a read) were refused, though the
    # read ends in seconds: now the second waits for it, and says why it waits.
    with _read_elsewhere(tmp_path, 1.0) as other:
        lock = tmp_path / "pdl1" / "run.lock"
        with caplog.at_level("WARNING", logger="bridge.run_lock"):
            if second == "read":
                with project_read_lock(tmp_path, reader="pdl1 train", wait_s=60):
                    assert json.loads(lock.read_text())["pid"] == os.getpid()
            else:
                with run_lock(tmp_path, wait_s=60):
                    assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert other.wait(timeout=30) == 0
    (said,) = caplog.messages
    assert said.startswith(f"{lock}: pdl1 export nnunet is reading the project's objects here (pid {other.pid} on ")
    assert said.endswith("; waiting for it to finish (up to 60 s)")
    assert not lock.exists()


def test_a_waiting_holder_whose_file_the_lock_holder_cleared_away_writes_it_again(tmp_path, monkeypatch):
    # review-queue (holding the lock) removes holders over a minute old as a dead run's: one waiting that long
    # lost its file and failed with "cannot create the run lock". It is kept fresh, and written again if taken.
    real_sleep, cleared = time.sleep, []

    def sleep(seconds):
        for leftover in (tmp_path / "pdl1").glob("run.lock.*.tmp"):
            leftover.unlink()
            cleared.append(leftover.name)
        real_sleep(seconds)

    monkeypatch.setattr(run_lock_module.time, "sleep", sleep)
    with _read_elsewhere(tmp_path, 1.0) as other, run_lock(tmp_path, wait_s=60) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert other.wait(timeout=30) == 0
    assert cleared and not list((tmp_path / "pdl1").glob("run.lock*"))


def test_a_read_that_outlasts_the_wait_is_refused_saying_how_long_it_waited(tmp_path):
    with _read_elsewhere(tmp_path, 60.0) as other:
        try:
            with pytest.raises(RunLockBusyError) as err, project_read_lock(tmp_path, reader="pdl1 train", wait_s=1):
                pytest.fail("read while another read holds the lock")
        finally:
            other.kill()
    assert str(err.value).startswith(f"{tmp_path}: pdl1 export nnunet is reading the project's objects here (pid ")
    assert str(err.value).endswith(" if it is no longer going (waited 1 s for it)")


def test_a_run_is_never_waited_for(tmp_path, monkeypatch):
    # A run holds its lock for hours: a read or a second run is refused at once, naming it, whatever the wait.
    def sleep(seconds):
        raise AssertionError("waited for a run")

    monkeypatch.setattr(run_lock_module.time, "sleep", sleep)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            _lock_file(tmp_path, pid=other.pid)
            refused = pytest.raises(RunLockBusyError, match="a pdl1 run is writing here")
            with refused, project_read_lock(tmp_path, reader="pdl1 train", wait_s=600):
                pytest.fail("read while a run writes")
            with (
                pytest.raises(RunLockBusyError, match="another pdl1 run is writing here"),
                run_lock(tmp_path, wait_s=600),
            ):
                pytest.fail("a second run")
        finally:
            other.kill()


def test_a_project_whose_lock_cannot_be_written_is_read_without_it_unless_a_run_holds_it(tmp_path, monkeypatch, caplog):
    # A project on a read-only drive (or a folder this user may not write) was read by training before the lock; it
    # still is, with a warning, since no lock can be taken. Simulated: chmod does not stop root.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(run_lock_module, "_write_holder", read_only)
    read = []
    with caplog.at_level("WARNING", logger="bridge.run_lock"), project_read_lock(tmp_path, reader="pdl1 train"):
        read.append(True)
    assert read == [True] and not (tmp_path / "pdl1").exists()
    lock = tmp_path / "pdl1" / "run.lock"
    assert caplog.messages == [
        f"{tmp_path}: pdl1 train reads the project without its run lock, which it cannot take ({lock}: cannot write "
        "the run lock (Read-only file system); nothing was started or left behind; the drive (or mount) is read-only: "
        "make it writable, or work on a copy on a writable drive, and run again); a pdl1 run started on the project "
        "meanwhile is not refused, so start none until it has read the labels"
    ]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            _lock_file(tmp_path, pid=other.pid)
            busy = rf"a pdl1 run is writing here \(pid {other.pid} "
            with pytest.raises(RunLockBusyError, match=busy), project_read_lock(tmp_path, reader="pdl1 train"):
                pytest.fail("read while a run writes")
        finally:
            other.kill()


def test_a_file_named_pdl1_where_its_folder_goes_leaves_the_read_alone(tmp_path):
    # No run can lock (so none can write) such a project: the read goes on, and the file is left as it is.
    (tmp_path / "pdl1").write_text("notes")
    with project_read_lock(tmp_path, reader="pdl1 train"):
        pass
    assert (tmp_path / "pdl1").read_text() == "notes"


def test_a_waiting_holder_whose_folder_goes_again_while_it_writes_its_file_tries_again(tmp_path, monkeypatch):
    # The read holding the lock removes the pdl1 folder it made when it leaves it empty, also between the waiting
    # holder making the folder again and writing its file there: that FileNotFoundError came out as a traceback.
    real_sleep, real_write, writes = time.sleep, run_lock_module._write_holder, []

    def sleep(seconds):
        for leftover in (tmp_path / "pdl1").glob("run.lock.*.tmp"):
            leftover.unlink()
        real_sleep(seconds)

    def write_holder(path, me):
        writes.append(path)
        if len(writes) == 2:  # the first rewrite: the folder went again just before it
            raise FileNotFoundError(2, "No such file or directory")
        return real_write(path, me)

    monkeypatch.setattr(run_lock_module.time, "sleep", sleep)
    monkeypatch.setattr(run_lock_module, "_write_holder", write_holder)
    with _read_elsewhere(tmp_path, 1.0) as other, run_lock(tmp_path, wait_s=60) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert other.wait(timeout=30) == 0
    assert len(writes) >= 3 and not list((tmp_path / "pdl1").glob("run.lock*"))

    # A folder that keeps going is refused, saying so, not with a traceback.
    def folder_gone(path, me):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(run_lock_module, "_write_holder", folder_gone)
    path = tmp_path / "pdl1" / "run.lock"
    with pytest.raises(ProjectError, match=r"the folder of the run lock was removed 3 times while this command waited"):
        run_lock_module._kept_fresh(tmp_path / "gone.tmp", path, {}, "run lock")
