"""One block's round (`mgs train-block`) and its anchor-only fine-tuning (`mgs finalize-block`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mgs.appearance import AppearanceImages
from mgs.blocks.fit import sample_decoder_inputs
from mgs.blocks.run import Run
from mgs.device import resolve_device
from mgs.errors import InputError
from mgs.model import Anchors, Decoder
from mgs.train import Trainer, new_loss_sums
from mgs.training_loop import run_training
from mgs.view_cache import block_views

log = logging.getLogger("mgs.blocks")


def _block_trainer(run: Run, block_state: dict, block: int, shared: dict, use_teacher: bool,
                   device: torch.device, freeze_decoder: bool = False):
    spec = run.partition().blocks[block]
    config, momentum = run.train, run.momentum
    # validation views are training views too (ALGORITHM.md §4): one copy of each image
    trained = set(spec.train_cameras)
    held_out = [n for n in spec.validation_cameras if n not in trained]
    views = block_views(run.root, block, [*spec.train_cameras, *held_out], run.scene,
                        config.resolution, config.background, device, f"block {block} images")
    by_name = {view.name: view for view in views}
    train_views = views[:len(spec.train_cameras)]
    val_views = [by_name[n] for n in spec.validation_cameras if n in trained]
    val_views += [by_name[n] for n in held_out]
    decoder = Decoder(config.feat_dim, config.n_offsets, appearance_dim=config.appearance_dim)
    teacher = None
    consistency, weight = 0.0, 1.0
    if use_teacher:
        teacher = Decoder(config.feat_dim, config.n_offsets, appearance_dim=config.appearance_dim)
        # a teacher fixed for the round (global, global-ema) exists only from the first sync on
        if momentum.per_step_teacher or int(shared["round"]) > 0:
            consistency = momentum.consistency_weight
    if momentum.uses_weighting:
        weight = float(shared["weights"][block])
    trainer = Trainer(Anchors.from_tensors(block_state["anchors"]), decoder, config, train_views,
                      float(block_state["lr_scale"]), device, teacher=teacher,
                      consistency_weight=consistency, loss_weight=weight, stream=block + 1,
                      freeze_decoder=freeze_decoder,
                      # 1: a teacher fixed for the round (global, global-ema)
                      teacher_momentum=momentum.momentum if momentum.per_step_teacher else 1.0,
                      # the table's rows are the scene's training images: read only when used
                      appearance=(AppearanceImages.from_scene(run.scene())
                                  if config.appearance_dim else None))
    if "optimizer" in block_state:
        trainer.load_state(block_state)
    else:  # round 0: fresh optimizer, stats and RNG
        trainer.decoder.load_state_dict(block_state["decoder"])
    trainer.loss_sums = new_loss_sums()
    # every round starts from the averaged student (independent blocks keep their own) and the
    # synced teacher
    if momentum.shares_decoder:
        trainer.decoder.load_state_dict(shared["student"])
        if trainer.appearance is not None:  # the latents averaged per image at the sync
            trainer.load_appearance(shared["appearance"])
    if teacher is not None:
        trainer.teacher.load_state_dict(shared["teacher"])
    return trainer, val_views


def _train_round(run: Run, block: int, round_index: int, source: dict, shared: dict,
                 out_path: Path, until: int, stop_after: int | None, desc: str,
                 finalize: bool = False) -> dict:
    """Shared by train-block and finalize: resume from a partial file if one is there."""
    device = resolve_device(run.train.device)
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    partial_path = out_path.with_suffix(".partial.pt")
    state = source
    if partial_path.exists():
        state = run.load(partial_path)
        log.info("resuming %s from step %d", out_path.name, state["step"])
    # the teacher starts equal to the student (consistency from step 1); finalize freezes the
    # decoder
    use_teacher = run.momentum.uses_teacher and not finalize
    trainer, val_views = _block_trainer(run, source, block, shared, use_teacher, device,
                                        freeze_decoder=finalize)
    if state is not source:
        trainer.load_state(state)
        history = list(state.get("history", []))
        start = {"psnr": float(state["val_psnr_start"]),
                 "ssim": float(state.get("val_ssim_start", float("nan")))}
    else:  # the block's score with the synced decoder, before training: what sync weighs the
        history, start = [], trainer.evaluate(val_views)  # block by, and the cost of the sync

    def save_partial(rows):
        run.save(partial_path, dict(trainer.state(), history=rows, round=round_index,
                                    block=block, val_psnr_start=start["psnr"],
                                    val_ssim_start=start["ssim"]))

    run_training(trainer, until, val_views, history, save_partial, stop_after, desc=desc)
    if trainer.step < until:
        return {}
    metrics = trainer.evaluate(val_views)
    result = dict(trainer.state(), history=history, round=round_index, block=block,
                  val_psnr=metrics["psnr"], val_ssim=metrics["ssim"], val_psnr_start=start["psnr"],
                  val_ssim_start=start["ssim"])
    run.save(out_path, result)
    if not finalize:  # what sync reads: kilobytes, not the full block
        summary = decoder_summary(result)
        if run.momentum.sync == "fit":  # the inputs sync fits the shared decoder on
            summary["fit_sample"] = sample_decoder_inputs(trainer, seed=run.train.seed + block)
        run.save(run.decoder_path(round_index, block), summary)
    partial_path.unlink(missing_ok=True)
    log.info("block %d %s: validation PSNR %.2f dB (%.2f at its start), SSIM %.4f, %d anchors",
             block, desc, metrics["psnr"], start["psnr"], metrics["ssim"], trainer.anchors.count)
    return result


SUMMARY_KEYS = ("round", "block", "step", "decoder", "teacher", "val_psnr", "val_ssim",
                "val_psnr_start", "val_ssim_start", "loss_sums", "history", "appearance",
                "appearance_held")


def decoder_summary(result: dict) -> dict:
    """The part of a block round that sync and the report read (no anchors, no optimizer)."""
    summary = {key: result[key] for key in SUMMARY_KEYS if key in result}
    summary["anchors"] = len(result["anchors"]["xyz"])
    return summary


def train_block(run: Run, round_index: int, block: int, stop_after: int | None = None) -> dict:
    """Round r of block b: start from block r-1 and shared r-1, train iterations_per_round."""
    if round_index < 1:
        raise InputError("rounds start at 1 (round 0 is `mgs init`)")
    source = run.load(run.block_path(round_index - 1, block))
    shared = run.load(run.shared_path(round_index - 1))
    until = round_index * run.momentum.iterations_per_round
    return _train_round(run, block, round_index, source, shared, run.block_path(round_index, block),
                        until, stop_after, f"round {round_index} block {block}")


def finalize_block(run: Run, block: int, stop_after: int | None = None) -> dict:
    """Decoder frozen at the last average; anchors fine-tuned for final_iterations."""
    if run.momentum.final_iterations == 0:
        raise InputError("momentum.final_iterations is 0: there is nothing to finalize (merge "
                         "reads the last round's blocks)")
    last = run.momentum.rounds
    source = run.load(run.block_path(last, block))
    shared = run.load(run.shared_path(last))
    until = int(source["step"]) + run.momentum.final_iterations
    return _train_round(run, block, last + 1, source, shared, run.final_path(block), until,
                        stop_after, f"finalize block {block}", finalize=True)
