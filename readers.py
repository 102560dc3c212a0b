"""Robot episode readers: LeRobot datasets (v2.1 and v3.0) and ALOHA-layout HDF5 episodes.

Both readers turn a dataset on disk into the same thing: a flat list of N frames, episodes stored
one after the other, where item i is a raw sample

    dataset[i] = {"images": {camera: uint8 (height, width, 3)},  "state": float32 (S,),
                  "actions": float32 (C, A),  "action_is_pad": bool (C,),  "prompt": str,
                  "episode_index", "frame_index", "index", "task_index": int,  "timestamp": float}

data.py takes it from there (openpi's transforms, norm stats, mixtures, batches).

Action chunks follow LeRobot's `delta_timestamps` as openpi uses them (episodes.EpisodeFrames, which
both readers extend). State and actions of every frame are small, so they are read into memory once
(and validated); the images are big, so they are read per sample.

LeRobot on disk (meta/info.json says which version; its features name the columns):
    v2.1  data/chunk-000/episode_000000.parquet, videos/chunk-000/<camera>/episode_000000.mp4:
          one parquet (and one mp4 per video camera) per episode, chunks_size episodes per folder;
          meta/episodes.jsonl and meta/tasks.jsonl list episodes and tasks.
    v3.0  data/chunk-000/file-000.parquet, videos/<camera>/chunk-000/file-000.mp4: many episodes
          packed into each file; meta/episodes/chunk-*/file-*.parquet says which file holds an
          episode and at which `from_timestamp` its video starts; meta/tasks.parquet.
    A camera is a "video" feature (mp4, decoded with PyAV) or an "image" feature (PNG/JPEG bytes
    in a parquet column). pyarrow and av are needed for LeRobot only: pip install pyarrow av.

HDF5 layout (ALOHA, one file per episode, plus two optional root attributes of ours):
    /observations/qpos (X, S)   /observations/images/<camera> (X, height, width, 3) uint8   /action (X, A)
    attrs["prompt"] = "the task"   attrs["fps"] = 50

Errors name the file and the field (a missing column, NaN actions, an fps that disagrees with the
timestamps, a truncated video): bad data fails loudly here, not as a quietly worse policy.

Axis legend (paligemma.py's): X frames (of a dataset, or of one episode), E episodes, C chunk (action horizon),
S state dim, A action dim.
"""

import functools
import io
import json
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from episodes import EpisodeFrames, positive_fps, require


# ----------------------------------------------------------------------------------------------
# LeRobot: video frames, parquet columns, the dataset


def decode_video_frame(path, timestamp, tolerance_s=1e-4):
    """The frame of an mp4 (AV1, H.264, ...) shown at `timestamp` seconds, as uint8 (height, width, 3).

    Seek to the keyframe before the timestamp and decode forward; the frame whose presentation
    time matches within tolerance_s is the answer (what LeRobot's decoders do). Opening the file
    per call costs about a millisecond and keeps DataLoader workers free of shared decoder state."""
    av = require("av", "av")
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


def read_json(path):
    """A JSON file, or an error naming it and where it breaks."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path):
    """A JSON-lines file -> list of objects; a broken line is an error naming the file and line."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
    return out


def named_file_errors(path, kind, fn, *args):
    """fn(*args), a reader of `path`; a corrupt or truncated file becomes an error naming it."""
    try:
        return fn(*args)
    except (KeyError, FileNotFoundError):
        raise
    except Exception as e:  # pyarrow's ArrowInvalid, h5py's OSError, ...: say which file it was
        raise ValueError(f"{path}: not a readable {kind} file ({type(e).__name__}: {e})") from None


def _read_parquet(path, columns):
    """Read some columns of a parquet file; a missing column names the file and the column."""
    pq = require("pyarrow.parquet", "pyarrow")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: file listed by the dataset's metadata does not exist")
    names = named_file_errors(path, "parquet", pq.read_schema, path).names
    for c in columns:
        if c not in names:
            raise KeyError(f"{path}: missing column '{c}' (columns: {names})")
    return named_file_errors(path, "parquet", lambda: pq.read_table(path, columns=list(columns)))


def _column_to_numpy(table, key, path):
    """A scalar or fixed-length-list parquet column -> numpy (X,) or (X, D)."""
    pa = require("pyarrow", "pyarrow")
    col = table.column(key).combine_chunks()
    if isinstance(col, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if len(col) and len(flat) % len(col):
            raise ValueError(f"{path}: column '{key}' has rows of different lengths")
        return flat.reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False)


@functools.lru_cache(maxsize=None)
def _row_group_starts(path):
    md = named_file_errors(path, "parquet", require("pyarrow.parquet", "pyarrow").ParquetFile, path).metadata
    return np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])


@functools.lru_cache(maxsize=16)
def _read_row_group(path, group, column):
    # Image columns are big, so they stay on disk; a small cache makes neighbouring rows cheap.
    pq = require("pyarrow.parquet", "pyarrow")
    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0)


def _read_image_cell(path, row, column):
    """The PNG/JPEG of one row of an image column (a struct of bytes and path), as uint8 (height, width, 3)."""
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
        # the state may be several columns, concatenated in order (DROID: joint_position, gripper_position)
        self.state_keys = [state_key] if isinstance(state_key, str) else list(state_key)
        self.state_key, self.action_key, self.tolerance_s = "+".join(self.state_keys), action_key, tolerance_s
        info_path = self.root / "meta" / "info.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path}: not a LeRobot dataset (no meta/info.json)")
        self.info = read_json(info_path)
        self.version = self.info.get("codebase_version", "?")
        if not self.version.startswith(("v2", "v3")):
            raise ValueError(f"{info_path}: codebase_version {self.version}; v2.x and v3.0 are supported")
        if not isinstance(self.info.get("features"), dict):
            raise KeyError(f"{info_path}: no 'features' table (LeRobot's info.json lists every column there)")
        feats = self.info["features"]
        for key in (*self.state_keys, action_key):
            if key not in feats:
                raise KeyError(f"{info_path}: no feature '{key}' (features: {list(feats)})")
        self.fps = positive_fps(self.info.get("fps"), f"{info_path}: field 'fps'")
        all_cams = [k for k, f in feats.items() if f["dtype"] in ("video", "image")]
        self.cameras = all_cams if cameras is None else list(cameras)
        for cam in self.cameras:
            if cam not in all_cams:
                raise KeyError(f"{info_path}: no camera '{cam}' (cameras: {all_cams})")
        self.is_video = {cam: feats[cam]["dtype"] == "video" for cam in self.cameras}
        require("pyarrow.parquet", "pyarrow")                     # fail early, with the pip command
        if any(self.is_video.values()):
            require("av", "av")
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
        keys = [*self.state_keys, self.action_key, "timestamp", "frame_index", "episode_index", "index",
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
        self.state = np.concatenate([cols[k] for k in self.state_keys], axis=1).astype(np.float32)
        self.actions = cols[self.action_key].astype(np.float32)
        self._check_finite(self.state, self.state_key, self.files, self.row_file)
        self._check_finite(self.actions, self.action_key, self.files, self.row_file)
        cols = {k: v[:, 0] for k, v in cols.items() if k not in (*self.state_keys, self.action_key)}
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
        way LeRobot does). Informational: training uses data.compute_norm_stats."""
        stats_path = self.root / "meta" / "stats.json"
        if stats_path.exists():
            raw = read_json(stats_path)
            return {k: {s: np.asarray(v) for s, v in d.items()} for k, d in raw.items()}
        per_ep = self.root / "meta" / "episodes_stats.jsonl"
        if not per_ep.exists():
            return {}
        eps = [e["stats"] for e in read_jsonl(per_ep)]
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


# ----------------------------------------------------------------------------------------------
# HDF5 (ALOHA layout): the writer, the reader


def write_hdf5_episode(path, state, actions, images, *, prompt=None, fps=None, attrs=None):
    """Write one ALOHA-layout episode: state (X, S), actions (X, A), images {camera: (X, height, width, 3)
    uint8}. The prompt and fps go into root attributes (`prompt`, `fps`), which HDF5Dataset reads
    before falling back to its arguments; attrs: more root attributes (e.g. RECAP's `success`).
    Used by the tests and by sim.py's demo and rollout recorders."""
    state, actions = np.asarray(state, np.float32), np.asarray(actions, np.float32)
    if len(state) != len(actions):
        raise ValueError(f"state has {len(state)} frames but actions {len(actions)}")
    with h5py.File(path, "w") as f:
        f.create_dataset("observations/qpos", data=state)
        f.create_dataset("action", data=actions)
        for cam, frames in images.items():
            frames = np.asarray(frames, np.uint8)
            if frames.shape[0] != len(state) or frames.ndim != 4:
                raise ValueError(f"camera '{cam}': shape {frames.shape}, expected ({len(state)}, height, width, 3)")
            # one chunk per frame: a sample reads one frame without touching the rest
            f.create_dataset(f"observations/images/{cam}", data=frames, chunks=(1, *frames.shape[1:]))
        if prompt is not None:
            f.attrs["prompt"] = prompt
        if fps is not None:
            f.attrs["fps"] = fps
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def _read_hdf5_episode(path):
    """State, actions, camera shapes and root attributes of one ALOHA-layout file, checked."""
    with named_file_errors(path, "HDF5", h5py.File, path, "r") as f:
        for key in ("observations/qpos", "action", "observations/images"):
            if key not in f:
                raise KeyError(f"{path}: missing dataset '/{key}' (ALOHA layout)")
        state, actions = f["observations/qpos"][()], f["action"][()]
        if len(state) != len(actions) or state.ndim != 2 or actions.ndim != 2:
            raise ValueError(f"{path}: '/observations/qpos' {state.shape} and '/action' {actions.shape} "
                             "must be (X, S) and (X, A) with the same X")
        shapes = {c: f[f"observations/images/{c}"].shape for c in f["observations/images"]}
        for c, shape in shapes.items():
            if len(shape) != 4 or shape[0] != len(state):
                raise ValueError(f"{path}: '/observations/images/{c}' has shape {shape}, expected "
                                 f"({len(state)}, height, width, 3) (compressed images are not supported)")
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
        self.root = self.files[0].parent  # where norm_stats.json and tokenizer.model sit beside the episodes
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
            all_fps.add(positive_fps(attrs.get("fps", fps), f"{path}: fps"))
        if len(all_fps) > 1:
            raise ValueError(f"{self.files[0].parent}: episodes disagree on fps: {sorted(all_fps)}")
        self.fps = all_fps.pop()
        self.image_shapes = {c: shape[1:] for c, shape in episodes[0][2].items()}
        self.cameras = sorted(self.image_shapes) if cameras is None else list(cameras)
        for cam in self.cameras:
            if cam not in self.image_shapes:
                raise KeyError(f"{self.files[0]}: no camera '{cam}' (cameras: {sorted(self.image_shapes)})")
        self.tasks = list(dict.fromkeys(self.prompts))
        self.task_index = np.repeat([self.tasks.index(p) for p in self.prompts], [len(e[0]) for e in episodes])
        self.episode_index = np.arange(len(self.files))  # an HDF5 episode is named by its position
        for path, (state, actions, shapes, _) in zip(self.files, episodes):
            bad = {c: s for c, s in shapes.items() if s[1:] != self.image_shapes[c] or s[0] != len(state)}
            if bad:  # checked here, not when a frame is drawn mid-training
                raise ValueError(f"{path}: cameras {bad} differ from {self.files[0]}'s {self.image_shapes} "
                                 f"or from its {len(state)} frames")
            if state.shape[1:] != episodes[0][0].shape[1:] or actions.shape[1:] != episodes[0][1].shape[1:]:
                raise ValueError(f"{path}: state width {state.shape[1]} / action width {actions.shape[1]} differ "
                                 f"from {self.files[0]}'s {episodes[0][0].shape[1]} / {episodes[0][1].shape[1]}")
        if sum(len(e[0]) for e in episodes) == 0:
            raise ValueError(f"{self.files[0].parent}: every episode is empty (no frames)")
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


# ----------------------------------------------------------------------------------------------
# Either format, by what the path holds


def open_dataset(path, chunk_size=50, **kwargs):
    """A LeRobot directory (has meta/info.json) or HDF5 episodes (a .hdf5 / .h5 file or a folder)."""
    p = Path(path)
    if (p / "meta" / "info.json").exists():
        return LeRobotDataset(p, chunk_size, **kwargs)
    if p.suffix in (".hdf5", ".h5") or (p.is_dir() and any([*p.glob("*.hdf5"), *p.glob("*.h5")])):
        return HDF5Dataset(p, chunk_size, **kwargs)
    raise FileNotFoundError(f"{p}: neither a LeRobot dataset (meta/info.json) nor HDF5 episodes")
