"""Synthetic volumes with known truth, for the demo and the tests.

Two generators write the same kind of case (a 3D volume with up to three structures: an
outer shell, a core inside it, a separate small satellite; a smooth intensity bias field,
noise, anisotropic spacing and a non-identity direction) and the same dataset layout:

* :func:`make_case` - one narrow population: fixed grid and spacing, fixed tissue contrast
  (plus or minus 0.05), a linear bias field and noise of given amplitude, modest shape and
  pose variation. Tests use it for small, predictable inputs (``write_dataset``).
* :func:`draw_case` - a population that varies the way real scans of one structure vary
  between patients and scanners (:class:`Population`, :data:`SCANNERS`). The demo uses it
  (``write_population_dataset``): its labeled volumes are a random draw from the population,
  as a clinic's first labeled scans are, and its unlabeled, validation and test volumes come
  from the same population.

Where the ranges of :data:`SCANNERS` come from (per case, each drawn independently):

* **Intensity scale and offset** (``scale``, ``offset``): MR intensities have no physical unit;
  each scanner, coil and protocol scales them differently (stored maxima of a few hundred to
  several thousand are all common; Nyul & Udupa 1999, "On standardizing the MR image
  intensity scale"). CT is calibrated (Hounsfield units) but stored with a rescale intercept
  (typically -1024). Scale log-uniform over 10-4000, offset uniform in -1024..1024: the
  engine's per-volume normalisation must remove both, as it must on real data.
* **Tissue contrast** (``contrast``): the step between neighbouring tissues, as a fraction of
  the background tissue's signal, log-uniform over 0.1-1.0, one order of magnitude. Soft
  tissues differ by a few percent to a few tens of percent in CT (liver about 55 HU, muscle
  40-50 HU, blood 40 HU, fat -100 HU: steps of 10-150 HU on a signal of about 1000 above air)
  and by a factor of up to 2-3 in MR (blood against myocardium in cine bSSFP; far less in
  T1-weighted gradient echo). The order of the tissues is that of one protocol (core
  brightest, shell above background); only the satellite's level against the shell's varies.
* **Noise** (``snr``): Gaussian, standard deviation = background signal / SNR, SNR
  log-uniform over 8-40. Clinical MR reports SNR of about 10-100 (myocardium in 1.5 T cine
  bSSFP 15-40, lower at higher resolution or with parallel imaging); routine CT has 10-25 HU
  of noise in soft tissue. With the contrast range this gives contrast-to-noise ratios from
  about 1 (CT low-contrast detectability, a structure seen only by its extent) to about 40
  (cine MR blood against myocardium). Magnitude MR noise is Rician, indistinguishable from
  Gaussian above an SNR of about 3.
* **Bias field** (``bias``): a smooth multiplicative field, a random quadratic polynomial of
  peak-to-peak amplitude uniform in 0-0.4 of the signal: intensity non-uniformity of 10-20 %
  at 1.5 T and 30-40 % or more at 3 T in MR (Sled et al. 1998, IEEE TMI 17:87, the N3 paper;
  Vovk et al. 2007, IEEE TMI 26:405), near 0 in CT.
* **Texture** (``texture``): a smooth random variation within each tissue, standard deviation
  0-5 % of the background signal (trabeculation, perfusion, beam hardening in CT).
* **Slice spacing** (``slice_spacing_mm``): log-uniform 1-10 mm: 1-3 mm in routine CT,
  5-10 mm in cardiac cine MR (ACDC: 5-10 mm between slices of 5-8 mm thickness; Bernard et al.
  2018, IEEE TMI 37:2514). Slices are as thick as their spacing (partial volume across the
  slice is simulated by averaging 5 sub-slices).
* **Number of slices** (``slices``): as many as cover ``coverage`` (1.1-1.6) times the shell's
  height, clipped to 6-40: 6-18 slices in cardiac cine MR (about 6-20 in ACDC), tens of slices in CT
  (clipped here: a CT case then covers part of the structure, as a limited scan range does).
* **Field of view and matrix** (``fov_radii``, ``matrix``): the volume is the region around
  the structure that segmentation pipelines usually crop (ACDC's published methods crop
  around the heart), 4-6 shell radii wide, on a 48-80 pixel matrix. With the structure sizes
  below this gives in-plane pixels of about 1-3.5 mm (1.3-1.7 mm in ACDC cine MR, 0.6-0.9 mm
  in CT; coarse here to keep the demo fast).
* **Structure size** (``radius_mm``): shell radius 25 mm times a factor log-uniform over
  0.75-1.35 (organ volumes vary between adult patients by a factor of 2-3; ACDC includes
  dilated left ventricles of about twice the normal volume), each axis 0.75-1.25 times that.
* **Shape** (``shape_wobble``, ``core_ratio``): an ellipsoid in any 3D orientation whose
  surface is displaced by smooth second- and third-order terms of relative amplitude 0-0.2;
  the core is the shell's shape at 0.45-0.75 of its size (wall thickness varies: the left
  ventricle's cavity radius is about 0.5-0.75 of its epicardial radius, end-systole to
  end-diastole, less with hypertrophy), shifted off
  centre by up to 0.15 of the radius; the satellite's radius is 0.3-0.55 of the shell's,
  beside the shell in a random in-plane direction with a gap of 0.05-0.3 radii.
* **Position** (``shift``): the shell's centre up to 0.08 of the field of view off its centre
  in-plane and 0.15 of the stack's height in z.

Everything is drawn from a seeded generator: the same seed gives the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from buseg.files.images import Volume, write_image
from buseg.files.safe_files import write_json_atomic

CLASS_NAMES = ("shell", "core", "satellite")
# draw_case: sub-slices averaged per slice (partial volume across the slice); odd, so that the middle
# one lies at the slice centre, where the label map is sampled.
SUBSLICES = 5


@dataclass
class SyntheticCase:
    image: Volume
    label: Volume


def rotation_direction(angle_degrees: float) -> tuple[float, ...]:
    """A direction matrix rotated about z (non-identity, as scanners write)."""
    a = np.deg2rad(angle_degrees)
    c, s = np.cos(a), np.sin(a)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def make_case(
    rng: np.random.Generator,
    shape_zyx: Sequence[int] = (24, 64, 64),
    *,
    spacing_mm: Sequence[float] = (1.2, 1.2, 2.5),
    num_classes: int = 3,
    noise: float = 0.08,
    bias: float = 0.3,
    direction: Sequence[float] | None = None,
    origin: Sequence[float] = (-40.0, 25.0, 10.0),
    structure_scale: float = 1.0,
    satellite_scale: float = 1.0,
) -> SyntheticCase:
    """One synthetic volume (float32, intensities roughly 0..1) and its label map (uint8).

    ``structure_scale`` < 1 shrinks the shell and its distance to the satellite and the
    random shift of the centre (not the satellite itself), so that the satellite stays inside
    the field of view; at 1.0 (default) the satellite is often cut off by the image border.
    ``satellite_scale`` scales the satellite's radii (a larger, easier small structure).
    """
    z, y, x = (int(s) for s in shape_zyx)
    sx, sy, sz = (float(s) for s in spacing_mm)
    zz, yy, xx = np.meshgrid(np.arange(z) * sz, np.arange(y) * sy, np.arange(x) * sx, indexing="ij")
    extent = np.array([z * sz, y * sy, x * sx])
    center = extent / 2 + rng.uniform(-0.1, 0.1, 3) * extent * structure_scale
    radii = extent * rng.uniform(0.22, 0.32, 3) * structure_scale
    theta = rng.uniform(0, np.pi)
    ct, st = np.cos(theta), np.sin(theta)
    dy, dx = yy - center[1], xx - center[2]
    ry, rx = ct * dy - st * dx, st * dy + ct * dx
    outer = ((zz - center[0]) / radii[0]) ** 2 + (ry / radii[1]) ** 2 + (rx / radii[2]) ** 2
    label = np.zeros((z, y, x), dtype=np.uint8)
    label[outer <= 1.0] = 1
    if num_classes >= 2:
        shift = rng.uniform(-0.15, 0.15, 3) * radii
        inner = (
            ((zz - center[0] - shift[0]) / (0.55 * radii[0])) ** 2
            + ((ry - shift[1]) / (0.55 * radii[1])) ** 2
            + ((rx - shift[2]) / (0.55 * radii[2])) ** 2
        )
        label[inner <= 1.0] = 2
    if num_classes >= 3:
        side = rng.choice([-1.0, 1.0])
        sat_center = center + np.array([0.0, side * (radii[1] + 0.16 * extent[1] * structure_scale), 0.0])
        sat_r = extent * rng.uniform(0.07, 0.1, 3) * satellite_scale
        sat = (
            ((zz - sat_center[0]) / max(sat_r[0], 1.5 * sz)) ** 2
            + ((yy - sat_center[1]) / sat_r[1]) ** 2
            + ((xx - sat_center[2]) / sat_r[2]) ** 2
        )
        label[(sat <= 1.0) & (label == 0)] = 3
    contrast = {0: 0.15, 1: 0.55, 2: 0.85, 3: 0.35}
    image = np.zeros_like(label, dtype=np.float32)
    for cls, value in contrast.items():
        image[label == cls] = value + rng.uniform(-0.05, 0.05)
    # Partial-volume-like blur at boundaries, smooth bias field, noise.
    from scipy.ndimage import gaussian_filter

    image = gaussian_filter(image, sigma=(0.6 * 2.5 / sz, 0.8, 0.8))
    gz, gy, gx = rng.normal(size=3)
    field = 1.0 + bias * (
        gz * (zz / extent[0] - 0.5) + gy * (yy / extent[1] - 0.5) + gx * (xx / extent[2] - 0.5)
    )
    image = image * field + rng.normal(0.0, noise, image.shape)
    image = image.astype(np.float32)
    direction = tuple(direction) if direction is not None else rotation_direction(rng.uniform(-20, 20))
    geometry = dict(spacing_mm=(sx, sy, sz), origin=tuple(float(o) for o in origin), direction=direction)
    return SyntheticCase(Volume(image, **geometry), Volume(label, **geometry))


# --------------------------------------------------------------------------------------
# The population of scans (the demo's data): ranges and where they come from in the module docstring


@dataclass(frozen=True)
class Population:
    """Ranges of what varies between cases (patients and scanners); (low, high) each.

    ``log_uniform`` names the ranges drawn log-uniformly (a scale spanning a factor); the others
    are uniform. Integer ranges (``matrix``, ``slices``) include both ends.
    """

    scale: tuple[float, float] = (10.0, 4000.0)
    offset: tuple[float, float] = (-1024.0, 1024.0)
    contrast: tuple[float, float] = (0.1, 1.0)
    snr: tuple[float, float] = (8.0, 40.0)
    bias: tuple[float, float] = (0.0, 0.4)
    texture: tuple[float, float] = (0.0, 0.05)
    slice_spacing_mm: tuple[float, float] = (1.0, 10.0)
    coverage: tuple[float, float] = (1.1, 1.6)
    slices: tuple[int, int] = (6, 40)
    fov_radii: tuple[float, float] = (4.0, 6.0)
    matrix: tuple[int, int] = (48, 80)
    radius_mm: tuple[float, float] = (0.75 * 25.0, 1.35 * 25.0)
    axis_ratio: tuple[float, float] = (0.75, 1.25)
    shape_wobble: tuple[float, float] = (0.0, 0.2)
    core_ratio: tuple[float, float] = (0.45, 0.75)
    core_shift: tuple[float, float] = (0.0, 0.15)
    satellite_ratio: tuple[float, float] = (0.3, 0.55)
    satellite_gap: tuple[float, float] = (0.05, 0.3)
    shift: tuple[float, float] = (0.08, 0.15)  # in-plane (of the field of view), z (of the stack)
    log_uniform: frozenset[str] = frozenset({"scale", "contrast", "snr", "slice_spacing_mm", "radius_mm"})

    def draw(self, rng: np.random.Generator, name: str) -> float:
        low, high = getattr(self, name)
        if name in self.log_uniform:
            return float(np.exp(rng.uniform(np.log(low), np.log(high))))
        return float(rng.uniform(low, high))

    def draw_int(self, rng: np.random.Generator, name: str) -> int:
        low, high = getattr(self, name)
        return int(rng.integers(low, high + 1))


# Real scans of one structure, as the module docstring sources them.
SCANNERS = Population()
# The same variety on tiny grids: a smoke test of the pipeline (demo --quick, tests).
TINY_SCANNERS = replace(SCANNERS, matrix=(24, 32), slices=(4, 8))
POPULATIONS = {"scanners": SCANNERS, "tiny-scanners": TINY_SCANNERS}


@dataclass(frozen=True)
class _Shape:
    """A star-shaped solid: an ellipsoid (semi-axes ``radii_mm``, rotation ``rotation``) whose
    surface is displaced by ``wobble`` (smooth in the direction)."""

    center_mm: np.ndarray  # z y x
    radii_mm: np.ndarray  # along the rotated axes
    rotation: np.ndarray  # 3x3, columns: the ellipsoid's axes in z y x
    wobble: tuple[np.ndarray, np.ndarray, float, float]  # directions, weights, order-2 and order-3 amplitude

    def inside(
        self, points_mm: np.ndarray, scale: float = 1.0, offset_mm: np.ndarray | None = None
    ) -> np.ndarray:
        """Whether each point (..., 3) is inside the shape shrunk by ``scale`` and moved by ``offset_mm``."""
        center = self.center_mm + (0.0 if offset_mm is None else offset_mm)
        vectors, weights, order2, order3 = self.wobble
        # Only points within the bounding sphere need the full test (|P2|, |P3| <= 1 on directions).
        reach = float(self.radii_mm.max()) * scale * (1.0 + order2 + order3)
        offsets = points_mm.reshape(-1, 3) - center
        near = np.flatnonzero((offsets**2).sum(-1) <= reach**2)
        local = offsets[near] @ self.rotation / (self.radii_mm * scale)
        rho = np.sqrt((local**2).sum(-1))
        t = (local / np.maximum(rho, 1e-9)[:, None]) @ vectors.T  # cosines to the wobble directions
        surface = (
            1.0
            + order2 * (weights * (1.5 * t**2 - 0.5)).sum(-1)
            + order3 * (weights * (2.5 * t**3 - 1.5 * t)).sum(-1)
        )
        result = np.zeros(offsets.shape[0], dtype=bool)
        result[near] = rho <= surface
        return result.reshape(points_mm.shape[:-1])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_shape(
    rng: np.random.Generator, population: Population, center_mm: np.ndarray, radius_mm: float
) -> _Shape:
    radii = radius_mm * rng.uniform(*population.axis_ratio, 3)
    vectors = rng.normal(size=(3, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    weights = rng.dirichlet(np.ones(3))
    wobble = population.draw(rng, "shape_wobble")
    split = rng.uniform()
    return _Shape(
        center_mm, radii, _random_rotation(rng), (vectors, weights, wobble * split, wobble * (1 - split))
    )


def _smooth_field(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """A random quadratic polynomial of the normalised coordinates ``grid`` (..., 3), scaled to 0..1."""
    terms = [grid[..., i] for i in range(3)] + [
        grid[..., i] * grid[..., j] for i in range(3) for j in range(i, 3)
    ]
    field = sum(c * t for c, t in zip(rng.normal(size=len(terms)), terms, strict=True))
    span = float(field.max() - field.min())
    return (field - field.min()) / span if span > 0 else np.zeros_like(field)


def draw_case(
    rng: np.random.Generator, population: Population = SCANNERS, *, num_classes: int = 3
) -> SyntheticCase:
    """One case of ``population``: scanner, patient and structure drawn from its ranges.

    The label map is sampled at the slice centres (as annotators draw on the slices); the image
    averages :data:`SUBSLICES` sub-slices per slice (partial volume across a thick slice).
    """
    radius = population.draw(rng, "radius_mm")
    matrix = population.draw_int(rng, "matrix")
    pixel_mm = population.draw(rng, "fov_radii") * radius / matrix
    slice_mm = population.draw(rng, "slice_spacing_mm")
    height_mm = 2 * radius * population.draw(rng, "coverage")
    slices = int(np.clip(round(height_mm / slice_mm), *population.slices))
    extent = np.array([slices * slice_mm, matrix * pixel_mm, matrix * pixel_mm])
    shift_xy, shift_z = population.shift
    center = extent / 2 + rng.uniform(-1, 1, 3) * extent * np.array([shift_z, shift_xy, shift_xy])
    shell = _random_shape(rng, population, center, radius)
    core_offset = rng.normal(size=3)
    core_offset *= population.draw(rng, "core_shift") * radius / max(np.linalg.norm(core_offset), 1e-9)
    core_scale = population.draw(rng, "core_ratio")
    satellite = _satellite(rng, population, shell, radius, extent)

    def tissue_map(z_mm: np.ndarray) -> np.ndarray:
        """Class indices on the in-plane grid at the slice positions ``z_mm``."""
        yx = (np.arange(matrix) + 0.5) * pixel_mm
        points = np.stack(np.meshgrid(z_mm, yx, yx, indexing="ij"), axis=-1)
        label = np.zeros(points.shape[:3], dtype=np.uint8)
        label[shell.inside(points)] = 1
        if num_classes >= 2:
            label[shell.inside(points, core_scale, core_offset)] = 2
        if num_classes >= 3:
            label[satellite.inside(points) & (label == 0)] = 3
        return label

    fine = tissue_map((np.arange(slices * SUBSLICES) + 0.5) * slice_mm / SUBSLICES)
    label = np.ascontiguousarray(fine[SUBSLICES // 2 :: SUBSLICES])  # at the slice centres
    image = _render(rng, population, fine, slices)
    direction = rotation_direction(rng.uniform(-20, 20))
    origin = tuple(float(v) for v in rng.uniform(-100, 100, 3))
    geometry = dict(spacing_mm=(pixel_mm, pixel_mm, slice_mm), origin=origin, direction=direction)
    return SyntheticCase(Volume(image, **geometry), Volume(label, **geometry))


def _satellite(
    rng: np.random.Generator, population: Population, shell: _Shape, radius: float, extent: np.ndarray
) -> _Shape:
    """The small structure beside the shell, in a random in-plane direction that keeps its centre
    inside the field of view (the first of 20 tries that does; else the last)."""
    ratio = population.draw(rng, "satellite_ratio")
    distance = radius * (1 + population.draw(rng, "satellite_gap") + ratio)
    for _ in range(20):
        angle = rng.uniform(0, 2 * np.pi)
        center = shell.center_mm + distance * np.array([0.0, np.cos(angle), np.sin(angle)])
        margin = ratio * radius
        if np.all(center[1:] > margin) and np.all(center[1:] < extent[1:] - margin):
            break
    return _random_shape(rng, population, center, ratio * radius)


def _render(
    rng: np.random.Generator, population: Population, fine_label: np.ndarray, slices: int
) -> np.ndarray:
    """Intensities of the sub-sliced class map: tissue levels, texture, partial volume, bias field,
    noise, then the scanner's scale and offset (float32)."""
    from scipy.ndimage import gaussian_filter

    background = 1.0
    shell_level = background * (1 + population.draw(rng, "contrast"))
    core_level = shell_level + background * population.draw(rng, "contrast")
    satellite_level = background * (1 + population.draw(rng, "contrast"))
    levels = np.array([background, shell_level, core_level, satellite_level])
    fine = levels[fine_label]
    texture = gaussian_filter(rng.normal(size=fine.shape), sigma=(2.0, 3.0, 3.0))
    texture *= population.draw(rng, "texture") * background / max(float(texture.std()), 1e-9)
    fine = gaussian_filter(fine + texture, sigma=(0.0, 0.5, 0.5))  # the in-plane point spread
    image = fine.reshape(slices, SUBSLICES, *fine.shape[1:]).mean(axis=1)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in image.shape), indexing="ij"), axis=-1)
    image = image * (1 + population.draw(rng, "bias") * (_smooth_field(rng, grid) - 0.5))
    image = image + rng.normal(0.0, background / population.draw(rng, "snr"), image.shape)
    image = population.draw(rng, "offset") + population.draw(rng, "scale") * image
    return image.astype(np.float32)


def write_dataset(
    root: str | Path,
    *,
    labeled: int = 3,
    unlabeled: int = 6,
    test: int = 2,
    shape_zyx: Sequence[int] = (24, 64, 64),
    spacing_mm: Sequence[float] = (1.2, 1.2, 2.5),
    num_classes: int = 3,
    seed: int = 0,
    noise: float = 0.08,
    bias: float = 0.3,
    validation: int = 0,
    structure_scale: float = 1.0,
    satellite_scale: float = 1.0,
) -> dict[str, Path]:
    """Write a synthetic dataset as NIfTI under ``root``.

    Layout: ``labeled/images``, ``labeled/labels``, ``labeled/classes.json`` (label value ->
    name), ``unlabeled/``, ``test/images``, ``test/labels``, ``test/classes.json``, and with
    ``validation > 0`` also ``validation/`` (laid out as ``labeled/``). Returns the folders
    ``labeled``, ``unlabeled`` and ``test`` (and ``validation`` when written). Validation
    cases are drawn after all others, so adding them leaves the other cases unchanged.
    """
    rng = np.random.default_rng(seed)

    def case() -> SyntheticCase:
        return make_case(
            rng,
            shape_zyx,
            spacing_mm=spacing_mm,
            num_classes=num_classes,
            noise=noise,
            bias=bias,
            structure_scale=structure_scale,
            satellite_scale=satellite_scale,
        )

    counts = {"labeled": labeled, "unlabeled": unlabeled, "test": test, "validation": validation}
    return _write_cases(Path(root), counts, case, num_classes)


def write_population_dataset(
    root: str | Path,
    *,
    labeled: int,
    unlabeled: int,
    test: int,
    validation: int = 0,
    population: Population = SCANNERS,
    num_classes: int = 3,
    seed: int = 0,
) -> dict[str, Path]:
    """Write a dataset of :func:`draw_case` cases of ``population`` under ``root``, laid out as
    :func:`write_dataset` does. Every split is drawn from the same population, one case after the
    other in the order labeled, unlabeled, test, validation (so the labeled cases are a random
    draw, not chosen)."""
    rng = np.random.default_rng(seed)
    counts = {"labeled": labeled, "unlabeled": unlabeled, "test": test, "validation": validation}
    return _write_cases(
        Path(root), counts, lambda: draw_case(rng, population, num_classes=num_classes), num_classes
    )


def _write_cases(
    root: Path, counts: dict[str, int], next_case: Callable[[], SyntheticCase], num_classes: int
) -> dict[str, Path]:
    """Write ``counts[kind]`` cases of ``next_case()`` per kind, in the order of ``counts``;
    returns the folders written (``validation`` only when it has cases)."""
    folders = {kind: root / kind for kind in ("labeled", "unlabeled", "test")}
    if counts.get("validation"):
        folders["validation"] = root / "validation"
    for kind, count in counts.items():
        for index in range(count):
            case = next_case()
            name = f"{kind}_{index:03d}.nii.gz"
            if kind == "unlabeled":
                write_image(case.image, folders[kind] / name, overwrite=True)
            else:
                write_image(case.image, folders[kind] / "images" / name, overwrite=True)
                write_image(case.label, folders[kind] / "labels" / name, overwrite=True)
    names = {str(i + 1): n for i, n in enumerate(CLASS_NAMES[:num_classes])}
    for kind in ("labeled", "test", "validation"):
        if kind in folders:
            write_json_atomic(folders[kind] / "classes.json", names)
    return folders
