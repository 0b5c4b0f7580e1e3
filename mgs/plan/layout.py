"""The run folder's files as the workflow names them (paths relative to the repository root)."""

from __future__ import annotations

import functools
import json
import os

from mgs.errors import InputError

RESULTS = "results"

# what `mgs report` reads of a run, besides its rounds' decoder summaries and sync tables
REPORT_FILES = [
    ("eval", "metrics.json"),
    ("eval", "per_view.csv"),
    ("config.yaml",),
    ("partition", "partition.json"),
    ("partition", "partition.png"),
    ("model", "export.csv"),
]


def run_path(scene: str, *parts) -> str:
    return "/".join([f"{RESULTS}/{scene}", *map(str, parts)])


def round_state(scene: str, r: int, block=None, name: str = "block") -> str:
    """Round r's shared state (block None), block state or decoder summary (name 'decoder');
    round 0 is init's folder."""
    if r == 0:
        return run_path(scene, "rounds", 0)
    name = "shared.pt" if block is None else f"{name}_{block}.pt"
    return run_path(scene, "rounds", r, name)


def final_block(scene: str, b, rounds: int, final_iterations: int) -> str:
    """A block as merged: finalized, or the last round's when final_iterations is 0."""
    if final_iterations == 0:
        return round_state(scene, rounds, b)
    return run_path(scene, "final", f"block_{b}.pt")


def report_files(scene: str, rounds: int, block_ids, final_iterations: int) -> list[str]:
    """Every file `mgs report` reads of one run."""
    files = [run_path(scene, *parts) for parts in REPORT_FILES]
    files += [round_state(scene, r, b, "decoder") for r in range(1, rounds + 1) for b in block_ids]
    files += [run_path(scene, "rounds", r, "sync.tsv") for r in range(1, rounds + 1)]
    if final_iterations:
        files += [final_block(scene, b, rounds, final_iterations) for b in block_ids]
    return files


@functools.lru_cache(maxsize=None)
def _block_ids(path: str, mtime_ns: int) -> list[int]:
    with open(path) as handle:
        ids = [int(block["id"]) for block in json.load(handle)["blocks"]]
    if not ids:
        raise InputError(f"{path} lists no blocks; check the partition settings")
    return ids


def block_ids(path: str) -> list[int]:
    """The block ids of partition.json at `path`, read once per version of the file."""
    return _block_ids(path, os.stat(path).st_mtime_ns)
