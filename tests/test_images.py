"""Image decoding without silent surprises: 16-bit and palette PNGs, alpha, content-keyed cache."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from mgs import images
from mgs.scene import Camera, cache_path, load_image


def camera_for(path, width=8, height=6) -> Camera:
    K = np.array([[10.0, 0, width / 2], [0, 10.0, height / 2], [0, 0, 1]])
    return Camera(name=path.name, K=K, width=width, height=height, world_to_camera=np.eye(4),
                  image_path=path)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 48, dtype=np.uint16).reshape(6, 8)
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")  # what PIL makes of it
    loaded = load_image(camera_for(path)).numpy()
    expected = np.round(ramp / 257.0) / 255.0
    assert np.allclose(loaded[..., 0], expected, atol=1e-6)
    assert loaded.min() == 0.0 and loaded.max() == 1.0  # not all white


def test_palette_png_is_expanded(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, :4] = (200, 30, 10)
    rgb[:, 4:] = (5, 100, 250)
    path = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(path)
    loaded = load_image(camera_for(path)).numpy()
    assert np.allclose(loaded * 255, rgb, atol=1)


def test_alpha_is_composited_onto_the_background_with_one_warning(tmp_path, caplog):
    images._warned_alpha.clear()
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128  # half transparent red
    for name in ("a.png", "b.png"):
        Image.fromarray(rgba).save(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="mgs.images"):
        white = load_image(camera_for(tmp_path / "a.png"), background=[1.0, 1.0, 1.0]).numpy()
        black = load_image(camera_for(tmp_path / "b.png")).numpy()
    assert np.allclose(white[0, 0], [1.0, 127 / 255, 127 / 255], atol=1 / 255)
    assert np.allclose(black[0, 0], [128 / 255, 0, 0], atol=1 / 255)
    warnings = [r for r in caplog.records if "transparent" in r.getMessage()]
    assert len(warnings) == 1 and "a.png" in warnings[0].getMessage()


def test_cache_follows_the_content_not_the_timestamp(tmp_path):
    path, other = tmp_path / "img.png", tmp_path / "other.png"
    Image.fromarray(np.full((6, 8, 3), 40, np.uint8)).save(path)
    Image.fromarray(np.full((6, 8, 3), 220, np.uint8)).save(other)
    camera, cache = camera_for(path), tmp_path / "cache"
    first = load_image(camera, 2, cache).numpy()
    assert cache_path(camera, 2, cache).is_file()
    # a different image copied in with an older timestamp (cp -p of an old file)
    os.replace(other, path)
    old = cache_path(camera, 2, cache).stat().st_mtime - 100
    os.utime(path, (old, old))
    second = load_image(camera, 2, cache).numpy()
    assert first.mean() == pytest.approx(40 / 255, abs=0.01)
    assert second.mean() == pytest.approx(220 / 255, abs=0.01)
    assert load_image(camera, 2, cache).numpy().mean() == pytest.approx(220 / 255, abs=0.01)
