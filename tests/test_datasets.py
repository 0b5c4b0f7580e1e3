"""`mgs ingest`: tiny fake copies of the Mill-19, UrbanScene3D, MatrixCity and COLMAP layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from mgs.cli import main
from mgs.ingest.datasets import ingest
from mgs.ingest.frames import opengl_to_colmap
from mgs.errors import InputError, MgsError
from mgs.scene import Camera, load_scene, write_colmap
from mgs.synthetic import look_at_pose

W, H = 64, 48


def y_up_pose(x: float, z: float) -> np.ndarray:
    """Nadir camera 40 m above the ground of a y-up world (Mill-19 / UrbanScene3D style)."""
    pose = look_at_pose(np.array([x, z, 40.0]), 0.0, 0.0)  # built in a z-up world
    z_to_y_up = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # rotation: e_z → e_y
    pose[:3, :3] = pose[:3, :3] @ z_to_y_up.T
    return pose


def write_split(folder: Path, count: int, seed: int, points: bool = True) -> list[Camera]:
    """`folder`/{images,sparse/0}: random JPEGs (same names in every split, as Mill-19)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    K = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    cameras = []
    for i in range(count):
        name = f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            folder / "images" / name, quality=95)
        cameras.append(Camera(name, K, W, H, y_up_pose(10.0 * i + seed, 5.0 * (i % 2)),
                              folder / "images" / name))
    xyz = rng.uniform(-20, 20, (50 if points else 0, 3)) * [1, 0.1, 1]
    write_colmap(cameras, xyz, rng.integers(0, 255, xyz.shape, dtype=np.uint8),
                 folder / "sparse" / "0")
    return cameras


@pytest.fixture
def mill19(tmp_path) -> Path:
    src = tmp_path / "rubble-pixsfm"
    write_split(src / "train", 6, seed=0)
    write_split(src / "val", 2, seed=1)
    return src


@pytest.mark.parametrize("dataset", ["mill19", "urbanscene3d"])
def test_megenerf_layout(mill19, tmp_path, dataset):
    out = tmp_path / "scene"
    scene = ingest(dataset, mill19, out)
    assert sorted(scene.train_names) == [f"train_{i:06d}.png" for i in range(6)]
    assert scene.test_names == ["val_000000.png", "val_000001.png"]
    loaded = load_scene(out)
    assert loaded.up.tolist() == [0.0, 1.0, 0.0]  # y up, sign from the nadir cameras
    train_points = pycolmap.Reconstruction(str(mill19 / "train" / "sparse" / "0"))
    assert len(loaded.points_xyz) == train_points.num_points3D() == 50
    for cam in loaded.cameras:
        assert (cam.width, cam.height) == (W // 4, H // 4)
        with Image.open(cam.image_path) as img:
            assert img.size == (cam.width, cam.height)
        assert cam.K[0, 0] == pytest.approx(60.0 / 4)
    # Poses unchanged: a val camera keeps its world_to_camera.
    val = Camera("x", np.eye(3), W, H, y_up_pose(10.0 + 1, 5.0), Path("x"))
    assert np.allclose(loaded.camera("val_000001.png").world_to_camera, val.world_to_camera)
    # A rerun reuses the downsampled images.
    mtime = loaded.cameras[0].image_path.stat().st_mtime_ns
    ingest(dataset, mill19, out)
    assert loaded.cameras[0].image_path.stat().st_mtime_ns == mtime


def test_missing_val_or_sparse_names_the_path(mill19, tmp_path):
    (mill19 / "val").rename(mill19 / "validation")
    with pytest.raises(InputError, match=r"val folder .*rubble-pixsfm/val does not exist"):
        ingest("mill19", mill19, tmp_path / "out")
    (mill19 / "validation").rename(mill19 / "val")
    for path in (mill19 / "train" / "sparse" / "0").iterdir():
        path.unlink()
    (mill19 / "train" / "sparse" / "0").rmdir()
    with pytest.raises(InputError, match=r"train/sparse/0 does not exist"):
        ingest("mill19", mill19, tmp_path / "out")
    assert not (tmp_path / "out" / "scene.json").exists()


def test_cli_ingest(mill19, tmp_path, capsys):
    assert main(["ingest", "mill19", str(mill19), str(tmp_path / "a"), "--factor", "2"]) == 0
    assert load_scene(tmp_path / "a").cameras[0].width == W // 2
    assert main(["ingest", "mill19", str(tmp_path / "nothing"), str(tmp_path / "b")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err


def test_distortion_is_dropped_with_a_warning(mill19, tmp_path, caplog):
    model_dir = mill19 / "train" / "sparse" / "0"
    rec = pycolmap.Reconstruction(str(model_dir))
    cam = rec.cameras[1]
    rec.cameras[1] = pycolmap.Camera(model="SIMPLE_RADIAL", width=cam.width, height=cam.height,
                                     params=[60.0, W / 2, H / 2, 0.05], camera_id=1)
    rec.write(str(model_dir))
    scene = ingest("mill19", mill19, tmp_path / "out")
    assert "distortion" in caplog.text
    assert scene.camera("train_000000.png").K[0, 0] == pytest.approx(15.0)


# ---------------------------------------------------------------- MatrixCity

def gl_look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera→world in OpenGL axes (x right, y up, z back) looking from centre to target."""
    back = (centre - target) / np.linalg.norm(centre - target)
    right = np.cross([0.0, 0.0, 1.0], back)
    right = right / np.linalg.norm(right) if np.linalg.norm(right) > 1e-9 else np.array([1.0, 0, 0])
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, up, back], 1)
    c2w[:3, 3] = centre
    return c2w


def write_matrixcity(src: Path, targets: dict) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        folder = src / split / "block_all"
        (folder / "input").mkdir(parents=True)
        frames = []
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(
                folder / "input" / f"{i:04d}.png")
            centre = np.array([3.0 * i, -2.0, 5.0])
            frames.append({"file_path": f"input/{i:04d}",
                           "transform_matrix": gl_look_at(centre, targets[split]).tolist()})
        meta = {"fl_x": 200.0, "fl_y": 200.0, "cx": 80.0, "cy": 45.0, "w": 160, "h": 90,
                "frames": frames}
        (folder / f"transforms_{split}.json").write_text(json.dumps(meta))
    xyz = rng.uniform(-5, 5, (30, 3))
    write_colmap([], xyz, np.zeros((30, 3), np.uint8), src / "train" / "block_all" / "sparse" / "0")


def test_matrixcity_axes_and_projection(tmp_path):
    src = tmp_path / "aerial"
    target = np.array([1.0, 2.0, 0.0])
    write_matrixcity(src, {"train": target, "test": target})
    scene = ingest("matrixcity", src, tmp_path / "scene", width=80)
    loaded = load_scene(tmp_path / "scene")
    assert len(loaded.train_names) == 4 and len(loaded.test_names) == 2
    assert len(loaded.points_xyz) == 30
    assert loaded.up.tolist() == [0.0, 0.0, 1.0]
    for cam in loaded.cameras:
        assert (cam.width, cam.height) == (80, 45)
        # The look-at target projects to the principal point, in front of the camera.
        p = cam.world_to_camera[:3, :3] @ target + cam.world_to_camera[:3, 3]
        assert p[2] > 0
        uv = (cam.K @ p)[:2] / p[2]
        assert np.allclose(uv, [40.0, 22.5], atol=1e-6)
    # A point up and to the right of the target (in the camera's view) lands up-right in the image.
    c2w = gl_look_at(np.array([0.0, -2.0, 5.0]), target)
    cam = scene.camera("train_0000.png")
    depth = np.linalg.norm(target - c2w[:3, 3])
    point = target + c2w[:3, 0] * 0.1 + c2w[:3, 1] * 0.2
    p = cam.world_to_camera[:3, :3] @ point + cam.world_to_camera[:3, 3]
    uv = (cam.K @ p)[:2] / p[2]
    assert np.allclose(uv, [40 + 100 * 0.1 / depth, 22.5 - 100 * 0.2 / depth], atol=1e-9)


def test_opengl_to_colmap_flips_y_and_z():
    c2w = np.eye(4)
    c2w[:3, 3] = [1, 2, 3]
    w2c = opengl_to_colmap(c2w)
    assert np.allclose(w2c[:3, :3], np.diag([1, -1, -1]))
    assert np.allclose(w2c[:3, :3] @ [1, 2, 3] + w2c[:3, 3], 0)


def test_matrixcity_missing_test_or_points(tmp_path):
    src = tmp_path / "aerial"
    write_matrixcity(src, {"train": np.zeros(3), "test": np.zeros(3)})
    (src / "test").rename(tmp_path / "moved")
    with pytest.raises(InputError, match=r"test folder .*aerial/test/block_all does not exist"):
        ingest("matrixcity", src, tmp_path / "out")
    (tmp_path / "moved").rename(src / "test")
    for path in (src / "train" / "block_all" / "sparse" / "0").iterdir():
        path.unlink()
    (src / "train" / "block_all" / "sparse" / "0").rmdir()
    with pytest.raises(InputError, match=r"block_all/sparse/0 does not exist"):
        ingest("matrixcity", src, tmp_path / "out")


# ------------------------------------------------------------------- COLMAP

def test_colmap_in_place_and_downsampled(tmp_path):
    src = tmp_path / "undistorted"
    cameras = write_split(src, 12, seed=2)
    scene = ingest("colmap", src, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "scene.json").read_text())
    assert meta["image_dir"] == "../undistorted/images"  # factor 1: images used in place
    assert scene.test_names == [cameras[0].name, cameras[10].name]
    scaled = ingest("colmap", src, tmp_path / "b", factor=2)
    assert scaled.cameras[0].width == W // 2 and scaled.cameras[0].name.endswith(".png")
    assert load_scene(tmp_path / "b").cameras[0].image_path.parent == tmp_path / "b" / "images"


def test_colmap_distorted_model_is_refused(tmp_path):
    src = tmp_path / "raw"
    write_split(src, 3, seed=3)
    rec = pycolmap.Reconstruction(str(src / "sparse" / "0"))
    rec.cameras[1] = pycolmap.Camera(model="SIMPLE_RADIAL", width=W, height=H,
                                     params=[60.0, W / 2, H / 2, 0.1], camera_id=1)
    rec.write(str(src / "sparse" / "0"))
    with pytest.raises(InputError, match="undistort"):
        ingest("colmap", src, tmp_path / "out")


def test_colmap_missing_model_and_bad_arguments(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match=r"src/sparse/0 does not exist"):
        ingest("colmap", tmp_path / "src", tmp_path / "out")
    with pytest.raises(MgsError, match="unknown dataset"):
        ingest("kitti", tmp_path / "src", tmp_path / "out")
    write_split(tmp_path / "ok", 3, seed=4)
    with pytest.raises(MgsError, match="--up"):
        ingest("colmap", tmp_path / "ok", tmp_path / "out", up="w")
    assert ingest("colmap", tmp_path / "ok", tmp_path / "out", up="-y").up.tolist() == [0, -1, 0]
