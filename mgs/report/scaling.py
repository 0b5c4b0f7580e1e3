"""`mgs report --scaling`: how each stage's cost grows with the city (benchmarks/scaling.py).

The benchmark's scaling.csv has one row per (blocks, stage): wall seconds of the stage, CPU
seconds of its jobs, the largest peak RSS of one job, and the merged model's anchors. Per stage
the growth exponent is the least-squares slope of log(cost) against log(blocks) (and against
log(anchors), what merge and evaluate should scale with). The report shows them in a table and
a log-log figure with the fitted lines.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mgs.atomic import atomic_path  # noqa: E402
from mgs.errors import InputError  # noqa: E402

log = logging.getLogger("mgs.report")

REQUIRED = ("blocks", "stage", "seconds", "peak_rss_mb", "anchors")
ANCHOR_STAGES = ("merge", "evaluate")  # their work is the merged model's
CAPTION_TABLE = ("benchmarks/scaling.py: per stage, its cost in each city (values for the "
                 "cities in order of blocks) and the growth exponent e of cost ∝ blocks^e "
                 "(least-squares slope in log-log; CPU seconds are steadier than wall time on a "
                 "shared machine). A block job's peak RSS should stay flat (e ≈ 0), sync at most "
                 "linear in blocks, merge and evaluate at most linear in anchors.")
CAPTION_FIGURE = ("Stage cost against the number of blocks (log-log; CPU seconds of the "
                  "stage's jobs where the table has them, else wall seconds), one line per stage "
                  "with its fitted exponent; right: merge and evaluate against the merged "
                  "anchors.")


def read_scaling(path: str | Path) -> pd.DataFrame:
    """scaling.csv, checked: the columns the report needs, positive block counts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scaling table {path} not found; run `python benchmarks/scaling.py` "
                         "first (it writes WORK/scaling.csv)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a CSV table ({exc}); rerun benchmarks/scaling.py") \
            from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(f"{path} lacks column(s) {', '.join(missing)}; it must be the "
                         "scaling.csv that benchmarks/scaling.py writes")
    numeric = [c for c in REQUIRED if c != "stage"] + \
        [c for c in ("cpu_seconds",) if c in frame.columns]
    for column in numeric:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or (values <= 0).any():
            raise InputError(f"{path}: column {column} needs positive numbers in every row")
        frame[column] = values
    return frame.sort_values("blocks", kind="stable")  # stages keep the file's order


def fit_exponent(x, y) -> float:
    """Least-squares slope of log(y) against log(x); NaN with fewer than two distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) < 2:
        return math.nan
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def _stages(frame: pd.DataFrame):
    """(stage, its rows) in the order the stages first appear in the file."""
    order = list(dict.fromkeys(frame["stage"]))
    groups = dict(list(frame.groupby("stage", sort=False)))
    return [(stage, groups[stage]) for stage in order]


def scaling_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    has_cpu = "cpu_seconds" in frame.columns
    for stage, rows_of_stage in _stages(frame):
        per_city = lambda column, fmt: " / ".join(  # noqa: E731
            fmt.format(v) for v in rows_of_stage[column])
        row = {"stage": stage, "blocks": per_city("blocks", "{:.0f}"),
               "wall s": per_city("seconds", "{:.1f}"),
               "CPU s": per_city("cpu_seconds", "{:.1f}") if has_cpu else "",
               "peak RSS MB": per_city("peak_rss_mb", "{:.0f}"),
               "e wall vs blocks": fit_exponent(rows_of_stage["blocks"], rows_of_stage["seconds"]),
               "e CPU vs blocks": fit_exponent(rows_of_stage["blocks"],
                                               rows_of_stage["cpu_seconds"]) if has_cpu
               else math.nan,
               "e RSS vs blocks": fit_exponent(rows_of_stage["blocks"],
                                               rows_of_stage["peak_rss_mb"]),
               "e wall vs anchors": math.nan, "e CPU vs anchors": math.nan}
        if stage in ANCHOR_STAGES:
            row["e wall vs anchors"] = fit_exponent(rows_of_stage["anchors"],
                                                    rows_of_stage["seconds"])
            if has_cpu:
                row["e CPU vs anchors"] = fit_exponent(rows_of_stage["anchors"],
                                                       rows_of_stage["cpu_seconds"])
        rows.append(row)
    return pd.DataFrame(rows)


def _loglog(ax, x, y, label: str, color) -> None:
    e = fit_exponent(x, y)
    ax.plot(x, y, marker="o", ms=4, color=color,
            label=label if math.isnan(e) else f"{label} (e = {e:+.2f})")
    if not math.isnan(e):
        a, b = np.polyfit(np.log(x), np.log(y), 1)
        grid = np.geomspace(min(x), max(x), 20)
        ax.plot(grid, np.exp(b) * grid ** a, ls=":", color=color)


def _plain_log_axes(ax, x_ticks=None) -> None:
    """Log axes labelled 1, 2, 5, 10, ... (and the cities' block counts) in plain numbers."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    if x_ticks is not None:
        ax.set_xticks(sorted(set(x_ticks)))
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def scaling_figure(frame: pd.DataFrame, path: Path) -> Path:
    fig, (ax_time, ax_rss, ax_anchor) = plt.subplots(1, 3, figsize=(15, 4.2))
    # CPU time where measured: on a shared machine the wall time mostly measures the load
    time_column = "cpu_seconds" if "cpu_seconds" in frame.columns else "seconds"
    time_label = "CPU seconds" if time_column == "cpu_seconds" else "wall seconds"
    for i, (stage, rows) in enumerate(_stages(frame)):
        color = plt.get_cmap("tab10")(i % 10)
        _loglog(ax_time, rows["blocks"], rows[time_column], stage, color)
        _loglog(ax_rss, rows["blocks"], rows["peak_rss_mb"], stage, color)
        if stage in ANCHOR_STAGES:
            _loglog(ax_anchor, rows["anchors"], rows[time_column], stage, color)
    ax_time.set(title="Time of the stage's jobs", xlabel="blocks", ylabel=time_label)
    ax_rss.set(title="Peak RSS of one job", xlabel="blocks", ylabel="MB")
    ax_anchor.set(title="Merge and evaluate", xlabel="merged anchors", ylabel=time_label)
    for ax in (ax_time, ax_rss):
        _plain_log_axes(ax, frame["blocks"])
    _plain_log_axes(ax_anchor)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def scaling_sections(path: str | Path, out: Path) -> list:
    """The report's scaling sections; writes OUT/scaling_fit.csv and OUT/scaling.png."""
    frame = read_scaling(path)
    table = scaling_table(frame)
    with atomic_path(out / "scaling_fit.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    shown = table.copy().astype(object)
    for column in [c for c in table.columns if c.startswith("e ")]:
        shown[column] = ["" if pd.isna(v) else f"{v:+.2f}" for v in table[column]]
    log.info("scaling: %d stages over %d cities", len(table), frame["blocks"].nunique())
    return [("Scaling", CAPTION_TABLE, "table", shown),
            ("Scaling: figure", CAPTION_FIGURE, "figure",
             scaling_figure(frame, out / "scaling.png"))]
