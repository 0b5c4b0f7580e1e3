"""Bad inputs, table-driven: every case must end in exit status 2 with one message that names the
culprit, no traceback, and leave every file under the test folder byte-identical (inputs are
never touched, failed runs leave no half-made outputs)."""

from __future__ import annotations

import hashlib
import json
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


# ------------------------------------------------------ numbers and types

def train_with(tmp, scene, yaml_text, *extra):
    config = write(tmp / "config.yaml", yaml_text)
    return ["train", "--scene", str(scene), "--out", str(tmp / "out"), "--config", str(config),
            *extra]


for _name, _yaml, _culprit in [
    ("feature-lr-nan", "train: {feature_lr: .nan}", "train.feature_lr"),
    ("scaling-lr-negative", "train: {scaling_lr: -0.1}", "train.scaling_lr"),
    ("iterations-bool", "train: {iterations: true}", "train.iterations"),
    ("n-offsets-string", "train: {n_offsets: four}", "train.n_offsets"),
    ("background-inf", "train: {background: [0, .inf, 0]}", "train.background[1]"),
    ("train-not-a-mapping", "train: [1, 2]", "'train' must be a mapping"),
    ("unknown-train-key", "train: {itertions: 5}", "itertions"),
    ("config-not-yaml", "train: {a: [", "not valid YAML"),
]:
    case(f"train-{_name}", "config.yaml", _culprit)(
        lambda tmp, scene, _yaml=_yaml: train_with(tmp, scene, _yaml))


@case("train-iterations-negative-on-command-line", "--iterations", "[1, inf)")
def _(tmp, scene):
    argv = train_with(tmp, scene, "train: {iterations: 5}", "--iterations", "-5")
    return argv


for _name, _yaml, _culprit in [
    ("sigma-nan", "momentum: {sigma: .nan}", "momentum.sigma"),
    ("sigma-zero", "momentum: {sigma: 0}", "momentum.sigma"),
    ("rounds-string", "momentum: {rounds: four}", "momentum.rounds"),
    ("momentum-one", "momentum: {momentum: 1.0}", "momentum.momentum"),
]:
    case(f"init-{_name}", "config.yaml", _culprit, "(0, inf)" if "sigma" in _name else "")(
        lambda tmp, scene, _yaml=_yaml: ["init", "--run", str(run_folder(tmp, scene, _yaml))])


@case("configure-nan-in-settings", "--settings", "train.feature_lr", "[0, inf)")
def _(tmp, scene):
    return ["configure", "--settings", '{"train": {"feature_lr": NaN}}',
            "--out", str(tmp / "config.yaml")]


@case("configure-train-list", "'train' must be a mapping")
def _(tmp, scene):
    return ["configure", "--settings", '{"train": [1, 2]}', "--out", str(tmp / "c.yaml")]


@case("configure-resolution-bool", "resolution", "an integer")
def _(tmp, scene):
    return ["configure", "--settings", '{"resolution": true}', "--out", str(tmp / "c.yaml")]


@case("synth-shadows-maybe", "--shadows", "maybe")
def _(tmp, scene):
    return ["synth", str(tmp / "out"), "--shadows", "maybe"]


@case("synth-width-too-small", "--width", "[8, inf)")
def _(tmp, scene):
    return ["synth", str(tmp / "out"), "--width", "2"]


@case("evaluate-warmup-negative", "--warmup", "-1")
def _(tmp, scene):
    return ["evaluate", "--run", str(run_folder(tmp, scene)), "--warmup", "-1"]


@case("sfm-min-registered-nan", "--min-registered", "[0, 1]")
def _(tmp, scene):
    return ["sfm", str(scene / "images"), str(tmp / "out"), "--min-registered", "nan"]


@case("partition-threshold-nan", "--threshold", "[0, 1)")
def _(tmp, scene):
    return ["partition", "--scene", str(scene), "--out", str(tmp / "out"), "--threshold", "nan"]


# ------------------------------------------------------ broken data files

@case("ingest-zero-byte-image", "view_0003.png", "cannot read image")
def _(tmp, scene):
    src = copy_scene(scene, tmp / "src")
    (src / "images" / "view_0003.png").write_bytes(b"")
    return ["ingest", "colmap", str(src), str(tmp / "out"), "--factor", "2"]


@case("ingest-one-image-model", "1 registered image", "at least two")
def _(tmp, scene):
    import pycolmap

    src = copy_scene(scene, tmp / "src")
    rec = pycolmap.Reconstruction(str(src / "sparse" / "0"))
    shutil.rmtree(src / "sparse" / "0")
    (src / "sparse" / "0").mkdir()
    rec.write_text(str(src / "sparse" / "0"))
    images = src / "sparse" / "0" / "images.txt"
    lines = [line for line in images.read_text().splitlines(True) if not line.startswith("#")]
    images.write_text("".join(lines[:2]))
    (src / "sparse" / "0" / "points3D.txt").write_text("")
    return ["ingest", "colmap", str(src), str(tmp / "out")]


@case("ingest-truncated-images-bin", "images.bin", "truncated")
def _(tmp, scene):
    src = copy_scene(scene, tmp / "src")
    images = src / "sparse" / "0" / "images.bin"
    images.write_bytes(images.read_bytes()[:100])
    return ["ingest", "colmap", str(src), str(tmp / "out")]


@case("train-text-file-as-checkpoint", "checkpoint.pt", "unreadable")
def _(tmp, scene):
    write(tmp / "out" / "checkpoint.pt", "hello\n")
    return ["train", "--scene", str(scene), "--out", str(tmp / "out"), "--resume"]


@case("train-checkpoint-missing-a-key", "checkpoint.pt", "'anchors'")
def _(tmp, scene):
    from mgs.checkpoint import save_checkpoint
    from mgs.config import TrainConfig

    save_checkpoint(tmp / "out" / "checkpoint.pt", {"step": 3},
                    TrainConfig(iterations=5).shape_hash())
    return ["train", "--scene", str(scene), "--out", str(tmp / "out"), "--resume",
            "--iterations", "5"]


@case("train-resume-without-checkpoint", "--resume", "checkpoint.pt")
def _(tmp, scene):
    return ["train", "--scene", str(scene), "--out", str(tmp / "out"), "--resume"]


@case("train-scene-without-scene-json", "scene.json")
def _(tmp, scene):
    src = copy_scene(scene, tmp / "scene")
    (src / "scene.json").unlink()
    return ["train", "--scene", str(src), "--out", str(tmp / "out")]


@case("sync-before-init", "shared.pt", "`mgs init`")
def _(tmp, scene):
    return ["sync", "--run", str(run_folder(tmp, scene)), "--round", "1"]


@case("finalize-before-training", "block_0.pt", "`mgs train-block --round 2 --block 0`")
def _(tmp, scene):
    run = run_folder(tmp, scene, "train: {}\nmomentum: {rounds: 2, final_iterations: 5}\n")
    return ["finalize-block", "--run", str(run), "--block", "0"]


@case("merge-before-partition", "partition.json", "`mgs partition`")
def _(tmp, scene):
    return ["merge", "--run", str(run_folder(tmp, scene))]


@case("init-block-without-train-cameras", "partition.json", "no train cameras")
def _(tmp, scene):
    run = run_folder(tmp, scene)
    assert main(["partition", "--scene", str(run / "scene"), "--out", str(run / "partition"),
                 "--block-dim", "2", "1", "1", "--min-cameras", "2"]) == 0
    path = run / "partition" / "partition.json"
    data = json.loads(path.read_text())
    data["blocks"][-1]["train_cameras"] = []
    path.write_text(json.dumps(data))
    return ["init", "--run", str(run)]


# ---------------------------------------------------------------------- test

@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_scene, capsys):
    setup, culprits = CASES[name]
    argv = setup(tmp_path, tiny_scene)
    before = tree_hash(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = " ".join(err.split())  # rich may wrap long lines
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not in: {message}"
    assert tree_hash(tmp_path) == before, "files under the test folder changed"


def test_cases_cover_the_issue():
    assert len(CASES) >= 30
