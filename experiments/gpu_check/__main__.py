"""The prepared GPU check: full-size speed of inference and training, in one run, in a time budget.

    python -m experiments.gpu_check --out gpu_check.json                  # one H100 / H200, about 8 minutes
    python -m experiments.gpu_check --config small --budget 0 --iters 2   # the CPU smoke test CI runs

In order of value, each part measured only if the time left allows it (the budget is checked
between parts and between runs; a part that does not fit is recorded as skipped):
  1. pi0 and pi0.5 inference, bf16 weights, batch 1, 3 views, chunk 50, 10 steps: eager,
     torch.compile, compile + CUDA graph (CUDA only). p50 / p90 per phase, TFLOP/s and GB/s
     against the chip's measured peaks (a bf16 matmul and a device copy, timed first), and the
     largest difference of each fast path's actions from eager's (bf16 tolerance: 0.05 on
     normalized actions, the tolerance tests/test_infer.py uses for bf16 against fp32).
  2. pi0-FAST: prefill ms and ms per decoded token.
  3. pi0.5 training steps: bf16 autocast over fp32 master weights, AdamW, activation
     checkpointing per layer (train.py's own wrap and optimizer step): the largest batch that
     fits (doubling from 8); samples/s,
     MFU (3x the model's forward FLOPs over the measured bf16 peak) and peak memory; FSDP2 on one
     GPU gives the same losses as the plain model.
It writes one JSON file (rewritten after every part, so a killed run keeps what it measured) and
prints a short table. Only the project's own files and the machine's torch are needed.
"""

import argparse
import dataclasses
import json
import os
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

import models
import recipes
from infer import CompiledSampler, bench_config, fill_random_, time_phases, weight_bytes
from paligemma import prefix_length, random_batch
from pi0 import sample_noise_and_time
from train import wrap
from train_step import make_optimizer, optimizer_step

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--config", default="full", help="full (openpi's sizes) or small (the CPU smoke test)")
p.add_argument("--budget", type=float, default=480,
               help="seconds for the whole check; parts that do not fit are skipped (0: no limit, every part runs)")
p.add_argument("--iters", type=int, default=20, help="timed inference runs per path")
p.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
p.add_argument("--train-steps", type=int, default=5, help="timed training steps per batch size")
p.add_argument("--compile-on-cpu", action="store_true", help="also time the compiled path on a CPU (slow to compile)")


class Budget:
    """The time left, and whether a part that needs `seconds` of the full 480 s check (scaled to
    this budget) still fits."""

    def __init__(self, seconds):
        self.end, self.scale = time.perf_counter() + seconds, seconds / 480
        self.unlimited = seconds <= 0

    def left(self):
        return float("inf") if self.unlimited else self.end - time.perf_counter()

    def fits(self, seconds):
        return self.unlimited or self.left() > seconds * self.scale


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peaks(device, dtype):
    """The chip's achievable bf16 matmul TFLOP/s and copy GB/s, measured (not from a datasheet)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    x = torch.empty(2 ** (28 if device.type == "cuda" else 22), device=device, dtype=torch.uint8)
    y = torch.empty_like(x)

    def best(fn, reps=10):
        fn(), sync(device)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(), sync(device)
            ts.append(time.perf_counter() - t0)
        return min(ts)
    return {"matmul_tflops": 2 * n ** 3 / best(lambda: a @ b) / 1e12,
            "copy_gbps": 2 * x.numel() / best(lambda: y.copy_(x)) / 1e9}


def inference_inputs(model, device, B=1, seed=0):
    batch = {k: v.to(device) for k, v in random_batch(model.cfg, B, seed, actions=False).items()}
    noise = torch.randn(B, model.cfg.action_horizon, model.cfg.action_dim, generator=torch.Generator().manual_seed(seed))
    return batch, noise.to(device)


def flow_inference(name, args, device, dtype, peaks, budget):
    """Eager, compiled, compiled + CUDA graph: per-phase times, TFLOP/s, GB/s, action agreement."""
    cfg = dataclasses.replace(bench_config(name, args.config), cameras=tuple(f"cam{i}" for i in range(3)))
    model = fill_random_(models.build_empty(cfg, dtype, device)).eval()
    batch, noise = inference_inputs(model, device)
    P = prefix_length(cfg)
    flops, weights = model.cost(1, P, 10)
    out = {"params": models.count_params(model), "weights_mib": weight_bytes(model) / 2 ** 20}
    paths = [("eager", None, False)]
    if device.type == "cuda" or args.compile_on_cpu:  # compiling on a 2-core CPU takes minutes
        paths.append(("compiled", "max-autotune-no-cudagraphs" if device.type == "cuda" else "default", False))
    if device.type == "cuda":
        paths.append(("compiled_cuda_graph", "max-autotune-no-cudagraphs", True))
    reference = None
    for path, mode, graph in paths:
        if not budget.fits(60):
            out[path] = "skipped: out of time"
            continue
        sampler = CompiledSampler(model, 10, dtype, mode, graph)
        first_ms, times = time_phases(sampler, batch, noise, args.iters)
        with torch.no_grad():
            actions = sampler(batch, noise).float()
        reference = actions if reference is None else reference
        total = times.sum(1)
        p50 = float(np.median(total))
        r = {"first_call_ms": first_ms, "p50_ms": p50, "p90_ms": float(np.percentile(total, 90)),
             "max_abs_diff_vs_eager": float((actions - reference).abs().max()),
             "tflops": sum(flops.values()) / p50 / 1e9,
             "gbps": sum(weights.values()) * 2 / p50 / 1e6}
        for i, phase in enumerate(("vision", "prefix", "denoise")):
            ms = float(np.median(times[:, i]))
            r[phase] = {"p50_ms": ms, "p90_ms": float(np.percentile(times[:, i], 90)),
                        "tflops": flops[phase] / ms / 1e9, "gbps": weights[phase] * 2 / ms / 1e6}
        r["mfu"] = r["tflops"] / peaks["matmul_tflops"]
        r["bandwidth_use"] = r["gbps"] / peaks["copy_gbps"]
        out[path] = r
    return out


def fast_inference(args, device, dtype, budget):
    """pi0-FAST: prefill (vision + prefix + first token) and ms per decoded token."""
    cfg = dataclasses.replace(bench_config("pi0_fast", args.config), cameras=tuple(f"cam{i}" for i in range(3)))
    model = fill_random_(models.build_empty(cfg, dtype, device)).eval()
    with torch.no_grad():
        model.llm.embed.weight[1].zero_()  # EOS's logit 0: a random model decodes every token
    batch, _ = inference_inputs(model, device)

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model.sample_tokens(batch, max_decoding_steps=n)
        sync(device)
        return 1000 * (time.perf_counter() - t0)
    run(32)
    reps = max(3, args.iters // 4)
    prefill = float(np.median([run(1) for _ in range(reps)]))
    full = float(np.median([run(32) for _ in range(reps)]))
    return {"prefill_ms": prefill, "decode_ms_per_token": (full - prefill) / 31, "p50_ms_32_tokens": full}


def training_batch(cfg, B, device, seed=0):
    return {k: v.to(device) for k, v in random_batch(cfg, B, seed, actions=True).items()}


def train_model(args, device, checkpointing=True, fsdp=False, dropout=0.1):
    """Full pi0.5 as train.py trains it: fp32 masters, per-layer activation checkpointing."""
    cfg = dataclasses.replace(bench_config("pi05", args.config), dropout=dropout, cameras=tuple(f"cam{i}" for i in range(3)))
    return wrap(fill_random_(models.build_empty(cfg, torch.float32, device)), fsdp, checkpointing)


def train_steps(model, batch, steps, device, seed=0):
    """-> (losses, seconds per step after one warm-up step) for train.py's AdamW steps under bf16 autocast."""
    params = list(model.parameters())
    opt = make_optimizer(params, recipes.TrainConfig(lr=1e-5))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    cfg, losses, times = model.cfg, [], []
    for step in range(steps + 1):
        noise, t = sample_noise_and_time((len(batch["state"]), cfg.action_horizon, cfg.action_dim),
                                         generator=torch.Generator().manual_seed(seed + step))
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model(batch, noise=noise.to(device), time=t.to(device))["loss"]
        loss.backward()
        optimizer_step(params, opt, 1.0)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses, float(np.median(times[1:]))


def training(args, device, peaks, budget):
    out = {}
    model = train_model(args, device)
    cfg = model.cfg
    P = prefix_length(cfg)
    flops_per_sample = 3 * sum(model.cost(1, P, 1)[0].values())
    sizes, B = [], 8 if device.type == "cuda" else 2
    while budget.fits(90) and len(sizes) < 6:  # doubling until out of memory (or of time)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            losses, step_s = train_steps(model, training_batch(cfg, B, device), args.train_steps, device)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            sizes.append({"batch": B, "step_s": step_s, "samples_s": B / step_s, "peak_gib": peak,
                          "mfu": flops_per_sample * B / step_s / 1e12 / peaks["matmul_tflops"]})
            print(f"  train batch {B}: {B / step_s:.1f} samples/s, MFU {sizes[-1]['mfu']:.1%}, peak {peak:.1f} GiB",
                  flush=True)
        except torch.OutOfMemoryError:
            sizes.append({"batch": B, "error": "out of memory"})
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if B >= 32 and device.type != "cuda":
            break
        B *= 2
    out["batches"] = sizes
    if budget.fits(60):
        out["fsdp_equals_plain"] = fsdp_equals_plain(args, device)
    return out


def fsdp_equals_plain(args, device):
    """FSDP2 over a world of one: the same losses as the plain model from the same weights."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    # fill_random_ is seeded: the same weights; no dropout, so the same function
    plain = train_model(args, device, checkpointing=False, dropout=0.0)
    sharded = train_model(args, device, checkpointing=False, fsdp=True, dropout=0.0)
    batch = training_batch(plain.cfg, 2, device)
    a, _ = train_steps(plain, batch, 2, device)
    b, _ = train_steps(sharded, batch, 2, device)
    dist.destroy_process_group()
    return {"plain": a, "fsdp": b, "max_rel_diff": max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))}


def main(args):
    budget = Budget(args.budget)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    result = {"config": args.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "budget_s": args.budget}
    save = lambda: json.dump(result, open(args.out, "w"), indent=2)
    result["peaks"] = measure_peaks(device, dtype)
    save()
    parts = [("pi0", lambda: flow_inference("pi0", args, device, dtype, result["peaks"], budget)),
             ("pi05", lambda: flow_inference("pi05", args, device, dtype, result["peaks"], budget)),
             ("pi0_fast", lambda: fast_inference(args, device, dtype, budget)),
             ("pi05_training", lambda: training(args, device, result["peaks"], budget))]
    for name, part in parts:
        if not budget.fits(45):
            result[name] = "skipped: out of time"
            continue
        t0 = time.perf_counter()
        print(f"{name} ...", flush=True)
        try:
            result[name] = part()
        except Exception as e:  # keep what was measured; report the failure and go on
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        result[name + "_seconds"] = time.perf_counter() - t0
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(result)
    return result


def print_table(r):
    print(f"\n{r['device']}, torch {r['torch']}, config {r['config']}: bf16 matmul {r['peaks']['matmul_tflops']:.0f} "
          f"TFLOP/s, copy {r['peaks']['copy_gbps']:.0f} GB/s (measured)")
    for model in ("pi0", "pi05"):
        for path, v in (r.get(model) or {}).items() if isinstance(r.get(model), dict) else []:
            if isinstance(v, dict) and "p50_ms" in v:
                print(f"  {model:5s} {path:20s} p50 {v['p50_ms']:8.2f} ms (vision {v['vision']['p50_ms']:.2f}, prefix "
                      f"{v['prefix']['p50_ms']:.2f}, denoise {v['denoise']['p50_ms']:.2f}), {v['tflops']:.1f} TFLOP/s, "
                      f"|actions - eager| {v['max_abs_diff_vs_eager']:.3g}")
    f = r.get("pi0_fast")
    if isinstance(f, dict) and "prefill_ms" in f:
        print(f"  pi0_fast prefill {f['prefill_ms']:.2f} ms, {f['decode_ms_per_token']:.2f} ms per token")
    t = r.get("pi05_training")
    if isinstance(t, dict):
        for b in t.get("batches", []):
            print(f"  pi05 train batch {b['batch']}: " + (b.get("error") or
                  f"{b['samples_s']:.1f} samples/s, MFU {b['mfu']:.1%}, peak {b['peak_gib']:.1f} GiB"))
        if "fsdp_equals_plain" in t:
            print(f"  FSDP2 on one device vs plain: max relative loss difference {t['fsdp_equals_plain']['max_rel_diff']:.2e}")


if __name__ == "__main__":
    main(p.parse_args())
