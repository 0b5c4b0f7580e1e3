"""Undistortion to PINHOLE with COLMAP's undistorter, shared by `mgs sfm` (its own model) and
`mgs ingest transforms` (a capture's OpenCV or fisheye lens with the given poses).

COLMAP resamples every image through its camera's distortion and crops to the pixels that are
valid in the distorted image, so the PINHOLE cameras it writes have their own size and K."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mgs.pycolmap_import import pycolmap

from mgs.scene import Camera

# COLMAP models whose distortion the undistorter inverts, with their parameters after fx fy cx cy
LENS_PARAMS = {
    "PINHOLE": (),
    "OPENCV": ("k1", "k2", "p1", "p2"),
    "FULL_OPENCV": ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
    "OPENCV_FISHEYE": ("k1", "k2", "k3", "k4"),
}


@dataclass(frozen=True)
class Lens:
    """A camera's COLMAP model and its distortion parameters (COLMAP's order, K left out)."""

    model: str = "PINHOLE"
    params: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.params) != len(LENS_PARAMS[self.model]):
            raise ValueError(f"{self.model} takes {LENS_PARAMS[self.model]}, got {self.params}")

    @property
    def distorts(self) -> bool:
        return self.model != "PINHOLE"

    def colmap_camera(self, cam: Camera, camera_id: int) -> pycolmap.Camera:
        K = cam.K
        return pycolmap.Camera(model=self.model, width=cam.width, height=cam.height,
                               params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2], *self.params],
                               camera_id=camera_id)


PINHOLE = Lens()


def posed_reconstruction(cameras: list[Camera], lenses: dict[str, Lens]) -> pycolmap.Reconstruction:
    """One COLMAP camera per image with its lens, and the given poses; no points."""
    rec = pycolmap.Reconstruction()
    for image_id, cam in enumerate(cameras, start=1):
        rec.add_camera_with_trivial_rig(lenses.get(cam.name, PINHOLE).colmap_camera(cam, image_id))
        pose = pycolmap.Rigid3d(
            pycolmap.Rotation3d(np.ascontiguousarray(cam.world_to_camera[:3, :3])),
            np.ascontiguousarray(cam.world_to_camera[:3, 3]))
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=cam.name, camera_id=image_id, image_id=image_id), pose)
    return rec


def undistort_model(rec: pycolmap.Reconstruction, image_dir: Path, work: Path,
                    threads: int = -1) -> Path:
    """Undistort `rec` and its images (in `image_dir`) to PINHOLE under `work`; returns the
    folder that holds the result as ``images/`` and ``sparse/`` (COLMAP's layout)."""
    (work / "distorted").mkdir()
    rec.write(work / "distorted")
    pycolmap.undistort_images(work / "undistorted", work / "distorted", image_dir,
                              num_threads=threads)
    return work / "undistorted"


def replace_dir(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`, replacing it; an old `dst` is parked first and removed after."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
