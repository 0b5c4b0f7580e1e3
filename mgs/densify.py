"""Scaffold-GS anchor growing and pruning (ALGORITHM.md §2.4).

Statistics are gathered after every backward pass inside the densification window; every
`update_interval` steps new anchors are grown where neural Gaussians have large screen-space
gradients (three grid levels), and anchors whose Gaussians stay transparent are pruned.
Adam moments follow the anchor tensors: zeros for new rows, removed for pruned rows.
"""

from __future__ import annotations

import math

import torch

from mgs.config import TrainConfig
from mgs.model import Anchors, DecodedAttributes, NeuralGaussians

ANCHOR_PARAMS = ("features", "offsets", "scaling")


class DensifyState:
    """Per-anchor and per-(anchor, offset) accumulators."""

    def __init__(self, n_anchors: int, n_offsets: int, device="cpu"):
        self.n_offsets = n_offsets
        self.opacity_accum = torch.zeros(n_anchors, device=device)
        self.anchor_visits = torch.zeros(n_anchors, device=device)
        self.grad_accum = torch.zeros(n_anchors * n_offsets, device=device)
        self.grad_count = torch.zeros(n_anchors * n_offsets, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"opacity_accum": self.opacity_accum, "anchor_visits": self.anchor_visits,
                "grad_accum": self.grad_accum, "grad_count": self.grad_count}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n_offsets: int,
                     device="cpu") -> "DensifyState":
        state = cls(0, n_offsets)
        for name, value in tensors.items():
            setattr(state, name, value.to(device).clone())
        return state

    @torch.no_grad()
    def accumulate(self, gaussians: NeuralGaussians, attrs: DecodedAttributes,
                   means2d_grad: torch.Tensor, radii: torch.Tensor, width: int, height: int) -> None:
        """Add one view's statistics (call after backward)."""
        k = self.n_offsets
        visible_idx = gaussians.visible.nonzero().squeeze(1)
        self.opacity_accum[visible_idx] += attrs.opacity.view(-1, k).clamp_min(0).sum(1)
        self.anchor_visits[visible_idx] += 1
        # flat (anchor, offset) index of every decoded Gaussian, then of the rendered ones
        flat = (visible_idx[:, None] * k + torch.arange(k, device=visible_idx.device)).reshape(-1)
        rendered = flat[gaussians.selected][radii > 0]
        # 3DGS thresholds are in NDC units: scale pixel gradients by half the image size
        grad = means2d_grad[radii > 0] * torch.tensor([width / 2.0, height / 2.0], device=radii.device)
        self.grad_accum.index_add_(0, rendered, grad.norm(dim=1))
        self.grad_count.index_add_(0, rendered, torch.ones_like(rendered, dtype=torch.float32))


@torch.no_grad()
def adjust_anchors(anchors: Anchors, state: DensifyState, optimizer: torch.optim.Optimizer,
                   config: TrainConfig, generator: torch.Generator) -> dict[str, int]:
    """Grow then prune; returns counts for logging. Call before the optimizer step: as officially,
    an adjustment replaces every anchor parameter (pruning always runs, even when it removes
    nothing), so the anchors take no Adam step on an adjustment step (their gradients are dropped
    here; the decoder still steps)."""
    interval = config.update_interval
    mean_grad = torch.nan_to_num(state.grad_accum / state.grad_count, nan=0.0)
    eligible = state.grad_count > interval * config.success_threshold * 0.5
    before = anchors.count
    _grow(anchors, state, optimizer, config, mean_grad, eligible, generator)
    grown = anchors.count - before

    pad = anchors.count * state.n_offsets - eligible.numel()
    eligible = torch.cat([eligible, eligible.new_zeros(pad)])
    state.grad_accum[eligible] = 0
    state.grad_count[eligible] = 0

    well_visited = state.anchor_visits > interval * config.success_threshold
    prune = (state.opacity_accum < config.min_opacity * state.anchor_visits) & well_visited
    state.opacity_accum[well_visited] = 0
    state.anchor_visits[well_visited] = 0
    if prune.any():
        _select_rows(anchors, state, optimizer, ~prune)
    anchors.scaling.data[:, 3:].clamp_(max=config.max_scale_log)
    for name in ANCHOR_PARAMS:
        getattr(anchors, name).grad = None
    return {"grown": grown, "pruned": int(prune.sum()), "anchors": anchors.count}


def _grow(anchors: Anchors, state: DensifyState, optimizer, config: TrainConfig,
          mean_grad: torch.Tensor, eligible: torch.Tensor, generator: torch.Generator) -> None:
    k = state.n_offsets
    before = anchors.count
    for level in range(config.update_depth):
        if level > 0 and anchors.count == before:
            break  # as in Scaffold-GS: the finer levels run only when level 0 grew anchors
        threshold = config.densify_grad_threshold * (config.update_hierarchy_factor // 2) ** level
        keep_prob = 1.0 - 0.5 ** (level + 1)
        n_flat = anchors.count * k
        grads = torch.cat([mean_grad, mean_grad.new_zeros(n_flat - mean_grad.numel())])
        ok = torch.cat([eligible, eligible.new_zeros(n_flat - eligible.numel())])
        coin = torch.rand(n_flat, generator=generator).to(grads.device) < keep_prob
        candidates = ok & (grads >= threshold) & coin
        if not candidates.any():
            continue
        cell = config.voxel_size * config.update_init_factor / config.update_hierarchy_factor**level
        offsets = anchors.offsets * torch.exp(anchors.scaling[:, None, :3])
        centres = (anchors.xyz[:, None, :] + offsets).reshape(-1, 3)[candidates]
        cand_cells = torch.round(centres / cell).long()
        cells, inverse = torch.unique(cand_cells, dim=0, return_inverse=True)
        occupied = torch.round(anchors.xyz / cell).long()
        is_new = ~_rows_in(cells, occupied)
        if not is_new.any():
            continue
        parent_features = anchors.features.repeat_interleave(k, dim=0)[candidates]
        features = parent_features.new_full((cells.shape[0], parent_features.shape[1]), -torch.inf)
        features.scatter_reduce_(0, inverse[:, None].expand_as(parent_features), parent_features,
                                 reduce="amax")
        n_new = int(is_new.sum())
        new_rows = {
            "xyz": cells[is_new].float() * cell,
            "features": features[is_new],
            "offsets": anchors.offsets.new_zeros(n_new, k, 3),
            "scaling": anchors.scaling.new_full((n_new, 6), math.log(cell)),
        }
        _append_rows(anchors, state, optimizer, new_rows)


def _rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each row of `rows`, whether it occurs in `table` (integer coordinates)."""
    if table.numel() == 0:
        return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    both = torch.cat([table, rows])
    _, inverse = torch.unique(both, dim=0, return_inverse=True)
    present = torch.zeros(int(inverse.max()) + 1, dtype=torch.bool, device=rows.device)
    present[inverse[: table.shape[0]]] = True
    return present[inverse[table.shape[0]:]]


def _param_group(optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if group["params"][0] is param:
            return group
    raise KeyError("parameter not managed by the optimizer")


def _swap_param(anchors: Anchors, optimizer, name: str, rows_fn) -> None:
    """Replace anchors.<name> by rows_fn(old) and apply the same row edit to its Adam moments."""
    old = getattr(anchors, name)
    new = torch.nn.Parameter(rows_fn(old.data, fill=None))
    group = _param_group(optimizer, old)
    state = optimizer.state.pop(old, None)
    if state:
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = rows_fn(state[key], fill=0.0)
        optimizer.state[new] = state
    group["params"][0] = new
    setattr(anchors, name, new)


def _append_rows(anchors: Anchors, state: DensifyState, optimizer, rows: dict) -> None:
    n_new = rows["xyz"].shape[0]
    k = state.n_offsets
    anchors.xyz = torch.cat([anchors.xyz, rows["xyz"]])
    for name in ANCHOR_PARAMS:
        def append(t, fill, name=name):
            extra = rows[name] if fill is None else torch.full_like(rows[name], fill)
            return torch.cat([t, extra])
        _swap_param(anchors, optimizer, name, append)
    for name, rows_per_anchor in (("opacity_accum", 1), ("anchor_visits", 1),
                                  ("grad_accum", k), ("grad_count", k)):
        old = getattr(state, name)
        setattr(state, name, torch.cat([old, old.new_zeros(n_new * rows_per_anchor)]))


def _select_rows(anchors: Anchors, state: DensifyState, optimizer, keep: torch.Tensor) -> None:
    anchors.xyz = anchors.xyz[keep]
    for name in ANCHOR_PARAMS:
        _swap_param(anchors, optimizer, name, lambda t, fill: t[keep])
    flat_keep = keep.repeat_interleave(state.n_offsets)
    state.opacity_accum = state.opacity_accum[keep]
    state.anchor_visits = state.anchor_visits[keep]
    state.grad_accum = state.grad_accum[flat_keep]
    state.grad_count = state.grad_count[flat_keep]
