"""Scene model, COLMAP round trips, image cache and the synthetic city."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from mgs.errors import InputError, MgsError
from mgs.scene import (Camera, Scene, load_image, load_scene, read_colmap, save_scene,
                       split_every, write_colmap)
from mgs.synthetic import (SyntheticConfig, build_city, make_synthetic_scene, render_depth,
                           render_view)

TINY = SyntheticConfig(seed=3, num_views=12, width=48, height=36, num_buildings=4,
                       extent=60.0, altitude=70.0, num_passes=2, num_points=300)


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def random_cameras(rng, image_dir: Path, count=4) -> list[Camera]:
    cameras = []
    for i in range(count):
        pose = np.eye(4)
        pose[:3, :3] = random_rotation(rng)
        pose[:3, 3] = rng.normal(size=3) * 5
        K = np.array([[80.0 + i, 0, 31.5], [0, 82.0, 24.25], [0, 0, 1]])
        cameras.append(Camera(f"img_{i:02d}.png", K, 64, 48, pose, image_dir / f"img_{i:02d}.png"))
    return cameras


def write_images(cameras) -> None:
    rng = np.random.default_rng(1)
    for cam in cameras:
        cam.image_path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(cam.image_path)


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_scene(tmp_path_factory.mktemp("synth") / "scene", TINY)


# ------------------------------------------------------------------ COLMAP

def test_colmap_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cameras = random_cameras(rng, tmp_path / "images")
    xyz = rng.normal(size=(50, 3)) * 10
    rgb = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    write_colmap(cameras, xyz, rgb, tmp_path / "sparse" / "0")
    loaded, xyz2, rgb2 = read_colmap(tmp_path / "sparse" / "0", tmp_path / "images")
    assert [c.name for c in loaded] == [c.name for c in cameras]
    for a, b in zip(cameras, loaded):
        assert np.abs(a.K - b.K).max() < 1e-9
        assert np.abs(a.world_to_camera - b.world_to_camera).max() < 1e-9
        assert (a.width, a.height, a.image_path) == (b.width, b.height, b.image_path)
        assert np.abs(a.center - b.center).max() < 1e-9
    order = np.lexsort(xyz.T), np.lexsort(xyz2.T)
    assert np.abs(xyz[order[0]] - xyz2[order[1]]).max() < 1e-9
    assert (rgb[order[0]] == rgb2[order[1]]).all()
    # Rewriting replaces the model atomically and leaves no temp folders behind.
    write_colmap(cameras[:2], xyz[:3], rgb[:3], tmp_path / "sparse" / "0")
    assert len(read_colmap(tmp_path / "sparse" / "0", tmp_path / "images")[0]) == 2
    assert leftovers(tmp_path) == []


def quat_xyzw_to_matrix(x, y, z, w) -> np.ndarray:
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def test_quaternion_convention_by_projection(tmp_path):
    quat = np.array([0.1, -0.3, 0.2, 0.9])
    quat /= np.linalg.norm(quat)
    translation = np.array([0.5, -1.0, 6.0])
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(model="SIMPLE_PINHOLE", width=100,
                                                    height=80, params=[90.0, 50.0, 40.0],
                                                    camera_id=1))
    rec.add_image_with_trivial_frame(pycolmap.Image(name="a.png", camera_id=1, image_id=1),
                                     pycolmap.Rigid3d(pycolmap.Rotation3d(quat), translation))
    rec.write(str(tmp_path))
    (cam,), _, _ = read_colmap(tmp_path, tmp_path)
    point = np.array([0.3, 0.7, -1.2])
    by_hand = quat_xyzw_to_matrix(*quat) @ point + translation
    by_hand = (90.0 * by_hand[0] / by_hand[2] + 50.0, 90.0 * by_hand[1] / by_hand[2] + 40.0)
    in_cam = cam.world_to_camera @ np.append(point, 1.0)
    projected = (cam.K @ in_cam[:3])[:2] / in_cam[2]
    assert np.allclose(projected, by_hand, atol=1e-9)
    assert np.allclose(projected, rec.images[1].project_point(point).ravel(), atol=1e-9)


def test_non_pinhole_camera_rejected(tmp_path):
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(model="SIMPLE_RADIAL", width=64, height=48,
                                                    params=[60.0, 32.0, 24.0, 0.01],
                                                    camera_id=1))
    rec.add_image_with_trivial_frame(pycolmap.Image(name="a.png", camera_id=1, image_id=1),
                                     pycolmap.Rigid3d())
    rec.write(str(tmp_path))
    with pytest.raises(InputError) as err:
        read_colmap(tmp_path, tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cameras.bin") in message
    assert "SIMPLE_RADIAL" in message and "undistort" in message


def test_colmap_folder_without_images(tmp_path):
    pycolmap.Reconstruction().write(str(tmp_path))
    with pytest.raises(InputError, match="no images") as err:
        read_colmap(tmp_path, tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(InputError) as err:
        read_colmap(tmp_path / "missing", tmp_path)
    assert str(tmp_path / "missing") in str(err.value)


def test_failed_model_write_leaves_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    cameras = random_cameras(rng, tmp_path / "images", 2)

    def broken_write(self, path):
        (Path(path) / "cameras.bin").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pycolmap.Reconstruction, "write", broken_write)
    with pytest.raises(RuntimeError):
        write_colmap(cameras, np.zeros((0, 3)), np.zeros((0, 3), np.uint8),
                     tmp_path / "sparse" / "0")
    assert not (tmp_path / "sparse" / "0").exists()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------- cameras and scenes

def test_camera_scaled_matches_cache_size():
    cam = Camera("a.png", [[100.0, 0, 50.5], [0, 90.0, 37.5], [0, 0, 1]], 101, 75, np.eye(4), "a")
    half = cam.scaled(2)
    assert (half.width, half.height) == (round(101 / 2), round(75 / 2))
    assert np.isclose(half.K[0, 0], 100.0 * half.width / 101)
    assert np.isclose(half.K[1, 2], 37.5 * half.height / 75)
    assert cam.scaled(1).K.tolist() == cam.K.tolist()
    with pytest.raises(MgsError):
        cam.scaled(0)


def test_split_every_tenth_by_sorted_name():
    names = [f"v{i:02d}" for i in range(25)][::-1]
    train, test = split_every(names)
    assert test == ["v00", "v10", "v20"]
    assert len(train) == 22 and not set(train) & set(test)


def test_save_load_scene_and_missing_image(tmp_path):
    rng = np.random.default_rng(4)
    cameras = random_cameras(rng, tmp_path / "images")
    write_images(cameras)
    train, test = split_every([c.name for c in cameras], every=2)
    scene = Scene(cameras, train, test, rng.normal(size=(10, 3)),
                  rng.integers(0, 256, (10, 3)), [0, 0, 1], tmp_path,
                  aabb=[[-1, -1, -1], [1, 1, 1]])
    save_scene(scene, tmp_path)
    loaded = load_scene(tmp_path)
    assert [c.name for c in loaded.test_cameras()] == test
    assert np.allclose(loaded.aabb, scene.aabb) and np.allclose(loaded.up, [0, 0, 1])
    assert loaded.camera(cameras[0].name).image_path == cameras[0].image_path
    cameras[1].image_path.unlink()
    with pytest.raises(InputError) as err:
        load_scene(tmp_path)
    assert str(cameras[1].image_path) in str(err.value)


# -------------------------------------------------------------- image cache

def test_load_image_cache(tmp_path):
    cam = random_cameras(np.random.default_rng(5), tmp_path / "images", 1)[0]
    write_images([cam])
    full = load_image(cam, 1, tmp_path / "cache")
    assert full.shape == (48, 64, 3) and 0.0 <= float(full.min()) <= float(full.max()) <= 1.0
    small = load_image(cam, 3, tmp_path / "cache")
    cached = tmp_path / "cache" / "images_3" / "img_00.png"
    small_cam = cam.scaled(3)
    expected = Image.open(cam.image_path).resize((small_cam.width, small_cam.height),
                                                 Image.BICUBIC)
    assert small.shape == (16, 21, 3) and cached.is_file()
    assert np.array_equal((small.numpy() * 255).round().astype(np.uint8), np.asarray(expected))
    stamp = cached.stat().st_mtime_ns
    load_image(cam, 3, tmp_path / "cache")
    assert cached.stat().st_mtime_ns == stamp  # reused, not rewritten


def test_corrupt_and_mismatched_images(tmp_path):
    cam = random_cameras(np.random.default_rng(6), tmp_path / "images", 1)[0]
    cam.image_path = tmp_path / "images" / "broken.jpg"
    cam.name = "broken.jpg"
    cam.image_path.parent.mkdir(parents=True)
    cam.image_path.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    for factor in (1, 2):
        with pytest.raises(InputError) as err:
            load_image(cam, factor, tmp_path / "cache")
        assert str(cam.image_path) in str(err.value) and "re-export" in str(err.value)
    Image.new("RGB", (30, 20)).save(cam.image_path, format="JPEG")
    with pytest.raises(InputError) as err:
        load_image(cam, 2, tmp_path / "cache")
    assert str(cam.image_path) in str(err.value)
    assert "30x20" in str(err.value) and "64x48" in str(err.value)
    assert not (tmp_path / "cache" / "images_2" / "broken.png").exists()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------ output dirs

def test_unusable_output_dir_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(MgsError) as err:
        make_synthetic_scene(blocker / "scene", TINY)
    assert str(blocker / "scene") in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(MgsError) as err:
            make_synthetic_scene(locked / "scene", TINY)
        assert str(locked / "scene") in str(err.value)
        with pytest.raises(MgsError) as err:
            write_colmap([], np.zeros((0, 3)), np.zeros((0, 3), np.uint8), locked / "sparse")
        assert str(locked) in str(err.value)
    finally:
        locked.chmod(0o700)


# -------------------------------------------------------------- synthetic

def test_synthetic_scene_is_deterministic(synthetic, tmp_path):
    again = make_synthetic_scene(tmp_path / "scene", TINY)
    for a, b in zip(synthetic.cameras, again.cameras):
        assert a.image_path.read_bytes() == b.image_path.read_bytes()
        assert np.array_equal(a.world_to_camera, b.world_to_camera)
    assert np.array_equal(synthetic.points_xyz, again.points_xyz)
    assert np.array_equal(synthetic.points_rgb, again.points_rgb)
    loaded = load_scene(synthetic.scene_dir)
    assert len(loaded.cameras) == TINY.num_views and len(loaded.points_xyz) == TINY.num_points
    assert loaded.test_names == [f"view_{i:04d}.png" for i in (0, 10)]
    assert np.allclose(loaded.up, [0, 0, 1])


def test_synthetic_has_nadir_and_oblique_views(synthetic):
    tilts = []
    for cam in synthetic.cameras:
        forward = cam.world_to_camera[2, :3]  # optical axis in world coordinates
        tilts.append(np.degrees(np.arccos(-forward[2])))
    tilts = np.array(tilts)
    assert (tilts < 1e-6).sum() >= 3
    assert (np.abs(tilts - TINY.oblique_deg) < 1e-6).sum() >= 6


def test_synthetic_points_project_onto_matching_colours(synthetic):
    """Points seen by other views land on pixels of their colour: poses and points agree."""
    city = build_city(TINY)
    errors, shuffled = [], []
    rng = np.random.default_rng(0)
    for cam in synthetic.cameras[::3]:
        image = np.asarray(Image.open(cam.image_path), dtype=np.float64)
        depth = render_depth(city, cam)
        cam_pts = synthetic.points_xyz @ cam.world_to_camera[:3, :3].T + cam.world_to_camera[:3, 3]
        uv = cam_pts @ cam.K.T
        u, v = uv[:, 0] / uv[:, 2], uv[:, 1] / uv[:, 2]
        col, row = np.floor(u).astype(int), np.floor(v).astype(int)
        inside = ((cam_pts[:, 2] > 0) & (col >= 0) & (col < cam.width)
                  & (row >= 0) & (row < cam.height))
        idx = np.flatnonzero(inside)
        visible = np.abs(depth[row[idx], col[idx]] - cam_pts[idx, 2]) < 0.01 * cam_pts[idx, 2]
        idx = idx[visible]
        pixels = image[row[idx], col[idx]]
        errors.append(np.abs(pixels - synthetic.points_rgb[idx]).mean(axis=1))
        shuffled.append(np.abs(pixels - synthetic.points_rgb[rng.permutation(idx)]).mean(axis=1))
    errors, shuffled = np.concatenate(errors), np.concatenate(shuffled)
    assert len(errors) > 200
    assert np.median(errors) < 16.0, np.median(errors)  # texture varies inside a pixel
    assert np.median(errors) < 0.5 * np.median(shuffled)


def test_synthetic_points_are_exact_surface_hits(synthetic):
    """Each point was cast through a pixel centre of some view: it projects back exactly there."""
    best = np.full(len(synthetic.points_xyz), np.inf)
    for cam in synthetic.cameras:
        cam_pts = synthetic.points_xyz @ cam.world_to_camera[:3, :3].T + cam.world_to_camera[:3, 3]
        uv = cam_pts @ cam.K.T
        uv = uv[:, :2] / uv[:, 2:]
        off_centre = np.abs(uv - np.floor(uv) - 0.5).max(axis=1)
        inside = (cam_pts[:, 2] > 0) & (uv >= 0).all(1) & (uv < [cam.width, cam.height]).all(1)
        best = np.where(inside, np.minimum(best, off_centre), best)
    assert best.max() < 1e-6
    city = build_city(TINY)
    xyz = synthetic.points_xyz
    on_ground = np.abs(xyz[:, 2]) < 1e-9
    on_box_face = [((xyz >= lo - 1e-9) & (xyz <= hi + 1e-9)).all(1)
                   & (np.isclose(xyz, lo, atol=1e-9) | np.isclose(xyz, hi, atol=1e-9)).any(1)
                   for lo, hi in zip(city.box_min, city.box_max)]
    assert (on_ground | np.any(on_box_face, axis=0)).all()


def test_interrupted_synthetic_run_leaves_no_scene_json(tmp_path, monkeypatch):
    import mgs.synthetic

    out = tmp_path / "scene"
    make_synthetic_scene(out, TINY)
    calls = []

    def render_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return render_view(*args, **kwargs)

    monkeypatch.setattr(mgs.synthetic, "render_view", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_scene(out, TINY)
    assert not (out / "scene.json").exists()  # an incomplete scene never looks complete
    assert leftovers(tmp_path) == []
    with pytest.raises(InputError, match="scene.json"):
        load_scene(out)


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os
    import stat

    from mgs.atomic import write_text

    write_text(tmp_path / "out.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o666 & ~umask
