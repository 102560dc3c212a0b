"""guidance.py: real-time chunking (the mask and weight against the paper's values, reductions to
plain sampling, the pull toward the committed actions, committed steps of a model trained for
them), the compiled sampler equal to the readable one with every guide on, and the robot's side
(Policy's leftover, RealTimeChunker). Classifier-free guidance: tests/test_policy.py."""

import math

import pytest
import torch
from conftest import random_batch

import guidance
import infer
import models
import pi0
import pi05
from guidance import rtc_guidance_weight, rtc_mask
from pi0 import euler_times


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
    model = models.build(module.CONFIGS["tiny"]).eval()
    for name, p in model.named_parameters():  # adaRMS starts at zero: make pi0.5's time matter
        if "dense" in name:
            p.data.normal_(0, 0.1)
    return model


def tiny_with_inputs(module, seed):
    """A tiny model, a batch of 2 observations and seeded noise (B, C, A)."""
    model = tiny(module)
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim, generator=torch.Generator().manual_seed(seed))
    return model, batch, noise


@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
def test_zero_weights_equal_plain_sampling(module):
    model = tiny(module)
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim)
    target = torch.randn_like(noise)
    plain = model.sample_actions(batch, noise=noise)
    for jacobian in ("full", "identity"):
        rtc = guidance.rtc(target, torch.zeros(model.cfg.action_horizon), beta=5.0, jacobian=jacobian)
        torch.testing.assert_close(model.sample_actions(batch, noise=noise, guide=rtc), plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
@pytest.mark.parametrize("jacobian", ["full", "identity"])
def test_guidance_pulls_the_frozen_steps_to_the_committed_actions(module, jacobian):
    """The committed steps come back close to the previous chunk; steps past the overlap are
    left alone (their weight is 0, so they move only through attention)."""
    model, batch, noise = tiny_with_inputs(module, seed=1)
    C, A = model.cfg.action_horizon, model.cfg.action_dim
    target = torch.randn(2, C, A, generator=torch.Generator().manual_seed(2))
    plain = model.sample_actions(batch, noise=noise)
    rtc = guidance.rtc(target, rtc_mask(C, delay=2, overlap_end=4), beta=10.0, jacobian=jacobian)
    guided = model.sample_actions(batch, noise=noise, guide=rtc)
    before = (plain[:, :2] - target[:, :2]).abs().mean()
    after = (guided[:, :2] - target[:, :2]).abs().mean()
    assert after < 0.3 * before, (before, after)


@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
def test_compiled_sampler_with_every_guide_equals_the_readable_one(module):
    model, batch, noise = tiny_with_inputs(module, seed=3)
    C, A = model.cfg.action_horizon, model.cfg.action_dim
    dims = (torch.arange(A) < 2).float()  # the robot's 2 real dims; padded dims get no guidance
    target = torch.randn(2, C, A)
    conditioned = dict(batch, uncond_tokens=batch["tokens"].flip(1), uncond_token_masks=batch["token_masks"].flip(1))
    for guide, b in ((guidance.rtc(target, rtc_mask(C, 2, 4)[None, :, None] * dims, beta=5.0), batch),
                     (guidance.committed(target, torch.tensor([3, 1])), batch),
                     (guidance.cfg(2.0), guidance.cfg_batch(conditioned))):
        torch.testing.assert_close(infer.CompiledSampler(model)(b, noise, guide=guide),
                                   model.sample_actions(b, noise=noise, guide=guide), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The latency simulation (sim.evaluate with a delay) and Policy's guidance from robot actions

def test_delayed_switching_executes_what_a_robot_would(monkeypatch):
    """s = 2, d = 2: a chunk is asked for after 2 of its actions ran, the old chunk runs 2 more
    steps while the policy thinks, then the new one takes over at its index 2. Entries encode
    (call, index); with rtc the policy is handed the chunk that is still running."""
    import numpy as np

    import sim
    import tasks
    executed, step = [], tasks.ReachEnv.step
    monkeypatch.setattr(tasks.ReachEnv, "step", lambda self, a: (executed.append(tuple(a.tolist())), step(self, a))[1])

    class Counting:
        calls, seen = 0, []

        def infer_batch(self, observations, noise=None, **rtc):
            self.calls += 1
            self.seen.append(rtc)
            return np.array([[[self.calls, i] for i in range(6)]] * len(observations), np.float32)

    policy = Counting()
    r = sim.evaluate(policy, "builtin", 1, n_action_steps=2, delay=2, rtc={"beta": 5.0}, progress=False)
    assert executed[:10] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 2), (3, 3), (4, 2), (4, 3)]
    assert policy.seen[0] == {}  # the first chunk has no predecessor
    assert policy.seen[1]["delay"] == 2 and policy.seen[1]["execution_horizon"] == 2
    assert policy.seen[1]["prev_actions"][0, :, 0].tolist() == [1] * 6  # the chunk still running
    assert r["mean_jump"] == pytest.approx(5 ** 0.5)  # new[d] - old[s + d] = (k + 1, 2) - (k, 4)
    with pytest.raises(ValueError, match=r"n_action_steps 4 \(\+ delay 3\) exceeds"):
        sim.evaluate(Counting(), "builtin", 1, n_action_steps=4, delay=3, progress=False)


def test_policy_guidance_is_normalized_and_spares_padded_dims(tmp_path):
    """Policy turns the previous chunk (robot units) into the model's space: leftover prev[s:],
    normalized with the checkpoint's stats, zero weight on the padded dims and past the overlap."""
    import numpy as np

    from policy import Policy
    from test_policy import libero_obs, make_checkpoint
    make_checkpoint(tmp_path / "ckpt")  # pi0, actions 7 wide (mean 0.1 i, std 0.5), chunk 6
    policy = Policy(tmp_path / "ckpt")
    obs = dict(libero_obs(np.random.default_rng(0)), **{"observation/state": np.zeros(8, np.float32)})
    states = np.zeros((1, 8), np.float32)  # the state in the model's space
    prev = np.tile(np.arange(7, dtype=np.float32) * 0.1 + 0.5, (1, 6, 1))  # one std above the mean
    target, weights = policy.rtc_leftover(states, prev, 1, 2), policy.rtc_weights(delay=1, execution_horizon=2)
    assert target.shape == (1, 6, 8)
    torch.testing.assert_close(target[0, :, :7], torch.ones(6, 7), atol=1e-4, rtol=0)
    assert target[0, :, 7].abs().max() == 0 and weights[0, :, 7].abs().max() == 0
    assert weights[0, :, 0].tolist()[4:] == [0, 0] and weights[0, 0, 0] == 1  # overlap C - s = 4
    out = policy.infer_batch([obs], prev_actions=prev, delay=1, execution_horizon=2)
    assert out.shape == (1, 6, 7) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="delay"):
        policy.realtime(states, prev, delay=3, execution_horizon=2)


def test_real_time_chunker_bookkeeping_of_delay_and_horizon():
    """The robot-side loop with an inference that takes exactly as long as the test says: the
    old chunk runs on meanwhile, the new one starts at the delay that happened, and the next
    request expects the largest delay seen."""
    import threading
    import time

    import numpy as np

    from policy import RealTimeChunker
    calls, go = [], threading.Semaphore(0)

    def infer(obs, **rtc):
        calls.append(rtc)
        if rtc:
            assert go.acquire(timeout=10)  # "thinking" until the test lets it finish
        return np.array([[len(calls), i] for i in range(8)], np.float32)

    def wait_for(condition):
        deadline = time.time() + 10
        while not condition():
            assert time.time() < deadline
            time.sleep(0.005)

    chunker = RealTimeChunker(infer, s_min=2)
    got = [tuple(chunker.get_action(k)) for k in range(2)]  # chunk 1, synchronous
    wait_for(lambda: len(calls) == 2)  # the second inference started after 2 actions
    got += [tuple(chunker.get_action(k)) for k in range(2, 5)]  # 3 ticks of thinking: chunk 1 runs on
    go.release()
    wait_for(lambda: chunker.chunk[0][0] == 2)
    got.append(tuple(chunker.get_action(5)))
    assert got == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 3)]  # new chunk at the realized delay 3
    assert calls[1]["delay"] == 0 and calls[1]["execution_horizon"] == 2
    assert calls[1]["prev_actions"][:, 0].tolist() == [1] * 8
    wait_for(lambda: len(calls) == 3)  # t >= s_min at once: the next request, expecting delay 3
    assert calls[2]["delay"] == 3 and calls[2]["execution_horizon"] in (3, 4)  # 4 if tick 5 came first
    go.release()
    chunker.close()


# ----------------------------------------------------------------------------------------------
# Training-time real-time chunking (--rtc-max-delay): a committed prefix, clean, at t = 0

@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
def test_committed_prefix_is_clean_at_time_zero_and_out_of_the_loss(module):
    model = tiny(module)
    batch = random_batch(model.cfg, B=2)
    C = model.cfg.action_horizon
    noise, time = torch.randn_like(batch["actions"]), torch.tensor([0.7, 0.4])
    delay = torch.tensor([2, 0])
    x_t, _, t, steps = model.flow_inputs(batch, noise, time, delay)
    assert torch.equal(x_t[0, :2], batch["actions"][0, :2]) and t[0, :2].eq(0).all() and t[0, 2:].eq(0.7).all()
    assert steps[0, :2].eq(0).all() and steps[1].eq(1).all()
    per = model.compute_loss(batch, noise, time, delay)
    assert per["flow"][0, :2].eq(0).all()
    plain = model.compute_loss(batch, noise, time)["flow"]
    torch.testing.assert_close(per["flow"][1], plain[1])  # d = 0: the standard loss
    loss = model(batch, noise, time, delay=delay)["flow"]
    torch.testing.assert_close(loss, per["flow"].sum() / (2 * C - 2))  # a mean over the free steps


def test_per_token_time_constant_over_tokens_equals_the_scalar_time():
    model = tiny(pi05)
    batch = random_batch(model.cfg, B=2, actions=False)
    cache, layout = model.prefill(batch)
    x = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim)
    t = torch.tensor([0.3, 0.9])
    a = model.denoise_step(x, t, cache, layout)
    b = model.denoise_step(x, t[:, None].expand(-1, model.cfg.action_horizon), cache, layout)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", [pi0, pi05], ids=["pi0", "pi05"])
def test_sampling_continues_the_committed_steps_and_the_fast_sampler_agrees(module):
    model, batch, noise = tiny_with_inputs(module, seed=4)
    C, A = model.cfg.action_horizon, model.cfg.action_dim
    clean = torch.randn(2, C, A, generator=torch.Generator().manual_seed(5))
    delay = torch.tensor([3, 1])
    out = model.sample_actions(batch, noise=noise, guide=guidance.committed(clean, delay))
    # the committed steps ride the straight path to their clean value: they end on it, to rounding
    torch.testing.assert_close(out[0, :3], clean[0, :3], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1, :1], clean[1, :1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0, 3:], clean[0, 3:], atol=1e-2)  # the free steps are sampled
    torch.testing.assert_close(infer.CompiledSampler(model)(batch, noise, guide=guidance.committed(clean, delay)), out,
                               rtol=0, atol=1e-5)
    zero = model.sample_actions(batch, noise=noise, guide=guidance.committed(clean, torch.zeros(2, dtype=torch.long)))
    torch.testing.assert_close(zero, model.sample_actions(batch, noise=noise), rtol=0, atol=1e-6)


def test_training_with_a_committed_prefix_exports_a_policy_that_continues_it(tmp_path):
    import json
    import subprocess
    import sys

    import numpy as np

    import data
    from conftest import ROOT, train_tiny_sentencepiece
    from policy import Policy
    from readers import open_dataset, write_hdf5_episode
    rng = np.random.default_rng(0)
    for e in range(2):
        write_hdf5_episode(tmp_path / f"ep{e}.hdf5", rng.normal(size=(12, 3)), rng.normal(size=(12, 2)),
                           {"top": rng.integers(0, 255, (12, 56, 56, 3), dtype=np.uint8)}, prompt="reach", fps=10)
    data.save_norm_stats(data.compute_norm_stats(open_dataset(tmp_path, chunk_size=6), progress=False),
                         tmp_path / "norm_stats.json")
    sp = train_tiny_sentencepiece(["reach the ball", "go to the blue square"] * 40, vocab_size=300)
    (tmp_path / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    res = subprocess.run([sys.executable, "train.py", "--model", "pi05", "--data", str(tmp_path), "--steps", "3",
                          "--batch-size", "4", "--warmup", "1", "--eval-episodes", "0", "--rtc-max-delay", "2",
                          "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "policy.json").read_text())["rtc_max_delay"] == 2
    policy = Policy(final, compiled=True)
    obs = {"images": {"top": rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)}, "state": np.zeros(3, np.float32),
           "prompt": "reach"}
    prev = rng.normal(size=(1, 6, 2)).astype(np.float32)
    out = policy.infer_batch([obs], prev_actions=prev, delay=2, execution_horizon=2)
    np.testing.assert_allclose(out[0, :2], prev[0, 2:4], atol=1e-4)  # the committed steps, unchanged
    with pytest.raises(ValueError, match="delay 3 exceeds the 2 steps"):
        policy.infer_batch([obs], prev_actions=prev, delay=3, execution_horizon=3)


def test_prefix_share_leaves_that_share_of_samples_a_prefix_draw():
    """--rtc-prefix-share p: only a share p of the samples draw a committed prefix (the rest train
    unconditioned); p = 1 draws exactly the delays of runs before the flag."""
    import train_step
    full = train_step.draw_delays(5, 4000, 3, 0, "cpu")
    g = torch.Generator().manual_seed(0 * 1_000_003 + 5 + 7_777_777)
    assert torch.equal(full, torch.randint(0, 4, (4000,), generator=g))
    some = train_step.draw_delays(5, 4000, 3, 0, "cpu", share=0.3)
    kept = some != 0
    assert torch.equal(some[kept], full[kept])  # the same draws where a prefix is kept
    assert abs(kept.float().mean().item() - 0.3 * 3 / 4) < 0.03  # a share 0.3, of which 3/4 are non-zero


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_cfg_with_beta_one_is_plain_conditioned_sampling(name):
    torch.manual_seed(0)
    cfg = models.preset(name, "tiny")
    model = models.build(cfg).eval()
    with torch.no_grad():  # some projections start at zero: give every weight a say in the output
        for p_ in model.parameters():
            p_.add_(torch.randn_like(p_) * 0.05)
    batch = random_batch(cfg, B=2, actions=False)
    uncond = random_batch(cfg, B=2, seed=1, actions=False)
    batch.update(uncond_tokens=uncond["tokens"], uncond_token_masks=uncond["token_masks"])
    both = guidance.cfg_batch(batch)
    noise = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    plain = model.sample_actions(batch, noise, num_steps=4)
    guided = model.sample_actions(both, noise, num_steps=4, guide=guidance.cfg(1.0))
    unconditioned = model.sample_actions(dict(batch, tokens=uncond["tokens"], token_masks=uncond["token_masks"]),
                                         noise, num_steps=4)
    zero = model.sample_actions(both, noise, num_steps=4, guide=guidance.cfg(0.0))
    strong = model.sample_actions(both, noise, num_steps=4, guide=guidance.cfg(3.0))
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(zero, unconditioned, atol=1e-5, rtol=0)  # beta 0: the unconditioned policy
    assert (strong - plain).abs().max() > 1e-4
