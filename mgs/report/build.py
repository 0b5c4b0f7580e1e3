"""`mgs report`: tables and figures for every evaluated run under a results folder
(DESIGN.md item 9).

A run folder is any folder holding `eval/metrics.json` (written by `mgs evaluate`). Tables:
all runs; ours beside the paper's numbers for runs of a paper scene (config.yaml's scene.name,
the run folder or a folder above it named like the paper's rows: building, rubble, ...); the
ablation when runs of several `momentum.mode`s share one scene; per-block statistics. Figures per run: see
`mgs.report.figures`. Written: `report.md`, `report.html` (self-contained, images as base64),
the PNGs and the tables as CSV (for `snakemake --report`).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from mgs.report import figures
from mgs.report.extras import run_sections
from mgs.report.page import write_pages
from mgs.report.scaling import scaling_sections
from mgs.atomic import atomic_path, ensure_writable_dir
from mgs.errors import InputError
from mgs.momentum import MODES

log = logging.getLogger("mgs.report")

PAPER = "Momentum-GS (arXiv:2412.04887v2)"
# the paper's Table 5 (Building) rows that correspond to our ablation modes
PAPER_ABLATION = {"single": "(a) baseline single model",
                  "independent": "(d) independent training",
                  "shared": "(b) parallel training shared decoder",
                  "momentum": "(e) + momentum self-distillation",
                  "full": "(f) full: + block weighting"}
COLUMNS = {"psnr_cc": "PSNR", "ssim_cc": "SSIM", "lpips_vgg_cc": "LPIPS-VGG",
           "lpips_alex_cc": "LPIPS-Alex", "psnr": "PSNR raw", "ssim": "SSIM raw",
           "lpips_vgg": "LPIPS-VGG raw", "lpips_alex": "LPIPS-Alex raw"}
RESULTS_COLUMNS = ["run", "mode", "views", "factor", *COLUMNS.values(), "FPS",
                   "peak memory (MB)", "anchors", "device"]
PAPER_COLUMNS = ["scene", "source", "method", "PSNR", "SSIM", "LPIPS-VGG", "PSNR raw"]
ABLATION_COLUMNS = ["run", "mode", "PSNR", "SSIM", "LPIPS-VGG", "PSNR raw", "SSIM raw",
                    "sync cost (dB)",
                    "paper Table 5 row", "paper PSNR", "paper SSIM", "paper LPIPS"]
BLOCKS_COLUMNS = ["run", "block", "train cameras", "validation cameras", "anchors", "final PSNR",
                  "final SSIM", "weight"]
FORMATS = {"PSNR": "{:.2f}", "SSIM": "{:.3f}", "LPIPS": "{:.3f}", "FPS": "{:.1f}",
           "memory": "{:.0f}", "weight": "{:.4f}", "seconds": "{:.1f}"}


@dataclass
class RunInfo:
    id: str  # path below the results folder, "/" replaced by "_"
    root: Path
    metrics: dict
    mode: str
    scene_key: str  # runs with the same key share a scene (ablation groups)
    paper_scene: str | None


def load_paper_tables(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's numbers (the copy shipped in mgs/data unless `path` is given)."""
    if path is None:
        source = importlib.resources.files("mgs") / "data" / "paper_tables.csv"
        with importlib.resources.as_file(source) as file:
            return pd.read_csv(file, comment="#")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"paper tables {path} not found; omit --paper-tables to use the copy "
                         "shipped with mgs")
    table = pd.read_csv(path, comment="#")
    missing = {"table", "scene", "method", "psnr", "ssim", "lpips"} - set(table.columns)
    if missing:
        raise InputError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
    return table


def find_runs(results: Path, paper_scenes: set[str], skip: Path | None = None,
              run_dirs: list[Path] | None = None) -> list[RunInfo]:
    """Evaluated runs under `results`, or exactly `run_dirs` (below `results`) when given."""
    runs = []
    for root in _run_folders(results, skip) if run_dirs is None else run_dirs:
        metrics_path = root / "eval" / "metrics.json"
        try:
            metrics = json.loads(metrics_path.read_text())
        except ValueError as exc:
            log.warning("%s is not valid JSON (%s); run left out", metrics_path, exc)
            continue
        relative = root.relative_to(results)
        parts = list(relative.parts or (results.resolve().name,))
        mode = metrics.get("mode")
        config = root / "config.yaml"
        names = [str(p) for p in reversed(parts)]
        if config.is_file():
            try:
                values = yaml.safe_load(config.read_text()) or {}
                mode = (values.get("momentum") or {}).get("mode", mode)
                # the workflow's run config names its scene (scene: {name: ...})
                names.insert(0, str((values.get("scene") or {}).get("name", "")))
            except (yaml.YAMLError, AttributeError) as exc:
                log.warning("%s: cannot read momentum.mode (%s); using metrics.json's", config, exc)
        scene_dir = root / "scene"
        scene_key = str(scene_dir.resolve()) if scene_dir.exists() else str(root.parent.resolve())
        paper_scene = next((n.lower() for n in names if n.lower() in paper_scenes), None)
        runs.append(RunInfo("_".join(parts), root, metrics, mode or "full", scene_key, paper_scene))
    return runs


# inside a run folder only eval/ matters; these can be large or point back up (scene links)
_NOT_RUNS = {"scene", "rounds", "final", "model", "partition", "eval", "images", "renders", "gt",
             ".snakemake", ".git"}


def _run_folders(results: Path, skip: Path | None) -> list[Path]:
    """Folders holding eval/metrics.json, following symlinked run folders, sorted."""
    found, stack, seen = [], [results], set()
    while stack:
        folder = stack.pop()
        real = folder.resolve()
        if real in seen or real == skip:
            continue
        seen.add(real)
        if (folder / "eval" / "metrics.json").is_file():
            found.append(folder)
            continue  # runs do not nest
        try:
            stack += [c for c in folder.iterdir() if c.is_dir() and c.name not in _NOT_RUNS]
        except OSError as exc:
            log.warning("cannot list %s (%s)", folder, exc)
    return sorted(found)


def results_table(runs: list[RunInfo]) -> pd.DataFrame:
    rows = []
    for run in runs:
        m = run.metrics
        row = {"run": run.id, "mode": run.mode, "views": m.get("num_views"),
               "factor": m.get("downsampling_factor")}
        row.update({name: m.get("metrics", {}).get(key) for key, name in COLUMNS.items()})
        row.update({"FPS": m.get("fps"), "peak memory (MB)": m.get("peak_memory_mb"),
                    "anchors": m.get("anchors"), "device": m.get("device")})
        rows.append(row)
    return pd.DataFrame(rows, columns=RESULTS_COLUMNS)


def paper_table(runs: list[RunInfo], paper: pd.DataFrame) -> pd.DataFrame:
    """Per paper scene that was run: the paper's Table 1/2 rows, then ours (colour-corrected,
    LPIPS-VGG as the paper; raw PSNR for reference)."""
    rows = []
    main = paper[paper["table"].astype(str).isin(["1", "2"])]
    for scene in sorted({r.paper_scene for r in runs if r.paper_scene}):
        for _, p in main[main["scene"] == scene].iterrows():
            rows.append({"scene": scene, "source": f"paper Table {p['table']}",
                         "method": p["method"], "PSNR": p["psnr"], "SSIM": p["ssim"],
                         "LPIPS-VGG": p["lpips"], "PSNR raw": math.nan})
        for run in runs:
            if run.paper_scene == scene:
                m = run.metrics.get("metrics", {})
                rows.append({"scene": scene, "source": f"mgs run {run.id}",
                             "method": f"mgs ({run.mode})", "PSNR": m.get("psnr_cc"),
                             "SSIM": m.get("ssim_cc"), "LPIPS-VGG": m.get("lpips_vgg_cc"),
                             "PSNR raw": m.get("psnr")})
    return pd.DataFrame(rows, columns=PAPER_COLUMNS)


def ablation_table(runs: list[RunInfo], paper: pd.DataFrame) -> pd.DataFrame:
    """Runs of several modes on one scene, in the order of the ablation ladder, beside the
    paper's Table 5 (Building)."""
    table5 = paper[paper["table"].astype(str) == "5"].set_index("method")
    rows = []
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        groups.setdefault(run.scene_key, []).append(run)
    for group in groups.values():
        if len({r.mode for r in group}) < 2:
            continue
        order = {mode: i for i, mode in enumerate(MODES)}
        for run in sorted(group, key=lambda r: (order.get(r.mode, len(MODES)), r.id)):
            m = run.metrics.get("metrics", {})
            paper_row = table5.loc[PAPER_ABLATION[run.mode]] if \
                PAPER_ABLATION.get(run.mode) in table5.index else None
            rows.append({"run": run.id, "mode": run.mode, "PSNR": m.get("psnr_cc"),
                         "SSIM": m.get("ssim_cc"), "LPIPS-VGG": m.get("lpips_vgg_cc"),
                         "PSNR raw": m.get("psnr"), "SSIM raw": m.get("ssim"),
                         "sync cost (dB)": mean_sync_cost(run.root),
                         "paper Table 5 row": None if paper_row is None else
                         PAPER_ABLATION[run.mode],
                         "paper PSNR": math.nan if paper_row is None else paper_row["psnr"],
                         "paper SSIM": math.nan if paper_row is None else paper_row["ssim"],
                         "paper LPIPS": math.nan if paper_row is None else paper_row["lpips"]})
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)


def mean_sync_cost(root: Path) -> float:
    """The mean over blocks and rounds ≥ 2 of `previous_sync_cost` in rounds/*/sync.tsv: what
    loading a sync's decoder costs a block's validation PSNR (NaN without syncs)."""
    costs = figures.read_sync_tables(Path(root)).get("previous_sync_cost")
    return math.nan if costs is None or costs.isna().all() else float(costs.mean())


def seed_ablation_table(summary: str | Path, paper: pd.DataFrame) -> pd.DataFrame:
    """The multi-seed ablation (benchmarks/ablation.py's summary.csv): mean ± std per variant,
    beside the paper's Table 5 (Building) row it corresponds to."""
    path = Path(summary)
    if not path.is_file():
        raise InputError(f"ablation summary {path} not found; run `python "
                         "benchmarks/ablation.py` first (it writes WORK/summary.csv)")
    frame = pd.read_csv(path)
    table5 = paper[paper["table"].astype(str) == "5"].set_index("method")
    rows = []
    for _, s in frame.iterrows():
        cell = lambda m, f: f"{s[m + '_mean']:{f}} ± {s[m + '_std']:{f}}"  # noqa: E731
        paper_row = PAPER_ABLATION.get(s["variant"])
        p = table5.loc[paper_row] if paper_row in table5.index else None
        rows.append({"variant": s["variant"], "seeds": int(s["seeds"]),
                     "PSNR": cell("psnr_cc", ".2f"), "SSIM": cell("ssim_cc", ".3f"),
                     "LPIPS-VGG": cell("lpips_vgg_cc", ".3f"), "PSNR raw": cell("psnr", ".2f"),
                     "SSIM raw": cell("ssim", ".3f"), "LPIPS-VGG raw": cell("lpips_vgg", ".3f"),
                     # older summaries have no sync cost; independent and single have no sync
                     "sync cost (dB)": f"{s['sync_cost_db_mean']:+.2f} ± {s['sync_cost_db_std']:.2f}"
                     if not math.isnan(s.get("sync_cost_db_mean", math.nan)) else None,
                     "paper Table 5 row": paper_row if p is not None else None,
                     "paper PSNR": math.nan if p is None else p["psnr"],
                     "paper SSIM": math.nan if p is None else p["ssim"],
                     "paper LPIPS": math.nan if p is None else p["lpips"]})
    return pd.DataFrame(rows)


def _final_block_stats(path: Path) -> dict:
    try:  # mmap: only the scalars and the anchor count are touched
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 — one unreadable block only blanks its row
        log.warning("cannot read %s (%s)", path, exc)
        return {}
    anchors = data.get("anchors")  # a count in round summaries, tensors in full blocks
    if isinstance(anchors, dict):
        anchors = None if anchors.get("xyz") is None else int(anchors["xyz"].shape[0])
    return {"anchors": None if anchors is None else int(anchors),
            "final PSNR": data.get("val_psnr"), "final SSIM": data.get("val_ssim")}


def _last_summary(root: Path, block: int) -> Path | None:
    rounds = sorted((int(d.name), d) for d in (root / "rounds").glob("*") if d.name.isdigit())
    for _, folder in reversed(rounds):
        if (folder / f"decoder_{block}.pt").is_file():
            return folder / f"decoder_{block}.pt"
    return None


def blocks_table(runs: list[RunInfo]) -> pd.DataFrame:
    rows = []
    for run in runs:
        partition_path = run.root / "partition" / "partition.json"
        if not partition_path.is_file():
            continue
        blocks = json.loads(partition_path.read_text()).get("blocks", [])
        sync = figures.read_sync_tables(run.root)
        last = sync[sync["round"] == sync["round"].max()].set_index("block") if len(sync) else None
        for block in blocks:
            b = int(block["id"])
            row = {"run": run.id, "block": b, "train cameras": len(block["train_cameras"]),
                   "validation cameras": len(block["validation_cameras"])}
            final = run.root / "final" / f"block_{b}.pt"
            if not final.is_file():  # final_iterations 0: the last round's summary
                final = _last_summary(run.root, b) or final
            row.update(_final_block_stats(final))
            row["weight"] = float(last.loc[b, "weight"]) if last is not None and b in last.index \
                else math.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=BLOCKS_COLUMNS)


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers as strings with a precision per column kind; missing values blank."""
    shown = frame.copy().astype(object)
    for column in frame.columns:
        fmt = next((f for key, f in FORMATS.items() if key.lower() in column.lower()), None)
        if fmt is None or not pd.api.types.is_numeric_dtype(frame[column]):
            shown[column] = [_plain(v) for v in frame[column]]
            continue
        shown[column] = ["" if pd.isna(v) else fmt.format(v) for v in frame[column]]
    return shown


def _plain(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # counts that became floats next to missing values
    return str(value)


TABLE_CAPTIONS = {
    "results": "All evaluated runs on their test views. PSNR/SSIM/LPIPS after the per-image "
               "quadratic colour correction (the paper's protocol); 'raw' without it.",
    "paper": f"Ours beside the numbers of {PAPER}, Tables 1-2 (colour-corrected, LPIPS-VGG).",
    "ablation": "Training strategies on one scene (momentum.mode), beside the paper's Table 5 "
                "(Building, 8 blocks).",
    "blocks": "Per block: cameras, anchors and validation PSNR after finalize, last sync weight.",
    "seed_ablation": "benchmarks/ablation.py: every variant at equal steps per block, mean ± std "
                     "over seeds on its test views, beside the paper's Table 5 (Building). Sync "
                     "cost: what loading a sync's decoder costs a block's validation PSNR, mean "
                     "over blocks and rounds ≥ 2.",
}
FIGURE_CAPTIONS = {
    "partition": "Partition map: blocks in world space (left) and contracted space (right).",
    "block_metrics": "Per-block validation PSNR and block weight after each sync round.",
    "sync_diagnostics": "Per round: λ_c·L_cons as a share of the photometric loss, the change of "
                        "each block's validation PSNR when it loads the previous sync's average "
                        "(the cost of a sync), each block's student distance from the average "
                        "and the average's distance from the teacher.",
    "loss": "Training loss and validation PSNR of every block (dotted: decoder-frozen "
            "fine-tuning).",
    "renders": "Test views: render | ground truth | absolute error.",
}


def make_report(results: str | Path | None, out_dir: str | Path,
                paper_tables: str | Path | None = None,
                ablation: str | Path | None = None,
                run_dirs: list[str | Path] | None = None,
                scaling: str | Path | None = None) -> Path:
    """Write REPORT_DIR/report.md, report.html, figure PNGs and table CSVs; returns the HTML path.
    `run_dirs`: exactly these run folders (what the workflow passes: the scenes it built);
    otherwise every evaluated run found under `results`.
    `ablation`: a multi-seed summary.csv of benchmarks/ablation.py, shown beside Table 5.
    `scaling`: scaling.csv of benchmarks/scaling.py; with neither runs nor `results` the report
    holds only its sections."""
    if scaling is not None and results is None and not run_dirs:
        out = ensure_writable_dir(out_dir)
        write_pages(out, PAPER, scaling_sections(scaling, out))
        return out / "report.html"
    if run_dirs:
        run_dirs = [Path(d) for d in run_dirs]
        for folder in run_dirs:
            if not (folder / "eval" / "metrics.json").is_file():
                raise InputError(f"run folder {folder} has no eval/metrics.json; run "
                                 f"`mgs evaluate --run {folder}` first")
        results = Path(os.path.commonpath([d.resolve().parent for d in run_dirs]))
        run_dirs = [d.resolve() for d in run_dirs]
    results = Path(results)
    if not results.is_dir():
        raise InputError(f"results folder {results} does not exist")
    out = ensure_writable_dir(out_dir)
    paper = load_paper_tables(paper_tables)
    runs = find_runs(results, set(paper["scene"].str.lower()), skip=out.resolve(),
                     run_dirs=run_dirs)
    if not runs:
        raise InputError(f"no evaluated runs under {results} (no */eval/metrics.json); run "
                         "`mgs evaluate --run RUN` first")
    log.info("report on %d run(s): %s", len(runs), ", ".join(r.id for r in runs))
    sections: list[tuple[str, str, str, object]] = []  # (title, caption, kind, payload)
    tables = {"results": results_table(runs), "paper": paper_table(runs, paper),
              "ablation": ablation_table(runs, paper), "blocks": blocks_table(runs)}
    titles = {"results": "Results", "paper": "Comparison with the paper",
              "ablation": "Ablation", "blocks": "Blocks"}
    if ablation is not None:
        tables["seed_ablation"] = seed_ablation_table(ablation, paper)
        titles["seed_ablation"] = "Ablation over seeds"
    for name, frame in tables.items():
        # every CSV is written, empty ones too, so a workflow can declare them as outputs
        with atomic_path(out / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        if frame.empty:
            continue
        sections.append((titles[name], TABLE_CAPTIONS[name], "table", _display(frame)))
    makers = {"partition": figures.partition_map, "block_metrics": figures.block_metrics,
              "sync_diagnostics": figures.sync_diagnostics,
              "loss": figures.loss_curves, "renders": figures.render_grid}
    for run in runs:
        for kind, make in makers.items():
            path = make(run.root, out / f"{run.id}_{kind}.png")
            if path is not None:
                sections.append((f"{run.id}: {kind.replace('_', ' ')}", FIGURE_CAPTIONS[kind],
                                 "figure", path))
        sections += run_sections(run.id, run.root, out)
    if scaling is not None:
        sections += scaling_sections(scaling, out)
    write_pages(out, PAPER, sections)
    return out / "report.html"
