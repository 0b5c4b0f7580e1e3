"""The run folder's files, named once: the workflow's rules declare them and the verbs open them
through these names (paths relative to the run folder, or to the repository root for the rules)."""

from __future__ import annotations

import functools
import json
import os
import string

from mgs.errors import InputError

RESULTS = "results"

# name -> path inside a run folder; {r} round, {b} block (left as wildcards where not given)
FILES = {
    "config": "config.yaml",
    "scene": "scene/scene.json",
    "partition": "partition/partition.json",
    "partition_table": "partition/partition.tsv",
    "partition_plot": "partition/partition.png",
    "coarse": "coarse/checkpoint.pt",
    "coarse_work": "coarse/partial",  # the coarse job's periodic checkpoints (not its output)
    "init": "rounds/0",
    "block": "rounds/{r}/block_{b}.pt",
    "decoder": "rounds/{r}/decoder_{b}.pt",
    "shared": "rounds/{r}/shared.pt",
    "sync_table": "rounds/{r}/sync.tsv",
    "final": "final/block_{b}.pt",
    "model_decoder": "model/decoder.pt",
    "model_anchors": "model/anchors.ply",
    "splats": "model/splats.ply",
    "splat": "model/splats.splat",
    "export_table": "model/export.csv",
    "metrics": "eval/metrics.json",
    "per_view": "eval/per_view.csv",
}
# each rule's log; a retry reads the failed attempt's (mgs.plan.resources.ran_out)
LOGS = {
    "configure": "logs/configure.log",
    "scene": "logs/scene.log",
    "coarse": "logs/coarse.log",
    "partition": "logs/partition.log",
    "init": "logs/init.log",
    "train_block": "logs/train_block/round_{r}/block_{b}.log",
    "sync": "logs/sync/round_{r}.log",
    "finalize_block": "logs/finalize_block/block_{b}.log",
    "merge": "logs/merge.log",
    "export": "logs/export.log",
    "evaluate": "logs/evaluate.log",
}
# what `mgs report` reads of a run, besides its rounds' decoder summaries and sync tables
REPORT_FILES = ["metrics", "per_view", "config", "partition", "partition_plot", "export_table"]


class _Wildcards(dict):
    def __missing__(self, key):
        return "{" + key + "}"


def file(name: str, **values) -> str:
    """The path of file `name` inside a run folder; unnamed {r}/{b} stay wildcards."""
    return string.Formatter().vformat(FILES[name], (), _Wildcards(values))


def run_log(rule: str, scene: str = "{scene}", **values) -> str:
    """A rule's log, from the repository root (a pattern with the defaults)."""
    path = string.Formatter().vformat(LOGS[rule], (), _Wildcards(values))
    return f"{RESULTS}/{scene}/{path}"


def run_file(name: str, scene: str = "{scene}", **values) -> str:
    """The path of file `name` of scene `scene`, from the repository root (a rule's pattern
    with the defaults)."""
    return f"{RESULTS}/{scene}/{file(name, **values)}"


def run_path(scene: str, *parts) -> str:
    return "/".join([f"{RESULTS}/{scene}", *map(str, parts)])


def round_state(scene: str, r: int, block=None, name: str = "block") -> str:
    """Round r's shared state (block None), block state or decoder summary (name 'decoder');
    round 0 is init's folder."""
    if r == 0:
        return run_file("init", scene)
    return run_file("shared" if block is None else name, scene, r=r, b=block)


def merged_block(b, rounds: int, final_iterations: int) -> str:
    """A block as merged, inside the run folder: finalized, or the last round's when
    final_iterations is 0."""
    if final_iterations == 0:
        return file("block", r=rounds, b=b)
    return file("final", b=b)


def final_block(scene: str, b, rounds: int, final_iterations: int) -> str:
    return f"{RESULTS}/{scene}/{merged_block(b, rounds, final_iterations)}"


def report_files(scene: str, rounds: int, block_ids, final_iterations: int) -> list[str]:
    """Every file `mgs report` reads of one run."""
    files = [run_file(name, scene) for name in REPORT_FILES]
    files += [round_state(scene, r, b, "decoder") for r in range(1, rounds + 1) for b in block_ids]
    files += [run_file("sync_table", scene, r=r) for r in range(1, rounds + 1)]
    if final_iterations:
        files += [final_block(scene, b, rounds, final_iterations) for b in block_ids]
    return files


@functools.lru_cache(maxsize=None)
def _read_json(path: str, mtime_ns: int) -> dict:
    with open(path) as handle:
        return json.load(handle)


def read_json(path: str) -> dict:
    """A small JSON file of a run (scene.json, partition.json), read once per version of it."""
    return _read_json(path, os.stat(path).st_mtime_ns)


def block_ids(path: str) -> list[int]:
    """The block ids of partition.json at `path`."""
    ids = [int(block["id"]) for block in read_json(path)["blocks"]]
    if not ids:
        raise InputError(f"{path} lists no blocks; check the partition settings")
    return ids
