"""`transforms.json` captures (instant-ngp and nerfstudio conventions) → scene folders.

Layout: ``SRC/transforms.json`` (or ``SRC/transforms_{train,test}.json``, or SRC the json itself)
with ``frames: [{file_path, transform_matrix, ...}]``. Per frame or shared (top level):

- ``transform_matrix``: camera→world in OpenGL axes (x right, y up, z back), converted to our
  world→camera OpenCV axes (x right, y down, z forward); the world frame is kept as it is;
- intrinsics: ``fl_x``/``fl_y``/``cx``/``cy``/``w``/``h`` or ``camera_angle_x`` (and
  ``camera_angle_y``); a json made for another image size is rescaled to the files' size;
- ``file_path`` relative to the json's folder, with or without extension;
- distortion (``k1`` … ``k4``, ``p1``, ``p2``) or a non-pinhole ``camera_model``
  (``OPENCV_FISHEYE``, ``EQUIRECTANGULAR``, instant-ngp's ``is_fisheye``) is refused: training
  renders pinhole images;
- ``aabb_scale`` (instant-ngp's scene bound) is recorded in scene.json's ``source``; training does
  not need it;
- splits: nerfstudio's ``train_filenames``/``val_filenames``/``test_filenames`` or the
  ``transforms_test.json`` file when present, else every 10th view by name is a test view.

Points: nerfstudio's optional ``ply_file_path``, else a triangulation of the given poses with
pycolmap (SIFT features, matching, triangulation with the poses and intrinsics held fixed).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from mgs.pycolmap_import import pycolmap
from PIL import Image
from plyfile import PlyData

from mgs.atomic import ensure_writable_dir, refuse_overlap
from mgs.errors import InputError, MgsError
from mgs.ingest.frames import materialise, opengl_to_colmap, up_vector
from mgs.scene import SCENE_JSON, Camera, Scene, save_scene, split_every

log = logging.getLogger("mgs.ingest.transforms")
pycolmap.logging.minloglevel = 2

DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "SIMPLE_RADIAL", "RADIAL")
UNDISTORT_FIX = ("undistort the images first (e.g. with COLMAP: `colmap image_undistorter`, "
                 "then `mgs ingest colmap`) or export the capture with undistorted images and "
                 "zero distortion")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
EXHAUSTIVE_LIMIT = 150  # more images than this are matched sequentially (video captures)
SEQUENTIAL_OVERLAP = 20
# SIFT's default peak threshold finds too few points on small or smooth images
PEAK_THRESHOLD = 0.002


def ingest_transforms(src, out, factor: int = 1, width: int | None = None,
                      up: str | None = None) -> Scene:
    """Convert the transforms.json capture at `src` into the scene folder `out`."""

    src, out = Path(src), Path(out)
    files = _json_files(src)
    refuse_overlap(out, {"capture folder": files["train"].parent}, "scene folder")
    train, test, meta = _read_split_files(files)
    if not train or len(train) + len(test) < 2:
        raise InputError(f"{files['train']} has {len(train) + len(test)} frame(s) "
                         f"({len(train)} for training); a scene needs at least two, one to "
                         "train on and one to test, with overlapping views")
    up_vec = up_vector(up or "auto", [c.world_to_camera for c in train])
    ensure_writable_dir(out)
    (out / SCENE_JSON).unlink(missing_ok=True)  # incomplete until save_scene writes it again
    cameras = materialise(train + test, out / "images", factor, width)
    names = [c.name for c in cameras]
    ply = meta.get("ply_file_path")
    if ply:
        xyz, rgb = read_points_ply(files["train"].parent / ply)
    else:
        xyz, rgb = triangulate(cameras, out)
    source = f"transforms {src.as_posix()} factor={factor}" + (f" width={width}" if width else "")
    if meta.get("aabb_scale") is not None:
        source += f" aabb_scale={meta['aabb_scale']}"
    scene = Scene(cameras=cameras, train_names=names[:len(train)],
                  test_names=names[len(train):], points_xyz=xyz, points_rgb=rgb, up=up_vec,
                  scene_dir=out, source=source)
    save_scene(scene, out)
    log.info("ingested %s: %d train / %d test cameras, %d points (%s), up %s → %s", src,
             len(train), len(test), len(xyz), "from the ply" if ply else "triangulated",
             np.round(up_vec, 3).tolist(), out)
    return scene


# ---------------------------------------------------------------- reading

def _json_files(src: Path) -> dict[str, Path]:
    if src.is_file():
        return {"train": src}
    if not src.is_dir():
        raise InputError(f"capture {src} does not exist; point SRC at a folder with a "
                         "transforms.json or at the json file itself")
    if (src / "transforms.json").is_file():
        return {"train": src / "transforms.json"}
    if (src / "transforms_train.json").is_file():
        files = {"train": src / "transforms_train.json"}
        for split in ("test", "val"):
            if (src / f"transforms_{split}.json").is_file():
                files["test"] = src / f"transforms_{split}.json"
                break
        return files
    raise InputError(f"{src} has no transforms.json (nor transforms_train.json); point SRC at "
                     "an instant-ngp or nerfstudio capture folder")


def _load_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} ({exc}); export the capture again") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise InputError(f"{path} is not a transforms json: it needs a list 'frames' of "
                         "{file_path, transform_matrix}")
    return meta


def _read_split_files(files: dict[str, Path]):
    meta = _load_json(files["train"])
    cameras = read_frames(files["train"], meta)
    if "test" in files:
        return cameras, read_frames(files["test"], _load_json(files["test"]), "test_"), meta
    listed = meta.get("test_filenames") or meta.get("val_filenames")
    if listed:  # nerfstudio's own split, by file name (with or without the folder/extension)
        test = _named(cameras, listed)
        train_listed = meta.get("train_filenames")
        train = _named(cameras, train_listed) if train_listed else cameras
        test_names = {c.name for c in test}
        return [c for c in train if c.name not in test_names], test, meta
    by_name = {cam.name: cam for cam in cameras}
    train_names, test_names = split_every(list(by_name), every=10)
    return [by_name[n] for n in train_names], [by_name[n] for n in test_names], meta


def _named(cameras: list[Camera], paths: list) -> list[Camera]:
    wanted = {Path(str(p)).name for p in paths} | {Path(str(p)).stem for p in paths}
    return [c for c in cameras if c.name in wanted or Path(c.name).stem in wanted]


def read_frames(path: Path, meta: dict, prefix: str = "") -> list[Camera]:
    """The frames of one transforms json as Cameras (world→camera, OpenCV axes)."""

    cameras = []
    for index, frame in enumerate(meta["frames"]):
        def get(key, default=None, frame=frame):
            return frame.get(key, meta.get(key, default))

        if not isinstance(frame, dict) or "file_path" not in frame \
                or "transform_matrix" not in frame:
            raise InputError(f"{path}: frame {index} lacks file_path or transform_matrix")
        where = f"{path}: frame {index} ({frame['file_path']})"
        _check_pinhole(get, where)
        image_path = _find_image(path.parent, frame["file_path"], where)
        try:
            with Image.open(image_path) as img:
                w, h = img.size
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"cannot read image {image_path} ({exc}); re-export it or remove "
                             f"its frame from {path}") from exc
        matrix = np.asarray(get("transform_matrix"), np.float64)
        if matrix.shape not in ((4, 4), (3, 4)) or not np.isfinite(matrix).all():
            raise InputError(f"{where}: transform_matrix must be a finite 4x4 (or 3x4) "
                             f"camera-to-world matrix, got shape {matrix.shape}")
        c2w = np.eye(4)
        c2w[:matrix.shape[0]] = matrix
        cameras.append(Camera(name=prefix + image_path.name, K=_intrinsics(get, w, h, where),
                              width=w, height=h, world_to_camera=opengl_to_colmap(c2w),
                              image_path=image_path))
    if not cameras:
        raise InputError(f"{path} has no frames")
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"{path}: several frames use images named {dupes[:5]}; a scene keeps "
                         "its images in one folder, so file names must be unique")
    return cameras


def _check_pinhole(get, where: str) -> None:
    model = str(get("camera_model", "OPENCV")).upper()
    if model not in PINHOLE_MODELS or get("is_fisheye", False):
        name = model if model not in PINHOLE_MODELS else "fisheye (is_fisheye)"
        raise InputError(f"{where}: camera model {name} is not a pinhole camera; "
                         f"{UNDISTORT_FIX}")
    distortion = {key: float(get(key, 0.0) or 0.0) for key in DISTORTION_KEYS}
    if any(abs(value) > 1e-9 for value in distortion.values()):
        nonzero = ", ".join(f"{k}={v:g}" for k, v in distortion.items() if v)
        raise InputError(f"{where}: lens distortion {nonzero}; training needs pinhole images: "
                         f"{UNDISTORT_FIX}")


def _intrinsics(get, w: int, h: int, where: str) -> np.ndarray:
    """K at the image file's size (w, h); the json may describe another resolution."""
    json_w, json_h = float(get("w", w)), float(get("h", h))
    if get("fl_x") is not None:
        fx = float(get("fl_x"))
        fy = float(get("fl_y", fx))
    elif get("camera_angle_x") is not None:
        fx = 0.5 * json_w / np.tan(0.5 * float(get("camera_angle_x")))
        fy = fx if get("camera_angle_y") is None else \
            0.5 * json_h / np.tan(0.5 * float(get("camera_angle_y")))
    else:
        raise InputError(f"{where}: no focal length (fl_x or camera_angle_x, per frame or at "
                         "the top level)")
    cx, cy = float(get("cx", json_w / 2)), float(get("cy", json_h / 2))
    sx, sy = w / json_w, h / json_h
    K = np.array([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1.0]])
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f"{where}: intrinsics must be finite with a positive focal length, "
                         f"got fx={K[0, 0]:g} fy={K[1, 1]:g}")
    return K


def _find_image(folder: Path, file_path: str, where: str) -> Path:
    path = folder / file_path
    candidates = [path] if path.suffix in IMAGE_SUFFIXES else \
        [path] + [path.with_name(path.name + s) for s in IMAGE_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(f"{where}: image {path} does not exist (also tried the extensions "
                     f"{', '.join(IMAGE_SUFFIXES[:3])}); restore it or remove its frame")


def read_points_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Points (x, y, z and red, green, blue when present) of a nerfstudio ply_file_path."""
    try:
        vertex = PlyData.read(str(path))["vertex"]
        xyz = np.stack([vertex[k] for k in ("x", "y", "z")], 1).astype(np.float64)
    except Exception as exc:  # noqa: BLE001 - plyfile raises many types on damaged files
        raise InputError(f"cannot read the points {path} named by ply_file_path ({exc}); "
                         "export them again or remove ply_file_path to triangulate") from exc
    names = vertex.data.dtype.names
    if all(k in names for k in ("red", "green", "blue")):
        rgb = np.stack([vertex[k] for k in ("red", "green", "blue")], 1).astype(np.uint8)
    else:
        rgb = np.full((len(xyz), 3), 128, np.uint8)
    return xyz, rgb


# ---------------------------------------------------------- triangulation

def triangulate(cameras: list[Camera], work_parent: Path,
                threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Sparse points from the images with the cameras' poses and intrinsics held fixed:
    SIFT features → matching (exhaustive, or sequential past EXHAUSTIVE_LIMIT images) →
    triangulation (pycolmap). All images must share one folder."""
    image_dir = cameras[0].image_path.parent
    by_name = {cam.name: cam for cam in cameras}
    work = Path(tempfile.mkdtemp(prefix=".triangulate-", suffix=".tmp", dir=work_parent))
    db = work / "database.db"
    try:
        _features(db, image_dir, cameras, threads)
        _match(db, len(cameras), threads)
        rec = _posed_reconstruction(db, by_name)
        log.info("triangulating the given poses from %d images", len(cameras))
        (work / "model").mkdir()
        result = pycolmap.triangulate_points(rec, db, image_dir, work / "model")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    points = list(result.points3D.values())
    if not points:
        raise InputError(f"no 3D point could be triangulated from the {len(cameras)} images in "
                         f"{image_dir}: no two images share enough features. The images must "
                         "overlap and the poses must match them; or give points with "
                         "ply_file_path")
    xyz = np.array([p.xyz for p in points], np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points], np.uint8).reshape(-1, 3)
    log.info("triangulated %d points, mean reprojection error %.2f px", len(xyz),
             result.compute_mean_reprojection_error())
    return xyz, rgb


def _features(db: Path, image_dir: Path, cameras: list[Camera], threads: int) -> None:
    options = pycolmap.FeatureExtractionOptions()
    options.num_threads = threads
    options.sift.peak_threshold = PEAK_THRESHOLD
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "PINHOLE"
    log.info("extracting features of %d images", len(cameras))
    pycolmap.extract_features(db, image_dir, image_names=[c.name for c in cameras],
                              camera_mode=pycolmap.CameraMode.PER_IMAGE, reader_options=reader,
                              extraction_options=options, device=pycolmap.Device.auto)
    by_name = {cam.name: cam for cam in cameras}
    database = pycolmap.Database.open(db)
    try:  # the known intrinsics replace COLMAP's guesses, so matching verifies with them
        for image in database.read_all_images():
            camera, K = database.read_camera(image.camera_id), by_name[image.name].K
            camera.params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
            camera.has_prior_focal_length = True
            database.update_camera(camera)
    finally:
        database.close()


def _match(db: Path, count: int, threads: int) -> None:
    options = pycolmap.FeatureMatchingOptions()
    options.num_threads = threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = 0  # reruns give the same points
    kwargs = dict(matching_options=options, verification_options=verification,
                  device=pycolmap.Device.auto)
    if count <= EXHAUSTIVE_LIMIT:
        log.info("matching all %d image pairs", count * (count - 1) // 2)
        pycolmap.match_exhaustive(db, **kwargs)
    else:
        log.info("matching each image with its %d neighbours by name", SEQUENTIAL_OVERLAP)
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = SEQUENTIAL_OVERLAP
        pycolmap.match_sequential(db, pairing_options=pairing, **kwargs)


def _posed_reconstruction(db: Path, by_name: dict[str, Camera]) -> pycolmap.Reconstruction:
    """The database's cameras and images (same ids, one rig and frame each) with our poses."""
    rec = pycolmap.Reconstruction()
    database = pycolmap.Database.open(db)
    try:
        for camera in database.read_all_cameras():
            rec.add_camera_with_trivial_rig(camera)
        for image in database.read_all_images():
            frame = database.read_frame(image.frame_id)
            if frame.frame_id != image.image_id or frame.rig_id != image.camera_id:
                raise MgsError(f"{db}: image {image.image_id} is in frame {frame.frame_id} of "
                               f"rig {frame.rig_id}; expected one rig per camera")
            pose = by_name[image.name].world_to_camera
            rec.add_image_with_trivial_frame(
                pycolmap.Image(name=image.name, camera_id=image.camera_id,
                               image_id=image.image_id),
                pycolmap.Rigid3d(pycolmap.Rotation3d(np.ascontiguousarray(pose[:3, :3])),
                                 np.ascontiguousarray(pose[:3, 3])))
    finally:
        database.close()
    return rec
