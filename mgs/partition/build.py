"""Scene partitioning: a grid of cells in contracted space, cameras assigned to blocks.

Contraction (∞-norm, ALGORITHM.md §1.3) maps the aabb onto [0.25, 0.75]³ and everything outside
into the shell out to [0, 1)³; a uniform `block_dim` grid over the unit cube gives cells whose outer
layer is unbounded in world space, so every point of space lies in exactly one cell.

A block is one cell, or several after merging: cells with fewer than `min_cameras` cameras (or no
SfM points) are merged into their nearest neighbour. A train camera belongs to a block when its
centre lies in one of the block's cells, or when the block is visible in it (`projection`: share of
image bins where the block's SfM points are in front; `ssim`: 1 − SSIM drop of a coarse model's
render without the block's anchors). Cells tile all of space, so every camera centre lies in
some block: no train camera is left without one. Every 10th of a block's cameras (by name)
validates it.

Outputs in `out_dir`: partition.json (read back with `load_partition`), partition.tsv, partition.png.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mgs.atomic import ensure_writable_dir, write_text
from mgs.config import check_config, yaml_section
from mgs.errors import InputError
from mgs.partition.assign import make_visibility, merge_starved, split_validation
from mgs.partition.geometry import (AXES, MARGIN_ALL, auto_aabb, cell_bounds, cell_ids,
                                   contract, margin_label, parse_margin)
from mgs.scene import Scene, load_scene

log = logging.getLogger("mgs.partition")

FORMAT_VERSION = 1
PARTITION_JSON = "partition.json"
PARTITION_TSV = "partition.tsv"
PARTITION_PNG = "partition.png"
ASSIGNMENTS = ("center", "projection", "ssim")
# projection 0.08 reproduces the official test (1 − SSIM > 0.05): on the synthetic city (2×2 blocks,
# 400-step coarse model) 1 − SSIM ≈ 0.94·coverage − 0.027 (r = 0.99), and the two tests then
# agree on 96 % of camera/block pairs.
DEFAULT_THRESHOLD = {"center": None, "projection": 0.08, "ssim": 0.05}


# ------------------------------------------------------------------ config

@dataclass
class PartitionConfig:
    block_dim: list[int] = field(default_factory=lambda: [2, 2, 1])  # cells along world x, y, z
    aabb: Any = None  # None/"auto": from the cameras; "scene": scene.json's; or x0 y0 z0 x1 y1 z1
    up: str | None = None  # x | y | z; None: the scene's up vector
    assignment: str = "projection"  # center | projection | ssim
    threshold: float | None = None  # None: DEFAULT_THRESHOLD[assignment]
    min_cameras: int = 5
    # anchor region beyond the cell, in cell sizes (contracted); inf = every anchor; all = the
    # cells plus every anchor the block's cameras see (mgs.partition.region)
    margin: float | str = 0.25
    coarse: str | None = None  # coarse model checkpoint (ssim only)
    ssim_max_side: int = 400  # ssim renders are downsampled to at most this many pixels a side
    device: str = "auto"  # ssim renders: auto | cpu | cuda | cuda:N

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "PartitionConfig":
        config = cls(**check_config(cls, values, "partition", source))
        config.validate(source)
        return config

    @classmethod
    def from_yaml(cls, path, overrides: dict[str, Any] | None = None) -> "PartitionConfig":
        values = yaml_section(path, "partition")
        values.update(overrides or {})
        return cls.from_dict(values, source=str(path))

    def validate(self, source: str = "config") -> None:
        dims = self.block_dim
        if (not isinstance(dims, (list, tuple)) or len(dims) != 3
                or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims)
                or min(dims) < 1):
            raise InputError(f"{source}: 'block_dim' must be 3 positive integers (cells along "
                             f"x, y, z), got {dims!r}")
        self.block_dim = [int(d) for d in dims]
        if isinstance(self.aabb, str):
            if self.aabb not in ("auto", "scene"):
                raise InputError(f"{source}: 'aabb' must be auto, scene or 6 numbers "
                                 f"x0 y0 z0 x1 y1 z1, got {self.aabb!r}")
        elif self.aabb is not None:
            self.aabb = [float(v) for v in _check_aabb(self.aabb, source).reshape(-1)]
        if self.up is not None and str(self.up).lower() not in AXES:
            raise InputError(f"{source}: 'up' must be x, y or z, got {self.up!r}")
        if self.assignment not in ASSIGNMENTS:
            raise InputError(f"{source}: 'assignment' must be one of {', '.join(ASSIGNMENTS)}, "
                             f"got {self.assignment!r}")
        if self.threshold is not None and not 0.0 <= float(self.threshold) < 1.0:
            raise InputError(f"{source}: 'threshold' must be in [0, 1), got {self.threshold}")
        if int(self.min_cameras) != self.min_cameras or self.min_cameras < 2:
            raise InputError(f"{source}: 'min_cameras' must be an integer >= 2 (one camera "
                             f"validates, one trains), got {self.min_cameras}")
        self.margin = parse_margin(self.margin, source)
        if self.assignment == "ssim" and not self.coarse:
            raise InputError(f"{source}: assignment 'ssim' needs 'coarse': the checkpoint of a "
                             "`mgs train` run on the whole scene (or use assignment: projection)")
        if self.ssim_max_side < 16:
            raise InputError(f"{source}: 'ssim_max_side' must be >= 16, got {self.ssim_max_side}")

    @property
    def effective_threshold(self) -> float | None:
        return DEFAULT_THRESHOLD[self.assignment] if self.threshold is None else float(self.threshold)


def _check_aabb(aabb, source: str) -> np.ndarray:
    try:
        box = np.asarray(aabb, dtype=np.float64).reshape(2, 3)
    except (TypeError, ValueError):
        raise InputError(f"{source}: 'aabb' must be 6 numbers x0 y0 z0 x1 y1 z1, "
                         f"got {aabb!r}") from None
    if not np.isfinite(box).all() or not (box[0] < box[1]).all():
        raise InputError(f"{source}: 'aabb' {box.reshape(-1).tolist()} needs finite numbers "
                         "with x0 < x1, y0 < y1 and z0 < z1")
    return box


# ------------------------------------------------------------------ geometry

def up_axis(config_up: str | None, scene_up) -> tuple[int, float]:
    """(axis index, sign) of the up direction: the configured axis, else the scene's dominant one."""
    vec = np.asarray(scene_up, dtype=np.float64).reshape(3)
    axis = AXES.index(config_up.lower()) if config_up else int(np.argmax(np.abs(vec)))
    if not config_up and abs(vec[axis]) < math.cos(math.radians(20)):
        log.warning("the scene's up vector %s is not close to an axis; using %s as up",
                    np.round(vec, 3).tolist(), AXES[axis])
    return axis, (-1.0 if vec[axis] < 0 else 1.0)


# ------------------------------------------------------------------ partition

@dataclass
class Block:
    id: int
    cells: list[int]
    train_cameras: list[str]
    validation_cameras: list[str]
    centre_cameras: int = 0  # cameras whose centre lies in the block's cells
    points_in_cell: int = 0
    points_with_margin: int = 0

    @property
    def cameras(self) -> list[str]:
        return sorted(set(self.train_cameras) | set(self.validation_cameras))


@dataclass
class Partition:
    aabb: np.ndarray  # (2, 3) min / max corner
    block_dim: list[int]
    up: str
    margin: float
    assignment: str
    threshold: float | None
    min_cameras: int
    blocks: list[Block]
    aabb_source: str = "config"

    def __post_init__(self) -> None:
        self.aabb = np.asarray(self.aabb, dtype=np.float64).reshape(2, 3)
        self.block_dim = [int(d) for d in self.block_dim]
        owner = np.full(int(np.prod(self.block_dim)), -1, dtype=np.int64)
        for index, block in enumerate(self.blocks):
            for cell in block.cells:
                if not 0 <= cell < len(owner) or owner[cell] >= 0:
                    raise InputError(f"partition: cell {cell} is out of range or in two blocks")
                owner[cell] = index
        if (owner < 0).any():
            raise InputError(f"partition: cells {np.flatnonzero(owner < 0).tolist()} are in no block")
        self.cell_to_block = owner

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_of_points(self, points) -> np.ndarray:
        """Index of the block owning each point (exactly one per point)."""
        return self.cell_to_block[cell_ids(points, self.aabb, self.block_dim)]

    def points_in_region(self, points, block: int | Block, margin: float | None = None) -> np.ndarray:
        """Mask of points in the block's cells grown by `margin` cell sizes in contracted space
        (default: the partition's margin); margin 0 equals `block_of_points(...) == block`."""
        block = self.blocks[block] if not isinstance(block, Block) else block
        margin = self.margin if margin is None else parse_margin(margin)
        if margin == MARGIN_ALL:
            raise ValueError("margin 'all' depends on the block's cameras: use "
                             "mgs.partition.region.block_anchor_mask")
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if math.isinf(margin):
            return np.ones(len(points), dtype=bool)
        q = contract(points, self.aabb)
        size = 1.0 / np.asarray(self.block_dim, dtype=np.float64)
        mask = np.zeros(len(points), dtype=bool)
        for cell in block.cells:
            lo, hi = cell_bounds(cell, self.block_dim)
            lo = np.where(lo <= 0.0, -np.inf, lo - margin * size)
            hi = np.where(hi >= 1.0, np.inf, hi + margin * size)
            mask |= ((q >= lo) & (q < hi)).all(axis=1)
        return mask

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "aabb": self.aabb.reshape(-1).tolist(),
            "aabb_source": self.aabb_source,
            "block_dim": self.block_dim,
            "up": self.up,
            "margin": self.margin if isinstance(self.margin, float) and math.isfinite(self.margin)
            else margin_label(self.margin),
            "assignment": self.assignment,
            "threshold": self.threshold,
            "min_cameras": self.min_cameras,
            "blocks": [{
                "id": b.id, "cells": b.cells,
                "cell_bounds": [[bound.tolist() for bound in cell_bounds(c, self.block_dim)]
                                for c in b.cells],
                "train_cameras": b.train_cameras, "validation_cameras": b.validation_cameras,
                "centre_cameras": b.centre_cameras, "points_in_cell": b.points_in_cell,
                "points_with_margin": b.points_with_margin,
            } for b in self.blocks],
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "partition") -> "Partition":
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            found = data.get("format_version") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{source} has format version {found}, this mgs reads "
                             f"{FORMAT_VERSION}; rerun `mgs partition`")
        try:
            blocks = [Block(id=int(b["id"]), cells=[int(c) for c in b["cells"]],
                            train_cameras=list(b["train_cameras"]),
                            validation_cameras=list(b["validation_cameras"]),
                            centre_cameras=int(b.get("centre_cameras", 0)),
                            points_in_cell=int(b["points_in_cell"]),
                            points_with_margin=int(b["points_with_margin"]))
                      for b in data["blocks"]]
            if empty := [b.id for b in blocks if not b.train_cameras]:
                raise InputError(f"{source}: block(s) {', '.join(map(str, empty))} have no train "
                                 "cameras, so they cannot be trained; rerun `mgs partition` "
                                 "(it merges blocks with fewer than min_cameras)")
            return cls(aabb=data["aabb"], block_dim=data["block_dim"], up=data["up"],
                       margin=parse_margin(data["margin"], source), assignment=data["assignment"],
                       threshold=data["threshold"], min_cameras=int(data["min_cameras"]),
                       blocks=blocks, aabb_source=data.get("aabb_source", "config"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source} is malformed ({exc!r}); rerun `mgs partition`") from exc


def load_partition(path) -> Partition:
    """Read partition.json (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / PARTITION_JSON
    if not path.is_file():
        raise InputError(f"{path} not found; run `mgs partition` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is unreadable ({exc}); rerun `mgs partition`") from exc
    return Partition.from_json(data, source=str(path))


# ------------------------------------------------------------------ the stage

def resolve_aabb(scene: Scene, config: PartitionConfig) -> tuple[np.ndarray, str]:
    if isinstance(config.aabb, str) and config.aabb == "scene":
        if scene.aabb is None:
            raise InputError(f"{scene.scene_dir}/scene.json has no aabb; set partition 'aabb' to "
                             "6 numbers or auto")
        return _check_aabb(scene.aabb, f"{scene.scene_dir}/scene.json"), "scene"
    if config.aabb is not None and config.aabb != "auto":
        return np.asarray(config.aabb, dtype=np.float64).reshape(2, 3), "config"
    cameras = scene.train_cameras()
    centres = np.array([cam.center for cam in cameras])
    axes = np.array([cam.world_to_camera[2, :3] for cam in cameras])  # camera +z in world
    return auto_aabb(centres, axes, scene.points_xyz), "auto"


def partition_scene(scene_dir, out_dir, config: PartitionConfig | None = None) -> Partition:
    """Partition a scene into blocks; writes partition.json/.tsv/.png to `out_dir` atomically."""
    config = config or PartitionConfig()
    config.validate()
    out_dir = ensure_writable_dir(out_dir)
    (out_dir / PARTITION_JSON).unlink(missing_ok=True)  # written last: marks a complete output
    scene = load_scene(scene_dir)
    cameras = scene.train_cameras()
    if not cameras:
        raise InputError(f"scene {scene.scene_dir} has no training cameras to partition")
    if len(scene.points_xyz) == 0:
        raise InputError(f"scene {scene.scene_dir} has no SfM points; rerun SfM")
    up, up_sign = up_axis(config.up, scene.up)
    dims = config.block_dim
    if dims[up] > 1:
        log.warning("block_dim splits the up axis %s into %d: cameras above the scene all fall in "
                    "the top cells (the paper never splits the up axis)", AXES[up], dims[up])
    aabb, aabb_source = resolve_aabb(scene, config)
    inside = ((scene.points_xyz >= aabb[0]) & (scene.points_xyz <= aabb[1])).all(axis=1)
    if not inside.any():
        raise InputError(f"the aabb {aabb.reshape(-1).round(3).tolist()} ({aabb_source}) contains "
                         f"none of the {len(scene.points_xyz)} SfM points (they span "
                         f"{scene.points_xyz.min(0).round(3).tolist()} to "
                         f"{scene.points_xyz.max(0).round(3).tolist()}); fix the partition 'aabb'")
    log.info("aabb (%s): %s; %d of %d SfM points inside", aabb_source,
             aabb.reshape(-1).round(3).tolist(), int(inside.sum()), len(inside))

    n_cells = int(np.prod(dims))
    point_cells = cell_ids(scene.points_xyz, aabb, dims)
    centre_cells = cell_ids(np.array([cam.center for cam in cameras]), aabb, dims)
    threshold = config.effective_threshold
    visibility = make_visibility(config, scene, cameras, aabb, point_cells)

    def evaluate(cells: list[int]) -> np.ndarray:
        column = np.isin(centre_cells, cells)
        if visibility is not None:
            column |= visibility.scores([cells], skip=column[:, None])[:, 0] > threshold
        return column

    groups = [[c] for c in range(n_cells)]
    members = centre_cells[:, None] == np.arange(n_cells)[None]
    if visibility is not None:
        scores = visibility.scores(groups, skip=members)
        members |= scores > threshold
    points_per_cell = np.bincount(point_cells, minlength=n_cells)
    groups, members = merge_starved(groups, members, points_per_cell, config.min_cameras, dims,
                                    evaluate)

    names = [cam.name for cam in cameras]
    blocks = []
    for b, cells in enumerate(groups):
        train, validation = split_validation([names[i] for i in np.flatnonzero(members[:, b])])
        blocks.append(Block(id=b, cells=cells, train_cameras=train, validation_cameras=validation,
                            centre_cameras=int(np.isin(centre_cells, cells).sum())))
    partition = Partition(aabb=aabb, block_dim=dims, up=AXES[up], margin=config.margin,
                          assignment=config.assignment, threshold=threshold,
                          min_cameras=int(config.min_cameras), blocks=blocks,
                          aabb_source=aabb_source)
    point_blocks = partition.cell_to_block[point_cells]
    from mgs.partition.region import held_points  # it imports this module

    region_mask = held_points(partition, scene)
    for b, block in enumerate(blocks):
        block.points_in_cell = int((point_blocks == b).sum())
        block.points_with_margin = int(region_mask(b).sum())
        log.info("block %d: cells %s, %d train cameras (%d also validate; %d centred), %d points "
                 "(%d with margin)", b, cells_str(block.cells), len(block.train_cameras),
                 len(block.validation_cameras), block.centre_cameras, block.points_in_cell,
                 block.points_with_margin)
    write_partition(partition, out_dir, scene, centre_cells, up_sign)
    return partition


def cells_str(cells: list[int]) -> str:
    return ",".join(str(c) for c in cells)


def write_partition(partition: Partition, out_dir: Path, scene: Scene, centre_cells: np.ndarray,
                    up_sign: float = 1.0) -> None:
    from mgs.partition.plot import plot_partition

    rows = ["block\tcells\ttrain_cameras\tvalidation_cameras\tpoints_in_cell\tpoints_with_margin"]
    rows += [f"{b.id}\t{cells_str(b.cells)}\t{len(b.train_cameras)}\t{len(b.validation_cameras)}\t"
             f"{b.points_in_cell}\t{b.points_with_margin}" for b in partition.blocks]
    write_text(out_dir / PARTITION_TSV, "\n".join(rows) + "\n")
    centres = np.array([cam.center for cam in scene.train_cameras()])
    plot_partition(partition, scene.points_xyz, centres, partition.cell_to_block[centre_cells],
                   out_dir / PARTITION_PNG, up_sign=up_sign)
    # partition.json last: it marks a complete output.
    write_text(out_dir / PARTITION_JSON, _dumps(partition.to_json()))


def _dumps(data: dict) -> str:
    """JSON with one line per key: readable and diffable, lists stay on their line."""
    head = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k != "blocks"]
    blocks = ["    {\n" + ",\n".join(f"      {json.dumps(k)}: {json.dumps(v)}" for k, v in b.items())
              + "\n    }" for b in data["blocks"]]
    return "{\n" + ",\n".join(head + ['  "blocks": [\n' + ",\n".join(blocks) + "\n  ]"]) + "\n}\n"
