"""Evaluation speed: LPIPS (Alex, VGG) and colour correction on a 480x360 pair, and a whole
`mgs evaluate` of a demo-sized run (the embedded synthetic scene: 8 test views at 200x150).

    python benchmarks/bench_eval.py                  # LPIPS/CC timings + demo-sized evaluation
    python benchmarks/bench_eval.py --run RUN        # evaluate an existing run instead
    python benchmarks/bench_eval.py --no-demo        # LPIPS/CC timings only

Times are the best of several repeats (the machine is shared; the minimum is the least disturbed
run). Goals: LPIPS-Alex < 0.1 s per 480x360 pair on 2 CPU threads; evaluation of the demo < 60 s.
The demo run is trained only a few steps: evaluation time depends on the view count, the image
size and the anchor count, not on how well the model is trained.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mgs CLI: idle OpenMP threads spin

import torch  # noqa: E402
import yaml  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
THREADS = 2


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: weight loading, allocator, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_metrics(repeats: int) -> None:
    from skimage.data import astronaut

    from mgs.color_correct import color_correct
    from mgs.lpips import lpips

    image = torch.from_numpy(astronaut()[:360, :480].copy()).float() / 255
    noisy = (image + 0.05 * torch.randn_like(image)).clamp(0, 1)
    print(f"480x360 pair, {torch.get_num_threads()} CPU threads, best of {repeats}:")
    for net, goal in (("alex", "goal < 0.1 s"), ("vgg", "")):
        seconds = best_of(lambda: lpips(noisy, image, net), repeats if net == "alex" else 2)
        print(f"  LPIPS-{net:<5} {seconds * 1000:8.1f} ms  {goal}")
    seconds = best_of(lambda: color_correct(noisy, image), 2)
    print(f"  colour correction {seconds * 1000:6.1f} ms")


def make_demo_run(work: Path) -> Path:
    """The default demo's scene and partition, trained a few steps per block."""
    from mgs.blocks import Run, train_all
    from mgs.partition import PartitionConfig, partition_scene
    from mgs.synthetic import SyntheticConfig, make_synthetic_scene

    defaults = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    # the workflow config nests a scene's sections under scenes: {name: ...}
    defaults = next(iter(defaults.get("scenes", {}).values()), defaults)
    scene = work / "scene"
    if not (scene / "scene.json").is_file():
        make_synthetic_scene(scene, SyntheticConfig(**defaults.get("synthetic", {})))
    root = work / "demo"
    if (root / "model" / "decoder.pt").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "scene").exists():
        (root / "scene").symlink_to(scene.resolve())
    train = dict(defaults.get("train", {}), iterations=40, lr_max_steps=20, eval_interval=10,
                 checkpoint_interval=20, update_until=20, threads=THREADS)
    momentum = dict(mode="full", rounds=2, iterations_per_round=10, final_iterations=5)
    (root / "config.yaml").write_text(yaml.safe_dump({"train": train, "momentum": momentum}))
    partition_scene(root / "scene", root / "partition", PartitionConfig(block_dim=[2, 2, 1]))
    run = Run.open(root)
    train_all(run)
    return root


def bench_evaluate(root: Path) -> None:
    from mgs.evaluate import evaluate_run
    from mgs.lpips import _cached

    _cached.cache_clear()  # count the LPIPS weight loading, as a fresh `mgs evaluate` does
    start = time.perf_counter()
    metrics = evaluate_run(root)
    seconds = time.perf_counter() - start
    size = "x".join(str(s) for s in metrics["image_sizes"][0])
    print(f"mgs evaluate of {root}: {metrics['num_views']} views at {size}, "
          f"{metrics['anchors']} anchors: {seconds:.1f} s (goal < 60 s); "
          f"render {metrics['fps']:.1f} FPS, peak {metrics['peak_memory_mb']:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="evaluate this run instead of the demo")
    parser.add_argument("--work", type=Path, default=Path("results/bench_eval"),
                        help="folder for the demo-sized run (default results/bench_eval)")
    parser.add_argument("--no-demo", action="store_true", help="only LPIPS/CC timings")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    torch.set_num_threads(THREADS)
    bench_metrics(opts.repeats)
    if opts.run:
        bench_evaluate(opts.run)
    elif not opts.no_demo:
        bench_evaluate(make_demo_run(opts.work))


if __name__ == "__main__":
    main()
