"""Seconds per training step that a finished run measured, beside what the workflow's cluster
requests assume (mgs.plan.resources.STEP_SECONDS: fixed + per megapixel), so the first GPU run
calibrates the model. Reads each round's decoder summaries (the training loop's own clock,
startup and image loading excluded) and the run's config.yaml.

    .venv/bin/python benchmarks/step_time.py results/ci
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from mgs.checkpoint import load_checkpoint
from mgs.plan.resources import STEP_SECONDS, image_mpx


def measure(run: Path) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    steps = config["momentum"]["iterations_per_round"]
    per_step = []
    for path in sorted(run.glob("rounds/*/decoder_*.pt")):
        history = load_checkpoint(path).get("history") or []
        if history and history[-1].get("seconds"):
            per_step.append(history[-1]["seconds"] / steps)
    if not per_step:
        raise SystemExit(f"{run}: no round's decoder summary with timings; run the workflow first")
    scene = dict(config["scene"], synthetic=config["synthetic"], train=config["train"])
    mpx = image_mpx(scene)
    return {"run": str(run), "jobs": len(per_step), "megapixels": round(mpx, 4),
            "measured_s_per_step": round(statistics.median(per_step), 4),
            "model_s_per_step": round(STEP_SECONDS[0] + STEP_SECONDS[1] * mpx, 4),
            "device": config["train"]["device"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (results/<scene>)")
    for run in parser.parse_args().runs:
        row = measure(run)
        print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
