# Configuration checks, scene selection and input functions: all the Python of the workflow.
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError

from mgs.errors import MgsError
from mgs.plan import layout, resources, settings
from mgs.plan.layout import run_file, run_log
from mgs.plan.rerun import one_block_target, rerun_guard
from mgs.plan.config import check_workflow_config, selected_scenes

# ---------------------------------------------------------------- configuration

INGEST_SOURCES = ("colmap", "mill19", "urbanscene3d", "matrixcity", "transforms")


def _check_config():
    """Schema check with defaults filled in; the first error names its key."""
    try:
        check_workflow_config(
            config, Path(workflow.basedir) / "schemas" / "config.schema.yaml"
        )
    except MgsError as exc:
        raise WorkflowError(str(exc)) from None


def _selected_scenes():
    """Scenes defined by --configfile files when there are any, else every scene."""
    try:
        return selected_scenes(workflow.overwrite_configfiles or (), config)
    except MgsError as exc:
        raise WorkflowError(str(exc)) from None


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


def scenes_regex(test):
    """Regex of the configured scene names whose settings pass `test` (a rule's scenes)."""
    names = [name for name, scene in config["scenes"].items() if test(scene)]
    return "|".join(names) if names else "(?!x)x"  # (?!x)x never matches


def scene_names_regex(*sources):
    return scenes_regex(lambda scene: scene["source"] in sources)


def ssim_scenes_regex(ssim=True):
    """Scenes whose partition renders a coarse model (ssim assignment: a GPU job), or the others."""
    return scenes_regex(lambda s: (s["partition"]["assignment"] == "ssim") == ssim)


def grouped_scenes_regex(grouped=True):
    """Scenes whose rounds run as group jobs (cluster.rounds_per_job > 1), or the others."""
    return scenes_regex(lambda s: (s["cluster"]["rounds_per_job"] > 1) == grouped)


def round_group(wildcards):
    """The group job of a round's train_block and sync jobs: rounds_per_job consecutive rounds
    of one scene (none when 1)."""
    per_job = scene_config(wildcards)["cluster"]["rounds_per_job"]
    if per_job <= 1:
        return None
    return f"rounds_{wildcards.scene}_{(int(wildcards.r) - 1) // per_job + 1}"


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


def gsplat_build_request(key):
    """The build's memory or runtime: nvcc's needs, doubled, then tripled on retries."""

    def request(wildcards, attempt):
        return resources.job_request("gsplat_build", {}, "", attempt)[key]

    return request


def gsplat_build_input(wildcards):
    """The built extension for a GPU job of a scene that may render with gsplat; ancient, so
    a rebuild (a wiped extensions_dir) reruns nothing downstream."""
    if GSPLAT["build"] and settings.may_use_gsplat(scene_config(wildcards)):
        return ancient(GSPLAT_BUILD)
    return []


# ---------------------------------------------------------------- paths


def coarse_checkpoint(wildcards):
    """The ssim coarse model: the configured checkpoint, or the one rule coarse trains."""
    partition = scene_config(wildcards)["partition"]
    return partition["coarse"] or run_file("coarse", wildcards.scene)


def coarse_work(wildcards):
    """The coarse job's periodic checkpoints: beside its output, so a retry continues."""
    return run_file("coarse_work", wildcards.scene)


def partition_input(wildcards):
    inputs = {
        "config": ancient(run_file("config", wildcards.scene)),
        "scene": run_file("scene", wildcards.scene),
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


def source_manifest(wildcards):
    """Digest of the dataset's image and model files (names, sizes, mtimes): a rerun trigger."""
    path = scene_config(wildcards)["path"]
    return settings.folder_manifest(path) if os.path.isdir(path) else "missing"


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
    scene = scene_config(wildcards)
    ssim = scene["partition"]["assignment"] == "ssim"
    coarse = coarse_checkpoint(wildcards) if ssim else None
    return settings.configure_settings(scene, wildcards.scene, coarse)


def stage_trigger(stage):
    """A params function: the digest of the stage's config values (rerun trigger 'params')."""

    def digest(wildcards):
        return settings.digest(settings.stage_keys(stage, scene_config(wildcards)))

    digest.__name__ = f"{stage}_settings"
    return digest


def report_settings(wildcards):
    return settings.digest({name: config["scenes"][name]["paper"] for name in SCENES})


# ---------------------------------------------------------------- blocks and rounds


def partition_checkpoint(wildcards):
    ssim = scene_config(wildcards)["partition"]["assignment"] == "ssim"
    return (checkpoints.partition_ssim if ssim else checkpoints.partition).get(
        scene=wildcards.scene
    )


def block_ids(wildcards):
    """Block ids from partition.json (the partition checkpoint: blocks may be merged)."""
    try:
        return layout.block_ids(partition_checkpoint(wildcards).output.json)
    except MgsError as exc:
        raise WorkflowError(str(exc)) from None


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
    return layout.round_state(wildcards.scene, r, block, name)


def scene_files(wildcards):
    """The scene (its folder: cameras, images) and the partition a block job reads."""
    return {
        "scene": run_file("scene", wildcards.scene),
        "partition": run_file("partition", wildcards.scene),
    }


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
        **scene_files(wildcards),
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
        momentum = scene_config(wildcards)["momentum"]
        target = one_block_target(wildcards.scene, wildcards.b, momentum)
        raise WorkflowError(
            f"scene {wildcards.scene} has momentum.final_iterations 0: no finalize job; "
            f"block {wildcards.b} as merged is its last round's, so rerun that one: "
            f"snakemake -R {target}"
        )
    check_block(wildcards)
    last = rounds(wildcards)
    return {
        "block": round_state(wildcards, last, wildcards.b),
        "shared": round_state(wildcards, last),
        **scene_files(wildcards),
        "gsplat": gsplat_build_input(wildcards),
    }


def final_block(wildcards, b):
    return layout.final_block(
        wildcards.scene, b, rounds(wildcards), final_steps(wildcards)
    )


def merge_input(wildcards):
    """The merged blocks, the partition, the last round's shared decoder (the model's), and
    gsplat: merge renders (splats.ply is refined on the training views)."""
    return {
        "blocks": [final_block(wildcards, b) for b in block_ids(wildcards)],
        "shared": round_state(wildcards, rounds(wildcards)),
        **scene_files(wildcards),
        "gsplat": gsplat_build_input(wildcards),
    }


def report_input(wildcards):
    """Every file `mgs report` reads, of this invocation's scenes only."""
    files = []
    for name in SCENES:
        scene = SimpleNamespace(scene=name)
        ids = block_ids(scene)
        files += layout.report_files(name, rounds(scene), ids, final_steps(scene))
    return files


def report_runs(wildcards):
    return " ".join(layout.run_path(name) for name in SCENES)


def final_outputs(wildcards):
    return ["results/report/report.html"] + [
        run_file("metrics", name) for name in SCENES
    ]


# ---------------------------------------------------------------- cluster resources
# Memory and wall time per job: mgs.plan.resources (also printed by `mgs plan`).


def job_request(name):
    """A rule's request function: memory, runtime and GPU memory of one of its jobs."""

    # never a checkpoint here: an unfinished one breaks resource evaluation in Snakemake 9
    def request(wildcards, input, attempt):
        return resources.job_request(
            name,
            scene_config(wildcards),
            wildcards.scene,
            attempt,
            inputs=list(input),
            block=getattr(wildcards, "b", None),
            round=getattr(wildcards, "r", None),
        )

    return request


def requested(key):
    """A factory of resource functions: `key` of a rule's request (mem_mb, runtime, and the
    constraint: the scene's cluster.constraint, or retry_constraint after the GPU ran out of
    memory; none when unset)."""

    def for_rule(name):
        def value(wildcards, input, attempt):
            return job_request(name)(wildcards, input, attempt)[key]

        value.__name__ = key
        return value

    return for_rule


mem_mb, runtime, constraint = map(requested, ("mem_mb", "runtime", "constraint"))


def gpu_model(wildcards):
    """The scene's cluster.gpu_model (sbatch --gpus=MODEL:1); none when unset."""
    return (scene_config(wildcards).get("cluster") or {}).get("gpu_model")


def gpu(rule):
    """1 GPU, requested as `gpu` (sbatch --gpus), or 0 when the profile sets a `gres` for the
    same job: then only --gres is passed, never both (sites that take only --gres reject
    --gpus)."""

    def count(wildcards):
        site = workflow.resource_settings.overwrite_resources.get(rule) or {}
        return 0 if "gres" in list(site.keys()) else 1

    return count


def check_rerun():
    """Stop a -R rerun that would retrain blocks nobody named (mgs.plan.rerun)."""
    jobs = [
        (job.rule.name, dict(job.wildcards_dict)) for job in workflow.dag.needrun_jobs()
    ]
    forced = workflow.dag_settings.forcerun or ()
    message = rerun_guard(jobs, forced, config["scenes"], config["allow_full_rerun"])
    if message:
        raise WorkflowError(message)


onstart:
    check_rerun()


wildcard_constraints:
    scene=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    r=r"[1-9][0-9]*",
    b=r"[0-9]+",


localrules:
    all,
    configure,
    sync,  # sync_in_group is not: it runs inside its round set's group job
