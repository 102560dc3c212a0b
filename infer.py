"""Speed: the compiled sampler of pi0 / pi0.5, and the benchmark that measures it.

Speed lives here, not in the model files (gpt-fast's model.py vs generate.py). `CompiledSampler`
is the model's own `sample_actions`, with three things added and nothing else: a static KV cache
(allocated once per batch shape, written in place), torch.compile, and (CUDA only) one CUDA graph
over the whole denoising loop. It calls the model's own methods for everything it computes
(`prefill`, `denoise_step`, the time conditioning) and runs the same Euler loop (`pi0.euler`), so
steering (guidance.py) works unchanged. tests/test_infer.py checks it against the readable
sampler to 1e-5. policy.py serves it.

Commands:
  python infer.py bench --model pi0 --config small           # latency, TFLOP/s, GB/s, memory
  python infer.py bench --model pi0_fast --config small      # prefill and ms per decoded token

Axis legend (paligemma.py's): B batch, V views, P prefix tokens, C chunk, A action dim, W width,
M keys the action tokens attend to.
"""

import argparse
import dataclasses
import json
import resource
import time

import numpy as np
import torch

import models
from cli import at_least, main_guard
from paligemma import GemmaConfig, SiglipConfig, prefix_length, random_batch
from pi0 import euler, euler_times


# ----------------------------------------------------------------------------------------------
# The compiled sampler: the model's sample_actions with a static cache, compiled, graphed

class CompiledSampler:
    """Action chunks from a pi0 / pi0.5 model; equal to model.sample_actions(batch, noise, guide=...).

    What it adds, one line each:
      - one static KV cache per batch shape, written in place (prefix, pi0's state token, the
        action slots overwritten each step), and the layout of the action tokens kept with it;
      - the expert's norm modulations precomputed for the fixed Euler times (pi0.5's adaRMS
        depends on the time alone), from the model's own time MLP;
      - compile_mode: torch.compile of the vision tower, the prefill and the denoising loop
        (None = eager; "default" does not autotune; "max-autotune" does, and takes minutes);
      - cuda_graph (CUDA only): the whole denoising loop captured once per batch shape, replayed.
    A guided sample (guidance.py) runs the same loop eagerly: real-time chunking differentiates
    through the step. dtype: the autocast dtype of the matmuls (torch.bfloat16 on GPU); norms,
    RoPE, attention logits and the action projections stay fp32 as in the model. Build it after
    the weights are loaded (the modulations are computed from them).
    """

    def __init__(self, model, num_steps=10, dtype=torch.float32, compile_mode=None, cuda_graph=False):
        if not models.spec(model.cfg).flow:
            raise ValueError(f"CompiledSampler samples flow-matching models (pi0 / pi0.5), not {model.cfg.model!r}")
        self.model, self.cfg, self.num_steps, self.dtype = model, model.cfg, num_steps, dtype
        self.device = next(model.parameters()).device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.cuda_graph, self.graph, self.shape, self.cache, self.layout = cuda_graph, None, None, None, None
        with torch.no_grad(), self.autocast():  # per Euler time: every norm's (scale, shift, gate)
            self.mods = {t: model.llm.modulations([None, model.time_conditioning(torch.full((1,), t, device=self.device))],
                                                  present=[1]) for t in euler_times(num_steps)[0]}
        self.vision_fn, self.prefill_fn, self.denoise_fn = model.vision.embed_views, model.prefill, self.denoise
        if compile_mode is not None:
            self.vision_fn = torch.compile(model.vision.embed_views, mode=compile_mode, fullgraph=True)
            self.prefill_fn = torch.compile(model.prefill, mode=compile_mode)
            self.denoise_fn = torch.compile(self.denoise, mode=compile_mode, fullgraph=True)

    def prepare(self, batch, image_tokens):
        """Prefill the static cache for one batch of observations. The layout's tensors keep their
        addresses across calls of one batch shape: a captured CUDA graph reads them there."""
        shape = (len(batch["tokens"]), image_tokens.shape[1] + batch["tokens"].shape[1])
        if self.shape != shape:  # a new batch shape: a new cache, layout and graph
            self.shape, self.graph, self.cache, self.layout = shape, None, None, None
        self.cache, layout = self.prefill_fn(batch, image_tokens, self.cache)
        if self.layout is None:
            self.layout = layout
        else:
            for static, new in zip(self.layout, layout):
                static.copy_(new)

    def velocity(self, x, t):
        """The model's denoising step on the static cache; a per-token time (committed steps)
        gets its modulations from the model, the Euler times their precomputed ones."""
        mods = self.mods.get(t) if isinstance(t, float) else None
        return self.model.denoise_step(x, t, self.cache.for_step(), self.layout, mods)

    def denoise(self, x):
        """The Euler loop over the fixed times: x (B, C, A) noise -> actions, no host sync."""
        return euler(self.velocity, x, self.num_steps)

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
    def __call__(self, batch, noise=None, guide=None):
        """batch, noise and guide as for model.sample_actions -> (B, C, A) normalized actions."""
        B = batch["state"].shape[0]
        shape = (B, self.cfg.action_horizon, self.cfg.action_dim)
        x = torch.randn(shape, device=self.device) if noise is None else noise.float()
        with self.autocast():
            self.prepare(batch, self.vision_fn(batch["images"]))
            if guide is not None:
                return euler(guide(self.velocity), x, self.num_steps)
            return self.denoise_graphed(x) if self.cuda_graph else self.denoise_fn(x)


# ----------------------------------------------------------------------------------------------
# bench: latency per phase, achieved TFLOP/s and GB/s, peak memory

def bench_config(model, config):
    """A config by name: a preset of the model's, or "small" (a CPU-sized model that is not
    tiny: 112px SigLIP 384x4, Gemma 512x4, expert 256x4, chunk 50, 32 action dims)."""
    if config != "small":
        return models.preset(model, config)
    small = dict(vision=SiglipConfig(width=384, depth=4, mlp_dim=1536, num_heads=6, patch=14, image_size=112),
                 llm=GemmaConfig(width=512, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64),
                 vocab_size=16384, max_token_len=48)
    if models.spec(model).flow:
        small["expert"] = GemmaConfig(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=64)
    return models.spec(model).config(**small)


def device_sync(device):
    """A function that waits for the device's queued work (timings must not end early)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def peak_memory_mib(device):
    """Peak memory so far: allocated tensors on CUDA, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 20


def fill_random_(model, seed=0):
    """Random weights for timing: each module's own reset_parameters, small normals elsewhere
    (norm scales, SigLIP's position embedding)."""
    torch.manual_seed(seed)
    done = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding, torch.nn.LayerNorm)):
                module.reset_parameters()
                done |= {id(p) for p in module.parameters(recurse=False)}
        for p in model.parameters():
            if id(p) not in done:
                p.normal_(0, 0.02)
    return model


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_setup(args):
    """-> (model, a batch of random observations, settings, dtype), the settings printed. The
    weights are held in the serving dtype (paligemma.py's precision policy), allocated once."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.checkpoint:
        model = models.load(args.checkpoint, device, dtype).eval()
    else:
        cfg = dataclasses.replace(bench_config(args.model, args.config), max_token_len=args.prompt_len,
                                  cameras=tuple(f"cam{i}" for i in range(args.views)))  # the preset stays as it is
        model = fill_random_(models.build_empty(cfg, dtype, device)).eval()
    cfg = model.cfg
    flow = models.spec(cfg).flow
    settings = dict(model=cfg.model, config=args.checkpoint or args.config, device=str(device),
                    dtype=args.dtype or str(dtype).split(".")[-1], batch=args.batch,
                    **({"steps": args.steps} if flow else {"decode_tokens": args.decode_tokens}),
                    views=len(cfg.cameras), prompt_len=cfg.max_token_len, chunk=cfg.action_horizon,
                    compile=args.compile, cuda_graph=args.cuda_graph, threads=torch.get_num_threads(),
                    params=models.count_params(model), weights_mib=round(weight_bytes(model) / 2 ** 20, 1))
    print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    batch = {k: v.to(device) for k, v in random_batch(cfg, args.batch, actions=False).items()}
    return model, batch, settings, dtype


def time_phases(sampler, batch, noise, iters):
    """-> (first call ms, (iters, 3) ms per phase: vision, prefix, denoise), after 2 warm-ups."""
    sync = device_sync(sampler.device)

    @torch.no_grad()
    def run():  # one sample, timed per phase (the syncs between phases cost little)
        t = [time.perf_counter()]
        with sampler.autocast():
            img = sampler.vision_fn(batch["images"])
            sync(), t.append(time.perf_counter())
            sampler.prepare(batch, img)
            sync(), t.append(time.perf_counter())
            sampler.denoise_graphed(noise) if sampler.cuda_graph else sampler.denoise_fn(noise)
            sync(), t.append(time.perf_counter())
        return np.diff(t) * 1000

    t0 = time.perf_counter()
    run()  # warm-up: compilation and graph capture happen here
    first_ms = 1000 * (time.perf_counter() - t0)
    for _ in range(2):
        run()
    if sampler.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return first_ms, np.array([run() for _ in range(iters)])


def time_readable(model, batch, noise, args, autocast):
    """p50 ms of the readable cached sampler and of a prefix recomputed at every step."""
    sync, B = device_sync(noise.device), noise.shape[0]
    times_f, dt = euler_times(args.steps)

    @torch.no_grad()
    def uncached():  # the readable path without a cache: the full prefix every step
        x = noise.clone()
        with autocast:
            for t in times_f:
                x = x + dt * model.velocity(batch, x, torch.full((B,), t, device=noise.device))

    def p50(fn):
        fn()
        ms = []
        for _ in range(max(3, args.iters // 4)):
            t0 = time.perf_counter()
            fn()
            sync()
            ms.append(1000 * (time.perf_counter() - t0))
        return float(np.median(ms))
    return p50(lambda: model.sample_actions(batch, noise=noise, num_steps=args.steps)), p50(uncached)


def bench(args):
    """pi0 / pi0.5: latency per phase, achieved TFLOP/s and GB/s, peak memory; a JSON line last."""
    model, batch, settings, dtype = bench_setup(args)
    if not models.spec(model.cfg).flow:
        return bench_fast(args, model, batch, settings, dtype, random_weights=not args.checkpoint)
    cfg, device, B = model.cfg, batch["images"].device, args.batch
    noise = torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(1)).to(device)
    sampler = CompiledSampler(model, args.steps, dtype, args.compile, args.cuda_graph)
    first_ms, times = time_phases(sampler, batch, noise, args.iters)
    total = times.sum(1)
    P = prefix_length(cfg)
    flops, weights = model.cost(B, P, args.steps)
    wbytes = {k: w * (2 if dtype == torch.bfloat16 else 4) for k, w in weights.items()}
    med = dict(zip(("vision", "prefix", "denoise"), np.median(times, 0)))
    p50, peak, resident = float(np.median(total)), peak_memory_mib(device), weight_bytes(model) / 2 ** 20
    print(f"first call (compile + warm-up): {first_ms:.0f} ms")
    print(f"latency: p50 {p50:.2f} ms  p90 {np.percentile(total, 90):.2f} ms  min {total.min():.2f} ms  "
          f"({args.iters} runs)")
    for k in med:
        print(f"  {k:8s} p50 {med[k]:8.2f} ms  {flops[k] / 1e9:9.2f} GFLOP  {flops[k] / med[k] / 1e9:8.3f} TFLOP/s  "
              f"{wbytes[k] / 1e6:8.1f} MB  {wbytes[k] / med[k] / 1e6:8.1f} GB/s")
    tflops, gbs = sum(flops.values()) / p50 / 1e9, sum(wbytes.values()) / p50 / 1e6
    print(f"total: {sum(flops.values()) / 1e9:.2f} GFLOP, {tflops:.3f} TFLOP/s; weights+KV read "
          f"{sum(wbytes.values()) / 1e6:.1f} MB, {gbs:.1f} GB/s")
    print(f"memory: weights resident {resident:.0f} MiB; peak {peak:.0f} MiB "
          f"({'allocated' if device.type == 'cuda' else 'process RSS'}), {peak / resident:.2f}x the weights")
    result = dict(settings, p50_ms=p50, p90_ms=float(np.percentile(total, 90)), min_ms=float(total.min()),
                  vision_ms=float(med["vision"]), prefix_ms=float(med["prefix"]), denoise_ms=float(med["denoise"]),
                  first_call_ms=first_ms, tflops=tflops, gbps=gbs, peak_mib=peak, peak_over_weights=peak / resident)
    if args.compare_uncached:
        e, u = time_readable(model, batch, noise, args, sampler.autocast())
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
    P = prefix_length(cfg)
    flops, weights = model.cost(args.batch, P, N - 1)  # the first token comes with the prefill
    decode_gflop = flops["decode"] / 1e9
    decode_mb = weights["decode"] * (2 if dtype == torch.bfloat16 else 4) / 1e6  # every weight and the cache, each token
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="latency per phase, TFLOP/s, GB/s, peak memory")
    b.add_argument("--model", choices=list(models.MODELS), default="pi0", help="model (random weights)")
    b.add_argument("--decode-tokens", type=at_least(1), default=32, help="pi0-FAST: answer tokens decoded per call")
    b.add_argument("--config", default="small", help="preset: full, tiny, small (see bench_config)")
    b.add_argument("--checkpoint", help="checkpoint directory (instead of random weights)")
    b.add_argument("--batch", type=at_least(1), default=1)
    b.add_argument("--views", type=at_least(1), default=3, help="camera views (random weights only)")
    b.add_argument("--prompt-len", type=at_least(1), default=48, help="prompt tokens (random weights only)")
    b.add_argument("--iters", type=at_least(1), default=20, help="timed runs after warm-up")
    b.add_argument("--compare-uncached", action="store_true",
                   help="also time the readable sampler and a prefix recomputed every step")
    b.add_argument("--steps", type=at_least(1), default=10, help="Euler steps")
    b.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    b.add_argument("--device", help="default: cuda if available, else cpu")
    b.add_argument("--compile", default=None, help='torch.compile mode ("default", "max-autotune", ...)')
    b.add_argument("--cuda-graph", action="store_true", help="one CUDA graph over the denoising loop")
    bench(parser.parse_args(argv))


if __name__ == "__main__":
    with main_guard():
        main()
