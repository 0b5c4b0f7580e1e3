"""Backend "gsplat": a thin wrapper around `gsplat.rasterization` (CUDA only).

gsplat's PyPI wheel ships CUDA sources: `import gsplat` always works, but its extension is
compiled at the first CUDA call (needs nvcc) and may be built for other GPUs than this one.
`gsplat_problem` finds out once per process and device, so "auto" can fall back to the torch
backend and an explicit "gsplat" can fail with a message that names what is missing.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mgs.device import canonical_device
from mgs.errors import MgsError

FALLBACK_HINT = "use backend 'torch' (train.backend: torch), which runs everywhere"
_fallback_warned: set[str] = set()


def _device_key(device) -> str:
    return str(canonical_device(device))


def gsplat_problem(device="cuda") -> Optional[str]:
    """None when gsplat renders on `device`, else why not (a sentence naming the fix)."""
    return _gsplat_problem(_device_key(device))


@functools.lru_cache(maxsize=None)
def _gsplat_problem(device: str) -> Optional[str]:
    try:
        import gsplat  # noqa: F401
    except Exception as exc:  # a broken install can raise more than ImportError
        return f"the gsplat package does not import ({exc}); install gsplat==1.5.3"
    problem = _extension_problem()
    if problem:
        return problem
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"gsplat renders only on a CUDA GPU and the device is {device}"
    return _probe(device)


def _extension_problem() -> Optional[str]:
    """Whether gsplat's compiled extension loads (importing it builds it when nvcc is there)."""
    cuda = torch.version.cuda or "none (a CPU build of torch)"
    try:
        from gsplat.cuda._backend import _C
    except Exception as exc:  # compiler errors, a .so built against another torch, ...
        return (f"gsplat's CUDA extension failed to build or load ({exc.__class__.__name__}: "
                f"{exc}); check nvcc matches torch's CUDA {cuda}, delete the stale build in "
                "TORCH_EXTENSIONS_DIR (or ~/.cache/torch_extensions) and retry")
    if _C is None or not hasattr(_C, "CameraModelType"):
        return ("gsplat's CUDA extension is not available: there is no prebuilt gsplat_cuda and "
                f"no CUDA toolkit (nvcc) to compile it; load a CUDA toolkit matching torch's CUDA "
                f"{cuda} (e.g. `module load cuda`) or install a gsplat wheel prebuilt for torch "
                f"{torch.__version__.split('+')[0]}")
    return None


def _probe(device: str) -> Optional[str]:
    """Render one Gaussian: catches an extension built for another GPU architecture."""
    try:
        from gsplat import rasterization

        dev = torch.device(device)
        one = dict(device=dev, dtype=torch.float32)
        K = torch.tensor([[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]], **one)
        rgb, _, _ = rasterization(
            torch.tensor([[0.0, 0.0, 2.0]], **one), torch.tensor([[1.0, 0, 0, 0]], **one),
            torch.full((1, 3), 0.2, **one), torch.ones(1, **one), torch.ones(1, 3, **one),
            torch.eye(4, **one)[None], K[None], 8, 8, sh_degree=None, packed=False)
        torch.cuda.synchronize(dev)
        if not torch.isfinite(rgb).all() or float(rgb.max()) <= 0:
            return f"gsplat's test render on {device} came out empty; rebuild its extension"
    except Exception as exc:  # "no kernel image is available for execution on the device", ...
        arch = ""
        try:
            major, minor = torch.cuda.get_device_capability(torch.device(device))
            arch = f" (this GPU is sm_{major}{minor}: include {major}.{minor} in TORCH_CUDA_ARCH_LIST)"
        except Exception:  # the device itself is unusable: the first message says enough
            pass
        return (f"gsplat's CUDA extension does not run on {device} ({exc.__class__.__name__}: "
                f"{exc}); it was probably built for another GPU architecture{arch}; delete the "
                "build in TORCH_EXTENSIONS_DIR and rebuild")
    return None


def gsplat_available(device="cuda") -> bool:
    """True when gsplat can render on `device` (checked once per process and device)."""
    return gsplat_problem(device) is None


def choose_backend(backend: str, device) -> str:
    """Resolve "auto" (gsplat on a GPU when it works there, else torch, warning once) and
    check that an explicit "gsplat" works on `device`; other backends pass through."""
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        problem = gsplat_problem(device)
        if problem is None:
            return "gsplat"
        key = _device_key(device)
        if key not in _fallback_warned:
            _fallback_warned.add(key)
            warnings.warn(f"render backend auto: {problem}; rendering with the torch backend "
                          "instead (slower on GPU)", RuntimeWarning, stacklevel=3)
        return "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise MgsError(f"render backend 'gsplat' needs CUDA tensors, got {device} ones; move "
                           f"the scene to the GPU or {FALLBACK_HINT}")
        problem = gsplat_problem(device)
        if problem is not None:
            raise MgsError(f"render backend 'gsplat' cannot run: {problem}; or {FALLBACK_HINT}")
    return backend


@dataclass
class GsplatResult:
    rgb: Tensor  # (H, W, 3), background already composited
    alpha: Tensor  # (H, W)
    radii: Tensor  # (N,) int32, max over gsplat's per-axis radii
    depths: Tensor  # (N,), 0 for Gaussians gsplat culled
    means2d_graph: Tensor  # gsplat's own means2d ((1, N, 2) or (nnz, 2)) used by its rasterizer
    gaussian_ids: Optional[Tensor]  # (nnz,) for packed mode, None otherwise


def rasterize_gsplat(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
    viewmat: Tensor, K: Tensor, width: int, height: int, background: Optional[Tensor],
    near_plane: float, eps2d: float, packed: bool = False,
) -> GsplatResult:
    """Callers check `choose_backend` first and never pass N = 0: gsplat's projection
    divides by N before its empty-input guard (a SIGFPE, not an exception)."""
    if not means.is_cuda or not torch.cuda.is_available():
        raise MgsError("render backend 'gsplat' needs CUDA tensors on a CUDA machine; "
                       f"move the scene to the GPU or {FALLBACK_HINT}")
    if means.shape[0] == 0:
        raise MgsError("rasterize_gsplat got zero Gaussians; render() handles that case")
    from gsplat import rasterization

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
        # gsplat leaves depths (and means2d) of culled Gaussians uninitialised (at::empty)
        depths = torch.where(radii > 0, meta["depths"][0], torch.zeros_like(meta["depths"][0]))
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
