"""splats.ply against the merged model, per spherical-harmonics degree.

For a merged run (RUN/model/decoder.pt) it bakes splats.ply at SH degree 0, 1, 2, 3 into WORK
(the run is not touched), each over the training views alone and then refined (`--refine-steps`,
the merge's default) on the training photos, the model's renders or a blend (`--photo-weight`,
as `export.photo_weight`, the merge's default), and renders the test views from each as a 3DGS
viewer does (SH evaluated per view), beside the merged model itself (`train.appearance_eval`'s
latent). Two more rows bound what one viewpoint gives: ``centre``, everything decoded from the
training cameras' mean centre (one colour per Gaussian), and ``oracle``, those Gaussians coloured
per test view by the decoder itself. Prints and writes WORK/sh_export.csv: Gaussians, bytes,
seconds to bake, mean test PSNR against the ground truth and against the model's render.

    python benchmarks/sh_export.py RUN [--work WORK] [--degrees 0 1 2 3] [--refine-steps N]
                                       [--photo-weight W]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mgs.blocks import Run
from mgs.config import EXPORT_REFINE_STEPS, ExportConfig
from mgs.merge import (_latents, export_splats, load_model, read_splats, render_model,
                       render_splats)
from mgs.metrics import psnr
from mgs.model import decode_attributes, neural_gaussians
from mgs.render import render
from mgs.scene import load_image


def oracle_colors(model, view_center, camera_center):
    """The centre bake's Gaussians, coloured as the decoder colours them from `camera_center`."""
    colors = []
    for (anchors, decoder), latent in zip(model.groups(), _latents(model, None)):
        everything = torch.ones(anchors.count, dtype=torch.bool)
        kept = neural_gaussians(anchors, everything, decode_attributes(
            decoder, anchors, everything, view_center, latent)).selected
        seen = decode_attributes(decoder, anchors, everything, camera_center, latent)
        colors.append(seen.color[kept])
    return torch.cat(colors)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--work", default=None, help="folder for the PLYs (default RUN/sh_export)")
    parser.add_argument("--degrees", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--refine-steps", type=int, default=EXPORT_REFINE_STEPS,
                        help="each degree baked alone and then refined for this many steps")
    parser.add_argument("--photo-weight", type=float, default=ExportConfig().photo_weight,
                        help="what the refinement fits: 1 the training photos, 0 the model's "
                             "renders, between a blend (default: the merge's)")
    args = parser.parse_args()
    run = Run.open(args.run)
    work = Path(args.work or Path(args.run) / "sh_export")
    work.mkdir(parents=True, exist_ok=True)
    scene, factor = run.scene(), run.train.resolution
    model = load_model(Path(args.run) / "model" / "decoder.pt")
    originals = scene.train_cameras()
    train = [c.scaled(factor) for c in originals]
    centre = torch.as_tensor(np.mean([c.center for c in train], axis=0), dtype=torch.float32)
    background = torch.tensor(run.train.background, dtype=torch.float32)
    views = []
    for camera in scene.test_cameras():
        cam = camera.scaled(factor)
        view = dict(viewmat=torch.tensor(cam.world_to_camera, dtype=torch.float32),
                    K=torch.tensor(cam.K, dtype=torch.float32), width=cam.width,
                    height=cam.height, background=background)
        row = (model.appearance.choose(torch.as_tensor(camera.center), run.train.appearance_eval)
               if model.appearance is not None else None)
        native = render_model(model, appearance_row=row, **view).image.clamp(0, 1)
        gt = load_image(camera, factor, scene.scene_dir, background.tolist())
        views.append((camera, view, native, gt))
    rows = [{"ply": "model", "psnr_gt": np.mean([float(psnr(n, g)) for *_, n, g in views])}]

    def measure(name, path, seconds, colour_of=None):
        splats = read_splats(path)
        to_gt, to_model = [], []
        for camera, view, native, gt in views:
            if colour_of is None:
                image = render_splats(splats, **view).image
            else:
                colors = colour_of(torch.as_tensor(camera.center, dtype=torch.float32))
                image = render(splats["means"], splats["quats"], splats["scales"],
                               splats["opacities"], colors, **view).image
            to_gt.append(float(psnr(image.clamp(0, 1), gt)))
            to_model.append(float(psnr(image.clamp(0, 1), native)))
        rows.append({"ply": name, "gaussians": len(splats["means"]),
                     "bytes": path.stat().st_size, "bake_seconds": seconds,
                     "psnr_gt": np.mean(to_gt), "psnr_model": np.mean(to_model)})
        print(rows[-1], flush=True)

    start = time.perf_counter()
    export_splats(model, work / "centre.ply", centre)
    measure("centre", work / "centre.ply", time.perf_counter() - start)
    measure("oracle", work / "centre.ply", float("nan"),
            lambda camera: oracle_colors(model, centre, camera))
    for degree in args.degrees:
        for steps in dict.fromkeys([0, args.refine_steps]):
            name = f"sh{degree}" + (f"+refine{steps}" if steps else "")
            if steps and args.photo_weight != 1:
                name += f"+photos{args.photo_weight:g}"
            start = time.perf_counter()
            export_splats(model, work / f"{name}.ply", centre, train, degree, refine_steps=steps,
                          background=background, photo_weight=args.photo_weight,
                          photos=lambda i: load_image(originals[i], factor, scene.scene_dir,
                                                      background.tolist()))
            measure(name, work / f"{name}.ply", time.perf_counter() - start)
    table = pd.DataFrame(rows)
    table.to_csv(work / "sh_export.csv", index=False, float_format="%.4f")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
