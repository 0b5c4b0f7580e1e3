"""Momentum-GS block training end to end on a tiny scene: init, rounds, sync, finalize, merge."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mgs.blocks import Run, finalize_block, init_blocks, sync_round, train_block
from mgs.checkpoint import load_checkpoint
from mgs.errors import InputError
from mgs.merge import (load_model, merge_blocks, read_anchor_ply, read_splats, render_model,
                       render_splats)
from mgs.momentum import update_metric_ema
from mgs.partition import PartitionConfig, partition_scene
from mgs.train import load_views

TRAIN = dict(iterations=40, lr_max_steps=20, voxel_size=0.05, start_stat=2, update_from=2,
             update_interval=5, update_until=20, eval_interval=10, checkpoint_interval=5,
             threads=2)
MOMENTUM = dict(mode="full", rounds=2, iterations_per_round=10, final_iterations=5,
                consistency_weight=50.0, teacher="step", sigma=1.0, keep_rounds=0)  # the official teacher
EXPORT = dict(sh_degree=2, refine_steps=20)  # not the defaults: merge must read them


def make_run(root, tiny_scene, margin=0.25, **momentum):
    root.mkdir(parents=True, exist_ok=True)
    (root / "scene").symlink_to(tiny_scene)
    (root / "config.yaml").write_text(yaml.safe_dump(
        {"train": TRAIN, "momentum": {**MOMENTUM, **momentum}, "export": EXPORT}))
    partition_scene(root / "scene", root / "partition",
                    PartitionConfig(block_dim=[2, 1, 1], assignment="center", min_cameras=2,
                                    margin=margin))
    return Run.open(root)


@pytest.fixture(scope="module")
def trained_run(tiny_scene, tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run") / "demo", tiny_scene)
    n = init_blocks(run)
    assert n == 2
    for r in (1, 2):
        for b in range(n):
            train_block(run, r, b)
        sync_round(run, r)
    for b in range(n):
        finalize_block(run, b)
    merge_blocks(run, run.root / "model")
    return run


def test_rounds_write_every_file_and_sync_math(trained_run):
    run = trained_run
    for r in (0, 1, 2):
        assert run.shared_path(r).exists()
        assert all(run.block_path(r, b).exists() for b in range(2))
    shared1, shared2 = run.load(run.shared_path(1)), run.load(run.shared_path(2))
    blocks1 = [run.load(run.block_path(1, b)) for b in range(2)]
    blocks2 = [run.load(run.block_path(2, b)) for b in range(2)]
    assert shared1["weights"].tolist() == [1.0, 1.0]  # round 1 is the weights' warm-up
    # round 2: weights from the metrics; students AND teachers are averaged with them
    w = shared2["weights"]
    assert w.min() == pytest.approx(1.0) and (w >= 1).all() and (w < 2).all()
    for key in ("color_mlp.2.bias", "opacity_mlp.0.weight"):
        for role, out in (("decoder", "student"), ("teacher", "teacher")):
            expected = (w[0] * blocks2[0][role][key].double()
                        + w[1] * blocks2[1][role][key].double()) / w.sum()
            assert torch.allclose(shared2[out][key].double(), expected, atol=1e-6), (role, key)
    # each block's per-step teacher trails its student: not equal to it, not the synced one
    key = "color_mlp.2.bias"
    assert not torch.equal(blocks1[0]["teacher"][key], blocks1[0]["decoder"][key])
    assert not torch.equal(blocks2[0]["teacher"][key], shared1["teacher"][key])
    assert blocks2[0]["step"] == 20  # global step continues across rounds
    # blocks are weighed by their score with the shared decoder (the previous sync's average,
    # scored at the round's start), not with their own student at the round's end
    decay = run.momentum.sync_metric_decay
    for b in range(2):
        for metric in ("psnr", "ssim"):
            start = blocks2[b][f"val_{metric}_start"]
            assert start != blocks2[b][f"val_{metric}"]
            assert float(shared1[f"{metric}_ema"][b]) == blocks1[b][f"val_{metric}_start"]
            expected = update_metric_ema(float(shared1[f"{metric}_ema"][b]), start, decay)
            assert float(shared2[f"{metric}_ema"][b]) == pytest.approx(expected, abs=1e-9)
    rows = (run.root / "rounds" / "2" / "sync.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    for column in ("weight", "psnr_start", "previous_sync_cost", "consistency_share",
                   "student_drift", "teacher_gap"):
        assert column in header
    share = float(rows[1].split("\t")[header.index("consistency_share")])
    assert 0 < share < 10


def test_degraded_block_gets_a_larger_weight(tiny_scene, tmp_path):
    """A block whose photos are noisy scores lower, so its weight moves off 1 at the sync
    after the warm-up round, while the clean block stays at 1."""
    scene = tmp_path / "scene"
    shutil.copytree(tiny_scene, scene)
    run = make_run(tmp_path / "run", scene, sigma=1.0, rounds=2)
    rng = np.random.default_rng(0)
    scene_obj = run.scene()
    for name in run.partition().blocks[1].cameras:
        if name in run.partition().blocks[0].cameras:
            continue
        path = scene_obj.camera(name).image_path
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        noisy = np.clip(pixels + rng.normal(0, 80, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path)
    n = init_blocks(run)
    for r in (1, 2):
        for b in range(n):
            train_block(run, r, b)
        rows = sync_round(run, r)
    assert rows[1]["psnr"] < rows[0]["psnr"] - 3
    assert rows[0]["weight"] == pytest.approx(1.0)
    assert rows[1]["weight"] > 1.5


def test_merge_keeps_each_anchor_exactly_once(trained_run):
    run = trained_run
    partition = run.partition()
    expected = 0
    for b in range(2):
        xyz = run.load(run.final_path(b))["anchors"]["xyz"].numpy()
        expected += int((partition.block_of_points(xyz) == b).sum())
    model = load_model(run.root / "model" / "decoder.pt")
    assert model.anchors.count == expected
    assert len(np.unique(model.anchors.xyz.numpy(), axis=0)) == expected
    assert (partition.block_of_points(model.anchors.xyz.numpy()) >= 0).all()
    ply = read_anchor_ply(run.root / "model" / "anchors.ply")
    assert torch.allclose(ply.offsets, model.anchors.offsets)
    assert torch.allclose(ply.features, model.anchors.features)
    # splats.ply as the run config's export section says: SH degree 2, (2 + 1)² coefficients
    assert read_splats(run.root / "model" / "splats.ply")["sh"].shape[1:] == (9, 3)


def test_splats_ply_re_renders_like_the_model(trained_run):
    run = trained_run
    scene = run.scene()
    camera = scene.test_cameras()[0]
    view = load_views([camera], 1, scene.scene_dir, torch.device("cpu"))[0]
    model = load_model(run.root / "model" / "decoder.pt")
    from mgs.merge import export_splats
    path = run.root / "model" / "splats_from_test_view.ply"
    export_splats(model, path, torch.tensor(camera.center, dtype=torch.float32))
    splats = read_splats(path)
    ours = render_model(model, view.viewmat, view.K, view.width, view.height).image
    theirs = render_splats(splats, viewmat=view.viewmat, K=view.K, width=view.width,
                           height=view.height).image
    assert (ours - theirs).abs().max() < 1e-3
    assert ours.std() > 0.01  # not an empty render


def test_finalize_one_block_leaves_others_byte_identical(trained_run):
    run = trained_run
    other = run.final_path(1)
    before = other.read_bytes(), other.stat().st_mtime_ns
    target_before = run.final_path(0).stat().st_mtime_ns
    finalize_block(run, 0)
    assert (other.read_bytes(), other.stat().st_mtime_ns) == before
    assert run.final_path(0).stat().st_mtime_ns != target_before


def test_train_block_resumed_after_interruption_is_identical(trained_run, tmp_path):
    run = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run.root, copy, symlinks=True,
                    ignore=shutil.ignore_patterns("final", "model"))
    (copy / "rounds" / "2" / "block_1.pt").unlink()
    resumed = Run.open(copy)
    assert train_block(resumed, 2, 1, stop_after=15) == {}  # "killed" at step 15
    assert (copy / "rounds" / "2" / "block_1.partial.pt").exists()
    assert not (copy / "rounds" / "2" / "block_1.pt").exists()
    train_block(resumed, 2, 1)
    assert not (copy / "rounds" / "2" / "block_1.partial.pt").exists()
    a = load_checkpoint(run.block_path(2, 1))
    b = load_checkpoint(copy / "rounds" / "2" / "block_1.pt")
    for group in ("anchors", "decoder", "densify"):
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)
    assert a["val_psnr"] == b["val_psnr"]


def test_block_checkpoint_from_another_config_is_refused(trained_run, tmp_path):
    run = trained_run
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"train": {**TRAIN, "n_offsets": 5}, "momentum": MOMENTUM}))
    with pytest.raises(InputError, match="different configuration"):
        train_block(Run.open(run.root, other), 1, 0)


def test_sync_keeps_the_full_checkpoints_of_the_last_rounds_only(tiny_scene, tmp_path):
    run = make_run(tmp_path / "run", tiny_scene, rounds=3, iterations_per_round=3,
                   keep_rounds=2)
    n = init_blocks(run)
    kept = {}
    for r in (1, 2, 3):
        for b in range(n):
            train_block(run, r, b)
        sync_round(run, r)
        kept[r] = sorted(str(p.relative_to(run.root)) for p in run.root.glob("rounds/*/*.pt"))
    assert "rounds/0/block_0.pt" in kept[1]
    assert not any(k.startswith("rounds/0/") for k in kept[2])  # init's folder goes whole
    assert "rounds/1/block_0.pt" in kept[2] and "rounds/1/block_0.pt" not in kept[3]
    blocks = sorted(str(p.relative_to(run.root)) for p in run.root.glob("rounds/*/block_*.pt"))
    assert blocks == [f"rounds/{r}/block_{b}.pt" for r in (2, 3) for b in range(n)]
    for r in (1, 2, 3):  # what sync and the report read stays
        assert run.shared_path(r).exists()
        assert all(run.decoder_path(r, b).exists() for b in range(n))
    finalize_block(run, 0)  # the last round is all finalize needs


def test_margin_all_blocks_start_from_the_whole_scene_they_see(tiny_scene, tmp_path):
    """margin all: each block holds its cells and what its cameras see, with the initial
    scales of the whole cloud (as officially, where every block starts from all of it); it
    trains and merges like any block."""
    from mgs.model import initial_log_scale, voxelize
    from mgs.partition.region import block_anchor_mask

    run = make_run(tmp_path / "run", tiny_scene, margin="all", rounds=1, final_iterations=0)
    n = init_blocks(run)
    partition, scene = run.partition(), run.scene()
    xyz = torch.as_tensor(voxelize(scene.points_xyz, run.train.voxel_size), dtype=torch.float32)
    log_scale = initial_log_scale(xyz)
    for b in range(n):
        anchors = run.load(run.block_path(0, b))["anchors"]
        in_cell = partition.points_in_region(xyz.numpy(), b, margin=0)
        assert in_cell.sum() < len(anchors["xyz"]) <= len(xyz)  # here they see it all
        cameras = [scene.camera(c).scaled(run.train.resolution)
                   for c in partition.blocks[b].train_cameras]
        mask = torch.from_numpy(block_anchor_mask(partition, b, xyz, log_scale, cameras))
        assert torch.equal(anchors["xyz"], xyz[mask])
        assert torch.equal(anchors["scaling"][:, 0], log_scale[mask])
        train_block(run, 1, b)
    sync_round(run, 1)
    merge_blocks(run, run.root / "model")
    merged = read_anchor_ply(run.root / "model" / "anchors.ply")
    own = [partition.points_in_region(run.load(run.final_path(b))["anchors"]["xyz"].numpy(), b,
                                      margin=0).sum() for b in range(n)]
    assert merged.count == sum(own) > 0  # cropped to the cells at merge, as officially
