"""Rasterizer tests: tile compositors vs brute force, gradients, projection vs gsplat, CUDA parity."""

from __future__ import annotations

import warnings

import pytest
import torch

from mgs.render import render, project
from mgs.render.projection import covariance_from_quat_scale, project_gaussians
from mgs.render.reference import random_scene

PARAM_NAMES = ("means", "quats", "scales", "opacities", "colors")
TILE_BACKENDS = ("torch-fused", "torch-tiles")
BACKGROUND = (0.2, 0.5, 0.7)

needs_cuda = pytest.mark.cuda  # skipped without a GPU (conftest)


def _with_grad_leaves(scene):
    leaves = {name: scene[name].clone().requires_grad_() for name in PARAM_NAMES}
    return {**scene, **leaves}, leaves


def _random_loss(out, seed=7):
    """A loss touching every pixel of image and alpha with random weights."""
    gen = torch.Generator().manual_seed(seed)
    w_image = torch.randn(out.image.shape, generator=gen, dtype=out.image.dtype)
    w_alpha = torch.randn(out.alpha.shape, generator=gen, dtype=out.alpha.dtype)
    return (out.image * w_image.to(out.image.device)).sum() + (out.alpha * w_alpha.to(out.alpha.device)).sum()


@pytest.mark.parametrize("width,height", [(64, 48), (50, 37)])
@pytest.mark.parametrize("backend", TILE_BACKENDS)
def test_tile_compositors_match_brute_force(backend, width, height):
    scene = random_scene(300, width, height, seed=width)
    background = torch.tensor(BACKGROUND)
    expected = render(**scene, background=background, backend="brute-force")
    got = render(**scene, background=background, backend=backend)
    assert (got.radii > 0).sum() > 100  # most of the scene is visible
    assert got.image.shape == (height, width, 3) and got.alpha.shape == (height, width)
    assert (got.image - expected.image).abs().max() <= 1e-5
    assert (got.alpha - expected.alpha).abs().max() <= 1e-5
    assert torch.equal(got.radii, expected.radii)


def test_fused_gradients_match_pure_torch():
    scene = random_scene(300, 50, 37, seed=3)
    grads = {}
    for backend in TILE_BACKENDS:
        inputs, leaves = _with_grad_leaves(scene)
        background = torch.tensor(BACKGROUND, requires_grad=True)
        out = render(**inputs, background=background, backend=backend)
        _random_loss(out).backward()
        grads[backend] = {name: leaf.grad for name, leaf in leaves.items()}
        grads[backend]["background"] = background.grad
        grads[backend]["means2d"] = out.means2d_grad
        assert out.means2d.grad is out.means2d_grad  # torch backends: plain .grad works too
    for name, reference in grads["torch-tiles"].items():
        fused = grads["torch-fused"][name]
        assert fused is not None and torch.isfinite(fused).all(), name
        scale = reference.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("backend", TILE_BACKENDS)
def test_gradcheck_float64(backend):
    """Float64 finite differences through projection + compositing (fused kernels are dtype-generic)."""
    scene = random_scene(5, 20, 16, seed=11, dtype=torch.float64, pixel_radius=(6.0, 12.0))
    background = torch.tensor(BACKGROUND, dtype=torch.float64)
    inputs = tuple(scene[name].clone().requires_grad_() for name in PARAM_NAMES) + (background.requires_grad_(),)

    # Random projections of (image, alpha): a backward pass per output row stays cheap.
    projections = torch.randn(6, 16 * 20 * 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def projected_image_and_alpha(means, quats, scales, opacities, colors, bg):
        out = render(means, quats, scales, opacities, colors, scene["viewmat"], scene["K"], 20, 16,
                     background=bg, backend=backend)
        return projections @ torch.cat([out.image.reshape(-1), out.alpha.reshape(-1)])

    assert (render(**scene, backend=backend).radii > 0).all()
    assert torch.autograd.gradcheck(projected_image_and_alpha, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_projection_matches_gsplat_torch_impl():
    gsplat_impl = pytest.importorskip("gsplat.cuda._torch_impl", reason="gsplat is not importable")
    scene = random_scene(400, 64, 48, seed=5)
    means = scene["means"].clone()
    means[:20] = -means[:20]  # some Gaussians behind the camera
    quats = scene["quats"] * 3.0  # unnormalised on purpose
    args = (scene["viewmat"], scene["K"], 64, 48)

    leaves = [t.clone().requires_grad_() for t in (means, quats, scene["scales"])]
    ours = project_gaussians(*leaves, *args)
    ours_grads = _projection_grads(ours.means2d, ours.conics, ours.depths, ours.radii_xy, leaves)

    g_leaves = [t.clone().requires_grad_() for t in (means, quats, scene["scales"])]
    covars, _ = gsplat_impl._quat_scale_to_covar_preci(g_leaves[1], g_leaves[2], compute_preci=False)
    radii, means2d, depths, conics, _ = gsplat_impl._fully_fused_projection(
        g_leaves[0], covars, scene["viewmat"][None], scene["K"][None], 64, 48, eps2d=0.3, near_plane=0.01)
    radii, means2d, depths, conics = radii[0], means2d[0], depths[0], conics[0]

    assert torch.equal(ours.radii_xy, radii.to(torch.int32))
    visible = (radii > 0).all(dim=-1)
    assert 100 < visible.sum() < 400
    in_front = depths > 0.01  # behind the camera our means2d are placeholders
    assert (~in_front).sum() == 20
    torch.testing.assert_close(ours.means2d[in_front], means2d[in_front], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.depths, depths, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.conics[in_front], conics[in_front], rtol=1e-5, atol=1e-5)
    gsplat_grads = _projection_grads(means2d, conics, depths, radii, g_leaves)
    for ours_grad, their_grad in zip(ours_grads, gsplat_grads):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-4)

    public_radii, *_ = project(means, quats, scene["scales"], *args)
    assert torch.equal(public_radii, radii.max(dim=-1).values.to(torch.int32))


def _projection_grads(means2d, conics, depths, radii_xy, leaves):
    """Gradients of a fixed random function of the visible Gaussians' screen quantities."""
    visible = (radii_xy > 0).all(dim=-1)
    gen = torch.Generator().manual_seed(0)
    n = means2d.shape[0]
    loss = ((means2d * torch.randn(n, 2, generator=gen))[visible].sum()
            + (conics * torch.randn(n, 3, generator=gen))[visible].sum() * 10.0
            + (depths * torch.randn(n, generator=gen))[visible].sum())
    return torch.autograd.grad(loss, leaves)


def test_covariance_from_unnormalised_quaternion():
    quats = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    scales = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    cov = covariance_from_quat_scale(quats, scales)
    torch.testing.assert_close(cov[0], torch.diag(torch.tensor([1.0, 4.0, 9.0])))
    # 90 degrees about x swaps the y and z variances
    torch.testing.assert_close(cov[1], torch.diag(torch.tensor([1.0, 9.0, 4.0])), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", TILE_BACKENDS + ("brute-force",))
def test_zero_gaussians_render_background(backend):
    scene = random_scene(0, 40, 24)
    background = torch.tensor(BACKGROUND)
    out = render(**scene, background=background, backend=backend)
    assert torch.equal(out.image, background.expand(24, 40, 3))
    assert torch.equal(out.alpha, torch.zeros(24, 40))
    assert out.means2d.shape == (0, 2) and out.radii.shape == (0,)


@pytest.mark.parametrize("backend", TILE_BACKENDS + ("brute-force",))
def test_gaussians_behind_camera_are_culled(backend):
    scene = random_scene(50, 40, 24, seed=2)
    inputs, leaves = _with_grad_leaves(scene)
    # Identity camera looks down +z; put every centre at z < 0.
    behind = inputs["means"] * torch.tensor([1.0, 1.0, 0.0]) - torch.tensor([0.0, 0.0, 1.0])
    background = torch.tensor(BACKGROUND)
    out = render(**{**inputs, "means": behind, "viewmat": torch.eye(4)}, background=background, backend=backend)
    assert (out.radii == 0).all()
    assert torch.equal(out.image, background.expand(24, 40, 3))
    _random_loss(out).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf.grad)), name


def test_render_without_grad_and_default_background():
    scene = random_scene(100, 32, 32, seed=4)
    with torch.no_grad():
        out = render(**scene)
    assert out.image.min() >= 0 and out.image.max() <= 1.0 + 1e-6
    assert out.means2d_grad is None
    # black background: colour never exceeds accumulated alpha for colours in [0, 1]
    assert (out.image <= out.alpha[..., None] + 1e-6).all()


def _cuda_scene():
    return random_scene(2000, 96, 64, seed=9, device="cuda")


@needs_cuda
def test_cuda_torch_backend_matches_gsplat():
    scene = _cuda_scene()
    background = torch.tensor(BACKGROUND, device="cuda")
    results = {}
    for backend in ("torch", "gsplat"):
        inputs, leaves = _with_grad_leaves(scene)
        out = render(**inputs, background=background, backend=backend)
        _random_loss(out).backward()
        results[backend] = (out, {name: leaf.grad for name, leaf in leaves.items()})
    (ours, ours_grads), (theirs, their_grads) = results["torch"], results["gsplat"]
    torch.testing.assert_close(ours.image, theirs.image, atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.alpha, theirs.alpha, atol=1e-3, rtol=0)
    torch.testing.assert_close(ours.means2d[ours.radii > 0], theirs.means2d[ours.radii > 0], atol=1e-3, rtol=1e-4)
    # gsplat culls low-opacity Gaussians a bit more tightly; rendered sets must still agree
    assert ((ours.radii > 0) | (theirs.radii == 0)).all()
    for name in PARAM_NAMES:
        scale = their_grads[name].abs().max()
        torch.testing.assert_close(ours_grads[name], their_grads[name], atol=2e-3 * scale, rtol=0, msg=name)
    torch.testing.assert_close(ours.means2d_grad, theirs.means2d_grad, atol=2e-3 * theirs.means2d_grad.abs().max(),
                               rtol=0)


@needs_cuda
def test_cuda_gsplat_packed_matches_unpacked():
    from mgs.render.gsplat_backend import rasterize_gsplat

    scene = _cuda_scene()
    args = [scene[k] for k in (*PARAM_NAMES, "viewmat", "K", "width", "height")]
    unpacked = rasterize_gsplat(*args, None, near_plane=0.01, eps2d=0.3, packed=False)
    packed = rasterize_gsplat(*args, None, near_plane=0.01, eps2d=0.3, packed=True)
    torch.testing.assert_close(packed.rgb, unpacked.rgb, atol=1e-5, rtol=0)
    assert torch.equal(packed.radii, unpacked.radii)


def test_saturated_pixels_stop_like_gsplat():
    """Near-opaque stacks: exercises early termination and the 0.999 alpha clamp."""
    scene = random_scene(250, 32, 24, seed=6, pixel_radius=(6.0, 14.0))
    scene["opacities"] = 0.95 + 0.05 * torch.rand(250, generator=torch.Generator().manual_seed(1))
    background = torch.tensor(BACKGROUND)
    expected = render(**scene, background=background, backend="brute-force")
    assert (expected.alpha > 1 - 1e-3).float().mean() > 0.5  # most pixels saturate
    grads = {}
    for backend in TILE_BACKENDS:
        inputs, leaves = _with_grad_leaves(scene)
        out = render(**inputs, background=background, backend=backend)
        assert (out.image - expected.image).abs().max() <= 1e-5, backend
        assert (out.alpha - expected.alpha).abs().max() <= 1e-5, backend
        _random_loss(out).backward()
        grads[backend] = leaves
    for name in PARAM_NAMES:
        reference = grads["torch-tiles"][name].grad
        torch.testing.assert_close(grads["torch-fused"][name].grad, reference, rtol=0,
                                   atol=1e-5 * reference.abs().max(), msg=name)


@pytest.mark.parametrize("backend", TILE_BACKENDS)
def test_huge_gaussian_covering_the_image(backend):
    """A Gaussian far wider than the image (radius >> image) must not overflow pixel bounds."""
    scene = random_scene(20, 40, 24, seed=8)
    scene["scales"][0] = 1e4
    scene["opacities"][0] = 0.5
    expected = render(**scene, backend="brute-force")
    got = render(**scene, backend=backend)
    assert got.radii[0] > 1e5
    assert (got.image - expected.image).abs().max() <= 1e-5
    assert (got.alpha >= 0.499).all()  # the big one (opacity 0.5) covers every pixel


def test_without_numba_falls_back_to_torch_tiles_with_one_warning(monkeypatch):
    import sys

    import mgs.render as render_module

    monkeypatch.setitem(sys.modules, "mgs.render.fused", None)  # makes the import fail
    monkeypatch.setattr(render_module, "_numba_warning_shown", False)
    scene = random_scene(60, 40, 24, seed=12)
    with pytest.warns(RuntimeWarning, match="numba"):
        fallback = render(**scene, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render(**scene, backend="torch")  # warned only once
    torch.testing.assert_close(fallback.image, render(**scene, backend="torch-tiles").image, rtol=0, atol=0)


def test_unknown_backend_is_a_clear_error():
    from mgs.errors import MgsError

    with pytest.raises(MgsError, match="unknown render backend"):
        render(**random_scene(3, 8, 8), backend="cuda")


def test_torch_tiles_chunking_does_not_change_the_image(monkeypatch):
    import mgs.render.tiles as tiles

    scene = random_scene(300, 64, 48, seed=13)
    whole = render(**scene, backend="torch-tiles")
    monkeypatch.setattr(tiles, "PAIRS_PER_CHUNK", 4000)  # a dozen or more chunks
    chunked = render(**scene, backend="torch-tiles")
    assert torch.equal(chunked.image, whole.image) and torch.equal(chunked.alpha, whole.alpha)


def _hand_made(case: str):
    """Screen-space Gaussians for the fused kernels' culling and early-termination edges."""
    gen = torch.Generator().manual_seed(5)
    width, height = 64, 48
    if case == "opaque_front":  # two opaque Gaussians in front hide everything behind them
        n = 40
        means2d = torch.rand(n, 2, generator=gen) * torch.tensor([width, height])
        means2d[:2] = torch.tensor([width / 2, height / 2])
        cov = torch.rand(n, 2, generator=gen) * 20 + 2
        cov[:2] = 1e6
        opacities = torch.rand(n, generator=gen) * 0.8 + 0.1
        opacities[:2] = 1.0
        depths = torch.rand(n, generator=gen) + 2
        depths[:2] = torch.tensor([0.5, 0.6])
        b = torch.zeros(n)
    elif case == "empty_tiles":  # everything in the first tile: the others stay empty
        n = 20
        means2d = torch.rand(n, 2, generator=gen) * 5 + 5
        cov = torch.rand(n, 2, generator=gen) + 0.5  # radius <= 4 px: boxes end before x, y = 16
        opacities = torch.rand(n, generator=gen) * 0.8 + 0.1
        depths = torch.rand(n, generator=gen) + 1
        b = torch.zeros(n)
    elif case == "tile_borders":  # centres on and next to tile edges, boxes across them
        points = [(16, 16), (32, 8), (15.99, 31.5), (48.5, 16.0), (16.01, 32), (0, 0), (64, 48)]
        n = len(points) * 3
        means2d = torch.tensor(points, dtype=torch.float32).repeat(3, 1)
        cov = torch.rand(n, 2, generator=gen) * 30 + 1
        opacities = torch.rand(n, generator=gen) * 0.8 + 0.1
        depths = torch.rand(n, generator=gen) + 1
        b = (torch.rand(n, generator=gen) - 0.5) * 0.8
    else:  # "faint_and_thin": opacities around 1/255 and needle-like ellipses
        n = 60
        means2d = torch.rand(n, 2, generator=gen) * torch.tensor([width, height])
        cov = torch.stack([torch.rand(n, generator=gen) * 200 + 0.3,
                           torch.rand(n, generator=gen) * 0.5 + 0.3], dim=1)
        cov[::2] = cov[::2].flip(1)
        opacities = torch.rand(n, generator=gen) * 0.006 + 0.001
        opacities[::3] = torch.rand(len(opacities[::3]), generator=gen) * 0.9 + 0.05
        depths = torch.rand(n, generator=gen) + 1
        b = (torch.rand(n, generator=gen) - 0.5) * 1.6
    # covariance [[x, r·sqrt(xy)], [r·sqrt(xy), y]] with |r| < 1; conic = its inverse
    off = b * torch.sqrt(cov[:, 0] * cov[:, 1])
    det = cov[:, 0] * cov[:, 1] - off * off
    conics = torch.stack([cov[:, 1] / det, -off / det, cov[:, 0] / det], dim=1)
    radii = torch.ceil(3.0 * torch.sqrt(cov.max(dim=1).values)).int()[:, None].repeat(1, 2)
    colors = torch.rand(n, 3, generator=gen)
    return means2d, conics, colors, opacities, depths, radii, width, height


@pytest.mark.parametrize("case", ["opaque_front", "empty_tiles", "tile_borders", "faint_and_thin"])
def test_fused_culling_and_early_termination_edges(case):
    """The fused kernels skip faint pixels, empty tiles and finished pixels: the images equal the
    brute force, the gradients the pure-torch tiles."""
    from mgs.render.fused import composite_tiles_fused
    from mgs.render.reference import composite_brute_force
    from mgs.render.tiles import build_tile_intersections, composite_tiles_torch

    means2d, conics, colors, opacities, depths, radii, width, height = _hand_made(case)
    isect = build_tile_intersections(means2d, radii, depths, width, height)
    results = {}
    for name in ("fused", "tiles", "brute"):
        leaves = [t.clone().requires_grad_() for t in (means2d, conics, colors, opacities)]
        if name == "brute":
            rgb, alpha = composite_brute_force(*leaves, depths, radii, width, height)
        else:
            composite = composite_tiles_fused if name == "fused" else composite_tiles_torch
            rgb, alpha = composite(*leaves, radii, isect, width, height)
        gen = torch.Generator().manual_seed(1)
        loss = (rgb * torch.randn(rgb.shape, generator=gen)).sum() \
            + (alpha * torch.randn(alpha.shape, generator=gen)).sum()
        loss.backward()
        results[name] = (rgb.detach(), alpha.detach(), [leaf.grad for leaf in leaves])
    rgb, alpha, grads = results["fused"]
    assert (rgb - results["brute"][0]).abs().max() <= 1e-5
    assert (alpha - results["brute"][1]).abs().max() <= 1e-5
    for got, reference in zip(grads, results["tiles"][2]):
        scale = max(float(reference.abs().max()), 1e-3)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5 * scale)
    if case == "opaque_front":
        # the first one takes every pixel to T = 0.001, the second would go below 1e-4: every
        # pixel finishes there (gsplat skips that one too), nothing behind them reaches a pixel
        assert (alpha > 0.998).all()
        assert (grads[2][1:] == 0).all() and (grads[2][0] != 0).all()
    if case == "empty_tiles":
        assert (alpha[16:, :] == 0).all() and (alpha[:, 16:] == 0).all()
    if case == "faint_and_thin":
        faint = opacities < 1 / 255
        assert faint.any() and (grads[2][faint] == 0).all()
