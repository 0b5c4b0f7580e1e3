import math

import pytest
import torch

from mgs.errors import InputError
from mgs.momentum import (MomentumConfig, block_weights, ema_update, update_metric_ema,
                          weighted_average)


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


def test_weighted_average_and_teacher_ema():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    avg = weighted_average([a, b], [1.0, 3.0])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))  # (1*1 + 3*3)/4, (2 + 18)/4
    teacher = ema_update({"w": torch.tensor([0.0, 10.0])}, avg, 0.9)
    assert torch.allclose(teacher["w"], torch.tensor([0.25, 9.5]))


def test_momentum_config_validation():
    assert MomentumConfig.from_dict({"mode": "shared"}).shares_decoder
    assert not MomentumConfig.from_dict({"mode": "independent"}).shares_decoder
    with pytest.raises(InputError, match="mode"):
        MomentumConfig.from_dict({"mode": "magic"})
    with pytest.raises(InputError, match="rounds"):
        MomentumConfig.from_dict({"rounds": -1})
    with pytest.raises(InputError, match="unknown"):
        MomentumConfig.from_dict({"momentun": 0.5})

