import json
import logging
import math

import numpy as np
import pytest

from mgs.cli import main as cli_main
from mgs.config import TrainConfig
from mgs.errors import InputError
from mgs.partition import PartitionConfig, load_partition, partition_scene
from mgs.partition.assign import merge_starved, split_validation
from mgs.partition.geometry import auto_aabb, cell_bounds, cell_ids, contract, uncontract
from mgs.scene import load_scene

UNIT = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
BOX = np.array([[-10.0, 0.0, 5.0], [30.0, 20.0, 9.0]])


def test_contraction_maps_the_aabb_to_the_middle_half():
    rng = np.random.default_rng(0)
    inside = rng.uniform(BOX[0], BOX[1], size=(1000, 3))
    q = contract(inside, BOX)
    assert (q >= 0.25).all() and (q <= 0.75).all()
    assert np.allclose(contract(BOX, BOX), [[0.25] * 3, [0.75] * 3])
    assert np.allclose(contract(BOX.mean(0), BOX), 0.5)


def test_contraction_sends_outside_points_to_the_shell():
    rng = np.random.default_rng(1)
    far = rng.normal(size=(1000, 3)) * 1e3 + BOX.mean(0)
    far = far[np.abs(2 * (far - BOX[0]) / (BOX[1] - BOX[0]) - 1).max(1) > 1]
    norm = np.abs(contract(far, BOX) - 0.5).max(1)
    assert (norm > 0.25).all() and (norm < 0.5).all()
    assert np.abs(contract([1e12, 0.0, 0.0], UNIT) - [1.0, 0.5, 0.5]).max() < 1e-9


def test_contraction_is_continuous_at_the_aabb_and_monotone():
    eps = 1e-7
    for corner in ([30.0, 10.0, 7.0], [30.0, 20.0, 9.0], [-10.0, 3.0, 5.0]):
        corner = np.array(corner)
        direction = np.sign(corner - BOX.mean(0))
        a, b = contract(corner - eps * direction, BOX), contract(corner + eps * direction, BOX)
        assert np.abs(a - b).max() < 1e-6
    x = np.linspace(-1e4, 1e4, 20001)
    line = np.stack([x, np.full_like(x, 3.0), np.full_like(x, 6.0)], axis=1)
    assert (np.diff(contract(line, BOX)[:, 0]) > 0).all()
    points = np.random.default_rng(2).normal(size=(500, 3)) * 50
    assert np.allclose(uncontract(contract(points, BOX), BOX), points, rtol=1e-6, atol=1e-6)


def test_cell_ids_by_hand_x_fastest():
    # unit aabb: q = x/4 + 1/2 inside
    points = [[-0.5, -0.5, -0.5], [0.5, -0.5, -0.5], [-0.5, 0.5, -0.5], [-0.5, -0.5, 0.5],
              [0.5, 0.5, 0.5]]
    assert cell_ids(points, UNIT, (2, 2, 2)).tolist() == [0, 1, 2, 4, 7]
    # (3, 2, 1): x = 0.9 -> q 0.725 -> ix 2; y = 0.1 -> q 0.525 -> iy 1; id = 1*3 + 2
    assert cell_ids([[0.9, 0.1, 0.0]], UNIT, (3, 2, 1)).tolist() == [5]
    assert cell_ids([[1e9, 0.1, -1e9]], UNIT, (3, 2, 1)).tolist() == [5]
    assert cell_ids([[-1e9, -1e9, 0.0]], UNIT, (3, 2, 1)).tolist() == [0]
    # half-open: the cut at q = 0.5 belongs to the upper cell
    assert cell_ids([[0.0, -0.5, 0.0]], UNIT, (2, 1, 1)).tolist() == [1]
    assert cell_ids([[0.0, 0.0, 0.0]], UNIT, (2, 3, 4)).tolist() == [1 + 1 * 2 + 2 * 6]


def test_every_point_lies_in_exactly_one_cell():
    dims = (3, 2, 4)
    rng = np.random.default_rng(3)
    points = np.concatenate([rng.uniform(-40, 60, (2000, 3)), rng.normal(size=(200, 3)) * 1e6,
                             BOX, [[-10.0, 10.0, 7.0], [10.0, 10.0, 7.0]]])
    q, ids = contract(points, BOX), cell_ids(points, BOX, dims)
    inside = np.stack([((q >= lo) & (q < hi)).all(1)
                       for lo, hi in (cell_bounds(c, dims) for c in range(24))], axis=1)
    assert (inside.sum(1) == 1).all()
    assert (np.argmax(inside, axis=1) == ids).all()


def _looking_at(centres, focus):
    return np.asarray(focus) - np.asarray(centres)


def test_auto_aabb_centres_on_the_focus_point():
    focus = np.array([3.0, -2.0, 1.0])
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    centres = focus + np.stack([20 * np.cos(angles), 10 * np.sin(angles),
                                8 + 2 * np.cos(3 * angles)], axis=1)
    points = focus + np.random.default_rng(4).normal(size=(300, 3)) * [5, 5, 1]
    box = auto_aabb(centres, _looking_at(centres, focus), points)
    assert np.allclose(box.mean(0), focus, atol=0.01)  # the ridge term biases a little
    assert np.allclose((box[1] - box[0]) / 2, np.median(np.abs(centres - focus), 0), rtol=0.01)


def test_auto_aabb_flat_and_parallel_flights(caplog):
    # street level: cameras on a circle at the focus height -> flat in z
    focus = np.array([0.0, 0.0, 2.0])
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    centres = focus + np.stack([30 * np.cos(angles), 30 * np.sin(angles), 0 * angles], axis=1)
    points = np.random.default_rng(5).uniform([-40, -40, 0], [40, 40, 10], (2000, 3))
    with caplog.at_level(logging.INFO, logger="mgs.partition"):
        box = auto_aabb(centres, _looking_at(centres, focus), points)
    assert "flat along z" in caplog.text
    extent = np.subtract(*np.percentile(points[:, 2], [99.5, 0.5]))
    assert (box[1] - box[0])[2] == pytest.approx(extent, rel=1e-6)
    # pure nadir flight: parallel axes leave the focus height to the SfM points (ground)
    xy = np.stack(np.meshgrid(np.linspace(-50, 50, 5), np.linspace(-50, 50, 5)), -1).reshape(-1, 2)
    centres = np.concatenate([xy, np.full((25, 1), 80.0)], axis=1)
    axes = np.tile([0.0, 0.0, -1.0], (25, 1))
    box = auto_aabb(centres, axes, points)
    assert box.mean(0)[2] == pytest.approx(np.median(points[:, 2]), abs=0.1)
    assert (box[0] < points.mean(0)).all() and (box[1] > points.mean(0)).all()


@pytest.fixture(scope="module")
def tiny_partition(tiny_scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("partition")
    config = PartitionConfig(block_dim=[2, 2, 1], min_cameras=2)
    return out, partition_scene(tiny_scene, out, config)


def test_tiny_scene_partition_covers_every_camera_and_writes_files(tiny_scene, tiny_partition):
    out, partition = tiny_partition
    scene = load_scene(tiny_scene)
    assert partition.num_blocks == 4 and partition.assignment == "projection"
    covered = set()
    for block in partition.blocks:
        assert set(block.validation_cameras) <= set(block.train_cameras)  # trained on too
        covered |= set(block.cameras)
        assert block.points_in_cell <= block.points_with_margin
    assert covered == set(scene.train_names)
    assert sum(b.points_in_cell for b in partition.blocks) == len(scene.points_xyz)
    for name in ("partition.json", "partition.tsv", "partition.png"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    data = json.loads((out / "partition.json").read_text())
    assert data["block_dim"] == [2, 2, 1] and data["up"] == "z" and len(data["aabb"]) == 6
    assert data["blocks"][0]["cell_bounds"] == [[[0.0, 0.0, 0.0], [0.5, 0.5, 1.0]]]
    tsv = (out / "partition.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["block", "cells", "train_cameras", "validation_cameras",
                                  "points_in_cell", "points_with_margin"]
    assert len(tsv) == 5
    loaded = load_partition(out)
    assert loaded.to_json() == partition.to_json()


def test_validation_is_every_tenth_of_the_blocks_cameras():
    names = [f"v{i:03d}.png" for i in range(23)][::-1]
    train, validation = split_validation(names)
    assert validation == ["v000.png", "v010.png", "v020.png"]
    assert train == sorted(names) and set(validation) <= set(train)


def test_block_of_points_assigns_each_point_once(tiny_scene, tiny_partition):
    _, partition = tiny_partition
    points = np.concatenate([load_scene(tiny_scene).points_xyz,
                             np.random.default_rng(6).normal(size=(500, 3)) * 300])
    owner = partition.block_of_points(points)
    assert ((owner >= 0) & (owner < partition.num_blocks)).all()
    masks = np.stack([partition.points_in_region(points, b, margin=0)
                      for b in range(partition.num_blocks)], axis=1)
    assert (masks.sum(1) == 1).all() and (np.argmax(masks, 1) == owner).all()
    grown = np.stack([partition.points_in_region(points, b, margin=0.3)
                      for b in range(partition.num_blocks)], axis=1)
    assert (grown >= masks).all() and grown.sum() > masks.sum()
    assert partition.points_in_region(points, 0, margin=math.inf).all()


def test_starved_block_is_merged_into_its_nearest_neighbour(caplog):
    # 2x2x1: cell 3 has one camera; cells 1 and 2 are equally near, 2 has fewer cameras
    members = np.zeros((30, 4), dtype=bool)
    members[:10, 0] = members[10:20, 1] = members[20:26, 2] = members[26, 3] = True
    members[27:, 0] = True
    with caplog.at_level(logging.WARNING, logger="mgs.partition"):
        groups, merged = merge_starved([[0], [1], [2], [3]], members, np.array([5, 5, 5, 5]),
                                       5, (2, 2, 1), lambda cells: members[:, cells].any(1))
    assert groups == [[0], [1], [2, 3]]
    assert merged.sum(0).tolist() == [13, 10, 7]
    assert "cells [3]: 1 cameras" in caplog.text


def test_empty_ring_joins_the_cells_next_to_it_not_one_block():
    # 4x4x1 with data in the inner 2x2 cells (5, 6, 9, 10) only: each empty ring cell joins its
    # nearest inner cell; chaining the ring into one block would grow that block's margin
    # around all the others
    members = np.zeros((40, 16), dtype=bool)
    points = np.zeros(16, dtype=int)
    for i, cell in enumerate((5, 6, 9, 10)):
        members[10 * i:10 * (i + 1), cell] = True
        points[cell] = 100
    groups, _ = merge_starved([[c] for c in range(16)], members, points, 5, (4, 4, 1),
                              lambda cells: members[:, cells].any(1))
    assert len(groups) == 4 and all(len(g) == 4 for g in groups)
    assert sorted(g for group in groups for g in group) == list(range(16))
    assert [sorted(set(g) & {5, 6, 9, 10}) for g in groups] == [[5], [6], [9], [10]]
    assert [0, 1, 4, 5] in groups and [10, 11, 14, 15] in groups


def test_empty_ring_does_not_chain_onto_the_block_that_took_the_first_empty_cell():
    # As above, but the ring cells hold a camera or two (flights past the data's edge) and the
    # block of cell 5 has the fewest cameras, so it wins every tie: measured to the cells
    # holding points, each ring cell still joins the inner cell next to it
    members = np.zeros((60, 16), dtype=bool)
    points = np.zeros(16, dtype=int)
    start = 0
    for cell, cameras in ((5, 6), (6, 10), (9, 10), (10, 10)):
        members[start:start + cameras, cell] = True
        points[cell] = 100
        start += cameras
    for cell in (0, 1, 2, 3, 4, 7, 8, 11, 12, 13, 14, 15):
        members[start, cell] = True
        start += 1
    groups, _ = merge_starved([[c] for c in range(16)], members, points, 5, (4, 4, 1),
                              lambda cells: members[:, cells].any(1))
    assert [sorted(set(g) & {5, 6, 9, 10}) for g in groups] == [[5], [6], [9], [10]]
    assert all(len(g) == 4 for g in groups)
    assert [0, 1, 4, 5] in groups and [10, 11, 14, 15] in groups


def test_starved_blocks_merge_end_to_end(tiny_scene, tmp_path, caplog):
    config = PartitionConfig(block_dim=[3, 3, 1], assignment="center", min_cameras=3)
    with caplog.at_level(logging.WARNING, logger="mgs.partition"):
        partition = partition_scene(tiny_scene, tmp_path, config)
    assert "merged into the block of cells" in caplog.text
    assert partition.num_blocks < 9
    assert sorted(c for b in partition.blocks for c in b.cells) == list(range(9))
    assert any(len(b.cells) > 1 for b in partition.blocks)
    assert min(len(b.cameras) for b in partition.blocks) >= 3


@pytest.mark.parametrize("values, message", [
    (dict(aabb=[500, 500, 500, 600, 600, 600]), "contains none"),
    (dict(block_dim=[2, 0, 1]), "block_dim"),
    (dict(block_dim=[2, 2]), "block_dim"),
    (dict(min_cameras=1000), "min_cameras"),
    (dict(assignment="ssim"), "coarse"),
    (dict(aabb=[0, 0, 0, -1, 1, 1]), "aabb"),
    (dict(margin=-1), "margin"),
    (dict(blocks=4), "unknown partition key.*blocks"),
])
def test_bad_input_is_refused_with_a_clear_message(tiny_scene, tmp_path, values, message):
    with pytest.raises(InputError, match=message):
        partition_scene(tiny_scene, tmp_path, PartitionConfig.from_dict(values))
    assert not (tmp_path / "partition.json").exists()


def test_config_from_yaml_and_cli(tiny_scene, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text("partition:\n  block_dim: [2, 1, 1]\n  margin: .inf\n"
                           "  assignment: center\n  min_cameras: 2\n")
    config = PartitionConfig.from_yaml(config_path)
    assert config.block_dim == [2, 1, 1] and math.isinf(config.margin)
    out = tmp_path / "out"
    assert cli_main(["partition", "--scene", str(tiny_scene), "--out", str(out), "--config",
                     str(config_path), "--block-dim", "1", "2", "1"]) == 0
    partition = load_partition(out / "partition.json")
    assert partition.block_dim == [1, 2, 1] and math.isinf(partition.margin)
    assert partition.assignment == "center" and partition.threshold is None
    config_path.write_text("partition:\n  bloc_dim: [2, 1, 1]\n")
    assert cli_main(["partition", "--scene", str(tiny_scene), "--out", str(out), "--config",
                     str(config_path)]) == 2


def test_ssim_assignment_extends_the_centre_assignment(tiny_scene, tmp_path):
    from mgs.training_loop import CHECKPOINT_NAME, train_scene

    # a barely trained coarse model still renders each cell's anchors somewhere
    small = dict(iterations=8, lr_max_steps=8, voxel_size=0.05, start_stat=100, update_from=100,
                 update_until=100, eval_interval=8, checkpoint_interval=8, threads=2)
    train_scene(tiny_scene, tmp_path / "coarse", TrainConfig.from_dict(small))
    base = dict(block_dim=[2, 2, 1], min_cameras=2, ssim_max_side=32)
    centre = partition_scene(tiny_scene, tmp_path / "centre",
                             PartitionConfig(assignment="center", **base))
    ssim = partition_scene(tiny_scene, tmp_path / "ssim", PartitionConfig(
        assignment="ssim", coarse=str(tmp_path / "coarse" / CHECKPOINT_NAME), **base))
    assert ssim.threshold == 0.05
    assert [b.cells for b in ssim.blocks] == [b.cells for b in centre.blocks]
    added = 0
    for a, b in zip(centre.blocks, ssim.blocks):
        assert set(a.cameras) <= set(b.cameras)
        added += len(b.cameras) - len(a.cameras)
    assert added > 0


def test_margin_all_keeps_the_cells_and_what_the_cameras_see():
    """margin all: a block holds its own cells (what merge keeps) and every anchor in the
    frustum of one of its training cameras, nothing else."""
    import torch

    from mgs.partition import Block, Partition
    from mgs.partition.region import block_anchor_mask, seen_by
    from mgs.scene import Camera

    # a camera at the origin looking along +z, 100 x 100 pixels, focal length 100
    camera = Camera("a.png", [[100, 0, 50], [0, 100, 50], [0, 0, 1]], 100, 100, np.eye(4),
                    "a.png")
    xyz = torch.tensor([[0.0, 0.0, 5.0],     # straight ahead: seen
                        [1.0, 0.0, 5.0],     # 20 px right of the centre: seen
                        [0.0, 0.0, -5.0],    # behind the camera
                        [100.0, 0.0, 5.0],   # far outside the image
                        [-30.0, 0.0, -5.0]])  # behind, in the other block's cell
    log_scale = torch.full((5,), math.log(0.01))
    assert seen_by([camera], xyz, log_scale).tolist() == [True, True, False, False, False]
    partition = Partition(aabb=[-10, -10, -10, 10, 10, 10], block_dim=[2, 1, 1], up="z",
                          margin="all", assignment="center", threshold=None, min_cameras=2,
                          blocks=[Block(0, [0], ["a.png"], []), Block(1, [1], ["a.png"], [])])
    # cell 0 is x < 0: the last point; cell 1 is x >= 0: the first four
    assert block_anchor_mask(partition, 0, xyz, log_scale, [camera]).tolist() == [
        True, True, False, False, True]
    assert block_anchor_mask(partition, 1, xyz, log_scale, []).tolist() == [
        True, True, True, True, False]
    with pytest.raises(ValueError, match="cameras"):
        partition.points_in_region(xyz.numpy(), 0)
    saved = Partition.from_json(json.loads(json.dumps(partition.to_json())))
    assert saved.margin == "all"


def test_margin_all_from_config_cli_and_schema(tiny_scene, tmp_path):
    from mgs.validate import check_scene

    assert PartitionConfig.from_dict({"margin": "all"}).margin == "all"
    assert PartitionConfig.from_dict({"margin": "ALL"}).margin == "all"
    with pytest.raises(InputError, match="margin"):
        PartitionConfig.from_dict({"margin": "most"})
    check_scene({"partition": {"margin": "all"}}, "scenes.x")
    with pytest.raises(InputError, match="margin"):
        check_scene({"partition": {"margin": "most"}}, "scenes.x")
    out = tmp_path / "out"
    assert cli_main(["partition", "--scene", str(tiny_scene), "--out", str(out),
                     "--block-dim", "2", "1", "1", "--assignment", "center", "--min-cameras",
                     "2", "--margin", "all"]) == 0
    partition = load_partition(out / "partition.json")
    assert partition.margin == "all"
    assert cli_main(["partition", "--scene", str(tiny_scene), "--out", str(tmp_path / "m"),
                     "--block-dim", "2", "1", "1", "--assignment", "center", "--min-cameras",
                     "2", "--margin", "0.1"]) == 0
    assert load_partition(tmp_path / "m" / "partition.json").margin == 0.1
    points = load_scene(tiny_scene).points_xyz
    for b, block in enumerate(partition.blocks):
        in_cell = partition.points_in_region(points, b, margin=0).sum()
        assert in_cell <= block.points_with_margin <= len(points)
