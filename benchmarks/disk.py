"""Disk use of a run's rounds, with and without `momentum.keep_rounds`, and a projection to a preset.

Measured on a finished run folder (e.g. results/demo after `make demo`): the bytes of one round of
full block checkpoints (anchors + Adam moments + densification statistics), of the small files every
round keeps (decoder summaries, shared decoder, sync.tsv) and of the merged model's anchors. The run
as it is on disk is the "after"; "before" (every round kept) adds the removed rounds at the size of
a kept one. The projection scales one round to a preset (its rounds and blocks) from the size of its
final model, e.g. the paper's 1.50 GB for Rubble (supplementary Table 11), by the measured ratio of a
block checkpoint to the anchors it holds.

    python benchmarks/disk.py results/demo [--preset config/scenes/rubble.yaml --model-gb 1.50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mgs.momentum import MomentumConfig


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def measure(run: Path) -> dict:
    momentum = yaml.safe_load((run / "config.yaml").read_text()).get("momentum") or {}
    rounds = int(momentum.get("rounds", MomentumConfig.rounds))
    rounds_dir = run / "rounds"
    full = {int(d.name): _bytes(d.glob("block_*.pt")) for d in rounds_dir.glob("*")
            if d.name.isdigit()}
    kept = {r: b for r, b in full.items() if b}
    if not kept:
        raise SystemExit(f"{run}: no full block checkpoints under rounds/ (not a trained run?)")
    per_round = max(kept.values())  # later rounds hold more anchors: the conservative size
    small = _bytes(p for d in rounds_dir.glob("*") for p in d.glob("*")
                   if not p.name.startswith("block_"))
    anchors_ply = _bytes([run / "model" / "anchors.ply"])
    total = _bytes(run.rglob("*"))
    removed = (rounds + 1) - len(kept)  # round 0 is init's
    return {"rounds": rounds, "kept_rounds": sorted(kept), "round_bytes": per_round,
            "small_bytes": small, "anchors_ply": anchors_ply, "run_bytes": total,
            "run_bytes_all_kept": total + removed * per_round}


def project(measured: dict, preset: Path, model_gb: float) -> dict:
    scenes = yaml.safe_load(preset.read_text())["scenes"]
    name, scene = next(iter(scenes.items()))
    momentum = scene.get("momentum") or {}
    rounds = int(momentum.get("rounds", MomentumConfig.rounds))
    keep = int(momentum.get("keep_rounds", MomentumConfig.keep_rounds))
    # a block checkpoint per byte of anchors, as measured; the preset's model is all its blocks
    ratio = measured["round_bytes"] / max(measured["anchors_ply"], 1)
    round_gb = model_gb * ratio
    kept_rounds = rounds + 1 if keep == 0 else min(keep, rounds + 1)
    return {"scene": name, "rounds": rounds, "keep_rounds": keep, "ratio": ratio,
            "round_gb": round_gb, "all_kept_gb": (rounds + 1) * round_gb,
            "bounded_gb": kept_rounds * round_gb}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--preset", type=Path, default=Path("config/scenes/rubble.yaml"))
    parser.add_argument("--model-gb", type=float, default=1.50,
                        help="the preset's final model size (paper supp. Table 11: Rubble 1.50)")
    args = parser.parse_args(argv)
    m = measure(args.run)
    mb = 1e6
    print(f"{args.run}: {m['rounds']} rounds, full block checkpoints kept for rounds "
          f"{m['kept_rounds']}; one round of them {m['round_bytes'] / mb:.1f} MB, every round's "
          f"small files {m['small_bytes'] / mb:.1f} MB, anchors.ply {m['anchors_ply'] / mb:.1f} MB")
    print(f"run folder: {m['run_bytes'] / mb:.1f} MB now; {m['run_bytes_all_kept'] / mb:.1f} MB "
          "with every round kept")
    p = project(m, args.preset, args.model_gb)
    print(f"{p['scene']} projection ({p['rounds']} rounds, keep_rounds {p['keep_rounds']}, "
          f"block checkpoint = {p['ratio']:.1f} x its anchors): one round {p['round_gb']:.1f} GB; "
          f"every round kept {p['all_kept_gb']:.0f} GB, bounded {p['bounded_gb']:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
