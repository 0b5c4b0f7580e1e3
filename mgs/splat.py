"""The ``.splat`` file: the headerless 32-bytes-per-Gaussian layout of the antimatter15/splat
WebGL viewer, read by most web 3DGS viewers. Per Gaussian, little-endian::

    bytes  0-11  position x, y, z        3 × float32
    bytes 12-23  scale x, y, z (linear)  3 × float32
    bytes 24-27  colour R, G, B, alpha   4 × uint8   (RGB = 0.5 + C0·f_dc, alpha = opacity)
    bytes 28-31  rotation w, x, y, z     4 × uint8   (unit quaternion q stored as 128 + 128·q)

Gaussians are written largest first (volume × opacity), as that viewer's converter does, so a
viewer that streams the file shows the big ones first. One colour per Gaussian: `mgs export`
passes the PLY's spherical harmonics averaged over the training views.
Quantisation: colour and opacity to 1/255 (±0.5/255 after rounding), each quaternion component
to 1/128 (±0.5/128) before renormalisation; positions and scales are exact float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mgs.atomic import atomic_path
from mgs.errors import InputError

SPLAT_DTYPE = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4),
                        ("rotation", "u1", 4)])
assert SPLAT_DTYPE.itemsize == 32



def write_splat(gaussians: dict[str, torch.Tensor], path: str | Path) -> np.ndarray:
    """Write `gaussians` (render() inputs: means, quats wxyz, linear scales, opacities, colours
    in [0, 1]) as a .splat file; returns the order written (indices into the inputs)."""
    means = gaussians["means"].detach().cpu().double().numpy()
    scales = gaussians["scales"].detach().cpu().double().numpy()
    opacities = gaussians["opacities"].detach().cpu().double().numpy().reshape(-1)
    colors = gaussians["colors"].detach().cpu().double().numpy()
    quats = gaussians["quats"].detach().cpu().double().numpy()
    quats = quats / np.linalg.norm(quats, axis=1, keepdims=True).clip(1e-12)
    order = np.argsort(-(np.prod(scales, axis=1) * opacities), kind="stable")
    data = np.empty(len(means), SPLAT_DTYPE)
    data["position"] = means[order]
    data["scale"] = scales[order]
    rgba = np.concatenate([colors, opacities[:, None]], axis=1)[order]
    data["rgba"] = np.clip(np.rint(rgba * 255), 0, 255)
    data["rotation"] = np.clip(np.rint(quats[order] * 128 + 128), 0, 255)
    with atomic_path(Path(path)) as tmp:
        data.tofile(tmp)
    return order


def read_splat(path: str | Path) -> dict[str, torch.Tensor]:
    """A .splat file back as render() inputs (float32 tensors)."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise InputError(f"splat file {path} does not exist; run `mgs export` first")
    if size % SPLAT_DTYPE.itemsize:
        raise InputError(f"{path} is {size} bytes, not a multiple of {SPLAT_DTYPE.itemsize}: "
                         "it is truncated or not a .splat file; export it again")
    data = np.fromfile(path, SPLAT_DTYPE)
    quats = (data["rotation"].astype(np.float32) - 128) / 128
    norms = np.linalg.norm(quats, axis=1, keepdims=True)
    quats = np.where(norms > 0, quats / np.maximum(norms, 1e-12), [1.0, 0, 0, 0])
    rgba = data["rgba"].astype(np.float32) / 255
    return {"means": torch.from_numpy(data["position"].copy()),
            "quats": torch.from_numpy(quats.astype(np.float32)),
            "scales": torch.from_numpy(data["scale"].copy()),
            "opacities": torch.from_numpy(rgba[:, 3].copy()),
            "colors": torch.from_numpy(rgba[:, :3].copy())}
