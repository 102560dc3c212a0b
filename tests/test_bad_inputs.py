"""Nothing lost, nothing silently wrong: crash-safe checkpoints (proved by killing training at
every point of the save sequence) and one test per bad input, each asserting the error class and
that the message names the culprit. The README's reliability table lists the same cases."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, train_tiny_sentencepiece
from safetensors.torch import load_file

import data
import models
import recipes
import sim
import tasks
import train
from readers import open_dataset, write_hdf5_episode


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for e in range(3):
        T = 10 + e
        write_hdf5_episode(out / f"ep{e}.hdf5", rng.normal(size=(T, 3)), np.cumsum(rng.normal(size=(T, 2)), 0),
                           {"top": rng.integers(0, 255, (T, 56, 56, 3), dtype=np.uint8)}, prompt="reach the ball",
                           fps=10)
    data.save_norm_stats(data.compute_norm_stats(open_dataset(out, chunk_size=6), progress=False),
                         out / "norm_stats.json")
    sp = train_tiny_sentencepiece(["reach the ball", "go to the blue square"] * 40, vocab_size=300)
    (out / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    return out


def train_cmd(dataset, out, *extra):
    return [sys.executable, "train.py", "--model", "pi0", "--data", str(dataset), "--steps", "5", "--batch-size", "4",
            "--warmup", "1", "--save-every", "1", "--log-every", "1", "--eval-episodes", "0", "--out", str(out), *extra]


def run_train(cmd, crash_at=None):
    env = dict(os.environ, **({"PI_CRASH_AT": crash_at} if crash_at else {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


# ----------------------------------------------------------------------------------------------
# Crash safety

# every point of the save sequence (models.crash_point), killed on the 3rd save (step 3), when
# the complete checkpoint of step 2 exists: weights written, train state written, about to
# publish, just published (the old one not yet removed), old one renamed but not removed
KILL_POINTS = ["weights-written:3", "state-written:3", "before-publish:3", "published:3", "old-renamed:2"]


@pytest.mark.parametrize("kill", KILL_POINTS)
def test_sigkill_anywhere_in_a_save_resumes_to_the_same_weights(dataset, tmp_path, kill):
    ref = run_train(train_cmd(dataset, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    crashed = run_train(train_cmd(dataset, tmp_path / "run"), crash_at=kill)
    assert crashed.returncode == -signal.SIGKILL, (kill, crashed.returncode, crashed.stderr[-2000:])
    resumed = run_train(train_cmd(dataset, tmp_path / "run", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_000000" in resumed.stdout
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), kill  # bit for bit the uninterrupted run
    left = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert left == ["step_0000005"], left  # temporaries and older checkpoints are cleaned up


def test_resume_without_a_complete_checkpoint_says_what_it_found(dataset, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_0000003.tmp-1").mkdir(parents=True)
    res = run_train(train_cmd(dataset, tmp_path / "run", "--resume"))
    assert res.returncode != 0 and "no complete checkpoint" in res.stderr and "step_0000003.tmp-1" in res.stderr


def test_resume_with_changed_knobs_is_an_error_unless_allowed(dataset, tmp_path):
    assert run_train(train_cmd(dataset, tmp_path / "run", "--stop-after", "2")).returncode == 0
    res = run_train(train_cmd(dataset, tmp_path / "run", "--resume", "--batch-size", "8", "--lr", "0.01"))
    assert res.returncode != 0
    assert "--batch-size was 4, now 8" in res.stderr and "--lr was 0.001, now 0.01" in res.stderr
    res = run_train(train_cmd(dataset, tmp_path / "run", "--resume", "--steps", "6", "--resume-allow", "steps"))
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_run_directory_belongs_to_one_run(dataset, tmp_path):
    out = tmp_path / "run"
    assert run_train(train_cmd(dataset, out, "--steps", "3")).returncode == 0
    first = load_file(out / "final" / "model.safetensors")
    res = run_train(train_cmd(dataset, out, "--steps", "2", "--seed", "1"))  # a fresh run into it: refused
    assert res.returncode != 0 and f"--out {out} already holds a run" in res.stderr and "--overwrite" in res.stderr
    assert (out / "checkpoints" / "step_0000003").is_dir()  # nothing of the first run was touched
    assert all(torch.equal(v, load_file(out / "final" / "model.safetensors")[k]) for k, v in first.items())
    res = run_train(train_cmd(dataset, out, "--steps", "2", "--seed", "1", "--overwrite"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000002"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # a new log, not appended to the old one


def test_resume_checks_the_data_by_content_not_by_path_spelling(dataset, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(dataset, data_dir)
    cmd = lambda *extra: [c if c != str(dataset) else str(data_dir) for c in train_cmd(dataset, tmp_path / "run", *extra)]
    assert run_train(cmd("--stop-after", "2")).returncode == 0
    spelled = [c if c != str(data_dir) else str(data_dir) + "/" for c in cmd("--resume", "--stop-after", "3")]
    res = run_train(spelled)  # the same data, a trailing slash: the same run
    assert res.returncode == 0, res.stderr[-2000:]
    shutil.copy(data_dir / "ep0.hdf5", data_dir / "ep3.hdf5")  # a new episode at the same path
    res = run_train(cmd("--resume"))
    assert res.returncode != 0 and "dataset 0's content was {'episodes': 3, 'frames': 33" in res.stderr
    assert "'episodes': 4, 'frames': 43" in res.stderr
    res = run_train(cmd("--resume", "--precision", "bf16"))
    assert res.returncode != 0 and "--precision was None, now 'bf16'" in res.stderr
    assert run_train(cmd("--resume", "--resume-allow", "data")).returncode == 0


def test_a_failed_save_leaves_nothing_behind_and_the_retry_works(tmp_path):
    model = models.build(models.preset("pi0", "tiny"))
    with pytest.raises(FileNotFoundError):
        models.save_pretrained(model, tmp_path / "ckpt", extra_files=[str(tmp_path / "missing.model")])
    assert os.listdir(tmp_path) == []  # no *.tmp-* left to block the next try
    models.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_interrupted_replacement_points_to_the_moved_aside_copy(tmp_path):
    """save_pretrained over an existing directory, killed between its two renames."""
    code = ("import torch, models, pi0; m = pi0.Pi0(pi0.CONFIGS['tiny']); "
            f"models.save_pretrained(m, {str(tmp_path / 'ckpt')!r}); models.save_pretrained(m, {str(tmp_path / 'ckpt')!r})")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PI_CRASH_AT="moved-aside:1"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL
    with pytest.raises(FileNotFoundError, match=r"moved aside to .*ckpt\.old-"):
        models.load(tmp_path / "ckpt")


# ----------------------------------------------------------------------------------------------
# Arguments, checked before any work

@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--grad-accum", "0"], "--grad-accum 0: must be an integer >= 1"),
    (["--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["--ema", "1.5"], "--ema 1.5: must be in [0, 1)"),
    (["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
    (["--config", "bogus"], "unknown --config 'bogus' for pi05: expected one of full, tiny"),
    (["--freeze", "foo"], "--freeze 'foo': a comma list of vision, llm"),
    (["--lora", "vision"], "--lora 'vision': a comma list of llm, expert"),
    (["--lora-rank", "4"], "--lora-rank '4': two positive integers"),
    (["--data", "a:0", "b:0"], "at least one dataset needs a weight > 0"),
    (["--data", "a:-1"], "the weight must be a finite number >= 0"),
    (["--data", "x:y"], "'y' is not a weight"),
    (["--resume-allow", "bogus"], "--resume-allow: unknown knobs ['bogus']"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--b2", "1.5"], "--b2 1.5: must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0"),
])
def test_bad_arguments_name_the_flag_and_what_is_allowed(argv, message):
    with pytest.raises(ValueError) as e:
        recipes.parse_args(argv)[0]
    assert message in str(e.value)


def test_a_zero_mixture_weight_stays_zero(dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    a = recipes.parse_args(["--data", f"{dataset}:0", str(other)])[0]
    _, _, weights = train.open_datasets(a, models.preset("pi0", "tiny"), 0, False)
    assert weights == [0.0, 1.0]  # it was [1.0, 1.0]: a 50/50 mix


def test_init_from_another_model_is_an_error(tmp_path):
    import pi05
    models.save_pretrained(pi05.Pi05(pi05.CONFIGS["tiny"]), tmp_path / "p05")
    with pytest.raises(ValueError, match="holds a pi05 model, not --model pi0"):
        train.model_config(recipes.parse_args(["--model", "pi0", "--init", str(tmp_path / "p05")])[0])


# ----------------------------------------------------------------------------------------------
# Inputs, checked where they enter

def transforms():
    return data.Transforms(tokenize=lambda prompt, state: (np.zeros(4, np.int64), np.ones(4, bool)), cameras=["top"],
                           norm_stats={"state": {"mean": np.zeros(3), "std": np.ones(3)},
                                       "actions": {"mean": np.zeros(2), "std": np.ones(2)}},
                           state_dim=8, action_dim=8, image_size=32)


def sample(image=None, state=None, actions=None):
    return {"images": {"top": np.zeros((32, 32, 3), np.uint8) if image is None else image},
            "state": np.zeros(3, np.float32) if state is None else state, "prompt": "p",
            **({"actions": actions} if actions is not None else {})}


def test_float_images_in_unit_range_are_scaled_as_openpi_does():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3)).astype(np.float32)
    as_float = transforms()(sample(img))["images"]
    as_uint8 = transforms()(sample((255 * img).astype(np.uint8)))["images"]  # openpi's conversion
    np.testing.assert_array_equal(as_float, as_uint8)
    assert as_float.mean() > -0.5  # not the almost-black image it used to be


@pytest.mark.parametrize("image, message", [
    (np.full((32, 32, 3), 200.0, np.float32), "image 'top' is float32 with values in [200, 200]"),
    (np.zeros((32, 32, 3), np.uint16), "image 'top' has dtype uint16"),
    (np.zeros((32, 32), np.uint8), "image 'top' has shape (32, 32), expected (height, width, 3)"),
    (np.full((32, 32, 3), np.nan, np.float32), "image 'top' is float32"),
])
def test_bad_images_name_the_camera(image, message):
    with pytest.raises(ValueError) as e:
        transforms()(sample(image))
    assert message in str(e.value)


def test_nan_state_and_actions_are_errors():
    with pytest.raises(ValueError, match=r"state has NaN or inf \(dims \[1\]\)"):
        transforms()(sample(state=np.array([0, np.nan, 0], np.float32)))
    with pytest.raises(ValueError, match=r"actions has NaN or inf \(dims \[0\]\)"):
        transforms()(sample(actions=np.array([[np.inf, 0.0]] * 6, np.float32)))


def test_bad_norm_stats_name_the_file_and_field(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"actions": {"mean": [0, 0], "std": [1, float("nan")]}}}))
    with pytest.raises(ValueError, match=r"norm_stats.json: norm_stats.actions.std has NaN or inf at dims \[1\]"):
        data.load_norm_stats(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"norm_stats.json: not valid JSON"):
        data.load_norm_stats(path)


def test_constant_dimension_warns(tmp_path):
    write_hdf5_episode(tmp_path / "e.hdf5", np.ones((6, 2)), np.random.default_rng(0).normal(size=(6, 2)),
                       {"top": np.zeros((6, 8, 8, 3), np.uint8)}, prompt="p", fps=10)
    with pytest.warns(UserWarning, match=r"state dims \[0, 1\] are constant"):
        data.compute_norm_stats(open_dataset(tmp_path), progress=False)


def test_episodes_of_different_widths_name_the_file(tmp_path):
    for e, width in enumerate((3, 4)):
        write_hdf5_episode(tmp_path / f"e{e}.hdf5", np.zeros((5, width)), np.zeros((5, 2)),
                           {"top": np.zeros((5, 8, 8, 3), np.uint8)}, prompt="p", fps=10)
    with pytest.raises(ValueError, match=r"e1.hdf5: state width 4 / action width 2 differ from .*e0.hdf5's 3 / 2"):
        open_dataset(tmp_path)


@pytest.mark.parametrize("kind", ["hdf5", "info.json", "parquet", "video"])
def test_corrupt_dataset_files_are_named(tmp_path, kind):
    if kind == "hdf5":
        (tmp_path / "e.hdf5").write_text("not hdf5")
        with pytest.raises(ValueError, match=r"e.hdf5: not a readable HDF5 file"):
            open_dataset(tmp_path / "e.hdf5")
    elif kind == "info.json":
        (tmp_path / "meta").mkdir()
        (tmp_path / "meta" / "info.json").write_text('{"codebase_version": "v2.1",')
        with pytest.raises(ValueError, match=r"info.json: not valid JSON"):
            open_dataset(tmp_path)
    elif kind == "video":
        pytest.importorskip("av")
        from readers import decode_video_frame
        (tmp_path / "x.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
        with pytest.raises(ValueError, match=r"x.mp4: cannot decode the frame at t=0.1000s"):
            decode_video_frame(tmp_path / "x.mp4", 0.1)
    else:
        pytest.importorskip("pyarrow")
        from readers import _read_parquet
        (tmp_path / "x.parquet").write_bytes(b"PAR1 truncated")
        with pytest.raises(ValueError, match=r"x.parquet: not a readable parquet file"):
            _read_parquet(tmp_path / "x.parquet", ["action"])


def test_bad_recordings_are_named_when_the_dataset_opens(tmp_path):
    rng = np.random.default_rng(0)
    episode = lambda T, H=8: (rng.normal(size=(T, 3)), rng.normal(size=(T, 2)),
                              {"top": np.zeros((T, H, 8, 3), np.uint8)})
    for d in "abc":
        (tmp_path / d).mkdir()
    write_hdf5_episode(tmp_path / "a" / "e0.hdf5", *episode(5), prompt="x", fps=0)
    with pytest.raises(ValueError, match=r"e0.hdf5: fps is 0: expected the frame rate, a number > 0"):
        open_dataset(tmp_path / "a")
    write_hdf5_episode(tmp_path / "b" / "e0.hdf5", *episode(5), prompt="x", fps=10)
    write_hdf5_episode(tmp_path / "b" / "e1.hdf5", *episode(5, H=9), prompt="x", fps=10)  # one camera of another size
    with pytest.raises(ValueError, match=r"e1.hdf5: cameras \{'top': \(5, 9, 8, 3\)\} differ"):
        open_dataset(tmp_path / "b")
    (tmp_path / "c" / "meta").mkdir()
    (tmp_path / "c" / "meta" / "info.json").write_text('{"codebase_version": "v2.1", "fps": 10}')
    with pytest.raises(KeyError, match=r"info.json: no 'features' table"):
        open_dataset(tmp_path / "c")


def test_a_condition_is_never_cut_off_the_prompt(tiny_sp):
    import pi0
    import pi05
    with pytest.raises(ValueError, match=r"condition 'Advantage: positive' has \d+ tokens, over max_token_len=8"):
        pi0.tokenize_prompt(tiny_sp, "pick up the red block", 8, condition="Advantage: positive")
    with pytest.raises(ValueError, match=r"the condition would be cut off; raise it \(train.py --max-token-len\)"):
        pi05.tokenize_prompt(tiny_sp, "pick up the red block", np.zeros(3), 12, condition="Advantage: positive")
    with pytest.warns(UserWarning, match="truncated to max_token_len=3"):  # no condition: openpi's truncation
        pi0.tokenize_prompt(tiny_sp, "pick up the red block", 3)


def test_the_demo_cache_is_one_per_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = recipes.parse_args(["--model", "pi0", "--demo-episodes", "4"])[0]
    datasets, roots, _ = train.open_datasets(a, models.preset("pi0", "tiny"), 0, False)
    assert roots == [os.path.join("runs", "builtin_demos_4")] and datasets[0].num_episodes == 4
    os.remove(os.path.join(roots[0], "episode_00003.hdf5"))  # a cache that lost an episode
    with pytest.raises(ValueError, match=r"builtin_demos_4 holds 3 demonstrations, not 4: remove it"):
        train.open_datasets(a, models.preset("pi0", "tiny"), 0, False)


@pytest.mark.parametrize("argv, message", [
    (["train.py", "--steps", "0"], "error: --steps 0: must be an integer >= 1"),
    (["data.py", "stats", "/no/such/dataset"], "error: "),
    (["policy.py", "serve", "--checkpoint", "x", "--max-message-mb", "-1"], "--max-message-mb: -1 must be above 0"),
    (["infer.py", "bench", "--iters", "0"], "--iters: 0 is below 1"),
    (["sim.py", "eval", "--checkpoint", "/no/such/ckpt"], "error: /no/such/ckpt: no checkpoint directory there"),
])
def test_command_line_mistakes_are_one_line(argv, message):
    res = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
    if argv[0] == "train.py":  # the traceback on request
        res = subprocess.run([sys.executable, *argv, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert "Traceback" in res.stderr


def checkpoint(tmp_path):
    import pi0
    torch.manual_seed(0)
    models.save_pretrained(pi0.Pi0(pi0.CONFIGS["tiny"]), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_edited_config_is_caught_at_load(tmp_path):
    path = checkpoint(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["action_horizon"] = 10  # changes no tensor shape: strict loading alone would not see it
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json differs .*action_horizon is 10, was 6"):
        models.load(path)


def test_corrupt_checkpoint_files_are_named(tmp_path):
    path = checkpoint(tmp_path)
    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        models.load(path)
    (path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        models.load(path)


def test_too_many_action_steps_per_chunk_is_an_error():
    with pytest.raises(ValueError, match=r"n_action_steps 100 \(\+ delay 0\) exceeds the policy.s chunk of 6 actions"):
        sim.evaluate(tasks.ExpertPolicy(chunk_size=6), "builtin", 2, n_action_steps=100, progress=False)


def test_undecodable_chunks_are_counted_by_the_evaluation():
    class HalfDecodes(tasks.ExpertPolicy):  # a pi0-FAST-like policy whose first answer never decodes
        def infer_batch(self, observations, noise=None):
            self.valid = np.arange(len(observations)) > 0
            return super().infer_batch(observations, noise)
    r = sim.evaluate(HalfDecodes(chunk_size=6), "builtin", 3, progress=False)
    assert r["undecoded_chunks"] >= 1 and r["episodes_with_undecoded"] >= 1
    assert sum(x["undecoded_chunks"] for x in r["results"]) == r["undecoded_chunks"]


def test_wandb_without_the_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        train.start_wandb(recipes.parse_args(["--wandb", "proj"])[0], "/tmp")
