"""openpi (JAX) checkpoints -> our PyTorch checkpoint directory.

    python convert_jax.py CHECKPOINT OUT --openpi-config NAME --tokenizer paligemma_tokenizer.model
                          [--fast-tokenizer DIR] [--dtype bf16]     # ready to serve (policy.py serve)
    python convert_jax.py CHECKPOINT OUT [--model pi0|pi05|pi0_fast] [--dtype bf16] [--asset-id ID]
    python convert_jax.py selftest-full WORKDIR [--model pi05]   # fake a full-size one, report memory

CHECKPOINT is an openpi checkpoint: a released one (`<dir>/params/`, `<dir>/assets/`), a training
step (`<exp>/<step>/params/`, every leaf ending in an extra `value` key), or its params/ folder.
OUT gets our checkpoint directory (models.py): model.safetensors with our names, config.json,
and norm_stats.json from the checkpoint's assets. With --openpi-config (one of robots.py's
OPENPI_CONFIGS: the config the checkpoint was trained or released with) it also gets what
serving needs and the weights cannot tell: policy.json (request keys, cameras, adapt_to_pi,
deltas, default prompt, stats kind, metadata), the horizon / prompt length / prompt format of
that config, the norm stats of its asset id, and the tokenizer files. Without it those come
from flags, and no policy.json is written.

openpi stores parameters as a nested dict of arrays in an orbax checkpoint (an OCDBT key-value
store of zstd-compressed zarr arrays plus a `_METADATA` json tree), read here with tensorstore.
Flattened with "/" the paths look like `PaliGemma/llm/layers/attn/q_einsum/w`. Per-layer weights
are *scanned*: stacked on a leading depth axis. Dense kernels are [in, out] (torch.nn.Linear wants
[out, in]); attention kernels keep separate head axes. The table below says, for every openpi
array, which of our parameters it fills and how it is reshaped. Every source array must be used
exactly once and every parameter of our model filled exactly once, otherwise loading stops with the
full list of what is wrong: a model with silently random weights is the worst possible failure.
The model and its sizes are read from the tree itself (openpi's own converter guesses pi0.5 from
the folder name); what weights cannot tell (horizon, prompt length, cameras) comes from flags.

Axis legend (paligemma.py's): N heads, K kv heads, H head dim, W width, F MLP width, r LoRA rank;
p (a local name) the patch size; depth, openpi's scanned axis, spelled out.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import threading

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import robots
from paligemma import GemmaConfig, SiglipConfig
import models
from cli import main_guard
from lora import LoRALinear, apply_openpi_lora, merged_state
from models import build_meta, load_sentencepiece, save_pretrained

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
# openpi's LoRA factors (lora.py's layouts): per-head ones keep the head axis, ours put rank first
heads_t = lambda x: x.transpose(0, 2, 1)                          # [heads, in, r] -> [heads, r, in]; B alike
kv_heads_t = lambda x: (heads_t(x[0]), heads_t(x[1]))             # [2, K, ., .] -> k, v
flat_heads_a = lambda x: x.reshape(-1, x.shape[-1]).T             # attn out A [N, H, r] -> [r, N*H]
one_t = lambda x: x.T[None]                                       # [in, r] -> [1, r, in]; [r, out] -> [1, out, r]
gating_t = lambda x: (x[0].T[None], x[1].T[None])                 # [2, W, r] / [2, r, F] -> gate, up


def mapping_table(model):
    """Rows (openpi path, our name(s), reshape). "{l}" marks a scanned per-layer weight.

    The rows depend on the model only through its structure: how many Gemma experts it has,
    which of their norms are adaptive (pi0.5), whether it carries openpi's LoRA leaves and which
    top-level projections it owns.
    """
    rows = list(SIGLIP_ROWS) + [("PaliGemma/llm/embedder/input_embedding", "llm.embed.weight", same)]  # tied logits
    for e, final_norm in enumerate(model.llm.final_norms):
        lora = isinstance(model.llm.layers[0].experts[e].q_proj, LoRALinear)
        rows += expert_rows(e, final_norm.adaptive, lora)
    for name, module in model.named_children():  # top level: action_in_proj, state_proj, ...
        if isinstance(module, nn.Linear):
            rows += [(f"{name}/kernel", f"{name}.weight", linear), (f"{name}/bias", f"{name}.bias", same)]
    return rows


_BLK, _ATTN = "PaliGemma/img/Transformer/encoderblock", "MultiHeadDotProductAttention_0"
SIGLIP_ROWS = [  # SigLIP: big_vision ViT names -> ours
    ("PaliGemma/img/embedding/kernel", "vision.patch_embed.weight", conv),
    ("PaliGemma/img/embedding/bias", "vision.patch_embed.bias", same),
    ("PaliGemma/img/pos_embedding", "vision.pos_embed", same),
    (f"{_BLK}/LayerNorm_0/scale", "vision.blocks.{l}.norm1.weight", same),
    (f"{_BLK}/LayerNorm_0/bias", "vision.blocks.{l}.norm1.bias", same),
    (f"{_BLK}/{_ATTN}/query/kernel", "vision.blocks.{l}.q_proj.weight", heads_in),
    (f"{_BLK}/{_ATTN}/query/bias", "vision.blocks.{l}.q_proj.bias", flat),
    (f"{_BLK}/{_ATTN}/key/kernel", "vision.blocks.{l}.k_proj.weight", heads_in),
    (f"{_BLK}/{_ATTN}/key/bias", "vision.blocks.{l}.k_proj.bias", flat),
    (f"{_BLK}/{_ATTN}/value/kernel", "vision.blocks.{l}.v_proj.weight", heads_in),
    (f"{_BLK}/{_ATTN}/value/bias", "vision.blocks.{l}.v_proj.bias", flat),
    (f"{_BLK}/{_ATTN}/out/kernel", "vision.blocks.{l}.o_proj.weight", heads_out),
    (f"{_BLK}/{_ATTN}/out/bias", "vision.blocks.{l}.o_proj.bias", same),
    (f"{_BLK}/LayerNorm_1/scale", "vision.blocks.{l}.norm2.weight", same),
    (f"{_BLK}/LayerNorm_1/bias", "vision.blocks.{l}.norm2.bias", same),
    (f"{_BLK}/MlpBlock_0/Dense_0/kernel", "vision.blocks.{l}.fc1.weight", linear),
    (f"{_BLK}/MlpBlock_0/Dense_0/bias", "vision.blocks.{l}.fc1.bias", same),
    (f"{_BLK}/MlpBlock_0/Dense_1/kernel", "vision.blocks.{l}.fc2.weight", linear),
    (f"{_BLK}/MlpBlock_0/Dense_1/bias", "vision.blocks.{l}.fc2.bias", same),
    ("PaliGemma/img/Transformer/encoder_norm/scale", "vision.norm.weight", same),
    ("PaliGemma/img/Transformer/encoder_norm/bias", "vision.norm.bias", same),
    ("PaliGemma/img/head/kernel", "vision.head.weight", linear),
    ("PaliGemma/img/head/bias", "vision.head.bias", same),
]


def expert_rows(e, adaptive, lora):
    """Gemma expert e's rows: attention, MLP, its norms (adaRMS Dense or a plain scale), and
    openpi's LoRA factors when the model carries them."""
    s = "" if e == 0 else f"_{e}"  # openpi suffixes the action expert's weights with _1
    ours, src = f"llm.layers.{{l}}.experts.{e}", "PaliGemma/llm/layers"
    rows = [
        (f"{src}/attn/q_einsum{s}/w", f"{ours}.q_proj.weight", q_einsum),
        (f"{src}/attn/kv_einsum{s}/w", (f"{ours}.k_proj.weight", f"{ours}.v_proj.weight"), kv_einsum),
        (f"{src}/attn/attn_vec_einsum{s}/w", f"{ours}.o_proj.weight", heads_out),
        (f"{src}/mlp{s}/gating_einsum", (f"{ours}.gate_proj.weight", f"{ours}.up_proj.weight"), gating),
        (f"{src}/mlp{s}/linear", f"{ours}.down_proj.weight", linear),
    ]
    for f in ("a", "b") if lora else ():  # openpi's LoRA leaves
        rows += [
            (f"{src}/attn/q_einsum{s}/lora_{f}", f"{ours}.q_proj.lora_{f}", heads_t),
            (f"{src}/attn/kv_einsum{s}/lora_{f}", (f"{ours}.k_proj.lora_{f}", f"{ours}.v_proj.lora_{f}"), kv_heads_t),
            (f"{src}/attn/attn_vec_einsum{s}/lora_{f}", f"{ours}.o_proj.lora_{f}", flat_heads_a if f == "a" else heads_t),
            (f"{src}/mlp{s}/gating_einsum_lora_{f}", (f"{ours}.gate_proj.lora_{f}", f"{ours}.up_proj.lora_{f}"),
             gating_t),
            (f"{src}/mlp{s}/linear_lora_{f}", f"{ours}.down_proj.lora_{f}", one_t),
        ]
    norms = [(f"{src}/pre_attention_norm{s}", f"{ours}.attn_norm"), (f"{src}/pre_ffw_norm{s}", f"{ours}.mlp_norm"),
             (f"PaliGemma/llm/final_norm{s}", f"llm.final_norms.{e}")]
    for jax_norm, our_norm in norms:
        if adaptive:  # pi0.5 adaRMS: a Dense cond -> 3W
            rows += [(f"{jax_norm}/Dense_0/kernel", f"{our_norm}.dense.weight", linear),
                     (f"{jax_norm}/Dense_0/bias", f"{our_norm}.dense.bias", same)]
        else:  # plain RMSNorm: the raw scale, used as (1 + scale) in the forward
            rows += [(f"{jax_norm}/scale", f"{our_norm}.scale", same)]
    return rows


def openpi_to_state_dict(flat_params, model, dtype=torch.float32, progress=None, strict=True):
    """Turn a flat {openpi path: array} dict into our state dict of `dtype` tensors, strictly
    (strict=False: only what the dict holds, e.g. a subset of gradients).

    Values may be numpy arrays or lazy on-disk arrays (OrbaxArray): each is read once, converted,
    and dropped before the next, so memory holds the result plus about one source array.
    Raises ValueError listing every openpi array left unused, every parameter left unfilled and
    every shape that does not fit. progress: an optional tqdm bar counting source elements.
    """
    flat_params = {k.removesuffix("/value"): v for k, v in flat_params.items()}  # training layout
    own = model.state_dict()
    depth = {"vision": len(model.vision.blocks), "llm": len(model.llm.layers)}
    state, errors, used = {}, [], set()
    for src, dst, fn in mapping_table(model):
        if src not in flat_params:
            errors += [f"missing in checkpoint: {src}"] if strict else []
            continue
        used.add(src)
        x = np.asarray(flat_params[src], dtype=np.float32)  # a lazy array is read here
        if progress is not None:
            progress.update(x.size)
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
                else:  # a copy where reshaped, a view into x where not
                    state[name] = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
        x = outs = value = None  # let the source array go before the next one is read
    errors += [f"unused in checkpoint: {k}" for k in sorted(set(flat_params) - used)]
    errors += [f"not filled from checkpoint: {k}" for k in sorted(set(own) - set(state))] if strict else []
    if errors:
        raise ValueError("openpi parameters do not fit the model:\n  " + "\n  ".join(errors))
    return state


def load_openpi_params(model, flat_params):
    """Fill `model` in place from a flat {openpi path: array} dict (e.g. a params.npz)."""
    model.load_state_dict(openpi_to_state_dict(flat_params, model))
    return model


# -- what the tree holds: the model and its sizes, from names and shapes alone ------------------
def detect_model(shapes):
    """pi0, pi05 or pi0_fast from the parameter names (never from the checkpoint's path)."""
    if "PaliGemma/llm/layers/attn/q_einsum_1/w" not in shapes:
        return "pi0_fast"  # PaliGemma alone, no `_1` action expert
    pi0 = "state_proj/kernel" in shapes  # pi0 projects the state into one suffix token
    # pi0.5 conditions on time through an MLP and adaRMS norms (a Dense_0 instead of a scale)
    pi05 = "time_mlp_in/kernel" in shapes or "PaliGemma/llm/final_norm_1/Dense_0/kernel" in shapes
    if pi0 == pi05:
        raise ValueError("the checkpoint has an action expert but "
                         f"{'both' if pi0 else 'neither'} pi0's state_proj "
                         f"{'and' if pi0 else 'nor'} pi0.5's time_mlp_in / adaRMS norms")
    return "pi0" if pi0 else "pi05"


def config_from_shapes(shapes, name, action_horizon=None, max_token_len=None, cameras=None,
                       action_dim=None, **settings):
    """Our config for model `name`: sizes from array shapes, the rest from arguments or defaults
    (settings: other config fields, e.g. pi0.5's discrete_state_input)."""
    def need(path):
        if path not in shapes:
            raise ValueError(f"missing in checkpoint: {path} (needed to infer the architecture)")
        return shapes[path]

    def gemma(s):  # s: "" for PaliGemma, "_1" for the action expert
        L, N, W, H = need(f"PaliGemma/llm/layers/attn/q_einsum{s}/w")
        return GemmaConfig(width=W, depth=L, num_heads=N, head_dim=H,
                           num_kv_heads=need(f"PaliGemma/llm/layers/attn/kv_einsum{s}/w")[2],
                           mlp_dim=need(f"PaliGemma/llm/layers/mlp{s}/gating_einsum")[-1])

    blk = "PaliGemma/img/Transformer/encoderblock"
    p, _, _, W = need("PaliGemma/img/embedding/kernel")  # [p, p, 3, W]
    L, _, N, H = need(f"{blk}/MultiHeadDotProductAttention_0/query/kernel")  # [depth, W, N, H]
    P = need("PaliGemma/img/pos_embedding")[1]  # patches per image: a square grid of side P^0.5
    if N * H != W or math.isqrt(P) ** 2 != P:
        raise ValueError(f"SigLIP shapes do not fit: width {W}, {N} heads of {H}, {P} patches")
    kwargs = dict(vision=SiglipConfig(width=W, depth=L, num_heads=N, patch=p,
                                      image_size=math.isqrt(P) * p,
                                      mlp_dim=need(f"{blk}/MlpBlock_0/Dense_0/kernel")[-1]),
                  llm=gemma(""), vocab_size=need("PaliGemma/llm/embedder/input_embedding")[0])
    if models.spec(name).flow:  # the flow models know their action width from action_in_proj
        kwargs["expert"] = gemma("_1")
        stored = need("action_in_proj/kernel")[0]
        if action_dim not in (None, stored):
            raise ValueError(f"--action-dim {action_dim}, but action_in_proj holds {stored}")
        action_dim = stored
    flags = dict(action_dim=action_dim, action_horizon=action_horizon,
                 max_token_len=max_token_len, cameras=cameras and tuple(cameras))
    flags.update(settings)
    return models.spec(name).config(**kwargs, **{k: v for k, v in flags.items() if v is not None})


def openpi_shapes(cfg):
    """{openpi path: shape} that openpi writes for one of our configs: the inverse of the two
    functions above, used to fake full-size checkpoints (selftest-full)."""
    v, img, blk = cfg.vision, "PaliGemma/img", "PaliGemma/img/Transformer/encoderblock"
    model, _ = build_meta(cfg)  # the structure (which norms adapt, which projections), no memory
    a, L, W, N, F = f"{blk}/MultiHeadDotProductAttention_0", v.depth, v.width, v.num_heads, v.mlp_dim
    dense = lambda name, kernel, bias, lead=(): {f"{name}/kernel": (*lead, *kernel),
                                                 f"{name}/bias": (*lead, *bias)}
    shapes = {f"{img}/pos_embedding": (1, (v.image_size // v.patch) ** 2, W),
              "PaliGemma/llm/embedder/input_embedding": (cfg.vocab_size, cfg.llm.width),
              **dense(f"{img}/embedding", (v.patch, v.patch, 3, W), (W,)),
              **dense(f"{img}/head", (W, cfg.llm.width), (cfg.llm.width,)),
              **dense(f"{a}/out", (N, W // N, W), (W,), (L,)),
              **dense(f"{blk}/MlpBlock_0/Dense_0", (W, F), (F,), (L,)),
              **dense(f"{blk}/MlpBlock_0/Dense_1", (F, W), (W,), (L,))}
    for x in ("query", "key", "value"):
        shapes |= dense(f"{a}/{x}", (W, N, W // N), (N, W // N), (L,))
    for norm, lead in ((f"{blk}/LayerNorm_0", (L,)), (f"{blk}/LayerNorm_1", (L,)),
                       (f"{img}/Transformer/encoder_norm", ())):
        shapes |= {f"{norm}/scale": (*lead, W), f"{norm}/bias": (*lead, W)}
    for e, g in enumerate([cfg.llm] + ([cfg.expert] if models.spec(cfg).flow else [])):
        s, layers = "" if e == 0 else f"_{e}", "PaliGemma/llm/layers"
        L, N, K, H, W, F = g.depth, g.num_heads, g.num_kv_heads, g.head_dim, g.width, g.mlp_dim
        shapes |= {f"{layers}/attn/q_einsum{s}/w": (L, N, W, H),
                   f"{layers}/attn/kv_einsum{s}/w": (L, 2, K, W, H),
                   f"{layers}/attn/attn_vec_einsum{s}/w": (L, N, H, W),
                   f"{layers}/mlp{s}/gating_einsum": (L, 2, W, F), f"{layers}/mlp{s}/linear": (L, F, W)}
        for norm, lead in ((f"{layers}/pre_attention_norm{s}", (L,)),
                           (f"{layers}/pre_ffw_norm{s}", (L,)), (f"PaliGemma/llm/final_norm{s}", ())):
            if model.llm.final_norms[e].adaptive:  # adaRMS: Dense(time cond) -> scale, shift, gate
                shapes |= dense(f"{norm}/Dense_0", (W, 3 * W), (3 * W,), lead)
            else:
                shapes[f"{norm}/scale"] = (*lead, W)
    for name, module in model.named_children():  # the flow models' top-level projections
        if isinstance(module, nn.Linear):
            shapes |= dense(name, (module.in_features, module.out_features), (module.out_features,))
    return shapes


# -- orbax checkpoints on disk: an OCDBT key-value store of zarr arrays, read with tensorstore -----
def import_tensorstore():
    try:
        import tensorstore
        return tensorstore
    except ImportError:
        raise ImportError("openpi (orbax) checkpoints need tensorstore: pip install tensorstore") from None


class OrbaxArray:
    """One array of an orbax checkpoint; read from disk only when numpy asks for its values."""

    def __init__(self, store):
        self.store, self.shape = store, tuple(store.shape)

    def __array__(self, dtype=None, copy=None):
        x = self.store.read().result()
        return x if dtype is None else x.astype(dtype, copy=False)  # bf16 -> fp32 via ml_dtypes


def read_orbax(params_dir):
    """{openpi path: OrbaxArray} of an orbax PyTree checkpoint folder; nothing is read yet.

    `_METADATA` lists every leaf as a key tuple, e.g. ('params', 'PaliGemma', ..., 'kernel');
    orbax stores that leaf as the zarr array "params.PaliGemma....kernel" in the OCDBT store.
    """
    ts = import_tensorstore()
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})  # no cache: one copy at a time
    kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(params_dir)}/"}
    files = {k.decode() for k in ts.KvStore.open(kvstore, context=context).result().list().result()}
    meta = os.path.join(params_dir, "_METADATA")
    try:
        with open(meta) as f:
            tree = json.load(f)["tree_metadata"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta}: not an orbax tree ({type(e).__name__}: {e}); the checkpoint is damaged") from None
    arrays = {}
    for keys in ([str(k["key"]) for k in leaf["key_metadata"]] for leaf in tree.values()):
        name = ".".join(keys)
        driver = "zarr" if f"{name}/.zarray" in files else "zarr3" if f"{name}/zarr.json" in files else None
        if driver is None:
            raise ValueError(f"{params_dir}: leaf {'/'.join(keys)} of the tree has no array in the store")
        spec = {"driver": driver, "kvstore": dict(kvstore, path=name)}
        # the released layout is a single item {"params": tree}; the training layout nests the same
        arrays["/".join(keys[1:] if keys[0] == "params" else keys)] = OrbaxArray(
            ts.open(spec, open=True, read=True, context=context).result())
    return arrays


def write_orbax(params_dir, arrays):
    """Write (openpi path, array) pairs the way openpi's released checkpoints are laid out: one
    item {"params": tree}, zstd zarr arrays in an OCDBT store, a `_METADATA` tree. For fake
    checkpoints in tests and the full-size self-test; pairs may come from a generator."""
    ts = import_tensorstore()
    context, tree = ts.Context(), {}
    kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(params_dir)}/"}
    for path, x in arrays:
        keys = ["params", *path.split("/")]
        dtype = "bfloat16" if x.dtype.name == "bfloat16" else x.dtype.str
        metadata = {"shape": x.shape, "chunks": x.shape, "dtype": dtype,
                    "compressor": {"id": "zstd", "level": 1}}
        spec = {"driver": "zarr", "kvstore": dict(kvstore, path=".".join(keys)), "metadata": metadata}
        ts.open(spec, create=True, context=context).result().write(x).result()
        tree[str(tuple(keys))] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                                  "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
    with open(os.path.join(params_dir, "_METADATA"), "w") as f:
        json.dump({"tree_metadata": tree}, f)


# -- the conversion --------------------------------------------------------------------------------
def find_checkpoint(path):
    """(params folder, assets folder) of a checkpoint dir, a training step dir or a params/ folder."""
    path = os.path.abspath(path)
    is_orbax = lambda p: os.path.exists(os.path.join(p, "_METADATA"))
    if not is_orbax(path):
        path = os.path.join(path, "params")
        if not is_orbax(path):
            raise FileNotFoundError(f"{path}: no orbax checkpoint (a folder with _METADATA); give a "
                                    "checkpoint dir, a training step dir <exp>/<step>, or params/")
    return path, os.path.join(os.path.dirname(path), "assets")


def find_norm_stats(assets_dir, asset_id=None):
    """openpi copies norm stats to <checkpoint>/assets/<asset_id>/norm_stats.json; asset ids can
    hold a slash (a LeRobot repo id). Returns the inner {"state": ..., "actions": ...} or None."""
    found = sorted(os.path.relpath(d, assets_dir) for d, _, files in os.walk(assets_dir)
                   if "norm_stats.json" in files)
    print(f"norm stats in {assets_dir} for asset ids: {found or 'none'}")
    if asset_id is not None and asset_id not in found:
        raise ValueError(f"asset id {asset_id}: no {assets_dir}/{asset_id}/norm_stats.json "
                         f"(found: {found or 'none'}; choose with --asset-id)")
    if asset_id is None and len(found) != 1:
        if found:
            raise ValueError(f"several asset ids have norm stats: {found}; pick one with --asset-id")
        return None
    path = os.path.join(assets_dir, asset_id or found[0], "norm_stats.json")
    with open(path) as f:
        stats = json.load(f)
    if "norm_stats" not in stats:
        raise ValueError(f"{path}: expected openpi's format {{\"norm_stats\": {{...}}}}")
    return stats["norm_stats"]


def lora_ranks(shapes):
    """{"llm" | "expert": rank} of the experts an openpi tree has LoRA factors for (lora.py)."""
    return {part: shapes[f"PaliGemma/llm/layers/attn/q_einsum{s}/lora_a"][-1]
            for part, s in (("llm", ""), ("expert", "_1")) if f"PaliGemma/llm/layers/attn/q_einsum{s}/lora_a" in shapes}


def model_from_params(flat_params, model=None, dtype=torch.float32, progress=False, **flags):
    """Detect, size, build and fill one of our models from a flat {openpi path: array} tree.

    The model is built on the meta device (no memory) and takes the converted tensors as its
    parameters (assign=True), so the weights exist once. model: an expected name, checked.
    flags: action_horizon, max_token_len, cameras, action_dim (see config_from_shapes). A tree
    with openpi LoRA factors (a LoRA fine-tune's checkpoint) is loaded into LoRA layers of the
    same structure and merged into the weights (W + scale * update, lora.py): a plain model.
    """
    flat_params = {k.removesuffix("/value"): v for k, v in flat_params.items()}  # training layout
    shapes = {k: tuple(v.shape) for k, v in flat_params.items()}
    name = detect_model(shapes)
    if model is not None and model != name:
        raise ValueError(f"--model {model}, but the checkpoint holds a {name} (pi0 has state_proj, "
                         "pi0.5 time_mlp_in and adaRMS norms, pi0-FAST no `_1` action expert)")
    cfg = config_from_shapes(shapes, name, **flags)
    ranks = lora_ranks(shapes)
    with torch.device("meta"):
        net = models.spec(name).model(cfg)
        apply_openpi_lora(net, list(ranks), ranks)  # openpi's variants: alpha = rank
    with tqdm(total=sum(math.prod(s) for s in shapes.values()), unit="param", unit_scale=True,
              desc="read + convert", disable=not progress) as bar:
        net.load_state_dict(openpi_to_state_dict(flat_params, net, dtype, bar), assign=True)
    if ranks:
        merged = {k: v.to(dtype) for k, v in merged_state(net).items()}
        with torch.device("meta"):
            net = models.spec(name).model(cfg)
        net.load_state_dict(merged, assign=True)
        print(f"merged openpi's LoRA factors (ranks {ranks}) into the weights")
    return net.eval()


@contextlib.contextmanager
def write_progress(total_bytes):
    """A tqdm bar for one long save call, fed by the bytes this process has written so far
    (Linux's /proc/self/io; elsewhere the bar just jumps to the end)."""
    def written():
        if not os.path.exists("/proc/self/io"):
            return 0
        with open("/proc/self/io") as f:
            return int(f.read().split("wchar:")[1].split()[0])

    def poll():
        while not done.wait(0.2):
            bar.update(min(written() - start, total_bytes) - bar.n)

    start, done, thread = written(), threading.Event(), threading.Thread(target=poll, daemon=True)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="write") as bar:
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        bar.update(total_bytes - bar.n)


def check_serving_inputs(openpi_config, norm_stats, tokenizer, fast_tokenizer):
    """What --openpi-config needs besides the weights, checked before they are read: every
    missing piece is an error naming the flag that supplies it."""
    c = robots.openpi_config(openpi_config)
    if norm_stats is None:
        raise FileNotFoundError(f"{openpi_config} needs the norm stats of asset id '{c.asset_id}' "
                                "(<checkpoint>/assets/<asset_id>/norm_stats.json); pass --asset-id if they are under another id")
    if tokenizer is None:
        raise ValueError(f"{openpi_config}: serving needs the prompt tokenizer: --tokenizer paligemma_tokenizer.model "
                         "(PaliGemma's SentencePiece model)")
    if models.spec(c.model).fast_targets_required and (fast_tokenizer is None or not os.path.isdir(fast_tokenizer)):
        raise ValueError(f"{openpi_config}: pi0-FAST reads its actions back with the FAST tokenizer: "
                         "--fast-tokenizer DIR (physical-intelligence/fast: tokenizer.json + processor_config.json)")


def serving_files(openpi_config, cfg, tokenizer, fast_tokenizer):
    """What --openpi-config adds to the checkpoint: (policy.json, [(file, name in the checkpoint)])."""
    c = robots.openpi_config(openpi_config)
    sp = load_sentencepiece(tokenizer)
    if sp.vocab_size() > cfg.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer} has {sp.vocab_size()} pieces, more than the model's "
                         f"{cfg.vocab_size} embeddings: not this checkpoint's tokenizer")
    files = [(tokenizer, "tokenizer.model")]
    if models.spec(c.model).fast_targets_required:  # pi0-FAST reads its actions back with it
        files.append((fast_tokenizer, "fast_tokenizer"))
    return robots.policy_settings(openpi_config), files


def convert(checkpoint, out, model=None, dtype="fp32", asset_id=None, openpi_config=None, tokenizer=None,
            fast_tokenizer=None, **flags):
    """openpi checkpoint -> our checkpoint directory `out` (written atomically). Returns the model.
    openpi_config: the openpi config name; the directory is then ready for policy.Policy."""
    params_dir, assets_dir = find_checkpoint(checkpoint)
    if openpi_config is not None:
        c = robots.openpi_config(openpi_config)
        if model not in (None, c.model):
            raise ValueError(f"--model {model}, but openpi config {openpi_config} is a {c.model}")
        model, asset_id = c.model, asset_id or c.asset_id
        # the config's horizon, prompt length, cameras and prompt format; explicit flags win
        flags = {**robots.model_overrides(openpi_config), **{k: v for k, v in flags.items() if v is not None}}
    norm_stats = find_norm_stats(assets_dir, asset_id)  # before the long part: fail fast
    if openpi_config is not None:
        check_serving_inputs(openpi_config, norm_stats, tokenizer, fast_tokenizer)
    print(f"reading {params_dir}")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    net = model_from_params(read_orbax(params_dir), model, torch_dtype, progress=True, **flags)
    policy, files = None, []
    if openpi_config is not None:
        policy, files = serving_files(openpi_config, net.cfg, tokenizer, fast_tokenizer)
    print(f"{net.cfg.model}: {json.dumps(net.cfg.to_dict())}")
    size = sum(t.nbytes for t in net.state_dict().values())
    with write_progress(size):
        save_pretrained(net, out, norm_stats=norm_stats, extra_files=files,
                        json_files=policy and {"policy.json": policy})
    print(f"wrote {out}: {sum(t.numel() for t in net.parameters()):,} parameters, {size / 2**30:.2f} "
          f"GiB ({dtype}), {'with' if norm_stats else 'no'} norm_stats.json"
          + (f", policy.json for openpi config {openpi_config}" if policy else ""))
    return net


def selftest_full(workdir, model="pi05", dtype="fp32"):
    """Fake an openpi checkpoint of the full-size model (constant weights) and convert it in a
    fresh process, which reports its peak memory: the converter's whole footprint."""
    cfg = models.spec(model).config()  # the defaults are openpi's full-size model
    params_dir = os.path.join(workdir, "openpi", "params")
    os.makedirs(params_dir, exist_ok=True)
    shapes = openpi_shapes(cfg)
    fake = ((k, np.full(s, 0.01 * (i + 1), np.float32)) for i, (k, s) in enumerate(shapes.items()))
    write_orbax(params_dir, tqdm(fake, total=len(shapes), desc="fake full-size checkpoint"))
    out = os.path.join(workdir, "converted")
    subprocess.run([sys.executable, os.path.abspath(__file__), os.path.dirname(params_dir), out,
                    "--model", model, "--dtype", dtype], check=True)
    gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    weights = sum(math.prod(s) for s in shapes.values()) * (4 if dtype == "fp32" else 2) / 2**30
    print(f"selftest-full {model} {dtype}: peak RSS of the conversion {gb:.2f} GiB "
          f"for {weights:.2f} GiB of converted weights")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arg = parser.add_argument
    arg("checkpoint", help="openpi checkpoint, step dir or params/ folder; or: selftest-full")
    arg("out", help="output checkpoint directory (selftest-full: a work folder)")
    arg("--model", choices=sorted(models.MODELS), help="expected model (it is detected from the weights; "
        "a mismatch is an error); selftest-full: which model to fake, default pi05")
    arg("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the stored weights")
    arg("--openpi-config", choices=list(robots.OPENPI_CONFIGS), metavar="NAME",
        help="the openpi config of the checkpoint (writes policy.json, tokenizer and the config's settings "
             f"for serving): {', '.join(robots.OPENPI_CONFIGS)}")
    arg("--tokenizer", help="PaliGemma's SentencePiece model (paligemma_tokenizer.model); needed with --openpi-config")
    arg("--fast-tokenizer", help="pi0-FAST configs: the FAST tokenizer's HF folder (physical-intelligence/fast)")
    arg("--asset-id", help="which assets/<asset_id>/norm_stats.json (default: the config's, or the only one)")
    arg("--action-horizon", type=int, help="chunk length (default: openpi's, 50; pi0-FAST 32)")
    arg("--max-token-len", type=int, help="prompt tokens (default: pi0 48, pi05 200, FAST 250)")
    arg("--cameras", help="comma-separated view names in model order (default: openpi's)")
    arg("--action-dim", type=int, help="pi0-FAST's action width (default 32); pi0 / pi0.5 read "
        "theirs from the weights")
    args = parser.parse_args(argv)
    if args.checkpoint == "selftest-full":
        return selftest_full(args.out, args.model or "pi05", args.dtype)
    convert(args.checkpoint, args.out, args.model, args.dtype, args.asset_id, args.openpi_config, args.tokenizer,
            args.fast_tokenizer, action_horizon=args.action_horizon, max_token_len=args.max_token_len,
            cameras=args.cameras and args.cameras.split(","), action_dim=args.action_dim)
    print(f"peak memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    with main_guard():
        main()
