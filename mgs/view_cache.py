"""A block's training views decoded once per run: uint8 pixels and cameras in the run folder.

Every round of a block trains on the same views. The first job of a block writes
`RUN/cache/views_{b}.{key}.npy` (the views' uint8 pixels, one flat array) and then
`RUN/cache/views_{b}.json` (names, sizes, intrinsics and poses at training resolution, the key),
the completion marker. Later rounds map the pixels (`np.load(mmap_mode="r")`: jobs of one node
share the pages) and load neither PIL nor pycolmap nor the scene's COLMAP model.

The key is a SHA-256 of what shaped the views: the source images' bytes, the scene's
scene.json and its COLMAP cameras/images files, the resolution factor and the background. Any
change rebuilds the cache, so it is never staler than decoding again would be.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from mgs.atomic import atomic_path, write_text
from mgs.scene import MODEL_SUBDIR, SCENE_JSON
from mgs.train import View, load_views, make_view

log = logging.getLogger("mgs.view_cache")

CACHE_DIR = "cache"
FORMAT_VERSION = 1


def views_key(scene_dir: Path, names: list[str], factor: int, background) -> str | None:
    """Content key of `names`' views, or None when a file is missing (decoding again then
    reports it by name)."""
    from mgs.images import file_digest

    scene_dir = Path(scene_dir)
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, names, factor,
                                        [float(v) for v in background or (0, 0, 0)]]).encode())
    try:
        meta_bytes = (scene_dir / SCENE_JSON).read_bytes()
        image_dir = scene_dir / json.loads(meta_bytes)["image_dir"]
        digest.update(meta_bytes)
        model = scene_dir / MODEL_SUBDIR
        for path in sorted(p for p in model.glob("*") if p.stem in ("cameras", "images")):
            digest.update(path.name.encode() + file_digest(path).encode())
        for name in names:
            digest.update(file_digest(image_dir / name).encode())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest.hexdigest()


def _paths(run_root: Path, block: int, key: str) -> tuple[Path, Path]:
    folder = Path(run_root) / CACHE_DIR
    return folder / f"views_{block}.json", folder / f"views_{block}.{key[:16]}.npy"


def _read(run_root: Path, block: int, key: str, device: torch.device) -> list[View] | None:
    meta_path, pixels_path = _paths(run_root, block, key)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            return None
        pixels = np.load(pixels_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if pixels.dtype != np.uint8 or pixels.shape != (meta["size"],):
        return None
    views, offset = [], 0
    for item in meta["views"]:
        width, height = item["width"], item["height"]
        count = width * height * 3
        views.append(make_view(item["name"], width, height, item["K"], item["world_to_camera"],
                               pixels[offset:offset + count].reshape(height, width, 3), device))
        offset += count
    return views


def _write(run_root: Path, block: int, key: str, views: list[View]) -> None:
    meta_path, pixels_path = _paths(run_root, block, key)
    flat = [np.asarray(view.pixels if isinstance(view.pixels, np.ndarray)
                       else view.pixels.cpu().numpy(), dtype=np.uint8).reshape(-1)
            for view in views]
    pixels = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
    with atomic_path(pixels_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, pixels)
    meta = {"key": key, "size": int(pixels.size), "views": [
        {"name": view.name, "width": view.width, "height": view.height,
         "K": view.K.cpu().tolist(), "world_to_camera": view.viewmat.cpu().tolist()}
        for view in views]}
    write_text(meta_path, json.dumps(meta) + "\n")
    for stale in pixels_path.parent.glob(f"views_{block}.*.npy"):  # earlier keys
        if stale != pixels_path:
            stale.unlink(missing_ok=True)


def block_views(run_root: Path, block: int, names: list[str], scene_loader, factor: int,
                background, device: torch.device, desc: str) -> list[View]:
    """The views of `names` (in that order) at resolution `factor`: from the block's cache when
    its key matches, else decoded from the scene (`scene_loader()`) and cached."""
    scene_dir = Path(run_root) / "scene"
    key = views_key(scene_dir, names, factor, background)
    if key is not None:
        views = _read(run_root, block, key, device)
        if views is not None:
            log.info("%s: %d views from the block's cache", desc, len(views))
            return views
    scene = scene_loader()
    views = load_views([scene.camera(n) for n in names], factor, scene.scene_dir, device, desc,
                       background)
    if key is not None:
        # float32 matrices round-trip exactly through JSON's doubles
        _write(run_root, block, key, views)
        log.info("%s: cached %d views in %s", desc, len(views), Path(run_root) / CACHE_DIR)
    return views
