"""Backend "gsplat": a thin wrapper around `gsplat.rasterization` (CUDA only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mgs.errors import MgsError


def gsplat_available() -> bool:
    """True when gsplat imports; it still needs CUDA tensors to rasterize."""
    try:
        import gsplat  # noqa: F401
    except Exception:  # a broken CUDA build can raise more than ImportError
        return False
    return True


@dataclass
class GsplatResult:
    rgb: Tensor  # (H, W, 3), background already composited
    alpha: Tensor  # (H, W)
    radii: Tensor  # (N,) int32, max over gsplat's per-axis radii
    depths: Tensor  # (N,), 0 for Gaussians gsplat culled in packed mode
    means2d_graph: Tensor  # gsplat's own means2d ((1, N, 2) or (nnz, 2)) used by its rasterizer
    gaussian_ids: Optional[Tensor]  # (nnz,) for packed mode, None otherwise


def rasterize_gsplat(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
    viewmat: Tensor, K: Tensor, width: int, height: int, background: Optional[Tensor],
    near_plane: float, eps2d: float, packed: bool = False,
) -> GsplatResult:
    try:
        from gsplat import rasterization
    except Exception as exc:
        raise MgsError(f"render backend 'gsplat' needs the gsplat package ({exc}); "
                       "install gsplat==1.5.3 or use backend='torch'") from exc
    if not means.is_cuda or not torch.cuda.is_available():
        raise MgsError("render backend 'gsplat' needs CUDA tensors on a CUDA machine; "
                       "move the scene to the GPU or use backend='torch'")

    render_colors, render_alphas, meta = rasterization(
        means, quats, scales, opacities, colors, viewmat[None], K[None], width, height,
        near_plane=near_plane, eps2d=eps2d, sh_degree=None, packed=packed,
        backgrounds=None if background is None else background[None],
        rasterize_mode="classic", render_mode="RGB",
    )
    n = means.shape[0]
    radii_axes = meta["radii"]  # gsplat 1.5.3: per-axis radii, (..., 2)
    radii_max = radii_axes.max(dim=-1).values.to(torch.int32)
    if packed:
        ids = meta["gaussian_ids"].long()
        radii = torch.zeros(n, dtype=torch.int32, device=means.device).index_put_((ids,), radii_max)
        depths = torch.zeros(n, dtype=means.dtype, device=means.device).index_put_((ids,), meta["depths"])
    else:
        ids = None
        radii = radii_max[0]
        depths = meta["depths"][0]
    return GsplatResult(
        rgb=render_colors[0], alpha=render_alphas[0, ..., 0], radii=radii, depths=depths,
        means2d_graph=meta["means2d"], gaussian_ids=ids,
    )


def scatter_means2d(values: Tensor, gaussian_ids: Optional[Tensor], n: int) -> Tensor:
    """gsplat's means2d layout ((1, N, 2) or packed (nnz, 2)) -> (N, 2); zeros for culled."""
    if gaussian_ids is None:
        return values[0]
    full = torch.zeros(n, 2, dtype=values.dtype, device=values.device)
    return full.index_put_((gaussian_ids,), values)
