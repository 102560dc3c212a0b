"""Robot data for pi0 / pi0.5 / pi0-FAST: openpi's transforms, norm stats, mixtures, the batch dict.

What flows through this file:

    readers.py: LeRobotDataset (v2.1 / v3.0) or HDF5Dataset (ALOHA layout), from open_dataset
        dataset[i] -> raw sample: {"images": {camera: uint8 (H, W, 3)}, "state": (S,),
                                   "actions": (C, A) chunk, "action_is_pad": (C,), "prompt": str, ...}
    Transforms (one per dataset: its cameras, its norm stats, the model's prompt function)
        -> model sample: one row of the batch dict below, as numpy arrays without the B axis
    Mixture + MixtureSampler + Loader (weighted co-training, DDP sharding, resumable position)
        -> collate -> the batch dict: torch tensors, leading axis B

The batch dict, what the models' forward and sampling take:

    key               dtype    shape            content
    images            float32  (B, V, 3, R, R)  camera views in [-1, 1]; a view the dataset lacks is -1
    image_masks       bool     (B, V)           False for a view the dataset lacks
    state             float32  (B, A)           normalized state, zero-padded to the model's action_dim
    tokens            int64    (B, L)           the prompt (pi0.5, pi0-FAST: with the binned state), padded
    token_masks       bool     (B, L)           True on the prompt's tokens
    actions           float32  (B, C, A)        normalized action chunk (delta first, where a mask
                                                says so), zero-padded to the model's action_dim
    action_masks      bool     (B, C, A)        False on padded dims and on steps past the episode end
  added by train.py's wrappers of Transforms, for one model each:
    target_tokens     int64    (B, D)           pi0.5 FAST co-training (WithFastTargets): the chunk's
                                                FAST ids in the PaliGemma vocabulary, then "|", EOS
    target_masks      bool     (B, D)           True on the target tokens
    token_ar_masks    int64    (B, L)           pi0-FAST (WithFastPrompt): 0 on the prompt, 1 on the
                                                answer "Action: " + FAST ids + "|" EOS
    token_loss_masks  bool     (B, L)           pi0-FAST: True where the next-token loss counts
  with a RECAP indicator in the sample (recap.py; train.py --recap, Policy with "recap"):
    tokens            int64    (B, L)           the prompt with "Advantage: positive" / "negative"
    uncond_tokens     int64    (B, L)           the same prompt without it (indicator dropout, CFG)
    uncond_token_masks bool    (B, L)

At inference a sample has no chunk, so there are no actions / action_masks. pi0-FAST pads nothing
(Transforms with state_dim = action_dim = None): its state is (B, S), and A is the robot's own.

Action chunks follow LeRobot's `delta_timestamps` (readers.py: steps past the episode end repeat
the last action and are marked in `action_is_pad`). The transforms are openpi's (its transforms,
normalization and image_tools modules), rewritten as plain numpy functions.

Command line:
    python data.py info  <dataset>                             # features, fps, episodes, cameras
    python data.py stats <dataset> --out norm_stats.json       # openpi's norm_stats.json format

Axis legend (paligemma.py's): B batch, V the model's views (cameras), R image side, L prompt tokens, C chunk (action
horizon), A action dim (the model's width after padding), S a dataset's state dim, D FAST target
slots, H/W a camera's image height/width.
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
import torch
from PIL import Image
from tqdm import tqdm

# The readers live in readers.py; their names stay importable from here (data.open_dataset, ...),
# which is how train.py, infer.py, sim.py and the tests reach them.
from readers import HDF5Dataset, LeRobotDataset, open_dataset, write_hdf5_episode  # noqa: F401


# ----------------------------------------------------------------------------------------------
# Transforms: openpi's, as plain functions on numpy arrays


def resize_with_pad(image, height=224, width=224):
    """uint8 (..., H, W, 3) -> (..., height, width, 3): keep the aspect ratio, pad with black.

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


def as_uint8_image(image, camera="image"):
    """An (H, W, 3) image as uint8, openpi's way: uint8 as is; float in [0, 1] -> (255 x) cast to
    uint8 (openpi's policies do this). Anything else is an error naming the camera: a float image
    in [0, 255] or a uint16 one would otherwise come out nearly white or black, with no error."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image '{camera}' has shape {image.shape}, expected (H, W, 3)")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"image '{camera}' is {image.dtype} with NaN or inf values")
        if image.min() < 0 or image.max() > 1:
            raise ValueError(f"image '{camera}' is {image.dtype} with values in [{image.min():.3g}, "
                             f"{image.max():.3g}]: a float image must lie in [0, 1] (or send uint8)")
        return (255 * image).astype(np.uint8)
    raise ValueError(f"image '{camera}' has dtype {image.dtype} (shape {image.shape}): expected uint8, "
                     f"or float in [0, 1]")


def check_finite(x, name):
    """Raise if x has NaN or inf, naming the dims: a NaN state gives NaN or plausible-looking
    (pi0.5's bins clamp it) actions, never an error of its own."""
    x = np.asarray(x, np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        dims = sorted(set(np.nonzero(bad)[-1].tolist()))
        raise ValueError(f"{name} has NaN or inf (dims {dims}): {np.array2string(x, threshold=20)}")
    return x


def image_to_float(image):
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1], openpi's x / 255 * 2 - 1."""
    x = image.astype(np.float32) / 255.0 * 2.0 - 1.0
    return np.moveaxis(x, -1, -3)


def make_bool_mask(*dims):
    """openpi's make_bool_mask: (6, -1, 6, -1) -> 6 x True, 1 x False, 6 x True, 1 x False."""
    return np.concatenate([np.full(abs(d), d > 0) for d in dims]).astype(bool)


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


def pad_last(x, width):
    """Zero-pad the last axis to `width` (openpi's PadStatesAndActions); returns (padded, mask)."""
    d = x.shape[-1]
    if d > width:
        raise ValueError(f"data has {d} dims, more than the model width {width}")
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


def compute_norm_stats(dataset, *, delta_mask=None, bins=5000, progress=True):
    """{"state": {mean, std, q01, q99}, "actions": {...}} over every recorded frame once.

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
    result = {k: s.result() for k, s in stats.items()}
    for k, r in result.items():
        constant = np.flatnonzero(r["q99"] - r["q01"] <= 0).tolist()
        if constant:  # normalize divides by std + 1e-6 (openpi's): a constant dim maps x - mean to 1e6 x
            warnings.warn(f"norm stats: {k} dims {constant} are constant in this dataset (std {r['std'][constant]}); "
                          f"normalize divides by std + 1e-6, as openpi does, so any other value there becomes huge")
    return result


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


def check_stats_representation(path, delta_mask):
    """Stats written by `data.py stats` record whether their actions were deltas ("delta_mask", in
    stats_meta_path); training on the other representation would normalize with the wrong
    spread, silently. openpi's files do not say, and are taken as they are."""
    meta = Path(stats_meta_path(path))
    raw = json.loads(meta.read_text()) if meta.exists() else {}
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
    tokenize: Callable  # the model's prompt function: (prompt, state) -> (ids, mask)
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
                   state=pad_last(state, self.state_dim)[0] if self.state_dim else state,
                   tokens=np.asarray(tokens, np.int64), token_masks=np.asarray(token_masks, bool))
        if sample.get("indicator") is not None:  # RECAP: the prompt with the indicator, and without it
            out["uncond_tokens"], out["uncond_token_masks"] = out["tokens"], out["token_masks"]
            tokens, token_masks = self.tokenize(sample["prompt"], state, indicator=bool(sample["indicator"]))
            out["tokens"], out["token_masks"] = np.asarray(tokens, np.int64), np.asarray(token_masks, bool)
        if "actions" in sample:                                            # absent at inference
            actions = check_finite(sample["actions"], "actions")
            if self.delta_mask is not None:
                actions = delta_actions(actions, raw_state, self.delta_mask)
            actions = self._normalize(actions, "actions")
            if self.targets is not None:
                out.update(self.targets(sample["prompt"], state, actions))
            width = self.action_dim or actions.shape[-1]
            actions, dim_mask = pad_last(actions, width)
            step_mask = ~np.asarray(sample.get("action_is_pad", np.zeros(len(actions), bool)))
            out.update(actions=actions, action_masks=step_mask[:, None] & dim_mask[None, :])
        return out


class DatasetView:
    """A dataset seen through a wrapper that changes its samples (robots.RobotDataset,
    recap.RecapDataset): every attribute the wrapper does not set (chunk_size, fps, tasks,
    episode bounds, ...) is the wrapped dataset's, so readers' users take either."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (e.g. while unpickling): no endless recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)


def collate(samples):
    """List of model samples -> the batch dict (keys, dtypes, shapes: the module docstring).

    Every key is stacked along a new leading axis B; samples must agree on each key's shape (a
    Mixture checks its datasets' image size, views, widths and chunk size up front)."""
    batch = {}
    for key in samples[0]:
        shapes = {np.shape(s[key]) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"cannot batch '{key}': samples have shapes {sorted(shapes)}")
        batch[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    return batch


# ----------------------------------------------------------------------------------------------
# Co-training mixture, the DDP sampler, and a resumable infinite loader


class Mixture(torch.utils.data.Dataset):
    """Several datasets, each with its own Transforms, behind one flat index: frame f of dataset d
    is index offsets[d] + f. Weights (default: proportional to size) are used by MixtureSampler."""

    def __init__(self, datasets, transforms, weights=None):
        if len(datasets) != len(transforms) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(transforms)} transforms")
        self.datasets, self.transforms = list(datasets), list(transforms)
        self.sizes = np.array([len(d) for d in datasets], np.int64)
        if (self.sizes == 0).any():
            raise ValueError(f"dataset {int(np.argmin(self.sizes))} of the mixture has no frames")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        w = np.asarray(self.sizes if weights is None else weights, np.float64)
        if len(w) != len(datasets) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {list(w)}: need {len(datasets)} non-negative numbers, not all 0")
        self.weights = w / w.sum()
        # every dataset must produce the same shapes, or batches cannot be stacked
        shapes = {(t.image_size, len(t.cameras), t.state_dim, t.action_dim, d.chunk_size)
                  for d, t in zip(datasets, transforms)}
        if len(shapes) > 1:
            raise ValueError(f"datasets disagree on (image_size, views, state_dim, action_dim, chunk_size): "
                             f"{sorted(shapes, key=str)}")
        for d, t in zip(self.datasets, self.transforms):
            for cam in t.cameras:
                if cam is not None and cam not in d.cameras:
                    raise KeyError(f"camera '{cam}' is not in dataset {getattr(d, 'root', d.files[0])} "
                                   f"(cameras: {d.cameras})")

    def __len__(self):
        return int(self.sizes.sum())

    def __getitem__(self, i):
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.transforms[d](self.datasets[d][int(i - self.offsets[d])])


class MixtureSampler(torch.utils.data.Sampler):
    """An infinite stream of Mixture indices: pick a dataset by weight, then a frame uniformly.

    The global stream is a pure function of (seed, position): block b of BLOCK draws comes from a
    generator seeded with (seed, b), so every rank computes the same stream, and rank r takes
    positions start + r, start + r + world_size, ... (equal counts per rank). Resuming is setting
    `start` to the number of global samples already consumed."""
    BLOCK = 4096

    def __init__(self, sizes, weights=None, *, seed=0, rank=0, world_size=1, start=0):
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        w = np.asarray(self.sizes if weights is None else weights, np.float64)
        self.weights = w / w.sum()
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")

    def block(self, b):
        """Global draws [b * BLOCK, (b + 1) * BLOCK) as (dataset ids, flat indices)."""
        rng = np.random.default_rng([self.seed, b])
        d = rng.choice(len(self.weights), size=self.BLOCK, p=self.weights)
        frame = (rng.random(self.BLOCK) * self.sizes[d]).astype(np.int64)     # uniform in [0, size)
        return d, self.offsets[d] + frame

    def global_stream(self, start, count):
        """Flat indices of global positions [start, start + count), the same on every rank."""
        first, last = start // self.BLOCK, (start + count - 1) // self.BLOCK
        flat = np.concatenate([self.block(b)[1] for b in range(first, last + 1)])
        return flat[start - first * self.BLOCK:][:count]

    def __iter__(self):
        pos = self.start + self.rank
        while True:
            b = pos // self.BLOCK
            flat = self.block(b)[1]
            while pos // self.BLOCK == b:
                yield int(flat[pos - b * self.BLOCK])
                pos += self.world_size


def _seed_worker(worker_id):
    # each worker's torch seed is base_seed + worker_id; derive numpy's from it, for augmentations
    np.random.seed(torch.initial_seed() % 2**32)


class Loader:
    """Infinite batches of the batch dict for one DDP rank, with a resumable position.

    `position` counts global samples consumed by the training loop (all ranks together), counted
    when a batch is handed out, not when workers prefetch it; save state_dict() in the checkpoint
    and load_state_dict() it to continue the exact stream (even with another number of workers)."""

    def __init__(self, mixture, batch_size, *, seed=0, rank=0, world_size=1, num_workers=2,
                 pin_memory=False):
        self.batch_size, self.world_size, self.position = batch_size, world_size, 0
        self.sampler = MixtureSampler(mixture.sizes, mixture.weights, seed=seed, rank=rank,
                                      world_size=world_size)
        self.loader = torch.utils.data.DataLoader(
            mixture, batch_size=batch_size, sampler=self.sampler, collate_fn=collate,
            num_workers=num_workers, drop_last=True, pin_memory=pin_memory, worker_init_fn=_seed_worker,
            # seeds the workers (per rank) for any randomness in transforms; indices come from the sampler
            generator=torch.Generator().manual_seed((seed << 16) + rank))

    def __iter__(self):
        self.sampler.start = self.position
        for batch in self.loader:
            self.position += self.batch_size * self.world_size
            yield batch

    def state_dict(self):
        return {"position": self.position, "seed": self.sampler.seed}

    def load_state_dict(self, state):
        if state["seed"] != self.sampler.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, "
                             f"this loader has seed {self.sampler.seed}")
        self.position = int(state["position"])


# ----------------------------------------------------------------------------------------------
# Command line: info and stats


def main(argv=None):
    parser = argparse.ArgumentParser(description="Inspect a robot dataset or compute its norm stats.")
    parser.add_argument("command", choices=["info", "stats"])
    parser.add_argument("dataset", help="LeRobot dataset directory, or HDF5 episode file / directory")
    parser.add_argument("--out", default="norm_stats.json", help="stats: where to write norm_stats.json")
    parser.add_argument("--chunk-size", type=int, default=50, help="action chunk (used with --delta-mask)")
    parser.add_argument("--delta-mask", default=None, help="e.g. 6,-1,6,-1: stats of delta actions")
    parser.add_argument("--openpi-config", default=None, metavar="NAME",
                        help="stats of what openpi config NAME trains on (robots.py: its repack, robot transforms, "
                             "deltas), exactly what train.py --openpi-config normalizes")
    parser.add_argument("--prompt", default=None, help="HDF5: prompt for files without a 'prompt' attribute")
    parser.add_argument("--fps", type=float, default=None, help="HDF5: fps for files without an 'fps' attr")
    parser.add_argument("--state-key", default="observation.state", help="LeRobot only: the state feature")
    parser.add_argument("--action-key", default="action", help="LeRobot only: the action feature")
    args = parser.parse_args(argv)

    is_lerobot = (Path(args.dataset) / "meta" / "info.json").exists()
    kwargs = dict(state_key=args.state_key, action_key=args.action_key) if is_lerobot else \
        dict(prompt=args.prompt, fps=args.fps)
    mask = make_bool_mask(*[int(d) for d in args.delta_mask.split(",")]) if args.delta_mask else None
    if args.openpi_config:
        import robots
        c = robots.openpi_config(args.openpi_config)
        dataset = robots.open_robot_dataset(args.dataset, args.openpi_config, c.action_horizon or args.chunk_size)
        given, mask = mask, robots.policy_settings(args.openpi_config, False)["delta_mask"]
        if given is not None and list(given) != mask:
            raise ValueError(f"--delta-mask {args.delta_mask} disagrees with {args.openpi_config}'s {mask}")
    else:
        dataset = open_dataset(args.dataset, args.chunk_size, **kwargs)
    if args.command == "info":
        for k, v in dataset.describe().items():
            print(f"{k:>9}: {json.dumps(v, indent=2) if isinstance(v, dict) else v}")
        return
    stats = compute_norm_stats(dataset, delta_mask=mask)
    save_norm_stats(stats, args.out, delta_mask=None if mask is None else np.asarray(mask).tolist())
    print(f"wrote {args.out}: state {len(stats['state']['mean'])} dims, actions "
          f"{len(stats['actions']['mean'])} dims, {len(dataset)} frames, {dataset.num_episodes} episodes")


if __name__ == "__main__":
    main(sys.argv[1:])
