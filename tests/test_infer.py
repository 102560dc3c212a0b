"""infer.py: the fast sampler against the readable one, and the benchmark command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, random_batch

import infer
import pi0
import pi05


def tiny_model(module, cls):
    torch.manual_seed(0)
    model = cls(module.CONFIGS["tiny"]).eval()
    for name, p in model.named_parameters():  # adaRMS starts at zero: make pi0.5's time matter
        if "dense" in name:
            p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("module, cls", [(pi0, pi0.Pi0), (pi05, pi05.Pi05)], ids=["pi0", "pi05"])
def test_fast_sampler_matches_readable(module, cls):
    model = tiny_model(module, cls)
    cfg = model.cfg
    sampler = infer.FastSampler(model)
    for seed in (0, 1):  # a second observation reuses the static buffers
        batch = random_batch(cfg, B=2, seed=seed, actions=False)  # padded prompts, a masked camera
        assert not batch["token_masks"].all() and not batch["image_masks"].all()
        noise = torch.randn(2, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))
        expected = model.sample_actions(batch, noise=noise)
        torch.testing.assert_close(sampler(batch, noise), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("INFER_COMPILE_TEST"),
                    reason="torch.compile takes ~150 s on a 2-core CPU; set INFER_COMPILE_TEST=1")
def test_compiled_sampler_matches_readable():
    model = tiny_model(pi05, pi05.Pi05)
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim)
    sampler = infer.FastSampler(model, compile_mode="default")
    torch.testing.assert_close(sampler(batch, noise), model.sample_actions(batch, noise=noise), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model, extra", [("pi05", ["--compare-uncached"]), ("pi0_fast", ["--decode-tokens", "4"])])
def test_bench_command_prints_settings_phases_and_json(model, extra):
    """The benchmark runs end to end on CPU and ends in one JSON line (a command, not a timing test)."""
    res = subprocess.run([sys.executable, "infer.py", "bench", "--model", model, "--config", "tiny", "--iters", "2",
                          "--views", "1"] + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith(f"settings: model={model} config=tiny device=cpu")
    result = json.loads(lines[-1])
    assert result["model"] == model and result["p50_ms"] > 0 and result["peak_mib"] > 0
    if model == "pi0_fast":
        assert result["decode_tokens"] == 4 and result["prefill_ms"] > 0
    else:
        assert {"vision_ms", "prefix_ms", "denoise_ms", "uncached_p50_ms", "readable_p50_ms"} <= set(result)
