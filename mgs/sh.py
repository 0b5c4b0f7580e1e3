"""View-dependent colour for splats.ply: real spherical harmonics fitted to the decoder.

The decoder's colour depends on the direction from which an anchor is seen; a standard 3DGS
viewer evaluates a colour per Gaussian as ``clamp(SH(d)·c + 0.5, 0)`` with ``d`` the unit
direction from the camera centre to the Gaussian. mgs.bake fits ``c`` per Gaussian by weighted
least squares to the decoder's colours from the training cameras' directions (`views_of` picks
them), so that viewers show what the model shows from the views it was trained on.

Basis and constants: the ones of the 3DGS reference rasterizer (and gsplat), degree ≤ 3, so a
PLY written with them renders the same in every viewer of that family.

Fit: for each Gaussian, minimise Σ_v w_v (B(d_v)·c − (colour_v − 0.5))² + λ·|c_rest|², with the
weights normalised to sum 1 and the ridge λ on the non-constant coefficients only (it keeps a
Gaussian seen from few directions close to its mean colour instead of extrapolating). `fit_sh`
solves the normal equations of many Gaussians at once; `fit_sh_reference` is the plain
per-Gaussian least squares it is tested against.
"""

from __future__ import annotations

import numpy as np
import torch

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
         0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)
MAX_DEGREE = 3
DEFAULT_RIDGE = 1e-3
MAX_VIEWS = 64  # directions per Gaussian: the nearest cameras that see its anchor first
OUT_OF_VIEW_WEIGHT = 1e-2  # cameras whose frame misses the anchor still anchor a smooth fit
FIT_CHUNK_FLOATS = 1 << 24  # floats of the per-chunk basis tensor (64 MB in float32)


def coefficient_count(degree: int) -> int:
    return (degree + 1) ** 2


def check_degree(degree: int) -> int:
    if not 0 <= int(degree) <= MAX_DEGREE:
        raise ValueError(f"SH degree must be 0 to {MAX_DEGREE}, got {degree}")
    return int(degree)


def sh_basis(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """The real SH basis at unit directions (..., 3) → (..., (degree+1)²), in 3DGS order."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [SH_C2[0] * xy, SH_C2[1] * yz, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * xz,
                SH_C2[4] * (xx - yy)]
    if degree >= 3:
        out += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * xy * z, SH_C3[2] * y * (4 * zz - xx - yy),
                SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, dim=-1)


def sh_colors(sh: torch.Tensor, means: torch.Tensor, camera_center: torch.Tensor) -> torch.Tensor:
    """Colours (N, 3) a 3DGS viewer shows from `camera_center`: sh (N, K, 3) at the unit
    direction camera → Gaussian, plus 0.5, clamped at 0."""
    degree = int(round(sh.shape[1] ** 0.5)) - 1
    dirs = means - camera_center.reshape(1, 3).to(means)
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((sh_basis(dirs, degree)[..., None] * sh).sum(1) + 0.5).clamp_min(0.0)


def _ridge_diagonal(count: int, ridge: float, like: torch.Tensor) -> torch.Tensor:
    diagonal = torch.full((count,), float(ridge), dtype=like.dtype, device=like.device)
    diagonal[0] = 0.0  # the mean colour is not pulled anywhere
    return torch.diag(diagonal)


def fit_sh(dirs: torch.Tensor, colors: torch.Tensor, weights: torch.Tensor, degree: int,
           ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Batched fit: dirs (G, V, 3) unit, colors (G, V, 3), weights (G, V) ≥ 0 with a positive
    sum per row → coefficients (G, (degree+1)², 3). Normal equations in float64."""
    basis = sh_basis(dirs.double(), check_degree(degree))  # (G, V, K)
    w = weights.double()
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-300)
    weighted = basis * w[..., None]
    normal = weighted.transpose(1, 2) @ basis + _ridge_diagonal(basis.shape[-1], ridge, basis)
    rhs = weighted.transpose(1, 2) @ (colors.double() - 0.5)
    return torch.linalg.solve(normal, rhs).to(colors.dtype)


def fit_sh_reference(dirs: np.ndarray, colors: np.ndarray, weights: np.ndarray, degree: int,
                     ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """The same fit, one Gaussian at a time with np.linalg.lstsq on the weighted rows plus one
    row √λ per non-constant coefficient."""
    count = coefficient_count(check_degree(degree))
    out = np.zeros((len(dirs), count, 3))
    for g in range(len(dirs)):
        basis = sh_basis(torch.as_tensor(dirs[g], dtype=torch.float64), degree).numpy()
        root = np.sqrt(weights[g] / weights[g].sum())[:, None]
        penalty = np.sqrt(ridge) * np.eye(count)[1:]
        a = np.concatenate([root * basis, penalty])
        b = np.concatenate([root * (colors[g] - 0.5), np.zeros((count - 1, 3))])
        out[g] = np.linalg.lstsq(a, b, rcond=None)[0]
    return out


def _in_frame(xyz: torch.Tensor, cameras: "FitCameras") -> torch.Tensor:
    """(C, A) bool: the point is in front of the camera and within its frame (10% margin)."""
    local = torch.einsum("cij,aj->cai", cameras.rotations, xyz) + cameras.translations[:, None]
    depth = local[..., 2]
    pixels = torch.einsum("cij,caj->cai", cameras.intrinsics, local)
    pixels = pixels[..., :2] / depth.clamp_min(1e-9)[..., None]
    size = cameras.sizes[:, None, :]
    return (depth > 0) & (pixels >= -0.1 * size).all(-1) & (pixels <= 1.1 * size).all(-1)


def views_of(xyz: torch.Tensor, cameras: "FitCameras", max_views: int):
    """Per anchor: the indices (A, M) of the cameras to fit on and their weights (A, M): cameras
    whose frame holds the anchor first (weight 1), nearest first; then the nearest others."""
    inside = _in_frame(xyz, cameras)
    distance = torch.cdist(xyz, cameras.centers)  # (A, C)
    score = distance - inside.T * (distance.max() + 1)  # visible ones rank first
    views = score.topk(min(max_views, cameras.count), dim=1, largest=False).indices
    weights = torch.where(inside.T.gather(1, views), 1.0, OUT_OF_VIEW_WEIGHT)
    return views, weights


class FitCameras:
    """The training cameras the colours are fitted on (at the training resolution)."""

    def __init__(self, cameras):
        def stack(values):
            return torch.as_tensor(np.stack(values), dtype=torch.float32)

        w2c = stack([c.world_to_camera for c in cameras])
        self.rotations, self.translations = w2c[:, :3, :3], w2c[:, :3, 3]
        self.intrinsics = stack([c.K for c in cameras])
        self.sizes = stack([[c.width, c.height] for c in cameras])
        self.centers = stack([c.center for c in cameras])

    @property
    def count(self) -> int:
        return len(self.centers)


def mean_view_colors(sh: torch.Tensor, means: torch.Tensor, cameras: FitCameras,
                     chunk_floats: int = FIT_CHUNK_FLOATS) -> torch.Tensor:
    """The colour (N, 3) each Gaussian shows averaged over the training cameras, weighted as the
    fit weights them (those whose frame holds it): the one colour to keep where a format has no
    SH (the DC term alone is the average over the whole sphere, not over the views)."""
    step = max(1, chunk_floats // (4 * cameras.count))
    parts = []
    for start in range(0, len(means), step):
        xyz, coefficients = means[start:start + step], sh[start:start + step]
        weights = torch.where(_in_frame(xyz, cameras), 1.0, OUT_OF_VIEW_WEIGHT).double()
        total = torch.zeros(len(xyz), 3, dtype=torch.float64)
        for camera, weight in zip(cameras.centers, weights):
            total += weight[:, None] * sh_colors(coefficients, xyz, camera).double()
        parts.append((total / weights.sum(0)[:, None]).to(means.dtype))
    return torch.cat(parts) if parts else means.new_zeros(0, 3)
