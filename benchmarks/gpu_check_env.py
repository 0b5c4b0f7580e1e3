"""Environment report of benchmarks/gpu_check.sh: torch and its CUDA, nvcc, the GPUs, gsplat."""

import shutil
import subprocess

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
nvcc = shutil.which("nvcc")
if nvcc:
    print("nvcc:", *subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()[-2:])
else:
    print("nvcc: not on PATH (gsplat can neither build nor load its JIT extension)")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                          "--format=csv"], capture_output=True, text=True).stdout)
assert torch.cuda.is_available(), "torch sees no CUDA GPU (a CPU build of torch, or no driver)"
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
import gsplat  # noqa: E402

print("gsplat", gsplat.__version__)
