import math

import numpy as np
import pytest
import torch

from mgs.errors import InputError
from mgs.model import Anchors, Decoder, decode_attributes
from mgs.momentum import (MomentumConfig, block_weights, ema_update_, update_metric_ema,
                          weighted_average)
from mgs.train import consistency_loss


def test_metric_ema_starts_at_first_value_then_smooths():
    assert update_metric_ema(None, 20.0, 0.9) == 20.0
    assert update_metric_ema(float("nan"), 20.0, 0.9) == 20.0
    assert update_metric_ema(20.0, 30.0, 0.9) == pytest.approx(21.0)


def test_block_weights_hand_computed():
    # best block: weight 1; a block 3 dB and 0.05 SSIM behind with sigma 12:
    # 2 - exp(-(9 + 0.25) / 288) = 1.03161...
    weights = block_weights([25.0, 22.0], [0.80, 0.75], sigma=12.0)
    assert weights[0] == pytest.approx(1.0)
    assert weights[1] == pytest.approx(2 - math.exp(-9.25 / 288), abs=1e-12)
    assert weights[1] == pytest.approx(1.0316, abs=1e-4)  # ALGORITHM.md §4 example
    # maxima are independent: best PSNR and best SSIM may be different blocks
    w = block_weights([25.0, 24.0], [0.70, 0.80], sigma=1.0)
    assert w[0] == pytest.approx(2 - math.exp(-1.0 / 2))
    assert w[1] == pytest.approx(2 - math.exp(-1.0 / 2))


def test_weighted_average():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    avg = weighted_average([a, b], [1.0, 3.0])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))  # (1*1 + 3*3)/4, (2 + 18)/4


def test_momentum_config_validation():
    assert MomentumConfig.from_dict({"mode": "shared"}).shares_decoder
    assert not MomentumConfig.from_dict({"mode": "independent"}).shares_decoder
    with pytest.raises(InputError, match="mode"):
        MomentumConfig.from_dict({"mode": "magic"})
    with pytest.raises(InputError, match="rounds"):
        MomentumConfig.from_dict({"rounds": -1})
    with pytest.raises(InputError, match="unknown"):
        MomentumConfig.from_dict({"momentun": 0.5})



def test_sync_metric_decay_is_the_per_step_ema_held_for_a_round():
    config = MomentumConfig.from_dict({"metric_ema": 0.9, "iterations_per_round": 2})
    assert config.sync_metric_decay == pytest.approx(0.81)
    # a real round: the EMA follows the latest evaluation, as officially
    assert MomentumConfig.from_dict({"iterations_per_round": 150}).sync_metric_decay < 1e-6


def test_per_step_teacher_ema_in_place_hand_computed():
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, -2.0]]))
        teacher.bias.fill_(4.0)
        student.weight.copy_(torch.tensor([[3.0, 0.0]]))
        student.bias.fill_(-6.0)
    ema_update_(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.tensor([[1.2, -1.8]]))  # 0.9·1 + 0.1·3, ...
    assert torch.allclose(teacher.bias, torch.tensor([3.0]))  # 0.9·4 − 0.1·6
    ema_update_(teacher, student, 0.9)
    assert torch.allclose(teacher.bias, torch.tensor([2.1]))  # 0.9·3 − 0.6
    assert torch.equal(student.bias, torch.tensor([-6.0]))  # the student is untouched


def _anchors_and_decoders(seed=0):
    torch.manual_seed(seed)
    points = np.random.default_rng(seed).uniform(-1, 1, (40, 3))
    anchors = Anchors.from_points(points, 32, 10, 0.01)
    with torch.no_grad():
        anchors.features.normal_()
    return anchors, Decoder(32, 10), Decoder(32, 10).requires_grad_(False)


def _consistency(anchors, student, teacher):
    visible = torch.ones(anchors.count, dtype=torch.bool)
    center = torch.tensor([0.0, 0.0, 5.0])
    s = decode_attributes(student, anchors, visible, center)
    t = decode_attributes(teacher, anchors, visible, center)
    return consistency_loss(s, t, s.opacity > 0)


def test_consistency_gradient_reaches_anchor_features_through_both_branches():
    anchors, student, teacher = _anchors_and_decoders()
    loss = _consistency(anchors, student, teacher)
    loss.backward()
    assert loss.item() > 0
    assert anchors.features.grad.abs().sum() > 0
    assert anchors.scaling.grad[:, 3:].abs().sum() > 0  # the scale term
    assert all(p.grad is None for p in teacher.parameters())  # frozen teacher
    # the teacher branch contributes: detaching it changes the anchors' gradient
    via_both = anchors.features.grad.clone()
    anchors.features.grad = None
    visible = torch.ones(anchors.count, dtype=torch.bool)
    center = torch.tensor([0.0, 0.0, 5.0])
    s = decode_attributes(student, anchors, visible, center)
    with torch.no_grad():
        t = decode_attributes(teacher, anchors, visible, center)
    consistency_loss(s, t, s.opacity > 0).backward()
    assert not torch.allclose(anchors.features.grad, via_both)


def test_consistency_gradient_is_zero_when_teacher_equals_student():
    anchors, student, teacher = _anchors_and_decoders()
    teacher.load_state_dict(student.state_dict())
    loss = _consistency(anchors, student, teacher)
    loss.backward()
    assert loss.item() == 0.0
    assert anchors.features.grad.abs().max() == 0.0
    assert all(p.grad.abs().max() == 0.0 for p in student.parameters())
