"""Sparse points of posed images: pycolmap's SIFT features, matching and triangulation with the
given poses, intrinsics and lens models held fixed (for captures that come with poses but
without points)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from mgs.pycolmap_import import pycolmap

from mgs.errors import InputError, MgsError
from mgs.ingest.undistort import PINHOLE, Lens
from mgs.scene import Camera

log = logging.getLogger("mgs.ingest.triangulate")
pycolmap.logging.minloglevel = 2

EXHAUSTIVE_LIMIT = 150  # more images than this are matched sequentially (video captures)
SEQUENTIAL_OVERLAP = 20
# SIFT's default peak threshold finds too few points on small or smooth images
PEAK_THRESHOLD = 0.002


def triangulate(cameras: list[Camera], work_parent: Path, lenses: dict[str, Lens] | None = None,
                threads: int = -1) -> pycolmap.Reconstruction:
    """A COLMAP model of the images with the cameras' poses, intrinsics and lenses (PINHOLE
    unless given) held fixed and the sparse points triangulated: SIFT features → matching
    (exhaustive, or sequential past EXHAUSTIVE_LIMIT images) → triangulation (pycolmap).
    All images must share one folder."""
    image_dir = cameras[0].image_path.parent
    by_name = {cam.name: cam for cam in cameras}
    work = Path(tempfile.mkdtemp(prefix=".triangulate-", suffix=".tmp", dir=work_parent))
    db = work / "database.db"
    try:
        _features(db, image_dir, cameras, lenses or {}, threads)
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
    log.info("triangulated %d points, mean reprojection error %.2f px", len(points),
             result.compute_mean_reprojection_error())
    return result


def points_of(rec: pycolmap.Reconstruction) -> tuple[np.ndarray, np.ndarray]:
    """Positions and colours of the model's 3D points."""
    points = list(rec.points3D.values())
    xyz = np.array([p.xyz for p in points], np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in points], np.uint8).reshape(-1, 3)
    return xyz, rgb


def _features(db: Path, image_dir: Path, cameras: list[Camera], lenses: dict[str, Lens],
              threads: int) -> None:
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
    try:  # the known intrinsics and lens replace COLMAP's guesses, so matching verifies with them
        for image in database.read_all_images():
            lens = lenses.get(image.name, PINHOLE)
            camera = lens.colmap_camera(by_name[image.name], image.camera_id)
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
