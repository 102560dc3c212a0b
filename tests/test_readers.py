"""Tests for readers.py: parity with lerobot's own reader (fixtures written and read by the real
lerobot package), LeRobot datasets (v2.1 and v3.0) and HDF5 episodes written here (edge cases,
action-rate resampling), and bad input: errors name the file and the field."""

import importlib.util
import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import readers

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot"
HAVE_LEROBOT_DEPS = all(importlib.util.find_spec(m) for m in ("pyarrow", "av"))
needs_lerobot = pytest.mark.skipif(not HAVE_LEROBOT_DEPS,
                                   reason="LeRobot tests need the extras: pip install pyarrow av")

# Video tolerances, from tests/fixtures/lerobot/README.md. Against lerobot's decoded pixels: PyAV's
# rgb24 conversion reproduced them exactly there, but another FFmpeg build or YUV->RGB path may
# differ by 1-2 levels, so we allow 2. Against the pixels given to the encoder (AV1, crf 30): the
# README observed max 13 / mean 1.34 and says to allow about 16 / 2. Image columns are lossless.
DECODER_TOL = 2
CODEC_MAX_TOL, CODEC_MEAN_TOL = 16, 2.0


# ----------------------------------------------------------------------------------------------
# Parity with lerobot's reader on its own fixtures


def _expected_sample(x, j):
    n = len(x["query_indices"])
    return {k: x[k][j] for k in x.files if x[k].ndim and len(x[k]) == n and k != "query_indices"}


@needs_lerobot
@pytest.mark.parametrize("version", ["v21", "v30"])
def test_matches_lerobot_reader(version):
    root = FIXTURES / version
    x = np.load(root / "expected.npz")
    info = json.loads((root / "meta" / "info.json").read_text())
    feats = info["features"]
    assert np.all(np.diff(x["action_delta_indices"]) == 1) and x["action_delta_indices"][0] == 0
    # the chunked feature is the one with an `_is_pad`; the state is the other float vector feature
    action_key = next(k[:-len("_is_pad")] for k in x.files if k.endswith("_is_pad"))
    state_key = next(k for k, f in feats.items()
                     if f["dtype"].startswith("float") and k not in (action_key, "timestamp"))
    ds = readers.LeRobotDataset(root, chunk_size=len(x["action_delta_indices"]), state_key=state_key,
                             action_key=action_key)
    assert ds.fps == float(x["fps"]) == float(info["fps"]) and len(ds) == info["total_frames"]
    cameras = [k for k, f in feats.items() if f["dtype"] in ("video", "image")]
    assert sorted(ds.cameras) == sorted(cameras)
    for j, q in enumerate(x["query_indices"]):
        got, want = ds[q], _expected_sample(x, j)
        np.testing.assert_array_equal(got["state"], want[state_key], err_msg=f"state of item {q}")
        np.testing.assert_array_equal(got["actions"], want[action_key], err_msg=f"action chunk of item {q}")
        np.testing.assert_array_equal(got["action_is_pad"], want[f"{action_key}_is_pad"], err_msg=f"item {q}")
        assert got["prompt"] == want["task"]
        for key in ("frame_index", "episode_index", "index", "task_index"):
            assert got[key] == want[key], (key, q)
        assert abs(got["timestamp"] - want["timestamp"]) < 1e-6
        for cam in cameras:
            img = got["images"][cam].astype(np.int64)
            assert img.shape == tuple(feats[cam]["shape"]) and img.shape == want[cam].shape
            diff = np.abs(img - want[cam])
            tol = DECODER_TOL if feats[cam]["dtype"] == "video" else 0
            assert diff.max() <= tol, f"{cam} item {q}: max diff {diff.max()} vs lerobot"
            if f"source.{cam}" in x.files:
                src = np.abs(img - x[f"source.{cam}"][j])
                assert src.max() <= CODEC_MAX_TOL and src.mean() <= CODEC_MEAN_TOL, (cam, q, src.max())
    # LeRobot's own stats, as its reader exposes them (v2.1: aggregated from episodes_stats.jsonl)
    meta = ds.meta_stats
    for k in x.files:
        if k.startswith("stats."):
            key, stat = k[len("stats."):].rsplit(".", 1)
            np.testing.assert_allclose(meta[key][stat], x[k], rtol=1e-6, atol=1e-6, err_msg=k)


@needs_lerobot
def test_fixture_v21_and_v30_give_the_same_samples():
    a, b = readers.LeRobotDataset(FIXTURES / "v21", 7), readers.LeRobotDataset(FIXTURES / "v30", 7)
    assert len(a) == len(b) and a.cameras == b.cameras
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        for key in ("state", "actions", "action_is_pad", "prompt", "episode_index", "frame_index",
                    "task_index"):
            np.testing.assert_array_equal(sa[key], sb[key], err_msg=f"{key} of frame {i}")
        for cam in a.cameras:
            diff = np.abs(sa["images"][cam].astype(int) - sb["images"][cam])
            if a.is_video[cam]:  # two separate lossy encodes of the same pixels
                assert diff.max() <= CODEC_MAX_TOL and diff.mean() <= CODEC_MEAN_TOL
            else:
                assert diff.max() == 0


# ----------------------------------------------------------------------------------------------
# LeRobot datasets written here (v2.1 and v3.0): edge cases


def _pixels(e, t, h, w, salt=0):
    """A smooth image (codec friendly), different for every episode, frame and camera."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = 40 + 150 * xx / max(w - 1, 1)
    g = (30 + 9 * t + 20 * salt) % 200 + 25 * yy / max(h - 1, 1)
    b = np.full((h, w), 30 + 40 * e)
    return np.stack([r, g, b], -1).astype(np.uint8)


def make_episodes(lengths, cams, state_dim=3, action_dim=2, task_switch=True):
    """Episodes with values that tell episode and frame apart; episode 0 changes task halfway."""
    episodes = []
    for e, n in enumerate(lengths):
        t = np.arange(n, dtype=np.float32)[:, None]
        tasks = [f"task {e % 2}"] * n
        if task_switch and e == 0:
            tasks = ["pick the block"] * (n // 2) + ["place the block"] * (n - n // 2)
        episodes.append(dict(
            state=100 * e + t + np.arange(state_dim, dtype=np.float32) / 8,
            action=-(100 * e + t) - 0.5 - np.arange(action_dim, dtype=np.float32) / 16,
            images={c: np.stack([_pixels(e, i, h, w, k) for i in range(n)])
                    for k, (c, (h, w)) in enumerate(cams.items())},
            tasks=tasks))
    return episodes


def _write_video(path, frames, fps):
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=int(fps))
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt, s.options = "yuv420p", {"g": "2", "crf": "18"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_lerobot(root, version, episodes, fps, video_cams=(), episodes_per_file=2, chunks_size=2,
                  state_key="observation.state", action_key="action"):
    """A minimal LeRobot dataset in the layout lerobot writes (v2.1: a file per episode; v3.0:
    `episodes_per_file` episodes per data / video file, `chunks_size` files per chunk folder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = Path(root)
    (root / "meta").mkdir(parents=True)
    tasks = list(dict.fromkeys(t for ep in episodes for t in ep["tasks"]))
    cams = list(episodes[0]["images"])
    feats = {c: dict(dtype="video" if c in video_cams else "image",
                     shape=list(episodes[0]["images"][c].shape[1:]), names=["height", "width", "channels"])
             for c in cams}
    feats[state_key] = dict(dtype="float32", shape=[episodes[0]["state"].shape[1]], names=None)
    feats[action_key] = dict(dtype="float32", shape=[episodes[0]["action"].shape[1]], names=None)
    for k, dt in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                  ("index", "int64"), ("task_index", "int64")):
        feats[k] = dict(dtype=dt, shape=[1], names=None)

    def table(eps, first_index):
        cols, index = {k: [] for k in feats if k not in video_cams}, first_index
        for e, ep in eps:
            n = len(ep["state"])
            for c in cams:
                if c not in video_cams:
                    for img in ep["images"][c]:
                        buf = io.BytesIO()
                        Image.fromarray(img).save(buf, format="PNG")
                        cols[c].append({"bytes": buf.getvalue(), "path": None})
            cols[state_key] += list(ep["state"]); cols[action_key] += list(ep["action"])
            cols["timestamp"] += list(np.arange(n, dtype=np.float32) / np.float32(fps))
            cols["frame_index"] += list(range(n)); cols["episode_index"] += [e] * n
            cols["index"] += list(range(index, index + n)); index += n
            cols["task_index"] += [tasks.index(t) for t in ep["tasks"]]
        arrays = {}
        for k, v in cols.items():
            if k in (state_key, action_key):
                flat = pa.array(np.concatenate(v).astype(np.float32))
                arrays[k] = pa.FixedSizeListArray.from_arrays(flat, len(v[0]))
            elif k == "timestamp":
                arrays[k] = pa.array(np.array(v, np.float32))
            elif k in cams:
                arrays[k] = pa.array(v, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            else:
                arrays[k] = pa.array(np.array(v, np.int64))
        return pa.table(arrays)

    lengths = [len(ep["state"]) for ep in episodes]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    info = dict(codebase_version=version, robot_type="test", total_episodes=len(episodes),
                total_frames=sum(lengths), total_tasks=len(tasks), chunks_size=chunks_size, fps=fps,
                features=feats)
    if version == "v2.1":
        info.update(data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                    video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
        for e, ep in enumerate(episodes):
            path = root / info["data_path"].format(episode_chunk=e // chunks_size, episode_index=e)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table([(e, ep)], starts[e]), path)
            for c in video_cams:
                _write_video(root / info["video_path"].format(episode_chunk=e // chunks_size, video_key=c,
                                                              episode_index=e), ep["images"][c], fps)
        (root / "meta" / "episodes.jsonl").write_text("".join(
            json.dumps(dict(episode_index=e, tasks=sorted(set(ep["tasks"])), length=n)) + "\n"
            for e, (ep, n) in enumerate(zip(episodes, lengths))))
        (root / "meta" / "tasks.jsonl").write_text("".join(
            json.dumps(dict(task_index=i, task=t)) + "\n" for i, t in enumerate(tasks)))
    else:
        info.update(data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                    video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
        rows = []
        for k, first in enumerate(range(0, len(episodes), episodes_per_file)):
            group = list(range(first, min(first + episodes_per_file, len(episodes))))
            chunk, file = k // chunks_size, k % chunks_size
            path = root / info["data_path"].format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table([(e, episodes[e]) for e in group], starts[first]), path, row_group_size=3)
            offset = 0.0
            for e in group:
                row = {"episode_index": e, "tasks": sorted(set(episodes[e]["tasks"])), "length": lengths[e],
                       "data/chunk_index": chunk, "data/file_index": file,
                       "dataset_from_index": int(starts[e]), "dataset_to_index": int(starts[e] + lengths[e])}
                for c in video_cams:
                    row.update({f"videos/{c}/chunk_index": chunk, f"videos/{c}/file_index": file,
                                f"videos/{c}/from_timestamp": offset,
                                f"videos/{c}/to_timestamp": offset + lengths[e] / fps})
                offset += lengths[e] / fps
                rows.append(row)
            for c in video_cams:
                path = root / info["video_path"].format(video_key=c, chunk_index=chunk, file_index=file)
                _write_video(path, np.concatenate([episodes[e]["images"][c] for e in group]), fps)
        (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
        pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}),
                       root / "meta" / "tasks.parquet")
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return root


def _check_against_source(ds, episodes, cams_tol):
    """Every frame: state, clamped chunk, pad mask, per-frame task, images (within tolerance)."""
    C, i = ds.chunk_size, 0
    for e, ep in enumerate(episodes):
        n = len(ep["state"])
        for t in range(n):
            s = ds[i]
            idx = np.minimum(t + np.arange(C), n - 1)
            np.testing.assert_array_equal(s["state"], ep["state"][t])
            np.testing.assert_array_equal(s["actions"], ep["action"][idx])
            np.testing.assert_array_equal(s["action_is_pad"], t + np.arange(C) >= n)
            assert s["prompt"] == ep["tasks"][t] and (s["episode_index"], s["frame_index"]) == (e, t)
            for c, (max_tol, mean_tol) in cams_tol.items():
                diff = np.abs(s["images"][c].astype(int) - ep["images"][c][t])
                assert diff.max() <= max_tol and diff.mean() <= mean_tol, (c, e, t, diff.max())
            i += 1
    assert i == len(ds)


@needs_lerobot
def test_written_lerobot_edge_cases_v21_equals_v30(tmp_path):
    # two image cameras of different sizes, fps 10, state 3 / action 2, episodes of 1 and 2 frames,
    # v3.0 data split over several files and chunk folders, a task change inside episode 0
    cams = {"observation.images.front": (24, 32), "observation.images.side": (16, 40)}
    episodes = make_episodes([7, 1, 2, 5, 3], cams)
    a = readers.LeRobotDataset(write_lerobot(tmp_path / "a", "v2.1", episodes, fps=10), chunk_size=4)
    b = readers.LeRobotDataset(write_lerobot(tmp_path / "b", "v3.0", episodes, fps=10), chunk_size=4)
    assert len(b.files) == 3 and len({p.parent for p in b.files}) == 2
    _check_against_source(a, episodes, {c: (0, 0) for c in cams})
    _check_against_source(b, episodes, {c: (0, 0) for c in cams})
    assert a.describe()["tasks"] == b.describe()["tasks"]


@needs_lerobot
def test_written_h264_video_v21_and_v30(tmp_path):
    # H.264 at fps 30; v3.0 packs two episodes per mp4 (from_timestamp) over several files
    cams = {"observation.images.cam": (48, 64)}
    episodes = make_episodes([6, 4, 5], cams, task_switch=False)
    for version in ("v2.1", "v3.0"):
        root = write_lerobot(tmp_path / version, version, episodes, fps=30, video_cams=tuple(cams))
        ds = readers.LeRobotDataset(root, chunk_size=3)
        assert ds.is_video["observation.images.cam"]
        _check_against_source(ds, episodes, {c: (CODEC_MAX_TOL, CODEC_MEAN_TOL) for c in cams})


# ----------------------------------------------------------------------------------------------
# HDF5 episodes


def write_hdf5_set(folder, lengths, state_dim=4, action_dim=3, cams=None, prompts=None, fps=50, seed=0):
    rng = np.random.default_rng(seed)
    cams = cams or {"cam_high": (20, 30), "cam_left_wrist": (12, 16)}
    folder.mkdir(parents=True, exist_ok=True)
    episodes = []
    for e, n in enumerate(lengths):
        ep = dict(state=rng.normal(size=(n, state_dim)).astype(np.float32) + e,
                  action=rng.normal(size=(n, action_dim)).astype(np.float32) - e,
                  images={c: rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
                          for c, (h, w) in cams.items()})
        readers.write_hdf5_episode(folder / f"episode_{e}.hdf5", ep["state"], ep["action"], ep["images"],
                                prompt=None if prompts is None else prompts[e], fps=fps)
        episodes.append(ep)
    return episodes


def test_hdf5_reader_and_prompt_sources(tmp_path):
    episodes = write_hdf5_set(tmp_path / "h", [5, 1, 3], prompts=["fold the towel", None, "stack cups"])
    with pytest.raises(ValueError, match=r"episode_1\.hdf5.*prompt"):
        readers.HDF5Dataset(tmp_path / "h", chunk_size=4)
    ds = readers.HDF5Dataset(tmp_path / "h", chunk_size=4, prompt="default task")
    assert ds.fps == 50 and ds.cameras == ["cam_high", "cam_left_wrist"] and len(ds) == 9
    for ep, want in zip(episodes, ["fold the towel", "default task", "stack cups"]):
        ep["tasks"] = [want] * len(ep["state"])
    _check_against_source(ds, episodes, {c: (0, 0) for c in ds.cameras})


def test_action_rate_resampling(tmp_path):
    # fps 50 chunk at 25 Hz: every other frame; fps 10 chunk at 20 Hz: halfway interpolation
    folder = tmp_path / "r"
    folder.mkdir()
    t = np.arange(10, dtype=np.float32)[:, None]
    imgs = {"cam": np.zeros((10, 4, 4, 3), np.uint8)}
    readers.write_hdf5_episode(folder / "e.hdf5", np.c_[t, t], np.c_[t, 2 * t], imgs, prompt="p")
    ds = readers.HDF5Dataset(folder, chunk_size=4, fps=50, action_fps=25)
    np.testing.assert_array_equal(ds[3]["actions"][:, 0], [3, 5, 7, 9])
    np.testing.assert_array_equal(ds[5]["actions"][:, 0], [5, 7, 9, 9])
    np.testing.assert_array_equal(ds[5]["action_is_pad"], [False, False, False, True])
    ds = readers.HDF5Dataset(folder, chunk_size=4, fps=10, action_fps=20)
    np.testing.assert_allclose(ds[7]["actions"][:, 1], [14, 15, 16, 17])
    np.testing.assert_allclose(ds[8]["actions"][:, 1], [16, 17, 18, 18])
    np.testing.assert_array_equal(ds[8]["action_is_pad"], [False, False, False, True])


# ----------------------------------------------------------------------------------------------
# Corrupt or inconsistent data: errors name the file and the field


@needs_lerobot
def test_bad_lerobot_data_names_file_and_field(tmp_path):
    import pyarrow.parquet as pq
    # missing parquet column
    root = shutil.copytree(FIXTURES / "v21", tmp_path / "missing")
    path = root / "data" / "chunk-000" / "episode_000001.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["timestamp"]), path)
    with pytest.raises(KeyError, match=r"episode_000001\.parquet: missing column 'timestamp'"):
        readers.LeRobotDataset(root)
    # wrong fps in info.json
    root = shutil.copytree(FIXTURES / "v30", tmp_path / "fps")
    info = json.loads((root / "meta" / "info.json").read_text())
    info["fps"] = 30
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"info\.json: field 'fps' = 30 disagrees with column 'timestamp'"):
        readers.LeRobotDataset(root)
    # truncated video
    root = shutil.copytree(FIXTURES / "v30", tmp_path / "video")
    mp4 = next((root / "videos").rglob("*.mp4"))
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    ds = readers.LeRobotDataset(root, 5)
    with pytest.raises(ValueError, match=r"file-000\.mp4"):
        ds[len(ds) - 1]
    # NaN actions, and a state width that disagrees with info.json
    episodes = make_episodes([3, 4], {"observation.images.front": (8, 8)})
    episodes[1]["action"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"episode_000001\.parquet: field 'action' has NaN"):
        readers.LeRobotDataset(write_lerobot(tmp_path / "nan", "v2.1", episodes, fps=10))
    episodes[1]["action"][2, 1] = 0
    root = write_lerobot(tmp_path / "width", "v3.0", episodes, fps=10)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.state"]["shape"] = [7]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"file-000\.parquet: column 'observation.state' has 3 dims, .*info\.json"):
        readers.LeRobotDataset(root)


def test_bad_hdf5_data_names_file_and_field(tmp_path):
    write_hdf5_set(tmp_path / "h", [3, 4], prompts=["a", "b"])
    with h5py.File(tmp_path / "h" / "episode_1.hdf5", "a") as f:
        f["action"][1, 0] = np.nan
    with pytest.raises(ValueError, match=r"episode_1\.hdf5: field '/action' has NaN"):
        readers.HDF5Dataset(tmp_path / "h")
    with h5py.File(tmp_path / "h" / "episode_1.hdf5", "a") as f:
        del f["action"]
    with pytest.raises(KeyError, match=r"episode_1\.hdf5: missing dataset '/action'"):
        readers.HDF5Dataset(tmp_path / "h")
    with pytest.raises(FileNotFoundError, match="neither a LeRobot dataset"):
        readers.open_dataset(tmp_path)
