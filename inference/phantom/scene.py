"""The procedural scene of a phantom: what to draw (:class:`PhantomSpec`) and where everything is.

Every quantity is a function of the level-0 position, the seed and the shift: coarse random
fields decide tissue, tumour nests, PD-L1 positive zones and morphology strength; nuclei sit
on jittered lattices. :mod:`inference.phantom.render` turns the scene into pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from inference.phantom.stain import stains_for
from inference.phantom.truth import NEGATIVE, OTHER, POSITIVE

COARSE_DS = 32  # level-0 px per scene-field cell
_TISSUE_FRACTION = 0.55
_TUMOUR_FRACTION_OF_TISSUE = 0.5
TUMOUR_SPACING_UM = 10.0
STROMA_SPACING_UM = 16.0
MAX_NUCLEUS_RADIUS_UM = 5.5


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
    reduced_levels
        How the levels below full resolution are made: ``"rendered"`` draws each from the scene at
        its downsample; ``"averaged"`` box-averages the level above 4 x 4, as a scanner builds its
        pyramid and QuPath renders a downsample.
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
    reduced_levels: str = "rendered"

    def __post_init__(self) -> None:
        if self.reduced_levels not in ("rendered", "averaged"):
            raise ValueError(f"reduced_levels must be 'rendered' or 'averaged', got {self.reduced_levels!r}")
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


# --------------------------------------------------------------------------- randomness


def hash_uniform(seed: int, stream: int, i: np.ndarray, j: np.ndarray, k: int = 0) -> np.ndarray:
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


def sample_field(grid: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear sample of a coarse field at level-0 positions (broadcasting xs, ys)."""
    gx = np.clip(xs / COARSE_DS - 0.5, 0, grid.shape[1] - 1.001)
    gy = np.clip(ys / COARSE_DS - 0.5, 0, grid.shape[0] - 1.001)
    x0 = gx.astype(np.int64)
    y0 = gy.astype(np.int64)
    fx = (gx - x0).astype(np.float32)
    fy = (gy - y0).astype(np.float32)
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def jittered_lattice(
    seed: int, stream: int, spacing_px: float, x0: float, y0: float, w: float, h: float
) -> dict[str, np.ndarray]:
    """Points of a jittered square lattice whose centre lies in the box: ``x``, ``y`` and lattice indices ``i``, ``j``.

    Each point is a function of (seed, stream, i, j) only, so any box gives the same points where boxes overlap.
    """
    s = spacing_px
    i0, i1 = math.floor(x0 / s) - 1, math.ceil((x0 + w) / s) + 1
    j0, j1 = math.floor(y0 / s) - 1, math.ceil((y0 + h) / s) + 1
    jj, ii = np.mgrid[j0:j1, i0:i1]
    ii, jj = ii.ravel(), jj.ravel()
    xs = (ii + 0.5 + 0.6 * (hash_uniform(seed, stream, ii, jj, 0) - 0.5)) * s
    ys = (jj + 0.5 + 0.6 * (hash_uniform(seed, stream, ii, jj, 1) - 0.5)) * s
    inside = (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)
    return {"x": xs[inside], "y": ys[inside], "i": ii[inside], "j": jj[inside]}


class PhantomScene:
    """One phantom's procedural scene; :func:`~inference.phantom.render.render` draws any region at any downsample."""

    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 7])
        cells = (math.ceil(spec.height_px / COARSE_DS) + 2, math.ceil(spec.width_px / COARSE_DS) + 2)
        um_per_cell = COARSE_DS * spec.mpp
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
        self.stains = stains_for(np.random.default_rng([spec.seed, 11]), spec.shift)
        self.morph_field = _smooth_field(np.random.default_rng([spec.seed, 13]), cells, 150 / um_per_cell)
        # Own stream, so a phantom without weak patches is the same bytes as before they existed.
        self.weak_field = _smooth_field(np.random.default_rng([spec.seed, 17]), cells, 100 / um_per_cell)
        self.weak_threshold = self._weak_threshold()

    # -- zones ------------------------------------------------------------------------
    def zones(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tissue, tumour, positive) bool masks at level-0 positions."""
        tissue = sample_field(self.tissue_field, xs, ys) > self.tissue_threshold
        tumour = tissue & (sample_field(self.tumour_field, xs, ys) > self.tumour_threshold)
        positive = tumour & (sample_field(self.positive_field, xs, ys) > self.positive_threshold)
        return tissue, tumour, positive

    def strength(self, xs: np.ndarray, ys: np.ndarray, positive: np.ndarray) -> np.ndarray:
        """Morphology strength in [0, 1]: 0 is negative morphology, 1 fully positive; 0 outside positive nests."""
        morph = sample_field(self.morph_field, xs, ys)
        s = np.clip(0.8 + 0.35 * morph, 0.35, 1.0)
        if self.spec.weak_fraction > 0:
            weak = sample_field(self.weak_field, xs, ys) > self.weak_threshold
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
            tissue = sample_field(self.tissue_field, xs, ys) > self.tissue_threshold
            tumour = tissue & (sample_field(self.tumour_field, xs, ys) > self.tumour_threshold)
            values.append(sample_field(self.positive_field, xs[tumour], ys[tumour]))
        all_values = np.concatenate(values) if values else np.zeros(0)
        if all_values.size == 0:
            return math.inf
        return float(np.quantile(all_values, 1 - tps / 100))

    # -- nuclei -----------------------------------------------------------------------
    def _lattice(self, x0: float, y0: float, w: float, h: float, kind: str) -> dict[str, np.ndarray]:
        """Jittered lattice points (candidate nucleus centres) whose centre lies in the box."""
        spacing_um, stream = (TUMOUR_SPACING_UM, 1) if kind == "tumour" else (STROMA_SPACING_UM, 2)
        return jittered_lattice(self.spec.seed, stream, spacing_um / self.spec.mpp, x0, y0, w, h)

    def nuclei(self, x0: float, y0: float, w: float, h: float) -> dict[str, np.ndarray]:
        """Nuclei whose centre lies in the level-0 box: positions, class, shape and texture."""
        seed = self.spec.seed
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "y", "cls", "a", "b", "angle", "kind", "s")}
        tum = self._lattice(x0, y0, w, h, "tumour")
        tissue, tumour, positive = self.zones(tum["x"], tum["y"])
        keep = tumour & (hash_uniform(seed, 3, tum["i"], tum["j"]) < 0.93)
        ii, jj = tum["i"][keep], tum["j"][keep]
        pos = positive[keep]
        strength = self.strength(tum["x"][keep], tum["y"][keep], pos)
        u = hash_uniform(seed, 4, ii, jj)
        v = hash_uniform(seed, 5, ii, jj)
        radius_um = (1 - strength) * (2.7 + 0.8 * u) + strength * (3.9 + 1.4 * u)
        ratio = (1 - strength) * (0.86 + 0.14 * v) + strength * (0.62 + 0.2 * v)
        out["x"].append(tum["x"][keep])
        out["y"].append(tum["y"][keep])
        out["cls"].append(np.where(pos, POSITIVE, NEGATIVE))
        out["a"].append(radius_um)
        out["b"].append(radius_um * ratio)
        out["angle"].append(hash_uniform(seed, 6, ii, jj) * np.pi)
        out["kind"].append(np.zeros(keep.sum(), np.int64))  # tumour: dense..vesicular by strength
        out["s"].append(strength)

        st = self._lattice(x0, y0, w, h, "stroma")
        tissue, tumour, _ = self.zones(st["x"], st["y"])
        keep = tissue & ~tumour & (hash_uniform(seed, 7, st["i"], st["j"]) < 0.55)
        ii, jj = st["i"][keep], st["j"][keep]
        lympho = hash_uniform(seed, 8, ii, jj) < 0.35
        u = hash_uniform(seed, 9, ii, jj)
        out["x"].append(st["x"][keep])
        out["y"].append(st["y"][keep])
        out["cls"].append(np.full(keep.sum(), OTHER))
        out["a"].append(np.where(lympho, 2.2 + 0.5 * u, 4.0 + 1.2 * u))
        out["b"].append(np.where(lympho, 2.0 + 0.4 * u, 1.2 + 0.3 * u))
        out["angle"].append(np.where(lympho, u * np.pi, self.fibre_angle + (u - 0.5) * 0.6))
        out["kind"].append(np.where(lympho, 2, 3))  # 2 lymphocyte, 3 spindle
        out["s"].append(np.zeros(keep.sum()))
        return {k: np.concatenate(v) for k, v in out.items()}

    def positive_mask(self, x0: int, y0: int, width: int, height: int, downsample: float) -> np.ndarray:
        """uint8 (height, width): 1 where the pixel centre lies in a PD-L1 positive tumour nest."""
        xs = x0 + (np.arange(width) + 0.5) * downsample
        ys = y0 + (np.arange(height) + 0.5) * downsample
        return self.zones(xs[None, :], ys[:, None])[2].astype(np.uint8)
