"""Training configuration: one dataclass, paper defaults (ALGORITHM.md §6.1), YAML overrides.

Iteration-based constants (densification window, LR decay length, validation interval) are plain
numbers so a short CPU run can shrink them together; `config/config.yaml` holds the CPU demo values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mgs.errors import InputError
from mgs.validate import check_section

APPEARANCE_RULES = ("nearest", "mean")  # latent of a view without its own (mgs.appearance)
# steps fitting splats.ply to the training views after the bake (mgs.bake.refine); here, not
# there, because the workflow's job sizes (mgs.plan, no torch) count them too
EXPORT_REFINE_STEPS = 600
DEFAULT_SH_DEGREE = 1  # 2 and 3 add at most 0.1 dB for 1.6-2.4x the bytes (README)


@dataclass
class TrainConfig:
    # representation (Scaffold-GS)
    feat_dim: int = 32
    n_offsets: int = 10
    voxel_size: float = 0.0001  # anchor snapping grid, scene units; 0 = keep every SfM point
    max_init_anchors: int = 0  # 0 = no limit; else subsample the voxelised points (CPU demos)
    appearance_dim: int = 0  # per-image latent fed to the colour MLP; 0 = off (official)
    appearance_eval: str = "nearest"  # test views: nearest train camera's latent | mean latent
    # schedule
    iterations: int = 60_000
    lr_max_steps: int = 30_000  # log-linear decays end here, then hold
    seed: int = 0
    resolution: int = 1  # image downsampling factor (bicubic cache)
    # learning rates
    offset_lr_init: float = 0.01
    offset_lr_final: float = 0.0001
    feature_lr: float = 0.0075
    scaling_lr: float = 0.007
    mlp_opacity_lr_init: float = 0.002
    mlp_opacity_lr_final: float = 0.00002
    mlp_cov_lr_init: float = 0.004
    mlp_cov_lr_final: float = 0.004
    mlp_color_lr_init: float = 0.008
    mlp_color_lr_final: float = 0.00005
    appearance_lr_init: float = 0.05  # Scaffold-GS's appearance embedding rates
    appearance_lr_final: float = 0.0005
    # loss
    lambda_dssim: float = 0.2
    scale_reg_weight: float = 0.01
    # anchor growing / pruning (§2.4)
    start_stat: int = 500
    update_from: int = 300
    update_interval: int = 25
    update_until: int = 30_000
    min_opacity: float = 0.005
    success_threshold: float = 0.8
    densify_grad_threshold: float = 0.0002
    update_depth: int = 3
    update_init_factor: int = 128
    update_hierarchy_factor: int = 4
    max_scale_log: float = 0.05  # clamp of the base-scale log values at each adjustment
    # validation and checkpoints
    eval_interval: int = 1000
    checkpoint_interval: int = 5000
    # compute
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: str = "auto"  # auto | torch | gsplat
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    background: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    # keys that change the shape or meaning of a checkpoint: resuming across them is refused
    SHAPE_KEYS = ("feat_dim", "n_offsets", "voxel_size", "max_init_anchors", "seed", "resolution",
                  "iterations", "lr_max_steps")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        config = cls(**check_config(cls, values, "train", source))
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        positive = ("feat_dim", "n_offsets", "iterations", "lr_max_steps", "resolution",
                    "update_interval", "eval_interval", "checkpoint_interval")
        for key in positive:
            if getattr(self, key) <= 0:
                raise InputError(f"{source}: '{key}' must be > 0 (got {getattr(self, key)})")
        if self.backend not in ("auto", "torch", "gsplat"):
            raise InputError(f"{source}: 'backend' must be auto, torch or gsplat (got {self.backend!r})")
        if self.appearance_eval not in APPEARANCE_RULES:
            raise InputError(f"{source}: 'appearance_eval' must be {' or '.join(APPEARANCE_RULES)} "
                             f"(got {self.appearance_eval!r})")
        if len(self.background) != 3:
            raise InputError(f"{source}: 'background' must be 3 numbers (RGB in [0,1])")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def shape_hash(self) -> str:
        """Hash of the keys that shape a checkpoint (a mismatch means 'not this run')."""
        shaped = {key: getattr(self, key) for key in self.SHAPE_KEYS}
        if self.appearance_dim:  # only when on: checkpoints without appearance keep their hash
            shaped["appearance_dim"] = self.appearance_dim
        return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ExportConfig:
    """How `mgs merge` writes splats.ply (the run config's `export:` section)."""
    sh_degree: int = DEFAULT_SH_DEGREE  # colour as spherical harmonics of this degree, 0 to 3
    refine_steps: int = EXPORT_REFINE_STEPS  # fitting the bake to its targets; 0 = none
    # the refinement's targets: the training photos (1), the model's renders (0) or a blend;
    # 1 measured best, above the model itself on Caliterra and the demo (README)
    photo_weight: float = 1.0

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ExportConfig":
        return cls(**check_config(cls, values, "export", source))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def yaml_section(path: str | Path, section: str) -> dict[str, Any]:
    """The mapping under `section` of a YAML file (empty when the section is absent)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {exc}") from exc
    values = data.get(section, {}) if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise InputError(f"{path}: '{section}' must be a mapping of keys")
    return dict(values)


def check_known_keys(cls, values: dict[str, Any], section: str, source: str) -> None:
    """Reject keys that are not fields of the dataclass `cls`, naming them and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{source}: unknown {section} key(s) {', '.join(unknown)}; "
                         f"known keys are: {', '.join(sorted(known))}")


def check_config(cls, values: Any, section: str, source: str) -> dict[str, Any]:
    """Unknown keys, then every value's type and range (mgs.validate); the normalised values."""
    if not isinstance(values, dict):
        raise InputError(f"{source}: '{section}' must be a mapping of keys, got {values!r}")
    check_known_keys(cls, values, section, source)
    return check_section(values, section, source)
