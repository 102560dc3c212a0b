"""Parity with openpi's own JAX code (fixtures in JAX_REFERENCE_DIR, see conftest.py).

Tolerances are the ones each fixture README gives for fp32 on CPU; they are never loosened.
"""

import numpy as np
import pytest
import torch
from conftest import assert_close

from convert_jax import load_openpi_params
from paligemma import KVCache, make_attn_mask, make_positions
from pi0 import Pi0, Pi0Config, euler_times, posemb_sincos
from pi05 import Pi05, Pi05Config

# name in the fixture folder -> (config class, model class)
FLOW_MODELS = {"pi0": (Pi0Config, Pi0), "pi05": (Pi05Config, Pi05)}

TOL = {  # (rtol, atol), from the fixture READMEs
    "embed": (1e-5, 1e-5), "prefix": (1e-5, 2e-5), "suffix_in": (1e-4, 1e-4),
    "suffix_out": (1e-4, 2e-4), "loss": (1e-4, 3e-4), "sample": (1e-4, 5e-4),
}


@pytest.fixture(params=sorted(FLOW_MODELS), scope="module")
def setup(request, jax_fixture):
    fx = jax_fixture(request.param)
    config_cls, model_cls = FLOW_MODELS[request.param]
    torch.manual_seed(0)
    model = model_cls(fx.model_config(config_cls)).eval()
    load_openpi_params(model, fx.params)
    return fx, model, fx.batch()


def test_siglip_tokens(setup):
    fx, model, batch = setup
    for v, cam in enumerate(fx.config["cameras"]):
        tokens = model.vision(batch["images"][:, v])
        assert_close(tokens, fx.outputs[f"siglip/{cam}/tokens"], *TOL["embed"], cam)


def test_prefix_embedding(setup):
    fx, model, batch = setup
    tokens, mask, ar = model.embed_prefix(batch)
    out = fx.outputs
    assert_close(model.llm.embed_tokens(batch["tokens"]), out["prefix/lang_embeddings"], *TOL["embed"])
    assert_close(tokens, out["prefix/tokens"], *TOL["embed"])
    np.testing.assert_array_equal(mask.numpy(), out["prefix/input_mask"])
    np.testing.assert_array_equal(ar.numpy(), out["prefix/ar_mask"])


def suffix_inputs(fx, model, batch):
    x = fx.inputs
    noise, time = torch.from_numpy(x["noise"]), torch.from_numpy(x["time"])
    t = time[:, None, None]
    x_t = t * noise + (1 - t) * batch["actions"]
    return noise, time, x_t


def test_suffix_embedding(setup):
    fx, model, batch = setup
    out = fx.outputs
    noise, time, x_t = suffix_inputs(fx, model, batch)
    assert_close(x_t, out["suffix/x_t"], *TOL["suffix_in"])
    assert_close(noise - batch["actions"], out["suffix/u_t"], *TOL["suffix_in"])
    assert_close(posemb_sincos(time, model.cfg.expert.width), out["suffix/time_posemb"], *TOL["suffix_in"])
    assert_close(model.action_in_proj(x_t), out["suffix/action_in_proj"], *TOL["suffix_in"])
    tokens, mask, ar = model.embed_suffix(batch["state"], x_t, time)
    assert_close(tokens, out["suffix/tokens"], *TOL["suffix_in"])
    if "suffix/adarms_cond" in out:
        assert_close(model.time_conditioning(time), out["suffix/adarms_cond"], *TOL["suffix_in"])
    np.testing.assert_array_equal(mask.numpy(), out["suffix/input_mask"])
    np.testing.assert_array_equal(ar.numpy(), out["suffix/ar_mask"])


def test_joint_pass_and_loss(setup):
    fx, model, batch = setup
    out = fx.outputs
    noise, time, x_t = suffix_inputs(fx, model, batch)
    prefix, prefix_mask, prefix_ar = model.embed_prefix(batch)
    suffix, suffix_mask, suffix_ar = model.embed_suffix(batch["state"], x_t, time)
    cond = model.time_conditioning(time)
    mask = torch.cat([prefix_mask, suffix_mask], 1)
    attn_mask = make_attn_mask(mask, torch.cat([prefix_ar, suffix_ar]))
    positions = make_positions(mask)
    np.testing.assert_array_equal(attn_mask.numpy(), out["full/attn_mask"])
    np.testing.assert_array_equal(positions.numpy(), out["full/positions"])
    prefix_out, suffix_out = model.llm([prefix, suffix], positions, attn_mask, conds=[None, cond])
    # compared everywhere, padding rows included: the finite mask value keeps them identical
    assert_close(prefix_out, out["full/prefix_out"], *TOL["prefix"])
    assert_close(suffix_out, out["full/suffix_out"], *TOL["suffix_out"])
    assert_close(model.velocity(batch, x_t, time), out["v_t"], *TOL["suffix_out"])
    assert_close(model.compute_loss(batch, noise=noise, time=time)["flow"], out["loss"], *TOL["loss"])


def test_prefix_kv_cache(setup):
    fx, model, batch = setup
    out = fx.outputs
    prefix, prefix_mask, prefix_ar = model.embed_prefix(batch)
    attn_mask, positions = make_attn_mask(prefix_mask, prefix_ar), make_positions(prefix_mask)
    np.testing.assert_array_equal(attn_mask.numpy(), out["prefix_only/attn_mask"])
    np.testing.assert_array_equal(positions.numpy(), out["prefix_only/positions"])
    cache = KVCache(prefix.shape[1])
    prefix_out, _ = model.llm([prefix, None], positions, attn_mask, cache=cache)
    valid = out["prefix/input_mask"]  # cache entries of padding tokens are never read
    assert_close(prefix_out, out["prefix_only/out"], *TOL["prefix"])
    for i in range(model.cfg.llm.depth):
        k, v = cache.k[i], cache.v[i]
        assert_close(k[valid], out["prefix_only/kv_cache_k"][i][valid], *TOL["prefix"], f"k layer {i}")
        assert_close(v[valid], out["prefix_only/kv_cache_v"][i][valid], *TOL["prefix"], f"v layer {i}")


@pytest.mark.parametrize("num_steps", [10, 3])
def test_sample_actions(setup, num_steps):
    fx, model, batch = setup
    out, key = fx.outputs, f"sample/num_steps_{num_steps}"
    noise = torch.from_numpy(fx.inputs["sample_noise"])
    times, dt = euler_times(num_steps)
    np.testing.assert_allclose(np.float32(times), out[f"{key}/time_trajectory"], rtol=0, atol=1e-6)
    # replay the loop step by step against the recorded trajectory ...
    kv, layout = model.prefill(batch)
    x = noise
    for i, t in enumerate(times):
        assert_close(x, out[f"{key}/x_trajectory"][i], *TOL["sample"], f"x step {i}")
        v = model.denoise_step(x, t, kv, layout)
        assert_close(v, out[f"{key}/v_trajectory"][i], *TOL["suffix_out"], f"v step {i}")
        x = x + dt * v
    # ... and the public sampler end to end
    actions = model.sample_actions(batch, noise=noise, num_steps=num_steps)
    assert_close(actions, out[f"{key}/actions"], *TOL["sample"])
    assert_close(actions, out[f"{key}/x_trajectory"][-1], *TOL["sample"])


def test_suffix_positions_and_mask_of_cached_path(setup):
    """The positions and [suffix, prefix + suffix] mask of openpi's KV-cache path: its action rows
    are our action layout; pi0's state row (cached once by our prefill) sees the prefix and itself."""
    fx, model, batch = setup
    out = fx.outputs
    prefix_mask = torch.from_numpy(out["prefix/input_mask"])
    mask, positions = model.action_layout(prefix_mask)
    n_state = int(model.state_token)
    np.testing.assert_array_equal(mask.numpy(), out["sample/suffix_full_attn_mask"][:, n_state:])
    np.testing.assert_array_equal(positions.numpy(), out["sample/suffix_positions"][:, n_state:])
    if n_state:
        P = prefix_mask.shape[1]
        state_row = torch.cat([prefix_mask, torch.ones_like(prefix_mask[:, :1])], 1).numpy()
        np.testing.assert_array_equal(state_row, out["sample/suffix_full_attn_mask"][:, 0, :P + 1])
        assert not out["sample/suffix_full_attn_mask"][:, 0, P + 1:].any()  # the state never sees the actions
        np.testing.assert_array_equal(prefix_mask.sum(-1).numpy(), out["sample/suffix_positions"][:, 0])
