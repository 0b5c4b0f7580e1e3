"""`mgs gsplat-build --out EXT_DIR/gsplat_build.json`: build gsplat's CUDA extension once, before
any GPU job needs it (the workflow's gsplat_build).

gsplat 1.5.3 compiles its extension at the first CUDA call into
$TORCH_EXTENSIONS_DIR/gsplat_cuda (default ~/.cache/torch_extensions/py*_cu*/gsplat_cuda). Two
jobs that start without a finished build race: gsplat deletes the build folder when it finds no
.so, so each removes the other's half-built files. Built for the GPUs of $TORCH_CUDA_ARCH_LIST
(without it, only for the GPU of the building node). Where no CUDA GPU is visible (CPU-only runs,
CI) this records that nothing was built and succeeds, so the workflow's DAG is the same
everywhere. The JSON records what was built, for whom, and how long it took.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mgs.atomic import write_text
from mgs.errors import MgsError


def _arch_covered(arch_list: str, major: int, minor: int) -> bool:
    """Whether sm_<major><minor> runs code built for `arch_list` ("8.0;9.0+PTX" style):
    an exact entry, or PTX of an older one (compiled by the driver at load)."""
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        version = entry.removesuffix("+PTX")
        try:
            emajor, eminor = (int(part) for part in version.split("."))
        except ValueError:
            continue
        if (emajor, eminor) == (major, minor) or (ptx and (emajor, eminor) <= (major, minor)):
            return True
    return False


def build() -> dict:
    import torch

    from mgs.render.gsplat_backend import gsplat_problem

    info = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    if not torch.cuda.is_available():
        info.update(built=False, reason="no CUDA GPU visible: nothing to build (CPU run)")
        return info
    major, minor = torch.cuda.get_device_capability()
    info.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}")
    if info["arch_list"] and not _arch_covered(info["arch_list"], major, minor):
        raise MgsError(f"TORCH_CUDA_ARCH_LIST={info['arch_list']} does not cover this "
                         f"GPU ({info['gpu']}, {major}.{minor}); add {major}.{minor} to "
                         "gsplat.arch_list in the workflow config")
    start = time.perf_counter()
    problem = gsplat_problem("cuda")  # imports gsplat's extension: builds it when missing
    info["seconds"] = round(time.perf_counter() - start, 1)
    if problem:
        raise MgsError(problem)
    info["built"] = True
    return info


def _run(args) -> None:
    info = build()
    print(json.dumps(info, indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(Path(args.out), json.dumps(info, indent=2) + "\n")


def add_parser(sub) -> None:
    p = sub.add_parser("gsplat-build", help="build gsplat's CUDA extension once for this node's "
                                            "GPU (records that nothing was built without one)")
    p.add_argument("--out", required=True, help="JSON file recording the build")
    p.set_defaults(func=_run)
