"""splats.ply from a view-dependent model: the SH colour fit (batched vs reference, exact recovery),
the bake over the training views (opacity, shape and colour) and its refinement on the model's
renders, each closer to the model than what it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgs.merge import MergedModel, export_splats, read_splats, render_model, render_splats
from mgs.metrics import psnr
from mgs.model import Anchors, Decoder
from mgs.render.reference import look_at_viewmat
from mgs.scene import Camera
from mgs.bake import bake_at_center, bake_gaussians, refine
from mgs.sh import (SH_C0, FitCameras, coefficient_count, fit_sh, fit_sh_reference, sh_basis,
                    sh_colors)


def unit_dirs(shape, seed):
    d = torch.randn(*shape, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return d / d.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_batched_fit_matches_the_per_gaussian_reference(degree):
    g = torch.Generator().manual_seed(degree)
    dirs = unit_dirs((50, 12), seed=degree)
    colors = torch.rand(50, 12, 3, generator=g, dtype=torch.float64)
    weights = torch.rand(50, 12, generator=g, dtype=torch.float64) + 0.01
    fast = fit_sh(dirs, colors, weights, degree, ridge=1e-3)
    slow = fit_sh_reference(dirs.numpy(), colors.numpy(), weights.numpy(), degree, ridge=1e-3)
    assert fast.shape == (50, coefficient_count(degree), 3)
    np.testing.assert_allclose(fast.numpy(), slow, atol=1e-9)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_a_known_sh_function_is_recovered_exactly(degree):
    count = coefficient_count(degree)
    truth = torch.randn(20, count, 3, generator=torch.Generator().manual_seed(7),
                        dtype=torch.float64) * 0.3
    dirs = unit_dirs((20, 3 * count), seed=3)
    colors = (sh_basis(dirs, degree)[..., None] * truth[:, None]).sum(2) + 0.5
    fitted = fit_sh(dirs, colors, torch.ones(20, 3 * count, dtype=torch.float64), degree, ridge=0)
    assert (fitted - truth).abs().max() < 1e-9
    # and the viewer-side evaluation gives the colours back (means at the origin, cameras at -d)
    view = sh_colors(truth[:1], torch.zeros(1, 3, dtype=torch.float64), -dirs[0, 0])
    assert torch.allclose(view[0], colors[0, 0].clamp_min(0))


def test_sh_basis_is_orthonormal_over_the_sphere():
    dirs = unit_dirs((200_000,), seed=1)
    basis = sh_basis(dirs, 3)
    gram = basis.T @ basis * (4 * np.pi / len(dirs))
    assert (gram - torch.eye(16, dtype=torch.float64)).abs().max() < 0.03
    assert basis[0, 0] == SH_C0


def ring_cameras(count, radius, height, size=48, phase=0.0):
    K = np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]])
    cameras = []
    for i in range(count):
        angle = 2 * np.pi * i / count + phase
        eye = (radius * np.cos(angle), radius * np.sin(angle), height)
        viewmat = look_at_viewmat(eye, (0.0, 0.0, 0.0), up=(0.0, 0.0, -1.0), dtype=torch.float64)
        cameras.append(Camera(f"{i}.png", K, size, size, viewmat.numpy(), f"{i}.png"))
    return cameras


def view_dependent_model(seed=0):
    """Anchors in a small cube; a decoder whose colour swings with the view direction while
    opacity and shape do not see it (so only the colour differs between bakes)."""
    torch.manual_seed(seed)
    n, feat, k = 300, 8, 4
    anchors = Anchors(torch.rand(n, 3) * 1.0 - 0.5, torch.randn(n, feat),
                      torch.randn(n, k, 3) * 0.5, torch.full((n, 6), float(np.log(0.05))))
    decoder = Decoder(feat, k, hidden=16).requires_grad_(False)
    decoder.opacity_mlp[2].weight.zero_()
    decoder.opacity_mlp[2].bias.fill_(2.0)  # every Gaussian from every side, α = tanh(2)
    decoder.cov_mlp[0].weight[:, feat:] = 0  # shapes do not depend on the view
    decoder.color_mlp[0].weight[:, feat:] *= 6  # colours do, strongly
    return MergedModel(anchors, torch.zeros(n, dtype=torch.long), [decoder])


def _view(camera):
    return dict(viewmat=torch.tensor(camera.world_to_camera, dtype=torch.float32),
                K=torch.tensor(camera.K, dtype=torch.float32), width=camera.width,
                height=camera.height)


def _psnr_to_model(model, splats, cameras):
    values = []
    for camera in cameras:
        view = _view(camera)
        ours = render_model(model, **view).image
        assert ours.std() > 0.02  # not an empty render
        values.append(float(psnr(render_splats(splats, **view).image.clamp(0, 1),
                                 ours.clamp(0, 1))))
    return float(np.mean(values))


def test_sh_bake_renders_closer_to_the_model_than_one_colour(tmp_path):
    model = view_dependent_model()
    train = ring_cameras(24, radius=3.0, height=1.5)
    test = ring_cameras(5, radius=3.0, height=1.5, phase=0.37)
    center = torch.as_tensor(np.mean([c.center for c in train], axis=0), dtype=torch.float32)
    scores = {}
    for degree in (0, 3):
        path = tmp_path / f"sh{degree}.ply"
        count = export_splats(model, path, center, train, degree)
        splats = read_splats(path)
        assert splats["sh"].shape == (count, coefficient_count(degree), 3)
        scores[degree] = _psnr_to_model(model, splats, test)
    assert scores[3] > scores[0] + 3.0, scores


def test_bake_is_the_same_in_any_chunking():
    model = flickering_model(seed=1)
    anchors, decoder = model.anchors, model.decoders[0]
    cameras = FitCameras(ring_cameras(10, radius=3.0, height=1.5))
    whole = bake_gaussians(decoder, anchors, None, cameras, 2)
    chunked = bake_gaussians(decoder, anchors, None, cameras, 2, chunk_floats=3000)
    few_views = bake_gaussians(decoder, anchors, None, cameras, 2, max_views=4)
    assert whole.sh.shape == (len(whole.means), 9, 3)
    for name in ("means", "opacities", "scales", "quats", "sh"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-5), name
    assert (len(few_views.means) != len(whole.means)
            or not torch.allclose(whole.opacities, few_views.opacities, atol=1e-3))  # real budget


def test_a_view_independent_shape_bakes_to_itself():
    """Opacity and shape that no view changes: the bake over the views keeps exactly them."""
    model = view_dependent_model(seed=3)
    anchors, decoder = model.anchors, model.decoders[0]
    cameras = FitCameras(ring_cameras(12, radius=3.0, height=1.5))
    baked = bake_gaussians(decoder, anchors, None, cameras, 1)
    center = bake_at_center(decoder, anchors, None, torch.tensor([0.0, 0.0, 3.0]))
    assert len(baked.means) == len(center.means) == anchors.count * decoder.n_offsets
    assert torch.allclose(baked.opacities, torch.full_like(baked.opacities, float(np.tanh(2.0))))
    assert torch.allclose(baked.means, center.means)
    assert torch.allclose(baked.scales, center.scales, rtol=1e-5)
    assert torch.allclose(baked.quats, center.quats, atol=1e-5)


def flickering_model(seed=0):
    """view_dependent_model, but opacity and shape swing with the view too: Gaussians appear
    and vanish between views, as Scaffold-GS's do."""
    model = view_dependent_model(seed)
    decoder, feat = model.decoders[0], model.anchors.features.shape[1]
    torch.manual_seed(seed + 100)
    decoder.opacity_mlp[2].weight.normal_(0.0, 0.5)
    decoder.opacity_mlp[2].bias.fill_(0.3)
    decoder.opacity_mlp[0].weight[:, feat:] *= 4
    decoder.cov_mlp[0].weight[:, feat:].normal_(0.0, 0.5)
    return model


def test_bake_over_the_views_and_refinement_each_come_closer_to_the_model(tmp_path):
    model = flickering_model()
    train = ring_cameras(24, radius=3.0, height=1.5)
    test = ring_cameras(5, radius=3.0, height=1.5, phase=0.37)
    center = torch.as_tensor(np.mean([c.center for c in train], axis=0), dtype=torch.float32)
    scores = {}
    for name, kwargs in {"centre": {}, "bake": dict(cameras=train, sh_degree=1),
                         "refined": dict(cameras=train, sh_degree=1, refine_steps=60)}.items():
        export_splats(model, tmp_path / f"{name}.ply", center, **kwargs)
        scores[name] = _psnr_to_model(model, read_splats(tmp_path / f"{name}.ply"), test)
    assert scores["bake"] > scores["centre"] + 1.0, scores
    assert scores["refined"] > scores["bake"] + 0.2, scores


def test_photo_weight_fits_the_refinement_to_the_photos_instead_of_the_model(tmp_path):
    """Photos with a colour cast the model lacks: refined on the photos (weight 1), the PLY
    renders held-out views closer to them; on the model's renders (0), closer to the model."""
    model = flickering_model(seed=2)
    train = ring_cameras(24, radius=3.0, height=1.5)
    test = ring_cameras(5, radius=3.0, height=1.5, phase=0.37)
    center = torch.as_tensor(np.mean([c.center for c in train], axis=0), dtype=torch.float32)
    cast = torch.tensor([1.0, 0.8, 0.6])

    def photo(camera):
        return render_model(model, **_view(camera)).image.clamp(0, 1) * cast

    scores = {}
    for weight in (0.0, 1.0):
        path = tmp_path / f"photo{weight}.ply"
        export_splats(model, path, center, train, 1, refine_steps=150,
                      photos=lambda i: photo(train[i]), photo_weight=weight)
        splats = read_splats(path)
        to_photos = np.mean([float(psnr(render_splats(splats, **_view(c)).image.clamp(0, 1),
                                        photo(c))) for c in test])
        scores[weight] = (to_photos, _psnr_to_model(model, splats, test))
    assert scores[1.0][0] > scores[0.0][0] + 1.0, scores
    assert scores[0.0][1] > scores[1.0][1] + 1.0, scores


def test_refinement_is_deterministic_and_zero_steps_change_nothing():
    model = flickering_model(seed=4)
    cameras = ring_cameras(8, radius=3.0, height=1.5)
    baked = bake_gaussians(model.decoders[0], model.anchors, None, FitCameras(cameras), 1)
    background = torch.zeros(3)

    def target(index, view):
        return render_model(model, **view).image

    first, second = (refine(baked, cameras, target, background, steps=10, progress=False)
                     for _ in range(2))
    for name in ("means", "opacities", "scales", "quats", "sh"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.sh, baked.sh[:len(first.sh)]) or len(first.sh) != len(baked.sh)
    assert refine(baked, cameras, target, background, steps=0) is baked


def test_ply_columns_follow_the_3dgs_layout(tmp_path):
    """f_dc_* then f_rest_* channel-major: f_rest_0..14 are red's 15 higher coefficients."""
    from plyfile import PlyData

    model = view_dependent_model(seed=2)
    train = ring_cameras(12, radius=3.0, height=1.5)
    path = tmp_path / "sh3.ply"
    export_splats(model, path, torch.zeros(3), train, 3)
    names = PlyData.read(str(path))["vertex"].data.dtype.names
    assert names[:9] == ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2")
    assert names[9:54] == tuple(f"f_rest_{i}" for i in range(45))
    assert names[54:] == ("opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2",
                          "rot_3")
    vertex = PlyData.read(str(path))["vertex"]
    sh = read_splats(path)["sh"]
    for channel in range(3):
        for index in range(15):
            assert np.array_equal(vertex[f"f_rest_{channel * 15 + index}"],
                                  sh[:, 1 + index, channel].numpy())


def test_mean_view_colour_is_the_average_over_the_cameras_that_see_a_gaussian():
    from mgs.sh import mean_view_colors

    cameras = ring_cameras(8, radius=3.0, height=1.5)
    fit = FitCameras(cameras)
    sh = torch.randn(40, 4, 3, generator=torch.Generator().manual_seed(5)) * 0.2
    means = torch.rand(40, 3, generator=torch.Generator().manual_seed(6)) * 0.4 - 0.2
    # every camera looks at the origin: all see these points, so the plain mean
    expected = torch.stack([sh_colors(sh, means, c) for c in fit.centers]).mean(0)
    assert torch.allclose(mean_view_colors(sh, means, fit), expected, atol=1e-5)
    assert torch.allclose(mean_view_colors(sh, means, fit, chunk_floats=64), expected, atol=1e-5)
    # a point behind every camera's back still gets a colour, the plain mean again
    far = torch.tensor([[0.0, 0.0, 50.0]])
    assert torch.allclose(mean_view_colors(sh[:1], far, fit),
                          torch.stack([sh_colors(sh[:1], far, c) for c in fit.centers]).mean(0),
                          atol=1e-5)
