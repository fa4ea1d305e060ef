"""Synthetic volumes with known truth, for the demo and the tests.

Each case is a 3D MR-like volume with up to three nested/adjacent structures (an outer
shell, an inner blob, a separate small structure), smooth intensity inhomogeneity (bias
field), Gaussian noise, random shape, pose and contrast variation, anisotropic spacing and
a non-identity direction. Everything is drawn from a seeded generator: the same seed
gives the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import Volume, write_image, write_json_atomic

CLASS_NAMES = ("shell", "core", "satellite")


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
    root = Path(root)
    rng = np.random.default_rng(seed)
    folders = {
        "labeled": root / "labeled",
        "unlabeled": root / "unlabeled",
        "test": root / "test",
    }
    if validation:
        folders["validation"] = root / "validation"
    for kind, count in (
        ("labeled", labeled),
        ("unlabeled", unlabeled),
        ("test", test),
        ("validation", validation),
    ):
        for index in range(count):
            case = make_case(
                rng,
                shape_zyx,
                spacing_mm=spacing_mm,
                num_classes=num_classes,
                noise=noise,
                bias=bias,
                structure_scale=structure_scale,
                satellite_scale=satellite_scale,
            )
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
