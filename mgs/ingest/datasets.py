"""Paper dataset layouts (Mill-19, UrbanScene3D, MatrixCity) and COLMAP models → scene folders.

Layouts (ALGORITHM.md §1.1; train and test are separate models in one world frame)::

    mill19:        <scene>-pixsfm/{train,val}/{images,sparse/0}       (building, rubble)
    urbanscene3d:  <scene>/{train,val}/{images,sparse/0}              (residence, sci-art, campus)
    matrixcity:    aerial/{train,test}/block_all/transforms[_{split}].json + images
                   (+ train/block_all/sparse/0: the COLMAP point cloud used for initialisation)
    colmap:        <dir>/{images,sparse/0} — an undistorted model; every 10th image is test
    transforms:    <dir>/transforms.json (instant-ngp, nerfstudio): see mgs.ingest.transforms

Images are downsampled once, at ingest, and written as the scene's own ``images/`` (PNG,
PIL bicubic, ``⌊W/f⌋×⌊H/f⌋`` as the official ``downsample.py``; MatrixCity to 1600 px wide)
and the cameras are scaled to match, so train the scene at resolution 1. Names get the split
folder as prefix (``train_000000.png``, ``val_000000.png``) because Mill-19 repeats file names
across splits. Reruns reuse images that are already there. Coordinates are kept as they are
(the presets' aabb are in dataset coordinates); the up axis is recorded in scene.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from mgs.pycolmap_import import pycolmap
from PIL import Image

from mgs.atomic import ensure_writable_dir, refuse_overlap
from mgs.errors import InputError, MgsError
from mgs.scene import (SCENE_JSON, TRAINABLE_CAMERA_MODELS, UNDISTORT_HINT, Camera, Scene,
                       open_model, save_scene, split_every)
from mgs.ingest.frames import materialise, opengl_to_colmap, up_vector
from mgs.ingest.sfm import IMAGE_SUFFIXES

log = logging.getLogger("mgs.ingest.datasets")
pycolmap.logging.minloglevel = 2

DATASETS = ("mill19", "urbanscene3d", "matrixcity", "colmap", "transforms")
DEFAULT_FACTOR = {"mill19": 4, "urbanscene3d": 4, "matrixcity": 1, "colmap": 1, "transforms": 1}
# Vertical axis of each layout (ALGORITHM.md §1.3); the sign comes from the cameras.
DEFAULT_UP = {"mill19": "y", "urbanscene3d": "y", "matrixcity": "z", "colmap": "auto"}
MATRIXCITY_WIDTH = 1600
# Distortion below this is treated as none; above it we warn (the official code ignores it too).
DISTORTION_TOLERANCE = 1e-3


def ingest(dataset: str, src, out, factor: int | None = None, width: int | None = None,
           up: str | None = None) -> Scene:
    """Convert the dataset at `src` into the scene folder `out` and return the Scene.

    `up`: auto | x | y | z (sign from the cameras) | +x … -z; default per dataset (DEFAULT_UP).
    """
    if dataset not in DATASETS:
        raise MgsError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    src, out = Path(src), Path(out)
    factor = DEFAULT_FACTOR[dataset] if factor is None else int(factor)
    if factor < 1:
        raise MgsError(f"--factor must be a positive integer, got {factor}")
    if dataset == "transforms":
        from mgs.ingest.transforms import ingest_transforms

        return ingest_transforms(src, out, factor, width, up)
    if not src.is_dir():
        raise InputError(f"dataset folder {src} does not exist")
    refuse_overlap(out, {"dataset folder": src}, "scene folder")
    if dataset == "matrixcity":
        train, test, xyz, rgb = _matrixcity(src)
        width = MATRIXCITY_WIDTH if width is None else int(width)
    elif dataset == "colmap":
        model_dir, image_dir = _colmap_paths(src)
        cameras, xyz, rgb = read_model(model_dir, image_dir, strict=True)
        train_names, test_names = split_every([c.name for c in cameras], every=10)
        by_name = {c.name: c for c in cameras}
        train, test = [by_name[n] for n in train_names], [by_name[n] for n in test_names]
    else:
        train, test, xyz, rgb = _megenerf_layout(src)
    if not train or len(train) + len(test) < 2:
        raise InputError(f"{src} has {len(train) + len(test)} registered image(s) "
                         f"({len(train)} for training); a scene needs at least two, one to "
                         "train on and one to test, with overlapping views")
    up_vec = up_vector(up or DEFAULT_UP[dataset], [c.world_to_camera for c in train])

    ensure_writable_dir(out)
    (out / SCENE_JSON).unlink(missing_ok=True)  # incomplete until save_scene writes it again
    if factor == 1 and not width and all(c.image_path.name == c.name and c.image_path.parent
                                         == train[0].image_path.parent for c in train + test):
        cameras = train + test  # one flat folder at full size: use the images in place
    else:
        cameras = materialise(train + test, out / "images", factor, width)
    names = [c.name for c in cameras]  # materialising may rename (→ .png)
    scene = Scene(cameras=cameras, train_names=names[:len(train)],
                  test_names=names[len(train):], points_xyz=xyz, points_rgb=rgb, up=up_vec,
                  scene_dir=out, source=f"{dataset} {src.as_posix()} factor={factor}"
                  + (f" width={width}" if width else ""))
    save_scene(scene, out)
    log.info("ingested %s: %d train / %d test cameras, %d points, up %s → %s", dataset,
             len(train), len(test), len(xyz), np.round(up_vec, 3).tolist(), out)
    return scene


# ------------------------------------------------------------- COLMAP models

def _require(path: Path, what: str, hint: str = "") -> Path:
    if not path.exists():
        raise InputError(f"{what} {path} does not exist{'; ' + hint if hint else ''}")
    return path


def _find_image(image_dir: Path, name: str) -> Path:
    path = image_dir / name
    if path.is_file():
        return path
    # Some releases store .jpg in the model but ship .png (or the reverse): match by stem.
    for suffix in sorted(IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES}):
        if (candidate := path.with_suffix(suffix)).is_file():
            return candidate
    raise InputError(f"image {path} (listed in the COLMAP model) does not exist; restore it or "
                     "remove it from the model")


def read_model(model_dir, image_dir, prefix: str = "", strict: bool = False):
    """Cameras of a COLMAP model at the size of the image files, and its points.

    Radial distortion is dropped with a warning (as the official code does) unless `strict`.
    Camera names become `prefix` + image name.
    """
    model_dir, image_dir = Path(model_dir), Path(image_dir)
    rec = open_model(model_dir)
    cameras, warned = [], set()
    for image in sorted(rec.images.values(), key=lambda im: im.name):
        if not image.has_pose:
            continue
        cam = rec.cameras[image.camera_id]
        K, extra = _intrinsics(cam)
        if np.abs(extra).max(initial=0) > DISTORTION_TOLERANCE:
            if strict:
                raise InputError(f"{model_dir}: camera {image.camera_id} is {cam.model.name} "
                                 f"with distortion {extra.tolist()}; {UNDISTORT_HINT}")
            if image.camera_id not in warned:
                warned.add(image.camera_id)
                log.warning("%s: camera %d has distortion %s; ignored as the official code "
                            "does (run `mgs sfm` for exact undistortion)", model_dir,
                            image.camera_id, np.round(extra, 4).tolist())
        path = _find_image(image_dir, image.name)
        try:
            with Image.open(path) as img:
                size = img.size
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"cannot read image {path} ({exc}); re-export it or remove it "
                             "from the COLMAP model") from exc
        if size != (cam.width, cam.height):
            sx, sy = size[0] / cam.width, size[1] / cam.height
            if abs(sx - sy) > 0.01 * max(sx, sy):
                raise InputError(f"image {path} is {size[0]}x{size[1]} but its COLMAP camera is "
                                 f"{cam.width}x{cam.height} (another aspect ratio); re-export")
            K = np.diag([sx, sy, 1.0]) @ K  # model made at another resolution
        pose = np.eye(4)
        pose[:3, :] = image.cam_from_world().matrix()
        # Flat names: a scene keeps all its images in one folder (mgs.scene.save_scene).
        name = prefix + Path(image.name).with_name(path.name).as_posix().replace("/", "_")
        cameras.append(Camera(name=name, K=K, width=size[0], height=size[1], world_to_camera=pose,
                              image_path=path))
    if not cameras:
        raise InputError(f"COLMAP model {model_dir} has no registered images")
    points = list(rec.points3D.values())
    xyz = np.array([p.xyz for p in points], np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points], np.uint8).reshape(-1, 3)
    return cameras, xyz, rgb


def _intrinsics(cam: pycolmap.Camera) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole K and the distortion parameters the pinhole model leaves out."""
    model, params = cam.model.name, np.asarray(cam.params, np.float64)
    if model in TRAINABLE_CAMERA_MODELS:
        return cam.calibration_matrix(), np.zeros(0)
    if model in ("SIMPLE_RADIAL", "RADIAL"):
        f, cx, cy = params[:3]
        return np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]]), params[3:]
    if model in ("OPENCV", "FULL_OPENCV"):
        fx, fy, cx, cy = params[:4]
        return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]), params[4:]
    raise InputError(f"camera model {model} is not supported; {UNDISTORT_HINT}")


def _colmap_paths(src: Path) -> tuple[Path, Path]:
    image_dir = _require(src / "images", "image folder",
                         "a COLMAP dataset has images/ and sparse/0")
    for model_dir in (src / "sparse" / "0", src / "sparse"):
        if any(model_dir.glob("cameras.*")):
            return model_dir, image_dir
    raise InputError(f"COLMAP model folder {src / 'sparse' / '0'} does not exist (no cameras.bin "
                     "or cameras.txt); point SRC at a folder with images/ and sparse/0")


def _megenerf_layout(src: Path):
    """Mill-19 / UrbanScene3D: train and val models; points from train."""
    splits = {}
    for split in ("train", "val"):
        folder = _require(src / split, f"{split} folder",
                          "expected <scene>/{train,val}/{images,sparse/0} (ALGORITHM.md §1.1)")
        image_dir = folder / "images"
        if not image_dir.is_dir() and (folder / "rgbs").is_dir():
            image_dir = folder / "rgbs"  # the Mega-NeRF archives' name before renaming
        _require(image_dir, f"{split} image folder")
        model_dir = _require(folder / "sparse" / "0", f"{split} COLMAP model",
                             "copy CityGaussian's COLMAP results there (docs/prepare_data.md)")
        splits[split] = read_model(model_dir, image_dir, prefix=f"{split}_")
    (train, xyz, rgb), (test, _, _) = splits["train"], splits["val"]
    return train, test, xyz, rgb


# --------------------------------------------------------------- MatrixCity

def _matrixcity_split(src: Path, split: str) -> list[Camera]:
    folder = src / split / "block_all"
    if not folder.is_dir() and split == "test" and (src / "test" / "block_all_test").is_dir():
        folder = src / "test" / "block_all_test"  # CityGaussian's name for the test block
    _require(folder, f"MatrixCity {split} folder", "expected aerial/{train,test}/block_all")
    for candidate in (folder / f"transforms_{split}.json", folder / "transforms.json"):
        if candidate.is_file():
            path = candidate
            break
    else:
        raise InputError(f"MatrixCity {split} poses {folder / f'transforms_{split}.json'} do not "
                         "exist (transforms.json is also accepted)")
    try:
        meta = json.loads(path.read_text())
        frames = meta["frames"]
    except (ValueError, KeyError) as exc:
        raise InputError(f"{path} is not a transforms json with 'frames' ({exc})") from exc
    cameras = []
    for index, frame in enumerate(frames):
        image_path = _matrixcity_image(folder, frame, index, path)
        with Image.open(image_path) as img:
            w, h = img.size
        get = lambda key, default=None: frame.get(key, meta.get(key, default))  # noqa: E731
        if get("fl_x") is not None:
            fx, fy = float(get("fl_x")), float(get("fl_y", get("fl_x")))
        elif get("camera_angle_x") is not None:
            fx = fy = 0.5 * w / np.tan(0.5 * float(get("camera_angle_x")))
        else:
            raise InputError(f"{path}: no focal length (fl_x or camera_angle_x)")
        sx, sy = w / float(get("w", w)), h / float(get("h", h))  # json made for another size
        K = np.array([[fx * sx, 0, float(get("cx", w / 2)) * sx],
                      [0, fy * sy, float(get("cy", h / 2)) * sy], [0, 0, 1.0]])
        cameras.append(Camera(name=f"{split}_{index:04d}{image_path.suffix.lower()}", K=K,
                              width=w, height=h,
                              world_to_camera=opengl_to_colmap(frame["transform_matrix"]),
                              image_path=image_path))
    if not cameras:
        raise InputError(f"{path} has no frames")
    return cameras


def _matrixcity_image(folder: Path, frame: dict, index: int, json_path: Path) -> Path:
    rel = Path(frame["file_path"])
    candidates = [folder / rel, folder / "input" / f"{index:04d}.png", folder / "input" / rel.name]
    for candidate in candidates:
        for path in ([candidate] if candidate.suffix else
                     [candidate.with_suffix(s) for s in (".png", ".jpg", ".jpeg")]):
            if path.is_file():
                return path
    raise InputError(f"{json_path}: image of frame {index} not found at {candidates[0]} or "
                     f"{candidates[1]}")


def _matrixcity(src: Path):
    train, test = _matrixcity_split(src, "train"), _matrixcity_split(src, "test")
    model_dir = _require(src / "train" / "block_all" / "sparse" / "0",
                         "MatrixCity point cloud (COLMAP model)",
                         "copy CityGaussian's COLMAP result for the aerial train set there "
                         "(docs/prepare_data.md); its points initialise the anchors")
    rec = open_model(model_dir)
    points = list(rec.points3D.values())
    xyz = np.array([p.xyz for p in points], np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points], np.uint8).reshape(-1, 3)
    return train, test, xyz, rgb
