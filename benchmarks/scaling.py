"""Cost as the city grows: wall time, peak memory and disk of every workflow stage.

Synthetic cities of 4, 16 and 64 blocks (one 60 m block of city per block of the partition,
cameras, sparse points and buildings in proportion to area) go through the verbs the workflow's
rules call, each job its own process: `mgs configure`, `synth`, `partition` (aabb: the city's
SfM footprint; a 2N x 2N grid in contracted space, where the aabb fills the middle half, so N x N
cells tile the city and the empty outer ring is merged away), `init`, per round `train-block`
per block then `sync`, `finalize-block` per block, `merge`, `evaluate`. A job's peak RSS is its
own (os.wait4's rusage), so parallel jobs do not mix. Per city and stage it prints and writes
(scaling.csv, one row per blocks x stage): wall time of the stage, mean and max seconds of one
job, the stage's largest peak RSS, the run folder's disk after the stage, and the merged model's
anchors and splats.ply size.
Then the least-squares slopes of log(cost) against log(blocks) (and against log(anchors) for
merge and evaluate), checked against the goals: a block job's peak RSS flat, sync at most
linear in blocks and seconds long, merge and evaluate at most linear in anchors.
`mgs report --scaling WORK/scaling.csv` draws the log-log figure.

`--ratio`: peak RSS of one block job of a 4-block partition against `mgs train` on the whole scene
(same steps) on a city large enough that images and anchors outweigh the runtime's floor,
with what each job holds (images, anchor parameters with their gradients and Adam moments, the
floor of a process that only imports the training code).

    python benchmarks/scaling.py [--work results/scaling] [--blocks 4 16 64] [--workers 2]
    python benchmarks/scaling.py --ratio [--work results/scaling]

Finished cities (WORK/blocks_N/rows.csv) are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

CELL = 60.0  # metres of city per block
PER_BLOCK = dict(views=10, points=400, buildings=4)  # buildings: one per 30 m lot
SCENE = dict(seed=0, width=64, height=48, supersample=1, altitude=90.0, shadows=False)
TRAIN = dict(voxel_size=0.5, start_stat=5, update_from=10, update_interval=10,
             densify_grad_threshold=0.0008, eval_interval=100_000,
             checkpoint_interval=100_000, threads=1)
STAGES = ("synth", "partition", "init", "train-block", "sync", "finalize", "merge", "evaluate")
JOB_ENV = dict(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")


# ------------------------------------------------------------------ jobs

def run_job(args: list[str], log_path: Path) -> tuple[float, float, float]:
    """`mgs ARGS` in its own process: (wall seconds, CPU seconds, peak RSS in MB) of that
    process; CPU seconds are the steadier cost on a shared machine."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        peak_file = log_path.with_suffix(".peak")
        proc = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, str(peak_file), *args],
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **JOB_ENV))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"`mgs {' '.join(args)}` failed ({proc.returncode}); see {log_path}")
    return seconds, usage.ru_utime + usage.ru_stime, float(peak_file.read_text())


# Writes the process's own high-water mark (VmHWM, MB) to the file argv[1] as it exits. Not
# ru_maxrss: Linux carries the parent's high-water mark at the fork into the child's, so a
# benchmark that has loaded a scene would read its own peak into every job it starts.
PEAK_PREAMBLE = """
import atexit, sys
peak_file = sys.argv[1]
def write_peak():
    with open("/proc/self/status") as status:
        kib = next(line for line in status if line.startswith("VmHWM")).split()[1]
    with open(peak_file, "w") as out:
        out.write(str(int(kib) / 1024))
atexit.register(write_peak)
"""
PEAK_WRAPPER = PEAK_PREAMBLE + """
import runpy
sys.argv = ["mgs", *sys.argv[2:]]
runpy.run_module("mgs.cli", run_name="__main__")
"""


def run_stage(name: str, jobs: list[tuple[list[str], Path]], workers: int,
              job_log: Path | None = None) -> dict:
    """The jobs of one stage, `workers` at once; each finished job is appended to `job_log`
    (so a city stopped half-way still tells what its jobs cost)."""

    def one(job):
        seconds, cpu, rss = run_job(*job)
        if job_log is not None:
            with open(job_log, "a") as handle:
                handle.write(f"{name}\t{' '.join(job[0][:1] + job[0][3:])}\t{seconds:.2f}\t"
                             f"{cpu:.2f}\t{rss:.1f}\n")
        return seconds, cpu, rss

    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        results = list(pool.map(one, jobs))
    seconds, cpu, rss = zip(*results)
    return {"stage": name, "jobs": len(jobs), "seconds": time.perf_counter() - start,
            "job_seconds_mean": float(np.mean(seconds)), "job_seconds_max": max(seconds),
            "cpu_seconds": sum(cpu), "job_cpu_mean": float(np.mean(cpu)),
            "peak_rss_mb": max(rss)}


def folder_mb(path: Path) -> float:
    """Disk of a folder (allocated blocks; links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total / 2**20


def ply_vertices(path: Path) -> int:
    with open(path, "rb") as handle:
        for line in handle:
            if line.startswith(b"element vertex"):
                return int(line.split()[-1])
            if line.strip() == b"end_header":
                break
    raise SystemExit(f"{path}: no vertex count in its PLY header")


# ------------------------------------------------------------------ one city

def city_settings(blocks: int, opts) -> dict:
    """Workflow scene settings (what `mgs configure --settings` takes) for a city of `blocks`
    blocks: side sqrt(blocks) x 60 m, lawnmower rows ~25-32 m apart at every size."""
    side = math.isqrt(blocks)
    if side * side != blocks:
        raise SystemExit(f"--blocks {blocks}: the benchmark's cities are square (4, 16, 64, ...)")
    steps = opts.rounds * opts.iterations + opts.final_iterations
    synthetic = dict(SCENE, extent=CELL * side, num_buildings=PER_BLOCK["buildings"] * blocks,
                     num_passes=2 * side, num_views=PER_BLOCK["views"] * blocks,
                     num_points=PER_BLOCK["points"] * blocks)
    return {"name": f"blocks_{blocks}", "source": "synthetic", "synthetic": synthetic,
            # the grid is laid over contracted space, where the aabb fills the middle half: a
            # 2N x 2N grid puts N x N cells on the aabb and leaves the outer ring empty (merged);
            # the aabb itself is the city's data footprint (`data_aabb`, set after synth)
            "partition": dict(block_dim=[2 * side, 2 * side, 1], aabb="scene", min_cameras=2),
            "train": dict(TRAIN, iterations=steps, lr_max_steps=steps,
                          update_until=steps // 2),
            "momentum": dict(mode="full", rounds=opts.rounds, iterations_per_round=opts.iterations,
                             final_iterations=opts.final_iterations, sigma=1.0)}


def data_aabb(scene_dir: Path) -> list[float]:
    """The box of every SfM point (x, y) from the ground to above the cameras (z): the inner
    cells tile what the views saw, and camera centres stay uncontracted."""
    from mgs.scene import load_scene

    scene = load_scene(scene_dir)
    lo, hi = scene.points_xyz.min(axis=0), scene.points_xyz.max(axis=0)
    top = max(float(camera.center[2]) for camera in scene.train_cameras()) + 1.0
    return [float(lo[0]), float(lo[1]), min(float(lo[2]), 0.0), float(hi[0]), float(hi[1]), top]


def print_blocks(blocks: int, run: Path) -> list[int]:
    """The partition's block ids, with cameras and own SfM points per block printed."""
    from mgs.partition import load_partition
    from mgs.scene import load_scene

    partition = load_partition(run / "partition" / "partition.json")
    points = load_scene(run / "scene").points_xyz
    own = np.bincount(partition.block_of_points(points), minlength=partition.num_blocks)
    cameras = [len(block.train_cameras) for block in partition.blocks]
    print(f"  blocks {blocks:3d} partition: {partition.num_blocks} blocks; train cameras per "
          f"block {min(cameras)}-{max(cameras)} (median {np.median(cameras):.0f}), own SfM "
          f"points {own.min()}-{own.max()} (median {np.median(own):.0f})", flush=True)
    if partition.num_blocks != blocks:
        print(f"  note: {partition.num_blocks} blocks, not {blocks}: cells with too few cameras "
              "were merged", flush=True)
    return [int(block.id) for block in partition.blocks]


def configure(run: Path, settings: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    run_job(["configure", "--settings", json.dumps(settings), "--out", str(run / "config.yaml")],
            run / "logs" / "configure.log")


def run_city(blocks: int, opts) -> pd.DataFrame:
    """Every stage of one city; rows as in the module docstring (reused when finished)."""
    city = opts.work / f"blocks_{blocks}"
    rows_path = city / "rows.csv"
    if rows_path.is_file():
        print(f"blocks {blocks}: finished earlier, reusing {rows_path}", flush=True)
        return pd.read_csv(rows_path)
    shutil.rmtree(city, ignore_errors=True)  # a half-run city starts over
    run, logs = city / "run", city / "run" / "logs"
    configure(run, city_settings(blocks, opts))
    config = str(run / "config.yaml")
    rows = []

    job_log = city / "jobs.tsv"
    job_log.write_text("stage\tjob\tseconds\tcpu_seconds\tpeak_rss_mb\n")

    def stage(name, jobs):
        row = run_stage(name, jobs, opts.workers, job_log)
        row["disk_mb"] = folder_mb(run)
        rows.append(row)
        print(f"  blocks {blocks:3d} {name:12s} {row['jobs']:4d} jobs  {row['seconds']:7.1f} s"
              f"  (job mean {row['job_seconds_mean']:5.1f} s, max {row['job_seconds_max']:5.1f},"
              f" CPU {row['job_cpu_mean']:5.1f} s)"
              f"  peak RSS {row['peak_rss_mb']:6.0f} MB  disk {row['disk_mb']:7.1f} MB",
              flush=True)
        return row

    def merged(name, rows_of_stage):
        """Rounds of one stage as one row: summed wall time, over all jobs mean/max/peak."""
        total = sum(r["jobs"] for r in rows_of_stage)
        return {"stage": name, "jobs": total,
                "seconds": sum(r["seconds"] for r in rows_of_stage),
                "job_seconds_mean": sum(r["job_seconds_mean"] * r["jobs"]
                                        for r in rows_of_stage) / total,
                "job_seconds_max": max(r["job_seconds_max"] for r in rows_of_stage),
                "cpu_seconds": sum(r["cpu_seconds"] for r in rows_of_stage),
                "job_cpu_mean": sum(r["cpu_seconds"] for r in rows_of_stage) / total,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rows_of_stage),
                "disk_mb": rows_of_stage[-1]["disk_mb"]}

    print(f"blocks {blocks}: city {CELL * math.isqrt(blocks):.0f} m wide", flush=True)
    stage("synth", [(["synth", str(run / "scene"), "--config", config], logs / "synth.log")])
    settings = city_settings(blocks, opts)
    settings["partition"]["aabb"] = data_aabb(run / "scene")
    configure(run, settings)
    stage("partition", [(["partition", "--scene", str(run / "scene"), "--out",
                          str(run / "partition"), "--config", config], logs / "partition.log")])
    ids = print_blocks(blocks, run)
    stage("init", [(["init", "--run", str(run)], logs / "init.log")])
    rounds_rows = {"train-block": [], "sync": []}
    for r in range(1, opts.rounds + 1):
        rounds_rows["train-block"].append(stage(f"train-block r{r}", [
            (["train-block", "--run", str(run), "--round", str(r), "--block", str(b)],
             logs / f"train_block_r{r}_b{b}.log") for b in ids]))
        rounds_rows["sync"].append(stage(f"sync r{r}", [
            (["sync", "--run", str(run), "--round", str(r)], logs / f"sync_r{r}.log")]))
    stage("finalize", [(["finalize-block", "--run", str(run), "--block", str(b)],
                        logs / f"finalize_b{b}.log") for b in ids])
    stage("merge", [(["merge", "--run", str(run)], logs / "merge.log")])
    stage("evaluate", [(["evaluate", "--run", str(run), "--warmup", "0"],
                        logs / "evaluate.log")])
    by_name = {r["stage"]: r for r in rows}
    table = [by_name[s] if s in by_name else merged(s, rounds_rows[s]) for s in STAGES]
    scene = json.loads((run / "scene" / "scene.json").read_text())
    frame = pd.DataFrame(table)
    frame.insert(0, "blocks", len(ids))
    frame["cameras"] = len(scene["train_names"]) + len(scene["test_names"])
    frame["anchors"] = ply_vertices(run / "model" / "anchors.ply")
    frame["ply_mb"] = (run / "model" / "splats.ply").stat().st_size / 2**20
    if not opts.keep:
        for heavy in ("rounds", "final"):
            shutil.rmtree(run / heavy, ignore_errors=True)
    frame.to_csv(rows_path, index=False, float_format="%.6g")
    return frame


# ------------------------------------------------------------------ exponents and goals

def slope(x, y) -> float:
    """Least-squares slope of log(y) against log(x): the cost's growth exponent."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0)
    if len(np.unique(x[keep])) < 2:
        return math.nan
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def exponents(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name, rows_of_stage in frame.groupby("stage", sort=False):
        rows.append({"stage": name,
                     "seconds_vs_blocks": slope(rows_of_stage["blocks"], rows_of_stage["seconds"]),
                     "job_seconds_vs_blocks": slope(rows_of_stage["blocks"],
                                                    rows_of_stage["job_seconds_mean"]),
                     "cpu_vs_blocks": slope(rows_of_stage["blocks"],
                                            rows_of_stage["cpu_seconds"]),
                     "rss_vs_blocks": slope(rows_of_stage["blocks"], rows_of_stage["peak_rss_mb"]),
                     "seconds_vs_anchors": slope(rows_of_stage["anchors"],
                                                 rows_of_stage["seconds"]),
                     "cpu_vs_anchors": slope(rows_of_stage["anchors"],
                                             rows_of_stage["cpu_seconds"]),
                     "rss_vs_anchors": slope(rows_of_stage["anchors"],
                                             rows_of_stage["peak_rss_mb"])})
    return pd.DataFrame(rows)


def goals(frame: pd.DataFrame, fits: pd.DataFrame) -> list[tuple[str, bool]]:
    fit = fits.set_index("stage")
    sync = frame[frame.stage == "sync"]
    block = frame[frame.stage == "train-block"]
    return [
        (f"train-block peak RSS flat: exponent {fit.loc['train-block', 'rss_vs_blocks']:+.3f} "
         f"(|e| < 0.1; {block.peak_rss_mb.min():.0f}-{block.peak_rss_mb.max():.0f} MB)",
         abs(fit.loc["train-block", "rss_vs_blocks"]) < 0.1),
        (f"finalize peak RSS flat: exponent {fit.loc['finalize', 'rss_vs_blocks']:+.3f}",
         abs(fit.loc["finalize", "rss_vs_blocks"]) < 0.1),
        # seconds long judged by CPU time: a loaded shared machine stretches the wall time
        (f"sync at most linear in blocks: CPU exponent {fit.loc['sync', 'cpu_vs_blocks']:+.3f}"
         f" (wall {fit.loc['sync', 'job_seconds_vs_blocks']:+.3f}), longest sync "
         f"{sync.job_cpu_mean.max():.1f} s CPU ({sync.job_seconds_max.max():.1f} s wall)",
         fit.loc["sync", "cpu_vs_blocks"] <= 1.0 and sync.job_cpu_mean.max() < 30),
        *[(f"{s} at most linear in anchors: CPU exponent {fit.loc[s, 'cpu_vs_anchors']:+.3f} "
           f"(wall {fit.loc[s, 'seconds_vs_anchors']:+.3f}), RSS "
           f"{fit.loc[s, 'rss_vs_anchors']:+.3f}",
           fit.loc[s, "cpu_vs_anchors"] <= 1.0 and fit.loc[s, "rss_vs_anchors"] <= 1.0)
          for s in ("merge", "evaluate")],
    ]


def report(frame: pd.DataFrame) -> None:
    shown = frame[["blocks", "stage", "jobs", "seconds", "job_seconds_mean", "cpu_seconds",
                   "peak_rss_mb", "disk_mb", "anchors", "ply_mb"]]
    print("\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    if frame.blocks.nunique() < 2:
        print("\none city only: no exponents")
        return
    fits = exponents(frame)
    print("\nexponents (least-squares slope of log cost):")
    print(fits.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    print()
    for text, met in goals(frame, fits):
        print(f"[{'met' if met else 'MISSED'}] {text}")


# ------------------------------------------------------------------ block vs single model

RATIO_SCENE = dict(seed=0, width=256, height=192, supersample=1, shadows=False, altitude=50.0,
                   max_height=20.0, extent=480.0, num_buildings=64, num_passes=16,
                   num_views=600, num_points=1_000_000)
RATIO_TRAIN = dict(voxel_size=0.02, start_stat=5, update_from=1000, update_until=1000,
                   eval_interval=100_000, checkpoint_interval=100_000, threads=1)


def ratio_scene(scale: float) -> dict:
    """RATIO_SCENE widened `scale` times at the same density: what a view sees stays the same,
    so only what grows with the city (anchors, images) grows."""
    area = scale * scale
    return dict(RATIO_SCENE, extent=RATIO_SCENE["extent"] * scale,
                num_passes=round(RATIO_SCENE["num_passes"] * scale),
                **{key: round(RATIO_SCENE[key] * area)
                   for key in ("num_buildings", "num_views", "num_points")})


def tensor_mb(tensors: dict) -> float:
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def ratio(opts) -> None:
    """The largest block job of a 4-block partition against the whole-scene job, same steps.

    Each job reports its own high-water mark (see PEAK_WRAPPER)."""
    work = opts.work / "ratio"
    run, logs = work / "run", work / "run" / "logs"
    steps = opts.ratio_steps
    scene_settings = ratio_scene(opts.ratio_scale)
    # the 4-block city's partition (see city_settings): a 4x4 grid whose inner 2x2 cells tile
    # the data footprint, so the margin is a quarter of a block's width, not of half the
    # contracted space (where a 2x2 grid's cells also hold the unbounded outside)
    settings = {"name": "ratio", "source": "synthetic", "synthetic": scene_settings,
                "partition": dict(block_dim=[4, 4, 1], aabb="scene", min_cameras=2),
                "train": dict(RATIO_TRAIN, iterations=steps, lr_max_steps=steps),
                "momentum": dict(mode="full", rounds=1, iterations_per_round=steps,
                                 final_iterations=0)}
    if opts.margin is not None:
        settings["partition"]["margin"] = opts.margin
    config = str(run / "config.yaml")
    # each step's output is kept: a rerun resumes after the last finished one
    if not (run / "scene" / "scene.json").is_file():
        configure(run, settings)
        print(f"ratio city: rendering {scene_settings['num_views']} views", flush=True)
        run_job(["synth", str(run / "scene"), "--config", config], logs / "synth.log")
    if not (run / "partition" / "partition.json").is_file():
        settings["partition"]["aabb"] = data_aabb(run / "scene")
        configure(run, settings)
        run_job(["partition", "--scene", str(run / "scene"), "--out", str(run / "partition"),
                 "--config", config], logs / "partition.log")
    if not (run / "rounds" / "0" / "shared.pt").is_file():
        seconds, _, init_rss = run_job(["init", "--run", str(run)], logs / "init.log")
        print(f"init: {seconds:.0f} s, peak RSS {init_rss:.0f} MB", flush=True)
    print_blocks(4, run)
    partition = json.loads((run / "partition" / "partition.json").read_text())
    image_mb = RATIO_SCENE["width"] * RATIO_SCENE["height"] * 3 / 2**20  # uint8 RGB
    # the block with the most SfM points in its region holds the most anchors
    largest = max(partition["blocks"], key=lambda block: block["points_with_margin"])["id"]
    floor = run_job_python("import torch, numba, mgs.blocks, mgs.training_loop, mgs.render.fused",
                           logs / "floor.log")
    print(f"training block {largest} and the whole scene, {steps} steps each", flush=True)
    _, _, block_rss = run_job(
        ["train-block", "--run", str(run), "--round", "1", "--block", str(largest)],
        logs / "train_block.log")
    single_peak = logs / "single.peak"  # the whole-scene job does not depend on the partition
    if (work / "single" / "checkpoint.pt").is_file() and single_peak.is_file():
        single_rss = float(single_peak.read_text())
    else:
        _, _, single_rss = run_job(["train", "--scene", str(run / "scene"), "--out",
                                    str(work / "single"), "--config", config,
                                    "--iterations", str(steps)], logs / "single.log")

    import torch

    rows = {}
    for block in partition["blocks"]:
        b = int(block["id"])
        state = torch.load(run / "rounds" / "0" / f"block_{b}.pt", map_location="cpu",
                           weights_only=True)
        views = len(block["train_cameras"]) + len(block["validation_cameras"])
        rows[f"block {b}"] = dict(views=views, anchors=int(state["anchors"]["xyz"].shape[0]),
                                  params_mb=tensor_mb(state["anchors"]))
    rows[f"block {largest}"]["rss"] = block_rss
    scene = json.loads((run / "scene" / "scene.json").read_text())
    anchors = torch.load(work / "single" / "checkpoint.pt", map_location="cpu",
                         weights_only=False)["anchors"]
    rows["single"] = dict(views=len(scene["train_names"]) + len(scene["test_names"]),
                          anchors=int(anchors["xyz"].shape[0]), params_mb=tensor_mb(anchors),
                          rss=single_rss)
    print(f"\nratio city: {scene_settings['extent']:.0f} m, {rows['single']['views']} views of "
          f"{RATIO_SCENE['width']}x{RATIO_SCENE['height']}, {scene_settings['num_points']} points, "
          f"{steps} steps; runtime floor (imports only) {floor:.0f} MB")
    print(f"{'job':>8s} {'views':>6s} {'images MB':>10s} {'anchors':>8s} {'share':>6s} "
          f"{'params MB':>10s} {'x4 (grad, Adam)':>16s} {'peak RSS MB':>12s}")
    for name, r in rows.items():
        rss = f"{r['rss']:12.0f}" if "rss" in r else f"{'(not run)':>12s}"
        share = r["anchors"] / rows["single"]["anchors"]  # the margin's cost: > 1/4 each
        print(f"{name:>8s} {r['views']:6d} {r['views'] * image_mb:10.0f} {r['anchors']:8d} "
              f"{share:6.2f} {r['params_mb']:10.1f} {4 * r['params_mb']:16.0f} {rss}")
    print(f"\nblock / single peak RSS: {block_rss:.0f} / {single_rss:.0f} MB = "
          f"{block_rss / single_rss:.2f}x; goal <= 0.45x: "
          f"{'met' if block_rss / single_rss <= 0.45 else 'MISSED'}")
    print(f"above the import floor: {block_rss - floor:.0f} vs {single_rss - floor:.0f} MB = "
          f"{(block_rss - floor) / (single_rss - floor):.2f}x")


def run_job_python(code: str, log_path: Path) -> float:
    """Peak RSS (MB) of a Python process that runs `code` only (the runtime floor)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak_file = log_path.with_suffix(".peak")
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-c", PEAK_PREAMBLE + code, str(peak_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **JOB_ENV))
    if done.returncode != 0:
        raise SystemExit(f"python -c {code!r} failed; see {log_path}")
    return float(peak_file.read_text())


# ------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/scaling"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--workers", type=int, default=2, help="block jobs at once")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=10, help="steps per block per round")
    parser.add_argument("--final-iterations", type=int, default=5)
    parser.add_argument("--keep", action="store_true",
                        help="keep rounds/ and final/ of finished cities (removed by default)")
    parser.add_argument("--ratio", action="store_true",
                        help="block job vs whole-scene job peak RSS instead of the cities")
    parser.add_argument("--ratio-steps", type=int, default=10)
    parser.add_argument("--ratio-scale", type=float, default=1.0,
                        help="--ratio: the city's width times this (views, points and "
                             "buildings in proportion to its area; the density stays)")
    parser.add_argument("--margin", type=lambda v: v if v == "all" else float(v), default=None,
                        help="--ratio: the partition's margin, a number or all (default: the "
                             "config's, 0.25)")
    return parser


def main(argv: list[str] | None = None) -> None:
    opts = build_parser().parse_args(argv)
    opts.work.mkdir(parents=True, exist_ok=True)
    if opts.ratio:
        ratio(opts)
        return
    start = time.perf_counter()
    for blocks in sorted(set(opts.blocks)):
        run_city(blocks, opts)
    # every finished city, also those of earlier invocations (--blocks 64 after --blocks 4 16)
    found = sorted(opts.work.glob("blocks_*/rows.csv"), key=lambda p: int(p.parent.name[7:]))
    frame = pd.concat([pd.read_csv(p) for p in found], ignore_index=True)
    out = opts.work / "scaling.csv"
    frame.to_csv(out, index=False, float_format="%.6g")
    report(frame)
    print(f"\nwrote {out} ({time.perf_counter() - start:.0f} s); figure: "
          f"mgs report --scaling {out} --out REPORT_DIR")


if __name__ == "__main__":
    main()
