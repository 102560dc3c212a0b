"""RECAP (pi*0.6): a policy that learns from its own robot's successes and failures.

Physical Intelligence's recipe (arXiv 2511.14759), one section per step, top to bottom:

  1. Rewards and returns. -1 per step; at the last step 0 if the episode succeeded, -C_fail if
     it failed. The return-to-go, normalized per task by (its longest episode + C_fail), lies in
     (-1, 0]: successes above -1/2, failures below.
  2. A value function: the same backbone as the policies (paligemma.py: SigLIP + Gemma on the
     images and pi0.5's prompt with the state as text), plus a learned readout token that starts
     its own attention block (it sees everything, nothing sees it); a head reads 201 bins of the
     normalized return; cross-entropy against the return's bin; the value is the expectation.
     Optionally (time_input, the demo's default) it also reads the frame's time step: a failure
     that ends at a time limit is worth more the nearer the limit, which images cannot show.
  3. Advantages: A_t = (the N rewards after t) + V(o_{t+N}) - V(o_t), normalized like the
     returns (V = 0 past the episode's end). A frame is "positive" when A_t is above its task's
     threshold, the percentile that makes ~30% of the task's frames positive; frames of human
     corrections always are. Written beside the dataset as the library's prompt-conditions sidecar
     (data.py: <dataset>.conditions.json), never into it.
  4. An advantage-conditioned policy (pi0 or pi0.5, train.py --conditions 1): the prompt carries
     "Advantage: positive" / "negative" (the model's condition slot: after the task and state
     text, before pi0.5's FAST targets), dropped 30% of the time in training so one model is also
     unconditioned. At inference it is told "positive"; with classifier-free guidance, v = v_uncond
     + beta (v_cond - v_uncond), both prompts in one batch (guidance.cfg).
  5. The loop: collect rollouts with success labels, retrain the value on all data, recompute
     advantages, fine-tune the policy, evaluate. `python -m experiments.recap demo` runs the whole
     experiment on the built-in task (README.md beside this file).

    python -m experiments.recap value --data D [D ...] --out V [--init V0]   # 2: a value function
    python -m experiments.recap advantages --value V --data D [D ...]        # 3: <D>.conditions.json
    # cross-fitted (demo --cross-fit 2): value --fold 0 2 --out V0, value --fold 1 2 --out V1,
    # then advantages --value V0 V1: each episode valued by the function that never saw it
    python train.py --model pi0 --data D [D ...] --conditions 1            # 4: the conditioned policy
    python -m experiments.recap collect --checkpoint P --episodes N --out D  # 5: labelled rollouts
    python -m experiments.recap demo --out runs/recap                        # all of it, with the table

Success labels: the HDF5 root attribute `success` (and `correction` for human corrections), or a
`success` key in a LeRobot dataset's episode metadata; a dataset without them is an error.

Axis legend (paligemma.py's): B examples, V views, I image tokens per view, L prompt tokens, W width,
Q value bins, X an episode's frames.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import models
import pi05
from loader import collate
from paligemma import (GEMMA_PRESETS, SIGLIP_PRESETS, Gemma, GemmaConfig, SigLIP, SiglipConfig, embed_prefix,
                       load_state_strict, make_attn_mask, make_positions)
from episodes import DatasetView
from readers import HDF5Dataset, read_jsonl

BINS = 201


# ----------------------------------------------------------------------------------------------
# 1. Rewards, returns and their bins


def episode_rewards(length, success, c_fail):
    """(X,) rewards: -1 per step; the last step 0 on success, -c_fail on failure."""
    r = -np.ones(length)
    r[-1] = 0.0 if success else -c_fail
    return r


def normalized_returns(rewards, norm):
    """Return-to-go of every frame divided by the task's normalizer: (X,) in [-1, 0]."""
    return np.clip(np.cumsum(rewards[::-1])[::-1] / norm, -1.0, 0.0)


def to_bins(returns):
    """Normalized returns in [-1, 0] -> the nearest of BINS equally spaced values."""
    return np.round((np.asarray(returns) + 1.0) * (BINS - 1)).astype(np.int64)


def soft_bins(returns, sigma):
    """HL-Gauss targets (Imani & White 2018; Farebrother et al. 2024): the mass of N(return, sigma)
    that falls in each bin, (B, Q). sigma 0: the one-hot bin of to_bins."""
    returns = np.asarray(returns, np.float64)
    if sigma <= 0:
        return np.eye(BINS, dtype=np.float32)[to_bins(returns)]
    half = 0.5 / (BINS - 1)
    edges = np.concatenate([[-np.inf], np.linspace(-1.0, 0.0, BINS)[:-1] + half, [np.inf]])  # (Q+1,)
    cdf = 0.5 * (1 + np.vectorize(math.erf)((edges[None] - returns[:, None]) / (sigma * math.sqrt(2))))
    return np.diff(cdf, axis=1).astype(np.float32)


def bin_values(device=None):
    return torch.linspace(-1.0, 0.0, BINS, device=device)


# ----------------------------------------------------------------------------------------------
# Episodes: their tasks and success labels, from the dataset (readers.py)


def episode_labels(ds):
    """(success (E,) bool, correction (E,) bool) from the dataset: HDF5 root attributes `success`
    / `correction`, or `success` / `correction` in a LeRobot dataset's episode metadata. A view
    (episodes.DatasetView) has its dataset's episodes."""
    while isinstance(ds, DatasetView):
        ds = ds.dataset
    if isinstance(ds, HDF5Dataset):
        success, correction = [], []
        for path in ds.files:
            with h5py.File(path, "r") as f:
                if "success" not in f.attrs:
                    raise KeyError(f"{path}: no `success` attribute; RECAP needs every episode labelled "
                                   "(tasks.record_demos and this experiment's collect write it; set it on your own "
                                   "episodes)")
                success.append(bool(f.attrs["success"]))
                correction.append(bool(f.attrs.get("correction", False)))
        return np.array(success), np.array(correction)
    path = Path(ds.root) / "meta" / "episodes.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: RECAP reads success labels from LeRobot v2.1 episode metadata "
                                "(a `success` key per episode); v3.0 datasets are not supported yet")
    rows = {e["episode_index"]: e for e in read_jsonl(path)}
    missing = [k for k in ds.episode_keys() if "success" not in rows.get(k, {})]
    if missing:
        raise KeyError(f"{path}: episodes {missing[:10]} have no `success` key")
    keys = ds.episode_keys()
    return (np.array([bool(rows[k]["success"]) for k in keys]),
            np.array([bool(rows[k].get("correction", False)) for k in keys]))


def episode_returns(ds, c_fail_factor=1.0):
    """Per episode: (rewards / norm (X,), normalized returns (X,)); C_fail = c_fail_factor x the
    task's longest episode, norm = that length + C_fail."""
    success, _ = episode_labels(ds)
    prompts, lengths = ds.episode_prompts(), ds.ep_end - ds.ep_start
    longest = {}
    for p, n in zip(prompts, lengths):
        longest[p] = max(longest.get(p, 0), int(n))
    out = []
    for p, n, ok in zip(prompts, lengths, success):
        norm = longest[p] * (1 + c_fail_factor)
        r = episode_rewards(int(n), ok, c_fail_factor * longest[p])
        out.append((r / norm, normalized_returns(r, norm)))
    return out


# ----------------------------------------------------------------------------------------------
# 2. The value function


@dataclass
class ValueConfig:
    vision: SiglipConfig = field(default_factory=lambda: SIGLIP_PRESETS["tiny"])
    llm: GemmaConfig = field(default_factory=lambda: GEMMA_PRESETS["tiny_llm"])
    vocab_size: int = 1024
    max_token_len: int = 32
    cameras: tuple = ("top",)
    bins: int = BINS
    time_input: bool = False  # the frame's time step in the prompt (value_transforms)
    model: str = "value"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**dict(d, vision=SiglipConfig(**d["vision"]), llm=GemmaConfig(**d["llm"]),
                          cameras=tuple(d["cameras"])))


class ValueFunction(nn.Module):
    """p(return bin | images, prompt with state): a VLM whose last token is a learned readout."""

    def __init__(self, cfg: ValueConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = SigLIP(cfg.vision, out_width=cfg.llm.width)
        self.llm = Gemma([cfg.llm], cfg.vocab_size)
        self.readout = nn.Parameter(torch.randn(cfg.llm.width) * cfg.llm.width ** -0.5)  # the <value> token
        self.head = nn.Linear(cfg.llm.width, cfg.bins)

    def sequence(self, batch):
        """Images, prompt, readout -> tokens (B, V*I + L + 1, W), mask, ar (the readout's block)."""
        prefix, prefix_mask = embed_prefix(self.vision, self.llm, batch)              # (B, V*I + L, W)
        B = prefix.shape[0]
        readout = self.readout.to(prefix.dtype).expand(B, 1, -1)                      # (B, 1, W)
        tokens = torch.cat([prefix, readout], dim=1)
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(B, 1)], 1)
        ar = torch.zeros(tokens.shape[1], dtype=torch.long, device=prefix.device)
        ar[-1] = 1  # the readout starts its own block: it attends to all real tokens, none attend to it
        return tokens, mask, ar

    def forward(self, batch):
        """-> logits over the return bins (B, Q), read at the readout token (never a padding slot:
        it is always the last token, and its position follows the last real one)."""
        tokens, mask, ar = self.sequence(batch)
        (h,) = self.llm([tokens], make_positions(mask), make_attn_mask(mask, ar))
        return self.head(h[:, -1])

    def value(self, batch):
        """The expected normalized return (B,)."""
        return (self.forward(batch).float().softmax(-1) * bin_values(self.head.weight.device)).sum(-1)


def value_transforms(cfg, ds, sp, stats):
    """Sample -> the value function's inputs: pi0.5's prompt (state as text), quantile stats; with
    cfg.time_input the task text ends in ", Step: {frame index}".

    Why the time: an episode that fails fails at the time limit, so the return of a frame where
    the robot has already gone wrong (parked at the wrong object) rises with every step that
    brings the limit nearer, while its images stay the same. A value function that cannot see
    the time predicts their average, and the frames shortly before the limit come out better
    than expected: on the built-in task those failures filled about half of the positive share
    (README: RECAP). Time-limited tasks need a time-aware value (Pardo et al. 2018, "Time Limits
    in Reinforcement Learning"); pi*0.6's value function reads only images, prompt and state."""
    tokenize = lambda prompt, state, condition=None: pi05.tokenize_prompt(sp, prompt, state, cfg.max_token_len)
    transforms = data.Transforms(tokenize=tokenize, cameras=list(ds.cameras), norm_stats=stats, use_quantiles=True,
                                 state_dim=None, action_dim=None, image_size=cfg.vision.image_size)
    if not cfg.time_input:
        return transforms
    return lambda s: transforms(dict(s, prompt=f"{s['prompt']}, Step: {int(s['frame_index'])}"))


def load_value(path):
    with open(os.path.join(path, "config.json")) as f:
        cfg = ValueConfig.from_dict(json.load(f))
    model = ValueFunction(cfg)
    load_state_strict(model, load_file(os.path.join(path, "model.safetensors")))
    model.path = str(path)  # its tokenizer and norm stats live beside it
    return model.eval()


def fold_rows(ds, k, K, held_out):
    """Frame rows of the episodes j with j % K == k (held_out) or != k (the rest): cross-fitting."""
    if not (K >= 1 and 0 <= k < K):
        raise ValueError(f"fold ({k}, {K}): expected 0 <= k < K")
    return np.concatenate([np.arange(s, e) for j, (s, e) in enumerate(zip(ds.ep_start, ds.ep_end))
                           if (j % K == k) == held_out] or [np.zeros(0, np.int64)])


def backbone_from_policy(model, checkpoint):
    """Start a value function from a policy checkpoint's vision-language backbone (SigLIP, the
    PaliGemma expert, the token embedding): it already grounds the prompt's words in the image,
    which a value function trained from scratch on a few thousand episodes does not learn (it
    predicts the mean return). pi*0.6 starts its value function from a pretrained VLM too."""
    policy = models.load(checkpoint)
    shape = lambda c: dataclasses.replace(c, dropout=0.0)  # dropout is not a weight
    if (policy.cfg.vision, shape(policy.cfg.llm)) != (model.cfg.vision, shape(model.cfg.llm)):
        raise ValueError(f"{checkpoint}: its backbone ({policy.cfg.vision}, {policy.cfg.llm}) is not the value "
                         f"function's ({model.cfg.vision}, {model.cfg.llm})")
    mine = model.state_dict()
    shared = {k: v for k, v in policy.state_dict().items() if k in mine and mine[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return len(shared)


def train_value(datasets, out, steps=2000, batch_size=32, lr=1e-3, seed=0, init=None, c_fail_factor=1.0,
                tokenizer=None, norm_stats=None, log_every=100, backbone=None, label_sigma=0.0, fold=None,
                time_input=None):
    """Fit a value function to the return bins of every frame of `datasets` (opened readers.py
    datasets); the first one's tokenizer and norm stats unless given. Saves it to `out`.
    init: a value function to continue; backbone: a policy checkpoint to start the backbone from.
    fold (k, K): cross-fitting; the episodes j with j % K == k are held out (see compute_advantages).
    time_input: the frame's time step in the prompt (value_transforms); None: the init's own, or
    False (pi*0.6's inputs) for a new one."""
    roots = [Path(ds.root) for ds in datasets]
    # a backbone's token embedding belongs to its tokenizer
    tokenizer = tokenizer or (Path(backbone) / "tokenizer.model" if backbone else roots[0] / "tokenizer.model")
    norm_stats = norm_stats or roots[0] / "norm_stats.json"
    sp = models.load_sentencepiece(tokenizer)
    torch.manual_seed(seed)
    if init:
        model = load_value(init).train()
        if time_input is not None and time_input != model.cfg.time_input:
            raise ValueError(f"{init}: a value function with time_input={model.cfg.time_input}, asked to continue "
                             f"with time_input={time_input}; its inputs cannot change")
    else:
        ds0 = datasets[0]
        vocab = models.read_config(backbone).vocab_size if backbone else max(1024, sp.vocab_size())
        model = ValueFunction(ValueConfig(vocab_size=vocab, cameras=tuple(ds0.cameras), time_input=bool(time_input)))
        if backbone:
            print(f"value function: {backbone_from_policy(model, backbone)} tensors from {backbone}'s backbone")
    cfg = model.cfg
    transforms = [value_transforms(cfg, ds, sp, norm_stats) for ds in datasets]
    returns = [np.concatenate([g for _, g in episode_returns(ds, c_fail_factor)]) for ds in datasets]
    # the frames it learns from: all, or those of the episodes outside the held-out fold
    frames = [np.arange(len(ds)) if fold is None else fold_rows(ds, *fold, held_out=False) for ds in datasets]
    sizes = np.array([len(f) for f in frames])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-10)
    rng, t0, losses = np.random.default_rng(seed), time.perf_counter(), []
    for step in range(steps):
        warm = min(1.0, (step + 1) / 100)
        for g in opt.param_groups:  # warm-up, then cosine to a tenth
            g["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        which = rng.choice(len(datasets), batch_size, p=sizes / sizes.sum())
        rows = [int(frames[d][rng.integers(sizes[d])]) for d in which]
        batch = collate([transforms[d](datasets[d][i]) for d, i in zip(which, rows)])
        g = np.array([returns[d][i] for d, i in zip(which, rows)])
        logits = model(batch)
        loss = F.cross_entropy(logits.float(), torch.from_numpy(soft_bins(g, label_sigma)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            with torch.no_grad():
                err = (logits.float().softmax(-1) @ bin_values() - torch.from_numpy(g).float()).abs().mean()
            print(f"value step {step + 1}/{steps}: CE {np.mean(losses[-log_every:]):.3f}, |V - return| "
                  f"{err:.3f}, {1000 * (time.perf_counter() - t0) / (step + 1):.0f} ms/step", flush=True)
    models.save_pretrained(model, out, norm_stats=data.load_norm_stats(norm_stats),
                           extra_files=[(str(tokenizer), "tokenizer.model")])
    model.path = str(out)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# 3. Advantages, thresholds, the sidecar file


@torch.no_grad()
def frame_values(value_fn, ds, rows=None, batch_size=256):
    """V of the frames `rows` of a dataset (default: all), (len(rows),), with the value function's
    own tokenizer and stats."""
    root = value_fn.path
    sp = models.load_sentencepiece(os.path.join(root, "tokenizer.model"))
    transforms = value_transforms(value_fn.cfg, ds, sp, os.path.join(root, "norm_stats.json"))
    rows = np.arange(len(ds)) if rows is None else np.asarray(rows)
    out = np.zeros(len(rows), np.float32)
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        out[start:start + len(part)] = value_fn.value(collate([transforms(ds[int(i)]) for i in part])).numpy()
    return out


def n_step_advantages(rewards, values, n):
    """One episode: A_t = sum of rewards t .. t+n-1 + V_{t+n} - V_t (normalized units; V past the
    end is 0, the episode's terminal value)."""
    T = len(rewards)
    padded_r, padded_v = np.concatenate([rewards, np.zeros(n)]), np.concatenate([values, np.zeros(n)])
    window = np.array([padded_r[t:t + n].sum() for t in range(T)])
    return window + padded_v[n:n + T] - values


def cross_fitted_values(value_fns, ds):
    """V of every frame, episode j's frames from value_fns[j % K], the one that never saw it.

    Why: a value function evaluated on the episodes it was trained on returns their realized
    return (it memorizes the layouts), and with the realized return every N-step advantage is
    ~0, so the threshold ranks noise. Held out, V is the expected return of such a scene, and
    A_t measures how much better than expected the frames went."""
    out = np.zeros(len(ds), np.float32)
    for k, fn in enumerate(value_fns):
        rows = fold_rows(ds, k, len(value_fns), held_out=True)
        out[rows] = frame_values(fn, ds, rows)
    return out


def compute_advantages(value_fn, datasets, n_steps=10, positive_fraction=0.3, c_fail_factor=1.0):
    """-> per dataset {"episodes": {key: {"advantage", "positive"}}, "thresholds": {task: eps}};
    thresholds per task over all datasets together. value_fn: one value function, or a list of
    K cross-fitted ones (train_value(fold=(k, K)))."""
    value_fns = value_fn if isinstance(value_fn, (list, tuple)) else [value_fn]
    per_ds = []
    for ds in datasets:
        values = cross_fitted_values(value_fns, ds)
        rewards = episode_returns(ds, c_fail_factor)
        _, correction = episode_labels(ds)
        adv = [n_step_advantages(r, values[s:e], n_steps) for (r, _), s, e in zip(rewards, ds.ep_start, ds.ep_end)]
        per_ds.append((ds, adv, correction, values))
    by_task = {}
    for ds, adv, _, _ in per_ds:
        for p, a in zip(ds.episode_prompts(), adv):
            by_task.setdefault(p, []).append(a)
    thresholds = {p: float(np.quantile(np.concatenate(a), 1 - positive_fraction)) for p, a in by_task.items()}
    out = []
    for ds, adv, correction, values in per_ds:
        episodes = {}
        for key, p, a, fix, s, e in zip(ds.episode_keys(), ds.episode_prompts(), adv, correction, ds.ep_start, ds.ep_end):
            positive = (a > thresholds[p]) | fix  # human corrections are always positive
            episodes[str(key)] = {"advantage": a.round(6).tolist(), "positive": positive.tolist(),
                                  "value": values[s:e].round(6).tolist()}
        out.append({"n_steps": n_steps, "positive_fraction": positive_fraction, "thresholds": thresholds,
                    "episodes": episodes})
    return out


def indicator(positive):
    """The improvement indicator as the prompt condition the policy is trained and served with."""
    return f"Advantage: {'positive' if positive else 'negative'}"


def write_advantages(dataset_path, table):
    """The advantages of a dataset as the library's prompt-conditions sidecar (data.py): each
    frame's indicator as its condition, "positive" served at inference; the advantages, values
    and thresholds ride along."""
    for episode in table["episodes"].values():
        episode["condition"] = [indicator(p) for p in episode["positive"]]
    path = data.conditions_path(dataset_path)
    data.write_json(path, dict(table, format="frame-conditions", serve=indicator(True)), indent=None)
    return path


def value_separation(tables, datasets):
    """How well V tells the episodes apart: mean V over the frames of successful and of failed
    episodes, at their first and their last frame, and the share of (success, failure) pairs of
    last frames that V orders right (an AUC)."""
    v = {True: {"first": [], "last": [], "all": []}, False: {"first": [], "last": [], "all": []}}
    for ds, table in zip(datasets, tables):
        for key, ok in zip(ds.episode_keys(), episode_labels(ds)[0]):
            values = table["episodes"][str(key)]["value"]
            for k, x in (("first", values[:1]), ("last", values[-1:]), ("all", values)):
                v[bool(ok)][k] += x
    last_ok, last_fail = np.array(v[True]["last"]), np.array(v[False]["last"])
    auc = float(np.mean(last_ok[:, None] > last_fail[None])) if len(last_ok) and len(last_fail) else float("nan")
    return {("success" if ok else "failure"): {k: float(np.mean(x)) for k, x in v[ok].items()} for ok in v} | {
        "last_frame_auc": auc}
