"""The training loop and the whole-scene driver around `Trainer` (mgs.train).

`run_training` steps a trainer with periodic validation and checkpoints and stops cleanly on
SIGTERM (`StopSignal`); block training (mgs.blocks) uses it per round. `train_scene` trains one
model on a whole scene (one block = the scene) with atomic checkpoints and exact resume.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mgs.appearance import AppearanceImages
from mgs.atomic import ensure_writable_dir, json_text, write_text, write_tsv
from mgs.checkpoint import load_checkpoint, save_checkpoint
from mgs.config import TrainConfig
from mgs.device import resolve_device
from mgs.errors import InputError, StopRequested, TrainingError
from mgs.model import Anchors, Decoder
from mgs.scene import Scene, load_scene
from mgs.train import Trainer, View, load_views, spatial_lr_scale

log = logging.getLogger("mgs.training_loop")

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.tsv"


def initial_anchors(scene: Scene, config: TrainConfig) -> Anchors:
    if len(scene.points_xyz) == 0:
        raise InputError(f"scene {scene.scene_dir} has no 3D points to place anchors on; "
                         "rerun SfM or check the COLMAP model's points3D")
    points = scene.points_xyz
    if config.max_init_anchors and len(points) > config.max_init_anchors:
        rng = np.random.default_rng(config.seed)
        points = points[np.sort(rng.choice(len(points), config.max_init_anchors, replace=False))]
    return Anchors.from_points(points, config.feat_dim, config.n_offsets, config.voxel_size)


def train_scene(scene_dir: str | Path, out_dir: str | Path, config: TrainConfig,
                resume: bool = False, stop_after: int | None = None,
                work_dir: str | Path | None = None) -> dict:
    """Train one model on the whole scene; returns the final summary (also in summary.json).

    `stop_after` ends the run early at that step after checkpointing, as an interruption would.
    With `work_dir` the periodic checkpoints go there and training continues from one found
    there (of the same configuration); OUT gets checkpoint.pt only when training ends, so a
    workflow that deletes a failed job's outputs keeps the progress.
    """
    work = Path(work_dir) if work_dir else Path(out_dir)
    if resume and not (work / CHECKPOINT_NAME).is_file():
        raise InputError(f"--resume: there is no checkpoint {work / CHECKPOINT_NAME} to "
                         "continue from; run without --resume to start training")
    out_dir = ensure_writable_dir(out_dir)
    work = ensure_writable_dir(work)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    scene = load_scene(scene_dir)
    if not scene.train_names:
        raise InputError(f"scene {scene.scene_dir} has no training views")
    cache_dir = scene.scene_dir
    train_views = load_views(scene.train_cameras(), config.resolution, cache_dir, device,
                             "train images", config.background)
    val_views = load_views(scene.test_cameras(), config.resolution, cache_dir, device,
                           "test images", config.background)

    torch.manual_seed(config.seed)
    anchors = initial_anchors(scene, config)
    decoder = Decoder(config.feat_dim, config.n_offsets, appearance_dim=config.appearance_dim)
    trainer = Trainer(anchors, decoder, config, train_views,
                      spatial_lr_scale(scene.train_cameras()), device,
                      appearance=AppearanceImages.from_scene(scene))
    history: list[dict] = []
    checkpoint_path = work / CHECKPOINT_NAME
    state = None
    if work_dir and not resume and checkpoint_path.exists():
        try:
            state = load_checkpoint(checkpoint_path, config.shape_hash())
        except InputError as exc:
            log.info("not resuming: %s", exc)
    elif resume and checkpoint_path.exists():
        # loaded on the CPU: load_state moves the tensors that belong on `device` there
        state = load_checkpoint(checkpoint_path, config.shape_hash())
    if state is not None:
        trainer.load_state(state)
        history = list(state.get("history", []))
        log.info("resumed from %s at step %d", checkpoint_path, trainer.step)
    elif checkpoint_path.exists() and not resume:
        log.info("starting over; %s will be replaced", checkpoint_path)

    log.info("training %d anchors on %d views (%d test) for %d steps on %s",
             trainer.anchors.count, len(train_views), len(val_views), config.iterations, device)

    def save(step_history, path=checkpoint_path, folder=work):
        save_checkpoint(path, dict(trainer.state(), history=step_history,
                                   config=config.to_dict()), config.shape_hash())
        write_tsv(folder / HISTORY_NAME, step_history)

    if not history:  # the untrained model's score anchors the trend
        history.append(dict(step=0, loss=float("nan"), **_scores(trainer, val_views),
                            anchors=trainer.anchors.count, seconds=0.0))
    run_training(trainer, config.iterations, val_views, history, save, stop_after)
    if work != out_dir and trainer.step >= config.iterations:
        save(history, out_dir / CHECKPOINT_NAME, out_dir)
        checkpoint_path.unlink()

    last = history[-1]  # run_training validated at its last step
    summary = {"step": trainer.step, "test_psnr": last["val_psnr"], "test_ssim": last["val_ssim"],
               "anchors": trainer.anchors.count, "test_views": len(val_views),
               "train_views": len(train_views), "device": str(device),
               "seconds": history[-1]["seconds"]}
    write_text(out_dir / "summary.json", json_text(summary))
    return summary


class StopSignal:
    """Set by the CLI's SIGTERM handler (what `scancel` sends): training stops after the
    current step with a checkpoint instead of dying mid-step."""

    active = False  # a training loop is running and will look at `requested`
    requested = False


def check_finite_parameters(trainer: Trainer) -> None:
    """Stop when any optimised parameter holds NaN/inf (the loss alone misses NaN anchors,
    which are culled while the loss stays finite); the last checkpoint is left as it is."""
    groups = trainer.optimizer.param_groups
    flags = [torch.isfinite(p).all() for group in groups for p in group["params"]]
    if not flags or bool(torch.stack(flags).all()):  # one device sync per step
        return
    bad = [group["name"] for group in groups
           if not all(bool(torch.isfinite(p).all()) for p in group["params"])]
    raise TrainingError(
        f"parameters of {', '.join(bad)} became non-finite (NaN/inf) at step {trainer.step}; "
        "stopped without saving, so the last good checkpoint is kept. Lower the learning "
        f"rate(s) of {', '.join(bad)} or check the input images, then rerun")


def _after_step(trainer: Trainer, history: list[dict], save) -> None:
    check_finite_parameters(trainer)
    if StopSignal.requested:
        save(history)
        raise StopRequested(f"stopped on SIGTERM after step {trainer.step} with a checkpoint; "
                            "rerun the same command (`mgs train` with --resume) to continue")


def _scores(trainer: Trainer, views: list[View]) -> dict[str, float]:
    """Validation PSNR/SSIM, plus PSNR on a fixed sample of training views (overfitting check)."""
    metrics = trainer.evaluate(views)
    sample = trainer.train_views[:: max(1, len(trainer.train_views) // 8)]
    return {"val_psnr": metrics["psnr"], "val_ssim": metrics["ssim"],
            "train_psnr": trainer.evaluate(sample)["psnr"]}


def run_training(trainer: Trainer, until: int, val_views: list[View], history: list[dict],
                 save, stop_after: int | None = None, desc: str = "training") -> None:
    """Step `trainer` up to global step `until`, validating every eval_interval steps (rows
    appended to `history`) and calling `save(history)` every checkpoint_interval steps and at
    the end. `stop_after` ends early (after saving), as an interruption would."""
    config = trainer.config
    last = min(until, stop_after) if stop_after is not None else until
    start = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    running = float("nan")
    progress = tqdm(total=until, initial=trainer.step, desc=desc, mininterval=2.0)
    StopSignal.active = True
    try:
        while trainer.step < last:
            stats = trainer.train_step()
            _after_step(trainer, history, save)
            loss = stats["loss"]
            running = loss if math.isnan(running) else 0.9 * running + 0.1 * loss
            step = trainer.step
            progress.update(1)
            if step % config.eval_interval == 0 or step == until:
                history.append(dict(step=step, loss=running, **_scores(trainer, val_views),
                                    anchors=trainer.anchors.count,
                                    seconds=time.perf_counter() - start))
                log.info("step %d: loss %.4f, validation PSNR %.2f dB, SSIM %.4f, %d anchors",
                         step, running, history[-1]["val_psnr"], history[-1]["val_ssim"],
                         trainer.anchors.count)
            progress.set_postfix(loss=f"{running:.4f}", anchors=trainer.anchors.count,
                                 refresh=False)
            if step % config.checkpoint_interval == 0 or step == last:
                save(history)
    finally:  # an error leaves no loop for the SIGTERM handler to wait on
        StopSignal.active = False
        progress.close()
