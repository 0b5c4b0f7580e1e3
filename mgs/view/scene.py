"""A run's merged model as `mgs view` and `mgs render` show it: blocks, cells, cameras, renders.

The Gaussians are decoded per view (Scaffold-GS decodes colour and opacity from the viewing
direction) and rasterised by `mgs.render` on this process's device: our rasterizer on the CPU,
gsplat on CUDA (`choose_backend`). Block b holds the anchors inside its own cells, as `mgs merge`
crops them, so switching a block off removes exactly what that block trained.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mgs.blocks import Run
from mgs.device import resolve_device
from mgs.errors import InputError
from mgs.merge import MergedModel, load_model, render_model
from mgs.model import Anchors
from mgs.partition.geometry import cell_bounds, contract, uncontract
from mgs.render.gsplat_backend import choose_backend

log = logging.getLogger("mgs.view")

# block colours (RGB 0-255), repeated for more blocks: matplotlib's tab10
BLOCK_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def block_colour(block: int) -> tuple[int, int, int]:
    return BLOCK_COLOURS[block % len(BLOCK_COLOURS)]


@dataclass
class CellBox:
    block: int
    cell: int
    low: np.ndarray  # world corners
    high: np.ndarray

    def edges(self) -> np.ndarray:
        """(12, 2, 3) the box's edges as line segments."""
        corners = np.array([[(self.low, self.high)[(i >> a) & 1][a] for a in range(3)]
                            for i in range(8)])
        pairs = [(i, i | 1 << a) for i in range(8) for a in range(3) if not i >> a & 1]
        return np.array([[corners[i], corners[j]] for i, j in pairs])


class RunView:
    """Everything of a run the viewer and the video need, loaded once."""

    def __init__(self, run_dir: str | Path, device: str = "auto", backend: str = "auto"):
        self.root = Path(run_dir)
        if not self.root.is_dir():
            raise InputError(f"run folder {self.root} does not exist")
        run = Run.open(self.root)
        self.scene = run.scene()
        self.partition = run.partition()
        self.device = resolve_device(device if device != "auto" else run.train.device)
        self.backend = choose_backend(backend, self.device)
        model = load_model(self.root / "model" / "decoder.pt")
        self.factor = run.train.resolution
        self.background = torch.tensor(run.train.background, dtype=torch.float32,
                                       device=self.device)
        xyz = model.anchors.xyz.numpy()
        # the block whose cells hold each anchor: what merge kept from that block
        self.anchor_block = self.partition.block_of_points(xyz)
        self.num_blocks = self.partition.num_blocks
        self._model = model
        self._subsets: dict[frozenset, MergedModel] = {}
        self._lock = threading.Lock()  # one render at a time (viewer threads share the model)
        self.up = _unit(np.asarray(self.scene.up, dtype=np.float64))
        self.centre = np.median(xyz, axis=0) if len(xyz) else np.zeros(3)
        self.metrics = self._read_metrics()
        log.info("%s: %d anchors in %d blocks, rendering with %s on %s", self.root,
                 model.anchors.count, self.num_blocks, self.backend, self.device)

    def _read_metrics(self) -> dict | None:
        path = self.root / "eval" / "metrics.json"
        if not path.is_file():
            log.warning("%s not found: the viewer shows no metrics (run `mgs evaluate`)", path)
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(f"{path} is not valid JSON ({exc}); run `mgs evaluate` again") \
                from exc

    def anchors_per_block(self) -> list[int]:
        return np.bincount(self.anchor_block, minlength=self.num_blocks).tolist()

    def model_of(self, blocks: frozenset[int]) -> MergedModel:
        """The merged model restricted to these blocks' anchors, on the render device."""
        if blocks not in self._subsets:
            keep = torch.as_tensor(np.isin(self.anchor_block, sorted(blocks)))
            tensors = {k: v[keep] for k, v in self._model.anchors.tensors().items()}
            subset = MergedModel(Anchors.from_tensors(tensors).to(self.device),
                                 self._model.anchor_block[keep].to(self.device),
                                 [d.to(self.device) for d in self._model.decoders])
            if len(self._subsets) > 16:  # toggling around must not keep every combination
                self._subsets.clear()
            self._subsets[blocks] = subset
        return self._subsets[blocks]

    @torch.no_grad()
    def render(self, viewmat: np.ndarray, K: np.ndarray, width: int, height: int,
               blocks: frozenset[int] | None = None) -> np.ndarray:
        """(height, width, 3) uint8 image of the enabled blocks seen by a pinhole camera."""
        blocks = frozenset(range(self.num_blocks)) if blocks is None else frozenset(blocks)
        with self._lock:
            model = self.model_of(blocks)
            if model.anchors.count == 0:
                image = self.background.expand(height, width, 3)
            else:
                image = render_model(
                    model, torch.tensor(viewmat, dtype=torch.float32, device=self.device),
                    torch.tensor(K, dtype=torch.float32, device=self.device), width, height,
                    background=self.background, backend=self.backend).image
            return (image * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()

    def camera_block(self, camera) -> int:
        return int(self.partition.block_of_points(camera.center[None])[0])

    def cell_boxes(self) -> list[CellBox]:
        """Each block's cells as world boxes. Cells end at infinity beyond the partition's aabb
        (contracted space), so they are cut at the anchors' extent (2nd to 98th percentile per
        axis, stray anchors far out would blow the boxes up); inside the aabb the contraction is
        linear and the boxes are exact."""
        anchors_q = contract(self._model.anchors.xyz.numpy(), self.partition.aabb)
        lo_q, hi_q = np.percentile(anchors_q, [2, 98], axis=0)
        boxes = []
        for index, block in enumerate(self.partition.blocks):
            for cell in block.cells:
                lo, hi = cell_bounds(cell, self.partition.block_dim)
                lo, hi = np.maximum(lo, lo_q), np.minimum(hi, hi_q)
                if np.any(hi <= lo):
                    continue  # no anchors reach this cell
                corners = np.array([[(lo, hi)[(i >> a) & 1][a] for a in range(3)]
                                    for i in range(8)])
                world = uncontract(corners, self.partition.aabb)
                boxes.append(CellBox(index, cell, world.min(0), world.max(0)))
        return boxes


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def look_at(eye, target, up) -> np.ndarray:
    """World-to-camera 4x4 (OpenCV: +z forward, +y down) of a camera at `eye` facing `target`."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = _unit(target - eye)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-6:  # looking straight along up: any horizontal right will do
        right = np.cross(forward, np.roll(up, 1))
    right = _unit(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    viewmat = np.eye(4)
    viewmat[:3, :3] = rotation
    viewmat[:3, 3] = -rotation @ eye
    return viewmat


def intrinsics(fov_y: float, width: int, height: int) -> np.ndarray:
    """Pinhole K with square pixels and the principal point at the image centre."""
    focal = height / 2 / math.tan(fov_y / 2)
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])


def vertical_fov(camera) -> float:
    return 2 * math.atan(camera.height / (2 * camera.K[1, 1]))
