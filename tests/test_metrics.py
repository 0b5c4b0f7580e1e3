import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from mgs.metrics import psnr, ssim, ssim_map


def test_psnr_known_value():
    a = torch.full((8, 8, 3), 0.5)
    assert psnr(a, a + 0.1).item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(40, 50, 3, generator=g)
    assert ssim(image, image).item() == pytest.approx(1.0, abs=1e-6)
    noisy = (image + 0.1 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    noisier = (image + 0.3 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    assert ssim(noisy, image) > ssim(noisier, image)


def test_ssim_map_matches_scikit_image_away_from_borders():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(32, 36, 3, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim_map(a, b)[0].permute(1, 2, 0).numpy()
    _, theirs = structural_similarity(a.numpy(), b.numpy(), channel_axis=2, data_range=1.0,
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, full=True)
    np.testing.assert_allclose(ours[5:-5, 5:-5], theirs[5:-5, 5:-5], atol=1e-8)


def test_batched_ssim_matches_single():
    a = torch.rand(2, 16, 16, 3)
    b = torch.rand(2, 16, 16, 3)
    batch = ssim(a, b)
    assert batch.shape == (2,)
    assert batch[1].item() == pytest.approx(ssim(a[1], b[1]).item(), abs=1e-6)
