# Configuration checks, scene selection and input functions: all the Python of the workflow.
import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from mgs.errors import MgsError
from mgs.validate import check_scene

# ---------------------------------------------------------------- configuration

INGEST_SOURCES = ("colmap", "mill19", "urbanscene3d", "matrixcity", "transforms")
# keys that change how fast a job runs, not what it writes: never a reason to rerun
COMPUTE_KEYS = {
    "train": ("device", "backend", "threads", "checkpoint_interval"),
    "sfm": ("threads",),
}


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
    try:
        return config["scenes"][wildcards.scene]
    except KeyError:
        raise WorkflowError(
            f"scene {wildcards.scene!r} is not in the config (configured: "
            f"{', '.join(sorted(config['scenes']))}); add it under scenes: or pass its "
            "config file with --configfile"
        ) from None


def _names_regex(names):
    return "|".join(names) if names else "(?!x)x"  # (?!x)x never matches


def scene_names_regex(*sources):
    """Regex of the configured scene names with one of `sources`."""
    return _names_regex(
        [n for n, s in config["scenes"].items() if s["source"] in sources]
    )


def ssim_scenes_regex(ssim=True):
    """Scenes whose partition renders a coarse model (ssim assignment: a GPU job), or the others."""
    scenes = config["scenes"].items()
    return _names_regex(
        [n for n, s in scenes if (s["partition"]["assignment"] == "ssim") == ssim]
    )


def _preflight():
    """`mgs` and what every job needs, before any job is queued (each job checks again)."""
    if "conda" in str(workflow.deployment_settings.deployment_method).lower():
        return  # the rule environment is made later; its post-deploy script installs mgs
    if shutil.which("mgs") is None:
        raise WorkflowError(
            "`mgs` is not on PATH; every job runs `mgs <verb>`. Install it "
            "(`make install`, then PATH=$PWD/.venv/bin:$PATH) or run with --sdm conda"
        )
    result = subprocess.run(["mgs", "preflight"], capture_output=True, text=True)
    if result.returncode != 0:
        raise WorkflowError(result.stderr.strip() or "`mgs preflight` failed")


_preflight()


# ---------------------------------------------------------------- gsplat's CUDA extension

GSPLAT = config["gsplat"]
GSPLAT_DIR = GSPLAT["extensions_dir"] or "results/.torch_extensions"
GSPLAT_BUILD = f"{GSPLAT_DIR}/gsplat_build.json"
GSPLAT_BUILD_LOG = f"{GSPLAT_DIR}/gsplat_build.log"
# Set while the workflow is parsed, so every job inherits them (a SLURM job re-parses this file
# in its own Snakemake): one build folder and one architecture list for all GPU jobs, so none
# rebuilds for its own GPU model or deletes another's half-built extension.
os.environ.update(
    TORCH_EXTENSIONS_DIR=os.path.abspath(GSPLAT_DIR),
    TORCH_CUDA_ARCH_LIST=GSPLAT["arch_list"],
)


def may_use_gsplat(scene):
    train = scene["train"]
    return train["backend"] != "torch" and train["device"] != "cpu"


def gsplat_build_input(wildcards):
    """The built extension for a GPU job of a scene that may render with gsplat; ancient, so
    a rebuild (a wiped extensions_dir) reruns nothing downstream."""
    if GSPLAT["build"] and may_use_gsplat(scene_config(wildcards)):
        return ancient(GSPLAT_BUILD)
    return []


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
        inputs["gsplat"] = gsplat_build_input(wildcards)
    return inputs


def coarse_steps(wildcards):
    return scene_config(wildcards)["coarse_iterations"]


def ingest_source(wildcards):
    """The dataset folder, ancient: its own mtime changes with any stray file and misses an
    image changed deeper down, so `source_manifest` (a params) tracks the content instead.
    """
    return ancient(scene_config(wildcards)["path"])


# files of a dataset folder that shape a scene: images, COLMAP models, transforms.json and
# its points
DATASET_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".png",
    ".tif",
    ".tiff",
    ".bin",
    ".txt",
    ".npy",
    ".json",
    ".ply",
}


@functools.lru_cache(maxsize=None)
def _folder_manifest(path):
    lines = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if (
                name.startswith(".")
                or Path(name).suffix.lower() not in DATASET_SUFFIXES
            ):
                continue
            stat = os.stat(os.path.join(root, name))
            lines.append(
                f"{os.path.relpath(os.path.join(root, name), path)}\t"
                f"{stat.st_size}\t{stat.st_mtime_ns}"
            )
    return _digest(lines)


def source_manifest(wildcards):
    """Digest of the dataset's image and model files (names, sizes, mtimes): a rerun trigger."""
    path = scene_config(wildcards)["path"]
    return _folder_manifest(path) if os.path.isdir(path) else "missing"


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
        return dict(base, synthetic=scene["synthetic"], sfm=_section(scene, "sfm"))
    if stage == "coarse":
        return dict(
            base, train=_section(scene, "train"), steps=scene["coarse_iterations"]
        )
    if stage == "partition":
        return _section(scene, "partition", drop=("device",))
    blocks = {
        "train": _section(scene, "train"),
        "momentum": _section(
            scene, "momentum", drop=("rounds", "final_iterations", "keep_rounds")
        ),
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


def partition_checkpoint(wildcards):
    ssim = scene_config(wildcards)["partition"]["assignment"] == "ssim"
    return (checkpoints.partition_ssim if ssim else checkpoints.partition).get(
        scene=wildcards.scene
    )


def block_ids(wildcards):
    """Block ids from partition.json (the partition checkpoint: blocks may be merged)."""
    path = partition_checkpoint(wildcards).output.json
    return _read_block_ids(path, os.stat(path).st_mtime_ns)


def check_block(wildcards):
    """A clear error for a block the partition does not have (e.g. -R of a stale path)."""
    ids = block_ids(wildcards)
    if int(wildcards.b) not in ids:
        raise WorkflowError(
            f"block {wildcards.b} of scene {wildcards.scene} is not in its partition "
            f"(blocks {', '.join(map(str, ids))}: results/{wildcards.scene}/partition/"
            "partition.json)"
        )


def rounds(wildcards):
    return scene_config(wildcards)["momentum"]["rounds"]


def round_state(wildcards, r, block=None, name="block"):
    """Round r's shared state (block None), block state or decoder summary (name 'decoder');
    round 0 is init's folder."""
    if r == 0:
        return run_path(wildcards, "rounds", 0)
    name = "shared.pt" if block is None else f"{name}_{block}.pt"
    return run_path(wildcards, "rounds", r, name)


def train_block_input(wildcards):
    r = int(wildcards.r)
    if r > rounds(wildcards):
        raise WorkflowError(
            f"round {r} of scene {wildcards.scene} is past momentum.rounds "
            f"({rounds(wildcards)})"
        )
    check_block(wildcards)
    return {
        "block": round_state(wildcards, r - 1, wildcards.b),
        "shared": round_state(wildcards, r - 1),
        "gsplat": gsplat_build_input(wildcards),
    }


def sync_input(wildcards):
    """Only the blocks' small decoder summaries: sync runs on the submit host in seconds."""
    r = int(wildcards.r)
    return {
        "blocks": [
            round_state(wildcards, r, b, "decoder") for b in block_ids(wildcards)
        ],
        "shared": round_state(wildcards, r - 1),
    }


def final_steps(wildcards):
    return scene_config(wildcards)["momentum"]["final_iterations"]


def finalize_input(wildcards):
    if final_steps(wildcards) == 0:
        raise WorkflowError(
            f"scene {wildcards.scene} has momentum.final_iterations 0: no finalize job "
            f"(merge reads results/{wildcards.scene}/rounds/{rounds(wildcards)}/)"
        )
    check_block(wildcards)
    last = rounds(wildcards)
    return {
        "block": round_state(wildcards, last, wildcards.b),
        "shared": round_state(wildcards, last),
        "gsplat": gsplat_build_input(wildcards),
    }


def final_block(wildcards, b):
    """A block as merged: finalized, or the last round's when final_iterations is 0."""
    if final_steps(wildcards) == 0:
        return round_state(wildcards, rounds(wildcards), b)
    return run_path(wildcards, "final", f"block_{b}.pt")


def merge_input(wildcards):
    return {
        "blocks": [final_block(wildcards, b) for b in block_ids(wildcards)],
        "partition": run_path(wildcards, "partition", "partition.json"),
    }


def report_input(wildcards):
    """Every file `mgs report` reads, of this invocation's scenes only."""
    files = []
    for name in SCENES:
        scene = SimpleNamespace(scene=name)
        r, ids = rounds(scene), block_ids(scene)
        files += [run_path(scene, *p) for p in REPORT_FILES]
        files += [
            round_state(scene, i, b, "decoder") for i in range(1, r + 1) for b in ids
        ]
        files += [run_path(scene, "rounds", i, "sync.tsv") for i in range(1, r + 1)]
        files += [final_block(scene, b) for b in ids if final_steps(scene)]
    return files


REPORT_FILES = [
    ("eval", "metrics.json"),
    ("eval", "per_view.csv"),
    ("config.yaml",),
    ("partition", "partition.json"),
    ("partition", "partition.png"),
    ("model", "export.csv"),
]


def report_runs(wildcards):
    return " ".join(f"results/{name}" for name in SCENES)


def final_outputs(wildcards):
    return ["results/report/report.html"] + [
        f"results/{name}/eval/metrics.json" for name in SCENES
    ]


# ---------------------------------------------------------------- cluster resources
# What a job asks the queue for: host memory (MB) and wall time (minutes) from its camera count,
# image size and steps, times the attempt (a job retried after running out of memory or time
# asks for twice, then three times as much). Estimates for a GPU node; a site can still override
# any of them with set-resources in its profile.

# megapixels of a full-size image per source (rescaled by resolution and train.resolution)
SOURCE_MPX = {"mill19": 16.0, "urbanscene3d": 20.0, "matrixcity": 1.44}
DEFAULT_MPX = 4.0  # colmap and images scenes
IMAGE_MB_PER_MPX = 12  # one float32 RGB image held on the host
STEP_SECONDS = (0.03, 0.12)  # seconds per step: fixed + per megapixel (GPU rasteriser)


def _image_mpx(scene):
    if scene["source"] == "synthetic":
        mpx = scene["synthetic"]["width"] * scene["synthetic"]["height"] / 1e6
    else:
        mpx = SOURCE_MPX.get(scene["source"], DEFAULT_MPX) / scene["resolution"] ** 2
    return mpx / scene["train"]["resolution"] ** 2


def _scene_counts(wildcards):
    """(train, test) camera counts from scene.json once it exists, else a guess of 1000/100."""
    path = run_path(wildcards, "scene", "scene.json")
    if not os.path.isfile(path):
        return 1000, 100
    data = _read_json(path, os.stat(path).st_mtime_ns)
    return len(data["train_names"]), len(data["test_names"])


@functools.lru_cache(maxsize=None)
def _read_json(path, mtime_ns):
    with open(path) as handle:
        return json.load(handle)


def _block_cameras(wildcards):
    path = run_path(wildcards, "partition", "partition.json")
    data = _read_json(path, os.stat(path).st_mtime_ns)
    block = next(b for b in data["blocks"] if int(b["id"]) == int(wildcards.b))
    return len(block["train_cameras"]) + len(block["validation_cameras"])


def _file_mb(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(str(p))) / 1e6


def _request(attempt, mb, minutes):
    """Rounded up (1 GB, 5 min steps) and scaled by the attempt."""
    mb = -(-int(mb) // 1000) * 1000
    minutes = -(-int(minutes) // 5) * 5
    return {"mem_mb": mb * attempt, "runtime": minutes * attempt}


def job_request(kind):
    """Memory and runtime functions for a rule: block (train_block, finalize_block), coarse,
    partition (ssim renders), evaluate, merge."""

    # never a checkpoint here: an unfinished one breaks resource evaluation in Snakemake 9
    def request(wildcards, input, attempt):
        scene = scene_config(wildcards)
        mpx, steps = _image_mpx(scene), 0
        if kind == "block":
            cameras = _block_cameras(wildcards)
            if hasattr(wildcards, "r"):  # train_block: from the previous round's block
                r = int(wildcards.r)
                state = round_state(wildcards, r - 1, wildcards.b) if r > 1 else ""
                steps = scene["momentum"]["iterations_per_round"]
            else:  # finalize_block
                state = round_state(wildcards, rounds(wildcards), wildcards.b)
                steps = scene["momentum"]["final_iterations"]
            # the block's images, and its checkpoint 3 times (loaded, optimiser, written)
            mb = 3000 + cameras * mpx * IMAGE_MB_PER_MPX + 3 * _file_mb([state])
        elif kind == "coarse":
            cameras, _ = _scene_counts(wildcards)
            steps = scene["coarse_iterations"]
            mb = 4000 + cameras * mpx * IMAGE_MB_PER_MPX
        elif kind == "partition":
            cameras, _ = _scene_counts(wildcards)
            x, y, z = scene["partition"]["block_dim"]
            mb = 8000
            # one render per camera and block (at most 400 px a side), and one without
            steps = cameras * (x * y * z + 1)
        elif kind == "evaluate":
            _, cameras = _scene_counts(wildcards)
            mb = 6000 + 2 * cameras * mpx * IMAGE_MB_PER_MPX + 3 * _file_mb(input)
            steps = 20 * cameras  # renders, timing repeats and LPIPS per test view
        else:  # merge: every block's anchors at once
            mb = 4000 + 3 * _file_mb(input)
            # crop, concatenate, export the splats: minutes, not a loop of steps
            steps = 600
        seconds = steps * (STEP_SECONDS[0] + STEP_SECONDS[1] * mpx)
        return _request(attempt, mb, 10 + seconds / 60)

    return request


def mem_mb(kind):
    def mem_mb(wildcards, input, attempt):
        return job_request(kind)(wildcards, input, attempt)["mem_mb"]

    return mem_mb


def runtime(kind):
    def runtime(wildcards, input, attempt):
        return job_request(kind)(wildcards, input, attempt)["runtime"]

    return runtime


def gpu(rule):
    """1 GPU, requested as `gpu` (sbatch --gpus), or 0 when the profile sets a `gres` for the
    same job: then only --gres is passed, never both (sites that take only --gres reject
    --gpus)."""

    def count(wildcards):
        site = workflow.resource_settings.overwrite_resources.get(rule) or {}
        return 0 if "gres" in list(site.keys()) else 1

    return count


wildcard_constraints:
    scene=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    r=r"[1-9][0-9]*",
    b=r"[0-9]+",


localrules:
    all,
    configure,
    sync,
