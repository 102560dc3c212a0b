"""pi0-FAST: parity with openpi's JAX outputs, and the prompt / action round trip."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_close

from convert_jax import load_openpi_params
from paligemma import make_attn_mask, make_positions
from pi0_fast import Pi0Fast, Pi0FastConfig, extract_actions, right_align, tokenize


@pytest.fixture(scope="module")
def setup(jax_fixture):
    fx = jax_fixture("pi0_fast")
    cfg = dataclasses.replace(fx.model_config(Pi0FastConfig), openpi_positions=True)
    model = Pi0Fast(cfg).eval()
    load_openpi_params(model, fx.params)
    batch = fx.batch()
    batch["token_ar_masks"] = torch.from_numpy(fx.inputs["token_ar_mask"]).long()
    batch["token_loss_masks"] = torch.from_numpy(fx.inputs["token_loss_mask"])
    infer = fx.batch(prefix="infer_")
    infer["token_ar_masks"] = torch.from_numpy(fx.inputs["infer_token_ar_mask"]).long()
    return fx, model, batch, infer


def test_embedding_and_masks(setup):
    fx, model, batch, _ = setup
    out = fx.outputs
    tokens, mask, ar = model.embed_inputs(batch)
    assert_close(model.llm.embed_tokens(batch["tokens"]), out["embed/lang_embeddings"], 1e-5, 1e-5)
    assert_close(tokens, out["embed/tokens"], 1e-5, 1e-5)
    np.testing.assert_array_equal(mask.numpy(), out["embed/input_mask"])
    np.testing.assert_array_equal(ar.numpy(), out["embed/ar_mask"])
    np.testing.assert_array_equal(make_attn_mask(mask, ar).numpy(), out["train/attn_mask"])


def test_training_loss(setup):
    fx, model, batch, _ = setup
    assert_close(model.compute_loss(batch), fx.outputs["loss"], 1e-4, 1e-4)
    # the default (corrected) positions differ from openpi's when a camera is masked
    fixed = Pi0Fast(dataclasses.replace(model.cfg, openpi_positions=False)).eval()
    fixed.load_state_dict(model.state_dict())
    assert not np.allclose(fixed.compute_loss(batch).detach().numpy(), fx.outputs["loss"], atol=1e-3)


def test_right_align_and_prefill(setup):
    fx, model, _, infer = setup
    out = fx.outputs
    tokens, mask, ar = model.embed_inputs(infer)
    assert_close(tokens, out["sample/prefix_tokens_unaligned"], 1e-5, 1e-5)
    tokens, mask, attn = right_align(tokens, mask, make_attn_mask(mask, ar))
    np.testing.assert_array_equal(mask.numpy(), out["sample/aligned_input_mask"])
    D = out["sample/aligned_attn_mask_padded"].shape[2] - mask.shape[1]
    np.testing.assert_array_equal(torch.nn.functional.pad(attn, (0, D)).numpy(),
                                  out["sample/aligned_attn_mask_padded"])
    np.testing.assert_array_equal(make_positions(mask).numpy(), out["sample/prefix_positions"])
    np.testing.assert_array_equal(mask.sum(-1).numpy(), out["sample/prefill_len"])


def test_greedy_decoding(setup):
    fx, model, _, infer = setup
    out = fx.outputs
    steps = fx.config["fast_decode_steps"]
    tokens, logits = model.sample_tokens(infer, max_decoding_steps=steps, return_logits=True)
    np.testing.assert_array_equal(tokens.numpy(), out["sample/tokens"].astype(np.int64))
    assert_close(logits[:, 0], out["sample/prefix_last_logits"], 1e-4, 5e-4)
    n = logits.shape[1]  # all rows may stop early on EOS
    assert_close(logits, out["sample/step_logits"][:, :n], 1e-4, 5e-4)
    # without openpi's skipped position the tokens are those of the corrected model
    fixed = Pi0Fast(dataclasses.replace(model.cfg, openpi_positions=False)).eval()
    fixed.load_state_dict(model.state_dict())
    assert not np.array_equal(fixed.sample_tokens(infer, max_decoding_steps=steps).numpy(),
                              out["sample/tokens"].astype(np.int64))


def tiny_fast_tokenizer():
    from fast_tokenizer import FASTTokenizer, smooth_chunks
    return FASTTokenizer.fit(smooth_chunks(200, chunk=6, action_dim=8, seed=0), vocab_size=300, progress=False)


def test_prompt_and_action_round_trip(tiny_sp):
    from fast_tokenizer import smooth_chunks
    fast = tiny_fast_tokenizer()
    chunk = smooth_chunks(1, chunk=6, action_dim=8, seed=5)[0]
    state = np.array([-1.0, 0.0, 0.5])
    tokens, mask, ar, loss = tokenize(tiny_sp, fast, "Pick_up the Cup", state, chunk, max_len=96, vocab_size=1024)
    prefix = tiny_sp.encode("Task: pick up the cup, State: 0 128 192;\n", add_bos=True)
    n, p = int(mask.sum()), len(prefix)
    assert tokens[:p].tolist() == prefix
    assert not ar[:p].any() and ar[p:n].all() and not ar[n:].any()
    assert (loss == ar.astype(bool)).all() and tokens[n - 1] == 1  # ends with EOS
    # the model's answer is the postfix: read the actions back out of it
    actions, valid = extract_actions(tiny_sp, fast, tokens[p:n], 6, 8, vocab_size=1024)
    assert valid
    assert np.abs(actions - chunk).max() < 0.5 / fast.scale * np.sqrt(6 * 8)  # quantization only
    # an answer that does not fit: openpi truncates it, and says so; too_long="error" raises
    with pytest.warns(UserWarning, match=f"{n} tokens .* exceed max_token_len={n - 1}.*truncated, as openpi does"):
        cut = tokenize(tiny_sp, fast, "pick up the cup", state, chunk, max_len=n - 1, vocab_size=1024)
    assert cut[0].tolist() == tokens[:n - 1].tolist() and cut[1].all()
    with pytest.raises(ValueError, match="max_token_len"):
        tokenize(tiny_sp, fast, "pick up the cup", state, chunk, max_len=n - 1, vocab_size=1024, too_long="error")


def test_garbage_answers_are_flagged_not_zeroed(tiny_sp):
    fast = tiny_fast_tokenizer()
    start = tiny_sp.encode("Action: ")
    for garbage in ([5, 6, 7], start + [5, 6, 7], start + [1024 - 129 - 3]):  # no "Action", text, too short
        actions, valid = extract_actions(tiny_sp, fast, garbage, 6, 8, vocab_size=1024)
        assert not valid and actions.shape == (6, 8)


@pytest.mark.parametrize("openpi_positions", [False, True])
def test_static_cache_decoding_equals_recomputing(openpi_positions):
    """Greedy decoding with the static KV cache picks the tokens a full recompute would."""
    from pi0_fast import CONFIGS
    torch.manual_seed(0)
    cfg = dataclasses.replace(CONFIGS["tiny"], openpi_positions=openpi_positions)
    model = Pi0Fast(cfg).eval()
    B, V, R, L = 2, len(cfg.cameras), cfg.vision.image_size, 10
    batch = {"images": torch.rand(B, V, 3, R, R) * 2 - 1, "image_masks": torch.ones(B, V, dtype=torch.bool),
             "tokens": torch.randint(3, cfg.vocab_size, (B, L)),
             "token_masks": torch.arange(L)[None, :] < torch.tensor([[6], [10]])}
    out = model.sample_tokens(batch, max_decoding_steps=5)
    skip = 1 if openpi_positions else 0
    with torch.no_grad():
        for b in range(B):  # one example at a time, no padding, no cache
            n = int(batch["token_masks"][b].sum())
            tokens = batch["tokens"][b:b + 1, :n]
            for step in range(5):
                one = {"images": batch["images"][b:b + 1], "image_masks": batch["image_masks"][b:b + 1],
                       "tokens": tokens, "token_masks": torch.ones_like(tokens, dtype=torch.bool)}
                x, mask, ar = model.embed_inputs(one)
                pos = make_positions(mask)
                if step:  # openpi feeds decoded tokens one position further
                    pos[:, -step:] += skip
                (h,) = model.llm([x], pos, make_attn_mask(mask, ar))
                token = model.llm.logits(h[:, -1]).argmax(-1)
                assert token.item() == out[b, step].item(), (b, step)
                tokens = torch.cat([tokens, token[:, None]], 1)
