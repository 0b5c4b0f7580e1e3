"""Differentiable 3D Gaussian splatting rasterizer (gsplat 1.5.3 conventions).

Public entry points: `render` (image + per-Gaussian screen data) and `project`
(screen-space footprint only, e.g. for frustum culling of anchors).

Conventions: pinhole camera, world->camera `viewmat` (OpenCV, +z forward), wxyz
quaternions, linear scales, pixel (i, j) sampled at (i + 0.5, j + 0.5),
alpha = min(0.999, o·exp(-sigma)) with alpha < 1/255 skipped, front-to-back compositing
that stops before transmittance would reach 1e-4, background weighted by final T.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from mgs.errors import MgsError
from mgs.render.gsplat_backend import choose_backend, rasterize_gsplat, scatter_means2d
from mgs.render.projection import opacity_aware_radii, project_gaussians
from mgs.render.tiles import build_tile_intersections, composite_tiles_torch

__all__ = ["RenderOutput", "render", "project", "choose_backend", "BACKENDS"]

# "auto"/"torch"/"gsplat" are the normal choices; the last three force one compositor
# of the torch backend (tests, benchmarks, debugging).
BACKENDS = ("auto", "torch", "gsplat", "torch-fused", "torch-tiles", "brute-force")

_numba_warning_shown = False


@dataclass
class RenderOutput:
    """Result of `render` for one camera.

    After `loss.backward()`, `means2d_grad` holds d loss / d means2d (N, 2) in pixels
    (zeros for Gaussians that were not rendered); use it for densification statistics.
    With the torch backends `means2d.grad` holds the same tensor.

    `radii` has one definition on every backend (`opacity_aware_radii`: gsplat's), so "rendered"
    (radii > 0) and the densification statistics are the same quantity on CPU and GPU.
    All values are finite; gsplat's culled entries of means2d/depths are zeros.
    """

    image: Tensor  # (H, W, 3), background composited
    alpha: Tensor  # (H, W) accumulated opacity, 1 - final transmittance
    means2d: Tensor  # (N, 2) projected centres in pixels, part of the autograd graph
    radii: Tensor  # (N,) int32 screen radius in pixels; 0 = culled / not rendered
    depths: Tensor  # (N,) camera-space z
    # gsplat's own means2d tensor when it differs from `means2d` (gsplat backend).
    _grad_source: Optional[Tensor] = field(default=None, repr=False)
    _grad_source_ids: Optional[Tensor] = field(default=None, repr=False)

    @property
    def means2d_grad(self) -> Optional[Tensor]:
        """(N, 2) screen-space gradient, or None before backward / without grad."""
        if self._grad_source is None:
            return self.means2d.grad
        if self._grad_source.grad is None:
            return None
        return scatter_means2d(self._grad_source.grad, self._grad_source_ids, self.means2d.shape[0])


def project(
    means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
    near_plane: float = 0.01, eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Screen footprint of N Gaussians: (radii (N,) int32, means2d (N, 2), depths (N,), conics (N, 3)).

    radii > 0 means the Gaussian is in front of the camera and overlaps the image.
    """
    proj = project_gaussians(means, quats, scales, viewmat, K, width, height, near_plane=near_plane, eps2d=eps2d)
    return proj.radii_xy.max(dim=-1).values, proj.means2d, proj.depths, proj.conics


def render(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
    viewmat: Tensor, K: Tensor, width: int, height: int,
    background: Optional[Tensor] = None, backend: str = "auto",
    near_plane: float = 0.01, eps2d: float = 0.3,
) -> RenderOutput:
    """Render N Gaussians (means (N,3), quats (N,4) wxyz, scales (N,3) linear, opacities (N,)
    in [0,1], colors (N,3) RGB) with one camera; differentiable w.r.t. all of them.

    backend: "torch" (ours; numba-fused compositor on CPU, pure-torch tiles on GPU),
    "gsplat" (CUDA), or "auto" (gsplat for CUDA tensors when its extension runs on that GPU,
    else torch with one warning).
    """
    if backend not in BACKENDS:
        raise MgsError(f"unknown render backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    width, height = int(width), int(height)
    if background is not None:
        background = background.to(dtype=colors.dtype, device=colors.device)
    if means.shape[0] == 0:  # before any kernel: gsplat's projection divides by N
        return _render_empty(means, quats, scales, opacities, colors, viewmat, K, width, height,
                             background, near_plane, eps2d)
    backend = choose_backend(backend, means.device)
    if backend == "gsplat":
        result = rasterize_gsplat(means, quats, scales, opacities, colors, viewmat, K, width, height,
                                  background, near_plane=near_plane, eps2d=eps2d)
        if result.means2d_graph.requires_grad:
            result.means2d_graph.retain_grad()
        means2d = scatter_means2d(result.means2d_graph, result.gaussian_ids, means.shape[0])
        # culled rows of gsplat's means2d are uninitialised memory
        means2d = torch.where((result.radii > 0)[:, None], means2d, torch.zeros_like(means2d))
        return RenderOutput(image=result.rgb, alpha=result.alpha, means2d=means2d,
                            radii=result.radii, depths=result.depths,
                            _grad_source=result.means2d_graph, _grad_source_ids=result.gaussian_ids)

    proj = project_gaussians(means, quats, scales, viewmat, K, width, height, near_plane=near_plane, eps2d=eps2d)
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()  # densification reads the screen-space gradient after backward
    rgb, alpha = _composite(backend, means2d, proj, colors, opacities, width, height)
    image = rgb if background is None else rgb + (1.0 - alpha)[..., None] * background
    return RenderOutput(image=image, alpha=alpha, means2d=means2d,
                        radii=opacity_aware_radii(proj, opacities, width, height), depths=proj.depths)


def _render_empty(means, quats, scales, opacities, colors, viewmat, K, width, height, background,
                  near_plane, eps2d) -> RenderOutput:
    """Zero Gaussians (every anchor culled or dropped): the background, still differentiable."""
    proj = project_gaussians(means, quats, scales, viewmat, K, width, height, near_plane=near_plane,
                             eps2d=eps2d)  # plain torch ops on empty tensors: shapes only
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    # a sum over nothing (= 0) keeps the image in the graph, so loss.backward() still works
    link = means2d.sum() + opacities.sum() + colors.sum()
    rgb = colors.new_zeros(height, width, 3) + link
    alpha = colors.new_zeros(height, width) + link
    image = rgb if background is None else rgb + (1.0 - alpha)[..., None] * background
    return RenderOutput(image=image, alpha=alpha, means2d=means2d,
                        radii=proj.radii_xy.max(dim=-1).values, depths=proj.depths)


def _composite(backend, means2d, proj, colors, opacities, width, height):
    if backend == "brute-force":
        from mgs.render.reference import composite_brute_force

        return composite_brute_force(means2d, proj.conics, colors, opacities, proj.depths, proj.radii_xy,
                                     width, height)
    isect = build_tile_intersections(means2d, proj.radii_xy, proj.depths, width, height)
    on_cpu = means2d.device.type == "cpu"
    if backend == "torch-fused" and not on_cpu:
        raise MgsError("backend 'torch-fused' runs on CPU only; use backend='torch' or 'gsplat' for GPU tensors")
    use_fused = backend == "torch-fused" or (backend == "torch" and on_cpu)
    if use_fused:
        fused = _load_fused()
        if fused is not None:
            return fused(means2d, proj.conics, colors, opacities, proj.radii_xy, isect, width, height)
        if backend == "torch-fused":
            raise MgsError("backend 'torch-fused' needs numba; install it (pip install numba)")
    return composite_tiles_torch(means2d, proj.conics, colors, opacities, proj.radii_xy, isect, width, height)


def _load_fused():
    """The numba compositor, or None (with a one-time warning) when numba is missing."""
    global _numba_warning_shown
    try:
        from mgs.render.fused import composite_tiles_fused
    except ImportError as exc:
        if not _numba_warning_shown:
            warnings.warn(f"numba unavailable ({exc}); CPU rendering falls back to the slower "
                          "pure-torch tile compositor", RuntimeWarning, stacklevel=3)
            _numba_warning_shown = True
        return None
    return composite_tiles_fused
