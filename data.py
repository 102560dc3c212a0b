"""Robot data for pi0 / pi0.5 / pi0-FAST: episode readers, openpi's transforms, norm stats, mixtures.

What flows through this file:

    LeRobotDataset (v2.1 / v3.0) or HDF5Dataset (ALOHA layout)
        dataset[i] -> raw sample: {"images": {camera: uint8 (H, W, 3)}, "state": (S,),
                                   "actions": (C, A) chunk, "action_is_pad": (C,), "prompt": str, ...}
    Transforms (one per dataset: its cameras, its norm stats, the model's prompt function)
        -> model sample: images (V, 3, H, W) in [-1, 1], image_masks, state, tokens, actions, masks
    Mixture + MixtureSampler + Loader (weighted co-training, DDP sharding, resumable position)
        -> collate -> the batch dict of DESIGN.md (torch tensors, leading axis B)

Action chunks follow LeRobot's `delta_timestamps` as openpi uses them: the chunk of frame t is
the actions of frames t, t+1, ..., t+C-1 of the same episode; steps past the episode end repeat
the last action and are marked in `action_is_pad`. The transforms are openpi's (`transforms.py`,
`shared/normalize.py`, `openpi_client/image_tools.py`), rewritten as plain numpy functions.

HDF5 layout (ALOHA, plus two optional root attributes of ours):
    /observations/qpos (T, S)   /observations/images/<camera> (T, H, W, 3) uint8   /action (T, A)
    attrs["prompt"] = "the task"   attrs["fps"] = 50

Command line:
    python data.py info  <dataset>                             # features, fps, episodes, cameras
    python data.py stats <dataset> --out norm_stats.json       # openpi's norm_stats.json format

pyarrow (parquet) and av (mp4) are needed for LeRobot datasets only: pip install pyarrow av.

Axis legend: B batch, V views, N frames in a dataset, T frames in an episode, C chunk (action
horizon), S state dim, A action dim, L prompt tokens, H/W image height/width.
"""

import argparse
import functools
import importlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


def _require(module, pip_name):
    """Import an optional extra, or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"reading LeRobot datasets needs '{pip_name}': pip install {pip_name}") from e


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

    openpi slices the stats to the data's width; we insist they agree, because stats of another
    width almost always mean stats of another robot."""
    keys = ("q01", "q99") if use_quantiles else ("mean", "std")
    for k in keys:
        if k not in stats:
            raise KeyError(f"norm stats for '{name}' have no '{k}' (have {sorted(stats)})")
        if len(stats[k]) != x.shape[-1]:
            raise ValueError(f"norm stats for '{name}' have {len(stats[k])} dims "
                             f"but the data has {x.shape[-1]}")
    if use_quantiles:
        q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        return ((x - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0).astype(np.float32)
    return ((x - np.asarray(stats["mean"])) / (np.asarray(stats["std"]) + 1e-6)).astype(np.float32)


def unnormalize(x, stats, use_quantiles):
    """The inverse of normalize, on model outputs that may be wider than the stats (padded dims):
    openpi pads z-score stats with mean 0 / std 1 and lets quantile-extra dims pass through."""
    x = np.asarray(x, np.float32).copy()
    if use_quantiles:
        q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        d = len(q01)
        x[..., :d] = (x[..., :d] + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01
        return x
    pad = (0, x.shape[-1] - len(stats["mean"]))
    mean, std = np.pad(stats["mean"], pad), np.pad(stats["std"], pad, constant_values=1.0)
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
# Episode readers


class EpisodeFrames:
    """What both readers share: per-frame state and actions in memory (N rows, episodes stored
    contiguously), episode bounds, and the action chunk of a frame.

    Subclasses set: fps, chunk_size, action_fps, cameras, state (N, S), actions (N, A),
    ep_start / ep_end (E,) row bounds [start, end), row_episode (N,) episode position per row."""

    def __len__(self):
        return len(self.state)

    @property
    def num_episodes(self):
        return len(self.ep_start)

    def action_chunks(self, rows):
        """rows (n,) -> actions (n, C, A), action_is_pad (n, C).

        Step k is k / action_fps seconds ahead, i.e. k * fps / action_fps frames. At the
        dataset's own rate these are whole frames (LeRobot's behaviour exactly); at another rate
        the actions are linearly interpolated between the two nearest frames."""
        rows = np.asarray(rows)
        steps = np.arange(self.chunk_size) * (self.fps / (self.action_fps or self.fps))
        ep = self.row_episode[rows]
        first, last = self.ep_start[ep][:, None], self.ep_end[ep][:, None] - 1
        pos = rows[:, None] + steps[None, :]                               # (n, C) frame positions
        is_pad = pos > last + 1e-6                                         # past the episode end
        pos = np.clip(pos, first, last)                                    # repeat the last action
        lo = np.floor(pos + 1e-6).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        w = np.clip(pos - lo, 0.0, 1.0)[..., None].astype(np.float32)       # 0 at whole frames
        return self.actions[lo] * (1.0 - w) + self.actions[hi] * w, is_pad

    def _chunk(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        actions, is_pad = self.action_chunks(np.array([i]))
        return actions[0], is_pad[0]

    def _set_episodes(self, lengths):
        lengths = np.asarray(lengths, np.int64)
        self.ep_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.ep_end = self.ep_start + lengths
        self.row_episode = np.repeat(np.arange(len(lengths)), lengths)

    def _check_finite(self, arr, name, files, row_file):
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{files[row_file[row]]}: field '{name}' has NaN/inf (dataset row {row})")


def decode_video_frame(path, timestamp, tolerance_s=1e-4):
    """The frame of an mp4 (AV1, H.264, ...) shown at `timestamp` seconds, as uint8 (H, W, 3).

    Seek to the keyframe before the timestamp and decode forward; the frame whose presentation
    time matches within tolerance_s is the answer (what LeRobot's decoders do). Opening the file
    per call costs about a millisecond and keeps DataLoader workers free of shared decoder state."""
    av = _require("av", "av")
    best, best_dt = None, float("inf")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(int(timestamp / stream.time_base), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base)
                if abs(t - timestamp) < best_dt:
                    best, best_dt = frame, abs(t - timestamp)
                if t > timestamp + tolerance_s:
                    break
            image = None if best is None else best.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError, IndexError) as e:
        raise ValueError(f"{path}: cannot decode the frame at t={timestamp:.4f}s ({e})") from e
    if best is None or best_dt > tolerance_s:
        near = "no frames there" if best is None else f"nearest is {best_dt:.4f}s away"
        raise ValueError(f"{path}: no video frame within {tolerance_s}s of t={timestamp:.4f}s ({near}): "
                         "a truncated video, or info.json fps / timestamps that disagree with it")
    return image


def _read_parquet(path, columns):
    """Read some columns of a parquet file; a missing column names the file and the column."""
    pq = _require("pyarrow.parquet", "pyarrow")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: file listed by the dataset's metadata does not exist")
    names = pq.read_schema(path).names
    for c in columns:
        if c not in names:
            raise KeyError(f"{path}: missing column '{c}' (columns: {names})")
    return pq.read_table(path, columns=list(columns))


def _column_to_numpy(table, key, path):
    """A scalar or fixed-length-list parquet column -> numpy (N,) or (N, D)."""
    pa = _require("pyarrow", "pyarrow")
    col = table.column(key).combine_chunks()
    if isinstance(col, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if len(col) and len(flat) % len(col):
            raise ValueError(f"{path}: column '{key}' has rows of different lengths")
        return flat.reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False)


@functools.lru_cache(maxsize=None)
def _row_group_starts(path):
    md = _require("pyarrow.parquet", "pyarrow").ParquetFile(path).metadata
    return np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])


@functools.lru_cache(maxsize=16)
def _read_row_group(path, group, column):
    # Image columns are big, so they stay on disk; a small cache makes neighbouring rows cheap.
    pq = _require("pyarrow.parquet", "pyarrow")
    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)


def _read_image_cell(path, row, column):
    """The PNG/JPEG of one row of an image column (a struct of bytes and path), as uint8 (H, W, 3)."""
    starts = _row_group_starts(str(path))
    group = int(np.searchsorted(starts, row, side="right") - 1)
    cell = _read_row_group(str(path), group, column)[row - starts[group]].as_py()
    if not cell or not cell.get("bytes"):
        raise ValueError(f"{path}: column '{column}' row {row} holds no image bytes")
    try:
        return np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: column '{column}' row {row} is not a readable image ({e})") from e


class LeRobotDataset(EpisodeFrames):
    """A LeRobot dataset on disk, format v2.x (one parquet + one mp4 per episode) or v3.0 (episodes
    packed into shared files, located through meta/episodes/*.parquet).

    State and actions of every frame are read into memory at construction (and validated: columns,
    widths, NaN, timestamps against fps); camera frames are decoded per sample."""

    def __init__(self, root, chunk_size=50, *, state_key="observation.state", action_key="action",
                 cameras=None, action_fps=None, tolerance_s=1e-4):
        self.root, self.chunk_size, self.action_fps = Path(root), chunk_size, action_fps
        self.state_key, self.action_key, self.tolerance_s = state_key, action_key, tolerance_s
        info_path = self.root / "meta" / "info.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path}: not a LeRobot dataset (no meta/info.json)")
        self.info = json.loads(info_path.read_text())
        self.version = self.info.get("codebase_version", "?")
        if not self.version.startswith(("v2", "v3")):
            raise ValueError(f"{info_path}: codebase_version {self.version}; v2.x and v3.0 are supported")
        feats = self.info["features"]
        for key in (state_key, action_key):
            if key not in feats:
                raise KeyError(f"{info_path}: no feature '{key}' (features: {list(feats)})")
        self.fps = float(self.info["fps"])
        all_cams = [k for k, f in feats.items() if f["dtype"] in ("video", "image")]
        self.cameras = all_cams if cameras is None else list(cameras)
        for cam in self.cameras:
            if cam not in all_cams:
                raise KeyError(f"{info_path}: no camera '{cam}' (cameras: {all_cams})")
        self.is_video = {cam: feats[cam]["dtype"] == "video" for cam in self.cameras}
        _require("pyarrow.parquet", "pyarrow")                     # fail early, with the pip command
        if any(self.is_video.values()):
            _require("av", "av")
        self.tasks, episodes = self._read_meta_v2() if self.version.startswith("v2") else self._read_meta_v3()
        self.episode_index = np.array([e["episode_index"] for e in episodes])
        self.video = {cam: [(e["video"][cam], e["video_from"][cam]) for e in episodes]
                      for cam in self.cameras if self.is_video[cam]}
        missing = [p for files in self.video.values() for p, _ in files if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: video listed by the metadata is missing "
                                    f"({len(missing)} missing in all)")
        self._read_frames(episodes, info_path)

    # -- metadata --------------------------------------------------------------------------------
    def _read_meta_v2(self):
        meta = self.root / "meta"
        read_jsonl = lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        tasks = {t["task_index"]: t["task"] for t in read_jsonl(meta / "tasks.jsonl")}
        episodes = []
        for e in sorted(read_jsonl(meta / "episodes.jsonl"), key=lambda e: e["episode_index"]):
            i = e["episode_index"]
            chunk = i // self.info["chunks_size"]
            episodes.append(dict(
                episode_index=i, length=e["length"],
                data=self.root / self.info["data_path"].format(episode_chunk=chunk, episode_index=i),
                video={c: self.root / self.info["video_path"].format(episode_chunk=chunk, video_key=c,
                                                                    episode_index=i)
                       for c in self.cameras if self.is_video[c]},
                video_from={c: 0.0 for c in self.cameras}))
        return tasks, episodes

    def _read_meta_v3(self):
        meta = self.root / "meta"
        t = _read_parquet(meta / "tasks.parquet", ["task_index", "task"])
        tasks = dict(zip(t.column("task_index").to_pylist(), t.column("task").to_pylist()))
        vcams = [c for c in self.cameras if self.is_video[c]]
        cols = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        cols += [f"videos/{c}/{k}" for c in vcams for k in ("chunk_index", "file_index", "from_timestamp")]
        files = sorted((meta / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{meta / 'episodes'}: no episode metadata files")
        rows = [r for f in files for r in _read_parquet(f, cols).to_pylist()]
        episodes = []
        for r in sorted(rows, key=lambda r: r["episode_index"]):
            video = {c: self.root / self.info["video_path"].format(
                video_key=c, chunk_index=r[f"videos/{c}/chunk_index"],
                file_index=r[f"videos/{c}/file_index"]) for c in vcams}
            episodes.append(dict(
                episode_index=r["episode_index"], length=r["length"],
                data=self.root / self.info["data_path"].format(chunk_index=r["data/chunk_index"],
                                                              file_index=r["data/file_index"]),
                video=video, video_from={c: r[f"videos/{c}/from_timestamp"] for c in vcams}))
        return tasks, episodes

    # -- frames ----------------------------------------------------------------------------------
    def _read_frames(self, episodes, info_path):
        """Read the small columns of every data file, in episode order, and check them."""
        keys = [self.state_key, self.action_key, "timestamp", "frame_index", "episode_index", "index",
                "task_index"]
        image_cams = [c for c in self.cameras if not self.is_video[c]]
        self.files = list(dict.fromkeys(e["data"] for e in episodes))    # unique, in episode order
        feats, cols, row_file, row_in_file = self.info["features"], {k: [] for k in keys}, [], []
        for f, path in enumerate(self.files):
            table = _read_parquet(path, keys + image_cams)
            for k in keys:
                cols[k].append(_column_to_numpy(table, k, path).reshape(table.num_rows, -1))
                width = int(np.prod(feats.get(k, {"shape": [1]})["shape"]))
                if cols[k][-1].shape[1] != width:
                    raise ValueError(f"{path}: column '{k}' has {cols[k][-1].shape[1]} dims, "
                                     f"{info_path} says {width}")
            row_file.append(np.full(table.num_rows, f))
            row_in_file.append(np.arange(table.num_rows))
        cols = {k: np.concatenate(v) for k, v in cols.items()}
        self.row_file, self.row_in_file = np.concatenate(row_file), np.concatenate(row_in_file)
        file_of = lambda row: self.files[self.row_file[row]]

        # episodes must be stored contiguously, in order, with the lengths the metadata gives
        lengths = np.array([e["length"] for e in episodes])
        expect, got = np.repeat(self.episode_index, lengths), cols["episode_index"][:, 0]
        if len(expect) != len(got):
            raise ValueError(f"{self.root / 'meta'}: episode lengths sum to {len(expect)} frames, "
                             f"the data files hold {len(got)}")
        if (expect != got).any():
            row = int(np.argmax(expect != got))
            raise ValueError(f"{file_of(row)}: column 'episode_index' disagrees with the episode lengths "
                             f"in {self.root / 'meta'} (at dataset row {row})")
        self._set_episodes(lengths)
        self.state = cols[self.state_key].astype(np.float32)
        self.actions = cols[self.action_key].astype(np.float32)
        self._check_finite(self.state, self.state_key, self.files, self.row_file)
        self._check_finite(self.actions, self.action_key, self.files, self.row_file)
        cols = {k: v[:, 0] for k, v in cols.items() if k not in (self.state_key, self.action_key)}
        self.timestamp, self.frame_index = cols["timestamp"].astype(np.float64), cols["frame_index"]
        self.index, self.task_index = cols["index"], cols["task_index"]

        # timestamps are frame_index / fps; a wrong fps in info.json breaks video lookups silently
        tolerance = max(self.tolerance_s, 1e-3 / self.fps)
        bad = np.abs(self.timestamp - self.frame_index / self.fps) > tolerance
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{info_path}: field 'fps' = {self.info['fps']} disagrees with column "
                             f"'timestamp' of {file_of(row)} (frame_index {self.frame_index[row]} "
                             f"at {self.timestamp[row]:.4f}s)")
        unknown = set(np.unique(self.task_index).tolist()) - set(self.tasks)
        if unknown:
            raise KeyError(f"{self.root / 'meta'}: tasks table lacks task_index {sorted(unknown)}")

    def __getitem__(self, i):
        i = int(i)
        actions, is_pad = self._chunk(i)
        ep, images = self.row_episode[i], {}
        for cam in self.cameras:
            if self.is_video[cam]:
                path, start = self.video[cam][ep]
                # v3.0 packs episodes into one mp4: the episode starts `from_timestamp` into it
                images[cam] = decode_video_frame(path, start + self.timestamp[i], self.tolerance_s)
            else:
                images[cam] = _read_image_cell(self.files[self.row_file[i]], int(self.row_in_file[i]), cam)
        return dict(images=images, state=self.state[i], actions=actions, action_is_pad=is_pad,
                    prompt=self.tasks[int(self.task_index[i])], episode_index=int(self.episode_index[ep]),
                    frame_index=int(self.frame_index[i]), index=int(self.index[i]),
                    timestamp=float(self.timestamp[i]), task_index=int(self.task_index[i]))

    @property
    def meta_stats(self):
        """LeRobot's own stats (meta/stats.json; for v2.1 the per-episode stats aggregated the
        way LeRobot does). Informational: training uses compute_norm_stats."""
        stats_path = self.root / "meta" / "stats.json"
        if stats_path.exists():
            raw = json.loads(stats_path.read_text())
            return {k: {s: np.asarray(v) for s, v in d.items()} for k, d in raw.items()}
        per_ep = self.root / "meta" / "episodes_stats.jsonl"
        if not per_ep.exists():
            return {}
        eps = [json.loads(line)["stats"] for line in per_ep.read_text().splitlines() if line.strip()]
        out = {}
        for key in eps[0]:
            s = [{k: np.asarray(v, np.float64) for k, v in e[key].items()} for e in eps]
            n = np.array([e["count"] for e in s])                        # (E, 1)
            w = (n / n.sum()).reshape(-1, *[1] * s[0]["mean"].ndim)
            mean = sum(wi * e["mean"] for wi, e in zip(w, s))
            var = sum(wi * (e["std"] ** 2 + (e["mean"] - mean) ** 2) for wi, e in zip(w, s))
            out[key] = dict(min=np.min([e["min"] for e in s], 0), max=np.max([e["max"] for e in s], 0),
                            mean=mean, std=np.sqrt(var), count=n.sum(0))
        return out

    def describe(self):
        feats = self.info["features"]
        return dict(format=f"LeRobot {self.version}", root=str(self.root), fps=self.fps,
                    episodes=self.num_episodes, frames=len(self), tasks=sorted(set(self.tasks.values())),
                    cameras={c: f"{feats[c]['dtype']} {feats[c]['shape']}" for c in self.cameras},
                    features={k: f"{f['dtype']} {f['shape']}" for k, f in feats.items()},
                    state=self.state_key, actions=self.action_key)


def write_hdf5_episode(path, state, actions, images, *, prompt=None, fps=None):
    """Write one ALOHA-layout episode: state (T, S), actions (T, A), images {camera: (T, H, W, 3)
    uint8}. The prompt and fps go into root attributes (`prompt`, `fps`), which HDF5Dataset reads
    before falling back to its arguments. Used by the tests and by sim.py's demo recorder."""
    state, actions = np.asarray(state, np.float32), np.asarray(actions, np.float32)
    if len(state) != len(actions):
        raise ValueError(f"state has {len(state)} frames but actions {len(actions)}")
    with h5py.File(path, "w") as f:
        f.create_dataset("observations/qpos", data=state)
        f.create_dataset("action", data=actions)
        for cam, frames in images.items():
            frames = np.asarray(frames, np.uint8)
            if frames.shape[0] != len(state) or frames.ndim != 4:
                raise ValueError(f"camera '{cam}': shape {frames.shape}, expected ({len(state)}, H, W, 3)")
            # one chunk per frame: a sample reads one frame without touching the rest
            f.create_dataset(f"observations/images/{cam}", data=frames, chunks=(1, *frames.shape[1:]))
        if prompt is not None:
            f.attrs["prompt"] = prompt
        if fps is not None:
            f.attrs["fps"] = fps


def _read_hdf5_episode(path):
    """State, actions, camera shapes and root attributes of one ALOHA-layout file, checked."""
    with h5py.File(path, "r") as f:
        for key in ("observations/qpos", "action", "observations/images"):
            if key not in f:
                raise KeyError(f"{path}: missing dataset '/{key}' (ALOHA layout)")
        state, actions = f["observations/qpos"][()], f["action"][()]
        if len(state) != len(actions) or state.ndim != 2 or actions.ndim != 2:
            raise ValueError(f"{path}: '/observations/qpos' {state.shape} and '/action' {actions.shape} "
                             "must be (T, S) and (T, A) with the same T")
        shapes = {c: f[f"observations/images/{c}"].shape for c in f["observations/images"]}
        for c, shape in shapes.items():
            if len(shape) != 4 or shape[0] != len(state):
                raise ValueError(f"{path}: '/observations/images/{c}' has shape {shape}, expected "
                                 f"({len(state)}, H, W, 3) (compressed images are not supported)")
        attrs = {k: f.attrs[k] for k in ("prompt", "fps") if k in f.attrs}
    if isinstance(attrs.get("prompt"), bytes):
        attrs["prompt"] = attrs["prompt"].decode()
    return state.astype(np.float32), actions.astype(np.float32), shapes, attrs


class HDF5Dataset(EpisodeFrames):
    """ALOHA-style HDF5 episodes (one file per episode): a directory, a file, or a list of files.

    The prompt and fps come from the file's root attributes when present, else from the
    arguments; if neither gives one, it is an error (no silent default)."""

    def __init__(self, paths, chunk_size=50, *, prompt=None, fps=None, action_fps=None, cameras=None):
        if isinstance(paths, (str, Path)):
            p = Path(paths)
            paths = sorted([*p.glob("*.hdf5"), *p.glob("*.h5")]) if p.is_dir() else [p]
        self.files = [Path(p) for p in paths]
        if not self.files:
            raise FileNotFoundError("no HDF5 episodes given (a folder of *.hdf5 / *.h5, a file or a list)")
        self.chunk_size, self.action_fps = chunk_size, action_fps
        episodes = [_read_hdf5_episode(path) for path in self.files]
        self.prompts, all_fps = [], set()
        for path, (_, _, shapes, attrs) in zip(self.files, episodes):
            if set(shapes) != set(episodes[0][2]):
                raise KeyError(f"{path}: cameras {sorted(shapes)} differ from {sorted(episodes[0][2])} "
                               f"in {self.files[0]}")
            if "prompt" not in attrs and prompt is None:
                raise ValueError(f"{path}: no prompt: store root attribute 'prompt' or pass prompt=")
            self.prompts.append(str(attrs.get("prompt", prompt)))
            if attrs.get("fps", fps) is None:
                raise ValueError(f"{path}: no fps: store root attribute 'fps' or pass fps= (ALOHA: 50)")
            all_fps.add(float(attrs.get("fps", fps)))
        if len(all_fps) > 1:
            raise ValueError(f"{self.files[0].parent}: episodes disagree on fps: {sorted(all_fps)}")
        self.fps = all_fps.pop()
        self.image_shapes = {c: shape[1:] for c, shape in episodes[0][2].items()}
        self.cameras = sorted(self.image_shapes) if cameras is None else list(cameras)
        for cam in self.cameras:
            if cam not in self.image_shapes:
                raise KeyError(f"{self.files[0]}: no camera '{cam}' (cameras: {sorted(self.image_shapes)})")
        self.tasks = list(dict.fromkeys(self.prompts))
        self.state = np.concatenate([e[0] for e in episodes])
        self.actions = np.concatenate([e[1] for e in episodes])
        self._set_episodes([len(e[0]) for e in episodes])
        self._check_finite(self.state, "/observations/qpos", self.files, self.row_episode)
        self._check_finite(self.actions, "/action", self.files, self.row_episode)

    def __getitem__(self, i):
        i = int(i)
        actions, is_pad = self._chunk(i)
        ep = int(self.row_episode[i])
        t = i - int(self.ep_start[ep])
        # opened per sample: h5py handles must not be shared across forked DataLoader workers
        with h5py.File(self.files[ep], "r") as f:
            images = {cam: f[f"observations/images/{cam}"][t] for cam in self.cameras}
        return dict(images=images, state=self.state[i], actions=actions, action_is_pad=is_pad,
                    prompt=self.prompts[ep], episode_index=ep, frame_index=t, index=i,
                    timestamp=t / self.fps, task_index=self.tasks.index(self.prompts[ep]))

    def describe(self):
        return dict(format="HDF5 (ALOHA layout)", files=len(self.files), fps=self.fps,
                    episodes=self.num_episodes, frames=len(self), tasks=self.tasks,
                    cameras={c: str(self.image_shapes[c]) for c in self.cameras},
                    state=self.state.shape[1], actions=self.actions.shape[1])


def open_dataset(path, chunk_size=50, **kwargs):
    """A LeRobot directory (has meta/info.json) or HDF5 episodes (a .hdf5 / .h5 file or a folder)."""
    p = Path(path)
    if (p / "meta" / "info.json").exists():
        return LeRobotDataset(p, chunk_size, **kwargs)
    if p.suffix in (".hdf5", ".h5") or (p.is_dir() and any([*p.glob("*.hdf5"), *p.glob("*.h5")])):
        return HDF5Dataset(p, chunk_size, **kwargs)
    raise FileNotFoundError(f"{p}: neither a LeRobot dataset (meta/info.json) nor HDF5 episodes")


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
    return {k: s.result() for k, s in stats.items()}


def save_norm_stats(stats, path):
    """Write openpi's norm_stats.json atomically (temporary file, then rename)."""
    out = {"norm_stats": {k: {s: np.asarray(v, np.float64).tolist() for s, v in d.items()}
                          for k, d in stats.items()}}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)


def load_norm_stats(path):
    """openpi's norm_stats.json -> {"state": {"mean": array, ...}, "actions": {...}}."""
    raw = json.loads(Path(path).read_text())
    if "norm_stats" not in raw:
        raise KeyError(f"{path}: no top-level 'norm_stats' key (openpi's norm_stats.json format)")
    return {k: {s: np.asarray(v, np.float32) for s, v in d.items()} for k, d in raw["norm_stats"].items()}


# ----------------------------------------------------------------------------------------------
# Model inputs: raw sample -> the model's per-example dict, and collation into the batch dict


@dataclass
class Transforms:
    """openpi's training transforms in their order: delta actions -> normalize -> resize images,
    tokenize the prompt, pad state and actions to the model width.

    One per dataset: `cameras` maps the model's views, in order, to this dataset's camera keys
    (None where the dataset has no such camera: that view is masked out, not shown as black)."""
    tokenize: Callable  # the model's prompt function: (prompt, state) -> (ids, mask)
    cameras: Sequence   # this dataset's camera key (or None) for each model view
    norm_stats: object = None           # stats dict, or the path of a (possibly shared) norm_stats.json
    use_quantiles: bool = False         # openpi: z-score for pi0, quantiles for pi0.5 and pi0-FAST
    delta_mask: Sequence | None = None  # e.g. make_bool_mask(6, -1, 6, -1) for ALOHA; None: absolute
    state_dim: int | None = 32          # model width to pad to; None: no padding (pi0-FAST)
    action_dim: int | None = 32
    image_size: int = 224

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
            image = resize_with_pad(sample["images"][cam], self.image_size, self.image_size)
            views.append(image_to_float(image))
            masks.append(True)
        raw_state = np.asarray(sample["state"], np.float32)
        state = self._normalize(raw_state, "state")
        # pi0.5 puts the normalized, unpadded state into its prompt; pi0 ignores it
        tokens, token_masks = self.tokenize(sample["prompt"], state)
        out = dict(images=np.stack(views), image_masks=np.array(masks),
                   state=pad_last(state, self.state_dim)[0] if self.state_dim else state,
                   tokens=np.asarray(tokens, np.int64), token_masks=np.asarray(token_masks, bool))
        if "actions" in sample:                                            # absent at inference
            actions = np.asarray(sample["actions"], np.float32)
            if self.delta_mask is not None:
                actions = delta_actions(actions, raw_state, self.delta_mask)
            actions = self._normalize(actions, "actions")
            width = self.action_dim or actions.shape[-1]
            actions, dim_mask = pad_last(actions, width)
            step_mask = ~np.asarray(sample.get("action_is_pad", np.zeros(len(actions), bool)))
            out.update(actions=actions, action_masks=step_mask[:, None] & dim_mask[None, :])
        return out


def collate(samples):
    """List of model samples -> the batch dict of DESIGN.md (torch tensors, leading axis B)."""
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
    parser.add_argument("--prompt", default=None, help="HDF5: prompt for files without a 'prompt' attribute")
    parser.add_argument("--fps", type=float, default=None, help="HDF5: fps for files without an 'fps' attr")
    parser.add_argument("--state-key", default="observation.state", help="LeRobot only: the state feature")
    parser.add_argument("--action-key", default="action", help="LeRobot only: the action feature")
    args = parser.parse_args(argv)

    is_lerobot = (Path(args.dataset) / "meta" / "info.json").exists()
    kwargs = dict(state_key=args.state_key, action_key=args.action_key) if is_lerobot else \
        dict(prompt=args.prompt, fps=args.fps)
    dataset = open_dataset(args.dataset, args.chunk_size, **kwargs)
    if args.command == "info":
        for k, v in dataset.describe().items():
            print(f"{k:>9}: {json.dumps(v, indent=2) if isinstance(v, dict) else v}")
        return
    mask = make_bool_mask(*[int(d) for d in args.delta_mask.split(",")]) if args.delta_mask else None
    stats = compute_norm_stats(dataset, delta_mask=mask)
    save_norm_stats(stats, args.out)
    print(f"wrote {args.out}: state {len(stats['state']['mean'])} dims, actions "
          f"{len(stats['actions']['mean'])} dims, {len(dataset)} frames, {dataset.num_episodes} episodes")


if __name__ == "__main__":
    main(sys.argv[1:])
