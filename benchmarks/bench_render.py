"""Forward+backward time and peak memory of the rasterizer backends.

    python benchmarks/bench_render.py            # CPU cases
    python benchmarks/bench_render.py --cuda     # also gsplat vs torch on CUDA
    python benchmarks/bench_render.py --cuda-only   # only the CUDA cases
    python benchmarks/bench_render.py --before main --rounds 3   # fused kernels: REV vs this tree

`--before REV` also runs the fused CPU compositor of git revision REV (its mgs/render/fused.py,
loaded from a temporary copy in place of this tree's) as method "fused@REV", and times a few
training steps of the real Trainer on a demo-sized synthetic scene (200x150 images, 15k points,
1 thread) with each kernel. Workers of the two kernels alternate, `--rounds` times each, so a
busy machine slows both alike; times are medians over all rounds.

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


def use_kernel_of(method: str) -> str:
    """For "fused@REV": load REV's mgs/render/fused.py from a temporary copy and make the
    torch backend use it. Returns the backend name to render with."""
    if "@" not in method:
        return method
    import atexit
    import importlib.util
    import shutil
    import tempfile

    import mgs.render

    rev = method.split("@", 1)[1]
    source = subprocess.run(["git", "-C", REPO_ROOT, "show", f"{rev}:mgs/render/fused.py"],
                            capture_output=True, text=True, check=True).stdout
    folder = tempfile.mkdtemp(prefix="fused_before.")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "fused_before.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("fused_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mgs.render._load_fused = lambda: module.composite_tiles_fused
    return "torch-fused"


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
        out = render(**{**scene, **leaves}, background=background, backend=backend)
        sync()
        mid = time.perf_counter()
        (out.image.sum() + out.alpha.sum()).backward()
        sync()
        return mid - start, time.perf_counter() - mid, int((out.radii > 0).sum())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    backend = use_kernel_of(method)
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
        timings=timings,
        forward_s=statistics.median(t[0] for t in timings),
        backward_s=statistics.median(t[1] for t in timings),
        total_s=statistics.median(t[0] + t[1] for t in timings),
        best_total_s=min(t[0] + t[1] for t in timings),
        peak_mib=peak_mib,
        visible=timings[0][2],
    )


def spawn(args: list, device: str = "cpu", threads: int = THREADS) -> dict:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(threads),
           "NUMBA_NUM_THREADS": str(threads)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pooled(results: list[dict]) -> dict:
    """One row from the workers of all rounds: medians over every timed render."""
    timings = [t for r in results for t in r["timings"]]
    return dict(forward_s=statistics.median(t[0] for t in timings),
                backward_s=statistics.median(t[1] for t in timings),
                total_s=statistics.median(t[0] + t[1] for t in timings),
                best_total_s=min(t[0] + t[1] for t in timings),
                peak_mib=statistics.median(r["peak_mib"] for r in results), n=len(timings))


def print_table(device: str, cases, repeats: int, rounds: int = 1) -> None:
    print(f"\n{device.upper()}: forward+backward, median of {repeats} x {rounds} round(s) after "
          f"warm-up, {THREADS} threads")
    header = (f"{'case':>14} {'method':>14} {'fwd s':>8} {'bwd s':>8} {'total s':>8} {'best s':>8} "
              f"{'peak MiB':>9} {'vs first':>9}")
    print(header)
    print("-" * len(header))
    for n, side, methods in cases:
        label = f"{n // 1000}k @ {side}²"
        results: dict[str, list] = {method: [] for method in methods}
        for round_index in range(rounds):  # methods alternate, in turn first
            turn = methods[round_index % len(methods):] + methods[:round_index % len(methods)]
            for method in turn:
                reps = 2 if method == "brute-force" else repeats
                results[method].append(spawn([n, side, method, device, reps], device))
        baseline = None
        for method in methods:
            errors = [r["error"] for r in results[method] if "error" in r]
            if errors:
                print(f"{label:>14} {method:>14}  error: {errors[0]}")
                continue
            row = pooled(results[method])
            baseline = baseline or row["total_s"]
            print(f"{label:>14} {method:>14} {row['forward_s']:8.3f} {row['backward_s']:8.3f} "
                  f"{row['total_s']:8.3f} {row['best_total_s']:8.3f} {row['peak_mib']:9.0f} "
                  f"{row['total_s'] / baseline:8.2f}x", flush=True)


DEMO_SCENE = dict(seed=0, num_views=10, width=200, height=150, num_points=15000)


def train_steps(scene_dir: str, method: str, steps: int) -> dict:
    """Runs inside a worker: `steps` timed steps of the real Trainer (after 2 untimed ones) on
    the demo-sized scene, with the demo's training settings, 1 thread."""
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    sys.path.insert(0, REPO_ROOT)
    from mgs.config import TrainConfig
    from mgs.model import Decoder
    from mgs.scene import load_scene
    from mgs.train import Trainer, load_views, spatial_lr_scale
    from mgs.training_loop import initial_anchors

    backend = use_kernel_of(method)
    scene = load_scene(scene_dir)
    config = TrainConfig.from_dict(dict(voxel_size=0.01, threads=1, backend="torch",
                                        device="cpu", iterations=100))
    views = load_views(scene.train_cameras(), 1, scene.scene_dir, torch.device("cpu"))
    torch.manual_seed(0)
    anchors = initial_anchors(scene, config)
    trainer = Trainer(anchors, Decoder(config.feat_dim, config.n_offsets), config, views,
                      spatial_lr_scale(scene.train_cameras()), torch.device("cpu"))
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        stats = trainer.train_step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return dict(times=times, anchors=trainer.anchors.count, gaussians=stats["gaussians"])


def print_train(methods: list[str], steps: int, rounds: int) -> None:
    import tempfile

    sys.path.insert(0, REPO_ROOT)
    from mgs.synthetic import SyntheticConfig, make_synthetic_scene

    with tempfile.TemporaryDirectory(prefix="bench_render.") as tmp:
        scene_dir = os.path.join(tmp, "scene")
        make_synthetic_scene(scene_dir, SyntheticConfig(**DEMO_SCENE))
        results: dict[str, list] = {method: [] for method in methods}
        for round_index in range(rounds):
            turn = methods[round_index % len(methods):] + methods[:round_index % len(methods)]
            for method in turn:
                results[method].append(spawn(["train", scene_dir, method, steps], threads=1))
    print(f"\nCPU: Trainer.train_step on a demo-sized scene ({DEMO_SCENE['width']}x"
          f"{DEMO_SCENE['height']}, {DEMO_SCENE['num_points']} points), 1 thread, median of "
          f"{steps} steps x {rounds} round(s)")
    for method in methods:
        errors = [r["error"] for r in results[method] if "error" in r]
        if errors:
            print(f"{method:>14}  error: {errors[0]}")
            continue
        times = [t for r in results[method] for t in r["times"]]
        first = results[method][0]
        print(f"{method:>14} {statistics.median(times):8.3f} s/step  (best {min(times):.3f}; "
              f"{first['anchors']} anchors, {first['gaussians']} Gaussians)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="also run gsplat vs torch on CUDA")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", metavar="REV",
                        help="also time the fused kernels of this git revision (e.g. main)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="worker processes per method, alternating between methods")
    parser.add_argument("--train-steps", type=int, default=5,
                        help="timed training steps per worker with --before (0: none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = json.loads(args.worker)
        result = train_steps(*worker[1:]) if worker[0] == "train" else run_case(*worker)
        print(json.dumps(result))
        return
    if not args.cuda_only:
        cases = CPU_CASES
        if args.before:  # this tree's fused kernel against REV's, nothing else
            cases = [(n, side, ("torch-fused", f"fused@{args.before}")) for n, side, _ in cases]
        print_table("cpu", cases, args.repeats, args.rounds)
        if args.before and args.train_steps:
            print_train(["torch-fused", f"fused@{args.before}"], args.train_steps, args.rounds)
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
