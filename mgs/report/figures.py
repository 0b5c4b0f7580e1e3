"""Figures of `mgs report` (matplotlib, Agg): per run a partition map, per-block validation PSNR
and weight across rounds, the sync diagnostics, training loss curves and a render | ground truth
| error grid.

Each function reads only the run folder, writes one PNG atomically and returns its path, or None
(with a warning) when the run lacks what the figure needs, so one incomplete run never stops
the report.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mgs.atomic import atomic_path  # noqa: E402

log = logging.getLogger("mgs.report")

DPI = 110
MAX_RENDER_VIEWS = 3


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _numbered(paths, pattern: str) -> list[tuple[int, Path]]:
    """(number, path) for paths whose name matches `pattern` with one integer group, sorted."""
    found = []
    for path in paths:
        match = re.fullmatch(pattern, path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def partition_map(root: Path, path: Path) -> Path | None:
    source = root / "partition" / "partition.png"
    if not source.is_file():
        log.warning("%s: no partition/partition.png; partition map left out", root)
        return None
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return path


def read_sync_tables(root: Path) -> pd.DataFrame:
    """All rounds/*/sync.tsv rows (round, block, psnr, ssim, psnr_ema, ssim_ema, weight)."""
    rounds = _numbered((root / "rounds").glob("*"), r"(\d+)")
    frames = [pd.read_csv(d / "sync.tsv", sep="\t") for _, d in rounds if (d / "sync.tsv").is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def block_metrics(root: Path, path: Path) -> Path | None:
    sync = read_sync_tables(root)
    if sync.empty:
        log.warning("%s: no rounds/*/sync.tsv; per-block PSNR/weight figure left out", root)
        return None
    fig, (ax_psnr, ax_weight) = plt.subplots(1, 2, figsize=(10, 3.6))
    for block, rows in sync.groupby("block"):
        rows = rows.sort_values("round")
        ax_psnr.plot(rows["round"], rows["psnr"], marker="o", ms=3, label=f"block {block}")
        ax_weight.plot(rows["round"], rows["weight"], marker="o", ms=3, label=f"block {block}")
    ax_psnr.set(xlabel="round", ylabel="validation PSNR (dB)", title="Per-block validation PSNR")
    ax_weight.set(xlabel="round", ylabel="weight w_b", title="Block weights")
    for ax in (ax_psnr, ax_weight):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_weight.legend(fontsize=8, ncol=2 if sync["block"].nunique() > 6 else 1)
    return _save(fig, path)


DIAGNOSTICS = (("consistency_share", "λ_c·L_cons / photometric loss", "Consistency share"),
               ("previous_sync_cost", "PSNR after − before (dB)", "Cost of the previous sync"),
               ("student_drift", "‖S_b − S̄‖", "Student drift from the average"),
               ("teacher_gap", "‖S̄ − T̄‖", "Average student vs teacher"))


def sync_diagnostics(root: Path, path: Path) -> Path | None:
    """Per round: the momentum terms' share of the loss, what each sync cost the blocks'
    validation PSNR, how far the blocks' students drift and the teacher's distance."""
    sync = read_sync_tables(root)
    if sync.empty or not {c for c, _, _ in DIAGNOSTICS} <= set(sync.columns):
        log.warning("%s: sync.tsv has no diagnostics columns; diagnostics figure left out", root)
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for ax, (column, ylabel, title) in zip(axes.flat, DIAGNOSTICS):
        if column == "teacher_gap":  # one value per round
            rows = sync.groupby("round")[column].first()
            ax.plot(rows.index, rows.values, marker="o", ms=3, color="k")
        else:
            for block, rows in sync.groupby("block"):
                rows = rows.sort_values("round")
                ax.plot(rows["round"], rows[column], marker="o", ms=3, label=f"block {block}")
        if column == "previous_sync_cost":
            ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="round", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes.flat[0].legend(fontsize=8, ncol=2 if sync["block"].nunique() > 6 else 1)
    fig.tight_layout()
    return _save(fig, path)


def _history(path: Path) -> list[dict]:
    try:  # mmap: only the small history list is read, not the anchors or optimizer state
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 — a broken checkpoint only costs this curve
        log.warning("cannot read %s (%s); its loss curve is left out", path, exc)
        return []
    return list(data.get("history", [])) if isinstance(data, dict) else []


def loss_histories(root: Path) -> pd.DataFrame:
    """Training history rows of every block checkpoint (rounds and final), with a block column."""
    rows = []
    for _, round_dir in _numbered((root / "rounds").glob("*"), r"(\d+)"):
        # the round summaries (decoder_*.pt) carry the history; older runs only full blocks
        summaries = _numbered(round_dir.glob("decoder_*.pt"), r"decoder_(\d+)\.pt")
        for block, path in summaries or _numbered(round_dir.glob("block_*.pt"),
                                                  r"block_(\d+)\.pt"):
            rows += [dict(r, block=block, phase="rounds") for r in _history(path)]
    for block, path in _numbered((root / "final").glob("block_*.pt"), r"block_(\d+)\.pt"):
        rows += [dict(r, block=block, phase="final") for r in _history(path)]
    return pd.DataFrame(rows)


def loss_curves(root: Path, path: Path) -> Path | None:
    history = loss_histories(root)
    if history.empty or "loss" not in history:
        log.warning("%s: no training history in the block checkpoints; loss figure left out", root)
        return None
    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(10, 3.6))
    for block, rows in history.groupby("block"):
        rows = rows.sort_values("step").drop_duplicates("step", keep="last")
        line, = ax_loss.plot(rows["step"], rows["loss"], label=f"block {block}")
        if "val_psnr" in rows:
            ax_psnr.plot(rows["step"], rows["val_psnr"], color=line.get_color())
        final = rows["phase"] == "final"
        if final.any():  # the decoder-frozen fine-tuning, dotted, joined to the last round
            first = max(int(final.to_numpy().argmax()) - 1, 0)
            tail = rows.iloc[first:]
            ax_loss.plot(tail["step"], tail["loss"], ":", color=line.get_color(), lw=2.5)
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", title="Training loss")
    ax_psnr.set(xlabel="step", ylabel="validation PSNR (dB)", title="Validation PSNR")
    losses = history["loss"].dropna()
    if len(losses) and losses.min() > 0 and losses.max() > 20 * losses.min():
        ax_loss.set_yscale("log")  # only when the loss spans decades
    for ax in (ax_loss, ax_psnr):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    return _save(fig, path)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def render_grid(root: Path, path: Path, eval_dir: Path | None = None,
                count: int = MAX_RENDER_VIEWS) -> Path | None:
    """Render | ground truth | error for up to `count` test views spread over the test set."""
    eval_dir = eval_dir or root / "eval"
    per_view = eval_dir / "per_view.csv"
    if not per_view.is_file():
        log.warning("%s: no per_view.csv; render grid left out", eval_dir)
        return None
    views = pd.read_csv(per_view)
    picks = np.unique(np.linspace(0, len(views) - 1, min(count, len(views))).round().astype(int))
    rows = []
    for i in picks:
        view = views.iloc[i]
        render_path, gt_path = eval_dir / "renders" / view["file"], eval_dir / "gt" / view["file"]
        if render_path.is_file() and gt_path.is_file():
            rows.append((view, _read(render_path), _read(gt_path)))
    if not rows:
        log.warning("%s: render/GT PNGs missing; render grid left out", eval_dir)
        return None
    height, width = rows[0][1].shape[:2]
    panel = 3.2
    fig, axes = plt.subplots(len(rows), 3, squeeze=False,
                             figsize=(3 * panel, len(rows) * panel * height / width + 0.5))
    for r, (view, render, gt) in enumerate(rows):
        error = np.abs(render - gt).mean(-1)
        titles = (f"render ({view['psnr']:.2f} dB)", f"ground truth: {view['image']}",
                  "|render - GT| (0 to 0.25)")
        for c, (image, title) in enumerate(zip((render, gt, error), titles)):
            ax = axes[r, c]
            ax.imshow(image, cmap="inferno" if c == 2 else None, vmin=0, vmax=0.25 if c == 2 else 1,
                      interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
