"""Uploaded regions (PNG or TIFF bytes): refused before they queue when no analysis could use them, decoded when
their job starts."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from shapely.geometry import MultiPolygon, Polygon
from shapely.ops import unary_union

from inference import (
    ArrayReader,
    Mpp,
    Slide,
    SlideFormatError,
    has_alpha,
    mask_to_polygons,
    unconvertible_samples,
)

if TYPE_CHECKING:
    from PIL import Image

# Where an upload's client gives its µm/px: the request's mpp query parameter, per uploaded pixel (a region
# read at a downsample has pixels that many times the scanner's).
_UPLOAD_MPP_SOURCE = "the mpp query parameter"


# The formats an upload is read as (Image.open's formats). Pillow opens many more, some through other programs (EPS
# through Ghostscript) or decoders no region needs; a body in any other is refused as no PNG or TIFF. JPEG and GIF
# are kept: clients sent them before.
UPLOAD_FORMATS = ("PNG", "TIFF", "JPEG", "GIF")
UPLOAD_MEDIA_TYPES = ("image/png", "image/tiff", "image/jpeg", "image/gif")  # the same, for the OpenAPI schema
# The most pages or frames of an upload that are looked at: a region is one page, perhaps with its reduced-resolution
# levels; finding more walked every page of the file (a 2 MB TIFF holds 20 000) while the service answered no one.
MAX_UPLOAD_PAGES = 64


def _upload_mpp_advice(value: str) -> str:
    return f"send as mpp the µm per uploaded pixel: {value} times the downsample the region was read at"


def check_upload(body: bytes, *, mpp: float, max_px: int, content_type: str | None = None) -> None:
    """Refuse, before it queues, an upload that is no image, too large, or at an implausible MPP.

    Only the header is read here; the pixels are decoded when the job starts (a PNG's chunks after its pixels, an
    orientation among them, are read then: :func:`_decoded`).
    """
    from PIL import Image, UnidentifiedImageError

    expected = "expected the region's PNG or TIFF bytes (Content-Type: image/png or image/tiff)"
    if not body:
        raise SlideFormatError(f"the request body is empty; {expected}")
    rgb8 = (
        "expected 8-bit RGB (or greyscale) pixels of a brightfield region, as QuPath shows it: export the region "
        "as an 8-bit RGB PNG or TIFF"
    )
    try:
        with Image.open(io.BytesIO(body), formats=UPLOAD_FORMATS) as im:
            width, height = im.size
            kind = unconvertible_samples(im)
            pages = _full_resolution_frames(im)
            orientation = _stored_orientation(im)
    except Image.DecompressionBombError as err:  # a header stating more pixels than Pillow will decode
        stated = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(stated.group(1))} px" if stated else f"more than {2 * Image.MAX_IMAGE_PIXELS} px"
        raise SlideFormatError(
            f"upload of {size} (as its header states) is over {min(max_px, 2 * Image.MAX_IMAGE_PIXELS)} px; "
            "send a smaller region or a lower resolution (downsample)"
        ) from err
    except UnidentifiedImageError as err:  # its message names only the in-memory file object
        damaged = _damaged_header(body)
        if damaged is not None:
            raise SlideFormatError(damaged) from err
        if body[:4] in (b"II*\x00", b"MM\x00*"):  # TIFF, with samples Pillow does not decode (e.g. floating point)
            raise SlideFormatError(
                f"the request body ({len(body)} bytes) is a TIFF whose pixels cannot be decoded (floating-point or "
                f"other samples it cannot read as colours); {rgb8}"
            ) from err
        form = (content_type or "").split(";")[0].strip().lower()
        # curl -F, requests' files= or data=dict, a browser form (curl --data-binary's own default Content-Type
        # is the urlencoded one, so a form's type with the image's bytes is taken as the image above, and with
        # other bytes, a BMP's say, is told that they are no PNG or TIFF, not to use --data-binary)
        if _looks_like_form(body, form):
            raise SlideFormatError(
                f"the request body is a form (Content-Type: {form}), not the image itself; {expected}, sent as the "
                "whole body: curl --data-binary @region.png -H 'Content-Type: image/png', requests.post(url, "
                "data=png_bytes)"
            ) from err
        raise SlideFormatError(
            f"the request body ({len(body)} bytes, starting {body[:8]!r}) is not a PNG or TIFF image; {expected}"
        ) from err
    except Exception as err:  # PIL raises several types for unreadable headers; all mean the same here
        damaged = _damaged_header(body)
        if damaged is not None:
            raise SlideFormatError(damaged) from err
        raise SlideFormatError(
            f"body is not a PNG/TIFF image ({type(err).__name__}: {err}); send the region's PNG or TIFF bytes"
        ) from err
    if kind is not None:  # converted to RGB, they would be clipped at 255: an image of white, analysed
        raise SlideFormatError(f"the uploaded image has {kind}; {rgb8}")
    _refuse_orientation(orientation)
    if pages is None:
        raise SlideFormatError(
            f"the uploaded image has more than {MAX_UPLOAD_PAGES} pages or frames, more than a region and its "
            "reduced-resolution levels hold; send one region as a single-page PNG or TIFF (one upload per region)"
        )
    if pages > 1:  # only the first would be decoded: the rest of a stack or animation dropped unsaid
        raise SlideFormatError(
            f"the uploaded image has {pages} pages or frames at full resolution (a stack or an animation), of which "
            "only the first would be analysed; send one region as a single-page PNG or TIFF (one upload per region)"
        )
    if width * height > max_px:
        raise SlideFormatError(
            f"upload of {width}x{height} px is over {max_px} px; send a smaller region or a lower resolution "
            "(downsample)"
        )
    # Slide checks the MPP's plausible range; a 1-px stand-in runs that check without the pixels.
    Slide(
        ArrayReader(np.zeros((1, 1, 3), np.uint8)),
        mpp=Mpp(mpp, mpp, _UPLOAD_MPP_SOURCE),
        mpp_advice=_upload_mpp_advice,
    ).close()


# What a URL-encoded form's body is made of (RFC 3986's unreserved characters, percent escapes, + for a space, and the
# separators and sub-delimiters clients leave unescaped).
_URLENCODED = re.compile(rb"[A-Za-z0-9\-._~%+=&;*!'(),/:@$?\[\]]*")


def _looks_like_form(body: bytes, content_type: str) -> bool:
    """Whether a body that is no image is a form, as its Content-Type says and its start agrees: a multipart
    form's starts with its boundary (``--``), a URL-encoded form's holds ``name=value`` in URL-safe bytes.

    >>> _looks_like_form(b"image=x&mpp=0.5", "application/x-www-form-urlencoded")
    True
    >>> _looks_like_form(b"BM6\\x00\\x00\\x00", "application/x-www-form-urlencoded")
    False
    """
    start = body[:4096]
    if content_type == "multipart/form-data":
        return start.lstrip(b"\r\n").startswith(b"--")
    if content_type == "application/x-www-form-urlencoded":
        return b"=" in start and _URLENCODED.fullmatch(start) is not None
    return False


def _damaged_header(body: bytes) -> str | None:
    """Why a body that starts as a PNG or TIFF has no header Pillow reads, when it is cut short or damaged (as
    an interrupted transfer leaves it), else None (a TIFF whose samples Pillow does not decode)."""
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        kind = "PNG"
    elif body[:4] in (b"II*\x00", b"MM\x00*"):
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(body)) as tif:
                tif.pages[0].shape  # noqa: B018 - reads the first page's header
        except Exception:  # tifffile raises several types for a cut or damaged header; all mean the same here
            kind = "TIFF"
        else:
            return None
    else:
        return None
    return (
        f"the request body ({len(body)} bytes) starts as a {kind} but is cut short or damaged before its pixels "
        f"begin; send the complete {kind} file (an interrupted transfer or a partial read sends only its start)"
    )


def _stored_orientation(im: Image.Image) -> int:
    """The EXIF/TIFF Orientation (tag 274; 1 is as stored, 0 unset) of an opened image, read from what its header
    holds: Pillow's PNG reader decodes the whole image for it when no eXIf chunk comes before the pixels (an 8192²
    RGBA PNG of 359 kB took 0.8 s and 256 MB at submission), so a PNG's is read from the chunks before its pixels;
    one after them is refused when the job decodes it (:func:`_decoded`)."""
    from PIL import Image, PngImagePlugin

    if isinstance(im, PngImagePlugin.PngImageFile):
        return Image.Image.getexif(im).get(0x0112, 1)  # Image's own: from im.info, the chunks read so far
    return im.getexif().get(0x0112, 1)


def _refuse_orientation(orientation: int) -> None:
    if orientation not in (1, 0):  # viewers turn it; the pixels (and so the results' places) are as stored
        raise SlideFormatError(
            f"the uploaded image carries an orientation tag ({orientation}: {_ORIENTATIONS.get(orientation, 'unknown')}"
            "), so it is shown turned or mirrored but analysed as stored, and its results would not lie over the "
            "region; send the region's pixels as QuPath reads them, without an orientation tag (an exported PNG or "
            "TIFF; for a JPEG, turn the pixels and drop the tag, e.g. PIL.ImageOps.exif_transpose)"
        )


# EXIF/TIFF Orientation values (tag 274) other than 1, as a viewer shows the stored pixels.
_ORIENTATIONS = {
    2: "mirrored",
    3: "turned 180°",
    4: "flipped upside down",
    5: "mirrored and turned 90°",
    6: "turned 90° clockwise",
    7: "mirrored and turned 90° anticlockwise",
    8: "turned 90° anticlockwise",
}


def _full_resolution_frames(im: Image.Image) -> int | None:
    """How many frames (TIFF pages, animation frames) an opened image holds, not counting a TIFF's
    reduced-resolution pages (a pyramid's levels or a thumbnail, NewSubfileType bit 0), which add nothing;
    None when it holds more than :data:`MAX_UPLOAD_PAGES` pages in all.

    The pages are visited one by one up to that bound (``n_frames`` walks the whole file first)."""
    full = 0
    for index in range(MAX_UPLOAD_PAGES + 1):
        try:
            im.seek(index)
        except EOFError:
            break
        if index == MAX_UPLOAD_PAGES:
            return None
        full += im.format != "TIFF" or not int(im.tag_v2.get(254, 0)) & 1  # NewSubfileType
    im.seek(0)
    return full


# An upload's alpha says what each pixel is (pdl1_analyze.groovy sends all three): 255 inside the ROI, analysed and
# reported; 1 to 254 context, the tissue around the ROI, which the analysis sees (a tile's surroundings, the tissue
# detector's image) but reports nothing in; 0 absent, no part of the image. An upload without alpha is all ROI.
ROI_ALPHA = 255


@dataclass(frozen=True)
class UploadPixels:
    """An upload's decoded pixels: ``rgb`` (uint8 (height, width, 3)), absent ones white, context and ROI ones as
    sent (not composited over white); ``roi`` (bool (height, width)) where alpha is 255 and ``known`` where it is
    above 0 (the ROI and its context). None: everywhere."""

    rgb: np.ndarray
    roi: np.ndarray | None
    known: np.ndarray | None


def _decoded(body: bytes) -> UploadPixels:
    """An upload's pixels and what each is by its alpha (:data:`ROI_ALPHA`).

    A client that sends only alpha 0 and 255 (as all did before context) is analysed as before: its opaque pixels,
    its transparent ones absent. Context without a single ROI pixel leaves nothing to report: refused.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body), formats=UPLOAD_FORMATS) as im:
            im.load()
            orientation = im.getexif().get(0x0112, 1)  # a PNG's chunks after its pixels too, read only now
            if orientation in (1, 0):
                if not has_alpha(im):
                    return UploadPixels(np.asarray(im.convert("RGB")), None, None)
                # convert("RGB") drops alpha and keeps what lies under it, often black: analysed as dark tissue.
                rgba = np.asarray(im.convert("RGBA"))
    except Exception as err:  # a header that read but pixels that do not (truncated, corrupt)
        raise SlideFormatError(
            f"the uploaded image cannot be decoded ({type(err).__name__}: {err}); send a complete PNG or TIFF"
        ) from err
    _refuse_orientation(orientation)
    alpha = rgba[..., 3]
    roi, known = alpha == ROI_ALPHA, alpha > 0
    if not known.any():  # it was a finished job saying "almost no tissue"
        raise SlideFormatError(
            "every pixel of the upload is transparent (alpha 0), so there is nothing to analyse; send the ROI's "
            "pixels with alpha 255 (pdl1_analyze.groovy does)"
        )
    if known.any() and not roi.any():
        raise SlideFormatError(
            "the upload has context pixels (alpha 1 to 254) but none inside its ROI (alpha 255), so nothing in it "
            "would be reported; send the ROI's pixels with alpha 255 (pdl1_analyze.groovy does), the tissue around "
            "it with alpha 1 to 254 and absent pixels with alpha 0"
        )
    # The absent pixels read white (the tissue detector takes them for unknown, not for glass); the context keeps
    # its colour, as the tissue around a path job's ROI has it.
    rgb = np.where((alpha == 0)[..., None], np.uint8(255), rgba[..., :3])
    return UploadPixels(rgb, None if roi.all() else roi, None if known.all() else known)


def opaque_area(opaque: np.ndarray) -> Polygon | MultiPolygon | None:
    """The outline of an upload's ROI pixels (alpha 255, ``opaque``) in its own px, as the ROI it is analysed in: a
    client sends a region around its ROI with the pixels outside it context or transparent (pdl1_analyze.groovy),
    so the results are made of the ROI's pixels alone (regions of pixels whose centres lie in it, tiles trimmed to
    it, nuclei in it), as a job on the image's path makes them. The outline runs along the pixels' edges (pixel
    (r, c) spans x c to c + 1), so it holds exactly their centres. None where no pixel is in it: the whole upload is
    analysed, as glass.

    >>> m = np.zeros((4, 6), bool); m[1:3, 1:5] = True
    >>> opaque_area(m).bounds, opaque_area(np.zeros((2, 2), bool))
    ((1.0, 1.0, 5.0, 3.0), None)
    """
    if not opaque.any():
        return None
    polygons, _labels = mask_to_polygons(opaque)
    area = unary_union(polygons).simplify(0)  # the vertices along each pixel edge that add nothing
    return area if isinstance(area, Polygon | MultiPolygon) else None


def grid_padding_px(origin_xy: tuple[float, float], *, scale: float, cell_px: float) -> tuple[int, int]:
    """The uploaded px to add left and above a region so that its top-left corner lies on the grid a job on the
    image's file lays from the image's level-0 origin, in cells of ``cell_px`` uploaded px (the nearest such
    corner where the origin falls between uploaded px). ``origin_xy`` is the region's level-0 corner and
    ``scale`` its level-0 px per uploaded px.

    An analysis lays its grids (the segmentation's tiles and 8 µm map cells, the nuclei tiles) from its image's
    corner: an upload's from the region's, so at (200, 300) on a 0.5 µm/px slide its cells lay half a cell off
    the file's, and the PD-L1 positive regions made of them differed more (IoU 0.932 against 0.992 on the same
    pixels, the tests' octagon).

    >>> grid_padding_px((200.0, 300.0), scale=2.0, cell_px=8.0)  # the file's cells lie every 16 level-0 px
    (4, 6)
    >>> grid_padding_px((192.0, 0.0), scale=2.0, cell_px=8.0)
    (0, 0)
    """
    if cell_px < 2:
        return (0, 0)
    period = round(cell_px)
    return tuple(round((v / scale) % cell_px) % period for v in origin_xy)  # type: ignore[return-value]


@contextmanager
def decoded_upload(body: bytes, *, mpp: float | None) -> Iterator[Slide]:
    """The uploaded region as a slide, decoded now that its job runs."""
    with opened_upload(body, mpp=mpp) as upload:
        yield upload.slide


@dataclass(frozen=True)
class OpenedUpload:
    """An uploaded region decoded for its job: the slide, the area to analyse in it (its opaque pixels' outline,
    :func:`opaque_area`; None: all of it) and the level-0 corner its px 0 lies at (the region's, less any
    padding that put it on the file's grid, :func:`grid_padding_px`)."""

    slide: Slide
    area: Polygon | MultiPolygon | None
    origin_xy: tuple[float, float]


@contextmanager
def opened_upload(
    body: bytes,
    *,
    mpp: float | None,
    origin_xy: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    grid_um: float | None = None,
) -> Iterator[OpenedUpload]:
    """The uploaded region as a slide, decoded now that its job runs, padded (with absent px) on the left and top
    so that its grids lie on the file's where ``grid_um`` (the analysis' coarsest grid, µm) is given.

    Its area is its ROI pixels' outline (alpha 255, :func:`opaque_area`); its context pixels are the image's, seen
    by the tiles over the ROI's edge and by the tissue detector as the tissue around a path job's ROI is; its
    transparent pixels are no part of the image (``Slide.opaque``): the tissue detector reads them as unknown, not
    as glass."""
    if mpp is None:
        raise ValueError("an upload needs its mpp")  # the endpoint requires it; a bug if missing
    pixels = _decoded(body)
    del body
    rgb, roi, known = pixels.rgb, pixels.roi, pixels.known
    pad_x, pad_y = (0, 0) if grid_um is None else grid_padding_px(origin_xy, scale=scale, cell_px=grid_um / mpp)
    if pad_x or pad_y:
        everywhere = np.ones(rgb.shape[:2], bool)
        rgb = np.pad(rgb, ((pad_y, 0), (pad_x, 0), (0, 0)), constant_values=255)  # white, as absent px read
        roi, known = (np.pad(everywhere if m is None else m, ((pad_y, 0), (pad_x, 0))) for m in (roi, known))
    area = None if roi is None else opaque_area(roi)
    slide = Slide(ArrayReader(rgb), mpp=Mpp(mpp, mpp, _UPLOAD_MPP_SOURCE), mpp_advice=_upload_mpp_advice, opaque=known)
    corner = (origin_xy[0] - pad_x * scale, origin_xy[1] - pad_y * scale)
    try:
        yield OpenedUpload(slide, area, corner)
    finally:
        slide.close()
