"""Files replaced together (bridge.atomic): after any error the old files stand and no temporary one is left."""

import errno
import subprocess
import sys
import textwrap

import pytest

from bridge.atomic import replaced_together

# A child process whose files may grow to 64 KiB (a full disk, as far as the writer can tell: the write that does not
# fit fails, and so does the flush of what is still buffered when the file is closed).
_NO_ROOM = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from bridge.atomic import replaced_together

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG raised, not the process killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    out = Path(sys.argv[1])
    try:
        with replaced_together(out / "provenance.json") as open_new:
            open_new(out / "a.txt").write("new a")
            open_new(out / "b.txt").write("b" * 66_000)  # written to the buffer; its flush fails, and then its close
            open_new(out / "provenance.json").write("new record")
    except OSError as err:
        print(err.errno)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_does_not_fit_leaves_the_old_files_and_no_temporary_one(tmp_path):
    # Closing a file flushes what is still buffered, which failed again on the full disk: raised from the clean-up, it
    # left every temporary file there, keeping the disk full for the failure's own record.
    for name, text in (("a.txt", "old a"), ("b.txt", "old b"), ("provenance.json", "old record")):
        (tmp_path / name).write_text(text)
    child = subprocess.run(
        [sys.executable, "-c", _NO_ROOM, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == [str(errno.EFBIG)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "provenance.json"]
    assert [(tmp_path / n).read_text() for n in ("a.txt", "b.txt", "provenance.json")] == [
        "old a",
        "old b",
        "old record",
    ]


def test_files_replaced_together_replace_theirs_and_an_error_leaves_them(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with replaced_together(tmp_path / "record.json") as open_new:
        open_new(tmp_path / "a.txt").write("new a")
        open_new(tmp_path / "record.json").write("new record")
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "record.json").read_text() == "new record"
    with pytest.raises(RuntimeError), replaced_together(tmp_path / "record.json") as open_new:
        open_new(tmp_path / "a.txt").write("newer a")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "record.json"]
    assert (tmp_path / "a.txt").read_text() == "new a"
