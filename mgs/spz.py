"""The ``.spz`` file: Niantic's compressed 3DGS format, encoded by the `gsply` package.

Layout (gsply writes the gzip container, version 3): a 16-byte header (magic ``NGSP``, version,
count, SH degree, fractional bits of the positions), then per Gaussian positions as 24-bit fixed
point, opacity, degree-0 colour (``f_dc · 0.15 · 255 + 127.5``), log scales (``(s + 10) · 16``)
in one byte each, the rotation as a smallest-three quaternion in 4 bytes, and the higher SH
coefficients in one byte each (``c · 128 + 128``): about 13× smaller than splats.ply at degree 3.

Coordinates: SPZ stores RUB axes (OpenGL, three.js), 3DGS PLY files RDF (OpenCV), and the
format's reference library converts on save; gsply stores what it is given, so this module
turns RDF into RUB itself. That is a half turn about x: positions (x, −y, −z), quaternions
(w, x, −y, −z) and the SH coefficients whose basis function is odd under it negated.

Precision: positions to 2^-bits with `bits` ≤ 12 chosen so that the farthest coordinate still
fits in 24 bits (a city of kilometres keeps 2^-9 m, not a clipped edge); colour to 1/(0.15·255)
of f_dc; SH to 1/128; scales to 1/16 in log (and clamped to [e^-10, e^5.9]); opacity to 1/255.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mgs.atomic import atomic_path
from mgs.errors import InputError
from mgs.sh import SH_C0

MAX_FRACTIONAL_BITS = 12  # the reference library's default: 1/4096 of a unit
# sign of each SH basis function under (x, y, z) → (x, −y, −z), in 3DGS order
RUB_SH_SIGNS = torch.tensor([1, -1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, 1, -1, 1],
                            dtype=torch.float32)
SPZ_COLOR_SCALE = 0.15


def _gsply():
    try:
        import gsply
    except ImportError as exc:
        raise InputError("`mgs export --format spz` needs the package gsply: install the spz "
                         "extra (`pip install -e '.[spz]'` in this repository)") from exc
    return gsply


def fractional_bits(means: np.ndarray) -> int:
    """The finest fixed-point step whose 24-bit range holds every coordinate."""
    extent = float(np.abs(means).max()) if len(means) else 0.0
    bits = MAX_FRACTIONAL_BITS if extent <= 0 else min(MAX_FRACTIONAL_BITS,
                                                       math.floor(23 - math.log2(extent) - 1e-6))
    if bits < 1:
        raise InputError(f"a coordinate of {extent:g} does not fit SPZ's 24-bit positions; "
                         "the scene must lie within ±4 million units of its origin")
    return bits


def _flip(sh: torch.Tensor) -> torch.Tensor:
    return sh * RUB_SH_SIGNS[:sh.shape[1], None].to(sh)


def write_spz(gaussians: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write read_splats' Gaussians (render inputs plus `sh`) as a .spz file."""
    gsply = _gsply()
    means = gaussians["means"].detach().double().cpu() * torch.tensor([1.0, -1.0, -1.0],
                                                                      dtype=torch.float64)
    quats = gaussians["quats"].detach().cpu() * torch.tensor([1.0, 1.0, -1.0, -1.0])
    opacity = gaussians["opacities"].detach().double().cpu().clamp(1e-6, 1 - 1e-6)
    sh = _flip(gaussians["sh"].detach().cpu().float())

    def array(tensor):
        return np.ascontiguousarray(tensor.numpy(), dtype=np.float32)

    data = gsply.GSData(means=array(means), scales=array(torch.log(gaussians["scales"].detach()
                                                                   .cpu().clamp_min(1e-12))),
                        quats=array(quats), opacities=array(torch.logit(opacity)),
                        sh0=array(sh[:, 0]), shN=array(sh[:, 1:]))
    path = Path(path)
    with atomic_path(path) as tmp:
        gsply.write_spz(tmp, data, version=3, fractional_bits=fractional_bits(data.means))


def read_spz(path: str | Path) -> dict[str, torch.Tensor]:
    """A .spz file back as render inputs plus `sh` (the layout read_splats returns)."""
    gsply = _gsply()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spz file {path} does not exist; run `mgs export --format spz` first")
    try:
        data = gsply.read_spz(path)
    except Exception as exc:  # noqa: BLE001 - gzip, struct and value errors on damaged files
        raise InputError(f"cannot read SPZ file {path} ({exc.__class__.__name__}: {exc}); it "
                         "is damaged or truncated: export it again") from exc

    def tensor(values):
        return torch.as_tensor(np.asarray(values, dtype=np.float32).copy())

    sh0 = tensor(data.sh0)[:, None]
    rest = tensor(data.shN) if data.shN is not None and np.asarray(data.shN).size else None
    sh = _flip(torch.cat([sh0, rest.reshape(len(sh0), -1, 3)], 1) if rest is not None else sh0)
    quats = tensor(data.quats) * torch.tensor([1.0, 1.0, -1.0, -1.0])
    return {"means": tensor(data.means) * torch.tensor([1.0, -1.0, -1.0]),
            "quats": quats / quats.norm(dim=1, keepdim=True).clamp_min(1e-12),
            "scales": torch.exp(tensor(data.scales)),
            "opacities": torch.sigmoid(tensor(data.opacities)).reshape(-1),
            "colors": (sh[:, 0] * SH_C0 + 0.5).clamp_min(0.0), "sh": sh}
