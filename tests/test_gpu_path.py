"""The GPU path's decisions that can be checked without a GPU: gsplat availability (with a
simulated gsplat whose CUDA extension is missing), empty inputs, the one definition of
"rendered", device keys. The same paths on a real GPU: tests/test_cuda.py."""

from __future__ import annotations

import math
import sys
import types
import warnings

import pytest
import torch

import mgs.render.gsplat_backend as gb
from mgs.errors import MgsError
from mgs.render import render
from mgs.render.projection import RADIUS_SIGMAS, project_gaussians
from mgs.render.reference import random_scene

PARAMS = ("means", "quats", "scales", "opacities", "colors")


@pytest.fixture
def fresh_gsplat_check(monkeypatch):
    """Forget the per-process availability answer and the fallback warning (restored after)."""
    gb._gsplat_problem.cache_clear()
    monkeypatch.setattr(gb, "_fallback_warned", set())
    yield
    gb._gsplat_problem.cache_clear()


def _gsplat_without_extension(monkeypatch):
    """gsplat as the PyPI wheel leaves it without nvcc: it imports, its `_C` is None."""
    fake = types.ModuleType("gsplat.cuda._backend")
    fake._C = None
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", fake)


# ---------------------------------------------------------------- defect 1: availability

def test_auto_falls_back_to_torch_with_one_warning_when_the_extension_is_missing(
        monkeypatch, fresh_gsplat_check):
    pytest.importorskip("gsplat")
    _gsplat_without_extension(monkeypatch)
    with pytest.warns(RuntimeWarning, match="nvcc"):
        assert gb.choose_backend("auto", torch.device("cuda")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gb.choose_backend("auto", "cuda") == "torch"  # warned once per process
    assert gb.choose_backend("auto", "cpu") == "torch"


def test_explicit_gsplat_without_extension_names_what_is_missing(monkeypatch, fresh_gsplat_check):
    pytest.importorskip("gsplat")
    _gsplat_without_extension(monkeypatch)
    with pytest.raises(MgsError) as info:
        gb.choose_backend("gsplat", "cuda")
    message = str(info.value)
    assert "nvcc" in message and "prebuilt" in message and "backend 'torch'" in message


def test_an_extension_that_fails_to_load_is_reported(monkeypatch, fresh_gsplat_check):
    pytest.importorskip("gsplat")
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", None)  # import raises ImportError
    with pytest.raises(MgsError, match="failed to build or load.*TORCH_EXTENSIONS_DIR"):
        gb.choose_backend("gsplat", "cuda")


def test_availability_is_decided_once_per_process(monkeypatch, fresh_gsplat_check):
    pytest.importorskip("gsplat")
    _gsplat_without_extension(monkeypatch)
    first = gb.gsplat_problem("cuda")
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", None)  # would give another answer
    assert gb.gsplat_problem("cuda") == first


def test_gsplat_without_gsplat_installed_says_how_to_install(monkeypatch, fresh_gsplat_check):
    monkeypatch.setitem(sys.modules, "gsplat", None)
    assert "install gsplat==1.5.3" in gb.gsplat_problem("cuda")


def test_gsplat_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(MgsError, match="needs CUDA tensors"):
        render(**random_scene(5, 16, 12), backend="gsplat")


# ---------------------------------------------------------------- defect 2: zero Gaussians

@pytest.mark.parametrize("backend", ["auto", "gsplat", "torch", "torch-tiles", "brute-force"])
def test_zero_gaussians_never_reach_a_kernel_and_stay_differentiable(backend):
    scene = random_scene(0, 20, 12)
    leaves = {name: scene[name].clone().requires_grad_() for name in PARAMS}
    background = torch.tensor([0.2, 0.5, 0.7])
    out = render(**{**scene, **leaves}, background=background, backend=backend)
    assert torch.equal(out.image, background.expand(12, 20, 3))
    assert torch.equal(out.alpha, torch.zeros(12, 20))
    assert out.radii.shape == (0,) and out.means2d.shape == (0, 2) and out.depths.shape == (0,)
    out.image.mean().backward()  # the trainer's loss.backward() on an empty view
    assert out.means2d_grad is not None and out.means2d_grad.shape == (0, 2)


# ---------------------------------------------------------------- defect 3: one "rendered"

def _one_gaussian(opacity: float, scale: float = 0.05, depth: float = 4.0, x: float = 0.0):
    one = dict(dtype=torch.float32)
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 24], [0, 0, 1]], **one)
    return dict(means=torch.tensor([[x, 0.0, depth]], **one), quats=torch.tensor([[1.0, 0, 0, 0]], **one),
                scales=torch.full((1, 3), scale, **one), opacities=torch.tensor([opacity], **one),
                colors=torch.ones(1, 3, **one), viewmat=torch.eye(4, **one), K=K, width=64, height=48)


@pytest.mark.parametrize("times_threshold", [0.5, 0.999, 1.001, 1.5, 4.0, 100.0, 255.0])
def test_radii_are_gsplats_opacity_aware_footprint(times_threshold):
    """gsplat's projection kernel: o < 1/255 culled, box min(3.33, sqrt(2 ln(255 o))) sigmas."""
    opacity = times_threshold / 255.0
    scene = _one_gaussian(opacity)
    sigma = math.sqrt((60.0 * 0.05 / 4.0) ** 2 + 0.3)  # isotropic: fx·s/z, plus the eps2d blur
    extend = min(RADIUS_SIGMAS, math.sqrt(2 * math.log(times_threshold))) if times_threshold >= 1 else 0
    expected = math.ceil(extend * sigma) if times_threshold >= 1 else 0
    for backend in ("torch", "torch-tiles", "brute-force"):
        assert render(**scene, backend=backend).radii.tolist() == [expected], backend


def test_a_faint_gaussian_whose_footprint_misses_the_image_is_not_rendered():
    # 3.33 sigma reaches into the image, the opacity-aware box (1.18 sigma at o = 2/255) does not
    sigma = math.sqrt((60.0 * 0.05 / 4.0) ** 2 + 0.3)
    x_pixels = -2.5 * sigma  # centre left of the image
    scene = _one_gaussian(2.0 / 255.0, x=(x_pixels - 32) / 60.0 * 4.0)
    proj = project_gaussians(*(scene[k] for k in ("means", "quats", "scales", "viewmat", "K")), 64, 48)
    assert proj.radii_xy[0, 0] > 0  # the compositor's tile box still touches the image
    assert render(**scene).radii.tolist() == [0]


def test_only_gaussians_with_no_screen_gradient_are_left_out_of_rendered():
    """radii > 0 drops exactly Gaussians that cannot touch a pixel: the densify statistics
    (count and mean gradient over radii > 0) are the same quantity as gsplat's."""
    scene = random_scene(600, 64, 48, seed=21)
    gen = torch.Generator().manual_seed(4)
    # log-uniform from 0.3/255 to 1: many around the 1/255 threshold
    scene["opacities"] = torch.exp(torch.empty(600).uniform_(math.log(0.3 / 255), 0.0, generator=gen))
    leaves = {name: scene[name].clone().requires_grad_() for name in PARAMS}
    out = render(**{**scene, **leaves}, backend="torch-tiles")
    weights = torch.randn(out.image.shape, generator=gen)
    (out.image * weights).sum().backward()
    grad = out.means2d_grad
    proj = project_gaussians(*(scene[k] for k in ("means", "quats", "scales", "viewmat", "K")), 64, 48)
    wide = proj.radii_xy.max(dim=-1).values > 0
    left_out = wide & (out.radii == 0)
    assert left_out.sum() > 50  # the 3.33-sigma definition would have counted these
    assert torch.equal(grad[left_out], torch.zeros_like(grad[left_out]))
    assert ((grad != 0).any(dim=1) <= (out.radii > 0)).all()
    assert (out.radii > 0).sum() > 200


def test_the_torch_compositor_image_does_not_change(monkeypatch):
    """Reporting opacity-aware radii must not change what the torch backend draws."""
    scene = random_scene(300, 50, 37, seed=3)
    scene["opacities"][::3] = 0.8 / 255  # below the threshold: drawn as nothing anyway
    tiles = render(**scene, backend="torch-tiles")
    brute = render(**scene, backend="brute-force")
    assert (tiles.image - brute.image).abs().max() <= 1e-5
    assert (tiles.radii[::3] == 0).all()


# ---------------------------------------------------------------- defect 8: device keys

def test_cuda_and_cuda0_are_one_cache_key(monkeypatch):
    """Simulates one visible GPU (current device 0): LPIPS and the gsplat check key by device."""
    from mgs.device import canonical_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert canonical_device("cuda") == canonical_device("cuda:0") == torch.device("cuda", 0)
    assert canonical_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------- defect 7: the build step

@pytest.mark.parametrize("arch_list,capability,covered", [
    ("8.0;8.6;8.9;9.0+PTX", (9, 0), True), ("8.0;8.6;8.9;9.0+PTX", (10, 0), True),
    ("8.0;8.6;8.9;9.0+PTX", (7, 0), False), ("8.0;9.0", (8, 6), False), ("8.6", (8, 6), True),
])
def test_arch_list_coverage(arch_list, capability, covered):
    from mgs.gsplat_build import _arch_covered

    assert _arch_covered(arch_list, *capability) is covered


def test_gsplat_build_without_a_gpu_records_that_nothing_was_built(tmp_path, monkeypatch):
    import json
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/test_cuda.py and gpu_check.sh build for real")
    out = tmp_path / "ext" / "gsplat_build.json"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    result = subprocess.run([sys.executable, "-m", "mgs.cli", "gsplat-build", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["built"] is False and record["arch_list"] == "9.0"
    assert record["extensions_dir"] == str(tmp_path / "ext")
