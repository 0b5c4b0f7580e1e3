"""`mgs ingest transforms`: instant-ngp and nerfstudio captures written from a synthetic scene with
exact poses, ingested back, compared with the original (poses, points, training)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from plyfile import PlyData, PlyElement

from mgs.cli import main
from mgs.config import TrainConfig
from mgs.ingest.datasets import ingest
from mgs.errors import InputError
from mgs.scene import load_scene
from mgs.synthetic import SyntheticConfig, build_city, make_synthetic_scene
from mgs.training_loop import train_scene

# From 200 m the renderer's periodic ground tiles blur out, so SIFT matches buildings, not tiles
# 24 m apart (see tests/test_sfm.py). One pixel covers 2·200·tan(30°)/240 ≈ 0.96 m of ground.
SYNTH = SyntheticConfig(seed=1, num_views=20, width=240, height=180, num_passes=2,
                        altitude=200.0, num_points=1500)
PIXEL_METRES = 2 * SYNTH.altitude * math.tan(math.radians(SYNTH.hfov_deg / 2)) / SYNTH.width


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "scene"
    make_synthetic_scene(out, SYNTH)
    return out


def opencv_to_opengl_c2w(world_to_camera: np.ndarray) -> list:
    """The transforms.json convention, straight from its definition: camera→world with the
    camera's y and z axes pointing up and back."""
    c2w = np.linalg.inv(world_to_camera)
    c2w[:3, 1] *= -1
    c2w[:3, 2] *= -1
    return c2w.tolist()


def write_capture(scene_dir: Path, folder: Path, convention: str) -> Path:
    """instant-ngp: shared camera_angle_x, file_path with extension, aabb_scale; nerfstudio:
    per-frame fl_x/fl_y/cx/cy/w/h, file_path without extension, zero OPENCV distortion, the
    scene's exact points as ply_file_path."""
    scene = load_scene(scene_dir)
    (folder / "images").mkdir(parents=True)
    frames = []
    for cam in scene.cameras:
        shutil.copy(cam.image_path, folder / "images" / cam.name)
        frame = {"transform_matrix": opencv_to_opengl_c2w(cam.world_to_camera)}
        if convention == "ngp":
            frame["file_path"] = f"images/{cam.name}"
        else:
            frame.update(file_path=f"images/{Path(cam.name).stem}", fl_x=cam.K[0, 0],
                         fl_y=cam.K[1, 1], cx=cam.K[0, 2], cy=cam.K[1, 2], w=cam.width,
                         h=cam.height, k1=0.0, k2=0.0, p1=0.0, p2=0.0)
        frames.append(frame)
    if convention == "ngp":
        cam = scene.cameras[0]
        meta = {"camera_angle_x": 2 * math.atan(cam.width / (2 * cam.K[0, 0])),
                "aabb_scale": 16, "frames": frames}
    else:
        vertex = np.empty(len(scene.points_xyz), dtype=[(k, "f4") for k in "xyz"]
                          + [(k, "u1") for k in ("red", "green", "blue")])
        for i, k in enumerate("xyz"):
            vertex[k] = scene.points_xyz[:, i]
        for i, k in enumerate(("red", "green", "blue")):
            vertex[k] = scene.points_rgb[:, i]
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(folder / "points.ply"))
        meta = {"camera_model": "OPENCV", "ply_file_path": "points.ply", "frames": frames}
    path = folder / "transforms.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def distance_to_city(points: np.ndarray) -> np.ndarray:
    """Distance of each point to the nearest surface of the synthetic city (ground or box)."""
    city = build_city(SYNTH)
    distance = np.abs(points[:, 2])
    for low, high in zip(city.box_min, city.box_max):
        outside = np.linalg.norm(np.maximum(low - points, 0) + np.maximum(points - high, 0), axis=1)
        inside = np.min(np.minimum(points - low, high - points), axis=1)
        distance = np.minimum(distance, np.where(outside > 0, outside, np.abs(inside)))
    return distance


def assert_same_cameras(ingested: Path, original: Path) -> None:
    a, b = load_scene(ingested), load_scene(original)
    assert sorted(a.train_names) == sorted(b.train_names)
    assert sorted(a.test_names) == sorted(b.test_names)
    for cam in b.cameras:
        got = a.camera(cam.name)
        assert np.abs(got.center - cam.center).max() < 1e-5
        assert np.abs(got.world_to_camera[:3, :3] - cam.world_to_camera[:3, :3]).max() < 1e-5
        assert np.abs(got.K - cam.K).max() < 1e-5
        assert (got.width, got.height) == (cam.width, cam.height)


@pytest.mark.slow
def test_instant_ngp_capture_round_trips_and_triangulates_near_the_geometry(original,
                                                                            tmp_path):
    write_capture(original, tmp_path / "ngp", "ngp")
    out = tmp_path / "scene"
    assert main(["ingest", "transforms", str(tmp_path / "ngp"), str(out)]) == 0
    assert_same_cameras(out, original)
    scene = load_scene(out)
    assert "aabb_scale=16" in scene.source
    assert scene.up.tolist() == [0.0, 0.0, 1.0]  # nadir cameras: z up
    # triangulated from the images and the given poses: most points lie on the city's
    # surfaces within about a pixel's footprint (measured: median 0.85 m, 90 % within 4.4 m)
    assert len(scene.points_xyz) > 200
    distance = distance_to_city(scene.points_xyz)
    assert np.median(distance) < 1.5 * PIXEL_METRES
    assert np.percentile(distance, 75) < 4 * PIXEL_METRES


@pytest.mark.slow
def test_nerfstudio_capture_trains_like_the_original(original, tmp_path):
    """Same seed, same points (the ply), same images: the two scenes differ only by the pose
    round trip (float64, ~1e-13), so training must give the same test PSNR; 0.05 dB allows
    for float32 rounding differences that densification can amplify."""
    write_capture(original, tmp_path / "ns", "nerfstudio")
    out = tmp_path / "scene"
    scene = main_ingest(tmp_path / "ns", out)
    assert_same_cameras(out, original)
    assert np.allclose(scene.points_xyz, load_scene(original).points_xyz, atol=1e-4)
    config = TrainConfig.from_dict(dict(
        iterations=30, lr_max_steps=30, voxel_size=1.0, start_stat=5, update_from=5,
        update_interval=10, update_until=20, eval_interval=30, checkpoint_interval=30,
        threads=2, resolution=2, seed=7))
    ours = train_scene(out, tmp_path / "train_ingested", config)
    reference = train_scene(original, tmp_path / "train_original", config)
    assert ours["test_views"] == reference["test_views"] == 2
    assert ours["test_psnr"] == pytest.approx(reference["test_psnr"], abs=0.05)


def main_ingest(src: Path, out: Path):
    return ingest("transforms", src, out)


def _edit(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta["frames"][3].update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("change, expected", [
    ({"camera_model": "EQUIRECTANGULAR"}, "camera model EQUIRECTANGULAR cannot be undistorted"),
    ({"k4": 0.01}, "k4=0.01 (an r^8 term) cannot be undistorted"),
    ({"camera_model": "OPENCV_FISHEYE", "p1": 0.001},
     "fisheye lens with tangential distortion p1=0.001"),
])
def test_lenses_colmap_cannot_undistort_are_refused_with_the_fix(original, tmp_path, capsys,
                                                                change, expected):
    """OpenCV and fisheye lenses are undistorted on ingest (tests/test_undistort.py); the rest
    is refused, naming the frame, the lens and the fix."""
    path = write_capture(original, tmp_path / "ns", "nerfstudio")
    _edit(path, **change)
    out = tmp_path / "scene"
    assert main(["ingest", "transforms", str(path.parent), str(out)]) == 2
    message = capsys.readouterr().err
    assert str(path) in message and "frame 3" in message and expected in message
    assert "undistort the images first" in message and "COLMAP" in message
    assert not (out / "scene.json").exists()


def test_missing_image_and_bad_matrix_name_the_frame(original, tmp_path):
    path = write_capture(original, tmp_path / "ngp", "ngp")
    _edit(path, file_path="images/nowhere")
    with pytest.raises(InputError, match=r"frame 3 .*nowhere.* does not exist"):
        main_ingest(path, tmp_path / "a")
    path = write_capture(original, tmp_path / "ngp2", "ngp")
    _edit(path, transform_matrix=[[1, 0], [0, 1]])
    with pytest.raises(InputError, match=r"frame 3 .*transform_matrix"):
        main_ingest(path, tmp_path / "b")


def test_workflow_plans_a_transforms_scene(original, tmp_path):
    """`snakemake -n` with source: transforms: the ingest job calls `mgs ingest transforms`."""
    from test_workflow import copy_workflow, snakemake

    capture = tmp_path / "capture"
    write_capture(original, capture, "ngp")
    (tmp_path / "wf").mkdir()
    workdir = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((workdir / "config" / "ci.yaml").read_text())
    scene = next(iter(config["scenes"].values()))
    scene.update(source="transforms", path=str(capture))
    scene.pop("synthetic", None)
    path = workdir / "transforms.yaml"
    path.write_text(yaml.safe_dump({"scenes": {"capture": scene}}))
    result = snakemake(workdir, "--dry-run", "--printshellcmds", f"--configfile={path}")
    assert "rule scene_ingest:" in result.stdout
    assert f"mgs ingest transforms {capture}" in result.stdout


def test_nerfstudio_split_lists_are_kept(original, tmp_path):
    path = write_capture(original, tmp_path / "ns", "nerfstudio")
    meta = json.loads(path.read_text())
    meta["test_filenames"] = ["images/view_0003.png", "images/view_0011"]
    path.write_text(json.dumps(meta))
    scene = main_ingest(path.parent, tmp_path / "scene")
    assert scene.test_names == ["view_0003.png", "view_0011.png"]
    assert len(scene.train_names) == SYNTH.num_views - 2
