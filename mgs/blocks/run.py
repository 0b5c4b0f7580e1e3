"""A run folder (configuration, scene, partition, checkpoint paths) and round 0 (`mgs init`)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mgs.appearance import AppearanceImages
from mgs.checkpoint import load_checkpoint, save_checkpoint
from mgs.config import ExportConfig, TrainConfig, yaml_section
from mgs.errors import InputError
from mgs.model import Anchors, Decoder, initial_log_scale, voxelize
from mgs.momentum import MomentumConfig
from mgs.partition import load_partition
from mgs.partition.region import block_anchor_mask
from mgs.plan import layout
from mgs.scene import load_scene
from mgs.train import spatial_lr_scale

log = logging.getLogger("mgs.blocks")


@dataclass
class Run:
    """A run folder with its configuration, scene and partition."""
    root: Path
    train: TrainConfig
    momentum: MomentumConfig
    export: ExportConfig = field(default_factory=ExportConfig)

    @classmethod
    def open(cls, root: str | Path, config_path: str | Path | None = None) -> "Run":
        root = Path(root)
        config_path = Path(config_path) if config_path else root / "config.yaml"
        if not config_path.is_file():
            raise InputError(f"config {config_path} not found; pass --config or write the "
                             "run's config.yaml")
        train = TrainConfig.from_dict(yaml_section(config_path, "train"), source=str(config_path))
        momentum = MomentumConfig.from_dict(yaml_section(config_path, "momentum"),
                                            source=str(config_path))
        export = ExportConfig.from_dict(yaml_section(config_path, "export"),
                                        source=str(config_path))
        return cls(root, train, momentum, export)

    @property
    def config_hash(self) -> str:
        """Keys that make block checkpoints incompatible (rounds may grow)."""
        m = self.momentum
        shaped = [self.train.shape_hash(), m.mode, m.iterations_per_round]
        # a teacher shapes only modes that have one; the official pair adds nothing, so runs
        # made before these keys existed keep their hashes
        teacher = m.teacher if m.uses_teacher else "step"
        if (teacher, m.sync) != ("step", "average"):
            shaped += [teacher, m.sync]
        return hashlib.sha256(json.dumps(shaped).encode()).hexdigest()[:16]

    def scene(self):
        return load_scene(self.root / "scene")

    def partition(self):
        return load_partition(self.root / layout.file("partition"))

    def shared_path(self, round_index: int) -> Path:
        return self.root / layout.file("shared", r=round_index)

    def block_path(self, round_index: int, block: int) -> Path:
        return self.root / layout.file("block", r=round_index, b=block)

    def decoder_path(self, round_index: int, block: int) -> Path:
        return self.root / layout.file("decoder", r=round_index, b=block)

    def final_path(self, block: int) -> Path:
        """The block as merged: after finalize, or after the last round without one."""
        return self.root / layout.merged_block(block, self.momentum.rounds,
                                               self.momentum.final_iterations)

    def load(self, path: Path) -> dict:
        return load_checkpoint(path, self.config_hash)

    def save(self, path: Path, payload: dict) -> None:
        save_checkpoint(path, payload, self.config_hash)


def decoder_state(decoder: Decoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}


def init_blocks(run: Run) -> int:
    """Round 0: each block's anchors (its cells expanded by the margin, or with margin `all`
    what its cameras see), one random decoder as student and teacher. Returns the number of blocks."""
    config = run.train
    scene, partition = run.scene(), run.partition()
    if run.momentum.mode == "single" and partition.num_blocks != 1:
        raise InputError(f"momentum mode 'single' trains one model on the whole scene, but "
                         f"{run.root / 'partition'} has {partition.num_blocks} blocks; "
                         "partition with block_dim [1, 1, 1] or choose another mode")
    torch.manual_seed(config.seed)
    decoder = Decoder(config.feat_dim, config.n_offsets, appearance_dim=config.appearance_dim)
    # every anchor's initial scale from its neighbours in the whole scene, as officially (each
    # block starts from the whole cloud): a block's border anchors see past its region
    xyz = torch.as_tensor(voxelize(scene.points_xyz, config.voxel_size), dtype=torch.float32)
    log_scale = initial_log_scale(xyz)
    for index, block in enumerate(partition.blocks):
        cameras = [scene.camera(name) for name in block.train_cameras]
        mask = torch.from_numpy(block_anchor_mask(
            partition, index, xyz, log_scale,
            [camera.scaled(config.resolution) for camera in cameras]))
        if not mask.any():
            raise InputError(f"block {index} of {run.root / 'partition'} holds no SfM points; "
                             "increase the margin or use fewer blocks")
        anchors = Anchors.initial(xyz[mask], log_scale[mask], config.feat_dim, config.n_offsets)
        run.save(run.block_path(0, index), {
            "round": 0, "block": index, "step": 0, "anchors": anchors.tensors(),
            "decoder": decoder_state(decoder), "lr_scale": spatial_lr_scale(cameras)})
        log.info("block %d: %d anchors, %d train cameras", index, anchors.count, len(cameras))
    teacher = decoder_state(decoder)
    n = len(partition.blocks)
    shared = {
        "round": 0, "student": decoder_state(decoder), "teacher": teacher,
        "weights": torch.ones(n, dtype=torch.float64),
        "psnr_ema": torch.full((n,), float("nan"), dtype=torch.float64),
        "ssim_ema": torch.full((n,), float("nan"), dtype=torch.float64)}
    if config.appearance_dim:  # zero latents (mgs.appearance), no image held yet
        images = AppearanceImages.from_scene(scene)
        shared["appearance"] = torch.zeros(len(images.names), config.appearance_dim)
        shared["appearance_held"] = torch.zeros(len(images.names), dtype=torch.bool)
    run.save(run.shared_path(0), shared)
    return n
