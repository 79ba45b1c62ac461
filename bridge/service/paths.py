"""Which image files the service may open (only under --allow-root, checked on the file actually opened), and the
answers for paths it cannot use."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath

from bridge.project import uri_to_path
from bridge.service.errors import ImagePathError, PathNotAllowedError
from bridge.service.messages import clipped, quoted
from inference import Pdl1Error, Slide, SlideNotFoundError, open_slide, slide_size


def _unusable_path(path: object, err: Exception) -> ImagePathError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return ImagePathError(
        f"image path {quoted(str(path))} cannot be used: {reason}; send the path (or file: URI) of an image file "
        "under an --allow-root folder"
    )


def _under(real: Path, roots: tuple[Path, ...]) -> bool:
    return any(real.is_relative_to(root.resolve()) for root in roots)


def _not_allowed(path: Path, roots: tuple[Path, ...]) -> PathNotAllowedError:
    return PathNotAllowedError(
        f"{clipped(str(path))} is outside the folders this service may open ({', '.join(str(r) for r in roots)}); "
        "start it with --allow-root for that folder"
    )


def _changed(real: Path) -> PathNotAllowedError:
    return PathNotAllowedError(
        f"{clipped(str(real))} changed while it was being opened (a file or folder on its path was replaced); "
        "only files under the --allow-root folders are opened: submit the job again"
    )


def check_allowed(path: Path, roots: tuple[Path, ...]) -> Path:
    """The real path of ``path`` if it lies under one of ``roots`` (symlinks resolved), else 403.

    A path the file system cannot take (NUL byte, name too long, symlink loop) is a 422, not a crash.
    """
    try:
        real = path.resolve()
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: a symlink loop before Python 3.13
        raise _unusable_path(path, err) from err
    if not _under(real, roots):
        raise _not_allowed(path, roots)
    if real.suffix.lower() in _MULTI_FILE_SUFFIXES:
        _refuse_companions_outside(path, real, roots)
    return real


# The most of a multi-file slide's index file read for the files it names (a Hamamatsu .vms is a few hundred bytes,
# a MIRAX Slidedat.ini tens of KB).
_INDEX_MAX_BYTES = 4 * 1024 * 1024


def _index_values(index: Path) -> list[str]:
    """Every value of an INI file's ``key = value`` lines (the files it names among them); none from a file that is
    not a regular one.

    Opened without blocking: a named pipe in the index's place held the request's thread for good (no client's
    going away reaches an open()), and enough such requests left the service answering nothing. A pipe or device
    is refused by the checks of the file named (:func:`not_a_regular_file`) or of the slide's other files.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        with os.fdopen(os.open(index, flags), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return []
            text = fh.read(_INDEX_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return []  # not readable here: the reader fails on it, naming it
    return [value.strip() for key, eq, value in (line.partition("=") for line in text.splitlines()) if eq]


def _companions(real: Path) -> list[Path]:
    """The other files a multi-file slide (:data:`_MULTI_FILE_SUFFIXES`) is read from, as OpenSlide finds them: a
    Hamamatsu .vms/.vmu's image and map files, named in it relative to its folder; a MIRAX .mrxs's folder of the
    same name, what it holds and the data files its Slidedat.ini names; the other .dcm files of a DICOM slide's folder.
    Every value of an index file is taken for a name (a number names a file in the folder, which is harmless)."""
    suffix = real.suffix.lower()
    if suffix in (".vms", ".vmu"):
        return [real.parent / value for value in _index_values(real) if value]
    if suffix == ".mrxs":
        folder = real.with_suffix("")
        if not folder.is_dir():
            return [folder]
        return [folder, *folder.iterdir(), *(folder / v for v in _index_values(folder / "Slidedat.ini") if v)]
    return [p for p in real.parent.iterdir() if p.suffix.lower() == ".dcm"]


def _refuse_companions_outside(path: Path, real: Path, roots: tuple[Path, ...]) -> None:
    """A 403 where a file a multi-file slide is read from lies outside ``roots``: its index named ``../x`` or a
    symlink led out, and OpenSlide read what the check of the named file alone let by (found by a review: a .vms
    under the root had a file outside it analysed)."""
    try:
        companions = _companions(real)
        outside = [c for c in companions if not _under(c.resolve(), roots)]
        special = [c for c in companions if not outside and _is_special(c)]
    except (OSError, ValueError, RuntimeError) as err:
        raise _unusable_path(path, err) from err
    if outside:
        raise PathNotAllowedError(
            f"{clipped(str(path))} is read from {clipped(str(outside[0]))} too, which is outside the folders this "
            f"service may open ({', '.join(str(r) for r in roots)}); keep a slide's files together under an "
            "--allow-root folder"
        )
    if special:  # OpenSlide would block opening a pipe, the request's thread or the worker with it, for good
        raise ImagePathError(
            f"{clipped(str(path))} is read from {clipped(str(special[0]))} too, which is not a regular file (a named "
            "pipe, socket or device); a slide's files are the regular files its scanner wrote: copy the slide again"
        )


def _is_special(path: Path) -> bool:
    """Whether ``path`` (symlinks followed) is there and neither a regular file nor a folder: a pipe, socket or
    device."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False  # not there: the reader says so
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def is_file_uri(image: str) -> bool:
    """Whether a request's ``image`` is a ``file:`` URI; a scheme is case-insensitive (RFC 3986), so ``FILE:///x``
    is one too (it was refused as "a FILE: URL").

    >>> is_file_uri("FILE:///data/a.svs"), is_file_uri("/data/file:a.svs")
    (True, False)
    """
    return image[:5].lower() == "file:"


def stray_white_space(image: str) -> SlideNotFoundError:
    """The 404 of an image path that names no file and starts or ends with white space."""
    return SlideNotFoundError(
        f"image not found: {quoted(image)}, which ends or starts with white space (a line end copied with the "
        "path?); send the path without it"
    )


def image_path(image: str) -> Path:
    if is_file_uri(image):
        try:
            return Path(str(uri_to_path(image)))
        except ValueError as err:  # urlparse: e.g. an unclosed IPv6 bracket in the host
            if isinstance(err, Pdl1Error):
                raise
            raise _unusable_path(image, err) from err
    return Path(image)


def require_absolute(image: str, path: Path) -> Path:
    """``path`` (of the request's ``image``) if it is absolute; a relative path would be resolved against the
    service's working folder, and a URL or another machine's Windows path names nothing here."""
    if path.is_absolute():
        return path
    if image != image.lstrip() and image_path(image.strip()).is_absolute():  # "is relative" hid the white space
        raise stray_white_space(image)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", image) and not is_file_uri(image):
        raise ImagePathError(
            f"image {quoted(image)} is a {clipped(image.split(':', 1)[0], limit_chars=20)}: URL; the service opens "
            "image files on its own machine: send the file's absolute path there (or its file: URI), or upload the "
            "region's pixels (POST /v1/jobs/pixels)"
        )
    if is_file_uri(image) and str(path).startswith("\\\\"):  # file://server/...: a share's URI
        host = PureWindowsPath(str(path)).drive.lstrip("\\").split("\\")[0]
        raise ImagePathError(
            f"image URI {quoted(image)} names a file on the machine {quoted(host, limit_chars=60)} (a network "
            "share), which the service cannot open by that name; expected the absolute path at which the service's "
            "machine sees the file (the share mounted there) or its file: URI (file:/mnt/share/..., "
            "file:///mnt/share/... or file://localhost/mnt/share/...)"
        )
    if PureWindowsPath(str(path)).drive:
        raise ImagePathError(
            f"image path {quoted(image)} is a Windows path, which the service's machine cannot open; expected the "
            "absolute path at which that machine sees the file (for a share: under the folder it is mounted at), "
            "or its file: URI"
        )
    if is_file_uri(image):  # "is relative" would puzzle: it is a URI, one that names no absolute path
        raise ImagePathError(
            f"image URI {quoted(image)} names no absolute path; expected a file: URI such as "
            "file:/data/slides/case.svs (as QuPath's server reports it), or the absolute path of the image file on "
            "the service's machine"
        )
    if image.startswith("~"):
        raise ImagePathError(
            f"image path {quoted(image)} starts with ~, which only a shell expands; expected the absolute path of the "
            "image file on the service's machine (e.g. /home/NAME/slides/case.svs) or its file: URI"
        )
    raise ImagePathError(
        f"image path {quoted(image)} is relative; expected the absolute path of the image file on the service's "
        "machine (e.g. /data/slides/case.svs) or its file: URI"
    )


def not_a_regular_file(path: Path) -> ImagePathError:
    return ImagePathError(
        f"{clipped(str(path))} is not a regular file (a named pipe, socket or device); expected an image file (e.g. "
        "a .svs, .ndpi or .tif): send the path of the image file itself"
    )


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError) as err:
        raise _unusable_path(path, err) from err


# OpenSlide finds these formats' other files beside the one named, so they are opened by name.
_MULTI_FILE_SUFFIXES = frozenset({".mrxs", ".vms", ".vmu", ".dcm"})


# Where a QuPath user gives an image's µm/px (open_slide's mpp_advice): in QuPath, whence pdl1_analyze.groovy
# sends it with the job as its mpp, not --mpp.
def _qupath_mpp_advice(value: str) -> str:
    return (
        f"set the pixel size in QuPath (Image tab: Pixel width/height) to {value}; pdl1_analyze.groovy sends it "
        "with the job, so run the script again"
    )


def _as_sent(err: Pdl1Error, opened: tuple[Path, ...], shown: str) -> Pdl1Error:
    """``err`` as the client should read it: naming the image as it sent it, not the files the worker
    opened (a private link in a temporary folder)."""
    message = str(err)
    for path in opened:
        message = message.replace(str(path), shown)
    return err if message == str(err) else type(err)(message)


@contextmanager
def _checked_file(real: Path, roots: tuple[Path, ...]) -> Iterator[tuple[Path, Callable[[], None]]]:
    """The name a reader should open for ``real`` (checked under ``roots`` already), and a check to call once the
    reader has opened it: that the file is still the one checked.

    The file is opened once here and the open file (its ``/proc/self/fd`` link on Linux) must still lie under a
    root. On Linux the reader then opens that very file, through a private link to the descriptor that keeps the
    file's name (readers look at suffixes); elsewhere, and for multi-file formats, it opens the checked name and
    the file found there afterwards must be the one checked (the check given).
    """
    try:
        # O_NONBLOCK: a named pipe put in the image's place while the job waited would block the open, and the one
        # worker with it, forever (no cancel reaches it); the descriptor only checks the file, readers open their own.
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(real, flags)
    except FileNotFoundError as err:
        raise SlideNotFoundError(f"image not found: {real} (it was there when the job was submitted)") from err
    except OSError as err:
        if err.errno != errno.ELOOP:  # e.g. no permission to read it
            raise _unusable_path(real, err) from err
        raise _changed(real) from err  # O_NOFOLLOW: the last part became a symlink after it was resolved
    link_dir: str | None = None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder is named by open_slide
            raise not_a_regular_file(real)
        proc = Path(f"/proc/self/fd/{fd}")
        opened = Path(os.readlink(proc)) if proc.is_symlink() else real
        if not _under(opened, roots):  # swapped between the check and the open: not named, it lies outside
            raise _changed(real)
        if proc.is_symlink() and real.suffix.lower() not in _MULTI_FILE_SUFFIXES:
            link_dir = tempfile.mkdtemp(prefix="pdl1-open-")  # mode 0700: no one else can swap the link
            source = Path(link_dir) / real.name
            source.symlink_to(proc)
        else:
            source = real

        def still_the_checked_file() -> None:
            if source == real and not os.path.samestat(os.stat(real), os.fstat(fd)):
                raise _changed(real)

        yield source, still_the_checked_file
    finally:
        os.close(fd)
        if link_dir is not None:
            shutil.rmtree(link_dir, ignore_errors=True)


@contextmanager
def open_allowed(
    path: Path, roots: tuple[Path, ...], *, mpp: float | None, shown: str | None = None, openslide_only: bool = False
) -> Iterator[Slide]:
    """Open an image under ``roots``, checking the file actually opened, not only its name.

    The check at submission is not enough: a folder swapped for a symlink while the job waited
    leads elsewhere. So the path is resolved and checked again here, opened once, and the open
    file must still lie under a root; the reader opens that very file where it can (see
    :func:`_checked_file`). Errors, also those of the analysis inside the ``with``, name the image
    as ``shown`` (the client's path; default ``path``).
    ``openslide_only`` goes to ``open_slide`` (the service's ``PipelineConfig.openslide_only``).
    """
    shown = str(path) if shown is None else shown
    real = check_allowed(path, roots)
    names = [real]  # the names an error may give the image by: the checked one, the private link
    slide: Slide | None = None
    try:
        with _checked_file(real, roots) as (source, still_the_checked_file):
            names.append(source)
            try:
                slide = open_slide(
                    source,
                    mpp=mpp,
                    mpp_source="the request's mpp",
                    mpp_advice=_qupath_mpp_advice,
                    openslide_only=openslide_only,
                )
                still_the_checked_file()
                slide.path = real  # provenance names the image, not the private link
                yield slide
            finally:
                if slide is not None:
                    slide.close()
    except Pdl1Error as err:
        translated = _as_sent(err, tuple(names), shown)
        if translated is err:
            raise
        raise translated from err


def allowed_slide_size(path: Path, roots: tuple[Path, ...], *, shown: str) -> tuple[int, int]:
    """The (width, height) at which the worker will open the image at ``path`` under ``roots``, read from its
    header (:func:`inference.slide_size`) through the same checks as :func:`open_allowed`; errors name the image
    as ``shown``. For a job's submission: an image no reader opens is refused before it queues, and one that opens
    at another size than the client shows it is told apart."""
    real = check_allowed(path, roots)
    names = [real]
    try:
        with _checked_file(real, roots) as (source, still_the_checked_file):
            names.append(source)
            size = slide_size(source)
            still_the_checked_file()
    except Pdl1Error as err:
        translated = _as_sent(err, tuple(names), shown)
        if translated is err:
            raise
        raise translated from err
    return size
