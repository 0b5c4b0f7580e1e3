"""What every ingest source shares: OpenGL poses to COLMAP's, images written once at the training
size, and the up direction. Both `datasets` and `transforms` build on it, and it on neither."""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mgs.atomic import atomic_path, ensure_writable_dir
from mgs.errors import InputError, MgsError
from mgs.images import file_digest, read_cached_png, save_cached_png, to_rgb
from mgs.ingest.orientation import estimate_up
from mgs.scene import Camera

log = logging.getLogger("mgs.ingest")

AXES = {"x": 0, "y": 1, "z": 2}


def opengl_to_colmap(c2w_gl: np.ndarray) -> np.ndarray:
    """Camera→world in OpenGL axes (x right, y up, z back) → world→camera in COLMAP axes."""
    c2w = np.asarray(c2w_gl, np.float64).copy()
    norms = np.linalg.norm(c2w[:3, :3], axis=0)
    c2w[:3, :3] /= norms  # some exports carry a scale in the rotation block
    c2w[:3, 1:3] *= -1    # flip camera y and z: OpenGL → OpenCV
    return np.linalg.inv(c2w)


def target_size(w: int, h: int, factor: int, width: int | None) -> tuple[int, int]:
    if width and w > width:
        return width, max(1, round(h * width / w))
    return max(1, w // factor), max(1, h // factor)  # floor, as the official downsample.py


def materialise(cameras: list[Camera], image_dir: Path, factor: int, width) -> list[Camera]:
    """Write each camera's image (downsampled, PNG) under `image_dir` once; scaled cameras."""
    jobs, result = [], []
    for cam in cameras:
        size = target_size(cam.width, cam.height, factor, width)
        name = cam.name if size == (cam.width, cam.height) else \
            Path(cam.name).with_suffix(".png").as_posix()
        K = np.diag([size[0] / cam.width, size[1] / cam.height, 1.0]) @ cam.K
        dst = image_dir / name
        result.append(Camera(name=name, K=K, width=size[0], height=size[1],
                             world_to_camera=cam.world_to_camera, image_path=dst))
        jobs.append((cam.image_path, dst, size))
    todo = [job for job in jobs if not _is_cached(*job)]
    if todo:
        log.info("writing %d image(s) to %s (%d already there)", len(todo), image_dir,
                 len(jobs) - len(todo))
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            list(tqdm(pool.map(lambda job: _write_image(*job), todo), total=len(todo),
                      desc="ingest: downsampling images", unit="img"))
    return result


def _is_cached(src: Path, dst: Path, size) -> bool:
    """`dst` was made from `src`'s current content (a byte copy or a tagged PNG)."""
    try:
        if not dst.is_file() or not src.is_file():
            return False
        digest = file_digest(src)
        with Image.open(dst) as img:
            if img.size != tuple(size):
                return False
        return (dst.stat().st_size == src.stat().st_size and file_digest(dst) == digest) or \
            read_cached_png(dst, size, digest) is not None
    except OSError:
        return False


def _write_image(src: Path, dst: Path, size) -> None:
    ensure_writable_dir(dst.parent)
    try:
        with Image.open(src) as img:
            if img.size == tuple(size):
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)  # no resampling needed: keep the original bytes
                return
            img.load()
            img = to_rgb(img, src).resize(tuple(size), Image.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {src} ({exc}); re-export or remove it") from exc
    with atomic_path(dst) as tmp:
        save_cached_png(img, tmp, file_digest(src))


def up_vector(up: str, world_to_cams) -> np.ndarray:
    """'auto' → from the cameras, snapped to the nearest axis within 20°; 'y' → ±y (sign from
    the cameras); '+y' / '-y' → as given."""
    up = up.strip().lower()
    estimate, method = estimate_up(world_to_cams)
    if up == "auto":
        axis = int(np.argmax(np.abs(estimate)))
        if abs(estimate[axis]) > np.cos(np.radians(20)):
            snapped = np.zeros(3)
            snapped[axis] = np.sign(estimate[axis])
            return snapped
        log.warning("the up direction %s (from %s) is not close to a coordinate axis; "
                    "partition grids will not be horizontal", np.round(estimate, 3).tolist(),
                    method)
        return estimate
    sign, letter = (-1.0 if up[0] == "-" else 1.0), up.lstrip("+-")
    if letter not in AXES or len(up) > 2:
        raise MgsError(f"--up must be auto, x, y, z, +x … or -z, got {up!r}")
    vec = np.zeros(3)
    vec[AXES[letter]] = 1.0
    if up[0] not in "+-":
        sign = 1.0 if estimate[AXES[letter]] >= 0 else -1.0
    return sign * vec
