"""Device choice for a job, and which GPU it uses on a machine with several.

`auto` means the MGS_DEVICE environment variable when set (e.g. MGS_DEVICE=cpu keeps every mgs
process of a shell or job on the CPU), else CUDA when present, else the CPU.

Where a process sees several GPUs (a multi-GPU machine, where Snakemake never sets
CUDA_VISIBLE_DEVICES locally, or a SLURM allocation of several GPUs running a group job of
several block jobs), `auto` takes a GPU that no other mgs process *of the same user* holds, by an
exclusive lock on a file named after the GPU's CUDA_VISIBLE_DEVICES entry (its index where that is
unset) in a per-user folder ($MGS_LOCK_DIR, default <tmp>/mgs-gpu-locks-<uid>, with one sub-folder
per SLURM job: SLURM may number each job's GPUs from 0). The lock is per process: the first
call picks the GPU and later calls in the same process (one per block and round in `train_all`)
return the same one; it is released when the process ends. When every
GPU is held, the process does not wait: it shares GPU 0 with a warning (cap local jobs with
`snakemake --resources gpu=N`). Other users' jobs are not seen; on a shared machine use a
scheduler or CUDA_VISIBLE_DEVICES. The chosen GPU becomes the current one (`torch.cuda.set_device`)
so library calls without an explicit device (gsplat's kernels, memory statistics) use it too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
from pathlib import Path

import torch

from mgs.errors import InputError

log = logging.getLogger("mgs.device")

_held_locks: list = []  # open lock files live as long as the process
_claimed: dict[str, int] = {}  # lock folder -> the GPU this process took there


def resolve_device(name: str = "auto", lock_dir: str | Path | None = None,
                   gpu_count: int | None = None) -> torch.device:
    """`auto` → $MGS_DEVICE, or a free GPU (locked for this process) or the CPU; `cpu`, `cuda`
    (the current GPU), `cuda:N` as given. CUDA devices come back with their index, made current."""
    if name == "auto" and os.environ.get("MGS_DEVICE", "auto") != "auto":
        name = os.environ["MGS_DEVICE"]
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
        if count > 1:
            return _make_current(torch.device(f"cuda:{claim_free_gpu(count, lock_dir)}"))
        return _make_current(torch.device("cuda"))
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available; use device: auto")
    return _make_current(device)


def _make_current(device: torch.device) -> torch.device:
    if device.type != "cuda" or not torch.cuda.is_available():
        return device  # a CUDA index chosen by lock without CUDA (tests with gpu_count)
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InputError(f"device cuda:{index} requested but this process sees "
                         f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use cuda or auto")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def canonical_device(device: str | torch.device) -> torch.device:
    """`cuda` → `cuda:<current>`, so caches keyed by device see one GPU under one name."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_lock_dir() -> Path:
    """$MGS_LOCK_DIR, else a folder of this user's under the temp dir (created 0700).

    Per user because a shared /tmp does not let one user open another's file for writing
    (sticky bit, fs.protected_regular): a common lock file would fail for the second user.
    """
    if os.environ.get("MGS_LOCK_DIR"):
        return Path(os.environ["MGS_LOCK_DIR"])
    folder = Path(tempfile.gettempdir()) / f"mgs-gpu-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
        raise InputError(f"GPU lock folder {folder} belongs to another user; set MGS_LOCK_DIR "
                         "to a folder of yours")
    job = os.environ.get("SLURM_JOB_ID", "")
    if job.isdigit():
        folder = folder / f"slurm-{job}"
        folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _gpu_names(count: int) -> list[str]:
    """The visible GPUs' names for their lock files: CUDA_VISIBLE_DEVICES' entries, else
    indices."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    visible = [v.strip() for v in listed if v.strip()]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def slurm_gpus() -> str:
    """The GPUs SLURM allocated to this job ('' outside a SLURM GPU job)."""
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = os.environ.get(key, "").strip()
        if value:
            return value
    return ""


def claim_free_gpu(count: int, lock_dir: str | Path | None = None) -> int:
    """This process's GPU: the one it already holds, else the first whose lock no other process
    holds, else GPU 0 (shared, with a warning; never waits)."""
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    key = str(lock_dir.resolve())
    if key in _claimed:
        return _claimed[key]
    for index, name in enumerate(_gpu_names(count)):
        path = lock_dir / f"mgs-gpu-{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except PermissionError as exc:
            raise InputError(f"cannot open the GPU lock file {path} ({exc.strerror}); set "
                             "MGS_LOCK_DIR to a folder of yours") from exc
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_locks.append(handle)
        _claimed[key] = index
        log.info("using GPU %d of %d (lock %s)", index, count, path)
        return index
    log.warning("all %d GPUs are held by other mgs processes of this user; sharing GPU 0 "
                "(limit local jobs with --resources gpu=%d)", count, count)
    _claimed[key] = 0
    return 0
