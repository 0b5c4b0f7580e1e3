"""`mgs export`: the merged model in a compressed layout that web viewers load, and what it costs.

Format ``splat`` (file ``.splat``, see mgs.splat for the byte layout): the headerless
32-bytes-per-Gaussian layout of the antimatter15/splat WebGL viewer, read by most web 3DGS viewers.

`mgs export RUN` reads ``RUN/model/splats.ply`` (written by `mgs merge`), writes
``RUN/model/splats.splat`` and measures it in ``RUN/model/export.csv``: bytes of both files, and
the PSNR of the test views rendered from each (against the ground truth, and the compressed
file's renders against the PLY's).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mgs.atomic import atomic_path, ensure_writable_dir
from mgs.errors import InputError

log = logging.getLogger("mgs.export")

FORMATS = ("splat",)
SUFFIXES = {"splat": ".splat"}
EXPORT_CSV = "export.csv"


def _codec(fmt: str):
    """(writer, reader) of a format; imported on use, so `mgs --help` stays fast."""
    from mgs.splat import read_splat, write_splat

    return {"splat": (write_splat, read_splat)}[fmt]


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
    write(gaussians, target)
    row = {"format": fmt, "file": target.name, "gaussians": len(gaussians["means"]),
           "ply_bytes": ply.stat().st_size, "bytes": target.stat().st_size}
    row["compression"] = row["ply_bytes"] / row["bytes"]
    log.info("%s: %d Gaussians, %d bytes (splats.ply: %d bytes, %.1f× smaller)", target,
             row["gaussians"], row["bytes"], row["ply_bytes"], row["compression"])
    if measure:
        row.update(compare_renders(run_dir, gaussians, read(target)))
        with atomic_path(target.parent / EXPORT_CSV) as tmp:
            pd.DataFrame([row]).to_csv(tmp, index=False, float_format="%.6g")
    return row


def compare_renders(run_dir: Path, reference: dict, decoded: dict) -> dict:
    """Mean PSNR over the run's test views: each model against the ground truth, and the decoded
    one against the reference's render."""
    import numpy as np
    import torch

    from mgs.blocks import Run
    from mgs.device import resolve_device
    from mgs.metrics import psnr
    from mgs.render import render
    from mgs.scene import load_image
    from tqdm import tqdm

    run = Run.open(run_dir)
    scene, factor = run.scene(), run.train.resolution
    device = resolve_device(run.train.device)
    background = torch.tensor(run.train.background, dtype=torch.float32, device=device)
    models = [{k: v.to(device) for k, v in g.items()} for g in (reference, decoded)]
    scores = {"psnr_ply_gt": [], "psnr_export_gt": [], "psnr_export_ply": []}
    cameras = scene.test_cameras()
    if not cameras:
        raise InputError(f"scene {scene.scene_dir} has no test views to measure the export on")
    with torch.no_grad():  # measuring only
        for camera in tqdm(cameras, desc="export: rendering test views", unit="view",
                           mininterval=2.0):
            cam = camera.scaled(factor)
            viewmat = torch.tensor(cam.world_to_camera, dtype=torch.float32, device=device)
            K = torch.tensor(cam.K, dtype=torch.float32, device=device)
            ply_image, export_image = (render(m["means"], m["quats"], m["scales"], m["opacities"],
                                              m["colors"], viewmat, K, cam.width, cam.height,
                                              background=background, backend=run.train.backend)
                                       .image.clamp(0, 1) for m in models)
            gt = load_image(camera, factor, scene.scene_dir, background.tolist()).to(device)
            scores["psnr_ply_gt"].append(float(psnr(ply_image, gt)))
            scores["psnr_export_gt"].append(float(psnr(export_image, gt)))
            scores["psnr_export_ply"].append(float(psnr(export_image, ply_image)))
    result = {name: float(np.mean(values)) for name, values in scores.items()}
    result["test_views"] = len(cameras)
    log.info("test views: PSNR %.2f dB (PLY) / %.2f dB (export) against the ground truth; "
             "export vs PLY %.2f dB", result["psnr_ply_gt"], result["psnr_export_gt"],
             result["psnr_export_ply"])
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
             "Bytes of model/splats.ply and of the compressed file (`mgs export`), and the mean "
             "PSNR (dB) of the test views rendered from each: against the ground truth, and the "
             "compressed file's renders against the PLY's.", "table", table)]


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write the merged model (model/splats.ply) in a compressed "
                                      "layout web viewers load, and measure its size and PSNR")
    p.add_argument("run", help="run folder (with model/splats.ply from `mgs merge`)")
    p.add_argument("--format", default="splat", choices=FORMATS,
                   help="splat: 32 bytes per Gaussian (the antimatter15/splat viewer layout)")
    p.add_argument("--out", default=None, help="file to write (default RUN/model/splats.splat)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip rendering the test views (no export.csv)")
    p.set_defaults(func=lambda args: export_run(args.run, args.format, args.out, args.measure))
