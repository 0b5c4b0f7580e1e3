import subprocess
import sys

import pytest

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


def test_auto_on_a_slurm_gpu_job_without_cuda_is_an_error(monkeypatch):
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
