"""Property-based tests: random configs and randomly corrupted COLMAP, PLY and checkpoint bytes
fed to the loaders give either a valid result or one clear InputError, never another exception
or a hang. Kept small (tens of examples per loader) so CI stays fast; run with
--hypothesis-show-statistics to see the examples tried and the time taken."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgs.checkpoint import load_checkpoint, save_checkpoint
from mgs.config import TrainConfig
from mgs.errors import MgsError
from mgs.merge import read_anchor_ply, write_anchor_ply
from mgs.model import Anchors
from mgs.momentum import MomentumConfig
from mgs.partition import PartitionConfig
from mgs.scene import load_scene, read_colmap, write_colmap
from mgs.validate import check_scene

FUZZ = settings(max_examples=25, deadline=timedelta(seconds=30), derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.floats(allow_nan=True), max_size=4), st.sampled_from(["auto", "inf", "cpu"]))


def random_section(cls):
    keys = [f.name for f in dataclasses.fields(cls)] + ["not_a_key"]
    return st.dictionaries(st.sampled_from(keys), values, max_size=4)


@pytest.mark.parametrize("cls", [TrainConfig, MomentumConfig, PartitionConfig])
def test_random_configs_are_accepted_or_refused_clearly(cls):
    @FUZZ
    @given(random_section(cls))
    def check(section):
        try:
            config = cls.from_dict(section, source="fuzz.yaml")
        except MgsError as exc:
            assert "fuzz.yaml" in str(exc)
            return
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if isinstance(value, float) and not (cls is PartitionConfig
                                                 and field.name == "margin"):
                assert math.isfinite(value), field.name

    check()


@FUZZ
@given(st.dictionaries(st.sampled_from(["train", "momentum", "sfm", "resolution", "up"]),
                       st.one_of(values, st.dictionaries(st.text(max_size=6), values,
                                                         max_size=3)), max_size=3))
def test_random_workflow_scenes_are_checked_clearly(settings_):
    try:
        check_scene(settings_, "scenes.x")
    except MgsError as exc:
        assert "scenes.x" in str(exc)


def corrupt(data: bytes, draw) -> bytes:
    """Truncate, or overwrite a few bytes, at random places."""
    if draw(st.booleans()):
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


@pytest.fixture(scope="module")
def small_model(tiny_scene, tmp_path_factory):
    scene = load_scene(tiny_scene)
    folder = tmp_path_factory.mktemp("model") / "0"
    write_colmap(scene.cameras[:3], scene.points_xyz[:20], scene.points_rgb[:20], folder)
    return folder, scene.cameras[0].image_path.parent


@FUZZ
@given(st.sampled_from(["cameras.bin", "images.bin", "points3D.bin"]), st.data())
def test_corrupted_colmap_models(small_model, name, data):
    folder, images = small_model
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "0"
        model.mkdir()
        for part in ("cameras.bin", "images.bin", "points3D.bin"):
            raw = (folder / part).read_bytes()
            (model / part).write_bytes(corrupt(raw, data.draw) if part == name else raw)
        try:
            cameras, xyz, _ = read_colmap(model, images)
        except MgsError:
            return
        assert len(cameras) >= 1 and xyz.shape[1] == 3


@pytest.fixture(scope="module")
def small_ply(tmp_path_factory):
    torch.manual_seed(0)
    anchors = Anchors(torch.randn(6, 3), torch.randn(6, 4), torch.randn(6, 2, 3),
                      torch.randn(6, 6))
    path = tmp_path_factory.mktemp("ply") / "anchors.ply"
    write_anchor_ply(anchors, path)
    return path.read_bytes()


@FUZZ
@given(st.data())
def test_corrupted_anchor_ply(small_ply, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "anchors.ply"
        path.write_bytes(corrupt(small_ply, data.draw))
        try:
            anchors = read_anchor_ply(path)
        except MgsError:
            return
        assert anchors.xyz.shape[1] == 3


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, {"step": 3, "anchors": {"xyz": torch.arange(12.0).reshape(4, 3)},
                           "history": [{"loss": 0.5}]}, "hash")
    return path.read_bytes()


@FUZZ
@given(st.data())
def test_corrupted_checkpoints(small_checkpoint, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        path.write_bytes(corrupt(small_checkpoint, data.draw))
        try:
            state = load_checkpoint(path, "hash")
            assert state["step"] is not None  # present, or a clear error naming the file
        except MgsError as exc:
            assert str(path) in str(exc)
