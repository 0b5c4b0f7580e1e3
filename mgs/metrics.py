"""Image metrics with the 3DGS conventions: PSNR on [0,1] images, SSIM with an 11x11 Gaussian window.

Images are (..., H, W, 3) float tensors in [0, 1] (the layout `mgs.render.render` returns).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def psnr(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """20·log10(1/√MSE) per image (mean over the last three dims)."""
    mse = ((image - target) ** 2).flatten(-3).mean(-1)
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


def channel_mean_psnr(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of the three per-channel PSNRs per image: the training-time validation score of
    the official code (its 3DGS `psnr` reduces a (3, H, W) image per channel, then averages),
    ≥ `psnr` of the same image (Jensen), equal when the channels err alike."""
    mse = ((image - target) ** 2).flatten(-3, -2).mean(-2)  # (..., 3)
    return (-10.0 * torch.log10(mse.clamp_min(1e-12))).mean(-1)


@functools.lru_cache(maxsize=8)
def _gaussian_window(channels: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    window = torch.outer(g, g).to(dtype=dtype, device=device)
    return window.expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim_map(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM map, (N, 3, H, W), zero-padded borders as in 3DGS."""
    x = _to_nchw(image)
    y = _to_nchw(target)
    channels = x.shape[1]
    window = _gaussian_window(channels, x.dtype, str(x.device))
    pad = SSIM_WINDOW // 2

    def blur(t):
        return F.conv2d(t, window, padding=pad, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = blur(x * x) - mu_xx
    var_y = blur(y * y) - mu_yy
    cov = blur(x * y) - mu_xy
    return ((2 * mu_xy + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_xx + mu_yy + SSIM_C1) * (var_x + var_y + SSIM_C2))


def ssim(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image: a scalar for one (H,W,3) image, (N,) for a batch."""
    value = ssim_map(image, target).flatten(1).mean(1)
    return value[0] if image.dim() == 3 else value


def _to_nchw(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    return image.permute(0, 3, 1, 2)
