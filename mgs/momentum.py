"""Momentum-GS math shared by block jobs and sync: block weights, averaging, EMAs.

Each round every block trains its own copy of the student decoder and of the momentum teacher,
which is blended from the student before every step. The
sync averages students and teachers with the block weights (local SGD) and turns the blocks'
validation metrics into the next round's weights (ALGORITHM.md §3-§4, DESIGN.md "The teacher").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mgs.config import check_config
from mgs.errors import InputError

MODES = ("single", "independent", "shared", "momentum", "full")
# what the consistency loss pulls a block's student toward (DESIGN.md "The teacher"):
#   step        the EMA of the block's own student, blended before every step (official)
#   global      the last sync's average, fixed for the round (no pull in round 1)
#   global-ema  the synced averages blended across syncs, fixed for the round
TEACHERS = ("step", "global", "global-ema")
# how sync makes the shared decoder: average the parameters, or fit one decoder to every
# block's outputs on a sample of that block's decoder inputs (mgs.blocks.fit)
SYNCS = ("average", "fit")


@dataclass
class MomentumConfig:
    mode: str = "full"  # single | independent | shared | momentum | full (the ablation ladder)
    rounds: int = 120  # syncs of the shared decoder
    iterations_per_round: int = 500
    final_iterations: int = 0  # anchor-only fine-tuning with the decoder frozen at the last average
    momentum: float = 0.9  # teacher <- m·teacher + (1 - m)·student before every step (official)
    # λ_c 0.5 with the per-step teacher: what measured best on the real Caliterra capture
    # (README, "Real capture"); the paper's 50 cost 2 dB there, `global` 0.35 dB
    consistency_weight: float = 0.5
    teacher: str = "step"  # step | global | global-ema (TEACHERS)
    teacher_sync_momentum: float = 0.5  # global-ema: T <- m_s·T + (1 - m_s)·average at each sync
    sync: str = "average"  # average | fit (SYNCS)
    sigma: float = 10.0  # block-weight width (paper's adaptive sigma)
    ssim_scale: float = 10.0  # SSIM gap is scaled by this before squaring (paper's lambda=100)
    warmup_rounds: int = 1  # weights stay 1 up to and including this round
    # per training step, as officially; a sync applies it for the round's steps (sync_metric_decay)
    metric_ema: float = 0.9
    # full block checkpoints of the last keep_rounds rounds stay on disk (0: all); sync removes
    # older ones. Disk only: it shapes no result and is outside every checkpoint's config hash
    keep_rounds: int = 2

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "MomentumConfig":
        config = cls(**check_config(cls, values, "momentum", source))
        if config.mode not in MODES:
            raise InputError(f"{source}: momentum 'mode' must be one of {', '.join(MODES)} "
                             f"(got {config.mode!r})")
        for key, allowed in (("teacher", TEACHERS), ("sync", SYNCS)):
            if getattr(config, key) not in allowed:
                raise InputError(f"{source}: momentum '{key}' must be one of "
                                 f"{', '.join(allowed)} (got {getattr(config, key)!r})")
        if not 0.0 <= config.teacher_sync_momentum < 1.0:
            raise InputError(f"{source}: 'teacher_sync_momentum' must be in [0, 1) "
                             f"(got {config.teacher_sync_momentum})")
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
    def per_step_teacher(self) -> bool:
        """The teacher follows the block's student every step (else it is fixed for a round)."""
        return self.uses_teacher and self.teacher == "step"

    @property
    def uses_weighting(self) -> bool:
        return self.mode == "full"

    @property
    def sync_metric_decay(self) -> float:
        """The metric EMA's decay per sync. Officially P̄ ← 0.9·P̄ + 0.1·P runs every step with
        P refreshed at each evaluation; a round's evaluation held for its steps is the same as
        one update with decay 0.9^steps, ≈ 0 for any real round: P̄ follows the latest
        evaluation."""
        return self.metric_ema ** self.iterations_per_round


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


@torch.no_grad()
def ema_update_(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """In place, parameter by parameter: θ_T ← m·θ_T + (1 − m)·θ_S (the per-step teacher)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def next_teacher(mode: str, round_index: int, average: dict[str, torch.Tensor],
                 block_teachers: dict[str, torch.Tensor] | None,
                 previous: dict[str, torch.Tensor], sync_momentum: float
                 ) -> dict[str, torch.Tensor]:
    """The teacher that sync r hands to round r + 1.

    `step`: the blocks' per-step teachers averaged like the students (`block_teachers`);
    `global`: this sync's average; `global-ema`: m_s·previous + (1 − m_s)·average, starting
    at the first sync's average (round 0's teacher is the random initial decoder)."""
    if mode == "step":
        if block_teachers is None:
            raise ValueError("teacher 'step' needs the blocks' averaged teachers")
        return block_teachers
    if mode == "global" or round_index <= 1:
        return {k: v.clone() for k, v in average.items()}
    if mode == "global-ema":
        return {k: (sync_momentum * previous[k].double()
                    + (1.0 - sync_momentum) * average[k].double()).to(average[k].dtype)
                for k in average}
    raise ValueError(f"unknown teacher {mode!r}")


def state_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ over all parameters together (a diagnostic of drift between decoders)."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))
