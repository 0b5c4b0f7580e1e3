"""Momentum-GS between-round math: block weights, student averaging, teacher EMA.

Each round every block trains its own copy of the student decoder; the sync averages the copies
with the block weights (local SGD), blends the average into the momentum teacher, and turns the
blocks' validation metrics into the next round's weights (ALGORITHM.md §3-§4, DESIGN.md
"Algorithm decisions").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mgs.config import check_config
from mgs.errors import InputError

MODES = ("single", "independent", "shared", "momentum", "full")


@dataclass
class MomentumConfig:
    mode: str = "full"  # single | independent | shared | momentum | full (the ablation ladder)
    rounds: int = 120  # syncs of the shared decoder
    iterations_per_round: int = 500
    final_iterations: int = 0  # anchor-only fine-tuning with the decoder frozen at the last average
    momentum: float = 0.9  # teacher <- m * teacher + (1 - m) * average, per sync
    consistency_weight: float = 50.0
    sigma: float = 10.0  # block-weight width (paper's adaptive sigma)
    ssim_scale: float = 10.0  # SSIM gap is scaled by this before squaring (paper's lambda=100)
    warmup_rounds: int = 1  # weights stay 1 up to and including this round
    metric_ema: float = 0.9  # smoothing of each block's validation PSNR/SSIM across rounds

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "MomentumConfig":
        config = cls(**check_config(cls, values, "momentum", source))
        if config.mode not in MODES:
            raise InputError(f"{source}: momentum 'mode' must be one of {', '.join(MODES)} "
                             f"(got {config.mode!r})")
        for key in ("rounds", "iterations_per_round"):
            if getattr(config, key) <= 0:
                raise InputError(f"{source}: momentum '{key}' must be > 0")
        if not 0.0 <= config.momentum < 1.0:
            raise InputError(f"{source}: 'momentum' must be in [0, 1) (got {config.momentum})")
        return config

    @property
    def shares_decoder(self) -> bool:
        return self.mode in ("single", "shared", "momentum", "full")

    @property
    def uses_teacher(self) -> bool:
        return self.mode in ("momentum", "full")

    @property
    def uses_weighting(self) -> bool:
        return self.mode == "full"


def update_metric_ema(previous: float | None, value: float, decay: float) -> float:
    """EMA initialised with the first value."""
    return value if previous is None or math.isnan(previous) else decay * previous + (1 - decay) * value


def block_weights(psnr_ema: list[float], ssim_ema: list[float], sigma: float,
                  ssim_scale: float = 10.0) -> list[float]:
    """w_b = 2 - exp(-[(P* - P_b)^2 + (s·(S* - S_b))^2] / (2 sigma^2)): 1 for the best block,
    towards 2 for blocks far behind it. P*, S* are independent maxima."""
    best_psnr, best_ssim = max(psnr_ema), max(ssim_ema)
    return [2.0 - math.exp(-((best_psnr - p) ** 2 + (ssim_scale * (best_ssim - s)) ** 2)
                           / (2.0 * sigma**2))
            for p, s in zip(psnr_ema, ssim_ema)]


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ w_b S_b / Σ w_b, tensor by tensor."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state")
    total = float(sum(weights))
    return {key: sum(w * state[key].double() for w, state in zip(weights, states)).div(total)
            .to(states[0][key].dtype) for key in states[0]}


def ema_update(teacher: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
               momentum: float) -> dict[str, torch.Tensor]:
    return {key: momentum * teacher[key] + (1.0 - momentum) * target[key] for key in teacher}
