"""Real-time chunking, inference-time guidance (pi0.py's RTCGuidance): the mask and weight
against the paper's values, reductions to plain sampling, the pull toward the committed actions,
and the fast sampler equal to the readable one with guidance on."""

import math

import pytest
import torch
from conftest import random_batch

import infer
import pi0
import pi05
from pi0 import RTCGuidance, euler_times, rtc_guidance_weight, rtc_mask


def test_soft_mask_matches_the_paper():
    # H = 8, s = 3, d = 2 (the paper's Kinetix setting): overlap_end = H - s = 5
    torch.testing.assert_close(rtc_mask(8, 2, 5), torch.tensor([1, 1, 0.4876, 0.1888, 0.0413, 0, 0, 0]),
                               atol=1e-4, rtol=0)
    w = rtc_mask(50, 6, 25)  # H = 50, s = 25, d = 6
    for i, value in {6: 0.877, 10: 0.488, 15: 0.189, 20: 0.041, 24: 0.0015}.items():
        assert abs(w[i].item() - value) < 1e-3, (i, w[i])
    assert w[:6].eq(1).all() and w[25:].eq(0).all() and (w[1:] <= w[:-1]).all() and w[6] < 1
    assert rtc_mask(8, 2, 5, "hard").tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert rtc_mask(8, 0, 5)[0] < 1  # no frozen step: only the decay
    with pytest.raises(ValueError, match="delay"):
        rtc_mask(8, 6, 5)


def test_guidance_weight_is_symmetric_capped_and_two_at_half():
    assert rtc_guidance_weight(0.5, 5) == 2.0
    assert rtc_guidance_weight(0.0, 5) == rtc_guidance_weight(1.0, 5) == 5
    for t in (0.1, 0.2, 0.3, 0.45):
        assert math.isclose(rtc_guidance_weight(t, 100), rtc_guidance_weight(1 - t, 100))
    times, _ = euler_times(10)  # the paper's table for n = 10, beta = 10
    got = [round(rtc_guidance_weight(t, 10), 2) for t in times]
    assert got == [10, 9.11, 4.25, 2.76, 2.17, 2.0, 2.17, 2.76, 4.25, 9.11]


def tiny(module):
    torch.manual_seed(0)
    model = module.Model(module.CONFIGS["tiny"]).eval()
    for name, p in model.named_parameters():  # adaRMS starts at zero: make pi0.5's time matter
        if "dense" in name:
            p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
def test_zero_weights_equal_plain_sampling(module):
    model = tiny(module)
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim)
    target = torch.randn_like(noise)
    plain = model.sample_actions(batch, noise=noise)
    for jacobian in ("full", "identity"):
        rtc = RTCGuidance(target, torch.zeros(model.cfg.action_horizon), beta=5.0, jacobian=jacobian)
        torch.testing.assert_close(model.sample_actions(batch, noise=noise, rtc=rtc), plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
@pytest.mark.parametrize("jacobian", ["full", "identity"])
def test_guidance_pulls_the_frozen_steps_to_the_committed_actions(module, jacobian):
    """The committed steps come back close to the previous chunk; steps past the overlap are
    left alone (their weight is 0, so they move only through attention)."""
    model = tiny(module)
    C, A = model.cfg.action_horizon, model.cfg.action_dim
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, C, A, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, C, A, generator=torch.Generator().manual_seed(2))
    plain = model.sample_actions(batch, noise=noise)
    rtc = RTCGuidance(target, rtc_mask(C, delay=2, overlap_end=4), beta=10.0, jacobian=jacobian)
    guided = model.sample_actions(batch, noise=noise, rtc=rtc)
    before = (plain[:, :2] - target[:, :2]).abs().mean()
    after = (guided[:, :2] - target[:, :2]).abs().mean()
    assert after < 0.3 * before, (before, after)


@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
def test_fast_sampler_with_guidance_equals_the_readable_one(module):
    model = tiny(module)
    C, A = model.cfg.action_horizon, model.cfg.action_dim
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, C, A, generator=torch.Generator().manual_seed(3))
    dims = (torch.arange(A) < 2).float()  # the robot's 2 real dims; padded dims get no guidance
    rtc = RTCGuidance(torch.randn(2, C, A), rtc_mask(C, 2, 4)[None, :, None] * dims, beta=5.0)
    torch.testing.assert_close(infer.FastSampler(model)(batch, noise, rtc=rtc),
                               model.sample_actions(batch, noise=noise, rtc=rtc), rtol=0, atol=1e-5)
