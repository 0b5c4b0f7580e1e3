"""The config values that shape each stage's outputs, and the dataset fingerprint: the digests the
workflow's rules carry as params, so a change reruns exactly the jobs it concerns."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

# what merges wrote before the export section existed: those values leave a run's digest as it
# was (its PLY was made so); anything else, the photo refinement's default included, reruns it
EXPORT_BEFORE = {"sh_degree": 1, "refine_steps": 600, "photo_weight": 0.0}
# keys that change how fast a job runs, not what it writes: never a reason to rerun
COMPUTE_KEYS = {
    "train": ("device", "backend", "threads", "checkpoint_interval"),
    "sfm": ("threads",),
}
# files of a dataset folder that shape a scene: images, COLMAP models, transforms.json, points
DATASET_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bin", ".txt", ".npy", ".json",
                    ".ply"}


def may_use_gsplat(scene: dict) -> bool:
    """Whether the scene's GPU jobs may render with gsplat (so need its built extension)."""
    train = scene["train"]
    return train["backend"] != "torch" and train["device"] != "cpu"


def digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _section(scene: dict, name: str, drop=()) -> dict:
    drop = set(drop) | set(COMPUTE_KEYS.get(name, ()))
    return {k: v for k, v in scene[name].items() if k not in drop}


def _inert_momentum_keys(momentum: dict) -> tuple[str, ...]:
    """Keys that shape nothing at their values: the per-step teacher and averaging sync of
    runs made before `teacher` and `sync` existed keep their digests, so nothing reruns; the
    teacher's keys in modes without a teacher."""
    inert = {"teacher": "step", "sync": "average"}
    keys = [k for k, value in inert.items() if momentum.get(k, value) == value]
    has_teacher = momentum.get("mode", "full") in ("momentum", "full")
    if not has_teacher and "teacher" not in keys:  # no teacher in this mode: nothing to shape
        keys.append("teacher")
    if not has_teacher or momentum.get("teacher") != "global-ema":
        keys.append("teacher_sync_momentum")
    return tuple(keys)


def stage_keys(stage: str, scene: dict) -> dict:
    """The config values that shape a stage's outputs (compute keys left out)."""
    # not the dataset's path: its content fingerprint (folder_manifest) is the trigger, so a
    # copy or a move of the data reruns nothing
    base = {k: scene[k] for k in ("source", "resolution", "up")}
    if stage == "scene":
        return dict(base, synthetic=scene["synthetic"], sfm=_section(scene, "sfm"))
    if stage == "coarse":
        return dict(base, train=_section(scene, "train"), steps=scene["coarse_iterations"])
    if stage == "partition":
        return _section(scene, "partition", drop=("device",))
    blocks = {
        "train": _section(scene, "train"),
        "momentum": _section(scene, "momentum",
                             drop=("rounds", "final_iterations", "keep_rounds",
                                   *_inert_momentum_keys(scene["momentum"]))),
    }
    if stage == "blocks":  # init, train_block, sync: rounds may grow without a rerun
        return blocks
    m = scene["momentum"]
    final = dict(blocks, rounds=m["rounds"], final_iterations=m["final_iterations"])
    if stage == "merge":
        export = {k: v for k, v in scene.get("export", {}).items() if EXPORT_BEFORE.get(k) != v}
        return dict(final, export=export) if export else final
    return final


def configure_settings(scene: dict, name: str, coarse: str | None = None) -> str:
    """The scene's validated settings as JSON: what `mgs configure` writes to config.yaml."""
    # a copy, without what only the scheduler reads (cluster requests)
    scene = json.loads(json.dumps({k: v for k, v in scene.items() if k != "cluster"}))
    if coarse is not None:
        scene["partition"]["coarse"] = coarse
    return json.dumps(dict(scene, name=name), sort_keys=True, separators=(",", ":"))


DIGEST_CACHE = "results/.dataset_digests.json"  # path -> (size, mtime, content digest)


@functools.lru_cache(maxsize=None)
def folder_manifest(path: str, cache: str | None = DIGEST_CACHE) -> str:
    """Digest of a dataset folder's image and model files: names relative to the folder, sizes
    and content hashes, so a copy, a move or a `touch` changes nothing. A file's hash is cached
    by its absolute path, size and mtime in `cache` (None: no cache), so an unchanged file is
    read once."""
    from tqdm import tqdm

    from mgs.images import file_digest

    known, files = _load_digests(cache), []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.abspath(os.path.join(root, name)) for name in sorted(names)
                  if not name.startswith(".") and Path(name).suffix.lower() in DATASET_SUFFIXES]
    stamps = {full: [os.stat(full).st_size, os.stat(full).st_mtime_ns] for full in files}
    fresh = [full for full in files if (known.get(full) or [None, None])[:2] != stamps[full]]
    # a first look at a large dataset reads every image once: show it
    for full in tqdm(fresh, desc=f"fingerprinting {path}", unit="file", disable=len(fresh) < 50):
        known[full] = [*stamps[full], file_digest(Path(full))]
    if fresh and cache:
        _save_digests(cache, known)
    root = os.path.abspath(path)
    return digest([f"{os.path.relpath(full, root)}\t{stamps[full][0]}\t{known[full][2]}"
                   for full in files])


def _load_digests(cache: str | None) -> dict:
    if not cache or not os.path.isfile(cache):
        return {}
    try:
        with open(cache) as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a re-read


def _save_digests(cache: str, known: dict) -> None:
    from mgs.atomic import write_text

    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    write_text(cache, json.dumps(known, sort_keys=True))
