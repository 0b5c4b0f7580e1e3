"""Brute-force compositor and random test scenes: oracles for tests and benchmarks only.

Every pixel meets every visible Gaussian in one dense (pixels x Gaussians) matrix, so
memory is O(H·W·N): fine for small images, never used for training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mgs.render.tiles import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_EPS


def composite_brute_force(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii_xy: Tensor,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Returns (rgb (H, W, C) without background, alpha (H, W)); differentiable by autograd.

    Independent of the tile code: a Gaussian reaches a pixel iff the pixel centre lies in
    its means2d ± radius box (the tile list is a superset of that box, and outside it
    alpha < 1/255 anyway), it passes the alpha threshold, and the pixel is not finished.
    """
    device, dtype = means2d.device, means2d.dtype
    visible = torch.nonzero((radii_xy > 0).all(dim=-1)).squeeze(1)
    visible = visible[torch.sort(depths[visible], stable=True).indices]

    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    centres = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).to(dtype) + 0.5  # (P, 2)
    delta = means2d[visible][None, :, :] - centres[:, None, :]  # (P, G, 2)
    conic = conics[visible]
    sigma = (0.5 * (conic[:, 0] * delta[..., 0] ** 2 + conic[:, 2] * delta[..., 1] ** 2)
             + conic[:, 1] * delta[..., 0] * delta[..., 1])
    alpha = torch.clamp_max(opacities[visible] * torch.exp(-sigma), MAX_ALPHA)

    radius = radii_xy[visible].to(dtype)
    in_box = (delta.detach().abs() <= radius).all(dim=-1)
    passes = in_box & (sigma.detach() >= 0) & (alpha.detach() >= ALPHA_THRESHOLD)
    keep_factor = torch.where(passes, 1.0 - alpha, torch.ones_like(alpha))
    transmittance_after = torch.cumprod(keep_factor, dim=1)
    transmittance_before = torch.cat([torch.ones_like(alpha[:, :1]), transmittance_after[:, :-1]], dim=1)

    # gsplat stops at the first Gaussian that would take T to <= eps and skips it and all later ones.
    with torch.no_grad():
        stops = passes & (transmittance_after <= TRANSMITTANCE_EPS)
        included = passes & (torch.cumsum(stops.long(), dim=1) == 0)
    weights = torch.where(included, alpha * transmittance_before, torch.zeros_like(alpha))
    rgb = weights @ colors[visible]
    final_transmittance = torch.prod(torch.where(included, 1.0 - alpha, torch.ones_like(alpha)), dim=1)
    return rgb.reshape(height, width, -1), (1.0 - final_transmittance).reshape(height, width)


def look_at_viewmat(eye, target, up=(0.0, -1.0, 0.0), dtype=torch.float32) -> Tensor:
    """World->camera matrix (OpenCV: +z forward, +y down) looking from `eye` at `target`."""
    eye_t = torch.tensor(eye, dtype=torch.float64)
    forward = torch.tensor(target, dtype=torch.float64) - eye_t
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, torch.tensor(up, dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])  # rows: camera axes in world
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = rot
    viewmat[:3, 3] = -rot @ eye_t
    return viewmat.to(dtype)


def random_scene(
    n: int,
    width: int,
    height: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    pixel_radius: tuple[float, float] = (1.0, 12.0),
    depth_range: tuple[float, float] = (2.0, 10.0),
) -> dict:
    """Gaussians in front of a tilted camera, each ~`pixel_radius` pixels (3 sigma) across.

    Returns keyword arguments for `mgs.render.render` (means, quats, scales, opacities,
    colors, viewmat, K, width, height). Some centres fall a little outside the image.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    focal = 0.8 * max(width, height)
    K = torch.tensor([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    viewmat = look_at_viewmat(eye=(0.3, -0.5, -1.0), target=(0.0, 0.0, 5.0), dtype=torch.float64)

    depth = uniform(*depth_range, n)
    pixel = torch.stack([uniform(-0.1 * width, 1.1 * width, n), uniform(-0.1 * height, 1.1 * height, n)], dim=-1)
    cam_xy = (pixel - K[:2, 2]) / focal * depth[:, None]
    means_cam = torch.cat([cam_xy, depth[:, None]], dim=-1)
    cam_to_world = torch.linalg.inv(viewmat)
    means = means_cam @ cam_to_world[:3, :3].T + cam_to_world[:3, 3]

    log_r = uniform(math.log(pixel_radius[0]), math.log(pixel_radius[1]), n)
    world_sigma = torch.exp(log_r) / 3.0 * depth / focal
    scales = world_sigma[:, None] * uniform(0.5, 2.0, n, 3)
    quats = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    opacities = uniform(0.1, 0.9, n)
    colors = uniform(0.0, 1.0, n, 3)

    def out(t):
        return t.to(dtype=dtype, device=device)

    return dict(means=out(means), quats=out(quats), scales=out(scales), opacities=out(opacities),
                colors=out(colors), viewmat=out(viewmat), K=out(K), width=width, height=height)
