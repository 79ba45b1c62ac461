"""The PD-L1 IHC section of a phantom: the same tissue as the H&E, cut next to it and stained with DAB.

An IHC phantom is a consecutive section of the H&E phantom's tissue. Its level-0 pixel (x, y)
shows the scene at ``T(x, y) = A (x, y) + t + d(x, y)`` (:class:`SectionTransform`): a small
rotation about the image centre and a translation (``A``, ``t``) and a smooth displacement field
``d`` (a few long sine waves, amplitude 5-15 µm, wavelength 0.5-1 mm). Zones (tissue, tumour,
PD-L1 positive) are the H&E scene's, read at ``T``; the cells are another section's: their own
jittered lattices in IHC image coordinates, each nucleus classed by the zones at ``T`` of its centre.

What is stained (see :func:`inference.phantom.render.render_ihc` for the pixels):

* PD-L1 positive tumour cells: a DAB ring at the cell membrane, complete or partial (an arc of
  35-70 % of the circumference), intensity 1+/2+/3+ from a smooth field plus per-cell noise;
* some negative tumour cells: a faint cytoplasmic blush, no membrane; they stay negative;
* tumour nuclei range from solid to vesicular in both classes: unlike the H&E's, their morphology says nothing
  of PD-L1, so only the DAB tells a positive cell;
* immune cells: the stroma's lymphocytes and macrophages (and a few lymphocytes among tumour cells);
  ``immune_positive_fraction`` of them (varying smoothly in space) are PD-L1 positive;
* spindle cells (fibroblasts) are ``Other``; stroma, and tumour nests less, carry a faint background DAB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from inference.phantom.scene import (
    STROMA_SPACING_UM,
    TUMOUR_SPACING_UM,
    PhantomScene,
    PhantomSpec,
    _smooth_field,
    hash_uniform,
    jittered_lattice,
    sample_field,
)
from inference.phantom.stain import ihc_stains_for
from inference.phantom.truth import (
    IHC_IMMUNE_NEGATIVE,
    IHC_IMMUNE_POSITIVE,
    IHC_OTHER,
    IHC_TUMOUR_NEGATIVE,
    IHC_TUMOUR_POSITIVE,
    PATTERN_COMPLETE,
    PATTERN_CYTOPLASMIC,
    PATTERN_NONE,
    PATTERN_PARTIAL,
    truth_dir_for,
)

# Farthest a cell's stain reaches from its nucleus centre (a macrophage's membrane plus the ring's width).
MAX_CELL_RADIUS_UM = 8.5
_MAX_ROTATION_DEG = 4.0
_MAX_TRANSLATION_UM = 150.0
_DEFORMATION_MODES = 4
_MODE_KEYS = ("kx", "ky", "ax", "ay", "phase")
# Shares of positive tumour cells scored 1+ and 1+ or 2+ (the rest 3+): about 30/40/30 %.
_INTENSITY_SHARES = (0.3, 0.7)
_FIELD_WEIGHT, _CELL_WEIGHT = 0.8, 0.6  # intensity score = field at the cell + per-cell normal noise


@dataclass(frozen=True)
class IhcSpec:
    """What the PD-L1 IHC section adds to a :class:`~inference.phantom.scene.PhantomSpec`.

    Attributes
    ----------
    immune_positive_fraction
        Mean share of immune cells (lymphocytes, macrophages) that are PD-L1 positive; the local
        share varies smoothly in space around it.
    """

    immune_positive_fraction: float = 0.3

    def __post_init__(self) -> None:
        if not 0 <= self.immune_positive_fraction <= 1:
            raise ValueError(f"immune_positive_fraction must be in [0, 1], got {self.immune_positive_fraction}")


@dataclass(frozen=True)
class SectionTransform:
    """IHC level-0 px -> H&E (scene) level-0 px: ``T(p) = matrix @ (x, y, 1) + d(p)``.

    ``d(p) = sum_k (ax_k, ay_k) * sin(2 pi (kx_k x + ky_k y) + phase_k)`` with ``modes`` rows
    ``(kx, ky, ax, ay, phase)`` (k in cycles per px, a in px).
    """

    matrix: np.ndarray  # float64 (2, 3)
    modes: np.ndarray  # float64 (K, 5)

    def apply(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scene positions of IHC positions ``xs``, ``ys`` (broadcast together)."""
        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        m = self.matrix
        tx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        ty = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        for kx, ky, ax, ay, phase in self.modes:
            wave = np.sin(2 * np.pi * (kx * xs + ky * ys) + phase)
            tx = tx + ax * wave
            ty = ty + ay * wave
        return tx, ty

    def to_dict(self) -> dict:
        """The transform as ``truth.json`` stores it (:meth:`from_dict` reads it back exactly)."""
        return {
            "maps": "IHC level-0 px -> H&E level-0 px",
            "affine": self.matrix.tolist(),
            "deformation": {
                "kind": "sum of sines",
                "formula": "d(x, y) = sum_k (ax, ay) * sin(2*pi*(kx*x + ky*y) + phase)",
                "modes": [dict(zip(_MODE_KEYS, row, strict=True)) for row in self.modes.tolist()],
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> SectionTransform:
        """Read :meth:`to_dict`'s output."""
        modes = [[m[k] for k in _MODE_KEYS] for m in data["deformation"]["modes"]]
        return cls(np.array(data["affine"], np.float64), np.array(modes, np.float64).reshape(-1, 5))


def section_transform_for(rng: np.random.Generator, spec: PhantomSpec) -> SectionTransform:
    """A random consecutive-section transform for a slide of ``spec``'s size.

    Rotation about the image centre up to ±4°; translation up to ±150 µm a side, less on small slides
    (at most 4 % of the short side, so the tissue stays on the image); deformation of RMS 5-15 µm with
    wavelengths 0.5-1 mm.
    """
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    max_shift_px = min(_MAX_TRANSLATION_UM / spec.mpp, 0.04 * min(spec.width_px, spec.height_px))
    shift = rng.uniform(-max_shift_px, max_shift_px, 2)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    centre = np.array([spec.width_px / 2, spec.height_px / 2])
    offset = centre - rot @ centre + shift
    matrix = np.concatenate([rot, offset[:, None]], axis=1)
    rms_px = rng.uniform(5.0, 15.0) / spec.mpp
    k = _DEFORMATION_MODES
    amplitude = rms_px * math.sqrt(2 / k)
    modes = []
    for _ in range(k):
        wavelength_px = rng.uniform(500.0, 1000.0) / spec.mpp
        direction, along = rng.uniform(0, 2 * np.pi, 2)
        modes.append(
            [
                math.cos(direction) / wavelength_px,
                math.sin(direction) / wavelength_px,
                amplitude * math.cos(along),
                amplitude * math.sin(along),
                rng.uniform(0, 2 * np.pi),
            ]
        )
    return SectionTransform(matrix, np.array(modes, np.float64))


def ihc_to_he_points(truth: dict | str | object, xy: np.ndarray) -> np.ndarray:
    """Map IHC level-0 points to the paired H&E's level-0 points with the full section transform.

    Parameters
    ----------
    truth
        The IHC truth summary (``truth.json`` as a dict), its truth folder, or the IHC slide beside it.
    xy
        float (N, 2) IHC level-0 px, xy order.

    Returns
    -------
    float64 (N, 2) H&E level-0 px.
    """
    import json
    from pathlib import Path

    if not isinstance(truth, dict):
        path = Path(truth)  # type: ignore[arg-type]
        folder = path if path.is_dir() else truth_dir_for(path)
        truth = json.loads((folder / "truth.json").read_text())
    if "transform" not in truth:
        raise ValueError(
            f"truth of {truth.get('slide')!r} has no 'transform' (stain {truth.get('stain', 'H&E')!r}); "
            "pass the truth of an IHC phantom written by `pdl1 phantom --ihc`"
        )
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    tx, ty = SectionTransform.from_dict(truth["transform"]).apply(xy[:, 0], xy[:, 1])
    return np.stack([tx, ty], axis=1)


class IhcScene:
    """The PD-L1 IHC section of a phantom's tissue; :func:`~inference.phantom.render.render_ihc` draws it."""

    def __init__(self, spec: PhantomSpec, ihc: IhcSpec | None = None):
        self.spec = spec
        self.ihc = ihc or IhcSpec()
        self.he = PhantomScene(spec)  # the tissue: its zones and textures, read through the transform
        # Own random streams (the H&E's are 7, 11, 13, 17), so the H&E is unchanged by the IHC.
        self.transform = section_transform_for(np.random.default_rng([spec.seed, 31]), spec)
        self.stains = ihc_stains_for(np.random.default_rng([spec.seed, 37]), spec.shift)
        cells = self.he.tissue_field.shape
        um_per_cell = 32 * spec.mpp
        self.intensity_field = _smooth_field(np.random.default_rng([spec.seed, 41]), cells, 150 / um_per_cell)
        self.immune_field = _smooth_field(np.random.default_rng([spec.seed, 43]), cells, 250 / um_per_cell)
        self.intensity_cuts = self._intensity_cuts()

    # -- zones ------------------------------------------------------------------------
    def scene_xy(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scene (H&E level-0) positions of IHC level-0 positions."""
        return self.transform.apply(xs, ys)

    def zones(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tissue, tumour, positive) bool masks at IHC level-0 positions; glass where T leaves the scene."""
        tx, ty = self.scene_xy(xs, ys)
        on_scene = (tx >= 0) & (tx < self.spec.width_px) & (ty >= 0) & (ty < self.spec.height_px)
        tissue, tumour, positive = self.he.zones(tx, ty)
        return tissue & on_scene, tumour & on_scene, positive & on_scene

    def positive_mask(self, x0: int, y0: int, width: int, height: int, downsample: float) -> np.ndarray:
        """uint8 (height, width): 1 where the IHC pixel centre lies in a PD-L1 positive tumour zone."""
        xs = x0 + (np.arange(width) + 0.5) * downsample
        ys = y0 + (np.arange(height) + 0.5) * downsample
        return self.zones(xs[None, :], ys[:, None])[2].astype(np.uint8)

    # -- cells ------------------------------------------------------------------------
    def _intensity_cuts(self) -> tuple[float, float]:
        """Score cuts between 1+/2+ and 2+/3+ so the positive zones of this slide have the wanted shares.

        The score's distribution over the positive scene cells is a mixture of normals (the field value
        of each cell plus the per-cell noise); its quantiles are found by bisection.
        """
        he = self.he
        positive = (
            (he.tissue_field > he.tissue_threshold)
            & (he.tumour_field > he.tumour_threshold)
            & (he.positive_field > he.positive_threshold)
        )
        field = self.intensity_field[positive] if positive.any() else self.intensity_field.ravel()
        centres = _FIELD_WEIGHT * field.astype(np.float64)
        cuts = []
        for share in _INTENSITY_SHARES:
            lo, hi = -6.0, 6.0
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if ndtr((mid - centres) / _CELL_WEIGHT).mean() < share else (lo, mid)
            cuts.append((lo + hi) / 2)
        return cuts[0], cuts[1]

    def _intensity(self, tx: np.ndarray, ty: np.ndarray, noise_u: np.ndarray) -> np.ndarray:
        """1, 2 or 3 from the smooth intensity field at scene positions plus per-cell noise (neighbours agree)."""
        noise = ndtri(np.clip(noise_u, 1e-6, 1 - 1e-6))
        score = _FIELD_WEIGHT * sample_field(self.intensity_field, tx, ty) + _CELL_WEIGHT * noise
        if self.spec.weak_fraction > 0:  # weakly expressing patches stain weakly
            weak = sample_field(self.he.weak_field, tx, ty) > self.he.weak_threshold
            score = np.where(weak, score - 1.0, score)
        return 1 + (score > self.intensity_cuts[0]).astype(np.int64) + (score > self.intensity_cuts[1])

    def nuclei(self, x0: float, y0: float, w: float, h: float) -> dict[str, np.ndarray]:
        """Nuclei whose centre lies in the IHC level-0 box, with their cells' staining.

        Keys: ``x``, ``y`` (IHC level-0 px), ``cls`` (index into ``IHC_NUCLEUS_CLASSES``),
        ``intensity`` (0-3), ``pattern`` (index into ``IHC_PATTERNS``), nucleus shape ``a``, ``b`` (µm),
        ``angle``, ``kind`` (0 tumour, 2 lymphocyte, 3 spindle, 4 macrophage), ``s`` (morphology
        strength), cell radius ``cell_um``, DAB of the ring ``ring`` and the cytoplasm ``cyto``,
        and the membrane arc: centre ``arc_at`` (rad) and half-width ``arc_half`` (rad; pi for a complete ring).
        """
        seed, mpp = self.spec.seed, self.spec.mpp
        keys = ("x", "y", "cls", "intensity", "pattern", "a", "b", "angle", "kind", "s", "cell_um")
        keys += ("ring", "cyto", "arc_at", "arc_half")
        out: dict[str, list[np.ndarray]] = {k: [] for k in keys}

        def add(**values: np.ndarray) -> None:
            n = len(values["x"])
            for key in keys:
                out[key].append(np.broadcast_to(values[key], (n,)) if key in values else np.zeros(n))

        # Tumour cells; a few lattice sites hold a lymphocyte instead.
        tum = jittered_lattice(seed, 101, TUMOUR_SPACING_UM / mpp, x0, y0, w, h)
        tx, ty = self.scene_xy(tum["x"], tum["y"])
        _, tumour, positive = self.zones(tum["x"], tum["y"])
        site = hash_uniform(seed, 103, tum["i"], tum["j"])
        keep = tumour & (site < 0.93)
        ii, jj = tum["i"][keep], tum["j"][keep]
        pos = positive[keep]
        # Solid and vesicular nuclei in both classes, whatever the cell's PD-L1: the H&E ties morphology to PD-L1
        # (what the H&E path learns), but a counterstain's nucleus must not tell the IHC model the call; tied here,
        # it learnt the nucleus instead of the DAB and called real DAB-free vesicular nuclei positive.
        strength = hash_uniform(seed, 114, ii, jj)
        u, v = hash_uniform(seed, 104, ii, jj), hash_uniform(seed, 105, ii, jj)
        # The H&E's range of nuclear morphology, a little smaller: the membrane (4.3-4.8 µm out) stays clear of it.
        radius_um = (1 - strength) * (2.7 + 0.8 * u) + strength * (3.3 + 0.9 * u)
        ratio = (1 - strength) * (0.86 + 0.14 * v) + strength * (0.62 + 0.2 * v)
        intensity = np.where(pos, self._intensity(tx[keep], ty[keep], hash_uniform(seed, 106, ii, jj)), 0)
        kind_u = hash_uniform(seed, 107, ii, jj)
        partial = pos & (kind_u < 0.25)
        blush = ~pos & (kind_u < 0.15)
        pattern = np.select([pos & ~partial, partial, blush], [PATTERN_COMPLETE, PATTERN_PARTIAL, PATTERN_CYTOPLASMIC])
        ring = np.array([0.0, 0.45, 0.95, 1.6])[intensity]
        cyto = np.where(blush, 0.10 + 0.10 * hash_uniform(seed, 108, ii, jj), 0.06 * intensity)
        add(
            x=tum["x"][keep],
            y=tum["y"][keep],
            cls=np.where(pos, IHC_TUMOUR_POSITIVE, IHC_TUMOUR_NEGATIVE),
            intensity=intensity,
            pattern=np.where(pos | blush, pattern, PATTERN_NONE),
            a=radius_um,
            b=radius_um * ratio,
            angle=hash_uniform(seed, 109, ii, jj) * np.pi,
            kind=np.zeros(len(ii), np.int64),
            s=strength,
            cell_um=np.maximum(4.3 + 0.5 * hash_uniform(seed, 110, ii, jj), radius_um + 0.9),
            ring=ring,
            cyto=cyto,
            arc_at=hash_uniform(seed, 111, ii, jj) * 2 * np.pi,
            arc_half=np.where(partial, np.pi * (0.35 + 0.35 * hash_uniform(seed, 112, ii, jj)), np.pi),
        )
        til = tumour & (site >= 0.93) & (hash_uniform(seed, 113, tum["i"], tum["j"]) < 0.5)
        self._immune(out, add, tum, til, tx, ty, lymphocyte=np.ones(int(til.sum()), bool))

        # Stroma: lymphocytes, macrophages (IHC only: the H&E draws them as spindle cells) and fibroblasts.
        st = jittered_lattice(seed, 121, STROMA_SPACING_UM / mpp, x0, y0, w, h)
        sx, sy = self.scene_xy(st["x"], st["y"])
        tissue, tumour, _ = self.zones(st["x"], st["y"])
        keep = tissue & ~tumour & (hash_uniform(seed, 122, st["i"], st["j"]) < 0.55)
        kind_u = hash_uniform(seed, 123, st["i"], st["j"])
        immune = keep & (kind_u < 0.47)
        self._immune(out, add, st, immune, sx, sy, lymphocyte=kind_u[immune] < 0.35)
        spindle = keep & ~immune
        ii, jj = st["i"][spindle], st["j"][spindle]
        u = hash_uniform(seed, 124, ii, jj)
        add(
            x=st["x"][spindle],
            y=st["y"][spindle],
            cls=np.full(len(ii), IHC_OTHER),
            intensity=np.zeros(len(ii), np.int64),
            pattern=np.full(len(ii), PATTERN_NONE),
            a=4.0 + 1.2 * u,
            b=1.2 + 0.3 * u,
            angle=self.he.fibre_angle + (u - 0.5) * 0.6,
            kind=np.full(len(ii), 3),
            cell_um=np.full(len(ii), 5.0),
            arc_half=np.full(len(ii), np.pi),
        )
        result = {k: np.concatenate(v) for k, v in out.items()}
        for key in ("cls", "intensity", "pattern", "kind"):
            result[key] = result[key].astype(np.int64)
        return result

    def _immune(self, out, add, lattice: dict, where: np.ndarray, tx, ty, *, lymphocyte: np.ndarray) -> None:
        """Add the immune cells at ``lattice[where]``: lymphocytes where ``lymphocyte``, else macrophages."""
        seed = self.spec.seed
        ii, jj = lattice["i"][where], lattice["j"][where]
        sx, sy = tx[where], ty[where]
        share = self.ihc.immune_positive_fraction * np.exp(0.6 * sample_field(self.immune_field, sx, sy) - 0.18)
        pos = hash_uniform(seed, 131, ii, jj) < np.clip(share, 0, 1)
        u = hash_uniform(seed, 132, ii, jj)
        intensity = np.where(pos, self._intensity(sx, sy, hash_uniform(seed, 133, ii, jj)), 0)
        ring = np.array([0.0, 0.45, 0.95, 1.6])[intensity]
        add(
            x=lattice["x"][where],
            y=lattice["y"][where],
            cls=np.where(pos, IHC_IMMUNE_POSITIVE, IHC_IMMUNE_NEGATIVE),
            intensity=intensity,
            pattern=np.where(pos, PATTERN_COMPLETE, PATTERN_NONE),
            a=np.where(lymphocyte, 2.2 + 0.5 * u, 4.2 + 0.8 * u),
            b=np.where(lymphocyte, 2.0 + 0.4 * u, 2.7 + 0.5 * u),
            angle=u * 7 % 1 * np.pi,
            kind=np.where(lymphocyte, 2, 4),
            cell_um=np.where(lymphocyte, 3.3 + 0.3 * u, 6.5 + 1.0 * u),
            ring=np.where(lymphocyte, ring, 0.7 * ring),
            cyto=np.where(lymphocyte, 0.05, 0.22) * intensity,
            arc_half=np.full(len(ii), np.pi),
        )
