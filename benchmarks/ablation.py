"""Multi-seed ablation of the Momentum-GS training strategies (paper Table 5 shape).

A synthetic city where blocks differ: one quadrant keeps only a third of its photos, so one block
has far fewer views than the others. Every variant trains the same steps per block
(`rounds` x `iterations_per_round` + `final_iterations`) through the in-process block pipeline
(`mgs.blocks.train_all`, the same functions the workflow's jobs call), for every seed, and is
scored on the held-out test views with `mgs.evaluate` (PSNR, SSIM, LPIPS-VGG, raw and
colour-corrected). Variants:

  single              one model on the whole scene (1 block)
  independent         2x2 blocks, each its own decoder
  shared              2x2 blocks, one decoder averaged at every sync
  momentum            + per-step EMA teacher and consistency loss (λ_c 50)
  full                momentum + block weighting
  control             momentum with λ_c = 0.01: must equal shared within seed noise

Jobs run in parallel worker processes (one torch/numba thread each); a finished job's
result.json is reused, so an interrupted benchmark resumes. Prints the per-seed table, then
mean ± std per variant, paired differences with their sign in every seed, the per-round
diagnostics (consistency share, sync cost, drift) and writes summary.csv for `mgs report
--ablation`.

    python benchmarks/ablation.py [--work results/ablation] [--seeds 0 1 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

VARIANTS = ("single", "independent", "shared", "momentum", "full", "control")
MODE = {"single": "single", "independent": "independent", "shared": "shared",
        "momentum": "momentum", "full": "full", "control": "momentum"}
SCENE = dict(seed=0, num_views=72, width=96, height=72, num_points=2500, supersample=1)
SPARSE_KEEP = 3  # the sparse quadrant keeps every 3rd of its train views
TRAIN = dict(voxel_size=0.04, densify_grad_threshold=0.0008, start_stat=20, update_from=40,
             update_interval=20, eval_interval=100_000, checkpoint_interval=100_000, threads=1)
METRICS = ("psnr", "ssim", "lpips_vgg", "psnr_cc", "ssim_cc", "lpips_vgg_cc")


def make_scene(scene_dir: Path) -> None:
    """The synthetic city with the views of one quadrant (x > 0, y > 0) thinned out."""
    from mgs.scene import load_scene
    from mgs.synthetic import SyntheticConfig, make_synthetic_scene

    if (scene_dir / "scene.json").exists():
        return
    make_synthetic_scene(scene_dir, SyntheticConfig(**SCENE))
    scene = load_scene(scene_dir)
    sparse = [c.name for c in scene.train_cameras() if c.center[0] > 0 and c.center[1] > 0]
    dropped = {n for i, n in enumerate(sorted(sparse)) if i % SPARSE_KEEP}
    meta = json.loads((scene_dir / "scene.json").read_text())
    meta["train_names"] = [n for n in meta["train_names"] if n not in dropped]
    (scene_dir / "scene.json").write_text(json.dumps(meta, indent=2))
    print(f"scene: {len(meta['train_names'])} train views ({len(sparse) - len(dropped)} of "
          f"{len(sparse)} kept in the sparse quadrant), {len(meta['test_names'])} test views",
          flush=True)


def job_config(variant: str, seed: int, opts) -> dict:
    steps = opts.rounds * opts.iterations_per_round + opts.final_iterations
    train = dict(TRAIN, seed=seed, iterations=steps, lr_max_steps=steps // 2,
                 update_until=steps // 2)
    momentum = dict(mode=MODE[variant], rounds=opts.rounds,
                    iterations_per_round=opts.iterations_per_round,
                    final_iterations=opts.final_iterations, sigma=opts.sigma,
                    consistency_weight=opts.consistency_weight)
    if variant == "control":
        momentum["consistency_weight"] = 0.01
    return {"train": train, "momentum": momentum}


def run_job(root: Path, scene_dir: Path, config: dict, single: bool) -> dict:
    """In a worker process: partition, train_all, evaluate; returns the result row."""
    from mgs.blocks import Run, train_all
    from mgs.evaluate import evaluate_run
    from mgs.partition import PartitionConfig, partition_scene

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "scene").exists():
        (root / "scene").symlink_to(scene_dir.resolve())
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    dims = [1, 1, 1] if single else [2, 2, 1]
    partition_scene(root / "scene", root / "partition",
                    PartitionConfig(block_dim=dims, margin=0.25, min_cameras=3))
    start = time.perf_counter()
    run = Run.open(root)
    train_all(run)
    seconds = time.perf_counter() - start
    metrics = evaluate_run(root, warmup=0)
    row = {m: metrics["metrics"][m] for m in METRICS}
    row.update(seconds=seconds, anchors=metrics["anchors"], **diagnostics(root))
    return row


def diagnostics(root: Path) -> dict:
    """Means over blocks and rounds of the sync diagnostics (rounds/*/sync.tsv)."""
    frames = [pd.read_csv(p, sep="\t") for p in sorted((root / "rounds").glob("*/sync.tsv"))]
    if not frames:
        return {}
    sync = pd.concat(frames)
    last = sync[sync["round"] == sync["round"].max()]
    return {"consistency_share": float(sync["consistency_share"].mean()),
            "sync_cost_db": float(sync["previous_sync_cost"].mean()),
            "student_drift": float(sync["student_drift"].mean()),
            "teacher_gap": float(sync["teacher_gap"].mean()),
            "weight_max": float(sync["weight"].max()),
            "val_psnr_last": float(last["psnr"].mean()),
            "val_psnr_spread": float(last["psnr"].max() - last["psnr"].min())}


def launch(name: str, root: Path, scene_dir: Path, config: dict, single: bool,
           command: list[str] | None = None) -> dict:
    """Run one job in its own process (one thread), or reuse its result.json. `command`
    replaces this script's own job command (for scripts that vary the training code)."""
    result = root / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    root.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"root": str(root), "scene": str(scene_dir), "config": config,
                       "single": single})
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    with open(root / "job.log", "w") as log:
        code = subprocess.call(command or [sys.executable, __file__, "--job", spec], stdout=log,
                               stderr=log, env=env)
    if code != 0:
        raise SystemExit(f"ablation job {name} failed; see {root / 'job.log'}")
    row = json.loads(result.read_text())
    print(f"{name}: PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.4f}  LPIPS {row['lpips_vgg']:.4f}"
          f"  ({row['seconds']:.0f} s)", flush=True)
    return row


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: launch(*job), jobs))


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    stats = rows.groupby("variant", sort=False)[list(METRICS)].agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats["seeds"] = rows.groupby("variant", sort=False).size()
    return stats.reset_index()


def paired(rows: pd.DataFrame, a: str, b: str, metric: str = "psnr") -> str:
    """a − b per seed: mean, 2 × pooled seed std, and whether the sign holds in every seed."""
    x = rows[rows.variant == a].set_index("seed")[metric]
    y = rows[rows.variant == b].set_index("seed")[metric]
    seeds = x.index.intersection(y.index)
    if len(seeds) == 0:
        return f"{a} − {b}: no common seeds"
    diff = x[seeds] - y[seeds]
    pooled = float(np.sqrt((x[seeds].var(ddof=1) + y[seeds].var(ddof=1)) / 2)) \
        if len(seeds) > 1 else float("nan")
    same_sign = bool((np.sign(diff) == np.sign(diff.mean())).all())
    return (f"{a} − {b}: {diff.mean():+.3f} dB (per seed {', '.join(f'{d:+.2f}' for d in diff)};"
            f" 2×pooled std {2 * pooled:.3f}; same sign in every seed: {same_sign})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/ablation"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--iterations-per-round", type=int, default=40)
    parser.add_argument("--final-iterations", type=int, default=60)
    parser.add_argument("--consistency-weight", type=float, default=50.0)
    parser.add_argument("--sigma", type=float, default=1.0,
                        help="block-weight width; the paper's 9-13 dB suit its PSNR spread")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    opts = build_parser().parse_args()
    if opts.job:  # worker process
        spec = json.loads(opts.job)
        row = run_job(Path(spec["root"]), Path(spec["scene"]), spec["config"], spec["single"])
        (Path(spec["root"]) / "result.json").write_text(json.dumps(row, indent=2))
        return

    start = time.perf_counter()
    scene_dir = opts.work / "scene"
    make_scene(scene_dir)
    jobs = [(f"{v}/seed {s}", opts.work / v / f"seed{s}", scene_dir, job_config(v, s, opts),
             v == "single") for s in opts.seeds for v in opts.variants]
    results = run_all(jobs, opts.workers)

    rows = pd.DataFrame([dict(variant=name.split("/")[0], seed=int(name.split("seed ")[1]), **r)
                         for (name, *_), r in zip(jobs, results)])
    rows.to_csv(opts.work / "runs.csv", index=False, float_format="%.6g")
    summary = summarise(rows)
    summary.to_csv(opts.work / "summary.csv", index=False, float_format="%.6g")
    pd.set_option("display.width", 200)
    print("\nper run:")
    print(rows[["variant", "seed", "psnr", "ssim", "lpips_vgg", "psnr_cc", "anchors",
                "consistency_share", "sync_cost_db", "student_drift", "teacher_gap",
                "weight_max", "val_psnr_spread", "seconds"]].to_string(index=False,
                                                                       float_format="%.4g"))
    print("\nmean ± std over seeds (test views, raw):")
    for _, s in summary.iterrows():
        print(f"{s['variant']:<16} PSNR {s['psnr_mean']:.2f} ± {s['psnr_std']:.2f}   "
              f"SSIM {s['ssim_mean']:.4f} ± {s['ssim_std']:.4f}   "
              f"LPIPS-VGG {s['lpips_vgg_mean']:.4f} ± {s['lpips_vgg_std']:.4f}   "
              f"(colour-corrected PSNR {s['psnr_cc_mean']:.2f} ± {s['psnr_cc_std']:.2f}, "
              f"n={s['seeds']})")
    print("\npaired differences (test PSNR):")
    for a, b in (("momentum", "shared"), ("full", "independent"),
                 ("full", "single"), ("full", "momentum"), ("shared", "independent"),
                 ("control", "shared")):
        if {a, b} <= set(rows.variant):
            print("  " + paired(rows, a, b))
    print(f"\nbenchmark wall time {time.perf_counter() - start:.0f} s "
          f"({opts.workers} workers, 1 thread each)")


if __name__ == "__main__":
    main()
