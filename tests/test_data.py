"""Tests for data.py: openpi's transforms, the batch dict that collate builds, norm stats (exact
mean / std, histogram quantiles, openpi's norm_stats.json, the CLI), the co-training mixture and
its resumable DDP sampler. The readers are tested in test_readers.py, whose writers make the data."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import loader
import robots
import readers
from test_readers import FIXTURES, needs_lerobot, write_hdf5_set


def fake_tokenize(prompt, state, length=12):
    """Stands in for a model's prompt function: character codes, right-padded, plus the state."""
    ids = [ord(c) % 97 + 1 for c in prompt][:length - 1] + [int(np.clip(state[0], -50, 50)) + 200]
    tokens = np.zeros(length, np.int64)
    tokens[:len(ids)] = ids
    return tokens, np.arange(length) < len(ids)


# ----------------------------------------------------------------------------------------------
# Transforms: openpi's, on numpy arrays


def test_resize_with_pad_matches_openpi_offsets():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)       # wide: ratio 128/224, 224 x 168
    out = data.resize_with_pad(img, 224, 224)
    assert out.shape == (224, 224, 3)
    assert (out[:28] == 0).all() and (out[28 + 168:] == 0).all()  # top offset int((224 - 168) / 2)
    ref = np.asarray(Image.fromarray(img).resize((224, 168), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[28:196], ref)
    tall = rng.integers(1, 256, (50, 21, 3), dtype=np.uint8)      # tall: 224 / (50 / 224) -> w = int(94.08)
    out = data.resize_with_pad(tall, 224, 224)
    new_w = int(21 / (50 / 224))
    left = int((224 - new_w) / 2)
    assert (out[:, :left] == 0).all() and (out[:, left + new_w:] == 0).all() and (out[:, left] > 0).any()
    same = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    assert data.resize_with_pad(same) is same                     # already the size: unchanged
    batch = data.resize_with_pad(np.stack([img, img]))
    np.testing.assert_array_equal(batch[1], data.resize_with_pad(img))
    f = data.image_to_float(np.array([[[0, 255, 128]]], np.uint8))
    assert f.shape == (3, 1, 1) and f[0, 0, 0] == -1 and f[1, 0, 0] == 1
    assert abs(f[2, 0, 0] - (128 / 255 * 2 - 1)) < 1e-7


def test_delta_absolute_and_normalization_round_trips():
    rng = np.random.default_rng(1)
    mask = robots.make_bool_mask(6, -1, 6, -1)
    assert mask.tolist() == [True] * 6 + [False] + [True] * 6 + [False]
    state, actions = rng.normal(size=(3, 14)), rng.normal(size=(3, 5, 14))
    delta = data.delta_actions(actions, state, mask)
    np.testing.assert_allclose(delta[:, :, 6], actions[:, :, 6])                 # gripper stays absolute
    np.testing.assert_allclose(delta[:, 2, :6], actions[:, 2, :6] - state[:, :6])  # the first state is the ref
    np.testing.assert_allclose(data.absolute_actions(delta, state, mask), actions)
    short = data.delta_actions(actions, state, robots.make_bool_mask(6, -1))       # mask shorter than A
    np.testing.assert_allclose(short[..., 7:], actions[..., 7:])

    x = rng.normal(size=(4, 5, 7)) * 3 + 1
    st = dict(mean=x.reshape(-1, 7).mean(0), std=x.reshape(-1, 7).std(0),
              q01=np.quantile(x.reshape(-1, 7), 0.01, 0), q99=np.quantile(x.reshape(-1, 7), 0.99, 0))
    z = data.normalize(x, st, use_quantiles=False)
    np.testing.assert_allclose(z, (x - st["mean"]) / (st["std"] + 1e-6), rtol=1e-5, atol=1e-6)
    q = data.normalize(x, st, use_quantiles=True)
    want = (x - st["q01"]) / (st["q99"] - st["q01"] + 1e-6) * 2 - 1
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-6)
    for use_q, y in ((False, z), (True, q)):
        np.testing.assert_allclose(data.unnormalize(y, st, use_q), x, rtol=1e-5, atol=1e-5)
    # model outputs are padded: z-score pads stats with mean 0 / std 1, quantile passes extra dims
    padded, dim_mask = data.pad_last(q, 10)
    assert dim_mask.tolist() == [True] * 7 + [False] * 3 and (padded[..., 7:] == 0).all()
    padded[..., 7:] = 0.5
    out = data.unnormalize(padded, st, True)
    np.testing.assert_allclose(out[..., :7], x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[..., 7:], 0.5)
    out = data.unnormalize(padded, st, False)
    np.testing.assert_allclose(out[..., 7:], 0.5 * (1 + 1e-6), rtol=1e-6)
    with pytest.raises(ValueError, match="'state' have 7 dims but the data has 14"):
        data.normalize(np.zeros(14), st, False, "state")


def test_transforms_and_collate_give_the_batch_contract(tmp_path):
    write_hdf5_set(tmp_path / "h", [4, 2], prompts=["a", "bb"])
    ds = readers.HDF5Dataset(tmp_path / "h", chunk_size=3)
    stats = data.compute_norm_stats(ds, progress=False)
    data.save_norm_stats(stats, tmp_path / "norm_stats.json")
    tf = data.Transforms(fake_tokenize, cameras=["cam_high", None, "cam_left_wrist"],
                         norm_stats=str(tmp_path / "norm_stats.json"), use_quantiles=True,
                         delta_mask=robots.make_bool_mask(2, -1), state_dim=8, action_dim=6, image_size=32)
    batch = loader.collate([tf(ds[i]) for i in (0, 3, 5)])
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in batch.items()}
    assert shapes == {"images": ((3, 3, 3, 32, 32), torch.float32), "image_masks": ((3, 3), torch.bool),
                      "state": ((3, 8), torch.float32), "tokens": ((3, 12), torch.int64),
                      "token_masks": ((3, 12), torch.bool), "actions": ((3, 3, 6), torch.float32),
                      "action_masks": ((3, 3, 6), torch.bool)}
    assert batch["image_masks"].tolist() == [[True, False, True]] * 3
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    # frame 3 is the last of episode 0: steps 1, 2 repeat its last action and, as openpi does, are
    # trained on; dims 3.. are padding everywhere
    assert batch["action_masks"][1].tolist() == [[True] * 3 + [False] * 3] * 3
    tf.mask_padded_steps = True  # --mask-padded-steps 1: those repeated steps leave the loss
    assert tf(ds[3])["action_masks"].tolist() == [[True] * 3 + [False] * 3] + [[False] * 6] * 2
    tf.mask_padded_steps = False
    assert (batch["state"][:, 4:] == 0).all() and (batch["actions"][..., 3:] == 0).all()
    # the chain: delta on dims 0-1 (raw state), then quantile normalization with the file's stats
    raw = ds[0]
    want = data.delta_actions(raw["actions"], raw["state"], [True, True])
    want = data.normalize(want, stats["actions"], True)
    np.testing.assert_allclose(batch["actions"][0, :, :3].numpy(), want, rtol=1e-5, atol=1e-6)
    want = data.normalize(raw["state"], stats["state"], True)
    np.testing.assert_allclose(batch["state"][0, :4].numpy(), want, rtol=1e-5, atol=1e-6)
    # state width disagreeing with the stats names the stats file and the field
    data.save_norm_stats({"state": {k: v[:2] for k, v in stats["state"].items()}}, tmp_path / "small.json")
    bad = data.Transforms(fake_tokenize, cameras=["cam_high"], norm_stats=str(tmp_path / "small.json"))
    with pytest.raises(ValueError, match=r"small\.json: norm stats for 'state' have 2 dims but the data has"):
        bad(ds[0])
    tf.cameras = ["cam_top"]
    with pytest.raises(KeyError, match="cam_top"):
        tf(ds[0])


# ----------------------------------------------------------------------------------------------
# Norm stats


def test_norm_stats_match_numpy(tmp_path, capsys):
    rng = np.random.default_rng(2)
    folder = tmp_path / "h"
    folder.mkdir()
    all_s, all_a = [], []
    for e, n in enumerate([3000, 1, 4000, 999]):       # heavy tails and a spike: quantiles must be real
        s = np.c_[rng.standard_t(3, size=(n, 2)) * 5 + 100, np.full((n, 1), 7.0)].astype(np.float32)
        a = np.c_[rng.exponential(2.0, size=(n, 1)), rng.normal(size=(n, 2)) * 1e-3 + e].astype(np.float32)
        readers.write_hdf5_episode(folder / f"ep{e}.hdf5", s, a, {"c": np.zeros((n, 2, 2, 3), np.uint8)})
        all_s.append(s); all_a.append(a)
    data.main(["stats", str(folder), "--out", str(tmp_path / "ns.json"), "--prompt", "x", "--fps", "30", "--per-frame"])
    stats = data.load_norm_stats(tmp_path / "ns.json")
    raw = json.loads((tmp_path / "ns.json").read_text())
    assert set(raw) == {"norm_stats"} and set(raw["norm_stats"]) == {"state", "actions"}
    for key, x in (("state", np.concatenate(all_s)), ("actions", np.concatenate(all_a))):
        x = x.astype(np.float64)
        assert set(raw["norm_stats"][key]) == {"mean", "std", "q01", "q99"}
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats[key]["std"], x.std(0), rtol=1e-6, atol=1e-6)   # population std
        bin_width = (x.max(0) - x.min(0)) / 5000
        for q in ("q01", "q99"):
            err = np.abs(stats[key][q] - np.quantile(x, float(q[1:]) / 100, axis=0))
            assert (err <= bin_width + 1e-6).all(), (key, q, err, bin_width)
    assert stats["state"]["q01"][2] == 7.0 and stats["state"]["std"][2] == 0.0
    data.main(["info", str(folder), "--prompt", "x", "--fps", "30"])
    out = capsys.readouterr().out
    assert "fps: 30.0" in out and "frames: 8000" in out and "episodes: 4" in out


def test_openpi_norm_stats_count_every_chunk_window_of_whole_batches(tmp_path):
    # openpi's pass: batches of 32 in order, the last partial batch left out, every action of every
    # frame's chunk counted (padded steps repeat the episode's last action), mean / std from running
    # E[x] and E[x^2], quantiles the left edge of a 5000-bin histogram's bin
    rng = np.random.default_rng(0)
    folder = tmp_path / "h"
    folder.mkdir()
    for e, n in enumerate([50, 30, 21]):                     # 101 frames: 3 batches of 32, 5 left out
        s = (rng.normal(size=(n, 2)) * (e + 1) + 10 * e).astype(np.float32)
        a = rng.exponential(1.0 + e, size=(n, 2)).astype(np.float32)
        readers.write_hdf5_episode(folder / f"ep{e}.hdf5", s, a, {"c": np.zeros((n, 2, 2, 3), np.uint8)})
    data.main(["stats", str(folder), "--out", str(tmp_path / "ns.json"), "--prompt", "x", "--fps", "10", "--chunk-size", "4"])
    stats = data.load_norm_stats(tmp_path / "ns.json")
    ds = readers.HDF5Dataset(folder, chunk_size=4, prompt="x", fps=10)
    rows = np.arange(96)
    chunks, is_pad = ds.action_chunks(rows)
    assert is_pad.any()                                      # the last frames' windows reach past the end
    for key, x in (("state", ds.state[rows]), ("actions", chunks.reshape(-1, 2))):
        x = x.astype(np.float64)
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-5)
        np.testing.assert_allclose(stats[key]["std"], x.std(0), rtol=1e-4)
        width = (x.max(0) - x.min(0)) / 5000
        for q in (0.01, 0.99):   # the ceil(q n)-th smallest value's bin; rebinning moves counts to a left edge
            kth = np.sort(x, 0)[int(np.ceil(q * len(x))) - 1]
            assert (np.abs(stats[key][f"q{round(q * 100):02d}"] - kth) <= 4 * width + 1e-6).all()
    # by hand: one batch of 0..99 gives q01 = the left edge of 0's bin, q99 = the left edge of 98's
    run = data.OpenpiRunningStats()
    run.update(np.arange(100, dtype=np.float32)[:, None])
    run.update(np.arange(100, dtype=np.float32)[:, None])  # same range: no rebinning
    r = run.result()
    assert r["mean"][0] == 49.5 and abs(r["std"][0] - np.arange(100).std()) < 1e-4
    edges = np.linspace(np.float32(0) - 1e-10, np.float32(99) + 1e-10, 5001)   # float32 data: float32 ends
    assert r["q01"][0] == edges[0] and r["q99"][0] == edges[np.searchsorted(edges, 98, side="right") - 1]
    with pytest.raises(ValueError, match="make no batch of 32"):
        data.openpi_norm_stats(readers.HDF5Dataset(folder / "ep1.hdf5", chunk_size=4, prompt="x", fps=10), progress=False)


def test_stats_of_another_representation_are_refused(tmp_path):
    stats = {k: {"mean": np.zeros(2), "std": np.ones(2), "q01": -np.ones(2), "q99": np.ones(2)} for k in ("state", "actions")}
    path = tmp_path / "norm_stats.json"
    data.save_norm_stats(stats, path, delta_mask=None, openpi_config=None)
    data.check_stats_representation(path, None)                       # absolute for absolute: fine
    with pytest.raises(ValueError, match=r"of absolute actions, but training uses delta actions \[True, False\]"):
        data.check_stats_representation(path, [True, False])
    with pytest.raises(ValueError, match="of the raw dataset, but pi0_aloha first flips"):
        data.check_stats_representation(path, None, "pi0_aloha")
    data.save_norm_stats(stats, path, delta_mask=[True, False], openpi_config=None)
    with pytest.raises(ValueError, match=r"of delta actions \[True, False\], but training uses absolute actions"):
        data.check_stats_representation(path, None)
    (tmp_path / "norm_stats.meta.json").unlink()                      # openpi's own files say nothing: taken as is
    data.check_stats_representation(path, None, "pi0_aloha")


@needs_lerobot
def test_norm_stats_on_lerobot_fixture_are_true_quantiles():
    # the README's caveat: lerobot's v3.0 stats.json quantiles average per-episode quantiles; ours are global
    ds = readers.LeRobotDataset(FIXTURES / "v30", 5)
    stats = data.compute_norm_stats(ds, progress=False)
    for key, x in (("state", ds.state), ("actions", ds.actions)):
        x = x.astype(np.float64)
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key]["std"], x.std(0), rtol=1e-6)
        width = (x.max(0) - x.min(0)) / 5000
        assert (np.abs(stats[key]["q01"] - np.quantile(x, 0.01, 0)) <= width).all()
        assert (np.abs(stats[key]["q99"] - np.quantile(x, 0.99, 0)) <= width).all()
    # with a delta mask every frame anchors its own chunk once (padded steps excluded)
    mask = np.ones(14, bool)
    rows = np.arange(len(ds))
    chunks, pad = ds.action_chunks(rows)
    want = data.delta_actions(chunks, ds.state, mask)[~pad].astype(np.float64)
    got = data.compute_norm_stats(ds, delta_mask=mask, progress=False)["actions"]
    np.testing.assert_allclose(got["mean"], want.mean(0), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Mixture, sampler, loader


def test_sampler_weights_ranks_and_shards():
    sizes, weights = [500, 3000, 70], [0.6, 0.3, 0.1]
    ranks = [loader.MixtureSampler(sizes, weights, seed=5, rank=r, world_size=2) for r in range(2)]
    stream = ranks[0].global_stream(0, 10_000)
    np.testing.assert_array_equal(stream, ranks[1].global_stream(0, 10_000))    # same stream on every rank
    which = np.searchsorted(ranks[0].offsets, stream, side="right") - 1
    shares = np.bincount(which, minlength=3) / len(stream)
    assert np.abs(shares - weights).max() < 0.02, shares
    assert (stream < sum(sizes)).all() and (stream >= 0).all()
    takes = [list(zip(range(5000), iter(s))) for s in ranks]
    assert len(takes[0]) == len(takes[1]) == 5000                            # equal counts per rank
    np.testing.assert_array_equal([v for _, v in takes[0]], stream[0::2])    # strided shards of the stream
    np.testing.assert_array_equal([v for _, v in takes[1]], stream[1::2])
    default = loader.MixtureSampler(sizes)                                     # default: proportional to size
    np.testing.assert_allclose(default.weights, np.array(sizes) / sum(sizes))


def test_mixture_loader_pads_masks_and_resumes(tmp_path):
    # three datasets: other widths, a missing camera, each with its own norm stats
    specs = [(dict(state_dim=4, action_dim=3), ["cam_high", "cam_left_wrist"]),
             (dict(state_dim=6, action_dim=5), ["cam_high", None]),
             (dict(state_dim=2, action_dim=2), ["cam_high", "cam_left_wrist"])]
    datasets, transforms = [], []
    for k, (dims, cams) in enumerate(specs):
        write_hdf5_set(tmp_path / f"d{k}", [6, 3], prompts=[f"task {k}", f"task {k}b"], seed=k, **dims)
        ds = readers.HDF5Dataset(tmp_path / f"d{k}", chunk_size=4)
        datasets.append(ds)
        stats = data.compute_norm_stats(ds, progress=False)
        transforms.append(data.Transforms(fake_tokenize, cams, norm_stats=stats, state_dim=8, action_dim=8,
                                          image_size=16))
    mixture = loader.Mixture(datasets, transforms, weights=[0.5, 0.3, 0.2])
    stream = loader.Loader(mixture, batch_size=4, seed=3, rank=1, world_size=2, num_workers=0)
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    state = stream.state_dict()
    assert state == {"position": 3 * 4 * 2, "seed": 3}
    rest = [next(it) for _ in range(2)]
    b = first[0]
    assert b["images"].shape == (4, 2, 3, 16, 16) and b["action_masks"].shape == (4, 4, 8)
    # per-sample masks tell the datasets apart: state width 6 <-> dataset 1 <-> wrist camera masked
    widths = b["action_masks"].any(1).sum(-1)
    assert set(widths.tolist()) <= {3, 5, 2}
    np.testing.assert_array_equal(b["image_masks"][:, 1].numpy(), (widths != 5).numpy())
    # resume in a fresh loader with worker processes: the exact continuation
    resumed = loader.Loader(mixture, batch_size=4, seed=3, rank=1, world_size=2, num_workers=2)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in rest:
        got = next(it2)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    with pytest.raises(KeyError, match="cam_nope"):
        loader.Mixture(datasets[:1], [data.Transforms(fake_tokenize, ["cam_nope"])])


def test_prompt_conditions_come_from_a_checked_sidecar(tmp_path):
    """<dataset>.conditions.json gives each frame its prompt condition; a missing file, another
    format, an episode of another length or a condition that is not text is an error naming it."""
    write_hdf5_set(tmp_path / "d", [3, 2], prompts=["reach", "push"])
    ds = readers.open_dataset(tmp_path / "d", chunk_size=2)
    path = data.conditions_path(tmp_path / "d")
    assert path == str((tmp_path / "d").resolve()) + ".conditions.json"  # beside the dataset, not in it
    with pytest.raises(FileNotFoundError, match="conditions.json"):
        data.read_conditions(path, ds)
    table = {"format": "frame-conditions", "serve": "fast",
             "episodes": {"0": {"condition": ["fast", "slow", None]}, "1": {"condition": ["slow", "fast"]}}}
    data.write_json(path, table)
    wrapped = data.ConditionedDataset(ds, data.read_conditions(path, ds))
    assert [wrapped[i]["condition"] for i in range(5)] == ["fast", "slow", None, "slow", "fast"]
    for broken, message in ((dict(table, format="recap-advantages"), "not a frame-conditions file"),
                            (dict(table, episodes={"0": table["episodes"]["0"]}), "episode 1 is missing"),
                            (dict(table, episodes={**table["episodes"], "1": {"condition": ["a"]}}), "another length"),
                            (dict(table, episodes={**table["episodes"], "1": {"condition": [True, 1]}}), "expected texts")):
        data.write_json(path, broken)
        with pytest.raises(ValueError, match=message):
            data.read_conditions(path, ds)
    open(path, "w").write("{truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.read_conditions(path, ds)
