"""`mgs ingest transforms` on distorted captures: the synthetic scene's exact pinhole renderings
resampled through known lenses (OpenCV radial-tangential, with and without k3, and OpenCV
fisheye), ingested (undistorted by COLMAP), compared with the original (poses, images, points,
training). The lens models are written out here from their definitions, not taken from the
library under test."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import map_coordinates

from mgs.config import TrainConfig
from mgs.ingest.datasets import ingest
from mgs.scene import load_scene
from mgs.training_loop import train_scene
from test_transforms import (PIXEL_METRES, distance_to_city, opencv_to_opengl_c2w,
                             original, write_capture)  # noqa: F401 - `original`: the fixture

# Coefficients of the size colmap2nerf and ns-process-data write. The lens's focal lengths are
# the renderings' times a scale, so that every pixel the lens sees was rendered: barrel
# distortion and fisheyes see further out than a pinhole of the same focal length.
LENSES = {
    "opencv": ("OPENCV", dict(k1=-0.12, k2=0.03, p1=0.002, p2=-0.001), 1.15),
    "opencv_k3": ("OPENCV", dict(k1=-0.1, k2=0.02, k3=0.01, p1=0.0015, p2=0.001), 1.15),
    "fisheye": ("OPENCV_FISHEYE", dict(k1=0.05, k2=-0.01, k3=0.002, k4=-0.001), 1.25),
}


def distort_opencv(x, y, k1=0.0, k2=0.0, k3=0.0, p1=0.0, p2=0.0):
    """Normalised undistorted → distorted coordinates (OpenCV's radial-tangential model)."""
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def undistort_opencv(xd, yd, **coeffs):
    """Inverse of distort_opencv by fixed-point iteration (converges for moderate lenses)."""
    x, y = xd.copy(), yd.copy()
    for _ in range(100):
        dx, dy = distort_opencv(x, y, **coeffs)
        x, y = x - (dx - xd), y - (dy - yd)
    dx, dy = distort_opencv(x, y, **coeffs)
    assert max(np.abs(dx - xd).max(), np.abs(dy - yd).max()) < 1e-10
    return x, y


def undistort_fisheye(xd, yd, k1=0.0, k2=0.0, k3=0.0, k4=0.0):
    """Inverse of the OpenCV fisheye model θd = θ(1 + k1θ² + k2θ⁴ + k3θ⁶ + k4θ⁸) by Newton."""
    rd = np.hypot(xd, yd)
    theta = rd.copy()
    for _ in range(50):
        t2 = theta * theta
        f = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - rd
        df = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + t2 * 9 * k4)))
        theta = theta - f / df
    assert np.abs(f).max() < 1e-10
    scale = np.where(rd > 1e-12, np.tan(theta) / np.maximum(rd, 1e-12), 1.0)
    return xd * scale, yd * scale


def distort_image(pixels: np.ndarray, K: np.ndarray, K_lens: np.ndarray, model: str,
                  coeffs: dict) -> np.ndarray:
    """The image a camera with intrinsics K_lens and the lens sees, sampled (cubic) from the
    pinhole image `pixels` with intrinsics K. Pixel centres at integer + 0.5."""
    h, w = pixels.shape[:2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    xd, yd = (u - K_lens[0, 2]) / K_lens[0, 0], (v - K_lens[1, 2]) / K_lens[1, 1]
    invert = undistort_fisheye if model == "OPENCV_FISHEYE" else undistort_opencv
    x, y = invert(xd, yd, **coeffs)
    col, row = K[0, 0] * x + K[0, 2] - 0.5, K[1, 1] * y + K[1, 2] - 0.5
    # every distorted pixel must see the rendered pinhole frame (no blank borders)
    assert col.min() >= -0.5 and col.max() <= w - 0.5 and row.min() >= -0.5 and row.max() <= h - 0.5
    channels = [map_coordinates(pixels[..., c].astype(np.float64), [row, col], order=3,
                                mode="nearest") for c in range(pixels.shape[2])]
    return np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def write_distorted_capture(scene_dir: Path, folder: Path, model: str, coeffs: dict,
                            focal_scale: float, per_frame: bool = False,
                            ply: Path | None = None) -> Path:
    """A transforms.json capture of the scene through the lens: focal lengths `focal_scale` times
    the pinhole ones (so the lens sees only what was rendered), intrinsics and coefficients at
    the top level (colmap2nerf, ns-process-data) or per frame."""
    scene = load_scene(scene_dir)
    (folder / "images").mkdir(parents=True)
    frames, intrinsics = [], None
    for cam in scene.cameras:
        K_lens = cam.K.copy()
        K_lens[0, 0] *= focal_scale
        K_lens[1, 1] *= focal_scale
        pixels = np.asarray(Image.open(cam.image_path).convert("RGB"))
        Image.fromarray(distort_image(pixels, cam.K, K_lens, model, coeffs)).save(
            folder / "images" / cam.name)
        intrinsics = dict(fl_x=K_lens[0, 0], fl_y=K_lens[1, 1], cx=K_lens[0, 2], cy=K_lens[1, 2],
                          w=cam.width, h=cam.height, **coeffs)
        frame = {"file_path": f"images/{cam.name}",
                 "transform_matrix": opencv_to_opengl_c2w(cam.world_to_camera)}
        frames.append(frame | (intrinsics if per_frame else {}))
    meta = {"camera_model": model, "frames": frames} | ({} if per_frame else intrinsics)
    if ply is not None:
        shutil.copy(ply, folder / "points.ply")
        meta["ply_file_path"] = "points.ply"
    path = folder / "transforms.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def resample_pinhole(pixels: np.ndarray, K: np.ndarray, K_new: np.ndarray,
                     size: tuple[int, int]) -> np.ndarray:
    """A pinhole image seen by another pinhole camera at the same pose (K_new, size=(w, h))."""
    w, h = size
    v, u = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    x, y = (u - K_new[0, 2]) / K_new[0, 0], (v - K_new[1, 2]) / K_new[1, 1]
    col, row = K[0, 0] * x + K[0, 2] - 0.5, K[1, 1] * y + K[1, 2] - 0.5
    channels = [map_coordinates(pixels[..., c].astype(np.float64), [row, col], order=3,
                                mode="nearest") for c in range(pixels.shape[2])]
    return np.clip(np.stack(channels, -1), 0, 255)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / mse)


# ------------------------------------------------------------------------------ tests

def _capture(original: Path, folder: Path, lens: str, with_points: bool) -> Path:
    """The lens's capture; shared intrinsics for "opencv", per frame for the others; the
    scene's exact points as ply_file_path when `with_points`."""
    model, coeffs, scale = LENSES[lens]
    ply = None
    if with_points:
        ply = write_capture(original, folder.with_name(folder.name + "-pinhole"),
                            "nerfstudio").parent / "points.ply"
    return write_distorted_capture(original, folder, model, coeffs, scale,
                                   per_frame=lens != "opencv", ply=ply)


def _centre_error(ingested, truth) -> float:
    return max(float(np.abs(ingested.camera(cam.name).center - cam.center).max())
               for cam in truth.cameras)


@pytest.mark.parametrize("lens", list(LENSES))
def test_distorted_capture_is_undistorted_to_the_rendered_views(original, tmp_path, lens):
    """Each undistorted image is the rendering seen through the new PINHOLE camera (measured
    35-37 dB; the capture taken as pinhole, i.e. distortion ignored, scores 21-26 dB)."""
    capture = _capture(original, tmp_path / "capture", lens, with_points=True)
    scene = ingest("transforms", capture.parent, tmp_path / "scene")
    truth = load_scene(original)
    assert _centre_error(scene, truth) < 1e-4
    assert sorted(scene.test_names) == sorted(truth.test_names)
    assert np.allclose(scene.points_xyz, truth.points_xyz, atol=1e-4)
    for cam in truth.cameras:
        got = scene.camera(cam.name)
        assert np.abs(got.world_to_camera[:3, :3] - cam.world_to_camera[:3, :3]).max() < 1e-9
        assert got.K[0, 1] == 0 and got.image_path.parent == tmp_path / "scene" / "images"
        undistorted = np.asarray(Image.open(got.image_path).convert("RGB"))
        assert undistorted.shape[:2] == (got.height, got.width)
        rendered = resample_pinhole(np.asarray(Image.open(cam.image_path).convert("RGB")),
                                    cam.K, got.K, (got.width, got.height))
        assert psnr(undistorted, rendered) > 32.0, cam.name
    assert not list((tmp_path / "scene").glob(".undistort-*"))


TRAIN = dict(iterations=300, lr_max_steps=300, voxel_size=1.0, start_stat=30, update_from=50,
             update_interval=50, update_until=200, eval_interval=300, checkpoint_interval=300,
             threads=2, resolution=2, seed=7)


@pytest.fixture(scope="module")
def reference_training(original, tmp_path_factory):
    """The short run on the pinhole capture, ingested the same way (points triangulated)."""
    folder = tmp_path_factory.mktemp("reference")
    write_capture(original, folder / "capture", "ngp")
    ingest("transforms", folder / "capture", folder / "scene")
    return train_scene(folder / "scene", folder / "train", TrainConfig.from_dict(TRAIN))


@pytest.mark.slow
@pytest.mark.parametrize("lens", ["opencv", "fisheye"])
def test_distorted_capture_triangulates_and_trains_like_the_pinhole_one(
        original, reference_training, tmp_path, lens):
    """Points triangulated through the lens from the distorted images, then undistorted: the
    same geometry as the pinhole capture's, and the same test PSNR within 0.3 dB (each on its
    own test views: the undistorted ones are cropped to the lens's valid pixels)."""
    capture = _capture(original, tmp_path / "capture", lens, with_points=False)
    scene = ingest("transforms", capture.parent, tmp_path / "scene")
    assert _centre_error(scene, load_scene(original)) < 1e-4
    assert len(scene.points_xyz) > 200
    distance = distance_to_city(scene.points_xyz)
    assert np.median(distance) < 1.5 * PIXEL_METRES
    assert np.percentile(distance, 75) < 4 * PIXEL_METRES
    ours = train_scene(tmp_path / "scene", tmp_path / "train", TrainConfig.from_dict(TRAIN))
    assert ours["test_views"] == reference_training["test_views"] == 2
    assert ours["test_psnr"] == pytest.approx(reference_training["test_psnr"], abs=0.3)
