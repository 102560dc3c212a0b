"""Robot data for pi0 / pi0.5 / pi0-FAST: openpi's transforms, norm stats, mixtures, the batch dict.

What flows through this file:

    readers.py: LeRobotDataset (v2.1 / v3.0) or HDF5Dataset (ALOHA layout), from open_dataset
        dataset[i] -> raw sample: {"images": {camera: uint8 (height, width, 3)}, "state": (S,),
                                   "actions": (C, A) chunk, "action_is_pad": (C,), "prompt": str, ...}
    Transforms (one per dataset: its cameras, its norm stats, the model's prompt function)
        -> model sample: one row of the batch dict below, as numpy arrays without the B axis
    loader.py: Mixture + MixtureSampler + Loader (weighted co-training, DDP sharding, resumable
        position) -> collate -> the batch dict: torch tensors, leading axis B

The batch dict is paligemma.Batch (its keys, shapes and dtypes are listed there). Transforms
adds the model's training targets (its spec's fast_targets: pi0.5's target_tokens / target_masks,
pi0-FAST's answer with token_ar_masks / token_loss_masks) and, for a sample with a prompt
condition (ConditionedDataset), the unconditioned prompt as uncond_tokens / uncond_token_masks.

At inference a sample has no chunk, so there are no actions / action_masks. pi0-FAST pads nothing
(Transforms with state_dim = action_dim = None): its state is (B, S), and A is the robot's own.

Action chunks follow LeRobot's `delta_timestamps` (readers.py: steps past the episode end repeat
the last action and are marked in `action_is_pad`). The transforms are openpi's (its transforms,
normalization and image_tools modules), rewritten as plain numpy functions.

Per-frame prompt conditions (e.g. RECAP's "Advantage: positive" / "negative") come from a sidecar
file beside the dataset, <dataset>.conditions.json (ConditionedDataset): the dataset itself is never
touched.

Command line:
    python data.py info  <dataset>                             # features, fps, episodes, cameras
    python data.py stats <dataset> [--openpi-config NAME]      # openpi's norm_stats.json, in the dataset
    python data.py fast  <dataset> --chunk-size 10 --out fast.json   # a FAST tokenizer of its actions

Axis legend (paligemma.py's): B batch, V the model's views (cameras), R image side, L prompt tokens, C chunk (action
horizon), A action dim (the model's width after padding), S a dataset's state dim, D FAST target
slots.
"""

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

import recipes
import robots
from cli import above, at_least, main_guard
from episodes import DatasetView, as_uint8_image, check_finite
from fast_targets import fit_tokenizer
from fast_tokenizer import report
from readers import open_dataset


# ----------------------------------------------------------------------------------------------
# Transforms: openpi's, as plain functions on numpy arrays


def resize_with_pad(image, height=224, width=224):
    """uint8 (..., h, w, 3) -> (..., height, width, 3): keep the aspect ratio, pad with black.

    A port of openpi_client.image_tools.resize_with_pad (itself PIL's take on
    tf.image.resize_with_pad): the int() truncations decide the exact offsets, keep them."""
    if image.shape[-3:-1] == (height, width):
        return image
    flat = image.reshape(-1, *image.shape[-3:])
    out = np.zeros((len(flat), height, width, image.shape[-1]), np.uint8)
    for n, im in enumerate(flat):
        h, w = im.shape[:2]
        ratio = max(w / width, h / height)
        new_h, new_w = int(h / ratio), int(w / ratio)
        resized = np.asarray(Image.fromarray(im).resize((new_w, new_h), resample=Image.BILINEAR))
        top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
        out[n, top:top + new_h, left:left + new_w] = resized
    return out.reshape(*image.shape[:-3], height, width, image.shape[-1])


def image_to_float(image):
    """uint8 (..., R, R, 3) -> float32 (..., 3, R, R) in [-1, 1], openpi's x / 255 * 2 - 1."""
    x = image.astype(np.float32) / 255.0 * 2.0 - 1.0
    return np.moveaxis(x, -1, -3)


def delta_actions(actions, state, mask):
    """Actions relative to the chunk's first state on the dims where mask is True (grippers stay
    absolute). actions (..., C, A), state (..., S); the mask may be shorter than A."""
    mask = np.asarray(mask, bool)
    m = len(mask)
    if m > actions.shape[-1] or m > state.shape[-1]:
        raise ValueError(f"delta mask has {m} dims, actions {actions.shape[-1]}, state {state.shape[-1]}")
    out = actions.copy()
    out[..., :m] -= np.where(mask, state[..., :m], 0)[..., None, :]  # broadcast over the chunk
    return out


def absolute_actions(actions, state, mask):
    """The inverse of delta_actions."""
    mask = np.asarray(mask, bool)
    m = len(mask)
    out = actions.copy()
    out[..., :m] += np.where(mask, state[..., :m], 0)[..., None, :]
    return out


def normalize(x, stats, use_quantiles, name="x"):
    """z-score (x - mean) / (std + 1e-6), or quantile (x - q01) / (q99 - q01 + 1e-6) * 2 - 1.

    Stats wider than the data are sliced to its width, as openpi does (pi0-era assets are 32 wide,
    zero-padded past the robot's dims); narrower ones are an error: they describe another robot."""
    keys = ("q01", "q99") if use_quantiles else ("mean", "std")
    d = x.shape[-1]
    for k in keys:
        if k not in stats:
            raise KeyError(f"norm stats for '{name}' have no '{k}' (have {sorted(stats)})")
        if len(stats[k]) < d:
            raise ValueError(f"norm stats for '{name}' have {len(stats[k])} dims "
                             f"but the data has {d}")
    if use_quantiles:
        q01, q99 = np.asarray(stats["q01"])[:d], np.asarray(stats["q99"])[:d]
        return ((x - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0).astype(np.float32)
    return ((x - np.asarray(stats["mean"])[:d]) / (np.asarray(stats["std"])[:d] + 1e-6)).astype(np.float32)


def unnormalize(x, stats, use_quantiles):
    """The inverse of normalize, on model outputs that may be wider than the stats (padded dims):
    openpi pads z-score stats with mean 0 / std 1 and lets quantile-extra dims pass through;
    stats wider than x are sliced to its width."""
    x = np.asarray(x, np.float32).copy()
    D = x.shape[-1]
    if use_quantiles:
        q01, q99 = np.asarray(stats["q01"])[:D], np.asarray(stats["q99"])[:D]
        d = len(q01)
        x[..., :d] = (x[..., :d] + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01
        return x
    pad = (0, D - len(stats["mean"][:D]))
    mean, std = np.pad(stats["mean"][:D], pad), np.pad(stats["std"][:D], pad, constant_values=1.0)
    return (x * (std + 1e-6) + mean).astype(np.float32)


def pad_last(x, width, name="data"):
    """Zero-pad the last axis to `width` (openpi's PadStatesAndActions); returns (padded, mask)."""
    d = x.shape[-1]
    if d > width:
        raise ValueError(f"{name} has {d} dims, more than the model's width {width}: a wider model (train.py from "
                         f"scratch takes the data's width; openpi's checkpoints take 32), or fewer dims")
    padded = np.zeros((*x.shape[:-1], width), np.float32)
    padded[..., :d] = x
    return padded, np.arange(width) < d


# ----------------------------------------------------------------------------------------------
# Norm stats: exact mean / std, quantiles from a histogram, openpi's norm_stats.json


class RunningStats:
    """Per-dim statistics of a stream of (n, D) batches, in two passes over the data.

    Pass 1: count, min, max, mean and the sum of squared deviations, merged batch by batch with
    Chan et al.'s parallel update in float64 (exact up to rounding, no E[x^2] - E[x]^2
    cancellation). Pass 2: a histogram of `bins` bins over [min, max]; each order statistic is
    read off as the centre of its bin, so a quantile is off by at most one bin width."""

    def __init__(self, bins=5000):
        self.bins, self.n, self.hist = bins, 0, None

    def update(self, x):
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        if len(x) == 0:
            return
        if self.hist is not None:                                          # pass 2
            idx = np.clip(((x - self.lo) / self.width * self.bins).astype(np.int64), 0, self.bins - 1)
            flat = idx + np.arange(x.shape[1]) * self.bins                  # one bincount for all dims
            self.hist += np.bincount(flat.ravel(), minlength=self.hist.size).reshape(self.hist.shape)
            return
        mean_b, m2_b, n_b = x.mean(0), ((x - x.mean(0)) ** 2).sum(0), len(x)
        if self.n == 0:
            self.mean, self.m2, self.lo, self.hi = mean_b, m2_b, x.min(0), x.max(0)
        else:
            delta, n = mean_b - self.mean, self.n + n_b
            self.mean = self.mean + delta * n_b / n
            self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n
            self.lo, self.hi = np.minimum(self.lo, x.min(0)), np.maximum(self.hi, x.max(0))
        self.n += n_b

    def start_second_pass(self):
        self.width = np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        self.hist = np.zeros((len(self.mean), self.bins), np.int64)

    def quantile(self, q):
        """numpy's default (linear) quantile, with each order statistic taken from the histogram."""
        k = q * (self.n - 1)
        cdf = np.cumsum(self.hist, axis=1)
        order_stat = lambda j: self.lo + (np.argmax(cdf > j, axis=1) + 0.5) / self.bins * self.width
        v0, v1 = order_stat(np.floor(k)), order_stat(np.ceil(k))
        return np.where(self.hi > self.lo, v0 + (k - np.floor(k)) * (v1 - v0), self.lo)

    def result(self):
        return dict(mean=self.mean, std=np.sqrt(self.m2 / self.n),     # population std, as openpi
                    q01=self.quantile(0.01), q99=self.quantile(0.99))


class OpenpiRunningStats:
    """openpi's own running statistics (openpi.shared.normalize.RunningStats), kept number for
    number: mean and mean of squares updated batch by batch (std = sqrt(E[x^2] - E[x]^2)), and a
    5000-bin histogram per dim whose edges follow the running min / max (the counts are
    redistributed when they move); a quantile is the left edge of the bin where the cumulative
    count reaches q * n. It depends on the batches' order, which compute_norm_stats keeps openpi's."""

    def __init__(self, bins=5000):
        self.bins, self.n = bins, 0

    def update(self, batch):
        batch = batch.reshape(-1, batch.shape[-1])
        if self.n == 0:
            self.mean, self.mean_sq = batch.mean(0), (batch ** 2).mean(0)
            self.min, self.max = batch.min(0), batch.max(0)
            self.hist = [np.zeros(self.bins) for _ in range(batch.shape[1])]
            self.edges = [np.linspace(lo - 1e-10, hi + 1e-10, self.bins + 1) for lo, hi in zip(self.min, self.max)]
        else:
            new_max, new_min = batch.max(0), batch.min(0)
            moved = (new_max > self.max).any() or (new_min < self.min).any()
            self.max, self.min = np.maximum(self.max, new_max), np.minimum(self.min, new_min)
            if moved:  # new edges over the new range; the old counts move to where their left edges fall
                for i, old in enumerate(self.edges):
                    self.edges[i] = np.linspace(self.min[i] - 1e-10, self.max[i] + 1e-10, self.bins + 1)
                    self.hist[i] = np.histogram(old[:-1], bins=self.edges[i], weights=self.hist[i])[0]
        self.n += len(batch)
        self.mean += (batch.mean(0) - self.mean) * (len(batch) / self.n)
        self.mean_sq += ((batch ** 2).mean(0) - self.mean_sq) * (len(batch) / self.n)
        for i in range(batch.shape[1]):
            self.hist[i] += np.histogram(batch[:, i], bins=self.edges[i])[0]

    def result(self):
        if self.n < 2:
            raise ValueError("norm stats need at least 2 vectors")
        quantile = lambda q: np.array([e[np.searchsorted(np.cumsum(h), q * self.n)] for h, e in zip(self.hist, self.edges)])
        return dict(mean=self.mean, std=np.sqrt(np.maximum(0, self.mean_sq - self.mean ** 2)),
                    q01=quantile(0.01), q99=quantile(0.99))


def openpi_norm_stats(dataset, *, delta_mask=None, batch_size=32, progress=True):
    """{"state", "actions"} stats as openpi's compute_norm_stats makes them: the dataset in order,
    in batches of its config's batch size (the last partial batch dropped), every frame's whole
    action chunk (padded steps included: each action counts about C times), deltas where the
    mask says, float32 as its loader hands them over."""
    stats = {"state": OpenpiRunningStats(), "actions": OpenpiRunningStats()}
    batches = len(dataset) // batch_size
    if batches == 0:
        raise ValueError(f"norm stats: {len(dataset)} frames make no batch of {batch_size} (data.py stats --batch-size, or --per-frame)")
    for b in tqdm(range(batches), desc="norm stats (openpi's)", disable=not progress):
        rows = np.arange(b * batch_size, (b + 1) * batch_size)
        state, chunks = dataset.state[rows].astype(np.float32), dataset.action_chunks(rows)[0].astype(np.float32)
        if delta_mask is not None:
            chunks = delta_actions(chunks, state, delta_mask)
        stats["state"].update(state)
        stats["actions"].update(chunks)
    return warn_constant({k: s.result() for k, s in stats.items()})


def warn_constant(result):
    for k, r in result.items():
        constant = np.flatnonzero(r["q99"] - r["q01"] <= 0).tolist()
        if constant:  # normalize divides by std + 1e-6 (openpi's): a constant dim maps x - mean to 1e6 x
            warnings.warn(f"norm stats: {k} dims {constant} are constant in this dataset (std {r['std'][constant]}); "
                          f"normalize divides by std + 1e-6, as openpi does, so any other value there becomes huge")
    return result


def compute_norm_stats(dataset, *, delta_mask=None, bins=5000, progress=True):
    """{"state": {mean, std, q01, q99}, "actions": {...}} over every recorded frame once: exact mean
    and std, quantiles to a bin, whatever the order (openpi_norm_stats is openpi's own pass).

    Without delta actions, each frame's state and action count once (not once per overlapping
    chunk, as in openpi's pass). With a delta mask the model sees a[t + k] - s[t], whose spread
    grows with k, so each frame counts once as the anchor of its chunk (padded steps excluded)."""
    stats = {"state": RunningStats(bins), "actions": RunningStats(bins)}
    for second in (False, True):
        if second:
            for s in stats.values():
                s.start_second_pass()
        desc = "norm stats, pass 2/2 (quantiles)" if second else "norm stats, pass 1/2 (mean, std)"
        for e in tqdm(range(dataset.num_episodes), desc=desc, disable=not progress):
            rows = np.arange(dataset.ep_start[e], dataset.ep_end[e])
            stats["state"].update(dataset.state[rows])
            if delta_mask is None:
                stats["actions"].update(dataset.actions[rows])
            else:
                chunks, is_pad = dataset.action_chunks(rows)
                stats["actions"].update(delta_actions(chunks, dataset.state[rows], delta_mask)[~is_pad])
    for k, s in stats.items():
        if s.n == 0:
            raise ValueError(f"norm stats: the dataset has no {k} frames ({dataset.num_episodes} episodes, all empty)")
    return warn_constant({k: s.result() for k, s in stats.items()})


def save_norm_stats(stats, path, **representation):
    """Write openpi's norm_stats.json atomically (temporary file, then rename). representation:
    what the stats are of (e.g. delta_mask=[...] or None), written beside it to stats_meta_path
    (openpi's loader refuses any key but "norm_stats", so the file itself stays openpi's)."""
    write_json(path, {"norm_stats": {k: {s: np.asarray(v, np.float64).tolist() for s, v in d.items()}
                                     for k, d in stats.items()}})
    if representation:
        write_json(stats_meta_path(path), representation)


def write_json(path, obj, indent=2):
    """A JSON file written atomically: a temporary sibling, then one rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def stats_meta_path(path):
    """norm_stats.json -> norm_stats.meta.json: what the stats were computed on."""
    return str(Path(path).with_suffix("")) + ".meta.json"


def check_stats_representation(path, delta_mask, openpi_config=None):
    """Stats written by `data.py stats` record what they are of (stats_meta_path): deltas or not,
    and under which openpi config. Training on another representation would normalize with the
    wrong spread, silently: stats of deltas for absolute actions (or the reverse), and stats of a
    robot's raw data for a config that transforms it first (ALOHA's adapt_to_pi flips joints and
    rescales grippers). openpi's files do not say, and are taken as they are."""
    meta = Path(stats_meta_path(path))
    raw = json.loads(meta.read_text()) if meta.exists() else {}
    robot = robots.ROBOTS[robots.openpi_config(openpi_config).robot] if openpi_config else None
    if "openpi_config" in raw and robot is not None and robot.adapt_to_pi and raw["openpi_config"] is None:
        raise ValueError(f"{path}: these stats are of the raw dataset, but {openpi_config} first flips and rescales "
                         f"its dims (ALOHA's adapt_to_pi): recompute them with `python data.py stats DATASET "
                         f"--openpi-config {openpi_config}`")
    if "delta_mask" not in raw:
        return
    have = None if raw["delta_mask"] is None else [bool(m) for m in raw["delta_mask"]]
    want = None if delta_mask is None else [bool(m) for m in delta_mask]
    if have != want:
        raise ValueError(f"{path}: these stats are of {'delta actions ' + str(have) if have else 'absolute actions'}, "
                         f"but training uses {'delta actions ' + str(want) if want else 'absolute actions'}: recompute "
                         f"them with `python data.py stats` and the same --openpi-config / --delta-mask")


def load_norm_stats(path):
    """openpi's norm_stats.json -> {"state": {"mean": array, ...}, "actions": {...}}, checked:
    every value finite, std >= 0 and q99 >= q01 (a NaN std would turn every action into NaN)."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "norm_stats" not in raw:
        raise KeyError(f"{path}: no top-level 'norm_stats' key (openpi's norm_stats.json format)")
    out = {}
    for key, d in raw["norm_stats"].items():
        out[key] = {}
        for s, v in d.items():
            v = np.asarray(v if v is not None else np.nan, np.float32)
            if not np.isfinite(v).all():
                raise ValueError(f"{path}: norm_stats.{key}.{s} has NaN or inf at dims "
                                 f"{np.flatnonzero(~np.isfinite(v)).tolist()}")
            out[key][s] = v
        if "std" in out[key] and (out[key]["std"] < 0).any():
            raise ValueError(f"{path}: norm_stats.{key}.std is negative at dims {np.flatnonzero(out[key]['std'] < 0).tolist()}")
        if "q01" in out[key] and "q99" in out[key] and (out[key]["q99"] < out[key]["q01"]).any():
            raise ValueError(f"{path}: norm_stats.{key}: q99 < q01 at dims "
                             f"{np.flatnonzero(out[key]['q99'] < out[key]['q01']).tolist()}")
    return out


# ----------------------------------------------------------------------------------------------
# Model inputs: raw sample -> the model's per-example dict, and collation into the batch dict


@dataclass
class Transforms:
    """openpi's training transforms in their order: delta actions -> normalize -> resize images,
    tokenize the prompt, pad state and actions to the model width.

    One per dataset: `cameras` maps the model's views, in order, to this dataset's camera keys
    (None where the dataset has no such camera: that view is masked out, not shown as black).
    A sample may carry "image_masks" {camera: bool}: a robot's zero-filled views (robots.py)
    that the model may or may not look at."""
    tokenize: Callable  # the model's prompt function: (prompt, state, condition=None) -> (ids, mask)
    cameras: Sequence   # this dataset's camera key (or None) for each model view
    norm_stats: object = None           # stats dict, or the path of a (possibly shared) norm_stats.json
    use_quantiles: bool = False         # openpi: z-score for pi0, quantiles for pi0.5 and pi0-FAST
    delta_mask: Sequence | None = None  # e.g. make_bool_mask(6, -1, 6, -1) for ALOHA; None: absolute
    state_dim: int | None = 32          # model width to pad to; None: no padding (pi0-FAST)
    action_dim: int | None = 32
    image_size: int = 224
    # training targets written as tokens, from the model file (pi0.5's FAST targets, pi0-FAST's
    # answer): (prompt, normalized state, normalized unpadded actions) -> extra batch keys
    targets: Callable | None = None
    # steps past the episode's end (they repeat its last action): openpi trains on them, so by
    # default they count; True marks them out of the loss (action_masks False)
    mask_padded_steps: bool = False

    def __post_init__(self):
        self.stats_source = "norm_stats"
        if isinstance(self.norm_stats, (str, Path)):
            self.stats_source, self.norm_stats = str(self.norm_stats), load_norm_stats(self.norm_stats)

    def _normalize(self, x, key):
        if self.norm_stats is None:
            return x.astype(np.float32)
        if key not in self.norm_stats:
            raise KeyError(f"{self.stats_source}: no stats for '{key}' (have {sorted(self.norm_stats)})")
        try:
            return normalize(x, self.norm_stats[key], self.use_quantiles, key)
        except (KeyError, ValueError) as e:
            raise type(e)(f"{self.stats_source}: {e}") from None

    def __call__(self, sample):
        views, masks = [], []
        for cam in self.cameras:
            if cam is None:
                # openpi feeds zeros (black) for an absent view; the False mask is what matters
                views.append(np.full((3, self.image_size, self.image_size), -1.0, np.float32))
                masks.append(False)
                continue
            if cam not in sample["images"]:
                raise KeyError(f"camera '{cam}' not in the sample (cameras: {sorted(sample['images'])})")
            image = resize_with_pad(as_uint8_image(sample["images"][cam], cam), self.image_size, self.image_size)
            views.append(image_to_float(image))
            masks.append(bool(sample.get("image_masks", {}).get(cam, True)))
        raw_state = check_finite(sample["state"], "state")
        state = self._normalize(raw_state, "state")
        # pi0.5 puts the normalized, unpadded state into its prompt; pi0 ignores it
        tokens, token_masks = self.tokenize(sample["prompt"], state)
        out = dict(images=np.stack(views), image_masks=np.array(masks),
                   state=pad_last(state, self.state_dim, "state")[0] if self.state_dim else state,
                   tokens=np.asarray(tokens, np.int64), token_masks=np.asarray(token_masks, bool))
        if sample.get("condition") is not None:  # the prompt with its condition, and without it
            out["uncond_tokens"], out["uncond_token_masks"] = out["tokens"], out["token_masks"]
            tokens, token_masks = self.tokenize(sample["prompt"], state, condition=sample["condition"])
            out["tokens"], out["token_masks"] = np.asarray(tokens, np.int64), np.asarray(token_masks, bool)
        if "actions" in sample:                                            # absent at inference
            actions = check_finite(sample["actions"], "actions")
            if self.delta_mask is not None:
                actions = delta_actions(actions, raw_state, self.delta_mask)
            actions = self._normalize(actions, "actions")
            if self.targets is not None:
                out.update(self.targets(sample["prompt"], state, actions))
            width = self.action_dim or actions.shape[-1]
            actions, dim_mask = pad_last(actions, width, "actions")
            is_pad = np.asarray(sample.get("action_is_pad", np.zeros(len(actions), bool)))
            step_mask = ~is_pad if self.mask_padded_steps else np.ones(len(actions), bool)
            out.update(actions=actions, action_masks=step_mask[:, None] & dim_mask[None, :])
        return out

    def action_chunks(self, ds, rows):
        """The action chunks of dataset rows as the model trains on them, without reading an
        image: deltas (where the mask says), normalized, unpadded (n, C, A)."""
        chunks = ds.action_chunks(rows)[0]
        if self.delta_mask is not None:
            chunks = delta_actions(chunks, ds.state[rows], self.delta_mask)
        return normalize(chunks, self.norm_stats["actions"], self.use_quantiles, "actions")


# ----------------------------------------------------------------------------------------------
# Prompt conditions per frame: a sidecar beside the dataset


def conditions_path(dataset_path):
    """<dataset>.conditions.json, beside the dataset: the user's files are never touched."""
    return str(Path(dataset_path).resolve()) + ".conditions.json"


def read_conditions(path, ds):
    """A conditions sidecar, checked against its dataset: every episode there, with one entry per
    frame. Format: {"format": "frame-conditions", "serve": the condition the trained policy is
    asked at inference, "episodes": {episode key: {"condition": [text or null per frame], ...}}}
    (other per-episode keys are the writer's own, e.g. RECAP's advantages)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no prompt conditions for this dataset (--conditions reads "
                                f"<dataset>.conditions.json; RECAP's advantages command writes one)")
    try:
        table = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rewrite it") from None
    if table.get("format") != "frame-conditions" or not isinstance(table.get("serve"), str):
        raise ValueError(f"{path}: not a frame-conditions file (format {table.get('format')!r}, serve "
                         f"{table.get('serve')!r}: expected 'frame-conditions' and a text)")
    for key, s, e in zip(ds.episode_keys(), ds.ep_start, ds.ep_end):
        got = table["episodes"].get(str(key), {}).get("condition")
        if not isinstance(got, list) or len(got) != e - s:
            raise ValueError(f"{path}: episode {key} is {'missing' if got is None else 'of another length'} "
                             f"({e - s} frames in the dataset): recompute the conditions")
        bad = [c for c in got if c is not None and not isinstance(c, str)]
        if bad:
            raise ValueError(f"{path}: episode {key} has conditions {bad[:3]}: expected texts or null")
    return table


class ConditionedDataset(DatasetView):
    """A dataset whose samples carry their frame's prompt condition (sample["condition"]);
    Transforms then makes the prompt with and without it (train.py --conditions)."""

    def __init__(self, dataset, table):
        super().__init__(dataset)
        self.table = table

    def __getitem__(self, i):
        s = self.dataset[i]
        return dict(s, condition=self.table["episodes"][str(s["episode_index"])]["condition"][s["frame_index"]])


# ----------------------------------------------------------------------------------------------
# Command line: info and stats


def fit_fast_command(dataset, args, mask):
    """`data.py fast`: a FAST tokenizer fitted on the dataset's chunks as a pi0-FAST / pi0.5 model
    sees them (deltas where the mask says, quantile-normalized with the dataset's own stats)."""
    stats = args.norm_stats or os.path.join(args.dataset, "norm_stats.json")
    if not os.path.exists(stats):
        raise FileNotFoundError(f"{stats}: FAST fits normalized actions; compute the stats first (python data.py stats "
                                f"{args.dataset} --out {stats}) or pass --norm-stats")
    t = Transforms(tokenize=None, cameras=[], norm_stats=stats, use_quantiles=True, delta_mask=mask)
    tok = fit_tokenizer(dataset, t, args.vocab_size, max_chunks=args.max_chunks)
    tok.save(args.out)
    chunks = t.action_chunks(dataset, np.arange(0, len(dataset), max(1, len(dataset) // 2000)))
    report(tok, chunks)
    print(f"wrote {args.out}: {tok}, for chunks of {dataset.chunk_size} steps x {chunks.shape[-1]} dims (the "
          f"model's action horizon must be {dataset.chunk_size}: --chunk-size)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Inspect a robot dataset, compute its norm stats, fit a FAST "
                                     "tokenizer on its actions.")
    parser.add_argument("command", choices=["info", "stats", "fast"])
    parser.add_argument("dataset", help="LeRobot dataset directory, or HDF5 episode file / directory")
    parser.add_argument("--out", default=None, help="stats: norm_stats.json to write (default: in the dataset); "
                        "fast: the tokenizer's JSON file (default: fast_tokenizer.json)")
    parser.add_argument("--chunk-size", type=at_least(1), default=50, help="action chunk: the model's horizon (used with "
                        "--delta-mask, and by fast: pi0-FAST 10 on LIBERO, 50 on ALOHA)")
    parser.add_argument("--norm-stats", default=None, help="fast: the stats to normalize with (default: the dataset's)")
    parser.add_argument("--vocab-size", type=at_least(2), default=1024, help="fast: symbols + merges")
    parser.add_argument("--max-chunks", type=at_least(1), default=20000, help="fast: fit on a random subset this big")
    parser.add_argument("--delta-mask", default=None, help="e.g. 6,-1,6,-1: stats of delta actions")
    parser.add_argument("--openpi-config", default=None, metavar="NAME",
                        help="stats of what openpi config NAME trains on (robots.py: its repack, robot transforms, "
                             "deltas), exactly what train.py --openpi-config normalizes")
    parser.add_argument("--cameras", default=None, help="with --openpi-config: the robot's camera keys where the "
                        "dataset names them otherwise, e.g. cam_high=observation.images.top")
    parser.add_argument("--prompt", default=None, help="HDF5: prompt for files without a 'prompt' attribute")
    parser.add_argument("--fps", type=above(0), default=None, help="HDF5: fps for files without an 'fps' attr")
    parser.add_argument("--batch-size", type=at_least(1), default=None, help="stats: openpi's batches (default: the "
                        "--openpi-config's training batch size, else 32); its last partial batch is left out, as openpi's")
    parser.add_argument("--per-frame", action="store_true", help="stats: every frame once, exact mean and std, "
                        "order-free quantiles (ours); default: openpi's pass over every chunk window")
    parser.add_argument("--state-key", default="observation.state", help="LeRobot only: the state feature")
    parser.add_argument("--action-key", default="action", help="LeRobot only: the action feature")
    args = parser.parse_args(argv)

    is_lerobot = (Path(args.dataset) / "meta" / "info.json").exists()
    kwargs = dict(state_key=args.state_key, action_key=args.action_key) if is_lerobot else \
        dict(prompt=args.prompt, fps=args.fps)
    mask = robots.make_bool_mask(*[int(d) for d in args.delta_mask.split(",")]) if args.delta_mask else None
    if args.openpi_config:
        c = robots.openpi_config(args.openpi_config)
        dataset = robots.open_robot_dataset(args.dataset, args.openpi_config, c.action_horizon or args.chunk_size,
                                            robots.parse_cameras(args.cameras))
        given, mask = mask, robots.policy_settings(args.openpi_config)["delta_mask"]
        if given is not None and list(given) != mask:
            raise ValueError(f"--delta-mask {args.delta_mask} disagrees with {args.openpi_config}'s {mask}")
    else:
        dataset = open_dataset(args.dataset, args.chunk_size, **kwargs)
    if args.command == "info":
        for k, v in dataset.describe().items():
            print(f"{k:>9}: {json.dumps(v, indent=2) if isinstance(v, dict) else v}")
        return
    if args.command == "fast":
        args.out = args.out or "fast_tokenizer.json"
        return fit_fast_command(dataset, args, mask)
    args.out = args.out or os.path.join(args.dataset, "norm_stats.json")
    if args.per_frame:
        stats = compute_norm_stats(dataset, delta_mask=mask)
    else:
        batch = args.batch_size or (recipes.RECIPES[args.openpi_config].batch_size if args.openpi_config else 32)
        stats = openpi_norm_stats(dataset, delta_mask=mask, batch_size=batch)
    save_norm_stats(stats, args.out, delta_mask=None if mask is None else np.asarray(mask).tolist(),
                    openpi_config=args.openpi_config, kind="per-frame" if args.per_frame else "openpi")
    print(f"wrote {args.out}: state {len(stats['state']['mean'])} dims, actions "
          f"{len(stats['actions']['mean'])} dims, {len(dataset)} frames, {dataset.num_episodes} episodes")


if __name__ == "__main__":
    with main_guard():
        main(sys.argv[1:])
