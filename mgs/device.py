"""Device choice for a job: CUDA when present, and on a multi-GPU machine without
CUDA_VISIBLE_DEVICES (Snakemake never sets it locally) a GPU nobody else holds, by file lock."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

import torch

from mgs.errors import InputError

log = logging.getLogger("mgs.device")

_held_locks: list = []  # open lock files live as long as the process


def resolve_device(name: str = "auto", lock_dir: str | Path | None = None,
                   gpu_count: int | None = None) -> torch.device:
    """`auto` → a free GPU (locked for this process) or the CPU; `cpu`, `cuda`, `cuda:N` as given."""
    if name == "auto":
        if not torch.cuda.is_available() and gpu_count is None:
            granted = slurm_gpus()
            if granted:  # a GPU job on a node whose torch sees none: fail, never train on CPU
                raise InputError(f"SLURM gave this job GPU(s) {granted} but torch sees no CUDA "
                                 f"device (torch {torch.__version__}, CUDA build: "
                                 f"{torch.version.cuda or 'none'}); install a CUDA build of torch "
                                 "in the job's environment, or set device: cpu to run on CPU")
            return torch.device("cpu")
        count = torch.cuda.device_count() if gpu_count is None else gpu_count
        if count > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            return torch.device(f"cuda:{claim_free_gpu(count, lock_dir)}")
        return torch.device("cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available; use device: auto")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc


def slurm_gpus() -> str:
    """The GPUs SLURM allocated to this job ('' outside a SLURM GPU job)."""
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = os.environ.get(key, "").strip()
        if value:
            return value
    return ""


def claim_free_gpu(count: int, lock_dir: str | Path | None = None) -> int:
    """Take the first GPU whose lock file no other process holds; wait on GPU 0's otherwise."""
    lock_dir = Path(lock_dir or os.environ.get("MGS_LOCK_DIR", tempfile.gettempdir()))
    for index in range(count):
        handle = open(lock_dir / f"mgs-gpu-{index}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_locks.append(handle)
        log.info("using GPU %d (lock %s)", index, handle.name)
        return index
    log.warning("all %d GPUs are taken by other mgs jobs; sharing GPU 0 "
                "(limit local jobs with --resources gpu=%d)", count, count)
    return 0
