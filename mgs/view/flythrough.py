"""`mgs render RUN --path orbit|cameras`: a fly-through video of a run's merged model.

`orbit` circles above the scene centre (the anchors' median) at the cameras' median height and
horizontal distance, looking at the centre. `cameras` follows the test (or train) cameras in
name order, positions interpolated linearly and orientations by spherical interpolation.
Frames are rendered like `mgs evaluate` renders (our rasterizer on the CPU, gsplat on CUDA) and
encoded as H.264 by the ffmpeg that imageio-ffmpeg ships. The default output,
RUN/video/flythrough.mp4, is linked from `mgs report`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mgs.atomic import atomic_path, refuse_overlap
from mgs.errors import InputError
from mgs.view.files import PATHS, VIDEO
from mgs.view.scene import RunView, intrinsics, look_at, vertical_fov

log = logging.getLogger("mgs.view.flythrough")



def orbit_poses(view: RunView, frames: int) -> list[np.ndarray]:
    """World-to-camera matrices on a circle above the scene centre, looking at it."""
    up, centre = view.up, view.centre
    offsets = np.array([c.center for c in view.scene.train_cameras()]) - centre
    heights = offsets @ up
    horizontal = offsets - heights[:, None] * up
    height = float(np.median(heights))
    extent = float(np.linalg.norm(view.partition.aabb[1] - view.partition.aabb[0]))
    radius = max(float(np.median(np.linalg.norm(horizontal, axis=1))), 0.25 * extent)
    if height <= 0:  # cameras below the centre (not an aerial capture): still look down
        height = 0.5 * radius
    first = horizontal[np.argmax(np.linalg.norm(horizontal, axis=1))]
    if np.linalg.norm(first) < 1e-9:
        first = np.cross(up, np.roll(up, 1))
    a = first / np.linalg.norm(first)
    b = np.cross(up, a)
    angles = np.linspace(0, 2 * math.pi, frames, endpoint=False)
    return [look_at(centre + radius * (math.cos(t) * a + math.sin(t) * b) + height * up,
                    centre, up) for t in angles]


def camera_path_poses(cameras: list, frames: int) -> list[np.ndarray]:
    """World-to-camera matrices through the cameras in order (at least two)."""
    from scipy.spatial.transform import Rotation, Slerp

    keys = np.arange(len(cameras), dtype=np.float64)
    centres = np.array([c.center for c in cameras])
    to_world = Rotation.from_matrix(np.array([c.world_to_camera[:3, :3].T for c in cameras]))
    times = np.linspace(0, len(cameras) - 1, frames)
    rotations = Slerp(keys, to_world)(times).as_matrix()
    poses = []
    for t, rotation in zip(times, rotations):
        position = np.array([np.interp(t, keys, centres[:, axis]) for axis in range(3)])
        viewmat = np.eye(4)
        viewmat[:3, :3] = rotation.T
        viewmat[:3, 3] = -rotation.T @ position
        poses.append(viewmat)
    return poses


def render_video(run_dir: str | Path, out: str | Path | None = None, path: str = "orbit",
                 split: str = "test", frames: int = 120, fps: int = 30,
                 size: tuple[int, int] | None = None, device: str = "auto") -> Path:
    """Render the fly-through and write it atomically as MP4; returns its path."""
    import imageio.v2 as imageio

    if path not in PATHS:
        raise InputError(f"unknown path {path!r}; use one of {', '.join(PATHS)}")
    if frames < 2 or fps < 1:
        raise InputError(f"--frames {frames} / --fps {fps}: need at least 2 frames and 1 fps")
    view = RunView(run_dir, device=device)
    out = Path(out) if out else view.root / VIDEO
    if out.suffix.lower() != ".mp4":
        raise InputError(f"--out {out}: the video is written as MP4; name it *.mp4")
    refuse_overlap(out, {"scene": view.root / "scene", "model": view.root / "model"}, "--out")
    cameras = view.scene.test_cameras() if split == "test" else view.scene.train_cameras()
    if not cameras:
        raise InputError(f"scene {view.scene.scene_dir} has no {split} views; use --split "
                         f"{'train' if split == 'test' else 'test'}")
    reference = cameras[0].scaled(view.factor)
    width, height = size or (reference.width // 2 * 2, reference.height // 2 * 2)
    K = intrinsics(vertical_fov(reference), width, height)
    if path == "orbit":
        poses = orbit_poses(view, frames)
    elif len(cameras) < 2:
        raise InputError(f"--path cameras needs two {split} views or more, the scene has "
                         f"{len(cameras)}; use --path orbit or --split train")
    else:
        poses = camera_path_poses(cameras, frames)
    log.info("rendering %d frames (%s path) at %dx%d with %s", frames, path, width, height,
             view.backend)
    with atomic_path(out) as tmp:
        # macro_block_size 2: keep the exact size (H.264 4:2:0 only needs even sides)
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                macro_block_size=2, ffmpeg_log_level="error") as writer:
            for viewmat in tqdm(poses, desc="fly-through", unit="frame"):
                writer.append_data(view.render(viewmat, K, width, height))
    log.info("wrote %s (%d frames, %d fps)", out, frames, fps)
    return out
