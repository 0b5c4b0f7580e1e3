"""`mgs sfm`: real drone photos, the synthetic city as an accuracy check, bad inputs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from mgs.cli import main
from mgs.errors import InputError, MgsError
from mgs.scene import load_image, load_scene
from mgs.ingest.orientation import estimate_up, orientation, umeyama, wgs84_to_enu
from mgs.ingest.sfm import REPORT_JSON, SfmConfig, _check_registered, list_images, run_sfm
from mgs.synthetic import SyntheticConfig, look_at_pose, make_synthetic_scene

CALITERRA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "caliterra" / "images"
FAST = dict(max_image_size=800, max_features=2048)


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.fixture(scope="module")
def caliterra12(tmp_path_factory) -> Path:
    """12 consecutive drone photos (one flight line), linked — never copied."""
    if not CALITERRA.is_dir():
        pytest.skip(f"real photos not found at {CALITERRA} (../shared/data/caliterra)")
    folder = tmp_path_factory.mktemp("caliterra12")
    for path in sorted(CALITERRA.glob("*.jpg"))[20:32]:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """20 views from 200 m: high enough that the renderer's periodic ground textures (one tile
    every 12–24 m) blur out and buildings dominate the features; from 90 m, or without
    anti-aliasing, SIFT matches tiles 24 m apart and SfM fails (measured)."""
    out = tmp_path_factory.mktemp("synth") / "scene"
    make_synthetic_scene(out, SyntheticConfig(seed=1, num_views=20, width=400, height=300,
                                              num_passes=2, altitude=200.0, num_points=500))
    return out


# ------------------------------------------------------------ real photos

@pytest.mark.slow
def test_real_photos_register_with_subpixel_error(caliterra12, tmp_path):
    out = tmp_path / "scene"
    scene = run_sfm(caliterra12, out, SfmConfig(**FAST))
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["registered"] >= 10 and report["total"] == 12
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert {cam.model.name for cam in rec.cameras.values()} == {"PINHOLE"}
    assert rec.compute_mean_reprojection_error() < 1.0
    assert report["reprojection_error_px"] < 1.0
    # Oriented: east/north metres from the EXIF GPS (Dripping Springs, Texas) ...
    assert "GPS" in report["orientation"]
    assert np.allclose(report["origin_wgs84"], [30.17, -98.09], atol=0.01)
    # ... and up from the geometry: nadir cameras look down (−z) and fly above the points.
    loaded = load_scene(out)
    assert loaded.up.tolist() == [0.0, 0.0, 1.0]
    view_z = np.mean([cam.world_to_camera[2, 2] for cam in loaded.cameras])
    assert view_z < -0.9
    assert np.median([c.center[2] for c in loaded.cameras]) > np.median(loaded.points_xyz[:, 2])
    assert len(loaded.test_names) == 2 and loaded.test_names[0] == sorted(
        c.name for c in scene.cameras)[0]
    for cam in loaded.cameras:
        assert cam.image_path.is_file() and cam.image_path.parent == out / "images"
    assert load_image(loaded.cameras[0]).shape == (loaded.cameras[0].height,
                                                   loaded.cameras[0].width, 3)


@pytest.mark.slow
def test_real_photos_spatial_matching_uses_gps(caliterra12, tmp_path):
    out = tmp_path / "scene"
    run_sfm(caliterra12, out, SfmConfig(matching="spatial", **FAST))
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["registered"] >= 10
    assert report["reprojection_error_px"] < 1.0


# ---------------------------------------------------- synthetic accuracy

@pytest.mark.slow
def test_synthetic_camera_centres_within_one_percent(synth, tmp_path):
    out = tmp_path / "sfm"
    assert main(["sfm", str(synth / "images"), str(out), "--max-features", "4096"]) == 0
    truth, recovered = load_scene(synth), load_scene(out)
    names = [c.name for c in recovered.cameras]
    assert len(names) >= 18
    gt = np.stack([truth.camera(n).center for n in names])
    est = np.stack([recovered.camera(n).center for n in names])
    scale, rotation, t = umeyama(est, gt)
    error = np.linalg.norm(scale * est @ rotation.T + t - gt, axis=1)
    size = np.linalg.norm(gt.max(0) - gt.min(0))
    print(f"synthetic SfM: max centre error {error.max() / size:.2e}, "
          f"mean {error.mean() / size:.2e} of the scene size ({size:.1f} m)")
    assert error.max() < 0.01 * size
    # The orientation step found the true up: only a rotation about z remains.
    assert rotation[2, 2] > np.cos(np.radians(2))


def test_spatial_matching_without_gps_is_a_clear_error(synth, tmp_path):
    with pytest.raises(InputError, match="GPS.*exhaustive"):
        run_sfm(synth / "images", tmp_path / "out", SfmConfig(matching="spatial", **FAST))
    assert not (tmp_path / "out" / "scene.json").exists()
    assert not list((tmp_path / "out").glob(".sfm-*"))  # work folder cleaned up


# --------------------------------------------------------------- bad input

def test_empty_folder(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    with pytest.raises(InputError, match="0 readable image"):
        run_sfm(tmp_path / "photos", tmp_path / "out")
    assert main(["sfm", str(tmp_path / "photos"), str(tmp_path / "out")]) == 2
    assert "at least 3" in capsys.readouterr().err


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_images(tmp_path / "nope")


def test_non_images_and_corrupt_jpeg_are_skipped_with_warnings(synth, tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((synth / "images").glob("*.png"))[:4]:
        shutil.copy(path, photos / path.name)
    (photos / "notes.txt").write_text("flight log")
    (photos / "Thumbs.db").write_bytes(b"\0" * 10)
    good = sorted((synth / "images").glob("*.png"))[5]
    (photos / "broken.png").write_bytes(good.read_bytes()[:300])
    if CALITERRA.is_dir():
        (photos / "broken.jpg").write_bytes((CALITERRA / "IMG_9361.jpg").read_bytes()[:60000])
    with caplog.at_level(logging.WARNING, logger="mgs.ingest.sfm"):
        names, sizes = list_images(photos)
    assert names == sorted(p.name for p in (synth / "images").glob("*.png"))[:4]
    assert set(sizes.values()) == {(400, 300)}
    text = caplog.text
    assert "non-image" in text and "notes.txt" in text and "Thumbs.db" in text
    assert "unreadable" in text and "broken.png" in text
    if CALITERRA.is_dir():
        assert "broken.jpg" in text


def test_identical_images_fail_clearly(synth, tmp_path):
    photos = tmp_path / "same"
    photos.mkdir()
    source = sorted((synth / "images").glob("*.png"))[0]
    for i in range(4):
        shutil.copy(source, photos / f"copy_{i}.png")
    with pytest.raises(InputError, match="different positions|could be matched"):
        run_sfm(photos, tmp_path / "out", SfmConfig(**FAST))
    assert not (tmp_path / "out" / "scene.json").exists()


def test_unwritable_output(synth, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MgsError, match="cannot create output directory"):
        run_sfm(synth / "images", blocker / "out")


def test_too_few_registered_names_the_missing_images():
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(model="PINHOLE", width=64, height=48,
                                                    params=[50, 50, 32, 24], camera_id=1))
    for i in range(3):
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=f"img_{i}.png", camera_id=1, image_id=i + 1),
            pycolmap.Rigid3d(pycolmap.Rotation3d(np.array([0, 0, 0, 1.0])), [i, 0, 0]))
    names = [f"img_{i}.png" for i in range(5)]
    with pytest.raises(InputError, match=r"only 3 of 5.*img_3.png, img_4.png"):
        _check_registered(rec, names, SfmConfig(), Path("photos"), 1)
    stats = _check_registered(rec, names, SfmConfig(min_registered=0.5), Path("photos"), 1)
    assert stats["unregistered"] == ["img_3.png", "img_4.png"]


def test_bad_config():
    with pytest.raises(MgsError, match="matching"):
        SfmConfig(matching="vocab").validate()
    with pytest.raises(MgsError, match="fraction"):
        SfmConfig(min_registered=80).validate()


# ------------------------------------------------------------- geometry

def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 3))
    rotation, scale, t = random_rotation(rng), 2.5, np.array([1.0, -2.0, 3.0])
    s, r, tt = umeyama(src, scale * src @ rotation.T + t)
    assert s == pytest.approx(scale) and np.allclose(r, rotation) and np.allclose(tt, t)


def test_wgs84_to_enu():
    enu = wgs84_to_enu(np.array([[30.0, -98.0, 300.0], [30.001, -98.0, 300.0],
                                 [30.0, -97.999, 310.0]]), origin=[30.0, -98.0, 300.0])
    assert np.allclose(enu[0], 0, atol=1e-6)
    assert enu[1][1] == pytest.approx(110.85, abs=0.1) and abs(enu[1][0]) < 1e-6
    assert enu[2][0] == pytest.approx(96.49, abs=0.1) and enu[2][2] == pytest.approx(10, abs=0.01)


def aerial_poses(tilt=0.0):
    """Level flight at 50 m over z=0: nadir and ±`tilt` oblique views in two headings."""
    grid = [(x, y) for x in range(-40, 41, 20) for y in (-20, 20)]
    return [look_at_pose(np.array([x, y, 50.0]), tilt * (i % 3 - 1), 90.0 * (i % 2))
            for i, (x, y) in enumerate(grid)]


def test_estimate_up_aerial_and_ground_level():
    rng = np.random.default_rng(1)
    rotation = random_rotation(rng)
    moved = []
    for pose in aerial_poses(tilt=25.0):
        new = pose.copy()
        new[:3, :3] = pose[:3, :3] @ rotation.T  # world rotated by `rotation`
        moved.append(new)
    up, method = estimate_up(moved)
    assert up @ (rotation @ [0, 0, 1.0]) > np.cos(np.radians(0.5)), method
    # Ground level, looking around horizontally: up from the cameras' −y axes.
    ground = []
    for yaw in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        down = np.array([0, 0, -1.0])
        pose = np.eye(4)
        pose[:3, :3] = np.stack([np.cross(down, forward), down, forward])
        ground.append(pose)
    up, method = estimate_up(ground)
    assert np.allclose(up, [0, 0, 1], atol=1e-9) and method == "camera up vectors"


def test_orientation_with_gps_is_metric_enu_and_ignores_altitude_drift():
    rng = np.random.default_rng(2)
    poses = aerial_poses(tilt=25.0)
    rotation, scale = random_rotation(rng), 0.05
    sfm_poses = []
    for pose in poses:  # an SfM frame: rotated, scaled, shifted
        new = pose.copy()
        new[:3, :3] = pose[:3, :3] @ rotation.T
        new[:3, 3] = scale * pose[:3, 3] - new[:3, :3] @ [1.0, 2.0, 3.0]
        sfm_poses.append(new)
    enu = np.stack([-p[:3, :3].T @ p[:3, 3] for p in poses])
    enu[:, :2] += rng.normal(0, 0.3, (len(poses), 2))
    enu[:, 2] += np.linspace(0, 40, len(poses))  # barometric drift, as on real flights
    s, r, t, method = orientation(sfm_poses, enu)
    assert "GPS" in method
    assert s == pytest.approx(1 / scale, rel=0.02)
    assert np.allclose(r @ rotation, np.eye(3), atol=0.02)  # heading from GPS, up from geometry
    # GPS that does not fit the cameras at all is ignored.
    shuffled = rng.permutation(enu)
    assert "GPS" not in orientation(sfm_poses, shuffled)[3]
