"""The `mgs` command: one verb per workflow stage.

Every verb is a thin wrapper around a library function; user errors (MgsError) print one clear
message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

# Idle OpenMP threads of torch otherwise spin and starve the numba rasterizer's threads
# (5-10x slower steps on a loaded machine). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Snakemake (and SLURM wrappers) set OMP_NUM_THREADS to the job's threads; let numba's
# rasterizer threads follow it instead of taking every core of the machine.
if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
    os.environ.setdefault("NUMBA_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

from mgs.atomic import json_text, refuse_overlap
from mgs.cli_support import apply_overrides, bool_arg, count_arg, run_command, run_inputs
from mgs.config import check_config, yaml_section
from mgs.configure import add_parser as add_configure
from mgs.errors import MgsError
from mgs.export import add_parser as add_export
from mgs.gsplat_build import add_parser as add_gsplat_build
from mgs.plan.show import add_parser as add_plan
from mgs.preflight import add_parser as add_preflight
from mgs.view import add_parser as add_view

log = logging.getLogger("mgs")


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if not sys.stderr.isatty():  # a job's log file: plain lines, and rich stays unimported
        logging.basicConfig(level=level, format="[%(asctime)s] %(levelname)s %(message)s",
                            datefmt="%X")
        return
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, markup=False)])


def _add_synth(sub) -> None:
    from mgs.synthetic import SyntheticConfig

    p = sub.add_parser("synth", help="render the embedded synthetic aerial city as a scene folder")
    p.add_argument("out", help="scene folder to write (images/, sparse/0/, scene.json)")
    p.add_argument("--config", help="YAML file; keys under 'synthetic:' override the defaults")
    for f in dataclasses.fields(SyntheticConfig):
        kind = bool_arg if f.type in (bool, "bool") else type(f.default)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                       help=f"(default {f.default})")
    p.set_defaults(func=_run_synth)


def _run_synth(args) -> None:
    from mgs.synthetic import SyntheticConfig, make_synthetic_scene

    values = yaml_section(args.config, "synthetic") if args.config else {}
    values = check_config(SyntheticConfig, values, "synthetic", args.config or "command line")
    apply_overrides(values, args, [f.name for f in dataclasses.fields(SyntheticConfig)],
                    "synthetic")
    scene = make_synthetic_scene(args.out, SyntheticConfig(**values))
    log.info("wrote %s: %d views (%d test), %d points", args.out, len(scene.cameras),
             len(scene.test_names), len(scene.points_xyz))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model on a whole scene (single block)")
    p.add_argument("--scene", required=True, help="scene folder (scene.json, sparse/0, images)")
    p.add_argument("--out", required=True,
                   help="output folder (checkpoint.pt, history.tsv, summary.json)")
    p.add_argument("--config", help="YAML file; keys under 'train:' override the paper defaults")
    p.add_argument("--iterations", type=int, help="override the number of training steps")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (same result as an uninterrupted run)")
    p.add_argument("--work", help="folder for the periodic checkpoints, continued from when one "
                                  "is there; OUT/checkpoint.pt is written once training ends")
    p.set_defaults(func=_run_train)


def _run_train(args) -> None:
    from mgs.config import TrainConfig
    from mgs.training_loop import train_scene

    values = yaml_section(args.config, "train") if args.config else {}
    values = check_config(TrainConfig, values, "train", args.config or "command line")
    apply_overrides(values, args, ("iterations", "device"), "train")
    config = TrainConfig.from_dict(values, source=args.config or "command line")
    refuse_overlap(args.out, {"scene folder": args.scene, "config file": args.config})
    summary = train_scene(args.scene, args.out, config, resume=args.resume, work_dir=args.work)
    print(json_text(summary), end="")


def _add_sfm(sub) -> None:
    p = sub.add_parser("sfm", help="structure from motion on a folder of photos (pycolmap), "
                                   "written as an oriented, undistorted scene folder")
    p.add_argument("image_dir", help="folder of photos (sub-folders included)")
    p.add_argument("out", help="scene folder to write (images/, sparse/0/, sfm.json, scene.json)")
    p.add_argument("--config", help="YAML file; keys under 'sfm:' override the defaults "
                                     "(the options below override the file)")
    p.add_argument("--matching", choices=("exhaustive", "sequential", "spatial"),
                   help="image pairs to match; spatial uses EXIF GPS (default exhaustive)")
    p.add_argument("--min-registered", type=float,
                   help="fail if fewer than this fraction of images register (default 0.8)")
    p.add_argument("--max-image-size", type=int,
                   help="longest side for feature extraction, -1 = full size (default 3200)")
    p.add_argument("--max-features", type=int, help="SIFT features per image (default 8192)")
    p.add_argument("--threads", type=int, help="CPU threads (default all)")
    p.set_defaults(func=_run_sfm)


def _run_sfm(args) -> None:
    from mgs.ingest.sfm import SfmConfig, run_sfm

    values = yaml_section(args.config, "sfm") if args.config else {}
    values = check_config(SfmConfig, values, "sfm", args.config or "command line")
    apply_overrides(values, args, ("matching", "min_registered", "max_image_size", "max_features",
                             "threads"), "sfm")
    config = SfmConfig(**values)
    scene = run_sfm(args.image_dir, args.out, config)
    log.info("wrote %s: %d cameras (%d test), %d points", args.out, len(scene.cameras),
             len(scene.test_names), len(scene.points_xyz))


def _add_ingest(sub) -> None:
    p = sub.add_parser("ingest", help="convert a paper dataset layout, a COLMAP model or a "
                                      "transforms.json capture into a scene folder (images "
                                      "downsampled once; a capture's OpenCV or fisheye lens "
                                      "undistorted to PINHOLE)")
    p.add_argument("dataset", choices=("mill19", "urbanscene3d", "matrixcity", "colmap",
                                       "transforms"))
    p.add_argument("src", help="dataset folder, e.g. data/mill19/rubble-pixsfm (transforms: the "
                               "folder of transforms.json, or the json)")
    p.add_argument("out", help="scene folder to write")
    p.add_argument("--factor", type=int, default=None,
                   help="downsampling factor (default 4 for mill19/urbanscene3d, else 1)")
    p.add_argument("--width", type=int, default=None,
                   help="resize wider images to this width (MatrixCity: default 1600)")
    p.add_argument("--up", default=None,
                   help="up axis: auto (from the cameras), x|y|z (sign from the cameras), "
                        "+x … -z; default y for mill19/urbanscene3d, z for matrixcity, else auto")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args) -> None:
    from mgs.ingest.datasets import ingest

    scene = ingest(args.dataset, args.src, args.out, factor=args.factor, width=args.width,
                   up=args.up)
    log.info("wrote %s: %d train / %d test cameras, %d points", args.out,
             len(scene.train_names), len(scene.test_names), len(scene.points_xyz))


def _add_block_verbs(sub) -> None:
    """Momentum-GS block training: init, train-block, sync, finalize-block, merge."""

    def add(name, func, help_text, *extra):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--run", required=True,
                       help="run folder (scene/, partition/partition.json, rounds/, final/)")
        p.add_argument("--config", help="YAML with train: and momentum: sections "
                                         "(default RUN/config.yaml)")
        for flag, kwargs in extra:
            p.add_argument(flag, **kwargs)
        p.set_defaults(func=func)

    block = ("--block", dict(type=int, required=True, help="block index"))
    round_ = ("--round", dict(type=int, required=True, help="round number (1-based)"))
    add("init", _run_init, "round 0: per-block anchors and one random shared decoder")
    add("train-block", _run_train_block, "train one block for one round", round_, block)
    add("sync", _run_sync, "average the students, update the teacher and the block weights",
        round_)
    add("finalize-block", _run_finalize, "fine-tune one block's anchors with the decoder frozen",
        block)
    add("merge", _run_merge, "crop blocks to their cells, merge, export PLYs",
        ("--out", dict(help="model folder (default RUN/model)")),
        ("--sh-degree", dict(type=int, choices=range(4), default=None,
                             help="spherical-harmonics degree of splats.ply's colours, fitted to "
                                  "the decoder over the training views (default: the run "
                                  "config's export.sh_degree, 1)")),
        ("--refine-steps", dict(type=int, default=None,
                                help="steps fitting splats.ply to the training views after "
                                     "the bake (default: the run config's "
                                     "export.refine_steps, 600; 0: bake only)")),
        ("--photo-weight", dict(type=float, default=None,
                                help="what the refinement fits: 1 the training photos, 0 the "
                                     "model's renders, between a blend (default: the run "
                                     "config's export.photo_weight, 1)")))


def _open_run(args):
    from mgs.blocks import Run

    return Run.open(args.run, args.config)


def _run_init(args) -> None:
    from mgs.blocks import init_blocks

    log.info("initialised %d blocks", init_blocks(_open_run(args)))


def _run_train_block(args) -> None:
    from mgs.blocks import train_block

    train_block(_open_run(args), args.round, args.block)


def _run_sync(args) -> None:
    from mgs.blocks import sync_round

    sync_round(_open_run(args), args.round)


def _run_finalize(args) -> None:
    from mgs.blocks import finalize_block

    finalize_block(_open_run(args), args.block)


def _run_merge(args) -> None:
    from mgs.merge import merge_blocks

    run = _open_run(args)
    out = args.out or run.root / "model"
    refuse_overlap(out, run_inputs(run.root, args.config), "model folder", ("run folder",))
    export = {}  # the flags given, each checked like its config key
    apply_overrides(export, args, ("refine_steps", "photo_weight"), "export")
    merge_blocks(run, out, args.sh_degree, export.get("refine_steps"), export.get("photo_weight"))


def _add_partition(sub) -> None:
    p = sub.add_parser("partition", help="split a scene into blocks (contracted-space grid) and "
                                         "assign cameras to them")
    p.add_argument("--scene", required=True, help="scene folder (scene.json, sparse/0, images)")
    p.add_argument("--out", required=True,
                   help="output folder (partition.json, partition.tsv, partition.png)")
    p.add_argument("--config", help="YAML file; keys under 'partition:' override the defaults")
    p.add_argument("--block-dim", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="cells along world x, y, z (default 2 2 1)")
    p.add_argument("--aabb", nargs="+", metavar="V",
                   help="auto | scene | x0 y0 z0 x1 y1 z1 (default auto: from the cameras)")
    p.add_argument("--assignment", choices=("center", "projection", "ssim"),
                   help="camera-to-block test besides the camera centre (default projection)")
    p.add_argument("--threshold", type=float,
                   help="visibility threshold (default 0.08 for projection, 0.05 for ssim)")
    p.add_argument("--min-cameras", type=int, help="merge blocks with fewer cameras (default 5)")
    p.add_argument("--margin", help="anchor region beyond a cell, in cell sizes; all = every "
                   "anchor the block's cameras see (official); inf = the whole scene")
    p.add_argument("--coarse", help="checkpoint of a whole-scene `mgs train` run (for ssim)")
    p.set_defaults(func=_run_partition)


def _run_partition(args) -> None:
    from mgs.partition import PartitionConfig, partition_scene

    values = yaml_section(args.config, "partition") if args.config else {}
    values = check_config(PartitionConfig, values, "partition", args.config or "command line")
    if args.aabb is not None:
        values["aabb"] = args.aabb[0] if len(args.aabb) == 1 else args.aabb  # checked by the config
    if args.margin is not None:
        try:  # a number (inf included) or a word (all), checked by the config
            values["margin"] = float(args.margin)
        except ValueError:
            values["margin"] = args.margin
    apply_overrides(values, args, ("block_dim", "assignment", "threshold", "min_cameras", "coarse"),
              "partition")
    config = PartitionConfig.from_dict(values, source=args.config or "command line")
    refuse_overlap(args.out, {"scene folder": args.scene, "config file": args.config,
                              "coarse checkpoint": config.coarse})
    partition = partition_scene(args.scene, args.out, config)
    log.info("wrote %s: %d blocks", args.out, partition.num_blocks)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="render the merged model's test views; PSNR, SSIM, LPIPS "
                                        "(raw and colour-corrected), FPS, peak memory")
    p.add_argument("--run", required=True,
                   help="run folder (scene/, model/decoder.pt, config.yaml)")
    p.add_argument("--config", help="YAML with train: and momentum: sections "
                                     "(default RUN/config.yaml)")
    p.add_argument("--out", help="output folder (default RUN/eval)")
    p.add_argument("--backend", help="auto | torch | gsplat (default: the config's train.backend)")
    p.add_argument("--device",
                   help="auto | cpu | cuda | cuda:N (default: the config's train.device)")
    p.add_argument("--lpips-input", choices=("[0,1]", "[-1,1]"), default="[0,1]",
                   help="range of the images fed to LPIPS: [0,1] as the official Momentum-GS "
                        "metrics (default, comparable with the paper) or [-1,1] as the lpips "
                        "package documents")
    p.add_argument("--warmup", type=count_arg, default=3,
                   help="untimed renders before timing (default 3)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> None:
    from mgs.evaluate import evaluate_run

    if args.out is not None:
        refuse_overlap(args.out, dict(run_inputs(Path(args.run), args.config),
                                      **{"model folder": Path(args.run) / "model"}),
                       equal_only=("run folder",))
    metrics = evaluate_run(args.run, args.config, args.out, backend=args.backend,
                           device=args.device, lpips_input=args.lpips_input, warmup=args.warmup)
    print(json_text(metrics["metrics"]), end="")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="tables and figures for every evaluated run under a folder "
                                      "(Markdown and self-contained HTML)")
    where = p.add_mutually_exclusive_group()  # one of them, unless --scaling alone
    where.add_argument("--results",
                       help="folder searched for run folders (any folder with eval/metrics.json)")
    where.add_argument("--runs", nargs="+", metavar="RUN",
                       help="exactly these run folders (the workflow passes its scenes')")
    p.add_argument("--out", required=True, help="report folder (report.md, report.html, *.png)")
    p.add_argument("--paper-tables", help="CSV of the paper's numbers (default: the copy shipped "
                                          "with mgs, Momentum-GS arXiv 2412.04887v2)")
    p.add_argument("--ablation", help="summary.csv of benchmarks/ablation.py: the multi-seed "
                                      "ablation beside the paper's Table 5")
    p.add_argument("--scaling", help="scaling.csv of benchmarks/scaling.py: cost per stage as "
                                     "the city grows, fitted exponents and a log-log figure")
    p.set_defaults(func=_run_report)


def _run_report(args) -> None:
    from mgs.report import make_report

    if args.results is None and args.runs is None and args.scaling is None:
        raise MgsError("mgs report needs --results DIR or --runs RUN ... (or --scaling CSV)")
    # the report folder may sit inside the results folder it scans (results/report): the scan
    # skips it; it must never be, or lie inside, a run or the paper tables
    refuse_overlap(args.out, {"results folder": args.results,
                              "paper tables file": args.paper_tables,
                              "scaling table": args.scaling,
                              **{f"run folder {run}": run for run in args.runs or []}},
                   "report folder", equal_only=("results folder",))
    path = make_report(args.results, args.out, args.paper_tables, args.ablation, args.runs,
                       args.scaling)
    log.info("wrote %s", path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgs", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors (also MGS_DEBUG=1)")
    sub = parser.add_subparsers(dest="verb", required=True)
    add_configure(sub)
    _add_synth(sub)
    _add_train(sub)
    _add_sfm(sub)
    _add_ingest(sub)
    _add_partition(sub)
    _add_block_verbs(sub)
    _add_evaluate(sub)
    _add_report(sub)
    add_preflight(sub)
    add_view(sub)
    add_export(sub)
    add_plan(sub)
    add_gsplat_build(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    debug = args.debug or os.environ.get("MGS_DEBUG", "") not in ("", "0")
    return run_command(args, debug)


if __name__ == "__main__":
    sys.exit(main())
