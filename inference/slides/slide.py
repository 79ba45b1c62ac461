"""Open whole-slide images and read RGB regions at a requested resolution.

OpenSlide handles the pyramidal formats (SVS, generic tiled TIFF, NDPI, MRXS, ...), with
the tiles of SVS and tiled TIFF levels decoded directly (:mod:`inference.slides.tiff_tiles`);
small plain TIFF/PNG images are read whole. Everything downstream sees a :class:`Slide`,
whose pixels come through the small :class:`RegionReader` protocol, so tests and the
service's pixel uploads can pass a numpy-backed :class:`ArrayReader`.

Positions are (x, y) in level-0 pixels, sizes (width, height), as in openslide.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inference.errors import MissingMppError, ResolutionError, SlideFormatError, SlideNotFoundError
from inference.slides.openslide_reader import OpenSlideReader, qupath_frame
from inference.slides.reader import ArrayReader, ReducingReader, RegionReader
from inference.slides.tiff_tiles import TiffTileReader

# A plausible range for microns per pixel: below it the number is a misread tag, above
# it (72 dpi defaults give ~353 µm) the file carries a screen resolution, not a scan.
MPP_PLAUSIBLE_RANGE = (0.05, 50.0)
# A model reads at its own µm/px; an image whose pixels are coarser than that by more than this
# factor would be enlarged into detail the model never saw (and a 2048 px image stated at 50 µm/px,
# read at 1 µm/px, is 2,500 times its own pixels).
MAX_ENLARGEMENT = 2.0
# The fewest pixels on a thumbnail's short side (Slide.thumbnail): at 8 µm/px a 128 µm tile is 16 px, too few to tell
# its stain by (it went the H&E path by default) or to find pale tissue in (none found, nothing analysed); at 64 px
# both worked on the real Ki67 tiles at hand.
MIN_THUMBNAIL_SIDE_PX = 64
# How a caller's user gives an image's µm/px: from what to give (e.g. SCANNER_MPP), the advice, in lower case
# ("set it in QuPath to ..."); the service's users set it in QuPath, `pdl1 run`'s pass --mpp. The library's own
# (library_mpp_advice) names its argument, no program's option: a caller passes its users' words.
MppAdvice = Callable[[str], str]
SCANNER_MPP = "the scanner's µm/px (0.25 at 40x, 0.5 at 20x)"


def library_mpp_advice(value: str) -> str:
    """The advice of :class:`Slide`'s and :func:`open_slide`'s messages where the caller gives none.

    >>> library_mpp_advice(SCANNER_MPP)
    "pass the scanner's µm/px (0.25 at 40x, 0.5 at 20x) as mpp"
    """
    return f"pass {value} as mpp"


# Images opened without OpenSlide are read whole; beyond this they need a pyramidal format.
MAX_PLAIN_IMAGE_PX = 20_000 * 20_000
# The most pages of a TIFF opened without OpenSlide that are looked at: an image and its reduced-resolution levels
# are a few. Each page is parsed to be looked at (0.3 ms): a 5 MB file of 20 000 tiny pages held the service's
# request thread 6 s at each submission, and a larger file more.
MAX_PLAIN_TIFF_PAGES = 64
# The first bytes of a TIFF (classic and BigTIFF, either byte order), and the whole-slide formats built on
# TIFF: a file with either that no reader opens was most likely damaged on its way here.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
TIFF_SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".scn", ".bif", ".svslide", ".tif", ".tiff", ".qptiff"})


@dataclass(frozen=True)
class Mpp:
    """Microns per pixel at level 0 and where the number came from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


log = logging.getLogger(__name__)
# Pixel sizes of x and y further apart than this share of their mean are said (the analysis takes the mean).
NON_SQUARE_TOLERANCE = 0.01
_SAID_NON_SQUARE: set[str] = set()


class Slide:
    """An opened image with its pyramid and calibration.

    Use :func:`open_slide` to open a file; construct directly to wrap any :class:`RegionReader`.
    ``opaque`` (bool, level-0 (height, width)) says which pixels are the image's where some are not: an uploaded
    region's transparent pixels, read as white but no glass: their tissue is not known (:meth:`opaque_share`).
    None: all. ``file_mpp``: the pixel size the file itself states, where ``mpp`` is another's (a caller's, QuPath's)
    and the file's is plausible (:func:`open_slide`); None otherwise.
    """

    def __init__(
        self,
        reader: RegionReader,
        *,
        mpp: Mpp,
        path: Path | None = None,
        mpp_advice: MppAdvice | None = None,
        opaque: np.ndarray | None = None,
        file_mpp: Mpp | None = None,
    ):
        _require_plausible_mpp(mpp, path, mpp_advice)
        if opaque is not None and opaque.shape != reader.level_dimensions[0][::-1]:
            w, h = reader.level_dimensions[0]
            raise ValueError(f"opaque must be the image's level-0 (height, width) ({h}, {w}), got {opaque.shape}")
        if abs(mpp.x - mpp.y) > NON_SQUARE_TOLERANCE * mpp.mean and str(path) not in _SAID_NON_SQUARE:
            _SAID_NON_SQUARE.add(str(path))  # once per image: it is opened more than once an analysis
            log.warning(
                "%s: its pixels are not square (%g x %g µm, from %s); it is analysed at their mean, %g µm/px, so "
                "lengths along x come out x%.3g of the truth, along y x%.3g, and areas x%.3g: resample it to square "
                "pixels",
                path or "image",
                mpp.x,
                mpp.y,
                mpp.source,
                mpp.mean,
                mpp.mean / mpp.x,
                mpp.mean / mpp.y,
                mpp.mean**2 / (mpp.x * mpp.y),
            )
        self.reader = reader
        self.mpp = mpp
        self.opaque = opaque
        self.path = path
        self.mpp_advice = mpp_advice
        self.file_mpp = file_mpp
        self._thumbnail: tuple[float, np.ndarray] | None = None  # the last one read: (mpp, read-only RGB)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0."""
        return self.reader.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.reader.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.reader.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.reader.level_downsamples

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1 % slack)."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * 1.01 and level_ds >= self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, location_xy: tuple[int, int], level: int, size_wh: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (height, width, 3) at a pyramid level; ``location_xy`` in level-0 px."""
        return self.reader.read_region(location_xy, level, size_wh)

    def read_region_at_mpp(self, location_xy: tuple[int, int], size_wh: tuple[int, int], *, mpp: float) -> np.ndarray:
        """Read ``size_wh`` output pixels at ``mpp`` µm/px, starting at level-0 ``location_xy``.

        The coarsest pyramid level that is at least as fine as ``mpp`` is read and the
        rest is resampled (area averaging when shrinking, bilinear when enlarging).
        """
        w, h = size_wh
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size_wh}")
        level, scale = self.level_for_mpp(mpp)
        factor = _integer_step(scale)
        if factor is not None and isinstance(self.reader, ReducingReader):
            # An integer step (0.5 µm/px read at 1 µm/px): the same box average, done before conversion.
            return self.reader.read_region_reduced(location_xy, level, (w * factor, h * factor), factor)
        level_w, level_h = max(1, math.ceil(w * scale - 1e-6)), max(1, math.ceil(h * scale - 1e-6))
        rgb = self.reader.read_region(location_xy, level, (level_w, level_h))
        if (level_w, level_h) == (w, h):
            return rgb
        resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(rgb).resize((w, h), resample=resample))

    def integer_reduction(self, mpp: float) -> tuple[int, int] | None:
        """``(level, factor)`` when reading at ``mpp`` averages ``factor`` x ``factor`` boxes of a level.

        That is when ``mpp`` is an integer multiple (2 or more) of the chosen level's µm/px,
        as reading a 0.5 µm/px slide at 1 µm/px; otherwise None.
        """
        level, scale = self.level_for_mpp(mpp)
        factor = _integer_step(scale)
        return None if factor is None else (level, factor)

    def level_for_mpp(self, mpp: float) -> tuple[int, float]:
        """The pyramid level that reading at ``mpp`` µm/px reads, and its px per output px."""
        downsample = mpp / self.mpp.mean
        level = self.best_level_for_downsample(downsample)
        return level, downsample / self.level_downsamples[level]

    def thumbnail(self, *, mpp: float) -> np.ndarray:
        """The whole image at ``mpp`` µm/px as RGB uint8, or at its own µm/px where that is coarser.

        A whole image is never enlarged: at a coarse stated pixel size (a wrong ``--mpp``) that
        would hold many times the image in memory. A small image (a tile, an uploaded region) is read finer
        than ``mpp`` where its short side would be under :data:`MIN_THUMBNAIL_SIDE_PX`, down to its own µm/px.
        The caller takes the scale from the shape.
        The last thumbnail is kept, read-only: an analysis tells the stain and finds the tissue on the
        same one, and a whole slide's is read from disk once.
        """
        mpp = self.thumbnail_mpp(mpp)
        if self._thumbnail is None or self._thumbnail[0] != mpp:
            image = self._whole(mpp)
            image.flags.writeable = False
            self._thumbnail = (mpp, image)
        return self._thumbnail[1]

    def thumbnail_mpp(self, mpp: float) -> float:
        """The µm/px :meth:`thumbnail` reads the whole image at when asked for ``mpp``."""
        return max(min(mpp, min(self.dimensions) * self.mpp.mean / MIN_THUMBNAIL_SIDE_PX), self.mpp.mean)

    def opaque_share(self, *, mpp: float) -> np.ndarray | None:
        """float32 (height, width): the share of each pixel of :meth:`thumbnail` ``(mpp=mpp)`` that is opaque (the
        same size and level-0 extent, box-averaged as its pixels are); None where all pixels are.

        >>> opaque = np.zeros((128, 128), bool); opaque[:, :65] = True  # a 128 µm upload, opaque on the left
        >>> s = Slide(ArrayReader(np.zeros((128, 128, 3), np.uint8)), mpp=Mpp(1, 1, "t"), opaque=opaque)
        >>> share = s.opaque_share(mpp=8.0)  # the thumbnail keeps 64 px a side: 2 µm/px
        >>> share.shape, share[0, 31:34].round(2).tolist()
        ((64, 64), [1.0, 0.5, 0.0])
        """
        if self.opaque is None:
            return None
        downsample = self.thumbnail_mpp(mpp) / self.mpp.mean
        width, height = self.dimensions
        w, h = max(1, round(width / downsample)), max(1, round(height / downsample))
        # The level-0 px read_region_at_mpp reads for them (beyond the image: not opaque, as white fill).
        extent_w, extent_h = max(1, math.ceil(w * downsample - 1e-6)), max(1, math.ceil(h * downsample - 1e-6))
        alpha = np.zeros((extent_h, extent_w), np.uint8)
        part = self.opaque[:extent_h, :extent_w]
        alpha[: part.shape[0], : part.shape[1]] = part * np.uint8(255)
        shrunk = Image.fromarray(alpha).resize((w, h), resample=Image.Resampling.BOX)
        return np.asarray(shrunk, np.float32) / 255

    def whole_at_mpp(self, mpp: float, *, reader: str) -> np.ndarray:
        """The whole image at exactly ``mpp`` µm/px (as a model reads it) as RGB uint8.

        Refused (:meth:`require_resolution`) where that enlarges it beyond :data:`MAX_ENLARGEMENT`.
        """
        self.require_resolution(mpp, reader=reader)
        return self._whole(mpp)

    def _whole(self, mpp: float) -> np.ndarray:
        downsample = mpp / self.mpp.mean
        width, height = self.dimensions
        size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        return self.read_region_at_mpp((0, 0), size, mpp=mpp)

    def require_resolution(self, mpp: float, *, reader: str) -> None:
        """Raise :class:`ResolutionError` where reading at ``mpp`` enlarges the image more than :data:`MAX_ENLARGEMENT`.

        ``reader`` names what reads at ``mpp`` ("the segmentation model"), for the message
        (:func:`require_resolution`, with the image's own pixel size, path and advice).
        """
        require_resolution(self.mpp, mpp, reader=reader, path=self.path, mpp_advice=self.mpp_advice)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path}, {w}x{h}, levels={self.level_count}, mpp={self.mpp.mean:g})"


def require_resolution(
    image_mpp: Mpp,
    mpp: float,
    *,
    reader: str,
    path: str | Path | None = None,
    mpp_advice: MppAdvice | None = None,
    coarser_reader: str | None = None,
) -> None:
    """Raise :class:`ResolutionError` where reading an image of ``image_mpp`` at ``mpp`` µm/px enlarges it more than
    :data:`MAX_ENLARGEMENT`: :meth:`Slide.require_resolution`'s rule and message, for a caller that has the pixel size
    from a header alone (:func:`header_mpp`) and checks many images before it reads any.

    ``reader`` names what reads at ``mpp`` ("the segmentation model"); ``path`` the image; ``mpp_advice`` how the
    caller's user corrects a wrong pixel size (None: :func:`library_mpp_advice`). ``coarser_reader``: where the caller
    can read at another µm/px (training's --input-mpp), how it is given, for an image truly this coarse: the message
    names the finest µm/px that reads it (:data:`MAX_ENLARGEMENT` times finer than its pixels).

    >>> require_resolution(Mpp(1.0, 1.0, "header"), 0.5, reader="the nuclei model")  # twice: allowed
    >>> require_resolution(Mpp(2.0, 2.0, "header"), 0.5, reader="the nuclei model", path="a.svs")
    Traceback (most recent call last):
    ...
    inference.errors.ResolutionError: a.svs: its pixels are 2 µm (from header), but the nuclei model reads 0.5 µm/px: \
it would enlarge the image 4 times (at most 2 is allowed). Check the pixel size; if it is wrong, pass the scanner's \
µm/px (0.25 at 40x, 0.5 at 20x) as mpp. An image truly this coarse cannot be analysed
    >>> require_resolution(Mpp(2.0, 2.0, "header"), 0.5, reader="training", coarser_reader="--input-mpp")
    Traceback (most recent call last):
    ...
    inference.errors.ResolutionError: image: its pixels are 2 µm (from header), but training reads 0.5 µm/px: it would \
enlarge the image 4 times (at most 2 is allowed). Check the pixel size; if it is wrong, pass the scanner's µm/px (0.25 \
at 40x, 0.5 at 20x) as mpp. An image truly this coarse is read at 1 µm/px or coarser (--input-mpp), or left out
    """
    enlargement = image_mpp.mean / mpp
    if enlargement > MAX_ENLARGEMENT:
        check = f"Check the pixel size; if it is wrong, {(mpp_advice or library_mpp_advice)(SCANNER_MPP)}"
        truly = (
            "cannot be analysed"
            if coarser_reader is None
            else f"is read at {image_mpp.mean / MAX_ENLARGEMENT:g} µm/px or coarser ({coarser_reader}), or left out"
        )
        raise ResolutionError(
            f"{path or 'image'}: its pixels are {image_mpp.mean:g} µm (from {image_mpp.source}), but "
            f"{reader} reads {mpp:g} µm/px: it would enlarge the image {enlargement:.6g} times (at most "
            f"{MAX_ENLARGEMENT:g} is allowed). {check}. An image truly this coarse {truly}"
        )


def _integer_step(scale: float) -> int | None:
    # Level px per output px when that is a whole number of 2 or more, else None.
    factor = round(scale)
    return factor if factor >= 2 and abs(scale - factor) < 1e-6 else None


def _mpp_from_resolution(x_res: float, y_res: float, unit: str) -> tuple[float, float] | None:
    factor = {"centimeter": 10_000.0, "inch": 25_400.0}.get(unit.lower())
    if factor is None or x_res <= 0 or y_res <= 0:
        return None
    return factor / x_res, factor / y_res


def _openslide_mpp(props: dict[str, str]) -> Mpp | None:
    try:
        return Mpp(float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]), "openslide.mpp-x/y")
    except (KeyError, ValueError):
        pass
    try:
        pair = _mpp_from_resolution(
            float(props["tiff.XResolution"]), float(props["tiff.YResolution"]), props["tiff.ResolutionUnit"]
        )
    except (KeyError, ValueError):
        return None
    return Mpp(*pair, "TIFF resolution tags") if pair else None


# OME's length units, in µm (the OME schema's default unit is the micrometre).
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _ome_mpp(path: Path) -> Mpp | None:
    """The pixel size an OME-TIFF's OME-XML states (its first image's Pixels PhysicalSizeX/Y and their units); None
    for another file, or one that states none. QuPath's OME-TIFF export states it there and in no TIFF tag.

    >>> import tempfile, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "x.ome.tif"
    >>> tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    >>> _ome_mpp(path)
    Mpp(x=0.5, y=0.5, source='OME-XML PhysicalSizeX/Y')
    """
    import re

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
    except Exception:  # not a TIFF, or one tifffile does not read: its reader said so already, or will
        return None
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml or "")
    if pixels is None:
        return None
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', pixels.group(0)))
    try:
        sizes = [
            float(attrs[f"PhysicalSize{axis}"]) * _OME_UNIT_UM[attrs.get(f"PhysicalSize{axis}Unit", "µm")]
            for axis in "XY"
        ]
    except (KeyError, ValueError):
        return None
    return Mpp(sizes[0], sizes[1], "OME-XML PhysicalSizeX/Y") if min(sizes) > 0 else None


def unconvertible_samples(im: Image.Image) -> str | None:
    """What an opened Pillow image holds that ``convert("RGB")`` would not keep, else None: 16/32-bit integer and
    floating-point samples (clipped at 255: an image of white) and TIFFs of other than 1-4 channels (read as one).

    The words go after "got" or "has" in a message that says what to send instead.

    >>> unconvertible_samples(Image.new("I;16", (2, 2)))
    '16- or 32-bit integer samples (Pillow mode I;16), which would be clipped'
    >>> unconvertible_samples(Image.new("RGB", (2, 2))) is None
    True
    """
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        kind = "floating-point" if im.mode == "F" else "16- or 32-bit integer"
        return f"{kind} samples (Pillow mode {im.mode}), which would be clipped"
    channels = im.tag_v2.get(277) if im.format == "TIFF" else None  # SamplesPerPixel
    if channels is not None and channels not in (1, 2, 3, 4):
        return f"{channels} channels (a multiplexed or spectral image), which would be read as one"
    bits = im.tag_v2.get(258) if im.format == "TIFF" else None  # BitsPerSample: Pillow opens 16-bit RGB as "RGB"
    rawmodes = [t.args if isinstance(t.args, str) else (t.args or ("",))[0] for t in getattr(im, "tile", ())]
    if (bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 8) or any(
        ";16" in str(raw)
        for raw in rawmodes  # a 48-bit PNG opens as "RGB" too, its rawmode "RGB;16B"
    ):
        return "16-bit samples, of which only the high byte would be kept (12-bit data in 16 bits read nearly black)"
    return None


@contextmanager
def _plain_tiff_page(path: Path) -> Iterator[Any]:
    """A plain TIFF's first page (tifffile), refused before its pixels are read when it is too large to read
    whole or holds other than 8-bit samples; any error, also of what the ``with`` body reads, as a SlideFormatError."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.imagewidth * page.imagelength > MAX_PLAIN_IMAGE_PX:  # shape is (3, h, w) for planar samples
                raise SlideFormatError(
                    f"{path}: {page.imagewidth}x{page.imagelength} px is too large to read whole; "
                    "convert it to a pyramidal tiled TIFF (e.g. with `vips tiffsave --tile --pyramid`)"
                )
            if (
                page.dtype is not None and page.dtype != np.uint8
            ):  # known from the header: not decoded only to be refused
                raise SlideFormatError(
                    f"{path}: expected 8-bit RGB pixels, got {page.dtype}; save the image as 8-bit RGB"
                )
            size = (page.imagewidth, page.imagelength)
            pages = list(itertools.islice(tif.pages, MAX_PLAIN_TIFF_PAGES + 1))
            if len(pages) > MAX_PLAIN_TIFF_PAGES:
                raise SlideFormatError(
                    f"{path}: more than {MAX_PLAIN_TIFF_PAGES} pages, more than an image and its reduced-resolution "
                    "levels hold (a stack, or several scans in one file); save each image as a file of its own"
                )
            same = [p for p in pages if (p.imagewidth, p.imagelength) == size and not p.is_reduced]
            if len(same) > 1:  # page 1 alone was analysed; the rest of a stack, or other scans, dropped unsaid
                raise SlideFormatError(
                    f"{path}: {len(same)} images at full resolution (a stack, or several scans in one file), of which "
                    "only the first would be analysed; save each as a file of its own"
                )
            yield page
    except SlideFormatError:
        raise
    except Exception as err:
        damage = damage_advice(path)
        raise SlideFormatError(f"{path}: not a readable TIFF ({err})" + (f"; {damage}" if damage else "")) from err


@contextmanager
def _plain_pillow_image(path: Path) -> Iterator[Image.Image]:
    """A PNG/JPEG/... opened by Pillow, refused before its pixels are read when it is too large to read whole or
    holds samples RGB would not keep; any error, also of what the ``with`` body reads, as a SlideFormatError."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PLAIN_IMAGE_PX:
                raise SlideFormatError(f"{path}: {im.width}x{im.height} px is too large to read whole")
            kind = unconvertible_samples(im)
            if kind is not None:
                raise SlideFormatError(f"{path}: expected 8-bit RGB pixels, got {kind}; save the image as 8-bit RGB")
            yield im
    except SlideFormatError:
        raise
    except Exception as err:
        cut_short = any(w in str(err).lower() for w in _PILLOW_CUT_SHORT)  # a PNG or JPEG whose copy stopped early
        expected = (
            damage_advice(path)
            or (_damaged("its data ends before the image does") if cut_short else None)
            or "expected a whole-slide format (SVS, NDPI, MRXS, tiled TIFF, ...) or a small TIFF/PNG/JPEG"
        )
        raise SlideFormatError(f"{path}: neither OpenSlide nor Pillow can read it ({err}); {expected}") from err


# What Pillow says of a PNG or JPEG that ends before its data does ("image file is truncated", a PNG's "broken data
# stream", zlib's "incomplete or truncated stream").
_PILLOW_CUT_SHORT = ("truncated", "broken data stream", "premature end", "unexpected end")


def _is_tiff_name(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _over_white(pixels: np.ndarray, *, premultiplied: bool = False) -> np.ndarray:
    """Colour (or grey) samples with alpha last, laid over white: a transparent pixel is no tissue, as OpenSlide gives
    it (read as it is, the black often under it was analysed as dark tissue). ``premultiplied``: the colour is
    already scaled by alpha (a TIFF's associated alpha).

    >>> _over_white(np.array([[[0, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 51]]], np.uint8)).tolist()
    [[[255, 255, 255], [10, 20, 30], [204, 204, 204]]]
    >>> _over_white(np.array([[[50, 50, 50, 127]]], np.uint8), premultiplied=True).tolist()
    [[[178, 178, 178]]]
    """
    alpha = pixels[..., -1:].astype(np.float32) / 255.0
    colour = pixels[..., :-1].astype(np.float32)
    shown = colour if premultiplied else colour * alpha
    return np.clip(np.round(shown + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)


def has_alpha(im: Image.Image) -> bool:
    """Whether an opened Pillow image says, per pixel, how transparent it is (an alpha band, or a palette or colour
    key marked transparent), which ``convert("RGB")`` would drop, keeping what lies under it (often black).

    >>> has_alpha(Image.new("RGBA", (2, 2))), has_alpha(Image.new("RGB", (2, 2)))
    (True, False)
    """
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def _pillow_rgb(im: Image.Image) -> np.ndarray:
    """A Pillow image's pixels as RGB, transparent ones white (:func:`_over_white`); palette, CMYK and the other
    modes converted as Pillow converts them."""
    if has_alpha(im):
        return _over_white(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))


# TIFF PhotometricInterpretation values tifffile's samples are as shown: grey (0 white is zero, 1 black is zero), RGB.
_TIFF_AS_SHOWN = (0, 1, 2)


def _tiff_pixels(page: Any, path: Path) -> np.ndarray:
    """A plain TIFF page's pixels as a viewer shows them: RGB, or grey (H, W), transparent pixels white. tifffile
    gives the stored samples, which are that only for grey and RGB: a palette TIFF's are indices (read as grey), a
    CMYK one's C, M, Y (read as R, G, B), so those, and uncompressed YCbCr and Lab, are converted by Pillow; samples
    stored plane by plane are put pixel by pixel."""
    photometric, compression = int(page.photometric), int(page.compression)
    if photometric not in _TIFF_AS_SHOWN and not (photometric == 6 and compression in (6, 7)):  # JPEG's YCbCr: RGB
        with Image.open(path) as im:
            return _pillow_rgb(im)
    pixels = page.asarray()
    if int(page.planarconfig) == 2 and pixels.ndim == 3:  # (samples, height, width)
        pixels = np.moveaxis(pixels, 0, -1)
    extra = tuple(int(e) for e in (page.extrasamples or ()))
    colours = pixels.shape[-1] - len(extra) if pixels.ndim == 3 else 1
    if photometric == 0:  # white is zero: its grey turned before it is laid over white
        pixels = pixels.copy()
        pixels[..., :colours] = 255 - pixels[..., :colours]
    if pixels.ndim == 3 and extra and extra[0] in (1, 2):  # associated or unassociated alpha, after the colour
        pixels = _over_white(pixels[..., : colours + 1], premultiplied=extra[0] == 1)
    elif pixels.ndim == 3 and extra:  # unspecified extra samples: not shown
        pixels = pixels[..., :colours]
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return pixels


def _tiff_page_mpp(page: Any) -> Mpp | None:
    """The pixel size a plain TIFF page's resolution tags state (tifffile's page; its pixels are not read)."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    xr, yr = tags["XResolution"].value, tags["YResolution"].value
    unit = {2: "inch", 3: "centimeter"}.get(int(tags["ResolutionUnit"].value), "none")
    pair = _mpp_from_resolution(xr[0] / xr[1], yr[0] / yr[1], unit)
    return Mpp(*pair, "TIFF resolution tags") if pair else None


def _pillow_mpp(im: Image.Image) -> Mpp | None:
    """The pixel size an opened Pillow image's dpi states (its header's; the pixels are not decoded)."""
    dpi = im.info.get("dpi")
    if dpi and dpi[0] > 0 and dpi[1] > 0:
        return Mpp(25_400.0 / dpi[0], 25_400.0 / dpi[1], "image dpi")
    return None


def _read_plain_image(path: Path) -> tuple[np.ndarray, Mpp | None]:
    """Read a small non-pyramidal TIFF/PNG/JPEG whole, with its resolution if stated."""
    if _is_tiff_name(path):
        with _plain_tiff_page(path) as page:
            rgb = _tiff_pixels(page, path)
            mpp = _tiff_page_mpp(page)
    else:
        with _plain_pillow_image(path) as im:
            rgb = _pillow_rgb(im)
            mpp = _pillow_mpp(im)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    if rgb.dtype != np.uint8:
        raise SlideFormatError(f"{path}: expected 8-bit RGB pixels, got {rgb.dtype}; save the image as 8-bit RGB")
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise SlideFormatError(
            f"{path}: expected RGB or grey pixels, got {rgb.shape[-1] if rgb.ndim == 3 else 'no'} channels per pixel "
            "(a multiplexed or spectral image?); save the image as 8-bit RGB"
        )
    return rgb, mpp


def damage_sign(path: Path) -> str | None:
    """What shows that a file no reader opens is a damaged slide rather than another kind of file: a TIFF
    whose image data runs past its end (a copy cut short), one whose structure does not read, or a
    whole-slide name (.svs, ...) on a file that does not start as a TIFF. None when nothing shows it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    suffix = path.suffix.lower()
    if size == 0:
        return "it is empty (0 bytes)"
    if head not in TIFF_MAGIC:
        return None if suffix not in TIFF_SLIDE_SUFFIXES else f"it does not start as a TIFF, as a {suffix} file does"
    import tifffile

    quiet = logging.getLogger("tifffile")  # it logs each broken page too; the message here says it once
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        with tifffile.TiffFile(path) as tif:
            end = max(
                (
                    offset + count
                    for page in itertools.islice(tif.pages, MAX_PLAIN_TIFF_PAGES)  # as many as are looked at
                    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False)
                ),
                default=0,
            )
    except Exception as err:  # tifffile's errors on broken files are of many kinds
        return f"it starts as a TIFF, but its TIFF structure does not read ({err})"
    finally:
        quiet.disabled = was_disabled
    if end > size:
        return f"its image data runs to byte {end:,}, but the file has {size:,} bytes"
    return None


def damage_advice(path: Path) -> str | None:
    """For a file no reader opens: what says it looks damaged (:func:`damage_sign`) and the fix; None when
    nothing shows it, and the message then says which formats are expected."""
    sign = damage_sign(path)
    return None if sign is None else _damaged(sign)


def _damaged(sign: str) -> str:
    return (
        f"the file looks damaged or truncated, as an interrupted copy leaves it: {sign}; copy it again from the "
        "scanner or the archive, and check that the copy has the original's size"
    )


def format_unlike_name(path: Path) -> str | None:
    """The format Pillow reads in a plain image whose name says another (a JPEG renamed ``.svs``), else None:
    for the messages about such a file, which no whole-slide reader opens whatever its name."""
    try:
        with Image.open(path) as im:
            kind = im.format
    except Exception:  # Pillow's errors on files it cannot identify are of many kinds; the caller's message stands
        return None
    return kind if kind and Image.registered_extensions().get(path.suffix.lower()) != kind else None


def _no_mpp_message(path: Path, *, whole_slide: bool, advice: MppAdvice | None = None) -> str:
    """What to do about an image that states no pixel size: scanners and cameras differ."""
    if whole_slide:
        source = "the slide states no microns per pixel (no openslide.mpp-x, no TIFF resolution tags)"
        value = "the scanner's µm/px: 0.25 at 40x, 0.5 at 20x"
    else:
        kind = format_unlike_name(path)
        source = (
            f"a plain {path.suffix.lstrip('.').upper() or 'image'} file states no microns per pixel"
            if kind is None
            # a JPEG renamed .svs was "a plain SVS file", which a scanner's SVS never is
            else (
                f"a {kind} image, though named {path.suffix} (no whole-slide reader opens it: check that it is the "
                "file you meant), states no microns per pixel"
            )
        )
        value = (
            "the µm/px of the scanner or camera it came from (for a microscope camera: its sensor pixel size "
            "divided by the total magnification, e.g. 3.45 µm / 20 = 0.17)"
        )
    told = (advice or library_mpp_advice)(value)
    return f"{path}: {source}. {told[:1].upper()}{told[1:]}"


def _why_not_a_file(path: Path) -> str:
    """Why ``path`` names no slide file, and what to do: a folder, a link to nothing (a moved slide or a share not
    mounted), a link that leads back to itself, a named pipe, socket or device, or nothing at all."""
    import os

    if path.is_dir():
        return "a folder, not a slide file; give the slide file in it"
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except FileNotFoundError:
            return (
                f"a symbolic link to {os.readlink(path)}, which does not exist: mount the share or restore the slide "
                "it leads to, or relink the image in QuPath if it moved"
            )
        except (OSError, RuntimeError):  # RuntimeError: a loop, before Python 3.13
            return "a symbolic link that leads back to itself: fix or remove that link"
    if path.exists():  # was "no such file" for a file that is there
        return "not a regular file (a named pipe, socket or device); give the slide file itself"
    return "no such file; check the path, or relink the image in QuPath if it moved"


def open_slide(
    path: str | Path,
    *,
    mpp: float | None = None,
    mpp_source: str = "the mpp given",
    mpp_advice: MppAdvice | None = None,
    openslide_only: bool = False,
) -> Slide:
    """Open an image file.

    Parameters
    ----------
    path
        A whole-slide file OpenSlide reads, or a small TIFF/PNG/JPEG.
    mpp
        Microns per pixel at level 0. Overrides the file's own value; required when
        the file states none.
    mpp_source
        Where ``mpp`` comes from, for messages ("--mpp", "QuPath project").
    mpp_advice
        How this caller's user gives an image's µm/px, for the messages that ask for it (see
        :data:`MppAdvice`); None: :func:`library_mpp_advice`, this argument's own name.
    openslide_only
        Read every pixel through OpenSlide: no direct decoding of SVS / tiled TIFF tiles
        (:class:`~inference.slides.tiff_tiles.TiffTileReader`), a way out if a file decodes differently.
        ``pdl1`` sets it from ``PDL1_OPENSLIDE_ONLY`` (:mod:`bridge.environment`).

    Raises
    ------
    SlideNotFoundError, SlideFormatError, MissingMppError
    """
    path = Path(path)
    osr = _openslide_or_none(path)
    if osr is None:
        rgb, file_mpp = _read_plain_image(path)
        reader: RegionReader = ArrayReader(rgb)
        whole_slide = False
    else:
        full_wh = tuple(osr.level_dimensions[0])
        origin_xy, size_wh = qupath_frame(dict(osr.properties), full_wh)
        if (origin_xy, size_wh) != ((0, 0), full_wh):  # a scanned-area box: read in QuPath's frame (its formats
            reader = OpenSlideReader(osr, origin_xy=origin_xy, size_wh=size_wh)  # are not decoded directly anyway)
        elif openslide_only:
            reader = OpenSlideReader(osr)
        else:
            reader = TiffTileReader.open(OpenSlideReader(osr), path)
        file_mpp = _openslide_mpp(dict(osr.properties))
        whole_slide = True
    try:
        resolved = _resolved_mpp(
            path, file_mpp, whole_slide=whole_slide, mpp=mpp, mpp_source=mpp_source, mpp_advice=mpp_advice
        )
        # The file's own statement beside a caller's, where it is plausible (a plain TIFF's default 72 dpi is not).
        own = file_mpp if mpp is not None and file_mpp is not None and _plausible(file_mpp) else None
        return Slide(reader, mpp=resolved, path=path, mpp_advice=mpp_advice, file_mpp=own)
    except MissingMppError:
        reader.close()
        raise


def header_mpp(
    path: str | Path,
    *,
    mpp: float | None = None,
    mpp_source: str = "the mpp given",
    mpp_advice: MppAdvice | None = None,
) -> Mpp:
    """The µm/px at which :func:`open_slide`, given the same arguments, opens an image, read from its header alone.

    For a caller about to read many images, to refuse those that state no usable pixel size (none, or one outside
    :data:`MPP_PLAUSIBLE_RANGE`) before the first is analysed, not when each one's turn comes: it raises what
    ``open_slide`` raises for the pixel size, with the same messages (``mpp_advice`` as there), and what it
    raises for the file itself (missing, no reader opens it, a plain image too large to read whole or of other
    than 8-bit samples). No pixel is read.

    Raises
    ------
    SlideNotFoundError, SlideFormatError, MissingMppError
    """
    path = Path(path)
    osr = _openslide_or_none(path)
    if osr is None:
        whole_slide = False
        if _is_tiff_name(path):
            with _plain_tiff_page(path) as page:
                file_mpp = _tiff_page_mpp(page)
        else:
            with _plain_pillow_image(path) as im:
                file_mpp = _pillow_mpp(im)
    else:
        whole_slide = True
        try:
            file_mpp = _openslide_mpp(dict(osr.properties))
        finally:
            osr.close()
    resolved = _resolved_mpp(
        path, file_mpp, whole_slide=whole_slide, mpp=mpp, mpp_source=mpp_source, mpp_advice=mpp_advice
    )
    _require_plausible_mpp(resolved, path, mpp_advice)
    return resolved


def _resolved_mpp(
    path: Path,
    file_mpp: Mpp | None,
    *,
    whole_slide: bool,
    mpp: float | None,
    mpp_source: str,
    mpp_advice: MppAdvice | None,
) -> Mpp:
    """The pixel size an image is opened at: ``mpp`` where given, else the file's own (``file_mpp``, or an
    OME-TIFF's statement); :class:`MissingMppError` where ``mpp`` is not positive or neither states one."""
    if mpp is not None:
        if mpp <= 0:
            raise MissingMppError(f"{path}: microns per pixel must be positive, got {mpp:g} (from {mpp_source})")
        return Mpp(mpp, mpp, mpp_source)
    if (file_mpp is None or file_mpp.source == "TIFF resolution tags") and (ome := _ome_mpp(path)) is not None:
        return ome  # an OME-TIFF's own statement, over the 72-dpi default tags some writers add
    if file_mpp is None:
        raise MissingMppError(_no_mpp_message(path, whole_slide=whole_slide, advice=mpp_advice))
    return file_mpp


def _plausible(mpp: Mpp) -> bool:
    return MPP_PLAUSIBLE_RANGE[0] <= mpp.mean <= MPP_PLAUSIBLE_RANGE[1]  # False for NaN too


def _require_plausible_mpp(mpp: Mpp, path: Path | None, advice: MppAdvice | None) -> None:
    """:class:`MissingMppError` where ``mpp`` lies outside :data:`MPP_PLAUSIBLE_RANGE` (NaN too), its message
    ending with ``advice`` (None: :func:`library_mpp_advice`)."""
    if not _plausible(mpp):
        told = (advice or library_mpp_advice)(SCANNER_MPP)
        raise MissingMppError(
            f"{path or 'image'}: microns per pixel {mpp.mean:g} (from {mpp.source}) is outside the "
            f"plausible range {MPP_PLAUSIBLE_RANGE}; {told}"
        )


def slide_size(path: str | Path) -> tuple[int, int]:
    """The (width, height) in level-0 px at which :func:`open_slide` opens an image, read from its header alone.

    For a caller that must know, before any pixel is read, whether an image opens and in which frame (the
    service, when a job is submitted): it refuses what ``open_slide`` refuses for the file itself, with the same
    messages (no reader opens it; a plain image too large to read whole or of other than 8-bit samples), but not
    a missing or implausible MPP, which a caller may give.

    Raises
    ------
    SlideNotFoundError, SlideFormatError
    """
    path = Path(path)
    osr = _openslide_or_none(path)
    if osr is None:
        if _is_tiff_name(path):
            with _plain_tiff_page(path) as page:
                return int(page.imagewidth), int(page.imagelength)
        with _plain_pillow_image(path) as im:
            return im.size
    try:
        return qupath_frame(dict(osr.properties), tuple(osr.level_dimensions[0]))[1]
    finally:
        osr.close()


def _openslide_or_none(path: Path) -> Any:
    """The file opened by OpenSlide; None where it is no format OpenSlide knows (a plain image, read otherwise).
    :func:`open_slide` and :func:`slide_size` refuse a missing file and one OpenSlide fails on alike.

    Raises
    ------
    SlideNotFoundError, SlideFormatError
    """
    import openslide

    if not path.is_file():
        raise SlideNotFoundError(f"slide not found: {path} ({_why_not_a_file(path)})")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        return None
    except openslide.OpenSlideError as err:
        damage = damage_advice(path)
        raise SlideFormatError(f"{path}: OpenSlide cannot read it: {err}" + (f"; {damage}" if damage else "")) from err
