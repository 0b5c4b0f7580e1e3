"""EWA projection of 3D Gaussians onto a pinhole image (gsplat 1.5.3 conventions).

Everything here is plain torch, so gradients reach means, quats and scales through
autograd. The formulas follow gsplat's pure-torch reference
(`gsplat.cuda._torch_impl._fully_fused_projection`) so both agree to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# exp(-3.33**2 / 2) < 1/255: outside a 3.33-sigma box no pixel passes the alpha
# threshold, so the box bounds every pixel a Gaussian can touch.
RADIUS_SIGMAS = 3.33
# Compositing skips alpha < 1/255 (gsplat's ALPHA_THRESHOLD).
ALPHA_THRESHOLD = 1.0 / 255.0
# The Jacobian is evaluated with x/z, y/z clamped to 1.3x the field of view; this
# stops Gaussians far outside the image from getting huge, smeared 2D footprints.
FOV_CLAMP_MARGIN = 0.3


@dataclass
class Projection:
    """Per-Gaussian screen-space quantities for one camera."""

    radii_xy: Tensor  # (N, 2) int32, per-axis pixel radius; 0 = culled
    means2d: Tensor  # (N, 2) pixel coordinates (pixel (i, j) is sampled at i+0.5, j+0.5)
    depths: Tensor  # (N,) camera-space z
    conics: Tensor  # (N, 3) upper triangle (a, b, c) of the inverse 2D covariance
    sigmas: Tensor  # (N, 2) pixel standard deviations along x and y (blurred 2D covariance), no grad


def quat_to_rotation(quats: Tensor) -> Tensor:
    """(N, 4) wxyz quaternions, any norm -> (N, 3, 3) rotation matrices."""
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_from_quat_scale(quats: Tensor, scales: Tensor) -> Tensor:
    """World covariance R·diag(s)²·Rᵀ from wxyz quaternions and linear scales."""
    rs = quat_to_rotation(quats) * scales[..., None, :]
    return rs @ rs.transpose(-1, -2)


def _pinhole_jacobian(means_cam: Tensor, depth: Tensor, K: Tensor, width: int, height: int) -> Tensor:
    """(N, 2, 3) Jacobian of pixel coordinates w.r.t. camera-space position, gsplat-clamped."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_fov_x = 0.5 * width / fx
    tan_fov_y = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + FOV_CLAMP_MARGIN * tan_fov_x
    lim_x_neg = cx / fx + FOV_CLAMP_MARGIN * tan_fov_x
    lim_y_pos = (height - cy) / fy + FOV_CLAMP_MARGIN * tan_fov_y
    lim_y_neg = cy / fy + FOV_CLAMP_MARGIN * tan_fov_y
    # Same operation order as gsplat (z·clamp(x/z), then /z²) to agree bit-for-bit-ish.
    tx = depth * torch.clamp(means_cam[:, 0] / depth, min=-lim_x_neg, max=lim_x_pos)
    ty = depth * torch.clamp(means_cam[:, 1] / depth, min=-lim_y_neg, max=lim_y_pos)
    depth_sq = depth * depth
    zero = torch.zeros_like(depth)
    return torch.stack(
        [fx / depth, zero, -fx * tx / depth_sq, zero, fy / depth, -fy * ty / depth_sq], dim=-1
    ).reshape(-1, 2, 3)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    eps2d: float = 0.3,
    far_plane: float = 1e10,
) -> Projection:
    """Project N Gaussians with one world->camera `viewmat` (4, 4) and pinhole `K` (3, 3).

    Culled Gaussians (behind near/far, degenerate, or fully off-screen) get radius 0;
    their means2d/conics are finite but meaningless.
    """
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    means_cam = means @ rot.T + trans
    covars_cam = rot @ covariance_from_quat_scale(quats, scales) @ rot.T

    depths = means_cam[:, 2]
    in_depth_range = (depths > near_plane) & (depths < far_plane)
    # Dividing by a z near 0 would put inf/NaN into the backward pass of culled Gaussians.
    safe_depth = torch.where(in_depth_range, depths, torch.ones_like(depths))

    jac = _pinhole_jacobian(means_cam, safe_depth, K, width, height)
    cov2d = jac @ covars_cam @ jac.transpose(-1, -2)
    means2d = (means_cam @ K[:2, :3].T) / safe_depth[:, None]

    # eps2d blur: every splat is at least ~a pixel wide (antialiasing floor of 3DGS).
    cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    det = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    nondegenerate = det > 0
    det = det.clamp(min=1e-10)
    conics = torch.stack(
        [cov2d[:, 1, 1] / det, -(cov2d[:, 0, 1] + cov2d[:, 1, 0]) / 2.0 / det, cov2d[:, 0, 0] / det],
        dim=-1,
    )

    with torch.no_grad():
        sigmas = torch.sqrt(torch.stack([cov2d[:, 0, 0], cov2d[:, 1, 1]], dim=-1))
        radius = torch.ceil(RADIUS_SIGMAS * sigmas)
        on_screen = (
            (means2d[:, 0] + radius[:, 0] > 0)
            & (means2d[:, 0] - radius[:, 0] < width)
            & (means2d[:, 1] + radius[:, 1] > 0)
            & (means2d[:, 1] - radius[:, 1] < height)
        )
        keep = nondegenerate & in_depth_range & on_screen
        radii_xy = torch.where(keep[:, None], radius, torch.zeros_like(radius)).to(torch.int32)

    return Projection(radii_xy=radii_xy, means2d=means2d, depths=depths, conics=conics,
                      sigmas=sigmas)


@torch.no_grad()
def opacity_aware_radii(proj: Projection, opacities: Tensor, width: int, height: int) -> Tensor:
    """(N,) int32 radius of the box that holds every pixel a Gaussian renders to; 0 = not rendered.

    The definition of gsplat's projection kernel when given opacities (its `radii`):
    opacity < 1/255 is culled, the box is min(3.33, sqrt(2 ln(255 o))) sigmas, and a box off the
    image or of radius 0 is culled. Outside that box o·exp(-d²/2) < 1/255, so no pixel composites
    the Gaussian and its screen gradient is exactly 0: counting it as "rendered" would only dilute
    the densification statistics. The torch compositor keeps its wider 3.33-sigma tiles (same
    image); this is what both backends report as `radii`.
    """
    o = opacities.detach().to(proj.sigmas.dtype)
    visible = (proj.radii_xy[:, 0] > 0) & (o >= ALPHA_THRESHOLD)
    extend = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
    radius = torch.ceil(extend.clamp(max=RADIUS_SIGMAS)[:, None] * proj.sigmas)
    mx, my = proj.means2d[:, 0].detach(), proj.means2d[:, 1].detach()
    on_screen = ((mx + radius[:, 0] > 0) & (mx - radius[:, 0] < width)
                 & (my + radius[:, 1] > 0) & (my - radius[:, 1] < height))
    keep = visible & on_screen & (radius.max(dim=-1).values > 0)
    return torch.where(keep, radius.max(dim=-1).values, torch.zeros_like(radius[:, 0])).to(torch.int32)
