"""What a job asks the queue for: host memory (MB), wall time (minutes) and GPU memory (MB) from
its camera count, image size, steps and checkpoint size. A retry asks for more of what ran out:
the previous attempt's log tells a time limit (mgs stops on SLURM's SIGTERM and says so) from a
memory kill (the log just ends); a GPU that ran out of memory is retried on `cluster.
retry_constraint` GPUs where the scene names them. Estimates for a GPU node; a site can still
override any of them with set-resources in its profile; `mgs plan` prints them."""

from __future__ import annotations

import os

from mgs.config import EXPORT_REFINE_STEPS
from mgs.plan.layout import LOGS, read_json, round_state, run_file, run_log

# rule -> what its job holds
RULE_KIND = {"train_block": "block", "finalize_block": "block", "coarse": "coarse",
             "partition_ssim": "partition", "evaluate": "evaluate", "export": "evaluate",
             "merge": "merge", "gsplat_build": "gsplat_build"}
KINDS = tuple(sorted(set(RULE_KIND.values())))
# megapixels of a full-size image per source (rescaled by resolution and train.resolution)
SOURCE_MPX = {"mill19": 16.0, "urbanscene3d": 20.0, "matrixcity": 1.44}
DEFAULT_MPX = 4.0  # colmap and images scenes
IMAGE_MB_PER_MPX = 3  # one uint8 RGB image (host view cache, and on the GPU)
RENDER_MB_PER_MPX = 1500  # a step's render buffers and gradients per megapixel of image (GPU)
STEP_SECONDS = (0.03, 0.12)  # seconds per step: fixed + per megapixel (GPU rasteriser; unmeasured)
UNKNOWN_COUNTS = (1000, 100)  # (train, test) cameras before scene.json exists
GSPLAT_BUILD = {"mem_mb": 16000, "runtime": 60}


def image_mpx(scene: dict) -> float:
    """Megapixels of one training image."""
    if scene["source"] == "synthetic":
        mpx = scene["synthetic"]["width"] * scene["synthetic"]["height"] / 1e6
    else:
        mpx = SOURCE_MPX.get(scene["source"], DEFAULT_MPX) / scene["resolution"] ** 2
    return mpx / scene["train"]["resolution"] ** 2


def scene_counts(name: str) -> tuple[int, int]:
    """(train, test) camera counts from scene.json once it exists, else a guess."""
    path = run_file("scene", name)
    if not os.path.isfile(path):
        return UNKNOWN_COUNTS
    data = read_json(path)
    return len(data["train_names"]), len(data["test_names"])


def block_cameras(name: str, b) -> int:
    data = read_json(run_file("partition", name))
    block = next(blk for blk in data["blocks"] if int(blk["id"]) == int(b))
    return len(block["train_cameras"]) + len(block["validation_cameras"])


def file_mb(paths) -> float:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(str(p))) / 1e6


def scaled_request(attempt: int, mb: float, minutes: float, ran_out: str = "memory") -> dict:
    """Rounded up (1 GB, 5 min steps); a retry scales what ran out ('memory' or 'time') by the
    attempt, and both when the cause is unknown ('both')."""
    mb = -(-int(mb) // 1000) * 1000
    minutes = -(-int(minutes) // 5) * 5
    grow_mb = attempt if ran_out in ("memory", "both") else 1
    grow_time = attempt if ran_out in ("time", "both") else 1
    return {"mem_mb": mb * grow_mb, "runtime": minutes * grow_time}


def ran_out(log_path: str | None) -> str:
    """What ended the previous attempt, from its log: 'time' (SIGTERM at SLURM's time limit,
    which mgs notes), 'gpu' (CUDA out of memory), 'memory' (killed without a word: a memory
    kill, or a MemoryError) or 'both' (no log, or a SIGTERM of unknown cause)."""
    if not log_path or not os.path.isfile(log_path):
        return "both"
    with open(log_path, "rb") as handle:
        handle.seek(max(0, os.path.getsize(log_path) - 20000))
        tail = handle.read().decode(errors="replace")
    if "SIGTERM at the job's time limit" in tail or "DUE TO TIME LIMIT" in tail:
        return "time"
    if "CUDA out of memory" in tail or "OutOfMemoryError" in tail:
        return "gpu"
    if "SIGTERM" in tail:
        return "both"
    return "memory"


def _job_size(kind: str, scene: dict, name: str, inputs, block, round, cameras):
    """(host MB, GPU MB, steps) of a job before rounding."""
    mpx = image_mpx(scene)
    momentum = scene["momentum"]
    if kind == "block":
        cameras = block_cameras(name, block) if cameras is None else cameras
        if round is not None:  # train_block: from the previous round's block
            r = int(round)
            state = round_state(name, r - 1, block) if r > 1 else ""
            steps = momentum["iterations_per_round"]
        else:  # finalize_block
            state = round_state(name, momentum["rounds"], block)
            steps = momentum["final_iterations"]
        images, state_mb = cameras * mpx * IMAGE_MB_PER_MPX, file_mb([state])
        # the block's images, and its checkpoint 3 times (loaded, optimiser, written)
        gpu_mb = 1000 + images + 2 * state_mb + RENDER_MB_PER_MPX * mpx
        return 3000 + images + 3 * state_mb, gpu_mb, steps
    if kind == "coarse":
        cameras, _ = scene_counts(name)
        images = cameras * mpx * IMAGE_MB_PER_MPX
        gpu_mb = 3000 + images + RENDER_MB_PER_MPX * mpx
        return 4000 + images, gpu_mb, scene["coarse_iterations"]
    if kind == "partition":
        cameras, _ = scene_counts(name)
        x, y, z = scene["partition"]["block_dim"]
        # one render per camera and block (at most 400 px a side), and one without
        return 8000, 4000, cameras * (x * y * z + 1)
    if kind == "evaluate":
        _, cameras = scene_counts(name)
        model = file_mb(inputs)
        images = 2 * cameras * mpx * IMAGE_MB_PER_MPX  # ground truth and renders
        # renders, timing repeats and LPIPS per test view
        return 6000 + images + 3 * model, 4000 + 2 * model + RENDER_MB_PER_MPX * mpx, 20 * cameras
    if kind == "merge":  # every block's anchors at once; crop, concatenate, bake, refine
        cameras, _ = scene_counts(name)
        model = file_mb(inputs)
        refine_steps = scene.get("export", {}).get("refine_steps", EXPORT_REFINE_STEPS)
        # the targets (photos or the model's renders) of the views a step has drawn, as float16
        images = min(cameras, refine_steps) * mpx * IMAGE_MB_PER_MPX * 2
        # a decode and render per training view, then the refinement's steps
        return (4000 + 3 * model + images, 2000 + 3 * model + images + RENDER_MB_PER_MPX * mpx,
                cameras + refine_steps)
    raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")


def job_request(rule: str, scene: dict, name: str, attempt: int = 1, inputs=(), block=None,
                round=None, cameras: int | None = None) -> dict:
    """mem_mb, runtime, gpu_mem_mb and constraint of one job of `rule` (RULE_KIND) of the scene
    `name` with settings `scene`; `inputs` are its input files (their sizes count), `block` and
    `round` its wildcards, `cameras` a block's camera count where partition.json does not exist
    yet. On a retry (attempt > 1) what grows follows the previous attempt's log (`ran_out`)."""
    kind = RULE_KIND[rule]
    cause = "both"
    log_rule = "partition" if rule == "partition_ssim" else rule
    if attempt > 1 and log_rule in LOGS:
        cause = ran_out(run_log(log_rule, name, r=round, b=block))
    if kind == "gsplat_build":
        request = scaled_request(attempt, GSPLAT_BUILD["mem_mb"], GSPLAT_BUILD["runtime"], cause)
        return dict(request, gpu_mem_mb=0, ran_out=cause, constraint=None)
    mb, gpu_mb, steps = _job_size(kind, scene, name, inputs, block, round, cameras)
    seconds = steps * (STEP_SECONDS[0] + STEP_SECONDS[1] * image_mpx(scene))
    request = scaled_request(attempt, mb, 10 + seconds / 60, cause)
    return dict(request, gpu_mem_mb=-(-int(gpu_mb) // 1000) * 1000, ran_out=cause,
                constraint=gpu_constraint(scene, attempt, cause))


def gpu_constraint(scene: dict, attempt: int, cause: str) -> str | None:
    """The scene's -C constraint for a GPU job; a GPU that ran out of memory retries on
    `cluster.retry_constraint` when the scene names one."""
    cluster = scene.get("cluster") or {}
    if attempt > 1 and cause == "gpu" and cluster.get("retry_constraint"):
        return cluster["retry_constraint"]
    return cluster.get("constraint")


