"""Geometry of the partition grid: ∞-norm scene contraction, grid cells, the automatic aabb.

Contraction (ALGORITHM.md §1.3): u = 2(x − a_min)/(a_max − a_min) − 1, m = ‖u‖∞; c = u inside the
aabb, (2 − 1/m)·u/m outside; q = c/4 + 1/2. The aabb maps to [0.25, 0.75]³, all of space to
[0, 1)³. Cells: a uniform `block_dim` grid over q, half-open, id = iz·bx·by + iy·bx + ix.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from mgs.errors import InputError

log = logging.getLogger("mgs.partition")

AXES = "xyz"
# the margin that keeps every anchor the block's cameras see (mgs.partition.region)
MARGIN_ALL = "all"
FLAT_RATIO = 0.02  # official: an aabb thinner than this (min/max radius) is flat


def contract(points, aabb) -> np.ndarray:
    """∞-norm contraction: the aabb maps to [0.25, 0.75]³, the rest of space into [0, 1)³."""
    box = np.asarray(aabb, dtype=np.float64).reshape(2, 3)
    points = np.asarray(points, dtype=np.float64)
    u = 2.0 * (points - box[0]) / (box[1] - box[0]) - 1.0
    m = np.abs(u).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(m <= 1.0, 1.0, (2.0 - 1.0 / m) / m)
    return u * scale / 4.0 + 0.5


def uncontract(q, aabb) -> np.ndarray:
    """Inverse of `contract` (q in (0, 1)³)."""
    box = np.asarray(aabb, dtype=np.float64).reshape(2, 3)
    c = (np.asarray(q, dtype=np.float64) - 0.5) * 4.0
    n = np.abs(c).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = 1.0 / (2.0 - n)  # the shell at contracted norm n came from ∞-norm m
        u = np.where(n <= 1.0, c, c * m / (2.0 - 1.0 / m))
    return (u + 1.0) / 2.0 * (box[1] - box[0]) + box[0]


def cell_index3(q, block_dim) -> np.ndarray:
    dims = np.asarray(block_dim, dtype=np.int64)
    return np.clip(np.floor(np.asarray(q) * dims).astype(np.int64), 0, dims - 1)


def cell_ids(points, aabb, block_dim) -> np.ndarray:
    """Cell id per point: iz·bx·by + iy·bx + ix (x fastest); cells are half-open in q."""
    bx, by, _ = (int(d) for d in block_dim)
    idx = cell_index3(contract(points, aabb), block_dim)
    return idx[..., 2] * bx * by + idx[..., 1] * bx + idx[..., 0]


def cell_bounds(cell: int, block_dim) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of a cell in contracted space; faces at 0 and 1 are unbounded in world space."""
    bx, by, _ = (int(d) for d in block_dim)
    ix, iy, iz = cell % bx, (cell // bx) % by, cell // (bx * by)
    dims = np.asarray(block_dim, dtype=np.float64)
    lo = np.array([ix, iy, iz]) / dims
    return lo, lo + 1.0 / dims


def cell_centres(block_dim) -> np.ndarray:
    n = int(np.prod(block_dim))
    return np.array([sum(cell_bounds(c, block_dim)) / 2 for c in range(n)]).reshape(n, 3)


def focus_point(centres: np.ndarray, axes: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Least-squares point closest to all optical axes.

    Directions the axes do not constrain (all axes parallel, e.g. a pure nadir flight) are
    singular; a small ridge term pulls them to `prior` (the SfM points' median) instead.
    """
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    proj = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    a, b = proj.sum(0), np.einsum("nij,nj->i", proj, centres)
    ridge = 1e-3 * len(centres)
    return np.linalg.solve(a + ridge * np.eye(3), b + ridge * prior)


def auto_aabb(centres: np.ndarray, axes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Official default aabb (focus ± median camera distance per axis), made robust.

    Deviations, for degenerate inputs: the focus is clipped to the SfM points' 0.5–99.5 % box
    grown by a quarter of its size (nearly parallel axes put it anywhere), flat axes use the
    points' 0.5–99.5 % extent, and no radius falls below FLAT_RATIO of the largest (a zero radius
    would divide by zero).
    """
    lo_pts, hi_pts = np.percentile(points, [0.5, 99.5], axis=0)
    median = np.median(points, axis=0)
    focus = focus_point(centres, axes, median)
    slack = 0.25 * (hi_pts - lo_pts)
    clipped = np.clip(focus, lo_pts - slack, hi_pts + slack)
    if not np.allclose(clipped, focus):
        log.warning("the cameras' focus point %s lies outside the SfM points; using %s",
                    np.round(focus, 3).tolist(), np.round(clipped, 3).tolist())
    focus = clipped
    radius = np.median(np.abs(centres - focus), axis=0)
    if radius.min() < FLAT_RATIO * radius.max():
        axis = int(np.argmin(radius))
        radius[axis] = (hi_pts[axis] - lo_pts[axis]) / 2
        log.info("automatic aabb is flat along %s; using half the SfM points' extent (%.3g)",
                 AXES[axis], radius[axis])
    radius = np.maximum(radius, FLAT_RATIO * max(radius.max(), 1e-9))
    return np.stack([focus - radius, focus + radius])


def margin_label(margin: float | str) -> str:
    """How a margin reads in logs, plots and the schema's words: 0.25, inf or all."""
    if margin == MARGIN_ALL:
        return MARGIN_ALL
    return "inf" if math.isinf(margin) else f"{margin:g}"


def parse_margin(value, source: str = "config") -> float | str:
    """A margin in cell sizes (a float, inf included) or the word `all`."""
    if isinstance(value, str) and value.strip().lower() == MARGIN_ALL:
        return MARGIN_ALL
    if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "infinity"):
        return math.inf
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = float("nan")
    if not margin >= 0:
        raise InputError(f"{source}: 'margin' must be a number >= 0, inf or all, got {value!r}")
    return margin
