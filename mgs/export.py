"""`mgs export`: the merged model in a compressed layout that web viewers load, and what it costs.

Format ``splat`` (file ``.splat``, see mgs.splat for the byte layout): the headerless
32-bytes-per-Gaussian layout of the antimatter15/splat WebGL viewer, read by most web 3DGS viewers;
one colour per Gaussian, the PLY's SH averaged over the training views that see it. Format
``spz`` (file ``.spz``, see mgs.spz): Niantic's gzip-compressed quantised layout, with the PLY's
spherical harmonics.

`mgs export RUN` reads ``RUN/model/splats.ply`` (written by `mgs merge`), writes
``RUN/model/splats.splat`` and measures it in ``RUN/model/export.csv``: bytes of both files, the
PLY's SH degree, and the PSNR of the test views rendered from each against the ground truth (the
PLY with its SH evaluated per view, as 3DGS viewers do), beside the merged model's own
(``model/decoder.pt``, the latent `train.appearance_eval` picks), and the compressed file's
renders against the PLY's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mgs.atomic import atomic_path, ensure_writable_dir
from mgs.errors import InputError

log = logging.getLogger("mgs.export")

FORMATS = ("splat", "spz")
SUFFIXES = {"splat": ".splat", "spz": ".spz"}
EXPORT_CSV = "export.csv"


def _codec(fmt: str):
    """(writer, reader) of a format; imported on use, so `mgs --help` stays fast."""
    if fmt == "spz":
        from mgs.spz import read_spz, write_spz

        return write_spz, read_spz
    from mgs.splat import read_splat, write_splat

    return write_splat, read_splat


def export_run(run_dir: str | Path, fmt: str = "splat", out: str | Path | None = None,
               measure: bool = True) -> dict:
    """RUN/model/splats.ply → the compressed file (default RUN/model/splats.<fmt>); with
    `measure`, sizes and test-view PSNRs go to export.csv beside it. Returns that row."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    ply = run_dir / "model" / "splats.ply"
    if not ply.is_file():
        raise InputError(f"{ply} does not exist; run `mgs merge --run {run_dir}` first")
    import pandas as pd

    from mgs.merge import read_splats

    write, read = _codec(fmt)
    target = Path(out) if out else ply.with_suffix(SUFFIXES[fmt])
    ensure_writable_dir(target.parent)
    gaussians = read_splats(ply)
    if fmt == "splat" and gaussians["sh"].shape[1] > 1:
        gaussians = dict(gaussians, colors=_training_view_colors(run_dir, gaussians))
    write(gaussians, target)
    row = {"format": fmt, "file": target.name, "gaussians": len(gaussians["means"]),
           "sh_degree": int(round(gaussians["sh"].shape[1] ** 0.5)) - 1,
           "ply_bytes": ply.stat().st_size, "bytes": target.stat().st_size}
    row["compression"] = row["ply_bytes"] / row["bytes"]
    log.info("%s: %d Gaussians, %d bytes (splats.ply: %d bytes, %.1f× smaller)", target,
             row["gaussians"], row["bytes"], row["ply_bytes"], row["compression"])
    if measure:
        row.update(compare_renders(run_dir, gaussians, read(target)))
        table = target.parent / EXPORT_CSV
        rows = [row]
        if table.is_file():  # one row per format: this one replaces its own
            previous = pd.read_csv(table)
            if {"format", "file"} <= set(previous.columns):
                keep = (previous["format"] != fmt) & (previous["file"] != target.name)
                rows = previous[keep].to_dict("records") + rows
        with atomic_path(table) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    return row


def _training_view_colors(run_dir: Path, gaussians: dict):
    """The PLY's SH colours averaged over the training cameras: the .splat's one colour."""
    from mgs.blocks import Run
    from mgs.sh import FitCameras, mean_view_colors

    try:
        run = Run.open(run_dir)
        cameras = [c.scaled(run.train.resolution) for c in run.scene().train_cameras()]
    except InputError as exc:  # a PLY without its run: the DC colour alone
        log.warning("no training cameras to average the SH colours over (%s); the .splat "
                    "keeps the degree-0 term", exc)
        return gaussians["colors"]
    return mean_view_colors(gaussians["sh"], gaussians["means"], FitCameras(cameras))


def compare_renders(run_dir: Path, reference: dict, decoded: dict) -> dict:
    """Mean PSNR over the run's test views against the ground truth: the merged model's own
    render (when model/decoder.pt exists), the PLY's (`reference`, SH evaluated per view) and the
    decoded file's; and the decoded file's render against the PLY's."""
    import numpy as np
    import torch

    from mgs.blocks import Run
    from mgs.device import resolve_device
    from mgs.merge import load_model, model_to, render_model, render_splats
    from mgs.metrics import psnr
    from mgs.render import render
    from mgs.scene import load_image
    from tqdm import tqdm

    run = Run.open(run_dir)
    scene, factor = run.scene(), run.train.resolution
    device = resolve_device(run.train.device)
    background = torch.tensor(run.train.background, dtype=torch.float32, device=device)
    ply, export = ({k: v.to(device) for k, v in g.items()} for g in (reference, decoded))
    native_path = Path(run_dir) / "model" / "decoder.pt"
    native = model_to(load_model(native_path), device) if native_path.is_file() else None
    scores = {"psnr_model_gt": [], "psnr_ply_gt": [], "psnr_export_gt": [], "psnr_export_ply": []}
    cameras = scene.test_cameras()
    if not cameras:
        raise InputError(f"scene {scene.scene_dir} has no test views to measure the export on")
    with torch.no_grad():  # measuring only
        for camera in tqdm(cameras, desc="export: rendering test views", unit="view",
                           mininterval=2.0):
            cam = camera.scaled(factor)
            view = dict(viewmat=torch.tensor(cam.world_to_camera, dtype=torch.float32,
                                             device=device),
                        K=torch.tensor(cam.K, dtype=torch.float32, device=device),
                        width=cam.width, height=cam.height, background=background,
                        backend=run.train.backend)
            ply_image = render_splats(ply, **view).image.clamp(0, 1)
            export_image = (render_splats(export, **view) if "sh" in export else
                            render(export["means"], export["quats"], export["scales"],
                                   export["opacities"], export["colors"], **view)).image.clamp(0, 1)
            gt = load_image(camera, factor, scene.scene_dir, background.tolist()).to(device)
            if native is not None:
                row = (native.appearance.choose(torch.as_tensor(camera.center),
                                                run.train.appearance_eval)
                       if native.appearance is not None else None)
                image = render_model(native, appearance_row=row, **view).image.clamp(0, 1)
                scores["psnr_model_gt"].append(float(psnr(image, gt)))
            scores["psnr_ply_gt"].append(float(psnr(ply_image, gt)))
            scores["psnr_export_gt"].append(float(psnr(export_image, gt)))
            scores["psnr_export_ply"].append(float(psnr(export_image, ply_image)))
    result = {name: float(np.mean(values)) if values else float("nan")
              for name, values in scores.items()}
    result["test_views"] = len(cameras)
    log.info("test views: PSNR %.2f dB (model) / %.2f dB (PLY) / %.2f dB (export) against the "
             "ground truth; export vs PLY %.2f dB", result["psnr_model_gt"],
             result["psnr_ply_gt"], result["psnr_export_gt"], result["psnr_export_ply"])
    return result


def report_sections(run_id: str, root: Path, out: Path) -> list:
    """The size/quality table of RUN/model/export.csv, when the run has one."""
    import pandas as pd

    path = Path(root) / "model" / EXPORT_CSV
    if not path.is_file():
        return []
    table = pd.read_csv(path)
    table.insert(0, "run", run_id)
    return [(f"Compressed export: {run_id}",
             "Bytes of model/splats.ply (its colours as spherical harmonics of degree sh_degree) "
             "and of the compressed file (`mgs export`), and the mean PSNR (dB) of the test "
             "views against the ground truth: psnr_model_gt the merged model itself, "
             "psnr_ply_gt the PLY as a 3DGS viewer renders it, psnr_export_gt the compressed "
             "file; psnr_export_ply its renders against the PLY's.", "table", table)]


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write the merged model (model/splats.ply) in a compressed "
                                      "layout web viewers load, and measure its size and PSNR")
    p.add_argument("run", help="run folder (with model/splats.ply from `mgs merge`)")
    p.add_argument("--format", default="splat", choices=FORMATS,
                   help="splat: 32 bytes per Gaussian, degree-0 colour (the antimatter15/splat "
                        "viewer layout); spz: Niantic's compressed format with the PLY's "
                        "spherical harmonics (needs the spz extra: gsply)")
    p.add_argument("--out", default=None,
                   help="file to write (default RUN/model/splats.splat or splats.spz)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip rendering the test views (no export.csv)")
    p.set_defaults(func=lambda args: export_run(args.run, args.format, args.out, args.measure))
