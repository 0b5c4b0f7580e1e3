# Configuration checks, scene selection and input functions: all the Python of the workflow.
import functools
import hashlib
import json
import os
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from mgs.errors import MgsError
from mgs.validate import check_scene

# ---------------------------------------------------------------- configuration

INGEST_SOURCES = ("colmap", "mill19", "urbanscene3d", "matrixcity")
# keys that change how fast a job runs, not what it writes: never a reason to rerun
COMPUTE_KEYS = {"train": ("device", "backend", "threads", "checkpoint_interval")}


def _check_config():
    """Schema check with defaults filled in; the first error names its key."""
    try:
        validate(config, "../schemas/config.schema.yaml")
    except WorkflowError as exc:
        error = exc.__cause__ or exc.__context__
        if not hasattr(error, "absolute_path"):
            raise
        where = ".".join(str(part) for part in error.absolute_path) or "top level"
        raise WorkflowError(
            f"invalid config at '{where}': {error.message} "
            "(keys and their meaning: workflow/schemas/config.schema.yaml)"
        ) from None
    for name, scene in config["scenes"].items():
        # the checks the mgs verbs run: jsonschema's minimum/maximum let NaN through
        try:
            check_scene(scene, f"scenes.{name}")
        except MgsError as exc:
            raise WorkflowError(
                f"invalid config: {exc} "
                "(keys and their meaning: workflow/schemas/config.schema.yaml)"
            ) from None
        if scene["source"] in ("synthetic", "images") and scene["resolution"] != 1:
            raise WorkflowError(
                f"invalid config at 'scenes.{name}.resolution': {scene['resolution']}; "
                f"{scene['source']} scenes are made at their final size, so resolution "
                "must be 1 (set train.resolution to train on smaller images)"
            )


def _selected_scenes():
    """Scenes defined by --configfile files when there are any, else every scene."""
    names = []
    for path in workflow.overwrite_configfiles or ():
        data = yaml.safe_load(Path(path).read_text()) or {}
        scenes = data.get("scenes") if isinstance(data, dict) else None
        names += [name for name in scenes or {} if name not in names]
    return names or list(config["scenes"])


_check_config()
SCENES = _selected_scenes()


def scene_config(wildcards):
    return config["scenes"][wildcards.scene]


def scene_names_regex(*sources):
    """Regex of the configured scene names with one of `sources` (never matches if none)."""
    names = [n for n, s in config["scenes"].items() if s["source"] in sources]
    return "|".join(names) if names else "(?!x)x"


# ---------------------------------------------------------------- paths

RUN = "results/{scene}"


def run_path(wildcards, *parts):
    return "/".join([RUN.format(scene=wildcards.scene), *map(str, parts)])


def coarse_checkpoint(wildcards):
    """The ssim coarse model: the configured checkpoint, or the one rule coarse trains."""
    partition = scene_config(wildcards)["partition"]
    return partition["coarse"] or run_path(wildcards, "coarse", "checkpoint.pt")


def partition_input(wildcards):
    inputs = {
        "config": ancient(run_path(wildcards, "config.yaml")),
        "scene": run_path(wildcards, "scene", "scene.json"),
    }
    if scene_config(wildcards)["partition"]["assignment"] == "ssim":
        inputs["coarse"] = coarse_checkpoint(wildcards)
    return inputs


def coarse_steps(wildcards):
    return scene_config(wildcards)["coarse_iterations"]


def partition_gpus(wildcards):
    """ssim assignment renders the coarse model (on a GPU when there is one)."""
    return int(scene_config(wildcards)["partition"]["assignment"] == "ssim")


def ingest_source(wildcards):
    return scene_config(wildcards)["path"]


def ingest_dataset(wildcards):
    return scene_config(wildcards)["source"]


def ingest_factor(wildcards):
    return scene_config(wildcards)["resolution"]


def ingest_up(wildcards):
    up = scene_config(wildcards)["up"]
    return f"--up={up}" if up else ""


# ---------------------------------------------------------------- settings and rerun triggers


def configure_settings(wildcards):
    """The scene's validated settings as JSON: what `mgs configure` writes to config.yaml."""
    scene = json.loads(json.dumps(scene_config(wildcards)))  # a copy
    if scene["partition"]["assignment"] == "ssim":
        scene["partition"]["coarse"] = coarse_checkpoint(wildcards)
    return json.dumps(
        dict(scene, name=wildcards.scene), sort_keys=True, separators=(",", ":")
    )


def _section(scene, name, drop=()):
    drop = set(drop) | set(COMPUTE_KEYS.get(name, ()))
    return {k: v for k, v in scene[name].items() if k not in drop}


def _digest(value):
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_keys(stage, scene):
    """The config values that shape a stage's outputs (compute keys left out)."""
    base = {k: scene[k] for k in ("source", "path", "resolution", "up")}
    if stage == "scene":
        return dict(base, synthetic=scene["synthetic"], sfm=scene["sfm"])
    if stage == "coarse":
        return dict(
            base, train=_section(scene, "train"), steps=scene["coarse_iterations"]
        )
    if stage == "partition":
        return _section(scene, "partition", drop=("device",))
    blocks = {
        "train": _section(scene, "train"),
        "momentum": _section(scene, "momentum", drop=("rounds", "final_iterations")),
    }
    if stage == "blocks":  # init, train_block, sync: rounds may grow without a rerun
        return blocks
    m = scene["momentum"]
    return dict(blocks, rounds=m["rounds"], final_iterations=m["final_iterations"])


def stage_trigger(stage):
    """A params function: the digest of the stage's config values (rerun trigger 'params')."""

    def digest(wildcards):
        return _digest(stage_keys(stage, scene_config(wildcards)))

    digest.__name__ = f"{stage}_settings"
    return digest


def report_settings(wildcards):
    return _digest({name: config["scenes"][name]["paper"] for name in SCENES})


# ---------------------------------------------------------------- blocks and rounds


@functools.lru_cache(maxsize=None)
def _read_block_ids(path, mtime_ns):
    with open(path) as handle:
        data = json.load(handle)
    ids = [int(block["id"]) for block in data["blocks"]]
    if not ids:
        raise WorkflowError(f"{path} lists no blocks; check the partition settings")
    return ids


def block_ids(wildcards):
    """Block ids from partition.json (the partition checkpoint: blocks may be merged)."""
    path = checkpoints.partition.get(scene=wildcards.scene).output.json
    return _read_block_ids(path, os.stat(path).st_mtime_ns)


def rounds(wildcards):
    return scene_config(wildcards)["momentum"]["rounds"]


def round_state(wildcards, r, block=None):
    """Round r's shared state (block None) or block state; round 0 is init's folder."""
    if r == 0:
        return run_path(wildcards, "rounds", 0)
    name = "shared.pt" if block is None else f"block_{block}.pt"
    return run_path(wildcards, "rounds", r, name)


def train_block_input(wildcards):
    r = int(wildcards.r)
    if r > rounds(wildcards):
        raise WorkflowError(
            f"round {r} of scene {wildcards.scene} is past momentum.rounds "
            f"({rounds(wildcards)})"
        )
    return {
        "block": round_state(wildcards, r - 1, wildcards.b),
        "shared": round_state(wildcards, r - 1),
    }


def sync_input(wildcards):
    r = int(wildcards.r)
    return {
        "blocks": [round_state(wildcards, r, b) for b in block_ids(wildcards)],
        "shared": round_state(wildcards, r - 1),
    }


def finalize_input(wildcards):
    last = rounds(wildcards)
    return {
        "block": round_state(wildcards, last, wildcards.b),
        "shared": round_state(wildcards, last),
    }


def merge_input(wildcards):
    return {
        "blocks": [
            run_path(wildcards, "final", f"block_{b}.pt") for b in block_ids(wildcards)
        ],
        "partition": run_path(wildcards, "partition", "partition.json"),
    }


def report_input(wildcards):
    return [f"results/{name}/eval/metrics.json" for name in SCENES]


def final_outputs(wildcards):
    return ["results/report/report.html"] + [
        f"results/{name}/eval/metrics.json" for name in SCENES
    ]


wildcard_constraints:
    scene=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    r=r"[1-9][0-9]*",
    b=r"[0-9]+",


localrules:
    all,
    configure,
