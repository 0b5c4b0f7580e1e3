"""What a job asks the queue for: host memory (MB) and wall time (minutes) from its camera count,
image size and steps, times the attempt (a job retried after running out of memory or time asks for
twice, then three times as much). Estimates for a GPU node; a site can still override any of them
with set-resources in its profile."""

from __future__ import annotations

import functools
import json
import os

from mgs.plan.layout import round_state, run_path

KINDS = ("block", "coarse", "partition", "evaluate", "merge")
# megapixels of a full-size image per source (rescaled by resolution and train.resolution)
SOURCE_MPX = {"mill19": 16.0, "urbanscene3d": 20.0, "matrixcity": 1.44}
DEFAULT_MPX = 4.0  # colmap and images scenes
IMAGE_MB_PER_MPX = 12  # one float32 RGB image held on the host
STEP_SECONDS = (0.03, 0.12)  # seconds per step: fixed + per megapixel (GPU rasteriser)
UNKNOWN_COUNTS = (1000, 100)  # (train, test) cameras before scene.json exists


def image_mpx(scene: dict) -> float:
    """Megapixels of one training image."""
    if scene["source"] == "synthetic":
        mpx = scene["synthetic"]["width"] * scene["synthetic"]["height"] / 1e6
    else:
        mpx = SOURCE_MPX.get(scene["source"], DEFAULT_MPX) / scene["resolution"] ** 2
    return mpx / scene["train"]["resolution"] ** 2


@functools.lru_cache(maxsize=None)
def _read_json(path: str, mtime_ns: int) -> dict:
    with open(path) as handle:
        return json.load(handle)


def read_json(path: str) -> dict:
    """A small JSON file, read once per content version (keyed by its mtime)."""
    return _read_json(path, os.stat(path).st_mtime_ns)


def scene_counts(name: str) -> tuple[int, int]:
    """(train, test) camera counts from scene.json once it exists, else a guess."""
    path = run_path(name, "scene", "scene.json")
    if not os.path.isfile(path):
        return UNKNOWN_COUNTS
    data = read_json(path)
    return len(data["train_names"]), len(data["test_names"])


def block_cameras(name: str, b) -> int:
    data = read_json(run_path(name, "partition", "partition.json"))
    block = next(blk for blk in data["blocks"] if int(blk["id"]) == int(b))
    return len(block["train_cameras"]) + len(block["validation_cameras"])


def file_mb(paths) -> float:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(str(p))) / 1e6


def scaled_request(attempt: int, mb: float, minutes: float) -> dict:
    """Rounded up (1 GB, 5 min steps) and scaled by the attempt."""
    mb = -(-int(mb) // 1000) * 1000
    minutes = -(-int(minutes) // 5) * 5
    return {"mem_mb": mb * attempt, "runtime": minutes * attempt}


def job_request(kind: str, scene: dict, name: str, attempt: int = 1, inputs=(), block=None,
                round=None, cameras: int | None = None) -> dict:
    """Memory and runtime of a job of `kind` (KINDS) of the scene `name` with settings `scene`:
    block (train_block with `round`, finalize_block without), coarse, partition (ssim renders),
    evaluate (and export), merge. `inputs` are the job's input files (their sizes count);
    `cameras` a block's camera count where partition.json does not exist yet."""
    mpx, steps = image_mpx(scene), 0
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
        # the block's images, and its checkpoint 3 times (loaded, optimiser, written)
        mb = 3000 + cameras * mpx * IMAGE_MB_PER_MPX + 3 * file_mb([state])
    elif kind == "coarse":
        cameras, _ = scene_counts(name)
        steps = scene["coarse_iterations"]
        mb = 4000 + cameras * mpx * IMAGE_MB_PER_MPX
    elif kind == "partition":
        cameras, _ = scene_counts(name)
        x, y, z = scene["partition"]["block_dim"]
        mb = 8000
        # one render per camera and block (at most 400 px a side), and one without
        steps = cameras * (x * y * z + 1)
    elif kind == "evaluate":
        _, cameras = scene_counts(name)
        mb = 6000 + 2 * cameras * mpx * IMAGE_MB_PER_MPX + 3 * file_mb(inputs)
        steps = 20 * cameras  # renders, timing repeats and LPIPS per test view
    elif kind == "merge":  # every block's anchors at once
        mb = 4000 + 3 * file_mb(inputs)
        steps = 600  # crop, concatenate, export the splats: minutes, not a loop of steps
    else:
        raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
    seconds = steps * (STEP_SECONDS[0] + STEP_SECONDS[1] * mpx)
    return scaled_request(attempt, mb, 10 + seconds / 60)
