"""Teachers fixed for a round (global, global-ema) and the sync that fits the shared decoder."""

import pandas as pd
import pytest
import torch

from mgs.blocks import init_blocks, sync_round, train_block
from mgs.blocks.round import _block_trainer
from mgs.errors import InputError
from mgs.model import Decoder, DecoderInputs, apply_decoder
from mgs.momentum import MomentumConfig, next_teacher
from mgs.blocks.fit import decoder_outputs, fit_shared_decoder, output_distance
from mgs.train import consistency_loss

from test_blocks import make_run


def _state(*values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_next_teacher_by_hand():
    average, previous, blocks = _state(1.0, 3.0), _state(5.0, -1.0), _state(7.0, 7.0)
    assert next_teacher("step", 2, average, blocks, previous, 0.5)["w"].tolist() == [7.0, 7.0]
    assert next_teacher("global", 2, average, None, previous, 0.5)["w"].tolist() == [1.0, 3.0]
    # global-ema: the first sync takes the average (round 0's teacher is the random decoder)
    assert next_teacher("global-ema", 1, average, None, previous, 0.5)["w"].tolist() == [1.0, 3.0]
    # then m_s·previous + (1 − m_s)·average: 0.75·5 + 0.25·1 = 4, 0.75·−1 + 0.25·3 = 0
    assert next_teacher("global-ema", 2, average, None, previous, 0.75)["w"].tolist() == [4.0, 0.0]


def test_teacher_and_sync_names_are_checked():
    with pytest.raises(InputError, match="'teacher' must be one of step, global, global-ema"):
        MomentumConfig.from_dict({"teacher": "blocks"})
    with pytest.raises(InputError, match="'sync' must be one of average, fit"):
        MomentumConfig.from_dict({"sync": "median"})
    config = MomentumConfig.from_dict({"mode": "momentum", "teacher": "global"})
    assert config.uses_teacher and not config.per_step_teacher


def _inputs(rows=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 35, generator=generator)
    return DecoderInputs(xyz=torch.zeros(rows, 3), scaling=torch.zeros(rows, 6), z=z)


def test_a_fixed_teacher_pulls_the_student_toward_it_and_not_when_equal():
    torch.manual_seed(0)
    teacher, student = Decoder(), Decoder()
    inputs = _inputs()

    def pull(model):
        attrs, target = apply_decoder(model, inputs), apply_decoder(teacher, inputs)
        return consistency_loss(attrs, target, target.opacity > 0)

    student.load_state_dict(teacher.state_dict())
    pull(student).backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in student.parameters())

    student = Decoder()  # another random decoder: gradient steps on the pull alone approach it
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    start = float(pull(student))
    for _ in range(50):
        optimizer.zero_grad()
        pull(student).backward()
        optimizer.step()
    assert float(pull(student)) < 0.2 * start


def _sample(rows=256, seed=0):
    return {"z": _inputs(rows, seed).z}


def test_fit_with_one_block_returns_that_blocks_decoder_outputs():
    torch.manual_seed(1)
    block = {k: v.clone() for k, v in Decoder().state_dict().items()}
    sample = _sample()
    state, fit = fit_shared_decoder(block, [block], [sample], [1.0], 32, 10, steps=20)
    assert fit["fit_before"] == [0.0] and fit["fit_after"] == [0.0]
    for key in block:
        assert torch.equal(state[key], block[key]), key


def test_fit_reproduces_drifted_blocks_better_than_their_average():
    torch.manual_seed(2)
    students = [{k: v.clone() for k, v in Decoder().state_dict().items()} for _ in range(2)]
    # each block's features in its own region of input space, as block-local anchors are
    samples = [{"z": _sample(256, b)["z"] + 3.0 * (2 * b - 1)} for b in range(2)]
    average = {k: (students[0][k] + students[1][k]) / 2 for k in students[0]}
    state, fit = fit_shared_decoder(average, students, samples, [1.0, 1.0], 32, 10, steps=300)
    assert all(a < 0.5 * b for a, b in zip(fit["fit_after"], fit["fit_before"]))
    fitted = Decoder()
    fitted.load_state_dict(state)
    with torch.no_grad():  # the reported distances are those of the returned state
        for sample, student, after in zip(samples, students, fit["fit_after"]):
            model = Decoder()
            model.load_state_dict(student)
            distance = output_distance(decoder_outputs(fitted, sample),
                                       decoder_outputs(model, sample))
            assert float(distance) == pytest.approx(after, rel=1e-5)


@pytest.mark.parametrize("teacher", ["global", "global-ema"])
def test_sync_writes_the_teacher_the_next_round_reads(tiny_scene, tmp_path, teacher):
    run = make_run(tmp_path / "run", tiny_scene, mode="momentum", teacher=teacher,
                   teacher_sync_momentum=0.75, sync="fit")
    n = init_blocks(run)
    for r in (1, 2):
        for b in range(n):
            train_block(run, r, b)
        sync_round(run, r)
    shared1, shared2 = run.load(run.shared_path(1)), run.load(run.shared_path(2))
    for key, value in shared2["teacher"].items():
        assert torch.equal(shared1["teacher"][key], shared1["student"][key])  # first sync
        expected = (shared2["student"][key] if teacher == "global" else
                    (0.75 * shared1["teacher"][key].double()
                     + 0.25 * shared2["student"][key].double()).to(value.dtype))
        assert torch.allclose(value, expected, atol=1e-7), key
    # round 3 reads it, fixed: its teacher does not move during the round
    device = torch.device("cpu")
    source = run.load(run.block_path(2, 0))
    trainer, _ = _block_trainer(run, source, 0, shared2, True, device)
    assert trainer.teacher_momentum == 1.0 and trainer.consistency_weight > 0
    for _ in range(3):
        trainer.train_step()
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, shared2["teacher"][key]), key
    # round 1 had no sync to pull toward: no consistency term then
    first = run.load(run.decoder_path(1, 0))
    assert first["loss_sums"]["consistency"] == 0.0
    assert run.load(run.decoder_path(2, 0))["loss_sums"]["consistency"] > 0.0
    # the fit sync wrote each block's distance to the shared decoder, and reduced it
    table = pd.read_csv(run.root / "rounds" / "2" / "sync.tsv", sep="\t")
    assert (table["fit_after"] < table["fit_before"]).all()
