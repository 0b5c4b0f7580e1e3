import numpy as np
import pytest
import torch

from mgs.config import TrainConfig
from mgs.densify import DensifyState, adjust_anchors
from mgs.model import (Anchors, Decoder, decode_attributes, mean_knn_sq_distance,
                       neural_gaussians, visible_anchor_mask, voxelize)


def make_anchors(n=6, feat_dim=4, k=3):
    xyz = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3) * 10.0
    anchors = Anchors.from_points(xyz.numpy(), feat_dim, k, voxel_size=0.0)
    anchors.features.data = torch.arange(n * feat_dim, dtype=torch.float32).reshape(n, feat_dim)
    return anchors


def make_optimizer(anchors, decoder):
    groups = [{"params": [anchors.offsets], "name": "offsets"},
              {"params": [anchors.features], "name": "features"},
              {"params": [anchors.scaling], "name": "scaling"},
              {"params": list(decoder.parameters()), "name": "mlp"}]
    optimizer = torch.optim.Adam(groups, lr=0.01, eps=1e-15)
    loss = anchors.features.sum() + anchors.offsets.sum() + anchors.scaling.sum()
    loss.backward()
    optimizer.step()  # creates Adam moments to check they follow the rows
    optimizer.zero_grad()
    return optimizer


def test_voxelize_snaps_and_deduplicates():
    pts = np.array([[0.01, 0.02, 0.0], [0.04, 0.0, 0.01], [1.0, 1.0, 1.0]])
    out = voxelize(pts, 0.1)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(np.sort(out[:, 0]), [0.0, 1.0])


def _knn_all_pairs(xyz: torch.Tensor, k: int = 3, chunk: int = 64) -> torch.Tensor:
    """The former implementation (all-pairs distances, chunked), kept here as the reference."""
    n = xyz.shape[0]
    k = min(k, n - 1)
    out = torch.empty(n)
    for start in range(0, n, chunk):
        d = torch.cdist(xyz[start:start + chunk], xyz).pow(2)
        out[start:start + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, 1:].mean(1)
    return out.clamp_min(1e-14)


def test_knn_scales_equal_the_all_pairs_result():
    rng = np.random.default_rng(3)
    points = rng.uniform(-5.0, 5.0, (500, 3)).astype(np.float32)
    points[10] = points[11]  # a duplicate: its nearest distance is 0, not its own
    points[20:25] = points[20] + np.float32(1e-3) * np.arange(5, dtype=np.float32)[:, None]
    xyz = torch.from_numpy(points)
    fast = mean_knn_sq_distance(xyz, k=3)
    assert fast.dtype == torch.float32 and fast.shape == (500,)
    # float32 all-pairs distances come from |x|² + |y|² − 2x·y: an absolute error of about
    # eps·|x|² (~1e-5 here), which only the five points 1e-3 apart notice
    former = _knn_all_pairs(xyz, 3)
    torch.testing.assert_close(fast, former, rtol=1e-4, atol=1e-5)
    assert ((fast - former).abs() <= 1e-4 * former).sum() >= 490
    exact = _knn_all_pairs(xyz.double(), 3).float()  # float64 all-pairs: the true values
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-12)
    assert fast[10] == pytest.approx(exact[10].item()) and fast[10] < fast[30]
    two = mean_knn_sq_distance(torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]), k=3)
    assert two.tolist() == [25.0, 25.0]  # k clipped to the one neighbour
    assert mean_knn_sq_distance(torch.zeros(1, 3)).tolist() == [pytest.approx(1e-4)]


def test_frustum_cull_in_chunks_equals_one_pass():
    """The cull projects a city's anchors a chunk at a time; the mask must not depend on it."""
    generator = torch.Generator().manual_seed(0)
    xyz = (torch.rand(1000, 3, generator=generator) - 0.5) * torch.tensor([40.0, 40.0, 10.0])
    anchors = Anchors.from_points(xyz.numpy(), 4, 3, voxel_size=0.0)
    anchors.scaling.data += torch.randn(1000, 6, generator=generator)
    viewmat = torch.eye(4)
    viewmat[2, 3] = 15.0  # camera 15 m in front of the cloud's centre, looking along +z
    K = torch.tensor([[40.0, 0, 32], [0, 40.0, 24], [0, 0, 1]])
    whole = visible_anchor_mask(anchors, viewmat, K, 64, 48, chunk=10_000)
    assert 0 < int(whole.sum()) < 1000  # some anchors in view, some not
    for chunk in (1, 7, 333, 1000):
        assert torch.equal(visible_anchor_mask(anchors, viewmat, K, 64, 48, chunk=chunk), whole)
    empty = Anchors.from_points(np.zeros((0, 3)), 4, 3, voxel_size=0.0)
    assert visible_anchor_mask(empty, viewmat, K, 64, 48).shape == (0,)


def test_decoder_outputs_and_selection():
    torch.manual_seed(0)
    anchors = make_anchors(n=5, feat_dim=32, k=10)
    anchors.features.data.normal_()
    decoder = Decoder(32, 10)
    visible = torch.tensor([True, False, True, True, False])
    attrs = decode_attributes(decoder, anchors, visible, torch.zeros(3))
    assert attrs.opacity.shape == (30,) and attrs.color.shape == (30, 3)
    assert torch.allclose(attrs.quat.norm(dim=1), torch.ones(30))
    assert (attrs.opacity.abs() < 1).all() and ((attrs.color > 0) & (attrs.color < 1)).all()
    # scale = exp(base scale) * sigmoid(.) never exceeds the anchor's base scale
    assert (attrs.scale <= torch.exp(anchors.scaling[visible, 3:]).repeat_interleave(10, 0)).all()
    gaussians = neural_gaussians(anchors, visible, attrs)
    assert gaussians.means.shape[0] == int((attrs.opacity > 0).sum())
    assert (gaussians.opacities > 0).all()


def test_growing_adds_anchors_with_max_parent_features_and_zero_moments():
    config = TrainConfig(feat_dim=4, n_offsets=3, voxel_size=0.01, update_interval=25)
    anchors = make_anchors(feat_dim=4, k=3)
    anchors.offsets.data[0] = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    anchors.scaling.data[:] = 0.0  # offsets scaled by exp(0) = 1
    decoder = Decoder(4, 3)
    optimizer = make_optimizer(anchors, decoder)
    state = DensifyState(anchors.count, 3)
    state.grad_count[:3] = 20  # anchor 0's Gaussians: seen often, with large gradients
    state.grad_accum[:3] = 20 * 0.01
    state.anchor_visits[:] = 1
    before = anchors.count
    counts = adjust_anchors(anchors, state, optimizer, config, torch.Generator().manual_seed(0))
    assert counts["grown"] > 0 and anchors.count == before + counts["grown"]
    new = slice(before, None)
    assert torch.equal(anchors.features[new], anchors.features[0:1].expand(counts["grown"], -1))
    assert (anchors.offsets[new] == 0).all()
    for name in ("features", "offsets", "scaling"):
        param = getattr(anchors, name)
        moments = optimizer.state[param]["exp_avg"]
        assert moments.shape == param.shape and (moments[new] == 0).all()
        assert (moments[:before] != 0).any()
    assert state.grad_accum.numel() == anchors.count * 3
    assert (state.grad_count[:3] == 0).all()  # eligible accumulators were reset


def test_pruning_removes_transparent_well_visited_anchors():
    config = TrainConfig(feat_dim=4, n_offsets=3, voxel_size=0.01)
    anchors = make_anchors(feat_dim=4, k=3)
    optimizer = make_optimizer(anchors, Decoder(4, 3))
    state = DensifyState(anchors.count, 3)
    state.anchor_visits[:] = 30
    state.opacity_accum[:] = 5.0
    state.opacity_accum[2] = 0.0  # never opaque
    state.anchor_visits[4] = 5  # too few visits to judge: kept
    state.opacity_accum[4] = 0.0
    kept_xyz = anchors.xyz[[0, 1, 3, 4, 5]].clone()
    counts = adjust_anchors(anchors, state, optimizer, config, torch.Generator().manual_seed(0))
    assert counts["pruned"] == 1
    assert torch.equal(anchors.xyz, kept_xyz)
    assert optimizer.state[anchors.features]["exp_avg"].shape == anchors.features.shape
    assert state.anchor_visits.tolist() == [0, 0, 0, 5, 0]  # judged anchors are reset


def _stacked_gaussians(offset_x: float, n=6, k=3):
    """Anchors at the centres of level-0 growth cells (1.28 with voxel_size 0.01), every
    Gaussian at +offset_x from its anchor, all eligible with large gradients."""
    xyz = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3) * 12.8
    anchors = Anchors.initial(xyz, torch.zeros(n), 4, k)  # offsets scaled by exp(0) = 1
    anchors.offsets.data[:, :, 0] = offset_x
    optimizer = make_optimizer(anchors, Decoder(4, k))
    state = DensifyState(n, k)
    state.grad_count[:] = 20
    state.grad_accum[:] = 20 * 0.01
    return anchors, optimizer, state


def test_finer_levels_grow_only_when_level_zero_grew():
    """Officially (Scaffold-GS) levels 1 and 2 are skipped when level 0 added no anchor."""
    config = TrainConfig(feat_dim=4, n_offsets=3, voxel_size=0.01, update_interval=25)
    # +0.2: every candidate lies in its anchor's own level-0 cell (occupied), but in a new
    # level-1 cell (0.32): level 0 grows nothing, so nothing grows at all
    anchors, optimizer, state = _stacked_gaussians(0.2)
    counts = adjust_anchors(anchors, state, optimizer, config, torch.Generator().manual_seed(0))
    assert counts["grown"] == 0 and anchors.count == 6
    # anchor 0's Gaussians moved into a free level-0 cell: level 0 grows there, and then the
    # finer levels run and grow around the other anchors too
    anchors, optimizer, state = _stacked_gaussians(0.2)
    anchors.offsets.data[0, :, 0] = 1.0
    counts = adjust_anchors(anchors, state, optimizer, config, torch.Generator().manual_seed(0))
    level0_cell = torch.tensor([1.28, 0.0, 0.0])
    assert (anchors.xyz - level0_cell).norm(dim=1).min() < 1e-5
    assert counts["grown"] > 1


def test_initial_scale_clamps_the_squared_distance():
    """Officially the mean squared neighbour distance is clamped at 1e-7 before the root."""
    anchors = Anchors.from_points(np.array([[0.0, 0.0, 0.0], [1e-4, 0.0, 0.0]]), 4, 3,
                                  voxel_size=0.0)
    expected = np.log(np.sqrt(1e-7))  # the distance 1e-4 squared is 1e-8 < 1e-7
    assert torch.allclose(anchors.scaling, torch.full((2, 6), expected, dtype=torch.float32))
    far = Anchors.from_points(np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]), 4, 3, voxel_size=0.0)
    assert far.scaling[0, 0].item() == pytest.approx(np.log(0.5))
