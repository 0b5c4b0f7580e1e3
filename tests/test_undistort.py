"""`mgs ingest transforms` on distorted captures: the synthetic city traced through known lenses
(OpenCV radial-tangential, with and without k3, and OpenCV fisheye) from the synthetic scene's
poses, ingested (undistorted by COLMAP), compared with the truth (poses, rendered views, points,
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

from mgs.config import TrainConfig
from mgs.ingest.datasets import ingest
from mgs.scene import Camera, load_scene
from mgs.synthetic import build_city, render_view, to_uint8, trace
from mgs.training_loop import train_scene
from test_transforms import (PIXEL_METRES, SYNTH, distance_to_city, opencv_to_opengl_c2w,
                             original, write_capture)  # noqa: F401 - `original`: the fixture

# Coefficients of the size colmap2nerf and ns-process-data write, with the scene's K
LENSES = {
    "opencv": ("OPENCV", dict(k1=-0.12, k2=0.03, p1=0.002, p2=-0.001)),
    "opencv_k3": ("OPENCV", dict(k1=-0.1, k2=0.02, k3=0.01, p1=0.0015, p2=0.001)),
    "fisheye": ("OPENCV_FISHEYE", dict(k1=0.05, k2=-0.01, k3=0.002, k4=-0.001)),
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
    """Inverse of the OpenCV fisheye model θd = θ(1 + k1θ² + k2θ⁴ + k3θ⁶ + k4θ⁸) (Newton)."""
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


def render_through_lens(city, cam: Camera, model: str, coeffs: dict,
                        supersample: int = 2) -> np.ndarray:
    """The synthetic city seen through the lens: camera `cam` (its K is the lens's) with each
    pixel's rays bent by the distortion, traced exactly (no resampling of a pinhole image)."""
    s = supersample
    offsets = (np.arange(s) + 0.5) / s
    rows, cols = np.mgrid[0:cam.height, 0:cam.width]
    u = (cols[..., None, None] + offsets[None, None, None, :]).repeat(s, axis=2).ravel()
    v = (rows[..., None, None] + offsets[None, None, :, None]).repeat(s, axis=3).ravel()
    K = cam.K
    invert = undistort_fisheye if model == "OPENCV_FISHEYE" else undistort_opencv
    x, y = invert((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], **coeffs)
    colour, _, _ = trace(city, cam, K[0, 0] * x + K[0, 2], K[1, 1] * y + K[1, 2])
    return to_uint8(colour.reshape(cam.height, cam.width, s * s, 3).mean(axis=2))


def write_distorted_capture(scene_dir: Path, folder: Path, model: str, coeffs: dict,
                            per_frame: bool = False, ply: Path | None = None,
                            views: int | None = None) -> Path:
    """A transforms.json capture of the synthetic scene through the lens (same poses and K as
    the scene's cameras; the first `views` of them), with intrinsics and coefficients at the
    top level (as colmap2nerf and ns-process-data write them) or per frame."""
    scene = load_scene(scene_dir)
    city = build_city(SYNTH)
    (folder / "images").mkdir(parents=True)
    frames, intrinsics = [], None
    for cam in scene.cameras[:views]:
        Image.fromarray(render_through_lens(city, cam, model, coeffs)).save(
            folder / "images" / cam.name)
        intrinsics = dict(fl_x=cam.K[0, 0], fl_y=cam.K[1, 1], cx=cam.K[0, 2], cy=cam.K[1, 2],
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


def half_res_psnr(a, b) -> float:
    """PSNR of two images after 2x2 averaging: the undistorter's bilinear resampling costs
    single-pixel detail (about 29 dB at full size, a render against itself moved half a pixel
    bilinearly), a misplaced lens moves whole pixels."""
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a, b = (x[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean((1, 3)) for x in (a, b))
    return 10 * math.log10(255.0 ** 2 / np.mean((a - b) ** 2))


# undistorted views against the truth, at half resolution: measured 33.7-34.8 dB; the captured
# views taken as pinhole ones (the lens ignored): 22.5-29.2 dB
PSNR_MIN = 32.0


# ------------------------------------------------------------------------------ tests

def _capture(original: Path, folder: Path, lens: str, with_points: bool,
             views: int | None = None) -> Path:
    """The lens's capture; shared intrinsics for "opencv", per frame for the others; the
    scene's exact points as ply_file_path when `with_points`."""
    model, coeffs = LENSES[lens]
    ply = None
    if with_points:
        ply = write_capture(original, folder.with_name(folder.name + "-pinhole"),
                            "nerfstudio").parent / "points.ply"
    return write_distorted_capture(original, folder, model, coeffs, per_frame=lens != "opencv",
                                   ply=ply, views=views)


def _centre_error(ingested, truth) -> float:
    return max(float(np.abs(ingested.camera(cam.name).center - truth.camera(cam.name).center)
                         .max()) for cam in ingested.cameras)


@pytest.mark.parametrize("lens", list(LENSES))
def test_distorted_capture_is_undistorted_to_the_rendered_views(original, tmp_path, lens):
    """Each undistorted image is the city rendered by the PINHOLE camera it comes with."""
    capture = _capture(original, tmp_path / "capture", lens, with_points=True, views=4)
    scene = ingest("transforms", capture.parent, tmp_path / "scene")
    truth, city = load_scene(original), build_city(SYNTH)
    assert len(scene.cameras) == 4 and _centre_error(scene, truth) < 1e-4
    assert np.allclose(scene.points_xyz, truth.points_xyz, atol=1e-4)
    for got in scene.cameras:
        cam = truth.camera(got.name)
        assert np.abs(got.world_to_camera[:3, :3] - cam.world_to_camera[:3, :3]).max() < 1e-9
        assert got.image_path.parent == tmp_path / "scene" / "images"
        undistorted = np.asarray(Image.open(got.image_path).convert("RGB"))
        assert undistorted.shape[:2] == (got.height, got.width)
        assert half_res_psnr(undistorted, render_view(city, got) * 255) > PSNR_MIN, got.name
    assert not list((tmp_path / "scene").glob(".undistort-*"))


def test_ignoring_the_lens_would_fail_the_check(original, tmp_path):
    """The control for the test above: a captured image taken as the pinhole view it is not."""
    capture = _capture(original, tmp_path / "capture", "opencv", with_points=False, views=1)
    cam = load_scene(original).cameras[0]
    captured = np.asarray(Image.open(capture.parent / "images" / cam.name).convert("RGB"))
    assert half_res_psnr(captured, render_view(build_city(SYNTH), cam) * 255) < PSNR_MIN - 2


@pytest.mark.slow
@pytest.mark.parametrize("lens", ["opencv", "fisheye"])
def test_points_are_triangulated_through_the_lens(original, tmp_path, lens):
    """Without ply_file_path the points are triangulated from the distorted images with their
    lens, then kept through the undistortion: they lie on the city's surfaces like those of the
    pinhole capture (measured median distance 0.96 m OPENCV, 0.90 m fisheye, 0.85 m pinhole;
    a pixel covers 0.96 m)."""
    capture = _capture(original, tmp_path / "capture", lens, with_points=False)
    scene = ingest("transforms", capture.parent, tmp_path / "scene")
    assert _centre_error(scene, load_scene(original)) < 1e-4
    assert len(scene.points_xyz) > 200
    distance = distance_to_city(scene.points_xyz)
    assert np.median(distance) < 1.5 * PIXEL_METRES
    assert np.percentile(distance, 75) < 4 * PIXEL_METRES


TRAIN = dict(iterations=300, lr_max_steps=300, voxel_size=1.0, start_stat=30, update_from=50,
             update_interval=50, update_until=200, eval_interval=300, checkpoint_interval=300,
             threads=2, resolution=2, seed=7)


@pytest.fixture(scope="module")
def reference_training(original, tmp_path_factory):
    """The short run on the original pinhole scene."""
    return train_scene(original, tmp_path_factory.mktemp("reference"),
                       TrainConfig.from_dict(TRAIN))


@pytest.mark.slow
@pytest.mark.parametrize("lens", ["opencv", "fisheye"])
def test_distorted_capture_trains_like_the_original(original, reference_training, tmp_path,
                                                    lens):
    """Same points (the ply), same seed: the undistorted capture's test PSNR is no more than
    0.3 dB below the original's, each on its own test views. Measured (300 steps, resolution
    2, CPU): original 26.78 dB, OPENCV 27.36 dB, fisheye 26.96 dB. The undistorted scenes score
    higher, not lower: their views are cropped to the lens's valid pixels (they frame more of
    the city) and were resampled bilinearly (smoother to fit), so the bound is one-sided."""
    capture = _capture(original, tmp_path / "capture", lens, with_points=True)
    ingest("transforms", capture.parent, tmp_path / "scene")
    ours = train_scene(tmp_path / "scene", tmp_path / "train", TrainConfig.from_dict(TRAIN))
    assert ours["test_views"] == reference_training["test_views"] == 2
    assert ours["test_psnr"] > reference_training["test_psnr"] - 0.3
