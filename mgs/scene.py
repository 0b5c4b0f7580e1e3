"""Scene model: cameras, sparse points, train/test split, COLMAP I/O and the image cache.

Scene folder layout (``results/{scene}/scene/``)::

    images/        full-size images (any PIL-readable format)
    sparse/0/      COLMAP model (cameras, images, points3D)
    scene.json     image dir, train/test names, up axis, optional aabb, source

Poses follow COLMAP / OpenCV: ``world_to_camera`` maps world points into a camera
frame with x right, y down, z forward; pixel centres sit at integer + 0.5.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mgs.atomic import _UMASK, atomic_path, ensure_writable_dir, write_text
from mgs.colmap_check import check_binary_model
from mgs.errors import InputError, MgsError

log = logging.getLogger("mgs.scene")

MODEL_SUBDIR = Path("sparse") / "0"
SCENE_JSON = "scene.json"
SCENE_FORMAT_VERSION = 1
TRAINABLE_CAMERA_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
UNDISTORT_HINT = ("the images must be undistorted first: run `mgs sfm` (it undistorts) or "
                  "`colmap image_undistorter --image_path IMAGES --input_path MODEL "
                  "--output_path OUT` and use OUT/images and OUT/sparse")


def scaled_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """Image size after downsampling by `factor`; shared by Camera.scaled and the image cache."""
    if int(factor) != factor or factor < 1:
        raise MgsError(f"downsampling factor must be a positive integer, got {factor}")
    return max(1, round(width / factor)), max(1, round(height / factor))


@dataclass
class Camera:
    name: str                   # image file name, as stored in the COLMAP model
    K: np.ndarray               # 3x3 float64 intrinsics
    width: int
    height: int
    world_to_camera: np.ndarray  # 4x4 float64, OpenCV convention
    image_path: Path

    def __post_init__(self) -> None:
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.world_to_camera = np.asarray(self.world_to_camera, dtype=np.float64).reshape(4, 4)
        self.width, self.height = int(self.width), int(self.height)
        self.image_path = Path(self.image_path)

    @property
    def viewmat(self) -> np.ndarray:
        return self.world_to_camera

    @property
    def center(self) -> np.ndarray:
        """Camera position in world coordinates: -R^T t."""
        rotation, translation = self.world_to_camera[:3, :3], self.world_to_camera[:3, 3]
        return -rotation.T @ translation

    def scaled(self, factor: int) -> "Camera":
        """This camera for images downsampled by an integer `factor` (see `scaled_size`)."""
        new_w, new_h = scaled_size(self.width, self.height, factor)
        K = self.K.copy()
        # Continuous pixel coordinates scale linearly, so fx and cx share one factor.
        K[0, :] *= new_w / self.width
        K[1, :] *= new_h / self.height
        K[2] = (0.0, 0.0, 1.0)
        return replace(self, K=K, width=new_w, height=new_h)


@dataclass
class Scene:
    cameras: list[Camera]
    train_names: list[str]
    test_names: list[str]
    points_xyz: np.ndarray   # (N, 3) float64
    points_rgb: np.ndarray   # (N, 3) uint8
    up: np.ndarray           # (3,) unit vector
    scene_dir: Path
    aabb: np.ndarray | None = None  # (2, 3) min / max corner, optional
    source: str = ""
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.cameras = sorted(self.cameras, key=lambda cam: cam.name)
        self.points_xyz = np.asarray(self.points_xyz, dtype=np.float64).reshape(-1, 3)
        self.points_rgb = np.asarray(self.points_rgb, dtype=np.uint8).reshape(-1, 3)
        self.up = np.asarray(self.up, dtype=np.float64).reshape(3)
        self.scene_dir = Path(self.scene_dir)
        if self.aabb is not None:
            self.aabb = np.asarray(self.aabb, dtype=np.float64).reshape(2, 3)
        self._by_name = {cam.name: cam for cam in self.cameras}
        unknown = [n for n in [*self.train_names, *self.test_names] if n not in self._by_name]
        if unknown:
            raise InputError(f"scene {self.scene_dir}: split names not in the COLMAP model: "
                             f"{unknown[:5]}")

    def camera(self, name: str) -> Camera:
        try:
            return self._by_name[name]
        except KeyError:
            raise InputError(f"scene {self.scene_dir} has no camera named {name!r}") from None

    def train_cameras(self) -> list[Camera]:
        return [self.camera(n) for n in sorted(self.train_names)]

    def test_cameras(self) -> list[Camera]:
        return [self.camera(n) for n in sorted(self.test_names)]


def split_every(names, every: int = 10) -> tuple[list[str], list[str]]:
    """(train, test): sorted by name, views with index % every == 0 are test (so the first is)."""
    ordered = sorted(names)
    test = [n for i, n in enumerate(ordered) if i % every == 0]
    train = [n for i, n in enumerate(ordered) if i % every != 0]
    return train, test


# ---------------------------------------------------------------- COLMAP I/O

def _model_file(model_dir: Path, stem: str) -> Path:
    for suffix in (".bin", ".txt"):
        if (model_dir / (stem + suffix)).exists():
            return model_dir / (stem + suffix)
    return model_dir / (stem + ".bin")


def _pycolmap():
    """pycolmap, imported on first use: jobs that only train never load it."""
    from mgs.pycolmap_import import pycolmap

    pycolmap.logging.minloglevel = 2
    return pycolmap


def open_model(model_dir):
    """pycolmap's reader with a message that names the files (its own says e.g. only
    "vector::reserve" for a truncated images.bin)."""
    model_dir = Path(model_dir)
    pycolmap = _pycolmap()
    check_binary_model(model_dir)  # pycolmap can loop for minutes on truncated counts
    try:
        return pycolmap.Reconstruction(str(model_dir))
    except Exception as exc:  # pycolmap raises ValueError/IndexError/RuntimeError on bad models
        sizes = ", ".join(f"{p.name} {p.stat().st_size} B" for p in sorted(model_dir.glob("*"))
                          if p.stem in ("cameras", "images", "points3D")) or "no model files"
        raise InputError(f"cannot read the COLMAP model in {model_dir} ({sizes}): one of its "
                         f"files is truncated, damaged or missing (pycolmap: {exc}); re-export "
                         "the model with cameras, images and points3D files (.bin or .txt)"
                         ) from exc


def read_colmap(model_dir, image_dir) -> tuple[list[Camera], np.ndarray, np.ndarray]:
    """Registered images of a COLMAP model as Cameras (sorted by name), plus its points."""
    model_dir, image_dir = Path(model_dir), Path(image_dir)
    if not model_dir.is_dir():
        raise InputError(f"COLMAP model folder {model_dir} does not exist")
    rec = open_model(model_dir)
    if rec.num_images() == 0:
        raise InputError(f"COLMAP folder {model_dir} has no images; "
                         "run SfM first or point to the right sparse/N folder")
    for camera_id, cam in rec.cameras.items():
        if cam.model.name not in TRAINABLE_CAMERA_MODELS:
            raise InputError(f"{_model_file(model_dir, 'cameras')}: camera {camera_id} uses the "
                             f"{cam.model.name} model, but training only accepts "
                             f"{' / '.join(TRAINABLE_CAMERA_MODELS)}; {UNDISTORT_HINT}")
    cameras = []
    for image in rec.images.values():
        if not image.has_pose:
            log.warning("skipping unregistered image %s in %s", image.name, model_dir)
            continue
        cam = rec.cameras[image.camera_id]
        world_to_camera = np.eye(4)
        world_to_camera[:3, :] = image.cam_from_world().matrix()
        cameras.append(Camera(name=image.name, K=cam.calibration_matrix(), width=cam.width,
                              height=cam.height, world_to_camera=world_to_camera,
                              image_path=image_dir / image.name))
    if not cameras:
        raise InputError(f"COLMAP folder {model_dir} has no registered images")
    cameras.sort(key=lambda c: c.name)
    # filled one point at a time: a list of every point's Python object first would peak at
    # ~0.5 KB per point (2.3 GB for a 4M-point city, against 0.6 GB this way)
    count = rec.num_points3D()
    xyz, rgb = np.empty((count, 3), dtype=np.float64), np.empty((count, 3), dtype=np.uint8)
    for i, point in enumerate(rec.points3D.values()):
        xyz[i], rgb[i] = point.xyz, point.color
    return cameras, xyz, rgb


def _to_pycolmap(cameras, points_xyz, points_rgb):
    pycolmap = _pycolmap()
    rec = pycolmap.Reconstruction()
    camera_ids: dict[tuple, int] = {}  # identical intrinsics share one COLMAP camera
    for image_id, cam in enumerate(cameras, start=1):
        fx, fy, cx, cy = cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]
        key = (cam.width, cam.height, fx, fy, cx, cy)
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            rec.add_camera_with_trivial_rig(pycolmap.Camera(
                model="PINHOLE", width=cam.width, height=cam.height,
                params=[fx, fy, cx, cy], camera_id=camera_ids[key]))
        rotation = pycolmap.Rotation3d(np.ascontiguousarray(cam.world_to_camera[:3, :3]))
        pose = pycolmap.Rigid3d(rotation, np.ascontiguousarray(cam.world_to_camera[:3, 3]))
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=cam.name, camera_id=camera_ids[key], image_id=image_id), pose)
    for xyz, rgb in zip(np.asarray(points_xyz, np.float64), np.asarray(points_rgb, np.uint8)):
        rec.add_point3D(xyz, pycolmap.Track(), rgb)
    return rec


def write_colmap(cameras, points_xyz, points_rgb, model_dir) -> None:
    """Write a PINHOLE COLMAP model; the folder appears complete or not at all."""
    model_dir = Path(model_dir)
    ensure_writable_dir(model_dir.parent)
    rec = _to_pycolmap(cameras, points_xyz, points_rgb)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", suffix=".tmp",
                                    dir=model_dir.parent))
    old_dir = None
    try:
        rec.write(str(tmp_dir))
        os.chmod(tmp_dir, 0o777 & ~_UMASK)  # mkdtemp makes 0700; others must read the model
        if model_dir.exists():
            # A directory cannot be replaced in one rename; park the old one first.
            old_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", suffix=".old",
                                            dir=model_dir.parent))
            os.replace(model_dir, old_dir)
        os.replace(tmp_dir, model_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir is not None and not model_dir.exists():
            os.replace(old_dir, model_dir)
        raise
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


# ------------------------------------------------------------- scene folder

def check_images_exist(cameras) -> None:
    for cam in cameras:
        if not cam.image_path.is_file():
            raise InputError(f"image file {cam.image_path} (listed in the COLMAP model) does not "
                             "exist; restore it or remove it from the model")


def save_scene(scene: Scene, scene_dir=None, write_model: bool = True) -> Path:
    """Write `sparse/0` (unless write_model=False) and then scene.json, the completion marker."""
    scene_dir = Path(scene_dir if scene_dir is not None else scene.scene_dir)
    ensure_writable_dir(scene_dir)
    image_dirs = {cam.image_path.parent for cam in scene.cameras}
    if len(image_dirs) != 1:
        raise MgsError(f"scene {scene_dir}: images must share one folder, got {len(image_dirs)}")
    image_dir = image_dirs.pop()
    # Store the image folder relative to the scene folder so results can be moved.
    image_dir_rel = os.path.relpath(image_dir.resolve(), scene_dir.resolve())
    if write_model:
        write_colmap(scene.cameras, scene.points_xyz, scene.points_rgb, scene_dir / MODEL_SUBDIR)
    meta = {
        "version": SCENE_FORMAT_VERSION,
        "image_dir": Path(image_dir_rel).as_posix(),
        "train_names": sorted(scene.train_names),
        "test_names": sorted(scene.test_names),
        "up": [float(v) for v in scene.up],
        "aabb": None if scene.aabb is None else np.asarray(scene.aabb, float).tolist(),
        "source": scene.source,
    }
    write_text(scene_dir / SCENE_JSON, json.dumps(meta, indent=2) + "\n")
    return scene_dir


def load_scene(scene_dir) -> Scene:
    scene_dir = Path(scene_dir)
    meta_path = scene_dir / SCENE_JSON
    if not meta_path.is_file():
        raise InputError(f"{meta_path} not found; create the scene first (e.g. `mgs sfm` or the "
                         "synthetic scene generator)")
    try:
        meta = json.loads(meta_path.read_text())
        image_dir = scene_dir / meta["image_dir"]
        train_names, test_names = list(meta["train_names"]), list(meta["test_names"])
        up = np.asarray(meta.get("up", [0.0, 0.0, 1.0]), dtype=np.float64).reshape(3)
        aabb = meta.get("aabb")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{meta_path} is malformed ({exc}); regenerate the scene") from exc
    cameras, xyz, rgb = read_colmap(scene_dir / MODEL_SUBDIR, image_dir)
    check_images_exist(cameras)
    return Scene(cameras=cameras, train_names=train_names, test_names=test_names,
                 points_xyz=xyz, points_rgb=rgb, up=up, scene_dir=scene_dir,
                 aabb=None if aabb is None else np.asarray(aabb, np.float64),
                 source=str(meta.get("source", "")))


# -------------------------------------------------------------- image cache

def _open_rgb(path: Path, camera: Camera, background=(0.0, 0.0, 0.0)):
    from PIL import Image

    from mgs.images import to_rgb

    if not path.is_file():
        raise InputError(f"image file {path} does not exist; restore it or remove it from the "
                         "COLMAP model")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not later
            # EXIF orientation is ignored on purpose: COLMAP uses the stored pixel layout.
            rgb = to_rgb(img, path, background)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path} ({exc}); re-export it or remove it from "
                         "the COLMAP model") from exc
    if rgb.size != (camera.width, camera.height):
        raise InputError(f"image {path} is {rgb.size[0]}x{rgb.size[1]} but the COLMAP camera "
                         f"says {camera.width}x{camera.height}; re-export the image or the model")
    return rgb


def cache_path(camera: Camera, factor: int, cache_dir) -> Path:
    # Keep sub-folders of the image name so same-stem images in different folders don't clash.
    return Path(cache_dir) / f"images_{factor}" / Path(camera.name).with_suffix(".png")


def load_image(camera: Camera, factor: int = 1, cache_dir=None, background=None):
    """(H, W, 3) float32 torch tensor in [0, 1] at `camera.scaled(factor)` resolution
    (see `load_image_array`)."""
    import torch

    return torch.from_numpy(image_to_float(load_image_array(camera, factor, cache_dir,
                                                            background)))


def image_to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 in [0, 1] (the one conversion every training image goes
    through, so a cached uint8 copy gives the same bits as decoding again)."""
    return np.asarray(pixels, dtype=np.float32) / 255.0


def load_image_array(camera: Camera, factor: int = 1, cache_dir=None,
                     background=None) -> np.ndarray:
    """(H, W, 3) uint8 RGB at `camera.scaled(factor)` resolution.

    Downsampled images are made with PIL bicubic and cached once as PNG under
    ``cache_dir/images_{factor}/``, keyed by the source's content (and the `background` that
    transparent pixels were composited onto, default black); atomic writes make concurrent
    jobs safe.
    """
    from PIL import Image

    from mgs.images import file_digest, read_cached_png, save_cached_png

    background = tuple(float(v) for v in (background if background is not None else (0, 0, 0)))
    size = scaled_size(camera.width, camera.height, factor)
    if factor == 1:
        img = _open_rgb(camera.image_path, camera, background)
    else:
        if cache_dir is None:
            raise MgsError("load_image needs a cache_dir for factor > 1")
        cached = cache_path(camera, factor, cache_dir)
        img, digest = None, None
        if camera.image_path.is_file():
            digest = file_digest(camera.image_path, f"background={background}")
            img = read_cached_png(cached, size, digest) if cached.exists() else None
        if img is None:
            img = _open_rgb(camera.image_path, camera, background).resize(size, Image.BICUBIC)
            ensure_writable_dir(cached.parent)
            with atomic_path(cached) as tmp:
                save_cached_png(img, tmp, digest)
    return np.asarray(img, dtype=np.uint8)
