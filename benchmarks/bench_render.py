"""Forward+backward time and peak memory of the rasterizer backends.

    python benchmarks/bench_render.py            # CPU cases
    python benchmarks/bench_render.py --cuda     # also gsplat vs torch on CUDA
    python benchmarks/bench_render.py --cuda-only   # only the CUDA cases

Every (case, method) runs in a fresh subprocess with 2 torch threads and 2 numba
threads. Time: median of the timed runs after warm-up. Memory on CPU: growth of the
process's peak RSS (ru_maxrss) during the timed renders, above the level reached after
imports, scene setup and one tiny render that loads the numba kernels; i.e. the extra
resident memory one forward+backward needs. On CUDA: torch.cuda.max_memory_allocated.

Workers run with OMP_WAIT_POLICY=PASSIVE (unless already set): otherwise torch's idle
OpenMP threads busy-wait against numba's threads, which on a shared 2-core machine
makes timings swing by 5-10x. Training runs on CPU benefit from the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (n_gaussians, image side, methods); brute force only where its dense matrix stays small.
CPU_CASES = [
    (5_000, 128, ("torch-fused", "torch-tiles", "brute-force")),
    (20_000, 256, ("torch-fused", "torch-tiles")),
    (50_000, 256, ("torch-fused", "torch-tiles")),
]
CUDA_CASES = [(50_000, 256, ("gsplat", "torch")), (200_000, 1024, ("gsplat", "torch"))]
THREADS = 2


def run_case(n: int, side: int, method: str, device: str, repeats: int) -> dict:
    """Runs inside the worker subprocess."""
    import numba
    import torch

    torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)
    sys.path.insert(0, REPO_ROOT)
    from mgs.render import render
    from mgs.render.reference import random_scene

    def forward_backward(scene):
        leaves = {k: scene[k].clone().requires_grad_() for k in ("means", "quats", "scales", "opacities", "colors")}
        start = time.perf_counter()
        out = render(**{**scene, **leaves}, background=background, backend=method)
        sync()
        mid = time.perf_counter()
        (out.image.sum() + out.alpha.sum()).backward()
        sync()
        return mid - start, time.perf_counter() - mid, int((out.radii > 0).sum())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    background = torch.tensor([0.1, 0.2, 0.3], device=device)
    forward_backward(random_scene(50, 32, 32, seed=1, device=device))  # load/compile kernels
    scene = random_scene(n, side, side, seed=0, device=device)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    forward_backward(scene)  # warm-up
    timings = [forward_backward(scene) for _ in range(repeats)]
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    return dict(
        forward_s=statistics.median(t[0] for t in timings),
        backward_s=statistics.median(t[1] for t in timings),
        total_s=statistics.median(t[0] + t[1] for t in timings),
        best_total_s=min(t[0] + t[1] for t in timings),
        peak_mib=peak_mib,
        visible=timings[0][2],
    )


def spawn(n: int, side: int, method: str, device: str, repeats: int) -> dict:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(THREADS),
           "NUMBA_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([n, side, method, device, repeats])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(device: str, cases, repeats: int) -> None:
    print(f"\n{device.upper()}: forward+backward, median of {repeats} after warm-up, {THREADS} threads")
    header = (f"{'case':>14} {'method':>12} {'fwd s':>8} {'bwd s':>8} {'total s':>8} {'best s':>8} "
              f"{'peak MiB':>9} {'vs first':>9}")
    print(header)
    print("-" * len(header))
    for n, side, methods in cases:
        baseline = None
        for method in methods:
            reps = 2 if method == "brute-force" else repeats
            result = spawn(n, side, method, device, reps)
            label = f"{n // 1000}k @ {side}²"
            if "error" in result:
                print(f"{label:>14} {method:>12}  error: {result['error']}")
                continue
            baseline = baseline or result["total_s"]
            print(f"{label:>14} {method:>12} {result['forward_s']:8.3f} {result['backward_s']:8.3f} "
                  f"{result['total_s']:8.3f} {result['best_total_s']:8.3f} {result['peak_mib']:9.0f} "
                  f"{result['total_s'] / baseline:8.1f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="also run gsplat vs torch on CUDA")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(*json.loads(args.worker))))
        return
    if not args.cuda_only:
        print_table("cpu", CPU_CASES, args.repeats)
    if args.cuda or args.cuda_only:
        import torch

        if torch.cuda.is_available():
            print_table("cuda", CUDA_CASES, args.repeats)
        else:
            print("\n--cuda: no CUDA device, skipped")
    print("\nfwd/bwd/total: medians; best: fastest forward+backward; "
          "'vs first' = total / total of the first method of the same case.")


if __name__ == "__main__":
    main()
