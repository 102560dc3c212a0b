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
     corrections always are. Written to a sidecar file next to the dataset, never into it.
  4. An advantage-conditioned policy (pi0 or pi0.5, train.py --recap 1): the prompt carries
     "Advantage: positive" / "negative" after the task and state text (before pi0.5's FAST
     targets), dropped 30% of the time in training so one model is also unconditioned. At
     inference it is told "positive"; with classifier-free guidance, v = v_uncond +
     beta (v_cond - v_uncond), both prompts in one batch (pi0.sample_guided).
  5. The loop: collect rollouts with success labels (sim.py collect), retrain the value on all
     data, recompute advantages, fine-tune the policy, evaluate. `python recap.py demo` runs the
     whole experiment on the built-in task (README: RECAP).

    python recap.py value --data D [D ...] --out V [--init V0]     # 2: train a value function
    python recap.py advantages --value V --data D [D ...]          # 3: <D>.advantages.json
    # cross-fitted (demo --cross-fit 2): value --fold 0 2 --out V0, value --fold 1 2 --out V1,
    # then advantages --value V0 V1: each episode valued by the function that never saw it
    python train.py --model pi0 --data D [D ...] --recap 1         # 4: the conditioned policy
    python sim.py collect --checkpoint P --episodes N --out D      # 5: rollouts with success labels
    python recap.py demo --out runs/recap                          # all of it, with the table

Success labels: the HDF5 root attribute `success` (and `correction` for human corrections), or a
`success` key in a LeRobot dataset's episode metadata; a dataset without them is an error.

Axis legend (paligemma.py's): B examples, V views, P image tokens, L prompt tokens, W width,
K value bins, T an episode's frames.
"""

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models
from paligemma import GEMMA_PRESETS, SIGLIP_PRESETS, Gemma, GemmaConfig, SigLIP, SiglipConfig, make_attn_mask, make_positions

BINS = 201


# ----------------------------------------------------------------------------------------------
# 1. Rewards, returns and their bins


def episode_rewards(length, success, c_fail):
    """(T,) rewards: -1 per step; the last step 0 on success, -c_fail on failure."""
    r = -np.ones(length)
    r[-1] = 0.0 if success else -c_fail
    return r


def normalized_returns(rewards, norm):
    """Return-to-go of every frame divided by the task's normalizer: (T,) in [-1, 0]."""
    return np.clip(np.cumsum(rewards[::-1])[::-1] / norm, -1.0, 0.0)


def to_bins(returns):
    """Normalized returns in [-1, 0] -> the nearest of BINS equally spaced values."""
    return np.round((np.asarray(returns) + 1.0) * (BINS - 1)).astype(np.int64)


def soft_bins(returns, sigma):
    """HL-Gauss targets (Imani & White 2018; Farebrother et al. 2024): the mass of N(return, sigma)
    that falls in each bin, (B, K). sigma 0: the one-hot bin of to_bins."""
    returns = np.asarray(returns, np.float64)
    if sigma <= 0:
        return np.eye(BINS, dtype=np.float32)[to_bins(returns)]
    half = 0.5 / (BINS - 1)
    edges = np.concatenate([[-np.inf], np.linspace(-1.0, 0.0, BINS)[:-1] + half, [np.inf]])  # (K+1,)
    cdf = 0.5 * (1 + np.vectorize(math.erf)((edges[None] - returns[:, None]) / (sigma * math.sqrt(2))))
    return np.diff(cdf, axis=1).astype(np.float32)


def bin_values(device=None):
    return torch.linspace(-1.0, 0.0, BINS, device=device)


# ----------------------------------------------------------------------------------------------
# Episodes: their tasks and success labels, from the dataset (readers.py)


def episode_prompts(ds):
    """The task of every episode (HDF5: its prompt; LeRobot: its first frame's task)."""
    if hasattr(ds, "prompts"):
        return list(ds.prompts)
    return [ds.tasks[int(ds.task_index[ds.ep_start[e]])] for e in range(ds.num_episodes)]


def episode_keys(ds):
    """How samples name their episode (sample["episode_index"]): HDF5 its position, LeRobot its id."""
    return [int(k) for k in getattr(ds, "episode_index", range(ds.num_episodes))]


def episode_labels(ds):
    """(success (E,) bool, correction (E,) bool) from the dataset: HDF5 root attributes `success`
    / `correction`, or `success` / `correction` in a LeRobot dataset's episode metadata."""
    import h5py
    if hasattr(ds, "files") and all(str(f).endswith((".hdf5", ".h5")) for f in ds.files):
        success, correction = [], []
        for path in ds.files:
            with h5py.File(path, "r") as f:
                if "success" not in f.attrs:
                    raise KeyError(f"{path}: no `success` attribute; RECAP needs every episode labelled "
                                   "(sim.py demos / collect write it; set it on your own episodes)")
                success.append(bool(f.attrs["success"]))
                correction.append(bool(f.attrs.get("correction", False)))
        return np.array(success), np.array(correction)
    from readers import read_jsonl
    path = Path(ds.root) / "meta" / "episodes.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: RECAP reads success labels from LeRobot v2.1 episode metadata "
                                "(a `success` key per episode); v3.0 datasets are not supported yet")
    rows = {e["episode_index"]: e for e in read_jsonl(path)}
    missing = [k for k in episode_keys(ds) if "success" not in rows.get(k, {})]
    if missing:
        raise KeyError(f"{path}: episodes {missing[:10]} have no `success` key")
    keys = episode_keys(ds)
    return (np.array([bool(rows[k]["success"]) for k in keys]),
            np.array([bool(rows[k].get("correction", False)) for k in keys]))


def episode_returns(ds, c_fail_factor=1.0):
    """Per episode: (rewards / norm (T,), normalized returns (T,)); C_fail = c_fail_factor x the
    task's longest episode, norm = that length + C_fail."""
    success, _ = episode_labels(ds)
    prompts, lengths = episode_prompts(ds), ds.ep_end - ds.ep_start
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
        """Images, prompt, readout -> tokens (B, V*P + L + 1, W), mask, ar (the readout's block)."""
        B, V = batch["image_masks"].shape
        img = self.vision(batch["images"].flatten(0, 1))                              # (B*V, P, W)
        img = img.view(B, -1, img.shape[-1])                                          # (B, V*P, W)
        img_mask = batch["image_masks"][:, :, None].expand(B, V, img.shape[1] // V).reshape(B, -1)
        text = self.llm.embed_tokens(batch["tokens"]).to(img.dtype)                   # (B, L, W)
        readout = self.readout.to(img.dtype).expand(B, 1, -1)                         # (B, 1, W)
        tokens = torch.cat([img, text, readout], dim=1)
        mask = torch.cat([img_mask, batch["token_masks"], torch.ones(B, 1, dtype=torch.bool, device=img.device)], 1)
        ar = torch.zeros(tokens.shape[1], dtype=torch.long, device=img.device)
        ar[-1] = 1  # the readout starts its own block: it attends to all real tokens, none attend to it
        return tokens, mask, ar

    def forward(self, batch):
        """-> logits over the return bins (B, K), read at the readout token (never a padding slot:
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
    import pi05
    tokenize = lambda prompt, state, indicator=None: pi05.tokenize_prompt(sp, prompt, state, cfg.max_token_len)
    transforms = data.Transforms(tokenize=tokenize, cameras=list(ds.cameras), norm_stats=stats, use_quantiles=True,
                                 state_dim=None, action_dim=None, image_size=cfg.vision.image_size)
    if not cfg.time_input:
        return transforms
    return lambda s: transforms(dict(s, prompt=f"{s['prompt']}, Step: {int(s['frame_index'])}"))


def load_value(path):
    from safetensors.torch import load_file
    with open(os.path.join(path, "config.json")) as f:
        cfg = ValueConfig.from_dict(json.load(f))
    model = ValueFunction(cfg)
    models.load_state_strict(model, load_file(os.path.join(path, "model.safetensors")))
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
    shape = lambda c: dataclasses.replace(c, dropout=0.0) if hasattr(c, "dropout") else c  # dropout is not a weight
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
    roots = [Path(ds.files[0]).parent if hasattr(ds, "files") else Path(ds.root) for ds in datasets]
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
        batch = data.collate([transforms[d](datasets[d][i]) for d, i in zip(which, rows)])
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


def sidecar_path(dataset_path):
    """<dataset>.advantages.json, beside the dataset: the user's files are never touched."""
    return str(Path(dataset_path).resolve()) + ".advantages.json"


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
        out[start:start + len(part)] = value_fn.value(data.collate([transforms(ds[int(i)]) for i in part])).numpy()
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
        for p, a in zip(episode_prompts(ds), adv):
            by_task.setdefault(p, []).append(a)
    thresholds = {p: float(np.quantile(np.concatenate(a), 1 - positive_fraction)) for p, a in by_task.items()}
    out = []
    for ds, adv, correction, values in per_ds:
        episodes = {}
        for key, p, a, fix, s, e in zip(episode_keys(ds), episode_prompts(ds), adv, correction, ds.ep_start, ds.ep_end):
            positive = (a > thresholds[p]) | fix  # human corrections are always positive
            episodes[str(key)] = {"advantage": a.round(6).tolist(), "positive": positive.tolist(),
                                  "value": values[s:e].round(6).tolist()}
        out.append({"format": "recap-advantages", "version": 1, "n_steps": n_steps,
                    "positive_fraction": positive_fraction, "thresholds": thresholds, "episodes": episodes})
    return out


def write_advantages(path, table):
    data.write_json(path, table, indent=None)


def read_advantages(path, ds):
    """The sidecar of a dataset, checked against it: every episode there, with its length."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no advantages for this dataset; make them with "
                                f"`python recap.py advantages --value VALUE_DIR --data {path[:-len('.advantages.json')]}`")
    with open(path) as f:
        table = json.load(f)
    if table.get("format") != "recap-advantages":
        raise ValueError(f"{path}: not a recap advantages file (format {table.get('format')!r})")
    for key, s, e in zip(episode_keys(ds), ds.ep_start, ds.ep_end):
        got = table["episodes"].get(str(key))
        if got is None or len(got["positive"]) != e - s:
            raise ValueError(f"{path}: episode {key} is {'missing' if got is None else 'of another length'} "
                             f"({e - s} frames in the dataset): recompute the advantages")
    return table


class RecapDataset(data.DatasetView):
    """A dataset whose samples carry their frame's improvement indicator (sample["indicator"]);
    data.Transforms then makes the prompt with and without it."""

    def __init__(self, dataset, table):
        super().__init__(dataset)
        self.table = table

    def __getitem__(self, i):
        s = self.dataset[i]
        return dict(s, indicator=self.table["episodes"][str(s["episode_index"])]["positive"][s["frame_index"]])


# ----------------------------------------------------------------------------------------------
# Commands


def open_datasets(paths, chunk_size=1):
    return [data.open_dataset(p, chunk_size=chunk_size) for p in paths]


def train_policy(out, datasets, args, *extra):
    """train.py in a subprocess, exactly as a user runs it; -> the exported checkpoint."""
    import sim
    return sim.run_train(out, "--model", args.model, "--data", *datasets, "--eval-episodes", 0, "--seed", args.seed,
                         "--norm-stats", Path(datasets[0]) / "norm_stats.json", *extra)


def closed_loop(checkpoint, episodes, cfg_beta=None):
    import sim
    from policy import Policy
    r = sim.evaluate(Policy(checkpoint, cfg_beta=cfg_beta), "builtin", episodes, sim.EVAL_SEED, progress=False)
    return {k: r[k] for k in ("successes", "episodes", "success_rate", "ci95", "mean_length")}


def plot_values(tables, datasets, path, per_kind=12, width=640, height=360):
    """V along episodes (x: frame, y: V in [-1, 0]): green successes, red failures (pillow only)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, top, w, h = 50, 20, width - 70, height - 60
    draw.rectangle([left, top, left + w, top + h], outline="black")
    longest = max(int(np.max(ds.ep_end - ds.ep_start)) for ds in datasets)
    drawn = {True: 0, False: 0}
    for ds, table in zip(datasets, tables):
        success, _ = episode_labels(ds)
        for key, ok in zip(episode_keys(ds), success):
            if drawn[bool(ok)] >= per_kind:
                continue
            drawn[bool(ok)] += 1
            v = table["episodes"][str(key)]["value"]
            xy = [(left + w * t / max(1, longest - 1), top + h * (-x)) for t, x in enumerate(v)]
            draw.line(xy, fill=(40, 160, 60) if ok else (210, 40, 40), width=2)
    draw.text((left, height - 35), f"frame (0 .. {longest - 1}); green: {drawn[True]} successful episodes, "
              f"red: {drawn[False]} failed", fill="black")
    draw.text((5, top), "V=0", fill="black")
    draw.text((5, top + h - 10), "V=-1", fill="black")
    img.save(path)
    return path


def value_separation(tables, datasets):
    """How well V tells the episodes apart: mean V over the frames of successful and of failed
    episodes, at their first and their last frame, and the share of (success, failure) pairs of
    last frames that V orders right (an AUC)."""
    v = {True: {"first": [], "last": [], "all": []}, False: {"first": [], "last": [], "all": []}}
    for ds, table in zip(datasets, tables):
        for key, ok in zip(episode_keys(ds), episode_labels(ds)[0]):
            values = table["episodes"][str(key)]["value"]
            for k, x in (("first", values[:1]), ("last", values[-1:]), ("all", values)):
                v[bool(ok)][k] += x
    last_ok, last_fail = np.array(v[True]["last"]), np.array(v[False]["last"])
    auc = float(np.mean(last_ok[:, None] > last_fail[None])) if len(last_ok) and len(last_fail) else float("nan")
    return {("success" if ok else "failure"): {k: float(np.mean(x)) for k, x in v[ok].items()} for ok in v} | {
        "last_frame_auc": auc}


def add_demo_args(p):
    p.add_argument("--out", default="runs/recap", help="the experiment's folder")
    p.add_argument("--model", default="pi0", choices=["pi0", "pi05"])
    p.add_argument("--episodes", type=int, default=2000, help="demonstrations, expert and degraded")
    p.add_argument("--degraded", type=float, default=0.4,
                   help="share of episodes by the degraded demonstrator (0.6 leaves fewer expert frames than the 30%% positive share)")
    p.add_argument("--steps", type=int, default=12000,
                   help="policy training steps, imitation and RECAP alike (at 6000 the tiny pi0 does not yet ground "
                        "the indicator on this data: RECAP with the true expert/degraded labels succeeds 29%%, at 12000 75%%)")
    p.add_argument("--value-steps", type=int, default=2500)
    p.add_argument("--label-sigma", type=float, default=0.05,
                   help="the value function's HL-Gauss target spread (0: the paper's one-hot bin; see README)")
    p.add_argument("--value-time", type=int, default=1, choices=(0, 1),
                   help="the value function sees each frame's time step (0: pi*0.6's inputs, whose value cannot tell "
                        "a failure near the time limit from one far from it; see README)")
    p.add_argument("--rollouts", type=int, default=1000, help="iteration 2: the RECAP policy's own episodes")
    p.add_argument("--finetune-steps", type=int, default=4000, help="iteration 2: policy fine-tuning steps")
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="iteration 2: peak learning rate (no warm-up)")
    p.add_argument("--eval-episodes", type=int, default=300)
    p.add_argument("--cfg-beta", type=float, default=2.0, help="classifier-free guidance weight of the CFG row")
    p.add_argument("--n-steps", type=int, default=10, help="N of the N-step advantage")
    p.add_argument("--cross-fit", type=int, default=1,
                   help="K value functions, each held out from a K-th of the episodes, which it then values "
                        "(1: one, in-sample; 2 measured no better on this task, see README)")
    p.add_argument("--seed", type=int, default=0)


def cmd_demo(args):
    """Mixed-quality demos -> imitation vs RECAP (beta 1, CFG) -> one more iteration on the
    policy's own rollouts. Prints the table; writes recap.json, recap.md and value.png."""
    import sim
    from policy import Policy
    if args.cross_fit < 1:  # before an hour of training, not after
        raise ValueError(f"--cross-fit {args.cross_fit}: expected K >= 1 value functions")
    t_start, out = time.perf_counter(), Path(args.out)
    demos = out / "data"
    if not (demos / "tokenizer.model").exists():
        ok = sim.record_demos(demos, args.episodes, degraded=args.degraded)
        ds = data.open_dataset(demos, chunk_size=1)
        data.save_norm_stats(data.compute_norm_stats(ds, progress=False), demos / "norm_stats.json")
        sim.train_tokenizer(demos / "tokenizer.model", extra=[f"\nAdvantage: {w}" for w in ("positive", "negative")]
                            + [f";\nAdvantage: {w};\nAction: " for w in ("positive", "negative")])
        print(f"demos: {args.episodes} episodes, {ok} successful ({args.degraded:.0%} by a degraded demonstrator)")
    rows, demo_ds = {}, data.open_dataset(demos, chunk_size=1)
    imitation = train_policy(out / "imitation", [demos], args, "--steps", args.steps)
    rows["imitation (same data, same steps)"] = closed_loop(imitation, args.eval_episodes)
    # the value function starts from the imitation policy's SigLIP + PaliGemma (pi*0.6 starts from a pretrained VLM)
    K = args.cross_fit
    fold = lambda k: (k, K) if K > 1 else None
    value1 = [train_value([demo_ds], out / f"value1_fold{k}", steps=args.value_steps, seed=args.seed + k,
                          backbone=imitation, label_sigma=args.label_sigma, fold=fold(k),
                          time_input=bool(args.value_time)) for k in range(K)]
    (table,) = compute_advantages(value1, [demo_ds], args.n_steps)
    write_advantages(sidecar_path(demos), table)
    plot_values([table], [demo_ds], out / "value.png")
    separation = value_separation([table], [demo_ds])
    print("value function: mean V over successful / failed episodes {:.3f} / {:.3f}; first frames {:.3f} / {:.3f}; "
          "last frames {:.3f} / {:.3f} (AUC {:.2f})".format(*(separation[k][w] for w in ("all", "first", "last")
                                                            for k in ("success", "failure")), separation["last_frame_auc"]))
    recap1 = train_policy(out / "recap1", [demos], args, "--steps", args.steps, "--recap", 1)
    rows["RECAP, beta = 1"] = closed_loop(recap1, args.eval_episodes)
    rows[f"RECAP, CFG beta = {args.cfg_beta:g}"] = closed_loop(recap1, args.eval_episodes, args.cfg_beta)
    rollouts = out / "rollouts1"
    r = sim.record_rollouts(Policy(recap1), rollouts, args.rollouts, seed=500_000, progress=False)
    print(f"rollouts of the RECAP policy: {r['successes']}/{r['episodes']} successful")
    both = [demo_ds, data.open_dataset(rollouts, chunk_size=1)]
    value2 = [train_value(both, out / f"value2_fold{k}", steps=args.value_steps // 2, seed=args.seed + K + k,
                          init=out / f"value1_fold{k}", tokenizer=demos / "tokenizer.model",
                          norm_stats=demos / "norm_stats.json", label_sigma=args.label_sigma, fold=fold(k),
                          time_input=bool(args.value_time))
              for k in range(K)]
    for path, t in zip([demos, rollouts], compute_advantages(value2, both, args.n_steps)):
        write_advantages(sidecar_path(path), t)
    recap2 = train_policy(out / "recap2", [demos, rollouts], args, "--steps", args.finetune_steps, "--recap", 1,
                          "--init", recap1, "--warmup", 0, "--lr", args.finetune_lr)
    rows["RECAP, one more iteration (own rollouts), beta = 1"] = closed_loop(recap2, args.eval_episodes)
    lines = ["| policy | success | 95% CI | mean length |", "|---|---|---|---|"]
    for name, x in rows.items():
        lines.append(f"| {name} | {x['successes']}/{x['episodes']} = {x['success_rate']:.1%} | "
                     f"{x['ci95'][0]:.1%}-{x['ci95'][1]:.1%} | {x['mean_length']:.1f} |")
    print("\n".join(lines))
    minutes = (time.perf_counter() - t_start) / 60
    (out / "recap.md").write_text("\n".join(lines) + f"\n\n({minutes:.0f} min)\n")
    (out / "recap.json").write_text(json.dumps(dict(rows=rows, value=separation, args=vars(args), minutes=minutes), indent=2))
    print(f"wrote {out / 'recap.md'}, {out / 'recap.json'}, {out / 'value.png'} in {minutes:.1f} min")


def cmd_value(args):
    train_value(open_datasets(args.data), args.out, args.steps, args.batch_size, args.lr, args.seed, args.init,
                args.c_fail, backbone=args.backbone, label_sigma=args.label_sigma,
                fold=tuple(args.fold) if args.fold else None, time_input=args.time_input)


def cmd_advantages(args):
    value_fn = [load_value(v) for v in args.value]
    datasets = open_datasets(args.data)
    for path, ds, table in zip(args.data, datasets, compute_advantages(value_fn, datasets, args.n_steps,
                                                                       args.positive_fraction, args.c_fail)):
        write_advantages(sidecar_path(path), table)
        share = np.mean([p for e in table["episodes"].values() for p in e["positive"]])
        print(f"wrote {sidecar_path(path)}: {len(table['episodes'])} episodes, {share:.1%} of frames positive")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("value", help="train a value function on labelled episodes")
    v.add_argument("--data", nargs="+", required=True, help="datasets (HDF5 or LeRobot) with success labels")
    v.add_argument("--out", required=True, help="where the value function goes")
    v.add_argument("--init", default=None, help="a value function to fine-tune")
    v.add_argument("--backbone", default=None, help="a policy checkpoint whose SigLIP + PaliGemma start the value function")
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--fold", type=int, nargs=2, metavar=("k", "K"), default=None,
                   help="cross-fitting: hold out the episodes j with j %% K == k (value them with this one)")
    v.add_argument("--time-input", type=int, default=None, choices=(0, 1),
                   help="the frame's time step in the prompt (default: --init's own, else 0, pi*0.6's inputs); "
                        "for tasks whose failures end at a time limit (README: RECAP)")
    v.add_argument("--label-sigma", type=float, default=0.0,
                   help="HL-Gauss targets: spread each return over the bins with this std (0: the paper's one-hot bin)")
    a = sub.add_parser("advantages", help="N-step advantages and indicators -> <dataset>.advantages.json")
    a.add_argument("--value", nargs="+", required=True,
                   help="a value function (recap.py value), or K cross-fitted ones (value --fold k K, k = 0..K-1, in order)")
    a.add_argument("--data", nargs="+", required=True)
    a.add_argument("--n-steps", type=int, default=10, help="N of the N-step advantage")
    a.add_argument("--positive-fraction", type=float, default=0.3, help="share of each task's frames that are positive")
    for p in (v, a):
        p.add_argument("--c-fail", type=float, default=1.0, help="failure penalty, in units of the task's longest episode")
    d = sub.add_parser("demo", help="the whole experiment on the built-in task, with the table")
    add_demo_args(d)
    args = parser.parse_args(argv)
    {"value": cmd_value, "advantages": cmd_advantages, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    main()
