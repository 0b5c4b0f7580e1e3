"""The CUDA path on a real GPU: trainer, densification statistics, resume, evaluation, empty and
faint inputs, device choice. Every test is marked `cuda` (skipped without a GPU, see conftest);
benchmarks/gpu_check.sh runs them. Tests that need gsplat itself skip with the reason gsplat
gave, except `test_gsplat_renders_on_this_gpu`, which fails with it."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import yaml

from mgs.config import TrainConfig
from mgs.model import Decoder
from mgs.render import render
from mgs.render.gsplat_backend import gsplat_problem
from mgs.render.reference import random_scene
from mgs.scene import load_scene
from mgs.train import Trainer, load_views, spatial_lr_scale
from mgs.training_loop import CHECKPOINT_NAME, initial_anchors, train_scene

pytestmark = pytest.mark.cuda

PARAMS = ("means", "quats", "scales", "opacities", "colors")
SMALL = dict(iterations=40, lr_max_steps=20, voxel_size=0.05, start_stat=5, update_from=5,
             update_interval=10, update_until=30, eval_interval=20, checkpoint_interval=20)


def _needs_gsplat():
    problem = gsplat_problem("cuda") if torch.cuda.is_available() else "no GPU"
    if problem:
        pytest.skip(f"gsplat cannot render here: {problem}")


def test_gsplat_renders_on_this_gpu():
    """The first thing a GPU run needs; the message says what is missing (nvcc, arch, ...)."""
    assert gsplat_problem("cuda") is None, gsplat_problem("cuda")


# ---------------------------------------------------------------- render edge cases

def _faint_scene(n=3000, seed=9):
    """Opacities log-uniform from 0.3/255 to 1: many within a few percent of 1/255."""
    scene = random_scene(n, 96, 64, seed=seed, device="cuda")
    gen = torch.Generator().manual_seed(seed)
    scene["opacities"] = torch.exp(torch.empty(n).uniform_(math.log(0.3 / 255), 0.0, generator=gen)).cuda()
    return scene


def test_opacities_around_the_threshold_give_the_same_rendered_set():
    _needs_gsplat()
    scene = _faint_scene()
    ours = render(**scene, backend="torch")
    theirs = render(**scene, backend="gsplat")
    differ = (ours.radii != theirs.radii).sum().item()
    assert differ <= 0.005 * scene["means"].shape[0], differ  # only float rounding at ceil edges
    assert ((ours.radii > 0) != (theirs.radii > 0)).sum().item() <= 3
    assert (ours.radii == 0).sum() > 200  # the faint ones are culled by both
    torch.testing.assert_close(ours.image, theirs.image, atol=1e-3, rtol=0)


def test_culled_entries_are_zero_and_finite():
    _needs_gsplat()
    scene = _faint_scene(seed=4)
    scene["means"][::2] = -scene["means"][::2]  # half behind the camera too
    poison = torch.full((1 << 24,), float("nan"), device="cuda")
    del poison  # the caching allocator hands this NaN memory to gsplat's outputs next
    out = render(**scene, backend="gsplat")
    culled = out.radii == 0
    assert culled.sum() > 1000
    assert torch.isfinite(out.means2d).all() and torch.isfinite(out.depths).all()
    assert (out.means2d[culled] == 0).all() and (out.depths[culled] == 0).all()


@pytest.mark.parametrize("backend", ["gsplat", "auto", "torch"])
def test_zero_gaussians_on_cuda_render_the_background(backend):
    """In a child process: reaching gsplat's kernel with N = 0 is a SIGFPE, not an exception."""
    if backend == "gsplat":
        _needs_gsplat()
    code = f"""
import torch
from mgs.render import render
from mgs.render.reference import random_scene
scene = random_scene(0, 20, 12, device="cuda")
leaves = {{k: scene[k].clone().requires_grad_() for k in {PARAMS!r}}}
bg = torch.tensor([0.2, 0.5, 0.7], device="cuda")
out = render(**{{**scene, **leaves}}, background=bg, backend={backend!r})
out.image.mean().backward()
assert torch.equal(out.image, bg.expand(12, 20, 3)) and out.radii.shape == (0,)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])


# ---------------------------------------------------------------- trainer and densification

FROZEN = {name: 0.0 for name in (
    "offset_lr_init", "offset_lr_final", "feature_lr", "scaling_lr", "mlp_opacity_lr_init",
    "mlp_opacity_lr_final", "mlp_cov_lr_init", "mlp_cov_lr_final", "mlp_color_lr_init",
    "mlp_color_lr_final")}


def _trainer(scene_dir, device, backend):
    """Learning rates 0: the model stays fixed, so CPU and GPU statistics differ only by what
    each backend calls rendered and its gradients (not by diverging trajectories)."""
    config = TrainConfig.from_dict({**SMALL, **FROZEN, "device": str(device), "backend": backend,
                                    "start_stat": 0, "update_from": 1000, "update_until": 1001})
    scene = load_scene(scene_dir)
    views = load_views(scene.train_cameras(), config.resolution, scene.scene_dir, torch.device(device))
    torch.manual_seed(config.seed)
    anchors = initial_anchors(scene, config)
    decoder = Decoder(config.feat_dim, config.n_offsets)
    return Trainer(anchors, decoder, config, views, spatial_lr_scale(scene.train_cameras()),
                   torch.device(device))


def _statistics(trainer, steps):
    for _ in range(steps):
        trainer.train_step()
    state = trainer.densify
    return state.grad_count.cpu(), state.grad_accum.cpu(), state.opacity_accum.cpu()


def test_densify_statistics_on_gpu_equal_the_cpu_run(tiny_scene):
    """Same scene, same seed, same 6 views: counts of "rendered" and summed gradients agree with
    the CPU run (before the one definition of rendered, gsplat counted fewer and averaged higher)."""
    _needs_gsplat()
    cpu = _statistics(_trainer(tiny_scene, "cpu", "torch"), 6)
    for backend in ("gsplat", "torch"):
        count, accum, opacity = _statistics(_trainer(tiny_scene, "cuda", backend), 6)
        assert cpu[0].sum() > 1000
        assert (count - cpu[0]).abs().sum() <= 0.002 * cpu[0].sum(), backend
        assert (count != cpu[0]).float().mean() <= 0.01, backend
        assert abs(accum.sum() / cpu[1].sum() - 1) < 0.02, backend
        torch.testing.assert_close(opacity, cpu[2], rtol=1e-3, atol=1e-3, msg=backend)
        mean_gpu = accum.sum() / count.sum()
        mean_cpu = cpu[1].sum() / cpu[0].sum()
        assert abs(mean_gpu / mean_cpu - 1) < 0.02, backend


def test_train_scene_runs_on_cuda(tiny_scene, tmp_path):
    summary = train_scene(tiny_scene, tmp_path, TrainConfig.from_dict({**SMALL, "device": "cuda"}))
    assert summary["device"].startswith("cuda:") and summary["step"] == 40
    assert math.isfinite(summary["test_psnr"])


def test_resume_on_cuda(tiny_scene, tmp_path):
    """The checkpoint's RNG state must reach the CPU generator (map_location=cuda broke it)."""
    config = TrainConfig.from_dict({**SMALL, "device": "cuda"})
    straight = train_scene(tiny_scene, tmp_path / "straight", config)
    train_scene(tiny_scene, tmp_path / "resumed", config, stop_after=20)
    resumed = train_scene(tiny_scene, tmp_path / "resumed", config, resume=True)
    assert resumed["step"] == straight["step"] == 40
    # gsplat's backward sums with atomics: close, not bitwise
    assert abs(resumed["test_psnr"] - straight["test_psnr"]) < 0.5
    state = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert [row["step"] for row in state["history"]] == [0, 20, 40]


# ---------------------------------------------------------------- evaluation and device

def test_evaluate_on_cuda_matches_cpu(tiny_scene, tmp_path):
    from mgs.blocks import Run, train_all
    from mgs.evaluate import evaluate_run
    from mgs.lpips import _cached, get_lpips
    from mgs.partition import PartitionConfig, partition_scene

    root = tmp_path / "results" / "tiny"
    root.mkdir(parents=True)
    (root / "scene").symlink_to(tiny_scene)
    train = dict(SMALL, iterations=10, lr_max_steps=5, start_stat=2, update_from=2,
                 update_interval=2, update_until=6, eval_interval=2, checkpoint_interval=4,
                 device="cuda")
    momentum = dict(mode="full", rounds=2, iterations_per_round=4, final_iterations=2)
    (root / "config.yaml").write_text(yaml.safe_dump({"train": train, "momentum": momentum}))
    partition_scene(root / "scene", root / "partition",
                    PartitionConfig(block_dim=[2, 1, 1], assignment="center", min_cameras=2))
    train_all(Run.open(root))  # blocks, rounds and merge on the GPU
    on_cpu = evaluate_run(root, out_dir=tmp_path / "cpu", device="cpu", backend="torch", warmup=0)
    _cached.cache_clear()
    on_gpu = evaluate_run(root, out_dir=tmp_path / "gpu", device="cuda", warmup=1)
    assert on_gpu["device"].startswith("cuda:")
    assert on_gpu["backend"] == ("gsplat" if gsplat_problem("cuda") is None else "torch")
    for metric in ("psnr", "ssim", "lpips_vgg"):
        assert on_gpu["metrics"][metric] == pytest.approx(on_cpu["metrics"][metric], rel=2e-3), metric
    loaded = _cached.cache_info().currsize
    assert get_lpips("vgg", "cuda") is get_lpips("vgg", "cuda:0")
    assert _cached.cache_info().currsize == loaded  # one network per GPU, not two


def test_resolve_device_names_and_selects_the_gpu(monkeypatch):
    from mgs.device import resolve_device

    monkeypatch.delenv("MGS_DEVICE", raising=False)
    before = torch.cuda.current_device()
    try:
        last = torch.cuda.device_count() - 1
        assert resolve_device(f"cuda:{last}") == torch.device("cuda", last)
        assert torch.cuda.current_device() == last
        assert resolve_device("cuda") == torch.device("cuda", last)
        with pytest.raises(Exception, match="sees"):
            resolve_device(f"cuda:{last + 1}")
    finally:
        torch.cuda.set_device(before)
