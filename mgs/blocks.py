"""Momentum-GS block training as separate jobs: init, one round of one block, sync, finalize.

Run folder layout (`results/{scene}/`): `scene/`, `partition/partition.json`, `config.yaml`,
`rounds/{r}/shared.pt` (student average, teacher, block weights and metric EMAs after sync r),
`rounds/{r}/block_{b}.pt` (block b after round r: anchors, decoder, optimizer and densify state),
`rounds/{r}/decoder_{b}.pt` (the small part of it that sync reads: student, teacher, validation
metrics, loss sums, anchor count, history), `final/block_{b}.pt` (after finalize; with
final_iterations 0 there is no finalize and the last round's blocks are final).
Every job reads only files of the previous round and writes only its own outputs, atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mgs.appearance import AppearanceImages, average_tables
from mgs.atomic import write_tsv
from mgs.checkpoint import load_checkpoint, save_checkpoint
from mgs.config import TrainConfig, yaml_section
from mgs.errors import InputError
from mgs.model import Anchors, Decoder, initial_log_scale, voxelize
from mgs.momentum import (MomentumConfig, block_weights, next_teacher, state_distance,
                          update_metric_ema, weighted_average)
from mgs.partition import load_partition
from mgs.partition.region import block_anchor_mask
from mgs.plan import layout
from mgs.scene import load_scene
from mgs.sync_fit import fit_shared_decoder, sample_decoder_inputs
from mgs.device import resolve_device
from mgs.train import Trainer, new_loss_sums, spatial_lr_scale
from mgs.training_loop import run_training
from mgs.view_cache import block_views

log = logging.getLogger("mgs.blocks")


@dataclass
class Run:
    """A run folder with its configuration, scene and partition."""
    root: Path
    train: TrainConfig
    momentum: MomentumConfig

    @classmethod
    def open(cls, root: str | Path, config_path: str | Path | None = None) -> "Run":
        root = Path(root)
        config_path = Path(config_path) if config_path else root / "config.yaml"
        if not config_path.is_file():
            raise InputError(f"config {config_path} not found; pass --config or write the "
                             "run's config.yaml")
        train = TrainConfig.from_dict(yaml_section(config_path, "train"), source=str(config_path))
        momentum = MomentumConfig.from_dict(yaml_section(config_path, "momentum"),
                                            source=str(config_path))
        return cls(root, train, momentum)

    @property
    def config_hash(self) -> str:
        """Keys that make block checkpoints incompatible (rounds may grow)."""
        shaped = [self.train.shape_hash(), self.momentum.mode, self.momentum.iterations_per_round]
        if (self.momentum.teacher, self.momentum.sync) != ("step", "average"):  # keeps older
            shaped += [self.momentum.teacher, self.momentum.sync]  # runs' hashes unchanged
        return hashlib.sha256(json.dumps(shaped).encode()).hexdigest()[:16]

    def scene(self):
        return load_scene(self.root / "scene")

    def partition(self):
        return load_partition(self.root / layout.file("partition"))

    def shared_path(self, round_index: int) -> Path:
        return self.root / layout.file("shared", r=round_index)

    def block_path(self, round_index: int, block: int) -> Path:
        return self.root / layout.file("block", r=round_index, b=block)

    def decoder_path(self, round_index: int, block: int) -> Path:
        return self.root / layout.file("decoder", r=round_index, b=block)

    def final_path(self, block: int) -> Path:
        """The block as merged: after finalize, or after the last round without one."""
        return self.root / layout.merged_block(block, self.momentum.rounds,
                                               self.momentum.final_iterations)

    def load(self, path: Path) -> dict:
        return load_checkpoint(path, self.config_hash)

    def save(self, path: Path, payload: dict) -> None:
        save_checkpoint(path, payload, self.config_hash)


def _decoder_state(decoder: Decoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}


def init_blocks(run: Run) -> int:
    """Round 0: each block's anchors (its cells expanded by the margin, or with margin `all`
    what its cameras see), one random decoder as student and teacher. Returns the number of blocks."""
    config = run.train
    scene, partition = run.scene(), run.partition()
    if run.momentum.mode == "single" and partition.num_blocks != 1:
        raise InputError(f"momentum mode 'single' trains one model on the whole scene, but "
                         f"{run.root / 'partition'} has {partition.num_blocks} blocks; "
                         "partition with block_dim [1, 1, 1] or choose another mode")
    torch.manual_seed(config.seed)
    decoder = Decoder(config.feat_dim, config.n_offsets, appearance_dim=config.appearance_dim)
    # every anchor's initial scale from its neighbours in the whole scene, as officially (each
    # block starts from the whole cloud): a block's border anchors see past its region
    xyz = torch.as_tensor(voxelize(scene.points_xyz, config.voxel_size), dtype=torch.float32)
    log_scale = initial_log_scale(xyz)
    for index, block in enumerate(partition.blocks):
        cameras = [scene.camera(name) for name in block.train_cameras]
        mask = torch.from_numpy(block_anchor_mask(
            partition, index, xyz, log_scale,
            [camera.scaled(config.resolution) for camera in cameras]))
        if not mask.any():
            raise InputError(f"block {index} of {run.root / 'partition'} holds no SfM points; "
                             "increase the margin or use fewer blocks")
        anchors = Anchors.initial(xyz[mask], log_scale[mask], config.feat_dim, config.n_offsets)
        run.save(run.block_path(0, index), {
            "round": 0, "block": index, "step": 0, "anchors": anchors.tensors(),
            "decoder": _decoder_state(decoder), "lr_scale": spatial_lr_scale(cameras)})
        log.info("block %d: %d anchors, %d train cameras", index, anchors.count, len(cameras))
    teacher = _decoder_state(decoder)
    n = len(partition.blocks)
    shared = {
        "round": 0, "student": _decoder_state(decoder), "teacher": teacher,
        "weights": torch.ones(n, dtype=torch.float64),
        "psnr_ema": torch.full((n,), float("nan"), dtype=torch.float64),
        "ssim_ema": torch.full((n,), float("nan"), dtype=torch.float64)}
    if config.appearance_dim:  # zero latents (mgs.appearance), no image held yet
        images = AppearanceImages.from_scene(scene)
        shared["appearance"] = torch.zeros(len(images.names), config.appearance_dim)
        shared["appearance_held"] = torch.zeros(len(images.names), dtype=torch.bool)
    run.save(run.shared_path(0), shared)
    return n


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


def sync_round(run: Run, round_index: int) -> list[dict]:
    """Average the students and teachers, update the block weights; writes shared.pt and
    sync.tsv of round r and returns the TSV rows."""
    momentum = run.momentum
    previous = run.load(run.shared_path(round_index - 1))
    n = len(previous["weights"])
    blocks = [run.load(run.decoder_path(round_index, b)) for b in range(n)]
    decay = momentum.sync_metric_decay
    # each block is weighed by its score with the shared decoder (officially the student, which
    # all GPUs share), i.e. with the previous sync's average at the start of this round, not
    # with its own student at the end of it: a round older, but not flattered by a decoder
    # that trained on this block alone for a round
    scores = [score_with_shared_decoder(block) for block in blocks]
    psnr_ema = [update_metric_ema(float(previous["psnr_ema"][b]), scores[b][0], decay)
                for b in range(n)]
    ssim_ema = [update_metric_ema(float(previous["ssim_ema"][b]), scores[b][1], decay)
                for b in range(n)]
    if momentum.uses_weighting and round_index > momentum.warmup_rounds:
        weights = block_weights(psnr_ema, ssim_ema, momentum.sigma, momentum.ssim_scale)
    else:
        weights = [1.0] * n
    average = weighted_average([b["decoder"] for b in blocks], weights)
    fit = {}
    if momentum.sync == "fit":
        average, fit = fit_shared_decoder(average, [b["decoder"] for b in blocks],
                                          [b["fit_sample"] for b in blocks], weights,
                                          run.train.feat_dim, run.train.n_offsets,
                                          run.train.appearance_dim)
        log.info("sync fit: distance to the blocks' students %s after averaging, %s after "
                 "fitting", _short(fit["fit_before"]), _short(fit["fit_after"]))
    teacher = average
    if momentum.uses_teacher:  # a per-step teacher: each block blended its own copy every step
        block_teachers = (weighted_average([b["teacher"] for b in blocks], weights)
                          if momentum.per_step_teacher else None)
        teacher = next_teacher(momentum.teacher, round_index, average, block_teachers,
                               previous["teacher"], momentum.teacher_sync_momentum)
    shared = {
        "round": round_index, "student": average, "teacher": teacher,
        "weights": torch.tensor(weights, dtype=torch.float64),
        "psnr_ema": torch.tensor(psnr_ema, dtype=torch.float64),
        "ssim_ema": torch.tensor(ssim_ema, dtype=torch.float64),
        "psnr": torch.tensor([b["val_psnr"] for b in blocks], dtype=torch.float64)}
    if "appearance" in previous:  # each image's latent averaged over the blocks holding it
        held = [b["appearance_held"] for b in blocks]
        shared["appearance"] = average_tables([b["appearance"] for b in blocks], held, weights,
                                              previous["appearance"])
        shared["appearance_held"] = previous["appearance_held"] | torch.stack(held).any(0)
    run.save(run.shared_path(round_index), shared)
    last_psnr = previous.get("psnr", torch.full((n,), float("nan")))
    teacher_gap = state_distance(average, teacher)
    rows = [_sync_row(round_index, b, blocks[b], last_psnr[b], average, teacher_gap, psnr_ema[b],
                      ssim_ema[b], weights[b]) for b in range(n)]
    for b, row in enumerate(rows):  # how far the shared decoder is from each block's student
        row.update({key: values[b] for key, values in fit.items()})
    write_tsv(run.root / layout.file("sync_table", r=round_index), rows)
    for row in rows:
        log.info("round %d block %d: PSNR %.2f (start %.2f) SSIM %.4f weight %.4f, "
                 "consistency %.2f of photometric, drift %.3g", round_index, row["block"],
                 row["psnr"], row["psnr_start"], row["ssim"], row["weight"],
                 row["consistency_share"], row["student_drift"])
    if momentum.keep_rounds:
        prune_rounds(run, round_index - momentum.keep_rounds)
    return rows


def _short(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def score_with_shared_decoder(block: dict) -> tuple[float, float]:
    """(PSNR, SSIM) of a block round's start: its anchors with the synced decoder."""
    return float(block["val_psnr_start"]), float(block["val_ssim_start"])


def prune_rounds(run: Run, last: int) -> None:
    """Remove the full block checkpoints of rounds <= `last` (decoder summaries and shared
    decoders stay). Every job that reads them has finished once a later round is synced."""
    if last < 0:
        return
    freed = 0
    init_dir = run.root / layout.file("init")
    if init_dir.is_dir():  # init's output is one folder: removed whole, so a workflow regenerates
        staging = init_dir.with_name(".0.removing")  # it on demand instead of trusting a husk
        shutil.rmtree(staging, ignore_errors=True)
        freed += sum(f.stat().st_size for f in init_dir.glob("*") if f.is_file())
        init_dir.rename(staging)
        shutil.rmtree(staging)
    for round_dir in (run.root / "rounds").glob("*"):
        if round_dir.name.isdigit() and 0 < int(round_dir.name) <= last:
            for path in round_dir.glob("block_*.pt"):
                freed += path.stat().st_size
                path.unlink()
    if freed:
        log.info("removed the full block checkpoints of rounds <= %d (%.1f MB; "
                 "momentum.keep_rounds %d)", last, freed / 1e6, run.momentum.keep_rounds)


def _sync_row(round_index: int, b: int, block: dict, previous_psnr: float, average: dict,
              teacher_gap: float, psnr_ema: float, ssim_ema: float, weight: float) -> dict:
    """One block's line of sync.tsv: metrics, weight and the diagnostics of the momentum terms."""
    sums = block.get("loss_sums") or new_loss_sums()
    share = sums["consistency"] / sums["photometric"] if sums["photometric"] else 0.0
    # the block's PSNR after the previous sync, before training, minus its PSNR at the end of
    # the previous round: what loading that sync's average cost the block
    sync_cost = block["val_psnr_start"] - float(previous_psnr)
    return {"round": round_index, "block": b, "psnr": block["val_psnr"],
            "ssim": block["val_ssim"], "psnr_ema": psnr_ema, "ssim_ema": ssim_ema,
            "weight": weight, "psnr_start": block["val_psnr_start"],
            "ssim_start": block["val_ssim_start"],
            "previous_sync_cost": sync_cost, "consistency_share": share,
            "student_drift": state_distance(block["decoder"], average),
            "teacher_gap": teacher_gap, "anchors": int(block["anchors"])}


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


def train_all(run: Run, model_dir: str | Path | None = None) -> None:
    """The whole block pipeline in this process (init, rounds with syncs, finalize, merge), in
    the order the workflow runs its jobs; for scripts and tests without Snakemake."""
    from mgs.merge import merge_blocks

    n = init_blocks(run)
    for r in range(1, run.momentum.rounds + 1):
        for b in range(n):
            train_block(run, r, b)
        sync_round(run, r)
    if run.momentum.final_iterations:
        for b in range(n):
            finalize_block(run, b)
    merge_blocks(run, model_dir or run.root / "model")
