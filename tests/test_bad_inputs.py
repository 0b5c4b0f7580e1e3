"""Bad inputs, table-driven: every case must end in exit status 2 with one message that names the
culprit, no traceback, and leave every file under the test folder byte-identical (inputs are
never touched, failed runs leave no half-made outputs)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

import pytest

from mgs.cli import main

CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {}


def case(name: str, *culprits: str):
    """Register `setup(tmp, scene) -> argv`; the error message must contain every culprit."""
    def register(setup):
        assert name not in CASES, name
        CASES[name] = (setup, culprits)
        return setup
    return register


def tree_hash(root: Path) -> dict[str, str]:
    """Path → content hash (or 'dir') of everything under `root`."""
    result = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            result[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            result[rel] = "dir"
        else:
            result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def copy_scene(scene: Path, dest: Path) -> Path:
    shutil.copytree(scene, dest, ignore=shutil.ignore_patterns("images_*"))
    return dest


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_folder(tmp: Path, scene: Path, config: str = "train: {}\nmomentum: {}\n") -> Path:
    run = tmp / "run"
    copy_scene(scene, run / "scene")
    write(run / "config.yaml", config)
    return run


# ------------------------------------------------------ outputs inside inputs

@case("sfm-out-holds-images", "contains the image folder", "images")
def _(tmp, scene):
    copy_scene(scene, tmp / "mydata")
    return ["sfm", str(tmp / "mydata" / "images"), str(tmp / "mydata")]


@case("sfm-out-is-images", "is the image folder")
def _(tmp, scene):
    copy_scene(scene, tmp / "mydata")
    return ["sfm", str(tmp / "mydata" / "images"), str(tmp / "mydata" / "images")]


@case("sfm-out-inside-images", "is inside the image folder")
def _(tmp, scene):
    copy_scene(scene, tmp / "mydata")
    return ["sfm", str(tmp / "mydata" / "images"), str(tmp / "mydata" / "images" / "scene")]


@case("ingest-out-is-src", "is the dataset folder")
def _(tmp, scene):
    copy_scene(scene, tmp / "src")
    return ["ingest", "colmap", str(tmp / "src"), str(tmp / "src"), "--factor", "2"]


@case("ingest-out-inside-src", "is inside the dataset folder")
def _(tmp, scene):
    copy_scene(scene, tmp / "src")
    return ["ingest", "colmap", str(tmp / "src"), str(tmp / "src" / "images"), "--factor", "2"]


@case("ingest-symlinked-out-is-src", "is the dataset folder")
def _(tmp, scene):
    copy_scene(scene, tmp / "src")
    (tmp / "link").symlink_to(tmp / "src")
    return ["ingest", "colmap", str(tmp / "src"), str(tmp / "link"), "--factor", "2"]


@case("train-out-is-scene", "is the scene folder")
def _(tmp, scene):
    copy_scene(scene, tmp / "scene")
    return ["train", "--scene", str(tmp / "scene"), "--out", str(tmp / "scene")]


@case("partition-out-inside-scene", "is inside the scene folder")
def _(tmp, scene):
    copy_scene(scene, tmp / "scene")
    return ["partition", "--scene", str(tmp / "scene"), "--out", str(tmp / "scene" / "part")]


@case("merge-out-is-scene", "run's scene folder")
def _(tmp, scene):
    run = run_folder(tmp, scene)
    return ["merge", "--run", str(run), "--out", str(run / "scene")]


@case("merge-out-is-run", "is the run folder")
def _(tmp, scene):
    run = run_folder(tmp, scene)
    return ["merge", "--run", str(run), "--out", str(run)]


@case("evaluate-out-is-model", "is the model folder")
def _(tmp, scene):
    run = run_folder(tmp, scene)
    (run / "model").mkdir()
    return ["evaluate", "--run", str(run), "--out", str(run / "model")]


@case("report-out-is-results", "is the results folder")
def _(tmp, scene):
    (tmp / "results").mkdir()
    return ["report", "--results", str(tmp / "results"), "--out", str(tmp / "results")]


@case("configure-out-is-config", "is the workflow config")
def _(tmp, scene):
    config = write(tmp / "config.yaml", "scenes:\n  a: {}\n")
    return ["configure", "--config", str(config), "--scene", "a", "--out", str(config)]


# ---------------------------------------------------------------------- test

@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_scene, capsys):
    setup, culprits = CASES[name]
    argv = setup(tmp_path, tiny_scene)
    before = tree_hash(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = " ".join(err.split())  # rich may wrap long lines
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not in: {message}"
    assert tree_hash(tmp_path) == before, "files under the test folder changed"


def test_cases_cover_the_issue():
    assert len(CASES) >= 30
