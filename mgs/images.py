"""Decoding training images to 8-bit RGB without silent surprises, and content-keyed caches.

PIL's plain ``convert("RGB")`` clips 16-bit grayscale to white and drops alpha; here 16-bit
values are rescaled, palettes expanded, and transparent pixels composited onto the training
background (one warning per image folder). Cached copies carry the SHA-256 of their source
(and of what else shaped them), so a different image with an older timestamp is noticed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("mgs.images")

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_warned_alpha: set[Path] = set()
DIGEST_KEY = "mgs-source-sha256"


def to_rgb(img: Image.Image, path: Path, background=(0.0, 0.0, 0.0)) -> Image.Image:
    """8-bit RGB of a decoded image; `background` (RGB in [0, 1]) fills transparent pixels."""
    from PIL import Image  # here, not at the top: file_digest serves jobs that decode nothing
    if img.mode in _SIXTEEN_BIT:
        # 16-bit PNGs decode as I;16 or I (0..65535); scale, don't clip
        values = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64) / 255.0
        alpha = rgba[..., 3:]
        if (alpha < 1.0).any():
            if path.parent not in _warned_alpha:
                _warned_alpha.add(path.parent)
                log.warning("%s (and maybe others in %s) has transparent pixels; they are "
                            "composited onto the training background %s", path.name,
                            path.parent, list(background))
            rgb = rgba[..., :3] * alpha + np.asarray(background, np.float64) * (1.0 - alpha)
            return Image.fromarray(np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8))
        return img.convert("RGB")
    return img.convert("RGB")


def file_digest(path: Path, extra: str = "") -> str:
    """SHA-256 of the file's bytes and `extra` (e.g. the background the cache was made with)."""
    digest = hashlib.sha256(extra.encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_cached_png(img: Image.Image, dst: Path, digest: str) -> None:
    """Write `img` as PNG at `dst` (a temporary path), tagged with its source digest."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text(DIGEST_KEY, digest)
    img.save(dst, format="PNG", pnginfo=info)


def read_cached_png(path: Path, size, digest: str) -> Image.Image | None:
    """The cached RGB image if it was made from the source with `digest` at `size`, else None."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            if img.size != tuple(size) or img.info.get(DIGEST_KEY) != digest:
                return None
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError):
        return None
