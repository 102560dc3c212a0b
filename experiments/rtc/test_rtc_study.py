"""The real-time chunking study (python -m experiments.rtc): the sweep on another simulator, and the
whole study as one command at toy size, resumable."""

import json

import numpy as np
import pytest

import experiments.rtc.__main__ as study
from tasks import CatchExpertPolicy


def test_the_sweep_runs_other_environments():
    """rtc_sweep drives any sim env through the same delayed loop (here gym-pusht's)."""
    pytest.importorskip("gym_pusht")

    class Hold:  # heads for the table's centre; a new chunk is 1 px further right each call
        calls = 0

        def infer_batch(self, observations, noise=None, **rtc):
            self.calls += 1
            return np.full((len(observations), 6, 2), 256.0, np.float32) + [self.calls, 0]

    rows = study.rtc_sweep(Hold(), [0, 2], episodes=2, env_name="pusht", env_kwargs={"max_steps": 8})
    assert [(r["delay"], r["method"]) for r in rows] == [(0, "naive"), (0, "rtc"), (2, "naive"), (2, "rtc")]
    assert all(r["mean_length"] == 8 for r in rows) and rows[0]["mean_jump"] == pytest.approx(1.0)


@pytest.mark.parametrize("env", ["builtin", "catch"])
def test_the_whole_study_is_one_command(env, tmp_path, monkeypatch):
    """Without a checkpoint the study trains the model plainly and with training-time RTC, then
    sweeps the three methods into one table, rtc.json and rtc.png; a second run reuses both. On
    either built-in task: reach (env builtin) or the dynamic catch."""
    monkeypatch.chdir(tmp_path)  # the built-in demos land in ./runs/<builtin|catch>_demos_<N>
    argv = ["--out", str(tmp_path / "study"), "--delays", "0", "2", "--episodes", "3", "--steps", "2",
            "--chunk", "6", "--env", env, "--train-args", "--demo-episodes 12 --batch-size 4 --warmup 1"]
    study.main(argv)
    assert (tmp_path / "runs" / f"{env}_demos_12" / "tokenizer.model").exists()
    result = json.loads((tmp_path / "study" / "rtc.json").read_text())
    assert result["env"] == env
    assert [(r["delay"], r["method"]) for r in result["rows"]] == [
        (0, "naive"), (0, "rtc"), (2, "naive"), (2, "rtc"), (0, "trained"), (2, "trained")]
    policy = json.loads((tmp_path / "study" / "trained" / "final" / "policy.json").read_text())
    assert policy["rtc_max_delay"] == 2 and (tmp_path / "study" / "rtc.png").exists()
    assert json.loads((tmp_path / "study" / "plain" / "final" / "policy.json").read_text())["rtc_max_delay"] == 0
    stamp = (tmp_path / "study" / "plain" / "final" / "model.safetensors").stat().st_mtime_ns
    study.main(argv)  # resumes: nothing retrained
    assert (tmp_path / "study" / "plain" / "final" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_chunk_too_short_for_the_delays_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match="d = 4 needs a chunk of 8 or more"):
        study.main(["--out", str(tmp_path / "study"), "--env", "catch", "--chunk", "6"])  # delays 0..4
    assert not (tmp_path / "study").exists()


def test_first_actions_tell_where_chunks_go():
    """The catch diagnostic: the scripted expert's first actions all land on the copy it chases;
    one that always heads for the table's centre lands on none."""
    expert = study.first_actions(CatchExpertPolicy(chunk_size=4), scenes=20, samples=2)
    assert expert["chased"] >= 0.95 and expert["chased_miss"] < 0.05, expert

    class Centre:
        def infer_batch(self, observations, noise=None):
            return np.zeros((len(observations), 4, 2), np.float32)

    assert study.first_actions(Centre(), scenes=20, samples=2)["none"] >= 0.9
