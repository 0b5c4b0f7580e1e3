"""`transforms.json` captures (instant-ngp and nerfstudio conventions) → scene folders.

Layout: ``SRC/transforms.json`` (or ``SRC/transforms_{train,test}.json``, or SRC the json itself)
with ``frames: [{file_path, transform_matrix, ...}]``. Per frame or shared (top level):

- ``transform_matrix``: camera→world in OpenGL axes (x right, y up, z back), converted to our
  world→camera OpenCV axes (x right, y down, z forward); the world frame is kept as it is;
- intrinsics: ``fl_x``/``fl_y``/``cx``/``cy``/``w``/``h`` or ``camera_angle_x`` (and
  ``camera_angle_y``); a json made for another image size is rescaled to the files' size;
- ``file_path`` relative to the json's folder, with or without extension;
- lens distortion is undistorted on ingest with COLMAP's undistorter (mgs.ingest.undistort):
  ``camera_model`` OPENCV (the default) with ``k1 k2 p1 p2`` and optional ``k3`` (COLMAP's OPENCV,
  or FULL_OPENCV with k3), and OPENCV_FISHEYE (or instant-ngp's ``is_fisheye``) with ``k1 … k4``.
  The scene then holds PINHOLE images cropped to their valid pixels, so their size and K differ
  from the capture's. Lenses COLMAP cannot undistort are refused: an OPENCV ``k4`` (an r⁸ term in
  nerfstudio's convention, not COLMAP's), fisheye ``p1``/``p2``, EQUIRECTANGULAR and other models;
- ``aabb_scale`` (instant-ngp's scene bound) is recorded in scene.json's ``source``; training does
  not need it;
- splits: nerfstudio's ``train_filenames``/``val_filenames``/``test_filenames`` or the
  ``transforms_test.json`` file when present, else every 10th view by name is a test view.

Points: nerfstudio's optional ``ply_file_path``, else a triangulation of the given poses with
pycolmap (SIFT features, matching, triangulation with the poses and intrinsics held fixed) on the
images as captured, with their lens model.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from plyfile import PlyData

from mgs.atomic import ensure_writable_dir, refuse_overlap
from mgs.errors import InputError
from mgs.ingest.frames import materialise, opengl_to_colmap, up_vector
from mgs.ingest.triangulate import points_of, triangulate
from mgs.ingest.undistort import (PINHOLE, Lens, posed_reconstruction, replace_dir,
                                  undistort_model)
from mgs.scene import SCENE_JSON, Camera, Scene, read_colmap, save_scene, split_every

log = logging.getLogger("mgs.ingest.transforms")

DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
# camera_model values of the radial-tangential (OpenCV) family: distortion from k1 k2 k3 p1 p2
OPENCV_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "SIMPLE_RADIAL", "RADIAL")
FISHEYE_MODEL = "OPENCV_FISHEYE"
SUPPORTED = ("supported: PINHOLE, OPENCV with k1 k2 p1 p2 and optional k3, OPENCV_FISHEYE "
             "with k1 … k4")
UNDISTORT_FIX = ("undistort the images first (e.g. with COLMAP: `colmap image_undistorter`, "
                 "then `mgs ingest colmap`) or export the capture with undistorted images and "
                 "zero distortion")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def ingest_transforms(src, out, factor: int = 1, width: int | None = None,
                      up: str | None = None) -> Scene:
    """Convert the transforms.json capture at `src` into the scene folder `out`."""

    src, out = Path(src), Path(out)
    files = _json_files(src)
    refuse_overlap(out, {"capture folder": files["train"].parent}, "scene folder")
    train, test, meta, lenses = _read_split_files(files)
    if not train or len(train) + len(test) < 2:
        raise InputError(f"{files['train']} has {len(train) + len(test)} frame(s) "
                         f"({len(train)} for training); a scene needs at least two, one to "
                         "train on and one to test, with overlapping views")
    up_vec = up_vector(up or "auto", [c.world_to_camera for c in train])
    ensure_writable_dir(out)
    (out / SCENE_JSON).unlink(missing_ok=True)  # incomplete until save_scene writes it again
    ply = meta.get("ply_file_path")
    ply = files["train"].parent / ply if ply else None
    if any(lens.distorts for lens in lenses.values()):
        cameras, names, xyz, rgb = _ingest_undistorted(train + test, lenses, out, factor, width,
                                                       ply)
    else:
        cameras = materialise(train + test, out / "images", factor, width)
        names = [c.name for c in cameras]
        xyz, rgb = read_points_ply(ply) if ply else points_of(triangulate(cameras, out))
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


def _ingest_undistorted(frames: list[Camera], lenses: dict[str, Lens], out: Path, factor: int,
                        width, ply: Path | None):
    """Images at the training size, points (the ply's, or triangulated through the lenses),
    then COLMAP's undistortion of both into `out/images`. Returns the PINHOLE cameras in the
    order of `frames`, their names, and the points."""
    work = Path(tempfile.mkdtemp(prefix=".undistort-", suffix=".tmp", dir=out))
    try:
        cameras = materialise(frames, work / "distorted-images", factor, width)
        by_name = {cam.name: lenses[frame.name] for cam, frame in zip(cameras, frames)}
        if ply:
            xyz, rgb = read_points_ply(ply)
            rec = posed_reconstruction(cameras, by_name)
        else:
            rec = triangulate(cameras, work, by_name)
            xyz, rgb = points_of(rec)
        log.info("undistorting %d images to PINHOLE (%s)", len(cameras),
                 ", ".join(sorted({lens.model for lens in by_name.values()})))
        undistorted = undistort_model(rec, work / "distorted-images", work)
        pinhole, _, _ = read_colmap(undistorted / "sparse", out / "images")
        replace_dir(undistorted / "images", out / "images")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_name = {cam.name: cam for cam in pinhole}
    names = [cam.name for cam in cameras]
    return [by_name[name] for name in names], names, xyz, rgb


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
    """Train and test cameras, the main json, and each camera's lens (by camera name)."""
    meta = _load_json(files["train"])
    cameras, lenses = read_frames(files["train"], meta)
    if "test" in files:
        test, test_lenses = read_frames(files["test"], _load_json(files["test"]), "test_")
        return cameras, test, meta, lenses | test_lenses
    listed = meta.get("test_filenames") or meta.get("val_filenames")
    if listed:  # nerfstudio's own split, by file name (with or without the folder/extension)
        test = _named(cameras, listed)
        train_listed = meta.get("train_filenames")
        train = _named(cameras, train_listed) if train_listed else cameras
        test_names = {c.name for c in test}
        return [c for c in train if c.name not in test_names], test, meta, lenses
    by_name = {cam.name: cam for cam in cameras}
    train_names, test_names = split_every(list(by_name), every=10)
    return [by_name[n] for n in train_names], [by_name[n] for n in test_names], meta, lenses


def _named(cameras: list[Camera], paths: list) -> list[Camera]:
    wanted = {Path(str(p)).name for p in paths} | {Path(str(p)).stem for p in paths}
    return [c for c in cameras if c.name in wanted or Path(c.name).stem in wanted]


def read_frames(path: Path, meta: dict, prefix: str = "") -> tuple[list[Camera], dict[str, Lens]]:
    """The frames of one transforms json as Cameras (world→camera, OpenCV axes), and each
    camera's lens by name."""

    cameras, lenses = [], {}
    for index, frame in enumerate(meta["frames"]):
        def get(key, default=None, frame=frame):
            return frame.get(key, meta.get(key, default))

        if not isinstance(frame, dict) or "file_path" not in frame \
                or "transform_matrix" not in frame:
            raise InputError(f"{path}: frame {index} lacks file_path or transform_matrix")
        where = f"{path}: frame {index} ({frame['file_path']})"
        lens = _lens(get, where)
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
        lenses[cameras[-1].name] = lens
    if not cameras:
        raise InputError(f"{path} has no frames")
    names = [c.name for c in cameras]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"{path}: several frames use images named {dupes[:5]}; a scene keeps "
                         "its images in one folder, so file names must be unique")
    return cameras, lenses


def _lens(get, where: str) -> Lens:
    """The frame's lens as a COLMAP model the undistorter inverts; refused when there is none."""
    model = str(get("camera_model", "OPENCV")).upper()
    fisheye = model == FISHEYE_MODEL or bool(get("is_fisheye", False))
    if model not in OPENCV_MODELS + (FISHEYE_MODEL,):
        raise InputError(f"{where}: camera model {model} cannot be undistorted on ingest "
                         f"({SUPPORTED}); {UNDISTORT_FIX}")
    try:
        k1, k2, k3, k4, p1, p2 = (float(get(key, 0.0) or 0.0) for key in DISTORTION_KEYS)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: distortion coefficients must be numbers ({exc})") from exc
    if fisheye:
        if p1 or p2:  # COLMAP's OPENCV_FISHEYE has no tangential terms
            raise InputError(f"{where}: fisheye lens with tangential distortion p1={p1:g} "
                             f"p2={p2:g} cannot be undistorted on ingest ({SUPPORTED}); "
                             f"{UNDISTORT_FIX}")
        return Lens(FISHEYE_MODEL, (k1, k2, k3, k4))
    if k4:  # nerfstudio's k4 multiplies r^8; COLMAP's FULL_OPENCV k4 divides: not the same lens
        raise InputError(f"{where}: lens distortion k4={k4:g} (an r^8 term) cannot be "
                         f"undistorted on ingest ({SUPPORTED}); {UNDISTORT_FIX}")
    if k3:
        return Lens("FULL_OPENCV", (k1, k2, p1, p2, k3, 0.0, 0.0, 0.0))
    if k1 or k2 or p1 or p2:
        return Lens("OPENCV", (k1, k2, p1, p2))
    return PINHOLE


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
