"""paligemma.py: attention masks and positions, the static KV cache, the layer, strict loading."""

import numpy as np
import pytest
import torch

from paligemma import (GEMMA_PRESETS, Gemma, KVCache, load_state_strict, make_attn_mask, make_positions,
                       upgrade_state_dict)

T, F = True, False


@pytest.mark.parametrize("input_mask, ar_mask, expected", [
    # all ar 0: bidirectional among real tokens; the padding row and column are all False
    ([T, T, T, F], [0, 0, 0, 0], [[T, T, T, F], [T, T, T, F], [T, T, T, F], [F, F, F, F]]),
    # all ar 1: causal
    ([T, T, T], [1, 1, 1], [[T, F, F], [T, T, F], [T, T, T]]),
    # [0, 0, 1, 1]: prefix-LM (bidirectional prefix, causal tail)
    ([T, T, T, T], [0, 0, 1, 1], [[T, T, F, F], [T, T, F, F], [T, T, T, F], [T, T, T, T]]),
    # pi0: 2 prefix tokens | state (ar 1) | 2 actions (ar 1, 0)
    ([T, T, T, T, T], [0, 0, 1, 1, 0], [[T, T, F, F, F], [T, T, F, F, F], [T, T, T, F, F],
                                        [T, T, T, T, T], [T, T, T, T, T]]),
    # pi0 with a padded prefix token: nobody sees it, and its own row is empty
    ([T, F, T, T, T], [0, 0, 1, 1, 0], [[T, F, F, F, F], [F, F, F, F, F], [T, F, T, F, F],
                                        [T, F, T, T, T], [T, F, T, T, T]]),
])
def test_attn_mask_table(input_mask, ar_mask, expected):
    mask = make_attn_mask(torch.tensor([input_mask]), torch.tensor(ar_mask))
    np.testing.assert_array_equal(mask[0].numpy(), np.array(expected))


@pytest.mark.parametrize("input_mask, expected", [
    ([T, T, F, T, F, T], [0, 1, 1, 2, 2, 3]),  # padding repeats the previous position
    ([F, T, T], [-1, 0, 1]),                   # leading padding gets -1
    ([T] * 4, [0, 1, 2, 3]),
])
def test_positions_table(input_mask, expected):
    assert make_positions(torch.tensor([input_mask]))[0].tolist() == expected


def tiny_gemma(adaptive=False):
    torch.manual_seed(0)
    llm, expert = GEMMA_PRESETS["tiny_llm"], GEMMA_PRESETS["tiny_expert"]
    gemma = Gemma([llm, expert], vocab_size=64, cond_widths=[None, expert.width] if adaptive else None)
    with torch.no_grad():  # non-trivial norms and adaRMS, so the tests see them
        for name, p in gemma.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return gemma


@pytest.mark.parametrize("adaptive", [False, True])
def test_cached_suffix_equals_one_joint_pass(adaptive):
    """Prefix into the cache, then the suffix reading it: the same suffix outputs as one joint
    pass with the block mask; the suffix is written after the prefix and not kept."""
    gemma = tiny_gemma(adaptive)
    B, P, S = 2, 5, 3
    prefix = torch.randn(B, P, gemma.configs[0].width)
    suffix = torch.randn(B, S, gemma.configs[1].width)
    cond = torch.randn(B, gemma.configs[1].width) if adaptive else None
    mask = torch.ones(B, P + S, dtype=torch.bool)
    mask[1, 3:P] = False  # a padded prefix
    ar = torch.tensor([0] * P + [1] + [0] * (S - 1))
    _, joint = gemma([prefix, suffix], make_positions(mask), make_attn_mask(mask, ar), conds=[None, cond])
    cache = KVCache(P + S)
    gemma([prefix, None], make_positions(mask[:, :P]), make_attn_mask(mask[:, :P], ar[:P]), cache=cache)
    cache.length = P
    suffix_mask = torch.cat([mask[:, None, :P].expand(B, S, P), torch.ones(B, S, S, dtype=torch.bool)], 2)
    positions = mask[:, :P].sum(-1, keepdim=True) + torch.arange(S)
    for _ in range(2):  # twice: the second call overwrites the first call's slots
        _, cached = gemma([None, suffix], positions, suffix_mask, conds=[None, cond], cache=cache)
        torch.testing.assert_close(cached, joint, rtol=1e-5, atol=1e-5)
    assert cache.length == P


def test_precomputed_modulations_equal_conditions():
    gemma = tiny_gemma(adaptive=True)
    x, cond = torch.randn(2, 4, gemma.configs[1].width), torch.randn(2, gemma.configs[1].width)
    mask, positions = torch.ones(2, 4, 4, dtype=torch.bool), torch.arange(4).expand(2, 4)
    _, a = gemma([None, x], positions, mask, conds=[None, cond])
    _, b = gemma([None, x], positions, mask, mods=gemma.modulations([None, cond], present=[1]))
    assert torch.equal(a, b)


def test_cache_overflow_and_prefix_copy():
    cache = KVCache(4)
    k = torch.randn(1, 3, 1, 2, requires_grad=True)
    cache.update(0, k, k * 2)
    cache.length = 3
    with pytest.raises(ValueError, match="holds 4 tokens, this call needs 5"):
        cache.update(0, torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2))
    kept = cache.prefix(2, room=3, detach=True)
    assert kept.length == 2 and kept.max_len == 5 and not kept.k[0].requires_grad
    assert torch.equal(kept.k[0][:, :2], k[:, :2].detach()) and kept.k[0][:, 2:].abs().sum() == 0
    assert cache.prefix(2, room=1).k[0].requires_grad  # without detach the gradient flows


def test_old_checkpoint_names_still_load():
    gemma = tiny_gemma()
    old = {}
    for name, v in gemma.state_dict().items():
        parts = name.split(".")
        if parts[1] == "layers":  # llm.layers.I.experts.E.x -> llm.experts.E.layers.I.x
            name = ".".join(["llm", "experts", parts[4], "layers", parts[2]] + parts[5:])
        elif parts[1] == "final_norms":
            name = ".".join(["llm", "experts", parts[2], "final_norm"] + parts[3:])
        old[name.removeprefix("llm.")] = v
    assert upgrade_state_dict({"llm." + k: v for k, v in old.items()}).keys() == \
        {"llm." + k for k in gemma.state_dict()}
    fresh = Gemma(gemma.configs, vocab_size=64)
    wrapper = torch.nn.Module()
    wrapper.llm = fresh
    load_state_strict(wrapper, {"llm." + k: v for k, v in old.items()})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), gemma.state_dict().values()))


def test_strict_loading_names_what_is_wrong():
    gemma = tiny_gemma()
    state = dict(gemma.state_dict())
    del state["embed.weight"]
    state["bogus"] = torch.zeros(1)
    state["final_norms.0.scale"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_state_strict(gemma, state)
    assert "missing: embed.weight" in str(e.value) and "unexpected: bogus" in str(e.value)
    assert "shape: final_norms.0.scale" in str(e.value)
