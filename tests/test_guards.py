"""Guards around training and outputs: non-finite parameters stop training without touching the
last checkpoint, JSON outputs are strict, models are world-readable, a full disk is one clear
error, failed commands leave no empty output folders."""

from __future__ import annotations

import json
import math
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from mgs.atomic import json_text
from mgs.cli import main
from mgs.config import TrainConfig
from mgs.errors import TrainingError
from mgs.model import Decoder
from mgs.scene import load_scene, write_colmap
from mgs.train import Trainer, load_views, spatial_lr_scale
from mgs.training_loop import check_finite_parameters, initial_anchors, run_training


@pytest.fixture()
def trainer(tiny_scene):
    scene = load_scene(tiny_scene)
    config = TrainConfig(iterations=4, eval_interval=100, checkpoint_interval=2,
                         max_init_anchors=200)
    cameras = scene.train_cameras()[:2]
    views = load_views(cameras, 1, tiny_scene, torch.device("cpu"))
    return Trainer(initial_anchors(scene, config), Decoder(config.feat_dim, config.n_offsets),
                   config, views, spatial_lr_scale(cameras), torch.device("cpu"))


def test_non_finite_parameters_stop_training_without_saving(trainer):
    """A NaN anchor feature leaves the loss finite (the anchor is culled or unseen): the
    parameter check stops training, names the group and saves nothing after it."""
    check_finite_parameters(trainer)  # a fresh model is finite
    saves = []
    run_training(trainer, 2, [], [], saves.append)
    assert len(saves) == 1  # the step-2 checkpoint
    with torch.no_grad():
        trainer.anchors.features[-1] = math.nan
    with pytest.raises(TrainingError, match="features") as err:
        run_training(trainer, 4, [], [], saves.append)
    assert "last good checkpoint is kept" in str(err.value)
    assert len(saves) == 1  # nothing saved after the parameters went bad


def test_the_check_names_every_bad_group(trainer):
    with torch.no_grad():
        next(trainer.decoder.cov_mlp.parameters()).view(-1)[0] = math.inf
        trainer.anchors.scaling[0, 0] = math.nan
    with pytest.raises(TrainingError, match="scaling, mlp_cov"):
        check_finite_parameters(trainer)


def test_json_outputs_are_strict():
    text = json_text({"psnr": math.nan, "rows": [math.inf, 1.5], "n": 3})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == \
        {"psnr": None, "rows": [None, 1.5], "n": 3}


def test_written_model_folder_is_readable_by_others(tiny_scene, tmp_path):
    scene = load_scene(tiny_scene)
    write_colmap(scene.cameras[:2], scene.points_xyz[:5], scene.points_rgb[:5], tmp_path / "0")
    mode = (tmp_path / "0").stat().st_mode
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH and mode & stat.S_IXOTH


def test_failed_command_leaves_no_empty_output_folder(tiny_scene, tmp_path):
    out = tmp_path / "new" / "deeper"
    config = tmp_path / "c.yaml"
    config.write_text("train: {iterations: 5}\n")
    (tmp_path / "scene").mkdir()  # no scene.json: fails after the output folder is made
    assert main(["train", "--scene", str(tmp_path / "scene"), "--out", str(out),
                 "--config", str(config)]) == 2
    assert not (tmp_path / "new").exists()


def test_full_disk_while_checkpointing_is_one_clear_error(tmp_path):
    """A file-size limit makes the write fail as a full disk does (EFBIG instead of ENOSPC)."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")
    code = textwrap.dedent(f"""
        import resource, signal, torch
        from mgs.checkpoint import save_checkpoint
        from mgs.errors import MgsError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_checkpoint({str(path)!r}, {{"x": torch.zeros(100_000)}}, "h")
        except MgsError as exc:
            print("MgsError:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert "MgsError: cannot write checkpoint" in result.stdout, result.stderr[-2000:]
    assert str(path) in result.stdout
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


@pytest.mark.slow
def test_sigterm_stops_training_at_the_next_step_with_a_checkpoint(tiny_scene, tmp_path):
    import os
    import signal
    import time

    from mgs.checkpoint import load_checkpoint

    config = tmp_path / "c.yaml"
    config.write_text("train: {iterations: 100000, checkpoint_interval: 100000, "
                      "eval_interval: 100000, max_init_anchors: 200}\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "mgs.cli", "train", "--scene",
                                str(tiny_scene), "--out", str(out), "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        deadline = time.monotonic() + 300
        seen = ""
        while "training:" not in seen and time.monotonic() < deadline:
            seen += process.stderr.read(1) or ""
            if process.poll() is not None:
                break
        assert "training:" in seen, seen[-2000:]
        time.sleep(1.0)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        stopped_after = time.monotonic() - sent
    finally:
        process.kill()
    err = seen + process.stderr.read()
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped on SIGTERM" in err and "Traceback" not in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] >= 1
    assert stopped_after < 60


def test_importing_pycolmap_keeps_the_sigterm_handler():
    """COLMAP's glog takes SIGTERM at import; mgs imports it through mgs.pycolmap_import, which
    puts the command's handler back (a bare `import pycolmap` here dies with a stack dump)."""
    code = ("import os, signal, time\n"
            "hit = []\n"
            "signal.signal(signal.SIGTERM, lambda s, f: hit.append(s))\n"
            "from mgs.pycolmap_import import pycolmap\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.2)\n"
            "print('handled' if hit else 'missed')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "handled", result.stderr[-1000:]
