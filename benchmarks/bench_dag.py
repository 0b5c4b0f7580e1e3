"""Time Snakemake's DAG for a big run: 64 blocks x 30 rounds (about 2,000 jobs), dry run.

The partition is a checkpoint, so the benchmark puts a finished run's upstream files in place in a
temporary copy of the workflow: the flat config (`mgs configure`), a stand-in scene.json and a
partition.json with an 8 x 8 x 1 grid of blocks. Then it times `snakemake -n` (DAG building,
checkpoint re-evaluation and the input functions of every job) and prints the job count. Goal:
<= 30 s on 2 CPU cores.

    python benchmarks/bench_dag.py [--blocks-x 8 --blocks-y 8 --rounds 30 --repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("workflow", "config", "profiles", "envs")
SCENE = "big"


def make_config(path: Path, nx: int, ny: int, rounds: int) -> None:
    config = {"scenes": {SCENE: {
        "source": "synthetic",
        "partition": {"block_dim": [nx, ny, 1]},
        "momentum": {"rounds": rounds, "iterations_per_round": 500, "final_iterations": 500},
        "paper": None,
    }}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def make_partition(path: Path, nx: int, ny: int) -> None:
    """A partition.json with nx*ny single-cell blocks (only the block ids matter to the DAG)."""
    blocks = [{"id": b, "cells": [b], "train_cameras": [], "validation_cameras": []}
              for b in range(nx * ny)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format_version": 1, "block_dim": [nx, ny, 1], "blocks": blocks}))


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                          capture_output=True, text=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks-x", type=int, default=8)
    parser.add_argument("--blocks-y", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3, help="timed dry runs (best is reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workflow copy")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mgs-bench-dag-"))
    try:
        for name in WORKFLOW_FILES:
            source = REPO / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
        config = work / "bench.yaml"
        make_config(config, args.blocks_x, args.blocks_y, args.rounds)
        run = work / "results" / SCENE
        # upstream of the checkpoint, oldest first: config.yaml, scene.json, partition.json
        result = snakemake(work, "--cores", "1", f"--configfile={config}",
                           f"results/{SCENE}/config.yaml")
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.05)
        (run / "scene").mkdir(parents=True)
        (run / "scene" / "scene.json").write_text("{}\n")
        time.sleep(0.05)
        make_partition(run / "partition" / "partition.json", args.blocks_x, args.blocks_y)
        for name in ("partition.tsv", "partition.png"):
            (run / "partition" / name).write_text("")

        times, jobs = [], 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = snakemake(work, "-n", "--quiet", "rules", f"--configfile={config}")
            times.append(time.perf_counter() - start)
            if result.returncode != 0:
                print(result.stdout[-2000:], result.stderr[-3000:], file=sys.stderr)
                return 1
            # "--quiet rules" prints the job-stats table: "total  N"
            match = re.search(r"^total\s+(\d+)", result.stdout + result.stderr, re.M)
            jobs = int(match.group(1)) if match else 0
        blocks = args.blocks_x * args.blocks_y
        print(f"{blocks} blocks x {args.rounds} rounds: {jobs} jobs in the dry run")
        print(f"snakemake -n: best {min(times):.1f} s, all {', '.join(f'{t:.1f}' for t in times)} s "
              f"(goal <= 30 s)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
