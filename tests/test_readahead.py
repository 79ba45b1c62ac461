import threading
import time

import pytest

from inference.slides.readahead import read_ahead


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_order_is_kept(workers):
    def slow_square(v):
        time.sleep(0.001 * (7 - v % 7))
        return v * v

    out = list(read_ahead(slow_square, range(30), workers=workers, max_pending=4))
    assert out == [(i, i * i) for i in range(30)]


def test_pending_reads_are_bounded():
    running = 0
    peak = 0
    lock = threading.Lock()
    produced = []

    def read(v):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.002)
        with lock:
            running -= 1
        produced.append(v)
        return v

    it = read_ahead(read, range(100), workers=4, max_pending=3)
    next(it)
    time.sleep(0.05)
    assert len(produced) <= 4  # the one consumed and at most max_pending waiting
    assert peak <= 3
    it.close()


def test_errors_surface_at_their_item():
    def fail_on_3(v):
        if v == 3:
            raise OSError("tile 3 unreadable")
        return v

    it = read_ahead(fail_on_3, range(6), workers=2, max_pending=2)
    assert [next(it)[1] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="tile 3"):
        next(it)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_pending"):
        list(read_ahead(lambda v: v, [1], workers=1, max_pending=0))
