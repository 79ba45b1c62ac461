"""Phantom H&E slides with known PD-L1 truth: the data every test, demo and benchmark uses.

A phantom is procedural: every pixel is a function of its level-0 position, the seed and
the shift, so it is rendered tile by tile (any size up to 100k x 100k px without holding
the image) and is seamless across tiles and consistent across pyramid levels.

The scene, coarsest first:

* tissue pieces on glass, split into stroma and tumour nests;
* tumour nests are PD-L1 positive or negative by zone. The two differ by morphology
  visible in H&E, as nnUNet-B learns PD-L1 from H&E: positive nests have larger, oval,
  vesicular nuclei (pale chromatin, dark rim, nucleolus) in granular cytoplasm; negative
  nests have small, round, dense hyperchromatic nuclei. There is no colour code. As in real
  tissue, expression shows only partly in morphology: a smooth "morphology strength" field
  makes about a third of the positive area subtle (intermediate morphology), which is where
  a model misses positives and where its uncertainty should rise. ``weak_fraction`` adds
  weakly expressing patches (faint positive morphology, strength 0.15-0.45): whole positive
  areas that a model trained on clear cases tends to miss, the false negatives SUA is for;
* nuclei on jittered lattices: tumour nuclei (class from their zone) and sparse stromal
  spindle cells and lymphocytes (``Other``).

The positive zone threshold is set on the tumour nuclei themselves, so the truth TPS is
the requested one up to rounding. Truth lies beside the slide in ``<stem>.truth/``:
``truth.json`` (summary), ``positive_mask.tif`` (uint8 0/1 at ``truth_downsample``) and
``nuclei.csv`` (``x_px,y_px,class``, level-0 pixel centres).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from inference import __version__

NUCLEUS_CLASSES = ("Tumor: Positive", "Tumor: Negative", "Other")
POSITIVE, NEGATIVE, OTHER = 0, 1, 2

# Ruifrok & Johnston optical-density vectors (per unit concentration).
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.07, 0.99, 0.11])
_RESIDUAL_OD = np.array([0.27, 0.57, 0.78])

_COARSE_DS = 32  # level-0 px per scene-field cell
_TISSUE_FRACTION = 0.55
_TUMOUR_FRACTION_OF_TISSUE = 0.5
_TUMOUR_SPACING_UM = 10.0
_STROMA_SPACING_UM = 16.0
_MAX_NUCLEUS_RADIUS_UM = 5.5


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw.

    Attributes
    ----------
    width_px, height_px
        Level-0 size, 1024 to 100000 each.
    seed
        Everything is reproducible from it.
    mpp
        Microns per level-0 pixel.
    tps_percent
        Wanted tumour proportion score: positive tumour nuclei / all tumour nuclei x 100.
    shift
        Domain shift in [0, 1]: stain vectors, colour cast, blur and JPEG quality move away
        from the training domain as it grows.
    tile_size_px
        TIFF tile edge.
    truth_downsample
        Level-0 px per pixel of the truth mask.
    weak_fraction
        About this fraction of the positive area expresses weakly: patches of faint positive
        morphology (still positive in the truth), where models miss positives.
    """

    width_px: int
    height_px: int
    seed: int = 0
    mpp: float = 0.5
    tps_percent: float = 30.0
    shift: float = 0.0
    tile_size_px: int = 256
    truth_downsample: int = 8
    weak_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("width_px", "height_px"):
            value = getattr(self, name)
            if not 1024 <= value <= 100_000:
                raise ValueError(f"{name} must be in [1024, 100000], got {value}")
        if not 0 <= self.tps_percent <= 100:
            raise ValueError(f"tps_percent must be in [0, 100], got {self.tps_percent}")
        if not 0 <= self.shift <= 1:
            raise ValueError(f"shift must be in [0, 1], got {self.shift}")
        if not 0 <= self.weak_fraction < 1:
            raise ValueError(f"weak_fraction must be in [0, 1), got {self.weak_fraction}")
        if not 0.1 <= self.mpp <= 2.0:
            raise ValueError(f"mpp must be in [0.1, 2.0], got {self.mpp}")
        if self.tile_size_px % 16 or self.tile_size_px < 64:
            raise ValueError(f"tile_size_px must be a multiple of 16 and >= 64, got {self.tile_size_px}")
        if self.truth_downsample < 1 or self.tile_size_px % self.truth_downsample:
            raise ValueError("truth_downsample must divide tile_size_px")


@dataclass(frozen=True)
class PhantomTruth:
    """Where the truth of a written phantom lies, and its summary numbers."""

    slide_path: Path
    truth_dir: Path
    mask_path: Path
    nuclei_csv_path: Path
    summary: dict = field(default_factory=dict)


def truth_dir_for(slide_path: str | Path) -> Path:
    """The truth folder beside a phantom slide: ``dir/stem.truth``."""
    slide_path = Path(slide_path)
    return slide_path.with_name(slide_path.stem + ".truth")


# --------------------------------------------------------------------------- randomness


def _hash_uniform(seed: int, stream: int, i: np.ndarray, j: np.ndarray, k: int = 0) -> np.ndarray:
    """Counter-based uniform [0, 1) numbers: the same (seed, stream, i, j, k) gives the same value."""
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            + np.uint64(stream) * np.uint64(0xD1B54A32D192ED03)
            + np.asarray(i).astype(np.int64).astype(np.uint64) * np.uint64(0xABC98388FB8FAC03)
            + np.asarray(j).astype(np.int64).astype(np.uint64) * np.uint64(0x8CB92BA72F3D8DD7)
            + np.uint64(k) * np.uint64(0x2545F4914F6CDD1D)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    smooth = ndi.gaussian_filter(noise, sigma_cells, mode="wrap")
    return (smooth - smooth.mean()) / max(float(smooth.std()), 1e-6)


def _sample(grid: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear sample of a coarse field at level-0 positions (broadcasting xs, ys)."""
    gx = np.clip(xs / _COARSE_DS - 0.5, 0, grid.shape[1] - 1.001)
    gy = np.clip(ys / _COARSE_DS - 0.5, 0, grid.shape[0] - 1.001)
    x0 = gx.astype(np.int64)
    y0 = gy.astype(np.int64)
    fx = (gx - x0).astype(np.float32)
    fy = (gy - y0).astype(np.float32)
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


# --------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class _Stains:
    h_od: np.ndarray
    e_od: np.ndarray
    residual_od: np.ndarray
    h_scale: float
    e_scale: float
    cast_rgb: np.ndarray
    blur_um: float
    jpeg_quality: int


class PhantomScene:
    """The procedural scene of one phantom; :meth:`render` draws any region at any downsample."""

    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 7])
        cells = (math.ceil(spec.height_px / _COARSE_DS) + 2, math.ceil(spec.width_px / _COARSE_DS) + 2)
        um_per_cell = _COARSE_DS * spec.mpp
        tissue = _smooth_field(rng, cells, 450 / um_per_cell)
        # Pull tissue away from the slide edges so pieces have a visible border of glass.
        yy, xx = np.mgrid[0 : cells[0], 0 : cells[1]]
        edge = np.minimum.reduce([yy, xx, cells[0] - 1 - yy, cells[1] - 1 - xx]) / max(min(cells) * 0.08, 1)
        tissue = tissue - 3.0 * np.clip(1 - edge, 0, 1)
        self.tissue_field = tissue.astype(np.float32)
        self.tumour_field = _smooth_field(rng, cells, 120 / um_per_cell)
        self.positive_field = _smooth_field(rng, cells, 200 / um_per_cell)
        self.fibre_angle = float(rng.uniform(0, np.pi))
        self.tissue_threshold = float(np.quantile(self.tissue_field, 1 - _TISSUE_FRACTION))
        in_tissue = self.tissue_field > self.tissue_threshold
        tumour_values = self.tumour_field[in_tissue] if in_tissue.any() else self.tumour_field.ravel()
        self.tumour_threshold = float(np.quantile(tumour_values, 1 - _TUMOUR_FRACTION_OF_TISSUE))
        self.positive_threshold = self._positive_threshold()
        self.stains = self._stains(np.random.default_rng([spec.seed, 11]))
        self.morph_field = _smooth_field(np.random.default_rng([spec.seed, 13]), cells, 150 / um_per_cell)
        # Own stream, so a phantom without weak patches is the same bytes as before they existed.
        self.weak_field = _smooth_field(np.random.default_rng([spec.seed, 17]), cells, 100 / um_per_cell)
        self.weak_threshold = self._weak_threshold()

    # -- zones ------------------------------------------------------------------------
    def zones(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tissue, tumour, positive) bool masks at level-0 positions."""
        tissue = _sample(self.tissue_field, xs, ys) > self.tissue_threshold
        tumour = tissue & (_sample(self.tumour_field, xs, ys) > self.tumour_threshold)
        positive = tumour & (_sample(self.positive_field, xs, ys) > self.positive_threshold)
        return tissue, tumour, positive

    def strength(self, xs: np.ndarray, ys: np.ndarray, positive: np.ndarray) -> np.ndarray:
        """Morphology strength in [0, 1]: 0 is negative morphology, 1 fully positive; 0 outside positive nests."""
        morph = _sample(self.morph_field, xs, ys)
        s = np.clip(0.8 + 0.35 * morph, 0.35, 1.0)
        if self.spec.weak_fraction > 0:
            weak = _sample(self.weak_field, xs, ys) > self.weak_threshold
            s = np.where(weak, np.clip(0.3 + 0.1 * morph, 0.15, 0.45), s)
        return np.where(positive, s, 0.0)

    def _weak_threshold(self) -> float:
        """Quantile of the weak field over the positive cells, so ``weak_fraction`` of them are weak."""
        if self.spec.weak_fraction <= 0:
            return math.inf
        in_tissue = self.tissue_field > self.tissue_threshold
        positive = (
            in_tissue & (self.tumour_field > self.tumour_threshold) & (self.positive_field > self.positive_threshold)
        )
        values = self.weak_field[positive] if positive.any() else self.weak_field.ravel()
        return float(np.quantile(values, 1 - self.spec.weak_fraction))

    def _positive_threshold(self) -> float:
        """Quantile of the positive field over all tumour nuclei, so TPS is as requested."""
        tps = self.spec.tps_percent
        if tps <= 0:
            return math.inf
        if tps >= 100:
            return -math.inf
        values = []
        strip = 4096
        for y0 in range(0, self.spec.height_px, strip):
            centres = self._lattice(0, y0, self.spec.width_px, min(strip, self.spec.height_px - y0), "tumour")
            xs, ys = centres["x"], centres["y"]
            tissue = _sample(self.tissue_field, xs, ys) > self.tissue_threshold
            tumour = tissue & (_sample(self.tumour_field, xs, ys) > self.tumour_threshold)
            values.append(_sample(self.positive_field, xs[tumour], ys[tumour]))
        all_values = np.concatenate(values) if values else np.zeros(0)
        if all_values.size == 0:
            return math.inf
        return float(np.quantile(all_values, 1 - tps / 100))

    def _stains(self, rng: np.random.Generator) -> _Stains:
        shift = self.spec.shift

        def perturb(v: np.ndarray, amount: float) -> np.ndarray:
            out = np.clip(v + rng.normal(0, amount, 3), 0.02, None)
            return out / np.linalg.norm(out)

        return _Stains(
            h_od=perturb(_H_OD / np.linalg.norm(_H_OD), 0.03 + 0.25 * shift),
            e_od=perturb(_E_OD / np.linalg.norm(_E_OD), 0.03 + 0.25 * shift),
            residual_od=_RESIDUAL_OD,
            h_scale=float(rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.4, 0.4) * shift)),
            e_scale=float(rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.4, 0.4) * shift)),
            cast_rgb=rng.normal(0, 2 + 25 * shift, 3),
            blur_um=1.2 * shift,
            jpeg_quality=round(92 - 50 * shift),
        )

    # -- nuclei -----------------------------------------------------------------------
    def _lattice(self, x0: float, y0: float, w: float, h: float, kind: str) -> dict[str, np.ndarray]:
        """Jittered lattice points (candidate nucleus centres) whose centre lies in the box."""
        spacing_um, stream = (_TUMOUR_SPACING_UM, 1) if kind == "tumour" else (_STROMA_SPACING_UM, 2)
        s = spacing_um / self.spec.mpp
        i0, i1 = math.floor(x0 / s) - 1, math.ceil((x0 + w) / s) + 1
        j0, j1 = math.floor(y0 / s) - 1, math.ceil((y0 + h) / s) + 1
        jj, ii = np.mgrid[j0:j1, i0:i1]
        ii, jj = ii.ravel(), jj.ravel()
        seed = self.spec.seed
        xs = (ii + 0.5 + 0.6 * (_hash_uniform(seed, stream, ii, jj, 0) - 0.5)) * s
        ys = (jj + 0.5 + 0.6 * (_hash_uniform(seed, stream, ii, jj, 1) - 0.5)) * s
        inside = (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)
        return {"x": xs[inside], "y": ys[inside], "i": ii[inside], "j": jj[inside]}

    def nuclei(self, x0: float, y0: float, w: float, h: float) -> dict[str, np.ndarray]:
        """Nuclei whose centre lies in the level-0 box: positions, class, shape and texture."""
        seed = self.spec.seed
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "y", "cls", "a", "b", "angle", "kind", "s")}
        tum = self._lattice(x0, y0, w, h, "tumour")
        tissue, tumour, positive = self.zones(tum["x"], tum["y"])
        keep = tumour & (_hash_uniform(seed, 3, tum["i"], tum["j"]) < 0.93)
        ii, jj = tum["i"][keep], tum["j"][keep]
        pos = positive[keep]
        strength = self.strength(tum["x"][keep], tum["y"][keep], pos)
        u = _hash_uniform(seed, 4, ii, jj)
        v = _hash_uniform(seed, 5, ii, jj)
        radius_um = (1 - strength) * (2.7 + 0.8 * u) + strength * (3.9 + 1.4 * u)
        ratio = (1 - strength) * (0.86 + 0.14 * v) + strength * (0.62 + 0.2 * v)
        out["x"].append(tum["x"][keep])
        out["y"].append(tum["y"][keep])
        out["cls"].append(np.where(pos, POSITIVE, NEGATIVE))
        out["a"].append(radius_um)
        out["b"].append(radius_um * ratio)
        out["angle"].append(_hash_uniform(seed, 6, ii, jj) * np.pi)
        out["kind"].append(np.zeros(keep.sum(), np.int64))  # tumour: dense..vesicular by strength
        out["s"].append(strength)

        st = self._lattice(x0, y0, w, h, "stroma")
        tissue, tumour, _ = self.zones(st["x"], st["y"])
        keep = tissue & ~tumour & (_hash_uniform(seed, 7, st["i"], st["j"]) < 0.55)
        ii, jj = st["i"][keep], st["j"][keep]
        lympho = _hash_uniform(seed, 8, ii, jj) < 0.35
        u = _hash_uniform(seed, 9, ii, jj)
        out["x"].append(st["x"][keep])
        out["y"].append(st["y"][keep])
        out["cls"].append(np.full(keep.sum(), OTHER))
        out["a"].append(np.where(lympho, 2.2 + 0.5 * u, 4.0 + 1.2 * u))
        out["b"].append(np.where(lympho, 2.0 + 0.4 * u, 1.2 + 0.3 * u))
        out["angle"].append(np.where(lympho, u * np.pi, self.fibre_angle + (u - 0.5) * 0.6))
        out["kind"].append(np.where(lympho, 2, 3))  # 2 lymphocyte, 3 spindle
        out["s"].append(np.zeros(keep.sum()))
        return {k: np.concatenate(v) for k, v in out.items()}

    # -- rendering --------------------------------------------------------------------
    def render(self, x0: int, y0: int, width: int, height: int, downsample: float = 1.0) -> np.ndarray:
        """RGB uint8 (height, width, 3): pixel (r, c) spans level-0 [x0 + c*ds, x0 + (c+1)*ds)."""
        ds = float(downsample)
        blur_px = self.stains.blur_um / self.spec.mpp / ds
        margin = math.ceil(3 * blur_px) + 1 if blur_px > 0.3 else 0
        ox, oy = x0 - margin * ds, y0 - margin * ds
        w, h = width + 2 * margin, height + 2 * margin
        xs = ox + (np.arange(w, dtype=np.float64) + 0.5) * ds
        ys = oy + (np.arange(h, dtype=np.float64) + 0.5) * ds
        xg, yg = xs[None, :], ys[:, None]
        tissue, tumour, positive = self.zones(xg, yg)
        mpp = self.spec.mpp
        # Per-pixel noise at level-0 resolution averages out when downsampled.
        noise_scale = 1 / max(ds, 1.0)
        pix = _hash_uniform(self.spec.seed, 20, np.floor(xg / max(ds, 1)), np.floor(yg / max(ds, 1)), int(ds))
        grain = (pix - 0.5) * noise_scale

        # Stroma: wavy collagen fibres along the scene's fibre direction.
        ca, sa = math.cos(self.fibre_angle), math.sin(self.fibre_angle)
        along = (xg * ca + yg * sa) * mpp
        across = (-xg * sa + yg * ca) * mpp
        period_um = 9.0
        fade = math.exp(-((ds * mpp / period_um) ** 2) * 4)
        fibres = 0.5 + 0.5 * np.sin(2 * np.pi * across / period_um + 2.5 * np.sin(2 * np.pi * along / 140.0))
        fibres = 0.5 + (fibres - 0.5) * fade
        # Granular cytoplasm (coarser in positive nests).
        gran = 0.5 + 0.5 * np.sin(xg * mpp * 1.7 + 3 * np.sin(yg * mpp * 0.9)) * np.sin(yg * mpp * 1.3)
        gran_fade = math.exp(-((ds * mpp / 3.5) ** 2) * 4)
        gran = 0.5 + (gran - 0.5) * gran_fade

        eosin = np.zeros((h, w), np.float32)
        haem = np.zeros((h, w), np.float32)
        stroma = tissue & ~tumour
        eosin += stroma * (0.32 + 0.30 * fibres + 0.15 * grain)
        haem += stroma * 0.03
        strength = self.strength(xg, yg, positive)
        neg_eosin = 0.22 + 0.06 * gran + 0.10 * grain
        pos_eosin = 0.30 + 0.16 * gran + 0.12 * grain
        eosin += tumour * ((1 - strength) * neg_eosin + strength * pos_eosin)
        haem += tumour * 0.05
        eosin += ~tissue * (0.015 * grain)

        self._draw_nuclei(haem, eosin, ox, oy, w, h, ds)
        od = (
            haem[..., None] * (self.stains.h_scale * 1.45 * self.stains.h_od)
            + eosin[..., None] * (self.stains.e_scale * 0.75 * self.stains.e_od)
            + 0.02 * self.stains.residual_od
        )
        rgb = 250.0 * np.exp(-od) + self.stains.cast_rgb + 6.0 * grain[..., None]
        if margin:
            rgb = ndi.gaussian_filter(rgb, (blur_px, blur_px, 0), mode="nearest")
            rgb = rgb[margin:-margin, margin:-margin]
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def _draw_nuclei(
        self, haem: np.ndarray, eosin: np.ndarray, ox: float, oy: float, w: int, h: int, ds: float
    ) -> None:
        mpp = self.spec.mpp
        reach = _MAX_NUCLEUS_RADIUS_UM / mpp + 2 * ds
        nuc = self.nuclei(ox - reach, oy - reach, w * ds + 2 * reach, h * ds + 2 * reach)
        n = len(nuc["x"])
        if n == 0:
            return
        half = math.ceil(_MAX_NUCLEUS_RADIUS_UM / mpp / ds) + 2
        offs = np.arange(-half, half + 1)
        # Patch pixel centres relative to each nucleus centre, in level-0 px: (n, k, k).
        cx = (nuc["x"] - ox) / ds - 0.5
        cy = (nuc["y"] - oy) / ds - 0.5
        col = np.round(cx).astype(np.int64)[:, None, None] + offs[None, None, :]
        row = np.round(cy).astype(np.int64)[:, None, None] + offs[None, :, None]
        dx = (col - cx[:, None, None]) * ds * mpp
        dy = (row - cy[:, None, None]) * ds * mpp
        ca, sa = np.cos(nuc["angle"])[:, None, None], np.sin(nuc["angle"])[:, None, None]
        u = dx * ca + dy * sa
        v = -dx * sa + dy * ca
        a = nuc["a"][:, None, None]
        b = nuc["b"][:, None, None]
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        edge_um = max(ds * mpp, 0.4)
        inside = 1 / (1 + np.exp(-np.clip((1 - r) * b / edge_um * 2.5, -30, 30)))
        kind = nuc["kind"][:, None, None]
        strength = nuc["s"][:, None, None]
        rim = np.exp(-(((r - 0.85) / 0.13) ** 2))
        nucleolus = np.exp(-((u - 0.25 * a) ** 2 + (v + 0.1 * b) ** 2) / (2 * (0.16 * b) ** 2 + 1e-6))
        fine = math.exp(-((ds * mpp / 1.0) ** 2))  # vesicular detail fades when downsampled
        vesicular = inside * (0.55 + fine * (0.45 * rim + 0.9 * nucleolus - 0.15)) + (1 - fine) * 0.1 * inside
        density = np.select(
            [kind == 0, kind == 2, kind == 3],
            [(1 - strength) * inside * 1.35 + strength * vesicular * 0.95, inside * 1.55, inside * 1.1],
        )
        ok = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        flat = (row * w + col)[ok]
        haem += np.bincount(flat, weights=density[ok], minlength=h * w).reshape(h, w).astype(np.float32)
        # Nuclei displace cytoplasm: less eosin under them.
        eosin *= 1 - 0.6 * np.clip(np.bincount(flat, weights=inside[ok], minlength=h * w).reshape(h, w), 0, 1).astype(
            np.float32
        )

    def positive_mask(self, x0: int, y0: int, width: int, height: int, downsample: float) -> np.ndarray:
        """uint8 (height, width): 1 where the pixel centre lies in a PD-L1 positive tumour nest."""
        xs = x0 + (np.arange(width) + 0.5) * downsample
        ys = y0 + (np.arange(height) + 0.5) * downsample
        return self.zones(xs[None, :], ys[:, None])[2].astype(np.uint8)


# --------------------------------------------------------------------------- writing


def pyramid_downsamples(width_px: int, height_px: int) -> list[int]:
    """Downsamples 1, 4, 16, ... while the level keeps at least 256 px on its short side."""
    out = [1]
    while min(width_px, height_px) // (out[-1] * 4) >= 256:
        out.append(out[-1] * 4)
    return out


def _tiles(scene: PhantomScene, downsample: int, tile: int) -> Iterator[tuple[int, int, np.ndarray]]:
    spec = scene.spec
    lw, lh = math.ceil(spec.width_px / downsample), math.ceil(spec.height_px / downsample)
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            yield tx, ty, scene.render(tx * downsample, ty * downsample, tile, tile, downsample)


def write_phantom(
    path: str | Path,
    spec: PhantomSpec,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> PhantomTruth:
    """Write a pyramidal phantom slide and its truth.

    ``.svs`` writes an Aperio-style SVS (ImageDescription ``Aperio ...|MPP = ...``, JPEG
    tiles, levels at downsample 4); ``.tif``/``.tiff`` a generic tiled TIFF whose levels are
    consecutive pages with resolution tags in CENTIMETER (OpenSlide 4 ignores SubIFDs).
    Both open in OpenSlide with MPP and every level.
    """
    import tifffile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".svs", ".tif", ".tiff"):
        raise ValueError(f"phantom slides are written as .svs or .tif/.tiff, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = PhantomScene(spec)
    tile = spec.tile_size_px
    levels = pyramid_downsamples(spec.width_px, spec.height_px)
    level_sizes = [(math.ceil(spec.width_px / d), math.ceil(spec.height_px / d)) for d in levels]
    total = sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in level_sizes)
    done = 0

    truth_dir = truth_dir_for(path)
    truth_dir.mkdir(parents=True, exist_ok=True)
    tds = spec.truth_downsample
    mask = np.zeros((math.ceil(spec.height_px / tds), math.ceil(spec.width_px / tds)), np.uint8)
    counts = np.zeros(3, np.int64)
    nuclei_csv = truth_dir / "nuclei.csv"
    res_per_cm = 10_000.0 / spec.mpp
    quality = scene.stains.jpeg_quality
    w0, h0 = spec.width_px, spec.height_px
    bigtiff = w0 * h0 > 15_000 * 15_000

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif, nuclei_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x_px", "y_px", "class"])
        for level, (ds, (lw, lh)) in enumerate(zip(levels, level_sizes, strict=True)):

            def level_tiles(ds: int = ds, level: int = level) -> Iterator[np.ndarray]:
                nonlocal done
                for tx, ty, rgb in _tiles(scene, ds, tile):
                    if level == 0:
                        x0, y0 = tx, ty
                        nuc = scene.nuclei(x0, y0, min(tile, w0 - x0), min(tile, h0 - y0))
                        for cls in range(3):
                            counts[cls] += int((nuc["cls"] == cls).sum())
                        writer.writerows(
                            zip(
                                np.round(nuc["x"], 2),
                                np.round(nuc["y"], 2),
                                [NUCLEUS_CLASSES[c] for c in nuc["cls"]],
                                strict=True,
                            )
                        )
                        m = scene.positive_mask(x0, y0, tile // tds, tile // tds, tds)
                        r0, c0 = y0 // tds, x0 // tds
                        sub = mask[r0 : r0 + m.shape[0], c0 : c0 + m.shape[1]]
                        sub[...] = m[: sub.shape[0], : sub.shape[1]]
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)
                    yield rgb

            if suffix == ".svs":
                if level == 0:
                    description = (
                        f"Aperio Image Library v12.0.15 \n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) "
                        f"JPEG/RGB Q={quality}|AppMag = {round(10 / spec.mpp)}|MPP = {spec.mpp}"
                        f"|Filename = {path.stem}|pdl1-bridge phantom seed = {spec.seed}"
                    )
                else:
                    description = f"Aperio Image Library v12.0.15 \n{w0}x{h0} -> {lw}x{lh} - |"
            else:
                description = f"pdl1-bridge phantom seed={spec.seed} level={level}"
            tif.write(
                level_tiles(),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                description=description,
                resolution=(res_per_cm / ds, res_per_cm / ds),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
            )

    tifffile.imwrite(truth_dir / "positive_mask.tif", mask, compression="zlib", metadata=None)
    tumour = counts[POSITIVE] + counts[NEGATIVE]
    summary = {
        "generator": f"pdl1-bridge {__version__} inference.phantom",
        "spec": asdict(spec),
        "slide": path.name,
        "levels": levels,
        "mask_downsample": tds,
        "mask_positive_fraction": float(mask.mean()),
        "nuclei_counts": {name: int(counts[i]) for i, name in enumerate(NUCLEUS_CLASSES)},
        "tps_percent": float(100 * counts[POSITIVE] / tumour) if tumour else None,
        "jpeg_quality": quality,
    }
    (truth_dir / "truth.json").write_text(json.dumps(summary, indent=2))
    return PhantomTruth(path, truth_dir, truth_dir / "positive_mask.tif", nuclei_csv, summary)


@dataclass(frozen=True)
class PhantomTruthData:
    """Truth of a phantom loaded for evaluation."""

    positive_mask: np.ndarray  # uint8 (h, w) at mask_downsample
    mask_downsample: float
    nuclei_xy: np.ndarray  # float64 (N, 2), level-0 px
    nuclei_class: np.ndarray  # int64 (N,), index into NUCLEUS_CLASSES
    summary: dict


def load_truth(slide_path: str | Path) -> PhantomTruthData:
    """Read the truth written beside a phantom slide by :func:`write_phantom`."""
    import tifffile

    from inference.errors import TruthNotFoundError

    truth_dir = truth_dir_for(slide_path)
    summary_path = truth_dir / "truth.json"
    if not summary_path.is_file():
        raise TruthNotFoundError(
            f"no truth beside {slide_path}: expected {summary_path} (written by `pdl1 phantom`); "
            "evaluation needs a phantom slide or truth in that layout"
        )
    summary = json.loads(summary_path.read_text())
    mask = tifffile.imread(truth_dir / "positive_mask.tif")
    names = {name: i for i, name in enumerate(NUCLEUS_CLASSES)}
    xy, cls = [], []
    with (truth_dir / "nuclei.csv").open() as fh:
        for row in csv.DictReader(fh):
            xy.append((float(row["x_px"]), float(row["y_px"])))
            cls.append(names[row["class"]])
    return PhantomTruthData(
        positive_mask=mask,
        mask_downsample=float(summary["mask_downsample"]),
        nuclei_xy=np.array(xy, np.float64).reshape(-1, 2),
        nuclei_class=np.array(cls, np.int64),
        summary=summary,
    )
