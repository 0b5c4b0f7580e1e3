"""The anchors a block holds: its cells grown by the partition's margin, or, with `margin: all`,
every anchor its training cameras see (ALGORITHM.md §2.3).

Officially every block holds the whole scene's anchors; those that none of its cameras sees get
no gradient and are never pruned, so they leave training untouched and only cost memory (they
are cropped away at merge unless they lie in the block's own cells). `all` keeps exactly the
anchors that matter: the block's cells (what merge keeps) and every anchor in the frustum of
one of its training cameras at initialisation, tested with the training cull (the anchor's
offset-extent footprint projected onto the image, mgs.model.visible_anchor_mask).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from mgs.model import Anchors, initial_log_scale, visible_anchor_mask
from mgs.partition.geometry import MARGIN_ALL
from mgs.scene import Camera, Scene


def seen_by(cameras: list[Camera], xyz: torch.Tensor, log_scale: torch.Tensor,
            desc: str = "visibility") -> np.ndarray:
    """Mask of the anchors at `xyz` (with initial log scales (N,)) that at least one camera
    sees, by the cull training uses."""
    anchors = Anchors.initial(xyz.float(), log_scale.float(), 1, 1)
    seen = torch.zeros(anchors.count, dtype=torch.bool)
    for camera in tqdm(cameras, desc=desc, leave=False, mininterval=2.0):
        seen |= visible_anchor_mask(
            anchors, torch.as_tensor(camera.world_to_camera, dtype=torch.float32),
            torch.as_tensor(camera.K, dtype=torch.float32), camera.width, camera.height)
    return seen.numpy()


def block_anchor_mask(partition, block: int, xyz: torch.Tensor, log_scale: torch.Tensor,
                      cameras: list[Camera]) -> np.ndarray:
    """Which of the anchors (`xyz`, initial `log_scale`) block `block` of `partition` (a
    mgs.partition.Partition) holds: its region with
    the partition's margin, or with `all` its cells plus what its training `cameras` see."""
    points = xyz.numpy()
    if partition.margin != MARGIN_ALL:
        return partition.points_in_region(points, block)
    in_cells = partition.points_in_region(points, block, margin=0.0)
    return in_cells | seen_by(cameras, xyz, log_scale, f"block {block} visibility")


def held_points(partition, scene: Scene):
    """block -> mask of the scene's SfM points it will hold (partition.tsv's count; with `all`
    seen by the full-resolution cameras, the training resolution may differ at image edges)."""
    if partition.margin != MARGIN_ALL:
        return lambda b: partition.points_in_region(scene.points_xyz, b)
    xyz = torch.as_tensor(scene.points_xyz, dtype=torch.float32)
    log_scale = initial_log_scale(xyz)
    return lambda b: block_anchor_mask(partition, b, xyz, log_scale, [
        scene.camera(name) for name in partition.blocks[b].train_cameras])
