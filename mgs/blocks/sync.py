"""`mgs sync`: the shared decoder, the next round's teacher and the block weights from the
blocks' decoder summaries, and the diagnostics of sync.tsv."""

from __future__ import annotations

import logging
import shutil

import torch

from mgs.appearance import average_tables
from mgs.atomic import write_tsv
from mgs.blocks.fit import fit_shared_decoder
from mgs.blocks.run import Run
from mgs.momentum import (block_weights, next_teacher, state_distance, update_metric_ema,
                          weighted_average)
from mgs.plan import layout
from mgs.train import new_loss_sums

log = logging.getLogger("mgs.blocks")


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
