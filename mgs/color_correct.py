"""Per-image quadratic colour correction (the mip-NeRF 360 routine that DOGS and Momentum-GS use).

For each output channel, fit the ground truth as a least-squares polynomial of the render's RGB
with all second-order terms (r², rg, rb, g², gb, b²), the linear terms and a bias: 10
coefficients per channel. Only "unclipped" pixels take part: for channel c, pixels whose
original render, current render and ground truth values of channel c all lie in
[0.5/255, 1 - 0.5/255]. Apply, clip to [0, 1], and refit on the corrected image, 5 times in
all (ALGORITHM.md §1.7). Paper numbers are reported after this correction.
"""

from __future__ import annotations

import torch

EPS = 0.5 / 255
ITERATIONS = 5
METHOD = ("per-image quadratic least-squares colour fit of each channel on the render's "
          "r^2, rg, rb, g^2, gb, b^2, r, g, b, 1 over unclipped pixels ([0.5/255, 1-0.5/255]), "
          "clipped to [0,1], refitted 5 times (mip-NeRF 360 / DOGS / Momentum-GS)")


def _unclipped(x: torch.Tensor) -> torch.Tensor:
    return (x >= EPS) & (x <= 1 - EPS)


def _design(rgb: torch.Tensor) -> torch.Tensor:
    """(P, 3) colours -> (P, 10): r², rg, rb, g², gb, b², r, g, b, 1."""
    quadratic = [rgb[:, i:i + 1] * rgb[:, i:] for i in range(3)]
    return torch.cat([*quadratic, rgb, torch.ones_like(rgb[:, :1])], dim=1)


@torch.no_grad()
def color_correct(image: torch.Tensor, target: torch.Tensor,
                  iterations: int = ITERATIONS) -> torch.Tensor:
    """`image` (H, W, 3) in [0, 1] warped towards `target`'s colours; same shape and dtype."""
    if image.shape != target.shape or image.shape[-1] != 3:
        raise ValueError(f"colour correction needs two (H, W, 3) images of one shape, got "
                         f"{tuple(image.shape)} and {tuple(target.shape)}")
    # float64: the normal matrix of squared colours is badly conditioned in float32
    current = image.reshape(-1, 3).double()
    reference = target.reshape(-1, 3).double()
    original_ok = _unclipped(current)
    reference_ok = _unclipped(reference)
    for _ in range(iterations):
        design = _design(current)
        warp = torch.zeros(10, 3, dtype=torch.float64, device=current.device)
        for c in range(3):
            mask = original_ok[:, c] & _unclipped(current[:, c]) & reference_ok[:, c]
            if int(mask.sum()) < design.shape[1]:
                warp[6 + c, c] = 1.0  # too few usable pixels to fit: leave the channel alone
                continue
            # Normal equations (10x10) in float64: 4x faster than a QR/SVD of the P x 10
            # matrix and within 1e-12 of it. gelsd gives the minimum-norm solution when the
            # render spans fewer than 10 directions (e.g. a flat-coloured image).
            masked = design * mask[:, None]
            gram = (masked.T @ masked).cpu()
            rhs = (masked.T @ reference[:, c:c + 1]).cpu()
            solution = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution
            warp[:, c] = solution[:, 0].to(current.device)
        current = (design @ warp).clamp(0.0, 1.0)
    return current.reshape(image.shape).to(image.dtype)
