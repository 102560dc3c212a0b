"""The RECAP experiment: returns and bins, the N-step advantage, the value function's readout,
cross-fitting, the time-aware value, advantages as the dataset's prompt conditions, pi0 / pi0.5
trained with the indicator, and the demo end to end at toy size. (The library's side, prompt
conditions, their dropout and classifier-free guidance, is tested in tests/.)"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import checkpoints
import data
import loader
import models
import readers
import tasks
from paligemma import GEMMA_PRESETS, SIGLIP_PRESETS, make_attn_mask, make_positions
from policy import Policy
from episodes import DatasetView
from experiments.recap import diagnose, recap


def test_rewards_returns_and_bins_by_hand():
    norm = 3 * 2  # the task's longest episode (3) + C_fail (1 x 3)
    ok = recap.episode_rewards(3, True, 3.0)
    bad = recap.episode_rewards(3, False, 3.0)
    assert ok.tolist() == [-1, -1, 0] and bad.tolist() == [-1, -1, -3]
    np.testing.assert_allclose(recap.normalized_returns(ok, norm), [-2 / 6, -1 / 6, 0])
    np.testing.assert_allclose(recap.normalized_returns(bad, norm), [-5 / 6, -4 / 6, -3 / 6])
    assert (recap.normalized_returns(ok, norm) > -0.5).all() and (recap.normalized_returns(bad, norm) <= -0.5).all()
    assert recap.to_bins([-1.0, -0.5, 0.0]).tolist() == [0, 100, 200]
    assert recap.to_bins([-1 / 3]).tolist() == [133]  # nearest of 201 equally spaced values


def test_hl_gauss_targets_are_distributions_centred_on_the_return():
    g = np.array([-1.0, -0.61, -0.3, 0.0])
    assert np.array_equal(recap.soft_bins(g, 0.0).argmax(1), recap.to_bins(g))  # sigma 0: the one-hot bin
    assert np.array_equal(recap.soft_bins(g, 0.0).sum(1), np.ones(4))
    p = recap.soft_bins(g, 0.05)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    centres = np.linspace(-1, 0, recap.BINS)
    np.testing.assert_allclose((p * centres).sum(1)[1:3], g[1:3], atol=1e-4)  # away from the ends: the mean
    spread = np.sqrt((p * (centres - g[:, None]) ** 2).sum(1))[1:3]
    np.testing.assert_allclose(spread, 0.05, rtol=0.02)
    assert p[0, 0] > 0.45 and p[-1, -1] > 0.45  # the ends keep the mass beyond them


def test_n_step_advantage_by_hand():
    r = np.array([-1, -1, -1, 0]) / 8.0
    v = np.array([-0.4, -0.3, -0.2, -0.1])
    a = recap.n_step_advantages(r, v, 2)
    want = [r[0] + r[1] + v[2] - v[0], r[1] + r[2] + v[3] - v[1], r[2] + r[3] + 0 - v[2], r[3] + 0 - v[3]]
    np.testing.assert_allclose(a, want)


def write_labelled(folder, outcomes, seed=0, correction=None):
    """HDF5 episodes of the built-in task's layout with success (and correction) labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for e, (length, ok) in enumerate(outcomes):
        readers.write_hdf5_episode(folder / f"episode_{e:05d}.hdf5", rng.uniform(-1, 1, (length, 2)),
                                   rng.uniform(-1, 1, (length, 2)),
                                   {"top": rng.integers(0, 256, (length, 56, 56, 3), dtype=np.uint8)},
                                   prompt=["reach the red ball", "go to the blue square"][e % 2], fps=10,
                                   attrs={"success": ok, **({} if correction is None else {"correction": correction[e]})})
    ds = readers.open_dataset(folder, chunk_size=4)
    data.save_norm_stats(data.compute_norm_stats(ds, progress=False), folder / "norm_stats.json")
    return ds


def test_labels_returns_and_corrections_from_the_files(tmp_path):
    ds = write_labelled(tmp_path / "d", [(4, True), (6, False), (3, True), (5, False)], correction=[0, 1, 0, 0])
    success, correction = recap.episode_labels(ds)
    assert success.tolist() == [True, False, True, False] and correction.tolist() == [False, True, False, False]
    rewards, returns = zip(*recap.episode_returns(ds))
    # task "reach the red ball": episodes 0 (4) and 2 (3), longest 4, norm 8; episode 0 succeeded
    np.testing.assert_allclose(returns[0], [-3 / 8, -2 / 8, -1 / 8, 0])
    np.testing.assert_allclose(returns[1][-1], -6 / 12)  # the blue task's failure: -C_fail / (6 + 6)
    import h5py
    with h5py.File(ds.files[0], "a") as f:
        del f.attrs["success"]
    with pytest.raises(KeyError, match="no `success` attribute"):
        recap.episode_labels(ds)


def tiny_value(vocab_size=300, max_token_len=12):
    torch.manual_seed(0)
    return recap.ValueFunction(recap.ValueConfig(vision=SIGLIP_PRESETS["tiny"], llm=GEMMA_PRESETS["tiny_llm"],
                                                 vocab_size=vocab_size, max_token_len=max_token_len)).eval()


def test_readout_token_is_never_padding_and_reads_the_input():
    vf = tiny_value()
    B, L = 3, 12
    batch = {"images": torch.rand(B, 1, 3, 56, 56) * 2 - 1, "image_masks": torch.ones(B, 1, dtype=torch.bool),
             "tokens": torch.randint(3, 300, (B, L)), "token_masks": torch.arange(L)[None] < torch.tensor([[3], [7], [12]])}
    tokens, mask, ar = vf.sequence(batch)
    assert mask[:, -1].all() and ar[-1] == 1 and ar[:-1].sum() == 0  # real, and its own block
    att = make_attn_mask(mask, ar)
    assert not att[:, :-1, -1].any()  # nothing attends to the readout
    assert torch.equal(att[:, -1], mask)  # it attends to every real token, to no padding
    pos = make_positions(mask)[:, -1]
    assert pos.tolist() == (mask[:, :-1].sum(1)).tolist()  # its position follows the last real token
    with torch.no_grad():
        v = vf.value(batch)
        other = vf.value(dict(batch, images=-batch["images"]))
    assert v.shape == (3,) and (v <= 0).all() and (v >= -1).all() and (v - other).abs().max() > 1e-5
    # padding content changes nothing: the readout never reads a padded slot
    padded = dict(batch, tokens=torch.where(batch["token_masks"], batch["tokens"], 5))
    with torch.no_grad():
        torch.testing.assert_close(vf.value(padded), v)


def test_advantages_are_written_as_the_datasets_prompt_conditions(tmp_path):
    ds = write_labelled(tmp_path / "d", [(4, True), (5, False), (3, True), (6, False)], correction=[0, 0, 0, 1])
    tasks.train_tokenizer(tmp_path / "tok.model", vocab_size=400)
    vf = tiny_value(vocab_size=512, max_token_len=32)
    models.save_pretrained(vf, tmp_path / "v", norm_stats=data.load_norm_stats(tmp_path / "d" / "norm_stats.json"),
                           extra_files=[(str(tmp_path / "tok.model"), "tokenizer.model")])
    vf = recap.load_value(tmp_path / "v")
    (table,) = recap.compute_advantages(vf, [ds], n_steps=2, positive_fraction=0.3)
    path = recap.write_advantages(tmp_path / "d", table)
    assert path == str((tmp_path / "d").resolve()) + ".conditions.json"  # beside the dataset, not in it
    back = data.read_conditions(path, ds)  # what train.py --conditions 1 reads
    assert back["serve"] == "Advantage: positive"
    assert all(back["episodes"]["3"]["positive"])  # a correction: every frame positive
    assert back["episodes"]["3"]["condition"] == ["Advantage: positive"] * 6
    wrapped = data.ConditionedDataset(ds, back)
    positive = back["episodes"]["1"]["positive"][1]  # episode 1, frame 1
    assert wrapped[5]["condition"] == recap.indicator(positive) == f"Advantage: {'positive' if positive else 'negative'}"


class Recording(DatasetView):
    def __init__(self, dataset):
        super().__init__(dataset)
        self.seen = set()

    def __getitem__(self, i):
        self.seen.add(int(i))
        return self.dataset[i]


def test_cross_fitting_values_each_episode_with_the_function_that_never_saw_it(tmp_path):
    ds = write_labelled(tmp_path / "d", [(4, True), (5, False), (3, True), (6, False), (2, True)])
    tasks.train_tokenizer(tmp_path / "tok.model", vocab_size=400)
    stats, tok = tmp_path / "d" / "norm_stats.json", tmp_path / "tok.model"
    # fold 0 of 2 holds out episodes 0, 2, 4: training draws only frames of episodes 1 and 3
    seen = Recording(ds)
    recap.train_value([seen], tmp_path / "f0", steps=3, batch_size=16, tokenizer=tok, norm_stats=stats, fold=(0, 2))
    kept = set(range(ds.ep_start[1], ds.ep_end[1])) | set(range(ds.ep_start[3], ds.ep_end[3]))
    assert seen.seen and seen.seen <= kept
    fns = []
    for k in range(2):
        vf = tiny_value(vocab_size=512, max_token_len=32)
        with torch.no_grad():  # tiny_value seeds itself: make the second function another one
            for p in vf.parameters():
                p.add_(k * 0.05 * torch.randn_like(p))
        models.save_pretrained(vf, tmp_path / f"v{k}", norm_stats=data.load_norm_stats(stats),
                               extra_files=[(str(tok), "tokenizer.model")])
        fns.append(recap.load_value(tmp_path / f"v{k}"))
    by_fn = [recap.frame_values(fn, ds) for fn in fns]
    assert not np.allclose(by_fn[0], by_fn[1])  # two different functions, so the test can tell them apart
    crossed = recap.cross_fitted_values(fns, ds)
    for j, (s, e) in enumerate(zip(ds.ep_start, ds.ep_end)):
        np.testing.assert_allclose(crossed[s:e], by_fn[j % 2][s:e], atol=1e-6)  # batches differ: float order
    np.testing.assert_allclose(recap.frame_values(fns[1], ds, rows=[5, 2]), by_fn[1][[5, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="expected 0 <= k < K"):
        recap.fold_rows(ds, 2, 2, held_out=True)
    (table,) = recap.compute_advantages(fns, [ds], n_steps=2)
    np.testing.assert_allclose(table["episodes"]["1"]["value"], by_fn[1][ds.ep_start[1]:ds.ep_end[1]], atol=2e-6)


def test_a_value_blind_to_time_rates_a_failure_near_the_time_limit_as_better_than_expected():
    # a failed episode of 8 steps (C_fail 8, norm 16) whose robot parks at the wrong object from
    # step 3 on: frames 3..7 look the same, their returns do not
    r = recap.episode_rewards(8, False, 8.0) / 16
    g = recap.normalized_returns(recap.episode_rewards(8, False, 8.0), 16)
    blind = g.copy()
    blind[3:] = g[3:].mean()  # the best a value that cannot see the time can do on the parked frames
    a_blind, a_timed = recap.n_step_advantages(r, blind, 2), recap.n_step_advantages(r, g, 2)
    np.testing.assert_allclose(a_timed, 0, atol=1e-12)  # the exact value: nothing better than expected
    assert a_blind[-1] > 0.1 and a_blind[-2] > 0.05  # the last frames look better than expected


def test_time_aware_value_reads_the_frame_time_and_keeps_its_inputs(tmp_path):
    import dataclasses

    ds = write_labelled(tmp_path / "d", [(6, True), (6, False)])
    sp = tasks.train_tokenizer(tmp_path / "tok.model", vocab_size=400)
    stats = tmp_path / "d" / "norm_stats.json"
    vf = tiny_value(vocab_size=512, max_token_len=32)
    s = ds[2]
    later = dict(s, frame_index=s["frame_index"] + 7)  # the same images, state and prompt, 7 steps later
    blind = recap.value_transforms(vf.cfg, ds, sp, stats)
    assert np.array_equal(blind(s)["tokens"], blind(later)["tokens"])
    timed_cfg = dataclasses.replace(vf.cfg, time_input=True)
    timed = recap.value_transforms(timed_cfg, ds, sp, stats)
    x, y = timed(s), timed(later)
    assert f", Step: {s['frame_index']}," in sp.decode(np.asarray(x["tokens"])[np.asarray(x["token_masks"])].tolist())
    assert f", Step: {s['frame_index'] + 7}," in sp.decode(np.asarray(y["tokens"])[np.asarray(y["token_masks"])].tolist())
    vf.cfg = timed_cfg
    with torch.no_grad():
        v = vf.value(loader.collate([x, y]))
    assert abs(v[0] - v[1]) > 1e-6  # the value changes with the time alone
    models.save_pretrained(vf, tmp_path / "v", norm_stats=data.load_norm_stats(stats),
                           extra_files=[(str(tmp_path / "tok.model"), "tokenizer.model")])
    assert recap.load_value(tmp_path / "v").cfg.time_input  # the flag travels with the function
    with pytest.raises(ValueError, match="its inputs cannot change"):
        recap.train_value([ds], tmp_path / "w", steps=1, init=tmp_path / "v", time_input=False,
                          tokenizer=tmp_path / "tok.model")


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_pi0_and_pi05_train_with_the_indicator_and_sample_with_cfg(model, tmp_path):
    ds_dir = tmp_path / "d"
    write_labelled(ds_dir, [(6, True), (8, False), (5, True), (8, False)])
    tasks.train_tokenizer(ds_dir / "tokenizer.model", vocab_size=400,
                        extra=["\nAdvantage: positive", "\nAdvantage: negative"])
    ds = readers.open_dataset(ds_dir, chunk_size=1)
    table = {"episodes": {
        str(e): {"positive": [bool((e + t) % 2) for t in range(int(n))], "advantage": [0.0] * int(n)}
        for e, n in enumerate(ds.ep_end - ds.ep_start)}}
    recap.write_advantages(ds_dir, table)
    res = subprocess.run([sys.executable, "train.py", "--model", model, "--data", str(ds_dir), "--conditions", "1", "--max-token-len", "32",
                          "--steps", "2", "--batch-size", "4", "--eval-episodes", "0", "--out", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    policy = Policy(tmp_path / "run" / "final")
    assert policy.settings["condition"] == {"text": "Advantage: positive", "cfg_beta": 1.0}
    obs = tasks.ReachEnv().reset(3)
    batch, _ = policy.model_inputs([obs])
    assert "uncond_tokens" in batch and not torch.equal(batch["tokens"], batch["uncond_tokens"])
    noise = np.random.default_rng(0).standard_normal((1, policy.model.cfg.action_horizon, policy.model.cfg.action_dim))
    a1 = policy.infer_batch([obs], noise)
    a3 = Policy(tmp_path / "run" / "final", cfg_beta=3.0).infer_batch([obs], noise)
    assert a1.shape == a3.shape == (1, policy.model.cfg.action_horizon, 2) and np.abs(a1 - a3).max() > 0


def test_label_quality_counts_the_positive_frames_by_demonstrator(tmp_path):
    tasks.record_demos(tmp_path / "d", 8, degraded=0.5, progress=False)
    ds = readers.open_dataset(tmp_path / "d", chunk_size=1)
    who = diagnose.behaviours(ds)
    assert set(who) <= {"expert", "wrong", "wander"} and "expert" in who and set(who) - {"expert"}
    lengths = (ds.ep_end - ds.ep_start).tolist()
    # every expert frame but the last of each expert episode positive, and the first frame of every other episode
    positive = {str(k): [t < n - 1 if w == "expert" else t == 0 for t in range(n)]
                for k, w, n in zip(ds.episode_keys(), who, lengths)}
    q = diagnose.label_quality({"episodes": {k: {"positive": v} for k, v in positive.items()}}, ds)
    expert_frames = sum(n for w, n in zip(who, lengths) if w == "expert")
    expert_eps, others = who.count("expert"), len(who) - who.count("expert")
    assert q["recall"] == pytest.approx((expert_frames - expert_eps) / expert_frames)
    assert q["purity"] == pytest.approx((expert_frames - expert_eps) / (expert_frames - expert_eps + others))
    assert q["positive_share"]["expert"] == pytest.approx(q["recall"])


class IndicatorReader:
    """A scripted conditioned policy: the expert's actions when its prompt condition says
    "positive", a corner of the table (on no object) otherwise."""
    path, condition = "scripted", {"text": "Advantage: positive", "cfg_beta": 1.0}

    def infer_batch(self, observations, noise=None):
        if self.condition["text"] == recap.indicator(True):
            return tasks.ExpertPolicy(chunk_size=2).infer_batch(observations)
        return np.full((len(observations), 2, 2), 0.99, np.float32)


def test_indicator_reading_tells_a_policy_that_acts_on_its_indicator():
    policy = IndicatorReader()
    shares = diagnose.indicator_reading(policy, scenes=20, samples=2)
    assert shares["positive"]["named"] == 1.0 and shares["negative"]["none"] == 1.0
    assert policy.condition["text"] == "Advantage: positive"  # served as before
    assert "told positive 100%, told negative 0%" in diagnose.describe_reading(shares)
    policy.condition = None
    with pytest.raises(ValueError, match="not trained with a prompt condition"):
        diagnose.indicator_reading(policy)


def test_the_demo_runs_the_whole_loop_in_one_command(tmp_path):
    """The demo at toy sizes: mixed demos, imitation, value, advantages, RECAP, CFG, own rollouts,
    a second iteration; the table, recap.json (with V's separation) and value.png."""
    out = tmp_path / "recap"
    res = subprocess.run([sys.executable, "-m", "experiments.recap", "demo", "--out", str(out), "--episodes", "16", "--steps", "2",
                          "--value-steps", "2", "--rollouts", "4", "--finetune-steps", "2", "--eval-episodes", "4",
                          "--recap-steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "recap.json").read_text())
    assert list(result["rows"]) == ["imitation, 2 steps (where both fine-tunes start)", "imitation (same data, same steps)",
                                    "RECAP, beta = 1", "RECAP, CFG beta = 2",
                                    "RECAP, one more iteration (own rollouts), beta = 1"]
    assert json.loads((out / "recap1" / "final" / "policy.json").read_text())["condition"]
    assert "condition" not in json.loads((out / "imitation_more" / "final" / "policy.json").read_text())
    for run in ("recap1", "recap2"):  # both iterations train with the indicator, dropped for the demo's 10%
        last = Path(checkpoints.latest_checkpoint(out / run / "checkpoints"))
        trained = torch.load(last / "train_state.pt", map_location="cpu", weights_only=False)["args"]
        assert (trained["conditions"], trained["condition_dropout"]) == (1, 0.1), run
    assert all(r["episodes"] == 4 for r in result["rows"].values())
    assert set(result["value"]) == {"success", "failure", "last_frame_auc"}
    assert (out / "value.png").exists() and sum(line.startswith("| ") for line in (out / "recap.md").read_text().splitlines()) == 6
    for d in ("data", "rollouts1"):  # advantages beside each dataset, the data untouched
        assert Path(data.conditions_path(out / d)).exists()
    assert len(list((out / "rollouts1").glob("episode_*.hdf5"))) == 4
    stages = list(result["diagnosis"])
    assert stages == ["value on the demos", "value on the policy's own rollouts (held out)",
                      "advantage labels on the demos", "the RECAP policy's reading of the indicator"]
    assert stages == [name for name, _ in diagnose.STAGES]
    assert "purity" in res.stdout and "told positive" in res.stdout
    res = subprocess.run([sys.executable, "-m", "experiments.recap", "diagnose", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((out / "diagnosis.json").read_text())
    assert list(again) == stages and again["advantage labels on the demos"] == result["diagnosis"]["advantage labels on the demos"]


@pytest.mark.parametrize("start", ["imitation", "scratch"])
def test_first_iteration_fine_tunes_recap_and_its_control_from_the_imitation_policy(start, tmp_path, monkeypatch):
    """--recap-start imitation: RECAP and the control both start from the imitation policy, with the
    same steps and learning rate, and differ only in the indicator; scratch: RECAP alone, from scratch."""
    from experiments.recap import __main__ as demo
    runs = {}
    monkeypatch.setattr(demo, "train_policy", lambda out, datasets, args, *extra: runs.setdefault(out.name, extra) and out)
    monkeypatch.setattr(demo, "closed_loop", lambda checkpoint, episodes, cfg_beta=None: checkpoint.name)
    args = argparse.Namespace(recap_start=start, steps=12, recap_steps=6, recap_lr=3e-4, eval_episodes=1,
                              condition_dropout=0.1)
    rows = {}
    recap1 = demo.first_iteration(tmp_path, tmp_path / "data", tmp_path / "imitation", args, rows)
    assert recap1 == tmp_path / "recap1"
    if start == "scratch":
        assert rows == {"imitation (same data, same steps)": "imitation"}
        assert runs == {"recap1": ("--steps", 12, "--conditions", 1, "--condition-dropout", 0.1)}
        return
    assert rows == {"imitation, 12 steps (where both fine-tunes start)": "imitation",
                    "imitation (same data, same steps)": "imitation_more"}
    finetune = ("--init", tmp_path / "imitation", "--warmup", 0, "--lr", 3e-4, "--steps", 6)
    assert runs == {"imitation_more": finetune, "recap1": finetune + ("--conditions", 1, "--condition-dropout", 0.1)}


@pytest.mark.parametrize("setting, message", [(dict(condition_dropout=1.0), "expected a share in"),
                                              (dict(cross_fit=0), "expected K >= 1")])
def test_demo_refuses_bad_settings_before_training(setting, message, tmp_path, monkeypatch):
    from experiments.recap import __main__ as demo
    monkeypatch.setattr(demo, "train_policy", lambda *a: pytest.fail("trained before checking its settings"))
    parser = argparse.ArgumentParser()
    demo.add_demo_args(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    vars(args).update(setting)  # as a script calling cmd_demo may set them
    with pytest.raises(ValueError, match=message):
        demo.cmd_demo(args)
    assert not (tmp_path / "data").exists()
