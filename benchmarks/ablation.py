"""Multi-seed ablation of the Momentum-GS training strategies (paper Table 5 shape).

Two scenes (`--scene`): `city`, a synthetic city where blocks differ (one quadrant keeps only a
third of its photos, so one block has far fewer views than the others), and `caliterra`, the 75
real drone photos of ../shared/data/caliterra (SfM once with `mgs sfm`'s pipeline, cached in
WORK/scene; `--scene-dir` reuses a scene made by `mgs sfm` elsewhere), where loading a sync's
average costs a block 1–2 dB. Every variant trains the same steps per block
(`rounds` x `iterations_per_round` + `final_iterations`) through the in-process block pipeline
(`mgs.blocks.train_all`, the same functions the workflow's jobs call), for every seed, and is
scored on the held-out test views with `mgs.evaluate` (PSNR, SSIM, LPIPS-VGG, raw and
colour-corrected). Variants:

  single              one model on the whole scene (1 block)
  independent         2x2 blocks, each its own decoder
  shared              2x2 blocks, one decoder averaged at every sync
  momentum            + teacher and consistency loss (the defaults: per-step teacher, λ_c 0.5)
  full                momentum + block weighting
  control             momentum with λ_c = 0.01: must equal shared within seed noise

Any other variant is MODE[+KEY=VALUE...] with momentum keys, e.g.
`momentum+teacher=global+consistency_weight=5` or `shared+sync=fit`.

Jobs run in parallel worker processes (one torch/numba thread each); a finished job's
result.json is reused, so an interrupted benchmark resumes. Prints the per-seed table, then
mean ± std per variant, paired differences with their sign in every seed, the per-round
diagnostics (consistency share, sync cost, drift) and writes summary.csv for `mgs report
--ablation`.

    python benchmarks/ablation.py [--scene city|caliterra] [--work results/ablation]
        [--seeds 0 1 2] [--workers 2] [--variants shared momentum+teacher=global ...]

`--rounds-curve 2 4 8 16`: how often to sync. The variants run at each number of rounds with
the same steps per block (rounds x iterations_per_round fixed), in WORK/rounds{R}/ (the default
rounds reuse the main runs); prints test PSNR and sync cost per rounds and writes
WORK/rounds_curve.csv and .png.
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

from mgs.momentum import MomentumConfig

VARIANTS = ("single", "independent", "shared", "momentum", "full", "control")
NAMED = {"control": {"mode": "momentum", "consistency_weight": 0.01}}
SCENE = dict(seed=0, num_views=72, width=96, height=72, num_points=2500, supersample=1)
SPARSE_KEEP = 3  # the sparse quadrant keeps every 3rd of its train views
TRAIN = dict(voxel_size=0.04, densify_grad_threshold=0.0008, start_stat=20, update_from=40,
             update_interval=20, eval_interval=100_000, checkpoint_interval=100_000, threads=1)
# Caliterra: 1000×750 photos trained at 1/8 (125×94), metres; schedule scaled like the demo's
CALITERRA = Path(__file__).resolve().parents[1] / "../shared/data/caliterra/images"
CALITERRA_SFM = dict(matching="spatial", max_image_size=800, max_features=2048)
CALITERRA_TRAIN = dict(resolution=8, voxel_size=0.01, densify_grad_threshold=0.0008,
                       start_stat=50, update_from=50, update_interval=50,
                       eval_interval=100_000, checkpoint_interval=100_000, threads=1)
# steps per block and the block-weight width σ: the paper's 9-13 dB suit a real scene's PSNR
# spread, the city's blocks differ by ~1 dB
SCHEDULE = {"city": dict(rounds=12, iterations_per_round=40, final_iterations=60, sigma=1.0),
            "caliterra": dict(rounds=4, iterations_per_round=160, final_iterations=100,
                              sigma=10.0)}
METRICS = ("psnr", "ssim", "lpips_vgg", "psnr_cc", "ssim_cc", "lpips_vgg_cc")


def variant_settings(variant: str) -> dict:
    """A variant's momentum settings: a named one, or MODE[+KEY=VALUE...]."""
    from mgs.momentum import MODES

    head, *pairs = variant.split("+")
    settings = dict(NAMED.get(head, {"mode": head}))
    if settings["mode"] not in MODES:
        raise SystemExit(f"variant {variant!r}: {head!r} is neither a mode ({', '.join(MODES)})"
                         f" nor one of {', '.join(NAMED)}")
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not value:
            raise SystemExit(f"variant {variant!r}: write options as +KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    return settings


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


def make_caliterra(scene_dir: Path, images: Path, cached: Path | None) -> None:
    """The real capture's SfM scene, made once (or linked from `cached`)."""
    if (scene_dir / "scene.json").exists():
        return
    if cached is not None:
        if not (cached / "scene.json").is_file():
            raise SystemExit(f"--scene-dir {cached} holds no scene.json; make it with `mgs sfm`")
        scene_dir.parent.mkdir(parents=True, exist_ok=True)
        scene_dir.symlink_to(cached.resolve())
        return
    from mgs.ingest.sfm import SfmConfig, run_sfm

    if not images.is_dir():
        raise SystemExit(f"Caliterra photos not found at {images}; pass --images DIR")
    run_sfm(images, scene_dir, SfmConfig(**CALITERRA_SFM))


def job_config(variant: str, seed: int, opts) -> dict:
    steps = opts.rounds * opts.iterations_per_round + opts.final_iterations
    base = CALITERRA_TRAIN if opts.scene == "caliterra" else TRAIN
    train = dict(base, seed=seed, iterations=steps, lr_max_steps=steps // 2,
                 update_until=steps // 2)
    momentum = dict(rounds=opts.rounds, iterations_per_round=opts.iterations_per_round,
                    final_iterations=opts.final_iterations, sigma=opts.sigma,
                    consistency_weight=opts.consistency_weight, keep_rounds=0)
    momentum.update(variant_settings(variant))
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
    dims = [1, 1, 1] if single else [2, 2, 1]  # margin 0.25: the default (and cheaper than all)
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
    from mgs.report.figures import read_sync_tables

    sync = read_sync_tables(root)
    if sync.empty:
        return {}
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
          f"  sync cost {row.get('sync_cost_db', float('nan')):+.2f} dB"
          f"  ({row['seconds']:.0f} s)", flush=True)
    return row


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: launch(*job), jobs))


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    stats = rows.groupby("variant", sort=False)[[*METRICS, "sync_cost_db"]].agg(["mean", "std"])
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


def rounds_curve(opts, scene_dir: Path) -> None:
    """Test PSNR and sync cost vs the number of rounds at equal steps per block."""
    steps = opts.rounds * opts.iterations_per_round
    jobs, keys = [], []
    for rounds in opts.rounds_curve:
        if steps % rounds:
            raise SystemExit(f"--rounds-curve {rounds}: {steps} round steps do not split into "
                             f"{rounds} equal rounds")
        at = argparse.Namespace(**dict(vars(opts), rounds=rounds,
                                       iterations_per_round=steps // rounds))
        folder = opts.work if rounds == opts.rounds else opts.work / f"rounds{rounds}"
        for v in opts.variants:
            for s in opts.seeds:
                jobs.append((f"{v}/{rounds} rounds/seed {s}", folder / v / f"seed{s}", scene_dir,
                             job_config(v, s, at), variant_settings(v)["mode"] == "single"))
                keys.append(dict(variant=v, rounds=rounds, iterations_per_round=steps // rounds,
                                 seed=s))
    rows = pd.DataFrame([dict(k, **r) for k, r in zip(keys, run_all(jobs, opts.workers))])
    curve = rows.groupby(["variant", "rounds", "iterations_per_round"], sort=False)[
        ["psnr", "ssim", "lpips_vgg", "sync_cost_db"]].agg(["mean", "std"])
    curve.columns = [f"{m}_{s}" for m, s in curve.columns]
    curve = curve.reset_index()
    curve.to_csv(opts.work / "rounds_curve.csv", index=False, float_format="%.6g")
    print(f"\nhow often to sync ({steps} round steps + {opts.final_iterations} final per block,"
          f" seeds {' '.join(map(str, opts.seeds))}):")
    print(curve.to_string(index=False, float_format="%.3f"))
    plot_rounds_curve(curve, opts.work / "rounds_curve.png")


def plot_rounds_curve(curve: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for variant, group in curve.groupby("variant", sort=False):
        for ax, metric in zip(axes, ("psnr", "sync_cost_db")):
            ax.errorbar(group["rounds"], group[f"{metric}_mean"], yerr=group[f"{metric}_std"],
                        marker="o", capsize=3, label=variant)
    for ax, label in zip(axes, ("test PSNR (dB)", "mean sync cost (dB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rounds (syncs) at equal steps per block")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", choices=("city", "caliterra"), default="city")
    parser.add_argument("--work", type=Path,
                        help="default results/ablation (city), results/ablation-caliterra")
    parser.add_argument("--images", type=Path, default=CALITERRA,
                        help="the Caliterra photos (for --scene caliterra)")
    parser.add_argument("--scene-dir", type=Path,
                        help="reuse this `mgs sfm` scene of the photos instead of running SfM")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help="named variants or MODE[+KEY=VALUE...]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="default 12 (city), 4 (caliterra)")
    parser.add_argument("--iterations-per-round", type=int,
                        help="default 40 (city), 160 (caliterra)")
    parser.add_argument("--final-iterations", type=int, help="default 60 (city), 100 (caliterra)")
    parser.add_argument("--consistency-weight", type=float,
                        default=MomentumConfig.consistency_weight, help="λ_c (default: mgs's)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="A:B",
                        help="more paired differences to print, variant A minus variant B")
    parser.add_argument("--rounds-curve", type=int, nargs="+", metavar="R",
                        help="sync-frequency curve: these numbers of rounds at equal steps")
    parser.add_argument("--sigma", type=float, help="block-weight width: default 1 (city), "
                        "10 (caliterra)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    opts = build_parser().parse_args()
    defaults = SCHEDULE[opts.scene]
    for key in ("rounds", "iterations_per_round", "final_iterations", "sigma"):
        if getattr(opts, key) is None:
            setattr(opts, key, defaults[key])
    opts.work = opts.work or Path("results/ablation" if opts.scene == "city"
                                  else "results/ablation-caliterra")
    if opts.job:  # worker process
        spec = json.loads(opts.job)
        row = run_job(Path(spec["root"]), Path(spec["scene"]), spec["config"], spec["single"])
        (Path(spec["root"]) / "result.json").write_text(json.dumps(row, indent=2))
        return

    start = time.perf_counter()
    scene_dir = opts.work / "scene"
    if opts.scene == "city":
        make_scene(scene_dir)
    else:
        make_caliterra(scene_dir, opts.images, opts.scene_dir)
    if opts.rounds_curve:
        rounds_curve(opts, scene_dir)
        return
    jobs = [(f"{v}/seed {s}", opts.work / v / f"seed{s}", scene_dir, job_config(v, s, opts),
             variant_settings(v)["mode"] == "single") for s in opts.seeds for v in opts.variants]
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
              f"sync cost {s['sync_cost_db_mean']:+.2f} ± {s['sync_cost_db_std']:.2f} dB   "
              f"SSIM {s['ssim_mean']:.4f} ± {s['ssim_std']:.4f}   "
              f"LPIPS-VGG {s['lpips_vgg_mean']:.4f} ± {s['lpips_vgg_std']:.4f}   "
              f"(colour-corrected PSNR {s['psnr_cc_mean']:.2f} ± {s['psnr_cc_std']:.2f}, "
              f"n={s['seeds']})")
    print("\npaired differences (test PSNR):")
    for a, b in (("momentum", "shared"), ("full", "independent"),
                 ("full", "single"), ("full", "momentum"), ("shared", "independent"),
                 ("control", "shared"), *(pair.split(":", 1) for pair in opts.compare)):
        if {a, b} <= set(rows.variant):
            print("  " + paired(rows, a, b))
    print(f"\nbenchmark wall time {time.perf_counter() - start:.0f} s "
          f"({opts.workers} workers, 1 thread each)")


if __name__ == "__main__":
    main()
