"""openpi (JAX) parameters -> our PyTorch parameter names.

openpi stores parameters as a nested dict of arrays; flattened with "/" the paths look like
`PaliGemma/llm/layers/attn/q_einsum/w`. Per-layer weights are *scanned*: stacked on a leading
depth axis. Dense kernels are [in, out] (torch.nn.Linear wants [out, in]); attention kernels keep
separate head axes. The table below says, for every openpi array, which of our parameters it fills
and how it is reshaped. Every source array must be used exactly once and every parameter of our
model filled exactly once, otherwise loading stops with the full list of what is wrong: a model
with silently random weights is the worst possible failure.

Axis legend: L layers, N heads, K kv heads, H head dim, W width, F mlp width, p patch size.
"""

import numpy as np
import torch
import torch.nn as nn

# -- reshapes: each takes one openpi array (one layer's slice for scanned weights) ---------------
linear = lambda x: x.T                                            # Dense [in, out] -> [out, in]
same = lambda x: x                                                # norms, biases, embeddings
conv = lambda x: x.transpose(3, 2, 0, 1)                          # [p, p, in, out] -> OIHW
heads_in = lambda x: x.reshape(x.shape[0], -1).T                  # SigLIP [W, N, H] -> [N*H, W]
heads_out = lambda x: x.reshape(-1, x.shape[-1]).T                # [N, H, W] -> [W, N*H]
flat = lambda x: x.reshape(-1)                                    # SigLIP q/k/v bias [N, H]
q_einsum = lambda x: x.transpose(0, 2, 1).reshape(-1, x.shape[1])  # Gemma [N, W, H] -> [N*H, W]
kv_einsum = lambda x: (q_einsum(x[0]), q_einsum(x[1]))            # [2, K, W, H] -> k, v [K*H, W]
gating = lambda x: (x[0].T, x[1].T)                               # [2, W, F] -> gate, up [F, W]


def mapping_table(model):
    """Rows (openpi path, our name(s), reshape). "{l}" marks a scanned per-layer weight.

    The rows depend on the model only through its structure: how many Gemma experts it has,
    which of their norms are adaptive (pi0.5) and which top-level projections it owns.
    """
    blk, attn = "PaliGemma/img/Transformer/encoderblock", "MultiHeadDotProductAttention_0"
    rows = [  # SigLIP: big_vision ViT names -> ours
        ("PaliGemma/img/embedding/kernel", "vision.patch_embed.weight", conv),
        ("PaliGemma/img/embedding/bias", "vision.patch_embed.bias", same),
        ("PaliGemma/img/pos_embedding", "vision.pos_embed", same),
        (f"{blk}/LayerNorm_0/scale", "vision.blocks.{l}.norm1.weight", same),
        (f"{blk}/LayerNorm_0/bias", "vision.blocks.{l}.norm1.bias", same),
        (f"{blk}/{attn}/query/kernel", "vision.blocks.{l}.q_proj.weight", heads_in),
        (f"{blk}/{attn}/query/bias", "vision.blocks.{l}.q_proj.bias", flat),
        (f"{blk}/{attn}/key/kernel", "vision.blocks.{l}.k_proj.weight", heads_in),
        (f"{blk}/{attn}/key/bias", "vision.blocks.{l}.k_proj.bias", flat),
        (f"{blk}/{attn}/value/kernel", "vision.blocks.{l}.v_proj.weight", heads_in),
        (f"{blk}/{attn}/value/bias", "vision.blocks.{l}.v_proj.bias", flat),
        (f"{blk}/{attn}/out/kernel", "vision.blocks.{l}.o_proj.weight", heads_out),
        (f"{blk}/{attn}/out/bias", "vision.blocks.{l}.o_proj.bias", same),
        (f"{blk}/LayerNorm_1/scale", "vision.blocks.{l}.norm2.weight", same),
        (f"{blk}/LayerNorm_1/bias", "vision.blocks.{l}.norm2.bias", same),
        (f"{blk}/MlpBlock_0/Dense_0/kernel", "vision.blocks.{l}.fc1.weight", linear),
        (f"{blk}/MlpBlock_0/Dense_0/bias", "vision.blocks.{l}.fc1.bias", same),
        (f"{blk}/MlpBlock_0/Dense_1/kernel", "vision.blocks.{l}.fc2.weight", linear),
        (f"{blk}/MlpBlock_0/Dense_1/bias", "vision.blocks.{l}.fc2.bias", same),
        ("PaliGemma/img/Transformer/encoder_norm/scale", "vision.norm.weight", same),
        ("PaliGemma/img/Transformer/encoder_norm/bias", "vision.norm.bias", same),
        ("PaliGemma/img/head/kernel", "vision.head.weight", linear),
        ("PaliGemma/img/head/bias", "vision.head.bias", same),
        ("PaliGemma/llm/embedder/input_embedding", "llm.embed.weight", same),  # tied with logits
    ]
    for e, expert in enumerate(model.llm.experts):
        s = "" if e == 0 else f"_{e}"  # openpi suffixes the action expert's weights with _1
        ours, src = f"llm.experts.{e}.layers.{{l}}", "PaliGemma/llm/layers"
        rows += [
            (f"{src}/attn/q_einsum{s}/w", f"{ours}.q_proj.weight", q_einsum),
            (f"{src}/attn/kv_einsum{s}/w", (f"{ours}.k_proj.weight", f"{ours}.v_proj.weight"), kv_einsum),
            (f"{src}/attn/attn_vec_einsum{s}/w", f"{ours}.o_proj.weight", heads_out),
            (f"{src}/mlp{s}/gating_einsum", (f"{ours}.gate_proj.weight", f"{ours}.up_proj.weight"), gating),
            (f"{src}/mlp{s}/linear", f"{ours}.down_proj.weight", linear),
        ]
        norms = [(f"{src}/pre_attention_norm{s}", f"{ours}.attn_norm"),
                 (f"{src}/pre_ffw_norm{s}", f"{ours}.mlp_norm"),
                 (f"PaliGemma/llm/final_norm{s}", f"llm.experts.{e}.final_norm")]
        for jax_norm, our_norm in norms:
            if hasattr(expert.final_norm, "dense"):  # pi0.5 adaRMS: a Dense cond -> 3W
                rows += [(f"{jax_norm}/Dense_0/kernel", f"{our_norm}.dense.weight", linear),
                         (f"{jax_norm}/Dense_0/bias", f"{our_norm}.dense.bias", same)]
            else:  # plain RMSNorm: the raw scale, used as (1 + scale) in the forward
                rows += [(f"{jax_norm}/scale", f"{our_norm}.scale", same)]
    for name, module in model.named_children():  # top level: action_in_proj, state_proj, ...
        if isinstance(module, nn.Linear):
            rows += [(f"{name}/kernel", f"{name}.weight", linear), (f"{name}/bias", f"{name}.bias", same)]
    return rows


def openpi_to_state_dict(flat_params, model):
    """Turn a flat {openpi path: array} dict into our state dict, strictly.

    Raises ValueError listing every openpi array left unused, every parameter left unfilled and
    every shape that does not fit.
    """
    flat_params = {k.removesuffix("/value"): v for k, v in flat_params.items()}  # training layout
    own = model.state_dict()
    depth = {"vision": len(model.vision.blocks), "llm": len(model.llm.experts[0].layers)}
    state, errors, used = {}, [], set()
    for src, dst, fn in mapping_table(model):
        if src not in flat_params:
            errors.append(f"missing in checkpoint: {src}")
            continue
        used.add(src)
        x = np.asarray(flat_params[src], dtype=np.float32)
        dsts = (dst,) if isinstance(dst, str) else dst
        scanned = "{l}" in dsts[0]
        n_layers = depth[dsts[0].split(".")[0]] if scanned else 1
        if scanned and x.shape[0] != n_layers:
            errors.append(f"shape: {src} {x.shape} has {x.shape[0]} layers, model has {n_layers}")
            continue
        for l in range(n_layers):
            outs = fn(x[l] if scanned else x)
            outs = (outs,) if isinstance(dst, str) else outs
            for name, value in zip(dsts, outs):
                name = name.format(l=l)
                if name not in own:
                    errors.append(f"model has no parameter {name} (for {src})")
                elif tuple(value.shape) != tuple(own[name].shape):
                    errors.append(f"shape: {src} -> {name}: {value.shape} vs model "
                                  f"{tuple(own[name].shape)}")
                elif name in state:
                    errors.append(f"filled twice: {name}")
                else:
                    state[name] = torch.from_numpy(np.ascontiguousarray(value))
    errors += [f"unused in checkpoint: {k}" for k in sorted(set(flat_params) - used)]
    errors += [f"not filled from checkpoint: {k}" for k in sorted(set(own) - set(state))]
    if errors:
        raise ValueError("openpi parameters do not fit the model:\n  " + "\n  ".join(errors))
    return state


def load_openpi_params(model, flat_params):
    """Fill `model` in place from a flat {openpi path: array} dict (e.g. a params.npz)."""
    model.load_state_dict(openpi_to_state_dict(flat_params, model))
    return model
