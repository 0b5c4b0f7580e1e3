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
