import os
import subprocess
import sys

import pytest
import torch

from mgs.device import claim_free_gpu, resolve_device
from mgs.errors import InputError


def test_jobs_on_a_multi_gpu_machine_take_different_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    first = claim_free_gpu(3, tmp_path)  # this process holds GPU 0's lock
    code = "from mgs.device import claim_free_gpu; import sys; print(claim_free_gpu(3, sys.argv[1]))"
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert (first, other) == (0, "1")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(InputError, match="device"):
        resolve_device("tpu")


@pytest.fixture
def no_device_override(monkeypatch):
    monkeypatch.delenv("MGS_DEVICE", raising=False)  # the conftest pins CPU tests with it
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_one_process_keeps_one_gpu_and_one_lock(tmp_path, no_device_override):
    """train_all resolves the device once per block and round: no hopping, no extra locks."""
    import mgs.device as device

    held = len(device._held_locks)
    picks = {str(resolve_device("auto", tmp_path, gpu_count=3)) for _ in range(5)}
    assert picks == {"cuda:0"} and len(device._held_locks) == held + 1
    code = "from mgs.device import claim_free_gpu; import sys; print(claim_free_gpu(3, sys.argv[1]))"
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert other == "1"  # the lock is still held by this process


def test_all_gpus_held_shares_gpu0_without_waiting(tmp_path, no_device_override):
    code = ("from mgs.device import claim_free_gpu; import sys; "
            "print(claim_free_gpu(1, sys.argv[1]), flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert claim_free_gpu(1, tmp_path) == 0  # returns at once: shared, with a warning
    finally:
        holder.communicate("")


def test_default_lock_folder_is_per_user(tmp_path, monkeypatch):
    """A shared /tmp lets no user open another's file for writing: locks live per user."""
    import os
    import stat
    import tempfile

    from mgs.device import default_lock_dir

    monkeypatch.delenv("MGS_LOCK_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = default_lock_dir()
    assert folder == tmp_path / f"mgs-gpu-locks-{os.getuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    monkeypatch.setenv("MGS_LOCK_DIR", str(tmp_path / "mine"))
    assert default_lock_dir() == tmp_path / "mine"


def test_mgs_device_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("MGS_DEVICE", "cpu")
    assert resolve_device("auto", gpu_count=4) == torch.device("cpu")
    monkeypatch.setenv("MGS_DEVICE", "tpu")
    with pytest.raises(InputError, match="tpu"):
        resolve_device("auto")


def test_auto_on_a_slurm_gpu_job_without_cuda_is_an_error(monkeypatch, no_device_override):
    """A GPU job whose torch sees no CUDA must fail, not train for hours on the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("SLURM_STEP_GPUS", raising=False)
    monkeypatch.delenv("SLURM_JOB_GPUS", raising=False)
    assert resolve_device("auto").type == "cpu"  # not a SLURM GPU job: the CPU is fine
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    with pytest.raises(InputError, match="SLURM gave this job GPU"):
        resolve_device("auto")
    assert resolve_device("cpu").type == "cpu"  # chosen explicitly: allowed


def test_preflight_finds_the_lpips_weights_and_reports_what_is_missing(monkeypatch):
    from mgs import preflight

    assert preflight.problems() == []  # this test environment is complete
    monkeypatch.setattr(preflight, "LPIPS_FILES", ("alexnet.ckpt", "no-such-net.ckpt"))
    assert any("no-such-net.ckpt" in p for p in preflight.problems())
    with pytest.raises(InputError, match="preflight failed"):
        preflight.check()


def test_gpus_of_an_allocation_are_locked_by_their_visible_names(tmp_path, no_device_override,
                                                                 monkeypatch):
    """A SLURM job of several GPUs (a group job of block jobs): each process takes its own GPU,
    locked under its CUDA_VISIBLE_DEVICES name, in a folder of that job."""
    from mgs.device import default_lock_dir

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("MGS_LOCK_DIR", "")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    folder = default_lock_dir()
    assert folder.name == "slurm-4242"
    code = ("from mgs.device import resolve_device; import sys; "
            "print(resolve_device('auto', gpu_count=2), flush=True); sys.stdin.read()")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "cuda:0"
        assert (folder / "mgs-gpu-3.lock").exists()
        other = subprocess.run([sys.executable, "-c", code], input="", capture_output=True,
                               text=True, env=env).stdout.strip()
        assert other == "cuda:1"
        assert (folder / "mgs-gpu-5.lock").exists()
    finally:
        holder.communicate("")
