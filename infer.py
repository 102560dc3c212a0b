"""Inference: a checkpoint directory + raw robot observations -> robot actions.

`Policy` applies exactly the transforms training used (resize-with-pad, normalization, the
model's own prompt format, padding), samples a normalized action chunk, and undoes the
normalization (and delta actions) for the robot's own action width.

A checkpoint directory (see DESIGN.md) holds model.safetensors, config.json, norm_stats.json,
tokenizer.model (SentencePiece), fast_tokenizer.json (pi0-FAST / pi0.5 co-training) and
policy.json: how the robot's data maps onto the model (camera key per model view, delta-action
mask, normalization kind, the robot's state and action widths).

Speed lives here, not in the model files (gpt-fast's model.py vs generate.py): `FastSampler` is
pi0.py's `sample_actions` with a preallocated static KV cache, the time conditioning precomputed
for the 10 fixed Euler times, no host sync in the loop, optional torch.compile and (CUDA only) one
CUDA graph over the whole denoising loop. tests/test_infer.py checks it against the readable
sampler to 1e-5.

Commands:
  python infer.py bench --model pi0 --config small           # latency, TFLOP/s, GB/s, memory
  python infer.py bench --model pi0_fast --config small      # prefill and ms per decoded token
  python infer.py serve --checkpoint DIR --port 8000         # openpi's websocket protocol

Axis legend: B batch, V views, P prefix tokens, T suffix tokens in one call, S cache slots,
C chunk, A action dim, W expert width, N query heads, K kv heads, H head dim, L layers.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
from paligemma import BIG_NEG
from pi0 import euler_times, posemb_sincos


def load_model(path, device="cpu"):
    """Any of our models from a checkpoint directory, by the "model" field of its config.json."""
    with open(os.path.join(path, "config.json")) as f:
        kind = json.load(f).get("model")
    if kind in ("pi0", "pi05"):
        from pi0 import from_pretrained
    elif kind == "pi0_fast":
        from pi0_fast import from_pretrained
    else:
        raise ValueError(f"{path}/config.json: unknown model {kind!r} (expected pi0, pi05 or pi0_fast)")
    return from_pretrained(path).to(device).eval()


def prompt_function(cfg, sp):
    """The model's prompt format as data.Transforms wants it: (prompt, normalized state) -> ids, mask."""
    if cfg.model == "pi0":
        from pi0 import tokenize_prompt
        return lambda prompt, state: tokenize_prompt(sp, prompt, cfg.max_token_len)
    if cfg.model == "pi05":
        from pi05 import tokenize_prompt
        return lambda prompt, state: tokenize_prompt(sp, prompt, state, cfg.max_token_len,
                                                     cfg.discrete_state_input)
    if cfg.model == "pi0_fast":  # the prompt alone; the model writes "Action: ..." itself
        from pi0_fast import tokenize
        return lambda prompt, state: tokenize(sp, None, prompt, state, None, cfg.max_token_len, cfg.vocab_size)[:2]
    raise ValueError(f"no prompt function for model {cfg.model!r}")


def load_sentencepiece(path):
    import sentencepiece as spm
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the checkpoint has no SentencePiece tokenizer")
    return spm.SentencePieceProcessor(model_file=str(path))


# ----------------------------------------------------------------------------------------------
# The fast sampler: pi0.py's sample_actions, rearranged for speed (tested against it)

def rotate(x, cos, sin):
    """RoPE with precomputed tables (paligemma.rope's split-half rotation, in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rms_norm(x, mul, shift=None):
    """Gemma's RMSNorm with its (1 + scale) [and adaRMS shift] precomputed, statistics in fp32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * mul
    return (y if shift is None else y + shift).to(x.dtype)


def attend(q, k, v, mask):
    """paligemma.attention: multi-query attention, fp32 logits and softmax. q (B, T, N, H)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    logits = torch.einsum("btkgh,bskh->bkgts", q.view(B, T, K, N // K, H).float(), k.float())
    probs = torch.softmax(logits.masked_fill(~mask[:, None, None], BIG_NEG), dim=-1).to(v.dtype)
    return torch.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N * H)


class FastSampler:
    """Action chunks from a Pi0 / Pi05 model, fast; equal to model.sample_actions(batch, noise).

    What is faster than the readable sampler, one line each:
      - static KV cache (L, B, S, K, H) allocated once per batch shape: prefix written once,
        pi0's state token once per observation (it never sees the actions), action slots
        overwritten in place each step; no torch.cat, fixed shapes for compile / CUDA graphs;
      - the expert's layers run alone (no generic multi-expert bookkeeping), RoPE tables and the
        attention mask built once per observation;
      - time conditioning precomputed for the fixed Euler times: pi0's time half of the
        action-time MLP becomes one bias per step; pi0.5's time MLP *and* every adaRMS
        (scale, shift, gate) of every layer become per-step constants;
      - Python-float timesteps and a Python for loop: no host sync inside sampling;
      - compile_mode: torch.compile of the vision, prefill and denoising functions
        (None = eager; "default" does not autotune; "max-autotune" does, and takes minutes);
      - cuda_graph (CUDA only): the whole 10-step loop captured once per batch shape and
        replayed. UNTESTED here (no GPU in the dev box); guarded by a device check.
    dtype: the compute dtype of the matmuls (torch.bfloat16 on GPU); norms, RoPE, attention
    logits and the action projections stay fp32 as in the model. The expert's weights are
    snapshotted at construction (a bf16 copy, or the live fp32 tensors) with the time
    conditioning, so build the sampler after loading the weights.
    """

    def __init__(self, model, num_steps=10, dtype=torch.float32, compile_mode=None, cuda_graph=False):
        if model.cfg.model not in ("pi0", "pi05"):
            raise ValueError(f"FastSampler samples pi0 / pi0.5, not {model.cfg.model!r}")
        self.model, self.cfg, self.num_steps, self.dtype = model, model.cfg, num_steps, dtype
        self.device = next(model.parameters()).device
        self.is_pi05 = model.cfg.model == "pi05"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.cuda_graph, self.graph, self.shape = cuda_graph, None, None
        self.expert = model.llm.experts[1]
        self.times, self.dt = euler_times(num_steps)
        with torch.no_grad():
            self._precompute()
        self.vision_fn, self.prefill_fn, self.denoise_fn = model.embed_images, model.prefill, self.denoise
        if compile_mode is not None:
            self.vision_fn = torch.compile(model.embed_images, mode=compile_mode, fullgraph=True)
            self.prefill_fn = torch.compile(model.prefill, mode=compile_mode)
            self.denoise_fn = torch.compile(self.denoise, mode=compile_mode, fullgraph=True)

    def _precompute(self):
        m, dt, W = self.model, self.dtype, self.cfg.expert.width
        cast = lambda w: w if w.dtype == dt else w.to(dt)
        self.w = [{n: cast(getattr(layer, f"{n}_proj").weight) for n in ("q", "k", "v", "o", "gate", "up", "down")}
                  for layer in self.expert.layers]
        t = torch.tensor(self.times, dtype=torch.float32, device=self.device)
        temb = posemb_sincos(t, W)  # (steps, W), fp32 as in the model
        norms = [n for layer in self.expert.layers for n in (layer.attn_norm, layer.mlp_norm)]
        norms.append(self.expert.final_norm)
        if not self.is_pi05:
            # one set of plain norms for every step: (1 + scale), no shift, no gate
            plain = [(1 + n.scale.float(), None, None) for n in norms]
            self.mods = [plain] * self.num_steps
            w_in = m.action_time_mlp_in.weight  # (W, 2W): [actions | time] halves
            self.w_act, self.w_time_out = cast(w_in[:, :W]), cast(m.action_time_mlp_out.weight)
            self.b_time_out = cast(m.action_time_mlp_out.bias)
            # the time half of the action-time MLP is a per-step bias: (steps, 1, 1, W)
            self.time_bias = cast((temb @ w_in[:, W:].float().t() + m.action_time_mlp_in.bias.float())[:, None, None])
            self.w_state, self.b_state = cast(m.state_proj.weight), cast(m.state_proj.bias)
        else:
            # pi0.5: time MLP -> condition -> every norm's (scale, shift, gate), per step
            cond = F.silu(m.time_mlp_out(F.silu(m.time_mlp_in(temb))))  # (steps, W)
            self.mods = []
            for i in range(self.num_steps):
                step = []
                for n in norms:
                    scale, shift, gate = n.dense(cond[i:i + 1]).float()[:, None, :].chunk(3, dim=-1)
                    step.append((1 + scale, shift, gate.to(dt)))  # each (1, 1, W)
                self.mods.append(step)

    # -- phases: vision and prefix are the model's own (pi0.py); the cache and denoising are here --

    def _buffers(self, B, P):
        """The static buffers for a batch shape, allocated once and then written in place."""
        if self.shape == (B, P):
            return
        g, C, dev = self.cfg.expert, self.cfg.action_horizon, self.device
        self.n_state = 0 if self.is_pi05 else 1  # pi0's state token sits between prefix and actions
        S = P + self.n_state + C
        self.k = torch.zeros(g.depth, B, S, g.num_kv_heads, g.head_dim, dtype=self.dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.act_mask = torch.zeros(B, C, S, dtype=torch.bool, device=dev)  # action queries
        self.cos = torch.zeros(B, C, 1, g.head_dim // 2, device=dev)  # action RoPE tables
        self.sin = torch.zeros_like(self.cos)
        self.shape, self.graph = (B, P), None  # a new shape needs a new graph

    def rope_tables(self, positions):
        H = self.cfg.expert.head_dim
        timescale = 1e4 ** ((2.0 / H) * torch.arange(H // 2, device=positions.device, dtype=torch.float32))
        radians = positions.float()[..., None] / timescale  # (B, T, H/2)
        return torch.cos(radians)[:, :, None, :], torch.sin(radians)[:, :, None, :]

    def expert_layers(self, x, start, mask, cos, sin, mods):
        """The action expert over T new tokens at cache slots [start, start + T), in place.

        x (B, T, W); mask (B, T, start + T) over the cache; mods per norm (mul, shift, gate).
        """
        B, T, _ = x.shape
        H, end = self.cfg.expert.head_dim, start + T
        for i, w in enumerate(self.w):
            mul, shift, gate = mods[2 * i]
            h = rms_norm(x, mul, shift)
            q = rotate(F.linear(h, w["q"]).view(B, T, -1, H), cos, sin) * H ** -0.5  # (B, T, N, H)
            self.k[i, :, start:end] = rotate(F.linear(h, w["k"]).view(B, T, -1, H), cos, sin)
            self.v[i, :, start:end] = F.linear(h, w["v"]).view(B, T, -1, H)
            y = F.linear(attend(q, self.k[i, :, :end], self.v[i, :, :end], mask), w["o"])
            x = x + (y if gate is None else y * gate)
            mul, shift, gate = mods[2 * i + 1]
            h = rms_norm(x, mul, shift)
            y = F.linear(F.gelu(F.linear(h, w["gate"]), approximate="tanh") * F.linear(h, w["up"]), w["down"])
            x = x + (y if gate is None else y * gate)
        mul, shift, _ = mods[-1]
        return rms_norm(x, mul, shift)

    def prepare(self, batch, img):
        """Prefill the static cache for one batch of observations (prefix, and pi0's state)."""
        prefix_mask, kv = self.prefill_fn(batch, img)  # model.prefill from the image tokens
        B, P = prefix_mask.shape
        C = self.cfg.action_horizon
        self._buffers(B, P)
        for i, (k, v) in enumerate(kv):
            self.k[i, :, :P], self.v[i, :, :P] = k, v
        n_valid = prefix_mask.sum(-1, keepdim=True)  # positions continue after the valid prefix
        self.act_mask[:, :, :P] = prefix_mask[:, None, :]  # actions see the valid prefix ...
        self.act_mask[:, :, P:] = True  # ... pi0's state token and all actions
        if not self.is_pi05:  # the state token: sees the prefix and itself, never the actions
            state = F.linear(batch["state"].to(self.dtype), self.w_state, self.b_state)[:, None]
            cos, sin = self.rope_tables(n_valid)
            mask = torch.cat([prefix_mask, prefix_mask.new_ones(B, 1)], dim=1)[:, None]  # (B, 1, P + 1)
            self.expert_layers(state, P, mask, cos, sin, self.mods[0])
        cos, sin = self.rope_tables(n_valid + self.n_state + torch.arange(C, device=self.device))
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def embed_actions(self, x, i):
        """Noisy actions at step i -> action tokens (B, C, W), time folded in (precomputed)."""
        with torch.autocast(x.device.type, enabled=False):  # action projections stay fp32
            a = self.model.action_in_proj(x).to(self.dtype)
        if self.is_pi05:
            return a
        h = F.silu(F.linear(a, self.w_act) + self.time_bias[i])
        return F.linear(h, self.w_time_out, self.b_time_out)

    def denoise(self, x):
        """The Euler loop over the fixed times: x (B, C, A) noise -> actions, no host sync."""
        P0 = self.shape[1] + self.n_state
        for i in range(self.num_steps):  # Python ints and floats only
            out = self.expert_layers(self.embed_actions(x, i), P0, self.act_mask, self.cos, self.sin, self.mods[i])
            with torch.autocast(x.device.type, enabled=False):
                v = self.model.action_out_proj(out.float())  # (B, C, A), fp32
            x = x + self.dt * v
        return x

    def denoise_graphed(self, x):
        """Replay one CUDA graph of the whole loop (captured on first use per batch shape)."""
        if self.graph is None:
            self.static_x = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (and compilation) outside the capture
                for _ in range(2):
                    self.denoise_fn(self.static_x)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.denoise_fn(self.static_x)
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out.clone()  # the next replay overwrites static_out

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def __call__(self, batch, noise=None):
        """batch as for model.sample_actions -> (B, C, A) normalized actions, fp32."""
        B = batch["state"].shape[0]
        shape = (B, self.cfg.action_horizon, self.cfg.action_dim)
        x = torch.randn(shape, device=self.device) if noise is None else noise.float()
        with self.autocast():
            self.prepare(batch, self.vision_fn(batch["images"]))
            return self.denoise_graphed(x) if self.cuda_graph else self.denoise_fn(x)


class Policy:
    """Raw observations -> robot actions, for one checkpoint directory.

    observation: {"images": {camera key: uint8 (H, W, 3)}, "state": (S,), "prompt": str}
    """

    def __init__(self, path, device="cpu", num_steps=10, fast=False, compile_mode=None,
                 cuda_graph=False, dtype=None):
        """fast=True samples with FastSampler (pi0 / pi0.5; same actions to ~1e-6), with optional
        torch.compile mode and CUDA graph; dtype None = bf16 on CUDA, fp32 on CPU (fast only)."""
        self.path, self.device, self.num_steps = str(path), torch.device(device), num_steps
        self.model = load_model(self.path, self.device)
        cfg = self.model.cfg
        self.sample = lambda batch, noise: self.model.sample_actions(batch, noise=noise, num_steps=num_steps)
        if fast and cfg.model in ("pi0", "pi05"):
            dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
            self.sample = FastSampler(self.model, num_steps, dtype, compile_mode, cuda_graph)
        with open(os.path.join(self.path, "policy.json")) as f:
            self.settings = json.load(f)
        self.sp = load_sentencepiece(os.path.join(self.path, "tokenizer.model"))
        s = self.settings
        width = None if cfg.model == "pi0_fast" else cfg.action_dim  # pi0-FAST pads nothing
        self.transforms = data.Transforms(
            tokenize=prompt_function(cfg, self.sp), cameras=s["cameras"],
            norm_stats=os.path.join(self.path, "norm_stats.json"), use_quantiles=s["use_quantiles"],
            delta_mask=s.get("delta_mask"), state_dim=width, action_dim=width,
            image_size=cfg.vision.image_size)
        if cfg.model == "pi0_fast":
            self.sample = self.sample_fast
            from fast_tokenizer import FASTTokenizer
            self.fast = FASTTokenizer.load(os.path.join(self.path, "fast_tokenizer.json"))
        self.valid = None  # pi0-FAST: per example, whether the answer decoded to a real chunk

    def sample_fast(self, batch, noise=None):
        """pi0-FAST: greedy tokens -> action chunks. An answer that does not decode is flagged in
        self.valid (and a warning), never silently turned into zeros for the robot."""
        import warnings

        from pi0_fast import extract_actions
        cfg = self.model.cfg
        tokens = self.model.sample_tokens(batch).cpu().numpy()
        out = [extract_actions(self.sp, self.fast, t, cfg.action_horizon, cfg.action_dim, cfg.vocab_size)
               for t in tokens]
        self.valid = np.array([v for _, v in out])
        if not self.valid.all():
            warnings.warn(f"pi0-FAST answers {np.flatnonzero(~self.valid).tolist()} did not decode to "
                          f"action chunks; their actions are a best effort (see Policy.valid)")
        return torch.from_numpy(np.stack([a for a, _ in out]))

    def infer_batch(self, observations, noise=None):
        """A list of observations -> (N, C, A_robot) float32 actions."""
        samples = [self.transforms(dict(o, prompt=o.get("prompt", self.settings.get("default_prompt", ""))))
                   for o in observations]
        batch = {k: v.to(self.device) for k, v in data.collate(samples).items()}
        if noise is not None:
            noise = torch.as_tensor(noise, dtype=torch.float32, device=self.device)
        actions = self.sample(batch, noise).cpu().numpy()
        A = self.settings["action_dim"]
        actions = data.unnormalize(actions[..., :A], self.transforms.norm_stats["actions"],
                                   self.settings["use_quantiles"])
        if self.settings.get("delta_mask") is not None:
            states = np.stack([np.asarray(o["state"], np.float32) for o in observations])
            actions = np.stack([data.absolute_actions(a, s, self.settings["delta_mask"])
                                for a, s in zip(actions, states)])
        return actions.astype(np.float32)

    def infer(self, observation, noise=None):
        """One observation -> {"actions": (C, A_robot), "policy_timing": {"infer_ms": ...}}."""
        t0 = time.perf_counter()
        actions = self.infer_batch([observation], None if noise is None else np.asarray(noise)[None])
        return {"actions": actions[0], "policy_timing": {"infer_ms": 1000 * (time.perf_counter() - t0)}}


# ----------------------------------------------------------------------------------------------
# bench: latency per phase, achieved TFLOP/s and GB/s, peak memory

def bench_config(model, config):
    """A config by name: a preset of pi0.py / pi05.py, or "small" (a CPU-sized model that is
    not tiny: 112px SigLIP 384x4, Gemma 512x4, expert 256x4, chunk 50, 32 action dims)."""
    import pi0
    import pi05
    import pi0_fast
    from paligemma import GemmaConfig, SiglipConfig
    module = {"pi0": pi0, "pi05": pi05, "pi0_fast": pi0_fast}[model]
    if config == "small":
        small = dict(vision=SiglipConfig(width=384, depth=4, mlp_dim=1536, num_heads=6, patch=14, image_size=112),
                     llm=GemmaConfig(width=512, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64),
                     vocab_size=16384, max_token_len=48)
        if model == "pi0_fast":
            return pi0_fast.Pi0FastConfig(**small)
        cls = pi0.Pi0Config if model == "pi0" else pi05.Pi05Config
        return cls(**small, expert=GemmaConfig(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1,
                                               head_dim=64))
    if config not in module.CONFIGS:
        raise ValueError(f"unknown config {config!r} for {model} (have small, {', '.join(module.CONFIGS)})")
    return module.CONFIGS[config]


def count_cost(model, B, P, steps):
    """Analytic FLOPs and bytes of one sample: every matmul weight does 2 FLOPs per token, and a
    batch-1 pass reads each weight once (vision and prefix once, the expert once per step)."""
    cfg = model.cfg
    n = lambda module: sum(p.numel() for p in module.parameters())
    v, g, e = cfg.vision, cfg.llm, cfg.expert
    V, P_img = len(cfg.cameras), (v.image_size // v.patch) ** 2
    S = (0 if cfg.model == "pi05" else 1) + cfg.action_horizon
    T = cfg.action_horizon  # tokens per denoising step (pi0's state token runs once)
    expert_w = n(model.llm.experts[1])
    attn = lambda q, k, width, depth: 4 * q * k * width * depth  # QK^T and PV
    flops = {
        "vision": B * V * (2 * n(model.vision) * P_img + attn(P_img, P_img, v.width, v.depth)),
        "prefix": B * (2 * n(model.llm.experts[0]) * P + attn(P, P, g.num_heads * g.head_dim, g.depth)),
        "denoise": steps * B * (2 * expert_w * T + attn(T, P + S, e.num_heads * e.head_dim, e.depth)),
    }
    kv = 2 * g.depth * B * (P + S) * g.num_kv_heads * g.head_dim
    weights = {"vision": n(model.vision), "prefix": n(model.llm.experts[0]), "denoise": steps * (expert_w + kv)}
    return flops, weights


def device_sync(device):
    """A function that waits for the device's queued work (timings must not end early)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def peak_memory_mib(device):
    """Peak memory so far: allocated tensors on CUDA, the process's resident set on CPU."""
    import resource
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 20


def bench(args):
    import pi0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    if args.checkpoint:
        model = load_model(args.checkpoint, device)
    else:
        cfg = bench_config(args.model, args.config)
        cfg.cameras = tuple(f"cam{i}" for i in range(args.views))
        cfg.max_token_len = args.prompt_len
        from pi0_fast import Pi0Fast
        from pi05 import Pi05
        model = {"pi0": pi0.Pi0, "pi05": Pi05, "pi0_fast": Pi0Fast}[args.model](cfg).to(device).eval()
    cfg = model.cfg
    fast = cfg.model == "pi0_fast"
    settings = dict(model=cfg.model, config=args.checkpoint or args.config, device=str(device),
                    dtype=args.dtype or str(dtype).split(".")[-1], batch=args.batch,
                    **({"decode_tokens": args.decode_tokens} if fast else {"steps": args.steps}),
                    views=len(cfg.cameras), prompt_len=cfg.max_token_len, chunk=cfg.action_horizon,
                    compile=args.compile, cuda_graph=args.cuda_graph, threads=torch.get_num_threads(),
                    params=sum(p.numel() for p in model.parameters()))
    print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    B, V, R, L = args.batch, len(cfg.cameras), cfg.vision.image_size, cfg.max_token_len
    g = torch.Generator().manual_seed(0)
    batch = {"images": (torch.rand(B, V, 3, R, R, generator=g) * 2 - 1).to(device),
             "image_masks": torch.ones(B, V, dtype=torch.bool, device=device),
             "state": torch.randn(B, cfg.action_dim, generator=g).to(device),
             "tokens": torch.randint(3, cfg.vocab_size, (B, L), generator=g).to(device),
             "token_masks": (torch.arange(L) < L // 2).expand(B, L).to(device)}  # half the prompt is padding
    if fast:
        return bench_fast(args, model, batch, settings, dtype, random_weights=not args.checkpoint)
    noise = torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=g).to(device)
    sync = device_sync(device)
    sampler = FastSampler(model, args.steps, dtype, args.compile, args.cuda_graph)

    @torch.no_grad()
    def run():  # one sample, timed per phase (the syncs between phases cost little)
        t = [time.perf_counter()]
        with sampler.autocast():
            img = sampler.vision_fn(batch["images"])
            sync(), t.append(time.perf_counter())
            sampler.prepare(batch, img)
            sync(), t.append(time.perf_counter())
            x = sampler.denoise_graphed(noise) if sampler.cuda_graph else sampler.denoise_fn(noise)
            sync(), t.append(time.perf_counter())
        return np.diff(t) * 1000, x

    t0 = time.perf_counter()
    run()  # warm-up: compilation and graph capture happen here
    first_ms = 1000 * (time.perf_counter() - t0)
    for _ in range(2):
        run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = np.array([run()[0] for _ in range(args.iters)])  # (iters, 3): vision, prefix, denoise
    total = times.sum(1)
    P = V * (R // cfg.vision.patch) ** 2 + L
    flops, weights = count_cost(model, B, P, args.steps)
    wbytes = {k: w * (2 if dtype == torch.bfloat16 else 4) for k, w in weights.items()}
    med = dict(zip(("vision", "prefix", "denoise"), np.median(times, 0)))
    p50 = float(np.median(total))
    peak = peak_memory_mib(device)
    print(f"first call (compile + warm-up): {first_ms:.0f} ms")
    print(f"latency: p50 {p50:.2f} ms  p90 {np.percentile(total, 90):.2f} ms  min {total.min():.2f} ms  "
          f"({args.iters} runs)")
    for k in med:
        print(f"  {k:8s} p50 {med[k]:8.2f} ms  {flops[k] / 1e9:9.2f} GFLOP  {flops[k] / med[k] / 1e9:8.3f} TFLOP/s  "
              f"{wbytes[k] / 1e6:8.1f} MB  {wbytes[k] / med[k] / 1e6:8.1f} GB/s")
    tflops, gbs = sum(flops.values()) / p50 / 1e9, sum(wbytes.values()) / p50 / 1e6
    print(f"total: {sum(flops.values()) / 1e9:.2f} GFLOP, {tflops:.3f} TFLOP/s; weights+KV read "
          f"{sum(wbytes.values()) / 1e6:.1f} MB, {gbs:.1f} GB/s; peak memory {peak:.0f} MiB "
          f"({'allocated' if device.type == 'cuda' else 'process RSS'})")
    result = dict(settings, p50_ms=p50, p90_ms=float(np.percentile(total, 90)), min_ms=float(total.min()),
                  vision_ms=float(med["vision"]), prefix_ms=float(med["prefix"]), denoise_ms=float(med["denoise"]),
                  first_call_ms=first_ms, tflops=tflops, gbps=gbs, peak_mib=peak)
    if args.compare_uncached:  # the readable path without a cache: the full prefix every step
        times_f, dt = euler_times(args.steps)

        @torch.no_grad()
        def uncached():
            x = noise.clone()
            with sampler.autocast():
                for t in times_f:
                    x = x + dt * model.velocity(batch, x, torch.full((B,), t, device=device))
            return x

        uncached()
        ms = []
        for _ in range(max(3, args.iters // 4)):
            t0 = time.perf_counter()
            uncached()
            sync()
            ms.append(1000 * (time.perf_counter() - t0))
        eager = []
        for _ in range(max(3, args.iters // 4)):
            t0 = time.perf_counter()
            model.sample_actions(batch, noise=noise, num_steps=args.steps)
            sync()
            eager.append(1000 * (time.perf_counter() - t0))
        u, e = float(np.median(ms)), float(np.median(eager))
        print(f"no prefix cache (Pi0.velocity, full pass per step): p50 {u:.2f} ms; readable cached "
              f"sample_actions: p50 {e:.2f} ms; this sampler {p50:.2f} ms -> {u / p50:.1f}x vs no cache, "
              f"{e / p50:.2f}x vs readable")
        result.update(uncached_p50_ms=u, readable_p50_ms=e)
    print(json.dumps(result))
    return result


def bench_fast(args, model, batch, settings, dtype, random_weights):
    """pi0-FAST: prefill (vision + prefix + the first token) and greedy decoding, timed apart by
    running the same prompt for 1 token and for --decode-tokens tokens."""
    if args.compile or args.cuda_graph:
        raise ValueError("--compile / --cuda-graph apply to the pi0 / pi0.5 sampler; pi0-FAST runs eager")
    device, cfg, N = batch["images"].device, model.cfg, args.decode_tokens
    if N < 2:
        raise ValueError(f"--decode-tokens must be >= 2, got {N}")
    if random_weights:  # a random model could pick EOS and stop early: every run decodes exactly N
        with torch.no_grad():
            model.llm.embed.weight[1].zero_()  # EOS's logit becomes 0, below the maximum
    sync = device_sync(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(n):
        t0 = time.perf_counter()
        with autocast:
            _, logits = model.sample_tokens(batch, max_decoding_steps=n, return_logits=True)
        sync()
        if logits.shape[1] != n:
            raise RuntimeError(f"decoding stopped after {logits.shape[1]} of {n} tokens (EOS)")
        return 1000 * (time.perf_counter() - t0)

    t0 = time.perf_counter()
    run(N)
    first_ms = 1000 * (time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = np.array([run(N) for _ in range(args.iters)])
    prefill = float(np.median([run(1) for _ in range(args.iters)]))
    p50 = float(np.median(total))
    per_token = (p50 - prefill) / (N - 1)
    n = lambda module: sum(p.numel() for p in module.parameters())
    P = len(cfg.cameras) * (cfg.vision.image_size // cfg.vision.patch) ** 2 + cfg.max_token_len
    g, bytes_per = cfg.llm, 2 if dtype == torch.bfloat16 else 4
    kv = 2 * g.depth * args.batch * (P + N) * g.num_kv_heads * g.head_dim
    decode_gflop = 2 * args.batch * n(model.llm) * (N - 1) / 1e9  # one token per step (attention left out)
    decode_mb = (N - 1) * (n(model.llm) + kv) * bytes_per / 1e6  # each step reads every weight and the cache
    peak = peak_memory_mib(device)
    print(f"first call (warm-up): {first_ms:.0f} ms")
    print(f"latency ({N} tokens): p50 {p50:.2f} ms  p90 {np.percentile(total, 90):.2f} ms  min {total.min():.2f} ms  "
          f"({args.iters} runs)")
    print(f"  prefill  p50 {prefill:8.2f} ms  (vision + {P}-slot prefix + first token)")
    print(f"  decode   {per_token:8.2f} ms/token  {decode_gflop / (p50 - prefill):8.3f} TFLOP/s  "
          f"{decode_mb / (p50 - prefill):8.1f} GB/s; peak memory {peak:.0f} MiB")
    result = dict(settings, p50_ms=p50, p90_ms=float(np.percentile(total, 90)), min_ms=float(total.min()),
                  prefill_ms=prefill, decode_ms_per_token=per_token, first_call_ms=first_ms,
                  decode_tflops=decode_gflop / (p50 - prefill), decode_gbps=decode_mb / (p50 - prefill),
                  peak_mib=peak)
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# serve: openpi's websocket protocol (openpi_client.WebsocketClientPolicy talks to it)

# openpi's observation keys per robot -> our {"images": {camera: uint8 HWC}, "state", "prompt"}.
# Images are assigned to the policy's cameras (policy.json "cameras", None entries skipped) in order.
OPENPI_KEYS = {
    "libero": (("observation/image", "observation/wrist_image"), ("observation/state",)),
    "droid": (("observation/exterior_image_1_left", "observation/wrist_image_left"),
              ("observation/joint_position", "observation/gripper_position")),
}


def to_observation(msg, cameras):
    """One request (openpi LIBERO / DROID / ALOHA keys, or ours) -> Policy's observation dict."""
    if not isinstance(msg, dict):
        raise TypeError(f"expected a dict observation, got {type(msg).__name__}")
    cams = [c for c in cameras if c is not None]
    prompt = msg.get("prompt")
    for robot, (image_keys, state_keys) in OPENPI_KEYS.items():
        if image_keys[0] in msg:
            present = [k for k in image_keys if k in msg]
            if len(present) > len(cams):
                raise ValueError(f"{robot} observation has {len(present)} images, the policy has "
                                 f"{len(cams)} cameras ({cams})")
            missing = [k for k in state_keys if k not in msg]
            if missing:
                raise KeyError(f"{robot} observation lacks {missing}")
            state = np.concatenate([np.asarray(msg[k], np.float32).reshape(-1) for k in state_keys])
            images = {cam: np.asarray(msg[k]) for cam, k in zip(cams, present)}
            break
    else:
        if "images" not in msg or "state" not in msg:
            raise KeyError(f"unknown observation keys {sorted(msg)}: expected openpi's LIBERO / DROID "
                           "keys or {'images': {camera: uint8}, 'state', 'prompt'}")
        images, state = dict(msg["images"]), np.asarray(msg["state"], np.float32)
    for cam, im in images.items():
        if im.ndim == 3 and im.shape[0] == 3 and im.shape[-1] != 3:  # ALOHA sends CHW
            im = np.moveaxis(im, 0, -1)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"image '{cam}' has shape {im.shape}, expected (H, W, 3) uint8")
        images[cam] = np.ascontiguousarray(im)
    obs = {"images": images, "state": state}
    if prompt is not None:
        obs["prompt"] = str(prompt)
    return obs


def request_noise(msg, policy):
    """Optional determinism: a request's "noise" (C, A_model) float, or an int "seed" that draws it
    with numpy's default_rng(seed).standard_normal; neither: fresh torch noise."""
    if "noise" in msg:
        return np.array(msg["noise"], np.float32)  # a writable copy of the zero-copy buffer
    if "seed" in msg:
        cfg = policy.model.cfg
        return np.random.default_rng(int(msg["seed"])).standard_normal(
            (cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    return None


def make_server(policy, host="0.0.0.0", port=8000, metadata=None):
    """An asyncio websockets server (start it with `async with` or `await`): openpi's
    WebsocketPolicyServer. One metadata frame on connect, then msgpack request -> msgpack reply
    with "server_timing"; an error sends the traceback as a text frame and closes that
    connection with 1011 (the server keeps serving), as openpi does."""
    import asyncio
    import http
    import traceback
    try:
        import msgpack
        from websockets.asyncio.server import serve
        from websockets.frames import CloseCode
    except ImportError as e:
        raise ImportError(f"infer.py serve needs `pip install websockets msgpack` ({e})") from None

    def pack_default(obj):  # openpi_client.msgpack_numpy's encoding
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind in "OVc":
                raise ValueError(f"unsupported dtype {obj.dtype}")
            return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
        if isinstance(obj, np.generic):
            return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
        return obj

    def unpack_hook(obj):
        if b"__ndarray__" in obj:
            return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
        if b"__npgeneric__" in obj:
            return np.dtype(obj[b"dtype"]).type(obj[b"data"])
        return obj

    packb = lambda obj: msgpack.packb(obj, default=pack_default)
    lock = asyncio.Lock()  # one inference at a time on the one model

    async def handler(ws):
        await ws.send(packb(metadata or {}))
        prev_total = None
        while True:
            try:
                raw = await ws.recv()
            except Exception:  # the client went away
                return
            try:
                t0 = time.monotonic()
                msg = msgpack.unpackb(raw, object_hook=unpack_hook)
                obs = to_observation(msg, policy.settings["cameras"])
                noise = request_noise(msg, policy)
                async with lock:
                    result = await asyncio.to_thread(policy.infer, obs, noise)
                result["server_timing"] = {"infer_ms": 1000 * (time.monotonic() - t0)}
                if prev_total is not None:
                    result["server_timing"]["prev_total_ms"] = prev_total
                await ws.send(packb(result))
                prev_total = 1000 * (time.monotonic() - t0)
            except Exception:
                await ws.send(traceback.format_exc())
                await ws.close(CloseCode.INTERNAL_ERROR, "Internal server error. Traceback included in previous frame.")
                return

    def health(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    return serve(handler, host, port, compression=None, max_size=None, process_request=health)


def serve_forever(args):
    import asyncio
    policy = Policy(args.checkpoint, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                    num_steps=args.steps, fast=True, compile_mode=args.compile, cuda_graph=args.cuda_graph)
    metadata = policy.settings.get("metadata", {})

    async def main():
        async with make_server(policy, args.host, args.port, metadata) as server:
            print(f"serving {args.checkpoint} on ws://{args.host}:{args.port} (GET /healthz)")
            await server.serve_forever()

    asyncio.run(main())


# ----------------------------------------------------------------------------------------------
# plot: predicted vs recorded action chunks, one panel per action dimension (pillow only)

def plot(args):
    """Draw, for a few frames of a dataset, the recorded chunk (grey) and the predicted one (colour)."""
    from PIL import Image, ImageDraw
    policy = Policy(args.checkpoint, device=args.device or "cpu", num_steps=args.steps)
    ds = data.open_dataset(args.data, chunk_size=policy.model.cfg.action_horizon)
    frames = np.linspace(0, len(ds) - 1, args.frames).astype(int)
    samples = [ds[int(i)] for i in frames]
    torch.manual_seed(0)
    predicted = policy.infer_batch(samples)  # (F, C, A)
    recorded = np.stack([s["actions"] for s in samples])
    F_, C, A = predicted.shape
    cell_w, cell_h, pad = 260, 110, 24
    img = Image.new("RGB", (cell_w * A, (cell_h + pad) * F_ + pad), "white")
    draw = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for d in range(A):
        lo = min(predicted[..., d].min(), recorded[..., d].min())
        hi = max(predicted[..., d].max(), recorded[..., d].max()) + 1e-6
        for f in range(F_):
            x0, y0 = d * cell_w + 8, pad + f * (cell_h + pad)
            to_xy = lambda c, v: (x0 + c * (cell_w - 16) / max(1, C - 1), y0 + (hi - v) / (hi - lo) * cell_h)
            draw.rectangle([x0, y0, x0 + cell_w - 16, y0 + cell_h], outline=(200, 200, 200))
            draw.text((x0, y0 - 14), f"frame {frames[f]}  dim {d}", fill="black")
            for chunk, colour, width in ((recorded[f], (150, 150, 150), 3), (predicted[f], colours[f % 5], 2)):
                draw.line([to_xy(c, chunk[c, d]) for c in range(C)], fill=colour, width=width)
    img.save(args.out)
    err = np.abs(predicted - recorded).mean()
    print(f"wrote {args.out}: {F_} frames x {A} dims, grey recorded, colour predicted; mean |error| {err:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="latency per phase, TFLOP/s, GB/s, peak memory")
    b.add_argument("--model", choices=["pi0", "pi05", "pi0_fast"], default="pi0", help="model file (random weights)")
    b.add_argument("--decode-tokens", type=int, default=32, help="pi0-FAST: answer tokens decoded per call")
    b.add_argument("--config", default="small", help="preset: full, tiny, small (see bench_config)")
    b.add_argument("--checkpoint", help="checkpoint directory (instead of random weights)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--views", type=int, default=3, help="camera views (random weights only)")
    b.add_argument("--prompt-len", type=int, default=48, help="prompt tokens (random weights only)")
    b.add_argument("--iters", type=int, default=20, help="timed runs after warm-up")
    b.add_argument("--compare-uncached", action="store_true",
                   help="also time the readable sampler and a prefix recomputed every step")
    s = sub.add_parser("serve", help="openpi websocket policy server")
    s.add_argument("--checkpoint", required=True, help="checkpoint directory")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    for p in (b, s):
        p.add_argument("--steps", type=int, default=10, help="Euler steps")
        p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
        p.add_argument("--device", help="default: cuda if available, else cpu")
        p.add_argument("--compile", default=None, help='torch.compile mode ("default", "max-autotune", ...)')
        p.add_argument("--cuda-graph", action="store_true", help="one CUDA graph over the denoising loop")
    pl = sub.add_parser("plot", help="predicted vs recorded action chunks, per dimension")
    pl.add_argument("--checkpoint", required=True, help="checkpoint directory")
    pl.add_argument("--data", required=True, help="dataset (LeRobot dir or HDF5 file / dir)")
    pl.add_argument("--out", default="actions.png", help="PNG to write")
    pl.add_argument("--frames", type=int, default=4, help="frames spread over the dataset")
    pl.add_argument("--steps", type=int, default=10, help="Euler steps")
    pl.add_argument("--device", help="default: cpu")
    args = parser.parse_args()
    {"bench": bench, "serve": serve_forever, "plot": plot}[args.command](args)
