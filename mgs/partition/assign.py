"""Camera-to-block assignment for `mgs partition`: visibility scores, merging, validation split.

Both scorers answer `scores(groups, skip) -> float [cameras, groups]`, where a group is the list of
grid cells of one block and `skip[i, g]` marks pairs already decided (camera centre in the block);
a camera is assigned when its score exceeds the threshold.

`projection` (cheap, default): the image is cut into BINS (16×12) bins; each SfM point in front
of the camera is projected; a bin belongs to a block when one of the block's points in it is at
most DEPTH_SLACK (25 %) farther than the bin's nearest point. The depth test is a coarse z-buffer:
a block hidden behind buildings does not count, while neighbouring cells on one surface share
their border bins. Score = share of all bins the block owns (sky and empty bins count against it).

`ssim` (the paper's test): 1 − SSIM(render without the block's anchors, render with all) with a
coarse model, at reduced resolution.

Blocks with too few cameras (or no SfM points) are merged into their nearest neighbour and
re-scored as one block; every 10th of a block's cameras (by name) also validates it (still trained on).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm import tqdm

from mgs.errors import InputError
from mgs.partition.geometry import cell_centres, cell_ids

log = logging.getLogger("mgs.partition")

BINS = (16, 12)  # columns, rows
DEPTH_SLACK = 0.25
MAX_PROJECTED_POINTS = 200_000  # a random subset is plenty for 192 bins
NEAR = 1e-6
VALIDATION_EVERY = 10


def make_visibility(config, scene, cameras, aabb, point_cells):
    if config.assignment == "center":
        return None
    n_cells = int(np.prod(config.block_dim))
    if config.assignment == "projection":
        return ProjectionVisibility(cameras, scene.points_xyz, point_cells, n_cells)
    return SsimVisibility(config.coarse, cameras, aabb, config.block_dim, config.ssim_max_side,
                          config.device)


def image_bins(camera, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point indices in front of the camera and inside the image, their bin, their depth)."""
    cam = points @ camera.world_to_camera[:3, :3].T + camera.world_to_camera[:3, 3]
    depth = cam[:, 2]
    front = np.flatnonzero(depth > NEAR)
    pix = cam[front] @ camera.K.T
    u, v = pix[:, 0] / pix[:, 2], pix[:, 1] / pix[:, 2]
    inside = (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)
    cols, rows = BINS
    bx = np.minimum((u[inside] / camera.width * cols).astype(np.int64), cols - 1)
    by = np.minimum((v[inside] / camera.height * rows).astype(np.int64), rows - 1)
    index = front[inside]
    return index, by * cols + bx, depth[index]


class ProjectionVisibility:
    def __init__(self, cameras, points: np.ndarray, point_cells: np.ndarray, n_cells: int,
                 seed: int = 0):
        if len(points) > MAX_PROJECTED_POINTS:
            keep = np.sort(np.random.default_rng(seed).choice(len(points), MAX_PROJECTED_POINTS,
                                                              replace=False))
            points, point_cells = points[keep], point_cells[keep]
        n_bins = BINS[0] * BINS[1]
        # owned[i, c, k]: bin k of camera i shows cell c in front
        self.owned = np.zeros((len(cameras), n_cells, n_bins), dtype=bool)
        for i, camera in enumerate(tqdm(cameras, desc="projecting points", unit="camera",
                                        leave=False, disable=None)):
            index, bins, depth = image_bins(camera, points)
            if len(index) == 0:
                continue
            nearest = np.full(n_bins, np.inf)
            np.minimum.at(nearest, bins, depth)
            front = depth <= (1.0 + DEPTH_SLACK) * nearest[bins]
            self.owned[i, point_cells[index[front]], bins[front]] = True

    def scores(self, groups: list[list[int]], skip: np.ndarray | None = None) -> np.ndarray:
        return np.stack([self.owned[:, cells].any(axis=1).mean(axis=1) for cells in groups],
                        axis=1)


class SsimVisibility:
    def __init__(self, checkpoint, cameras, aabb, block_dim, max_side: int, device: str = "auto"):
        from mgs.checkpoint import load_checkpoint
        from mgs.model import Anchors, Decoder
        from mgs.device import resolve_device

        self.device = resolve_device(device)
        state = load_checkpoint(checkpoint, map_location=self.device)
        try:
            config = state.get("config", {})
            self.anchors = Anchors.from_tensors(state["anchors"]).to(self.device)
            self.decoder = Decoder(int(config.get("feat_dim", 32)),
                                   int(config.get("n_offsets", 10)),
                                   appearance_dim=int(config.get("appearance_dim", 0)))
            self.decoder.load_state_dict(state["decoder"])
            # a coarse model with appearance latents renders every camera with their mean
            self.latent = (state["appearance"].mean(0).to(self.device)
                           if self.decoder.appearance_dim else None)
        except (KeyError, RuntimeError, AttributeError) as exc:
            raise InputError(f"coarse checkpoint {checkpoint} is not a model checkpoint with "
                             f"anchors and a decoder ({exc!r}); pass the checkpoint.pt of a "
                             "`mgs train` run") from exc
        self.decoder.to(self.device).eval()
        self.background = torch.tensor(config.get("background", [0.0, 0.0, 0.0]),
                                       dtype=torch.float32, device=self.device)
        self.backend = config.get("backend", "auto")
        xyz = self.anchors.xyz.detach().cpu().numpy()
        self.anchor_cells = torch.as_tensor(cell_ids(xyz, aabb, block_dim), device=self.device)
        self.cameras = cameras
        self.max_side = max_side
        log.info("ssim assignment with %d coarse anchors from %s", len(xyz), checkpoint)

    def _render(self, gaussians, keep, viewmat, K, width, height):
        from mgs.render import render

        out = render(gaussians.means[keep], gaussians.quats[keep], gaussians.scales[keep],
                     gaussians.opacities[keep], gaussians.colors[keep], viewmat, K, width, height,
                     background=self.background, backend=self.backend)
        return out.image.clamp(0, 1)

    @torch.no_grad()
    def scores(self, groups: list[list[int]], skip: np.ndarray | None = None) -> np.ndarray:
        from mgs.metrics import ssim
        from mgs.model import decode

        out = np.zeros((len(self.cameras), len(groups)))
        group_cells = [torch.as_tensor(cells, device=self.device) for cells in groups]
        for i, camera in enumerate(tqdm(self.cameras, desc="ssim assignment", unit="camera",
                                        leave=False, disable=None)):
            todo = [g for g in range(len(groups)) if skip is None or not skip[i, g]]
            if not todo:
                continue
            factor = max(1, math.ceil(max(camera.width, camera.height) / self.max_side))
            cam = camera.scaled(factor)
            viewmat = torch.tensor(cam.world_to_camera, dtype=torch.float32, device=self.device)
            K = torch.tensor(cam.K, dtype=torch.float32, device=self.device)
            gaussians, _ = decode(self.decoder, self.anchors, viewmat, K, cam.width, cam.height,
                                  self.latent)
            # anchor of each rendered Gaussian: visible anchors repeated k times, then selected
            anchor = torch.nonzero(gaussians.visible).flatten()
            anchor = anchor.repeat_interleave(self.decoder.n_offsets)[gaussians.selected]
            cells = self.anchor_cells[anchor]
            everything = torch.ones(len(cells), dtype=torch.bool, device=self.device)
            full = self._render(gaussians, everything, viewmat, K, cam.width, cam.height)
            for g in todo:
                drop = torch.isin(cells, group_cells[g])
                if drop.any():
                    without = self._render(gaussians, ~drop, viewmat, K, cam.width, cam.height)
                    out[i, g] = 1.0 - float(ssim(without, full))
        return out


# ------------------------------------------------------------------ blocks

def _nearest_block(index: int, groups: list[list[int]], counts: np.ndarray,
                   centres: np.ndarray, starved: set[int], populated: set[int]) -> int:
    """Nearest other block by cell-centre distance in contracted space (ties: fewer cameras),
    a block that is not starved itself first. The distance is to the block's cells that hold
    SfM points: empty cells around a scene then join the block whose data is next to them, not
    the block that has already taken an empty neighbour (a chain that would make one block's
    cells, and so its margin, surround all the others)."""
    mine = centres[groups[index]]
    best = None
    for other, cells in enumerate(groups):
        if other == index:
            continue
        cells = [c for c in cells if c in populated] or cells
        dist = np.linalg.norm(mine[:, None] - centres[cells][None], axis=-1).min()
        key = (other in starved, round(float(dist), 9), int(counts[other]), other)
        best = key if best is None or key < best else best
    return best[3]


def merge_starved(groups: list[list[int]], members: np.ndarray, points_per_group: np.ndarray,
                  min_cameras: int, block_dim, evaluate) -> tuple[list[list[int]], np.ndarray]:
    """Merge blocks with < min_cameras cameras or no SfM points into their nearest neighbour.

    `members` is bool [cameras, groups]; `evaluate(cells)` gives the merged block's member column.
    """
    groups, points = [list(g) for g in groups], list(points_per_group)
    centres = cell_centres(block_dim)
    populated = {c for g, n in zip(groups, points) if n > 0 for c in g}
    while len(groups) > 1:
        counts = members.sum(axis=0)
        starved = [g for g in range(len(groups)) if counts[g] < min_cameras or points[g] == 0]
        if not starved:
            break
        index = min(starved, key=lambda g: (counts[g], points[g], g))
        target = _nearest_block(index, groups, counts, centres, set(starved), populated)
        empty = counts[index] == 0 and points[index] == 0
        (log.info if empty else log.warning)(
            "cells %s: %d cameras, %d SfM points (min_cameras %d): merged into the block of "
            "cells %s", groups[index], counts[index], points[index], min_cameras, groups[target])
        merged = sorted(groups[index] + groups[target])
        column = evaluate(merged)
        keep = [g for g in range(len(groups)) if g not in (index, target)]
        groups = [groups[g] for g in keep] + [merged]
        points = [points[g] for g in keep] + [points[index] + points[target]]
        members = np.concatenate([members[:, keep], column[:, None]], axis=1)
    counts = members.sum(axis=0)
    if counts.min() < min_cameras:
        raise InputError(f"a block is left with {int(counts.min())} cameras after merging, fewer "
                         f"than min_cameras {min_cameras} (the scene has {members.shape[0]} train "
                         "cameras); lower min_cameras or use fewer blocks")
    order = np.argsort([min(g) for g in groups], kind="stable")
    return [groups[g] for g in order], members[:, order]


def split_validation(names: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation): every camera trains; every 10th by name (index % 10 == 0) also
    scores the block for its weight. As officially, validation views stay in training: holding
    them out would cost a small block a tenth of its views."""
    ordered = sorted(names)
    return ordered, [n for i, n in enumerate(ordered) if i % VALIDATION_EVERY == 0]
