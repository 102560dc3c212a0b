"""infer.py: the compiled sampler against the readable one, and the benchmark command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import ROOT, random_batch

import infer
import models
import pi0
import pi05
from paligemma import fp32_param_names


def tiny_model(module, cls):
    torch.manual_seed(0)
    model = cls(module.CONFIGS["tiny"]).eval()
    for name, p in model.named_parameters():  # adaRMS starts at zero: make pi0.5's time matter
        if "dense" in name:
            p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("module, cls", [(pi0, pi0.Pi0), (pi05, pi05.Pi05)], ids=["pi0", "pi05"])
def test_compiled_sampler_matches_readable(module, cls):
    model = tiny_model(module, cls)
    cfg = model.cfg
    sampler = infer.CompiledSampler(model)
    for seed in (0, 1):  # a second observation reuses the static buffers
        batch = random_batch(cfg, B=2, seed=seed, actions=False)  # padded prompts, a masked camera
        assert not batch["token_masks"].all() and not batch["image_masks"].all()
        noise = torch.randn(2, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))
        expected = model.sample_actions(batch, noise=noise)
        torch.testing.assert_close(sampler(batch, noise), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("INFER_COMPILE_TEST"),
                    reason="torch.compile takes ~150 s on a 2-core CPU; set INFER_COMPILE_TEST=1")
def test_torch_compiled_sampler_matches_readable():
    model = tiny_model(pi05, pi05.Pi05)
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim)
    sampler = infer.CompiledSampler(model, compile_mode="default")
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


# ----------------------------------------------------------------------------------------------
# Serving in bf16: weights held in bf16 once, no per-call weight casts, actions close to fp32

class CountParameterCasts(TorchDispatchMode):
    """Records every dtype conversion whose input is a model parameter (autocast's per-call
    casts of fp32 weights included: they reach the dispatcher as aten._to_copy)."""

    def __init__(self, model):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and isinstance(args[0], torch.Tensor) \
                and args[0].untyped_storage().data_ptr() in self.storages:
            self.casts.append((tuple(args[0].shape), args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("module, cls", [(pi0, pi0.Pi0), (pi05, pi05.Pi05)], ids=["pi0", "pi05"])
def test_bf16_serving_holds_bf16_weights_and_casts_none_per_call(module, cls, tmp_path):
    models.save_pretrained(tiny_model(module, cls), tmp_path / "ckpt")
    model = models.load(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    keep = fp32_param_names(model)
    assert keep and {n for n, p in model.named_parameters() if p.dtype == torch.float32} == keep
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in keep)
    batch = random_batch(model.cfg, B=2, actions=False)
    sampler = infer.CompiledSampler(model, dtype=torch.bfloat16)
    for run in (lambda: sampler(batch),
                lambda: model.sample_actions(batch)):
        with torch.autocast("cpu", dtype=torch.bfloat16), CountParameterCasts(model) as counter:
            run()
        assert counter.casts == []  # vision, prefix and denoising read the weights as they are
    fp32 = models.load(tmp_path / "ckpt").eval()  # the counter works: fp32 masters are cast every call
    with torch.autocast("cpu", dtype=torch.bfloat16), CountParameterCasts(fp32) as counter:
        fp32.sample_actions(batch)
    assert len(counter.casts) > 10


@pytest.mark.parametrize("module, cls", [(pi0, pi0.Pi0), (pi05, pi05.Pi05)], ids=["pi0", "pi05"])
def test_bf16_actions_match_fp32_within_bf16_tolerance(module, cls, tmp_path):
    """bf16 matmuls (8-bit mantissa, relative error ~4e-3 each) over 10 Euler steps: the tiny
    models' normalized actions stay within 0.05 of fp32 (measured: ~0.006)."""
    models.save_pretrained(tiny_model(module, cls), tmp_path / "ckpt")
    fp32, bf16 = (models.load(tmp_path / "ckpt", dtype=d).eval() for d in (None, torch.bfloat16))
    batch = random_batch(fp32.cfg, B=2, actions=False)
    noise = torch.randn(2, fp32.cfg.action_horizon, fp32.cfg.action_dim, generator=torch.Generator().manual_seed(0))
    expected = fp32.sample_actions(batch, noise=noise)
    got = infer.CompiledSampler(bf16, dtype=torch.bfloat16)(batch, noise)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)
    assert not torch.equal(got, expected)  # it did run in bf16
