"""pi0.5: knowledge insulation, discrete targets, dropout, the prompt format, overfitting."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import random_batch

from convert_jax import load_openpi_params
import pi05
from paligemma import discretize_state
from pi05 import CONFIGS, Pi05, Pi05Config, tokenize_prompt


def tiny(**overrides):
    """The tiny pi0.5 with its zero-initialised adaRMS Linears made random (as the JAX fixtures
    do): with openpi's init every gate starts at 0, which would hide the expert's gradients."""
    torch.manual_seed(0)
    model = Pi05(dataclasses.replace(CONFIGS["tiny"], **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".dense." in name:
                p.normal_(0, 0.1)
    return model


def with_targets(batch, cfg, D=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch["target_tokens"] = torch.randint(3, cfg.vocab_size, (batch["state"].shape[0], D), generator=g)
    batch["target_masks"] = torch.ones_like(batch["target_tokens"], dtype=torch.bool)
    batch["target_masks"][0, 3:] = False  # a shorter target sequence
    return batch


def grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in model.named_parameters()}


def in_expert(name, e):  # expert e's layers and final norm
    return re.match(rf"llm\.(layers\.\d+\.experts|final_norms)\.{e}\.", name) is not None


def is_vlm(name):  # SigLIP, the embedding and the PaliGemma expert (expert 0)
    return name.startswith(("vision.", "llm.embed.")) or in_expert(name, 0)


def is_action_expert(name):
    return in_expert(name, 1) or name.startswith(("action_", "time_mlp"))


@pytest.mark.parametrize("insulate", [True, False])
def test_knowledge_insulation_gradients(insulate):
    model = tiny(knowledge_insulation=insulate, dropout=0.0)
    batch = with_targets(random_batch(model.cfg), model.cfg)
    losses = model(batch)
    flow = grads(model, losses["flow"])
    vlm_with_grad = [n for n, g in flow.items() if is_vlm(n) and g]
    if insulate:  # not one VLM weight (SigLIP, embeddings, Gemma layers) feels the flow loss
        assert vlm_with_grad == []
    else:
        assert any(n.startswith("vision.") for n in vlm_with_grad)
        assert any(in_expert(n, 0) for n in vlm_with_grad)
    assert all(g for n, g in flow.items() if is_action_expert(n))  # the expert always learns
    ce = grads(model, losses["ce"])
    assert not any(g for n, g in ce.items() if is_action_expert(n))  # CE never reaches the expert
    assert any(g for n, g in ce.items() if n.startswith("vision."))


def test_expert_cannot_see_the_discrete_targets():
    model = tiny(dropout=0.0).eval()
    batch = with_targets(random_batch(model.cfg), model.cfg)
    noise, time = torch.randn_like(batch["actions"]), torch.tensor([0.4, 0.9])
    flow = model(batch, noise, time)["flow"]
    ce = model(batch, noise, time)["ce"]
    batch["target_tokens"] = (batch["target_tokens"] + 7) % model.cfg.vocab_size
    assert model(batch, noise, time)["flow"] == flow  # bit for bit
    assert model(batch, noise, time)["ce"] != ce


def test_joint_and_insulated_passes_give_the_same_losses():
    # one joint pass (openpi's) and knowledge insulation's two passes through a cache compute the
    # same function; only the gradients differ (the stop-gradient)
    model = tiny(dropout=0.0).eval()
    batch = with_targets(random_batch(model.cfg), model.cfg)
    noise, time = torch.randn_like(batch["actions"]), torch.tensor([0.4, 0.9])
    joint = model(batch, noise, time)
    model.cfg.knowledge_insulation = True
    insulated = model(batch, noise, time)
    for k in ("flow", "ce", "loss"):
        torch.testing.assert_close(insulated[k], joint[k], rtol=1e-6, atol=1e-6)


def test_flow_loss_equals_openpi_without_targets(jax_fixture):
    fx = jax_fixture("pi05")
    for insulate in (True, False):
        model = Pi05(dataclasses.replace(fx.model_config(Pi05Config), knowledge_insulation=insulate)).eval()
        load_openpi_params(model, fx.params)
        noise, time = torch.from_numpy(fx.inputs["noise"]), torch.from_numpy(fx.inputs["time"])
        losses = model(fx.batch(), noise, time)
        np.testing.assert_allclose(losses["flow"].item(), fx.outputs["loss"].mean(), rtol=1e-4, atol=3e-4)
        assert "ce" not in losses


def test_samples_without_actions_train_only_the_vlm():
    model = tiny(dropout=0.0)
    batch = with_targets(random_batch(model.cfg), model.cfg)
    batch["action_masks"] = torch.zeros_like(batch["actions"], dtype=torch.bool)  # e.g. VQA only
    losses = model(batch)
    assert losses["flow"].item() == 0
    g = grads(model, losses["loss"])
    assert not any(v for n, v in g.items() if is_action_expert(n))
    assert any(v for n, v in g.items() if in_expert(n, 0))


def test_target_zero_is_predicted_from_the_last_real_prompt_token():
    """Padding between prompt and targets must not matter: pad the prompt more, same CE."""
    model = tiny(dropout=0.0).eval()
    batch = with_targets(random_batch(model.cfg), model.cfg)
    ce = model(batch)["ce"]
    longer = dict(batch)
    pad = torch.zeros(2, 9, dtype=torch.long)
    longer["tokens"] = torch.cat([batch["tokens"], pad], 1)
    longer["token_masks"] = torch.cat([batch["token_masks"], pad.bool()], 1)
    torch.testing.assert_close(model(longer)["ce"], ce, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_train_mode():
    model = tiny(dropout=0.3)
    batch = random_batch(model.cfg)
    noise, time = torch.randn_like(batch["actions"]), torch.tensor([0.4, 0.9])
    model.train()
    a, b = model(batch, noise, time)["flow"], model(batch, noise, time)["flow"]
    assert a != b
    model.eval()
    assert model(batch, noise, time)["flow"] == model(batch, noise, time)["flow"]
    off = tiny(dropout=0.0).train()
    assert off(batch, noise, time)["flow"] == off(batch, noise, time)["flow"]


def test_prompt_format_with_discrete_state(tiny_sp):
    state = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])
    np.testing.assert_array_equal(discretize_state(state), [-1, 0, 128, 255, 255, 255])
    tokens, mask = tokenize_prompt(tiny_sp, " insert_the peg", state[:3], max_len=64)
    text = "Task: insert the peg, State: -1 0 128;\nAction: "
    expected = tiny_sp.encode(text, add_bos=True)
    assert tokens[:mask.sum()].tolist() == expected and tiny_sp.decode(expected) == text
    # pi05_libero: no state, pi0's prompt
    tokens, mask = tokenize_prompt(tiny_sp, "insert the peg", state, max_len=64, discrete_state=False)
    assert tokens[:mask.sum()].tolist() == tiny_sp.encode("insert the peg", add_bos=True) + tiny_sp.encode("\n")


def test_tiny_pi05_overfits_a_few_samples():
    model = tiny(dropout=0.0)
    batch = with_targets(random_batch(model.cfg, B=4), model.cfg)
    noise, time = torch.randn_like(batch["actions"]), torch.rand(4) * 0.999 + 0.001
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch, noise, time)
    for _ in range(150):
        loss = model(batch, noise, time)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model(batch, noise, time)
    assert last["flow"] < first["flow"] / 10, (first["flow"], last["flow"])
    assert last["ce"] < first["ce"] / 10, (first["ce"], last["ce"])


def test_flow_loss_keeps_padded_dims_and_drops_padded_steps():
    model = tiny(dropout=0.0).eval()
    batch = random_batch(model.cfg)
    noise, time = torch.randn_like(batch["actions"]), torch.tensor([0.3, 0.8])
    full = model(batch, noise, time)["flow"]
    batch["action_masks"] = torch.ones_like(batch["actions"], dtype=torch.bool)
    batch["action_masks"][..., 3:] = False  # padded dims: trained to 0 as in openpi (see pi0.py)
    torch.testing.assert_close(model(batch, noise, time)["flow"], full)
    batch["action_masks"][1] = False  # example 1 has no actions: only example 0's steps count
    one = {k: v[:1] for k, v in batch.items() if k != "action_masks"}
    torch.testing.assert_close(model(batch, noise, time)["flow"], model(one, noise[:1], time[:1])["flow"])


def test_a_prompt_condition_sits_after_task_and_state_and_before_the_actions(tiny_sp):
    """A condition (e.g. RECAP's advantage indicator) goes where it conditions the actions and
    pi0.5's FAST targets after them; in pi0's prompt, on its own line after the task."""
    import pi0
    ids, mask = pi05.tokenize_prompt(tiny_sp, "pick up the red block", np.array([0.0, 0.5]), 64,
                                     condition="Advantage: positive")
    text = tiny_sp.decode(ids[mask].tolist())
    assert text.endswith("State: 128 192;\nAdvantage: positive;\nAction: ")
    ids, mask = pi0.tokenize_prompt(tiny_sp, "pick up the red block", 64, condition="Advantage: negative")
    assert tiny_sp.decode(ids[mask].tolist()) == "pick up the red block\nAdvantage: negative\n"
