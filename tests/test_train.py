import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from mgs.checkpoint import load_checkpoint
from mgs.config import TrainConfig
from mgs.errors import InputError, TrainingError
from mgs.training_loop import CHECKPOINT_NAME, train_scene

SMALL = dict(iterations=40, lr_max_steps=20, voxel_size=0.05, start_stat=5, update_from=5,
             update_interval=10, update_until=30, eval_interval=20, checkpoint_interval=20,
             threads=2)


def small_config(**overrides):
    return TrainConfig.from_dict({**SMALL, **overrides})


def test_training_raises_psnr(tiny_scene, tmp_path):
    summary = train_scene(tiny_scene, tmp_path, small_config(
        iterations=200, lr_max_steps=100, update_until=100, eval_interval=100,
        densify_grad_threshold=0.002))
    history = load_checkpoint(tmp_path / CHECKPOINT_NAME)["history"]
    assert [row["step"] for row in history] == [0, 100, 200]
    first, last = history[0], history[-1]
    assert last["train_psnr"] > first["train_psnr"] + 4.0
    assert last["val_psnr"] > first["val_psnr"] + 1.0  # held-out views improve too
    assert last["val_ssim"] > first["val_ssim"]
    assert summary["test_psnr"] == pytest.approx(last["val_psnr"], abs=1e-6)
    assert (tmp_path / "history.tsv").read_text().count("\n") == 4
    assert (tmp_path / "summary.json").exists()


def _flat_tensors(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from _flat_tensors(value, f"{prefix}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _flat_tensors(value, f"{prefix}/{i}")


def test_resume_gives_the_same_tensors_as_an_uninterrupted_run(tiny_scene, tmp_path):
    config = small_config()
    train_scene(tiny_scene, tmp_path / "straight", config)
    train_scene(tiny_scene, tmp_path / "resumed", config, stop_after=20)
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)["step"] == 20
    train_scene(tiny_scene, tmp_path / "resumed", config, resume=True)
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    b = load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 40
    tensors_a, tensors_b = dict(_flat_tensors(a)), dict(_flat_tensors(b))
    assert tensors_a.keys() == tensors_b.keys() and len(tensors_a) > 10
    for key, value in tensors_a.items():
        assert torch.equal(value, tensors_b[key]), key


def test_a_work_folder_keeps_the_progress_outside_the_output(tiny_scene, tmp_path):
    """The workflow's coarse job: periodic checkpoints in --work, continued from there after a
    kill (the workflow deletes the job's output, never --work); OUT gets the finished model."""
    config = small_config()
    out, work = tmp_path / "coarse", tmp_path / "coarse" / "partial"
    train_scene(tiny_scene, out, config, stop_after=20, work_dir=work)
    assert not (out / CHECKPOINT_NAME).exists()
    assert load_checkpoint(work / CHECKPOINT_NAME)["step"] == 20
    train_scene(tiny_scene, out, config, work_dir=work)  # no --resume: the work folder says
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 40
    assert not (work / CHECKPOINT_NAME).exists()
    train_scene(tiny_scene, tmp_path / "straight", config)
    straight = dict(_flat_tensors(load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)))
    resumed = dict(_flat_tensors(load_checkpoint(out / CHECKPOINT_NAME)))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(value, resumed[key]) for key, value in straight.items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_scene, tmp_path):
    train_scene(tiny_scene, tmp_path, small_config(), stop_after=20)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(TrainingError, match="non-finite"):
        # from_dict refuses inf now; replace() reaches the loss guard behind it
        bad = dataclasses.replace(small_config(), scale_reg_weight=float("inf"))
        train_scene(tiny_scene, tmp_path, bad, resume=True)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp.pt")]


def test_checkpoint_from_another_config_is_refused(tiny_scene, tmp_path):
    train_scene(tiny_scene, tmp_path, small_config(), stop_after=20)
    with pytest.raises(InputError, match="different configuration"):
        train_scene(tiny_scene, tmp_path, small_config(n_offsets=5), resume=True)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(InputError, match=str(path)):
        load_checkpoint(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mgs.cli", *args], capture_output=True, text=True)


def test_cli_reports_missing_scene(tmp_path):
    result = run_cli("train", "--scene", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "scene.json" in result.stderr and "Traceback" not in result.stderr


def test_cli_reports_unwritable_output(tiny_scene, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("train", "--scene", str(tiny_scene), "--out", str(blocker / "out"))
    assert result.returncode == 2
    assert str(blocker / "out") in result.stderr and "Traceback" not in result.stderr


def test_cli_rejects_unknown_config_key(tiny_scene, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  iteratons: 5\n")
    result = run_cli("train", "--scene", str(tiny_scene), "--out", str(tmp_path / "o"),
                     "--config", str(config))
    assert result.returncode == 2 and "iteratons" in result.stderr


def test_cli_names_a_corrupt_image_and_writes_nothing(tiny_scene, tmp_path):
    import shutil

    scene = tmp_path / "scene"
    shutil.copytree(tiny_scene, scene)
    victim = sorted((scene / "images").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated PNG
    out = tmp_path / "out"
    result = run_cli("train", "--scene", str(scene), "--out", str(out))
    assert result.returncode == 2
    assert victim.name in result.stderr and "Traceback" not in result.stderr
    assert not (out / CHECKPOINT_NAME).exists()


def make_trainer(tiny_scene, **overrides):
    from mgs.scene import load_scene
    from mgs.train import Trainer, load_views, spatial_lr_scale
    from mgs.model import Decoder
    from mgs.training_loop import initial_anchors

    config = small_config(**overrides)
    scene = load_scene(tiny_scene)
    views = load_views(scene.train_cameras()[:6], config.resolution, scene.scene_dir,
                       torch.device("cpu"))
    torch.manual_seed(0)
    return Trainer(initial_anchors(scene, config), Decoder(config.feat_dim, config.n_offsets),
                   config, views, spatial_lr_scale(scene.train_cameras()), torch.device("cpu"))


def test_anchors_take_no_adam_step_on_an_adjustment_step(tiny_scene):
    """Officially the adjustment comes first and replaces the anchor parameters, so on every
    adjustment step the anchors skip their Adam update while the decoder takes it."""
    # adjust every 2nd step, growing and pruning nothing
    trainer = make_trainer(tiny_scene, start_stat=0, update_from=0, update_interval=2,
                           update_until=100, densify_grad_threshold=1e9, min_opacity=0.0)
    trainer.train_step()  # step 1: a plain step
    features = trainer.anchors.features.detach().clone()
    offsets = trainer.anchors.offsets.detach().clone()
    decoder = trainer.decoder.color_mlp[0].weight.detach().clone()
    assert features.abs().sum() > 0  # the anchors did learn at step 1
    trainer.train_step()  # step 2: adjustment
    assert torch.equal(trainer.anchors.features, features)
    assert torch.equal(trainer.anchors.offsets, offsets)
    assert not torch.equal(trainer.decoder.color_mlp[0].weight, decoder)
    trainer.train_step()  # step 3: the anchors learn again
    assert not torch.equal(trainer.anchors.features, features)


def test_no_adjustment_before_the_statistics_window(tiny_scene):
    """Adjustments are nested in the statistics window (start_stat, update_until): with
    update_from 2 < start_stat 6 the first one is at step 8. A clamp of the base scales far
    below their values shows when one ran."""
    trainer = make_trainer(tiny_scene, start_stat=6, update_from=2, update_interval=2,
                           update_until=100, densify_grad_threshold=1e9, min_opacity=0.0,
                           max_scale_log=-20.0)
    for _ in range(6):
        trainer.train_step()
    assert (trainer.anchors.scaling[:, 3:] > -20.0).all()
    trainer.train_step()
    trainer.train_step()  # step 8
    assert (trainer.anchors.scaling[:, 3:] <= -20.0).all()


def test_validation_psnr_is_the_mean_of_the_channel_psnrs(tiny_scene):
    """As the official training reports (and block weighting): PSNR per channel, then their
    mean, not the PSNR of the overall squared error."""
    from mgs.metrics import channel_mean_psnr, psnr

    target = torch.zeros(4, 5, 3)
    image = target + torch.tensor([0.1, 0.01, 0.001]).sqrt()  # MSE 0.1, 0.01, 0.001 per channel
    assert channel_mean_psnr(image, target).item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(image, target).item() == pytest.approx(-10 * math.log10(0.037), abs=1e-4)
    trainer = make_trainer(tiny_scene)
    for _ in range(3):
        trainer.train_step()
    view = trainer.train_views[0]
    with torch.no_grad():
        render = trainer.render_view(view)[0].image.clamp(0, 1)
    expected = channel_mean_psnr(render, view.image).item()
    assert abs(expected - psnr(render, view.image).item()) > 1e-3  # the two differ here
    assert trainer.evaluate([view])["psnr"] == pytest.approx(expected, abs=1e-6)
