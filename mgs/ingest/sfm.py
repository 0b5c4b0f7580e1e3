"""Structure from motion on a folder of photos with pycolmap, written as an mgs scene folder.

Stages: feature extraction → matching (exhaustive | sequential | GPS-spatial) → incremental
mapping → orientation (world up = +z) → undistortion to PINHOLE. Output (``OUT/``)::

    images/      undistorted images, names as in IMAGE_DIR
    sparse/0/    PINHOLE COLMAP model (with tracks), oriented so +z is up
    sfm.json     report: stage times, registered / total, reprojection error, orientation
    scene.json   written last: the completion marker (see mgs.scene)

The old scene in OUT stays valid until the new one is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from mgs.pycolmap_import import pycolmap
from PIL import Image
from tqdm import tqdm

from mgs.atomic import ensure_writable_dir, json_text, refuse_overlap, write_text
from mgs.errors import InputError, MgsError
from mgs.ingest.orientation import orientation, wgs84_to_enu
from mgs.ingest.undistort import replace_dir, undistort_model
from mgs.scene import MODEL_SUBDIR, SCENE_JSON, Scene, read_colmap, save_scene, split_every

log = logging.getLogger("mgs.ingest.sfm")
pycolmap.logging.minloglevel = 2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
MATCHING = ("exhaustive", "sequential", "spatial")
REPORT_JSON = "sfm.json"


@dataclass
class SfmConfig:
    matching: str = "exhaustive"
    min_registered: float = 0.8   # fail below this fraction of registered images
    max_image_size: int = 3200    # extraction only (COLMAP's default); outputs stay full size
    max_features: int = 8192
    camera_model: str = "SIMPLE_RADIAL"
    sequential_overlap: int = 10
    spatial_neighbors: int = 20
    spatial_max_distance: float = 0.0  # metres; 0 = auto from the GPS spacing
    seed: int = 0
    threads: int = -1             # -1 = all cores

    def validate(self) -> None:
        if self.matching not in MATCHING:
            raise MgsError(f"matching must be one of {', '.join(MATCHING)}, got {self.matching!r}")
        if not 0.0 <= self.min_registered <= 1.0:
            raise MgsError(f"min_registered must be a fraction in [0, 1], "
                           f"got {self.min_registered}")
        if self.max_features < 64 or (self.max_image_size != -1 and self.max_image_size < 100):
            raise MgsError("max_features must be >= 64 and max_image_size >= 100 (or -1 = full)")


# ------------------------------------------------------------------ inputs

def list_images(image_dir) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Readable images directly in `image_dir` (sorted names) and their sizes.

    Non-image files are ignored and unreadable/corrupt images skipped, each with a warning;
    sub-folders are not searched (a scene keeps its images in one flat folder).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise InputError(f"image folder {image_dir} does not exist or is not a folder")
    names, sizes, others, corrupt = [], {}, [], []
    for path in sorted(p for p in image_dir.iterdir() if p.is_file()):
        if path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            others.append(path.name)
            continue
        try:
            with Image.open(path) as img:
                size = img.size
                img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # fast full decode
                img.load()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            corrupt.append(f"{path.name} ({exc})")
            continue
        names.append(path.name)
        sizes[path.name] = size
    if others:
        log.warning("ignoring %d non-image file(s) in %s: %s", len(others), image_dir,
                    _short_list(others))
    if corrupt:
        log.warning("skipping %d unreadable image(s): %s", len(corrupt), _short_list(corrupt))
    if len(names) < 3:
        raise InputError(f"{image_dir} has {len(names)} readable image(s) "
                         f"({'/'.join(sorted(IMAGE_SUFFIXES))}); SfM needs at least 3 "
                         "overlapping photos taken from different positions")
    return names, sizes


def _short_list(items, limit: int = 10) -> str:
    items = list(items)
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ------------------------------------------------------------ orientation

def _orient(rec: pycolmap.Reconstruction, priors: dict) -> tuple[str, list | None]:
    """Transform `rec` in place; returns the method and, if GPS-aligned, the (lat, lon) of x=y=0."""
    ids = sorted(rec.reg_image_ids())
    poses = [np.vstack([rec.images[i].cam_from_world().matrix(), [0, 0, 0, 1]]) for i in ids]
    lla = np.array([priors.get(i, [np.nan] * 3) for i in ids], np.float64)
    ok = np.isfinite(lla).all(1)
    gps, origin = None, lla[ok].mean(0) if ok.sum() >= 3 else None
    if origin is not None:
        gps = np.full_like(lla, np.nan)
        gps[ok] = wgs84_to_enu(lla[ok], origin)
    scale, rot, t, method = orientation(poses, gps)
    rec.transform(pycolmap.Sim3d(scale, pycolmap.Rotation3d(rot), t))
    # z = 0 at the median point (ground); x, y = 0 at the GPS origin or under the cameras.
    georef = "GPS" in method
    centres = np.stack([rec.images[i].projection_center() for i in ids])
    z0 = np.median([p.xyz[2] for p in rec.points3D.values()]) if rec.num_points3D() else 0.0
    shift = -np.array([*(np.zeros(2) if georef else np.median(centres[:, :2], 0)), z0])
    rec.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(np.eye(3)), shift))
    return method, [float(origin[0]), float(origin[1])] if georef else None


# ------------------------------------------------------------------ stages

def _extract(db: Path, image_dir: Path, names, sizes, config: SfmConfig) -> None:
    options = pycolmap.FeatureExtractionOptions()
    options.max_image_size = config.max_image_size
    options.num_threads = config.threads
    options.sift.max_num_features = config.max_features
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = config.camera_model
    # One shared camera when all photos have one size (one drone camera), else COLMAP decides.
    single = len(set(sizes.values())) == 1
    mode = pycolmap.CameraMode.SINGLE if single else pycolmap.CameraMode.AUTO
    chunk = max(4, len(names) // 20)  # chunks only to show progress
    with tqdm(total=len(names), desc="sfm: extracting features", unit="img") as bar:
        for start in range(0, len(names), chunk):
            pycolmap.extract_features(db, image_dir, image_names=names[start:start + chunk],
                                      camera_mode=mode, reader_options=reader,
                                      extraction_options=options, device=pycolmap.Device.auto)
            if single and reader.existing_camera_id < 0:
                reader.existing_camera_id = 1  # later chunks reuse the first chunk's camera
            bar.update(len(names[start:start + chunk]))


def _gps_priors(database: pycolmap.Database) -> dict[int, list[float]]:
    priors = {}
    for prior in database.read_all_pose_priors():
        if prior.coordinate_system.name == "WGS84" and prior.has_position():
            priors[prior.corr_data_id.id] = [float(v) for v in prior.position]
    return priors


def _match(db: Path, config: SfmConfig, priors: dict, num_images: int) -> None:
    options = pycolmap.FeatureMatchingOptions()
    options.num_threads = config.threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = config.seed  # reruns give the same pairs
    kwargs = dict(matching_options=options, verification_options=verification,
                  device=pycolmap.Device.auto)
    if config.matching == "exhaustive":
        pycolmap.match_exhaustive(db, **kwargs)
    elif config.matching == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = config.sequential_overlap
        pycolmap.match_sequential(db, pairing_options=pairing, **kwargs)
    else:
        if not priors:
            raise InputError("spatial matching needs GPS positions, but none of the images "
                             "has GPS latitude/longitude/altitude in its EXIF; use "
                             "--matching exhaustive (or sequential for video frames)")
        if len(priors) < num_images:
            log.warning("%d of %d images have no GPS tag; spatial matching cannot pair them",
                        num_images - len(priors), num_images)
        pairing = pycolmap.SpatialPairingOptions()
        pairing.max_num_neighbors = config.spatial_neighbors
        pairing.max_distance = config.spatial_max_distance or _auto_distance(priors)
        log.info("spatial matching: %d nearest GPS neighbours within %.0f m",
                 pairing.max_num_neighbors, pairing.max_distance)
        pycolmap.match_spatial(db, pairing_options=pairing, **kwargs)


def _auto_distance(priors: dict) -> float:
    """Neighbour radius: 8× the median spacing between GPS positions (ground plane), ≥ 50 m."""
    enu = wgs84_to_enu(np.array(list(priors.values())))[:, :2]
    dist = np.linalg.norm(enu[:, None] - enu[None], axis=-1) + np.eye(len(enu)) * 1e12
    return float(max(50.0, 8.0 * np.median(dist.min(1)))) if len(enu) > 1 else 100.0


def _map(db: Path, image_dir: Path, out: Path, config: SfmConfig,
         num_images: int) -> dict[int, pycolmap.Reconstruction]:
    options = pycolmap.IncrementalPipelineOptions()
    options.min_model_size = 3  # COLMAP's 10 would drop every model of a small set
    options.random_seed = config.seed
    options.num_threads = config.threads
    bar = tqdm(total=num_images, desc="sfm: registering images", unit="img")

    def registered() -> None:
        bar.update(1)

    try:
        return pycolmap.incremental_mapping(db, image_dir, out, options=options,
                                            initial_image_pair_callback=lambda: bar.update(2),
                                            next_image_callback=registered)
    finally:
        bar.close()


# ---------------------------------------------------------------- pipeline

@contextlib.contextmanager
def _timed(times: dict, stage: str, bar: str | None = None):
    """Time a stage; `bar` shows a one-step progress bar for stages pycolmap runs in one call."""
    tic = time.perf_counter()
    with tqdm(total=1, desc=f"sfm: {bar}", unit="stage", disable=bar is None) as progress:
        yield
        progress.update(1)
    times[stage] = round(time.perf_counter() - tic, 2)


def _read_db(db: Path) -> tuple[set[str], dict, int]:
    database = pycolmap.Database.open(db)
    try:
        return ({im.name for im in database.read_all_images()}, _gps_priors(database),
                database.num_verified_image_pairs())
    finally:
        database.close()


def run_sfm(image_dir, out_dir, config: SfmConfig | None = None) -> Scene:
    """Photos in `image_dir` → oriented, undistorted scene folder `out_dir`; returns the Scene."""
    config = config or SfmConfig()
    config.validate()
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    refuse_overlap(out_dir, {"image folder": image_dir}, "scene folder")
    names, sizes = list_images(image_dir)
    ensure_writable_dir(out_dir)
    work = Path(tempfile.mkdtemp(prefix=".sfm-", suffix=".tmp", dir=out_dir))
    db, times = work / "database.db", {}
    log.info("SfM on %d images from %s (%s matching)", len(names), image_dir, config.matching)
    try:
        with _timed(times, "extract"):
            _extract(db, image_dir, names, sizes, config)
        in_db, priors, _ = _read_db(db)
        if missing := [n for n in names if n not in in_db]:
            log.warning("COLMAP could not read %d image(s): %s", len(missing), _short_list(missing))
        with _timed(times, "match", f"{config.matching} matching"):
            _match(db, config, priors, len(in_db))
        if _read_db(db)[2] == 0:
            raise InputError(f"no two images in {image_dir} could be matched geometrically; the "
                             "photos must overlap (about 60 % or more) and show the same scene")
        with _timed(times, "map"):
            models = _map(db, image_dir, work / "mapped", config, len(in_db))
        if not models:
            raise InputError(
                f"SfM could not build any model from {image_dir}: no image pair has enough "
                "matches and parallax to start from. The photos must overlap and be taken from "
                "different positions (identical or near-identical photos, or a camera that only "
                "rotates, cannot be reconstructed)")
        rec = max(models.values(), key=lambda r: r.num_reg_images())
        stats = _check_registered(rec, names, config, image_dir, len(models))
        with _timed(times, "undistort", "orienting + undistorting to PINHOLE"):
            method, origin = _orient(rec, priors)
            undistorted = undistort_model(rec, image_dir, work, config.threads)
            (work / "sparse").mkdir()
            os.replace(undistorted / "sparse", work / MODEL_SUBDIR)
        log.info("oriented the model: up from %s", method)
        stats.update(orientation=method, origin_wgs84=origin, seconds=times, config=asdict(config),
                     image_dir=os.path.relpath(image_dir.resolve(), out_dir.resolve()))
        # Swap in: scene.json goes first (the scene is incomplete from here) and comes back last.
        (out_dir / SCENE_JSON).unlink(missing_ok=True)
        replace_dir(undistorted / "images", out_dir / "images")
        replace_dir(work / "sparse", out_dir / "sparse")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_text(out_dir / REPORT_JSON, json_text(stats))
    cameras, xyz, rgb = read_colmap(out_dir / MODEL_SUBDIR, out_dir / "images")
    train, test = split_every([c.name for c in cameras], every=10)
    scene = Scene(cameras=cameras, train_names=train, test_names=test, points_xyz=xyz,
                  points_rgb=rgb, up=np.array([0.0, 0.0, 1.0]), scene_dir=out_dir,
                  source=f"sfm {config.matching} from {stats['image_dir']}; "
                         f"{stats['registered']}/{stats['total']} registered; up from {method}")
    save_scene(scene, out_dir, write_model=False)
    log.info("SfM done: %d/%d registered, %d points, %.2f px reprojection error; %s",
             stats["registered"], stats["total"], stats["points"], stats["reprojection_error_px"],
             ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return scene


def _check_registered(rec, names, config: SfmConfig, image_dir: Path, num_models: int) -> dict:
    registered = {rec.images[i].name for i in rec.reg_image_ids()}
    missing = [n for n in names if n not in registered]
    ratio = len(registered) / len(names)
    stats = dict(registered=len(registered), total=len(names), models=num_models,
                 points=rec.num_points3D(),
                 reprojection_error_px=round(float(rec.compute_mean_reprojection_error()), 4),
                 mean_track_length=round(float(rec.compute_mean_track_length()), 3),
                 unregistered=missing)
    log.info("largest of %d model(s): %d/%d images registered (%.0f %%), %d points",
             num_models, len(registered), len(names), 100 * ratio, rec.num_points3D())
    if ratio < config.min_registered:
        raise InputError(
            f"SfM registered only {len(registered)} of {len(names)} images from {image_dir} "
            f"({100 * ratio:.0f} % < {100 * config.min_registered:.0f} %); not registered: "
            f"{_short_list(missing, 20)}. Check that they overlap the others, try "
            "--matching exhaustive, or lower --min-registered")
    if missing:
        log.warning("%d image(s) not registered and left out: %s", len(missing),
                    _short_list(missing))
    return stats
