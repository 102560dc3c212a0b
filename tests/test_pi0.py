"""pi0: the cached sampler, presets, the flow-matching loss, prompts, checkpoints, loading."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, random_batch

from convert_jax import load_openpi_params
from models import load, save_pretrained
from pi0 import CONFIGS, Pi0, euler_times, interpolate, tokenize_prompt


def test_cached_sampling_equals_recomputing_everything():
    """The prefix KV cache is an optimisation only: it must not change a single step."""
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi0(cfg).eval()
    with torch.no_grad():  # make every norm scale non-trivial so the test sees them
        for name, p in model.named_parameters():
            if name.endswith("scale") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    batch = random_batch(cfg, B=3)
    noise = torch.randn(3, cfg.action_horizon, cfg.action_dim)
    times, dt = euler_times(10)
    x = noise
    with torch.no_grad():
        for t in times:  # recompute prefix + suffix in one pass at every step
            x = x + dt * model.velocity(batch, x, torch.full((3,), t))
    cached = model.sample_actions(batch, noise=noise, num_steps=10)
    torch.testing.assert_close(cached, x, rtol=1e-5, atol=1e-5)


def test_full_presets_build_on_meta_with_openpi_sizes():
    with torch.device("meta"):
        model = Pi0(CONFIGS["full"])
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert 400e6 < count(model.vision) < 430e6            # SigLIP So400m/14 + projector
    assert model.llm.embed.weight.shape == (257152, 2048)  # PaliGemma vocabulary
    assert 1.95e9 < count(model.llm.expert(0)) < 2.0e9     # Gemma 2B without the embedding
    assert 300e6 < count(model.llm.expert(1)) < 320e6      # Gemma 300M action expert ("311M")
    assert 3.2e9 < count(model) < 3.3e9


def test_prompt_format(tiny_sp):
    tokens, mask = tokenize_prompt(tiny_sp, "  pick_up the\nred block ", max_len=32)
    expected = [tiny_sp.bos_id()] + tiny_sp.encode("pick up the red block") + tiny_sp.encode("\n")
    assert tiny_sp.encode("\n") == [tiny_sp.piece_to_id("\n")]  # "\n" is one piece
    assert tokens[:len(expected)].tolist() == expected
    assert mask.tolist() == [True] * len(expected) + [False] * (32 - len(expected))
    assert tokens[len(expected):].tolist() == [0] * (32 - len(expected))
    with pytest.warns(UserWarning, match="truncated"):
        tokens, mask = tokenize_prompt(tiny_sp, "pick up the red block", max_len=3)
    assert mask.all() and tokens.tolist() == expected[:3]


def test_padded_steps_leave_the_loss_padded_dims_stay_in():
    """Padded steps weigh nothing; padded dims are trained to their zero target, as in openpi,
    so that sampling keeps them on the path they had in training."""
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi0(cfg).eval()
    batch = random_batch(cfg)
    noise, time = torch.randn_like(batch["actions"]), torch.tensor([0.3, 0.8])
    full = model.compute_loss(batch, noise, time)["flow"]
    batch["action_masks"] = torch.ones_like(batch["actions"], dtype=torch.bool)
    torch.testing.assert_close(model.compute_loss(batch, noise, time)["flow"], full)  # all valid = openpi
    batch["action_masks"][:, :, 5:] = False  # padded dims: still in the loss
    torch.testing.assert_close(model.compute_loss(batch, noise, time)["flow"], full)
    batch["action_masks"][1, 3:] = False     # padded steps of example 1: out
    t = time[:, None, None]
    assert torch.equal(interpolate(batch["actions"], noise, time)[0], t * noise + (1 - t) * batch["actions"])
    err = (model.velocity(batch, t * noise + (1 - t) * batch["actions"], time)
           - (noise - batch["actions"])).pow(2)
    expected = err.mean(-1)
    expected[1, 3:] = 0
    torch.testing.assert_close(model.compute_loss(batch, noise, time)["flow"], expected)
    expected_scalar = torch.cat([err[0].mean(-1), err[1, :3].mean(-1)]).mean()
    torch.testing.assert_close(model(batch, noise, time)["loss"], expected_scalar)


def test_every_parameter_gets_a_gradient():
    """All weights train, except what the flow loss cannot see: in the LAST layer the prefix's
    query, output projection and MLP (and its final norm) only shape prefix outputs nobody reads."""
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi0(cfg)
    model(random_batch(cfg))["loss"].backward()
    last = f"llm.layers.{cfg.llm.depth - 1}.experts.0."
    unseen = {last + n for n in ("q_proj.weight", "o_proj.weight", "mlp_norm.scale", "gate_proj.weight",
                                 "up_proj.weight", "down_proj.weight")} | {"llm.final_norms.0.scale"}
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == (name not in unseen), name
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = Pi0(cfg).eval()
    stats = {"state": {"mean": [0.0], "std": [1.0]}}
    save_pretrained(model, tmp_path / "ckpt", norm_stats=stats)
    save_pretrained(model, tmp_path / "ckpt", norm_stats=stats)  # overwriting is atomic too
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind
    loaded = load(tmp_path / "ckpt").eval()
    batch, noise = random_batch(cfg), torch.randn(2, cfg.action_horizon, cfg.action_dim)
    torch.testing.assert_close(loaded.sample_actions(batch, noise), model.sample_actions(batch, noise),
                               rtol=0, atol=0)


def test_loading_openpi_params_is_strict(jax_fixture):
    fx = jax_fixture("pi0")
    model = Pi0(fx.model_config(type(CONFIGS["tiny"])))
    params = dict(fx.params)
    key = "PaliGemma/llm/layers/mlp_1/linear"
    removed = {k: v for k, v in params.items() if k != key}
    with pytest.raises(ValueError, match=f"missing in checkpoint: {key}"):
        load_openpi_params(model, removed)
    renamed = dict(removed, **{key + "_renamed": params[key]})
    with pytest.raises(ValueError, match=f"unused in checkpoint: {key}_renamed"):
        load_openpi_params(model, renamed)
    reshaped = dict(params, **{key: params[key][:, :-1]})
    with pytest.raises(ValueError, match=f"shape: {key}"):
        load_openpi_params(model, reshaped)
    # the training layout (leaves ending in /value) loads the same
    load_openpi_params(model, {k + "/value": v for k, v in params.items()})


def test_demo_script_runs():
    out = subprocess.run([sys.executable, "pi0.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sampled actions (2, 6, 8)" in out.stdout
