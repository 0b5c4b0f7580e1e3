"""Ablation of the Momentum-GS training strategies on the synthetic scene (paper Table 5 shape).

Every mode gets the same iterations per block: `single` trains one block on the whole scene,
the others train a 2x2 grid of blocks as separate `mgs train-block` processes, round by round,
exactly as the workflow runs them. Prints test PSNR/SSIM of the merged model per mode and the
peak RSS of the block jobs against the single-model job (each measured per process by wait4).

    python benchmarks/ablation.py [--work DIR] [--rounds 4] [--iterations-per-round 150]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from mgs.merge import load_model, render_model
from mgs.metrics import psnr, ssim
from mgs.partition import PartitionConfig, partition_scene
from mgs.scene import load_scene
from mgs.synthetic import SyntheticConfig, make_synthetic_scene
from mgs.train import load_views

MODES = ("single", "independent", "shared", "momentum", "full")
TRAIN = dict(voxel_size=0.01, start_stat=100, update_from=100, update_interval=50,
             eval_interval=10_000, checkpoint_interval=10_000, threads=2)


def run_job(args: list[str], log_path: Path) -> tuple[float, float]:
    """Run `mgs <args>`; returns (seconds, peak RSS in MiB) of that process alone."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mgs.cli", *args], stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mgs {' '.join(args)} failed; see {log_path}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def train_mode(mode: str, scene_dir: Path, work: Path, opts) -> dict:
    root = work / mode
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "scene").exists():
        (root / "scene").symlink_to(scene_dir.resolve())
    iterations = opts.rounds * opts.iterations_per_round
    train = dict(TRAIN, iterations=iterations, lr_max_steps=iterations // 2,
                 update_until=iterations // 2)
    momentum = dict(mode=mode, rounds=opts.rounds, iterations_per_round=opts.iterations_per_round,
                    final_iterations=opts.final_iterations, momentum=opts.momentum,
                    consistency_weight=opts.consistency_weight, sigma=opts.sigma)
    (root / "config.yaml").write_text(yaml.safe_dump({"train": train, "momentum": momentum}))
    dims = [1, 1, 1] if mode == "single" else [2, 2, 1]
    partition = partition_scene(root / "scene", root / "partition",
                                PartitionConfig(block_dim=dims, margin=opts.margin))
    log = root / "jobs.log"
    log.write_text("")
    run = ["--run", str(root)]
    seconds, peak = 0.0, []
    for args in (["init", *run],):
        seconds += run_job(args, log)[0]
    for r in range(1, opts.rounds + 1):
        for b in range(partition.num_blocks):
            s, rss = run_job(["train-block", *run, "--round", str(r), "--block", str(b)], log)
            seconds += s
            peak.append(rss)
        seconds += run_job(["sync", *run, "--round", str(r)], log)[0]
    for b in range(partition.num_blocks):
        s, rss = run_job(["finalize-block", *run, "--block", str(b)], log)
        seconds += s
        peak.append(rss)
    seconds += run_job(["merge", *run], log)[0]
    return {"blocks": partition.num_blocks, "seconds": seconds, "peak_rss_mib": max(peak),
            **evaluate(root, scene_dir)}


@torch.no_grad()
def evaluate(root: Path, scene_dir: Path) -> dict:
    scene = load_scene(scene_dir)
    model = load_model(root / "model" / "decoder.pt")
    views = load_views(scene.test_cameras(), 1, scene.scene_dir, torch.device("cpu"))
    psnrs, ssims = [], []
    for view in views:
        image = render_model(model, view.viewmat, view.K, view.width, view.height).image.clamp(0, 1)
        psnrs.append(psnr(image, view.image).item())
        ssims.append(ssim(image, view.image).item())
    return {"test_psnr": sum(psnrs) / len(psnrs), "test_ssim": sum(ssims) / len(ssims),
            "anchors": model.anchors.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/ablation"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iterations-per-round", type=int, default=150)
    parser.add_argument("--final-iterations", type=int, default=100)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--consistency-weight", type=float, default=50.0)
    parser.add_argument("--sigma", type=float, default=1.0,
                        help="block-weight width; the paper's 9-13 dB suit its PSNR spread")
    parser.add_argument("--margin", type=float, default=0.25)
    opts = parser.parse_args()
    scene_dir = opts.work / "scene"
    if not (scene_dir / "scene.json").exists():
        make_synthetic_scene(scene_dir, SyntheticConfig())
    rows = {}
    for mode in opts.modes:
        rows[mode] = train_mode(mode, scene_dir, opts.work, opts)
        print(mode, rows[mode], flush=True)
    print(f"\n{'mode':<12}{'blocks':>7}{'PSNR':>8}{'SSIM':>8}{'anchors':>9}{'peak RSS MiB':>14}{'seconds':>9}")
    for mode, row in rows.items():
        print(f"{mode:<12}{row['blocks']:>7}{row['test_psnr']:>8.2f}{row['test_ssim']:>8.4f}"
              f"{row['anchors']:>9}{row['peak_rss_mib']:>14.0f}{row['seconds']:>9.0f}")
    if "single" in rows and len(rows) > 1:
        block_rss = max(r["peak_rss_mib"] for m, r in rows.items() if m != "single")
        print(f"\npeak RSS of a block job / single-model job: "
              f"{block_rss / rows['single']['peak_rss_mib']:.2f} (goal <= 0.45)")


if __name__ == "__main__":
    main()
