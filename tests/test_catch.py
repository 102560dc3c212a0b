"""tasks.py's dynamic task (catch): the turning table, its expert, its demos, and what stale
actions cost there; train.py --task catch end to end at toy size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sim
import tasks
from readers import HDF5Dataset
from test_sim import expert_wins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_table_turns_reverses_and_shows_which_way():
    env = tasks.CatchEnv()
    obs = env.reset(3)
    before, omega = env.positions.copy(), env.omega
    env.rng = np.random.default_rng(0)  # a generator whose first draw is above CATCH_FLIP: no reversal
    assert env.rng.random() > tasks.CATCH_FLIP
    env.rng = np.random.default_rng(0)
    env.step(env.agent)  # stand still
    np.testing.assert_allclose(env.positions, tasks.rotate(before, omega), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(env.positions, axis=-1), np.linalg.norm(before, axis=-1))
    # the tint of the background is the way it turns
    corner = lambda o: tuple(o["images"]["top"][0, 0])
    env.omega = tasks.CATCH_OMEGA
    assert corner(env.observation()) == tasks.BACKGROUND
    env.omega = -tasks.CATCH_OMEGA
    assert corner(env.observation()) == tasks.CLOCKWISE_BACKGROUND
    # two objects of the named colour and shape, a distractor of another colour
    assert env.objects[0] == env.objects[1] and " ".join(env.objects[0]) in obs["prompt"]
    assert {c for c, _ in env.objects[2:]}.isdisjoint({env.objects[0][0]})
    # reversals happen, at about CATCH_FLIP a step, reproducibly from the seed
    flips = []
    for seed in range(40):
        env.reset(seed)
        signs = []
        while env.t < env.max_steps:
            signs.append(np.sign(env.omega))
            env.step(env.agent)
        flips.append(int(np.sum(np.diff(signs) != 0)))
    assert 0.10 < np.sum(flips) / (40 * (env.max_steps - 1)) < 0.20
    assert env.reset(5)["prompt"] == env.reset(5)["prompt"]


def test_the_expert_catches_and_a_random_policy_does_not():
    assert expert_wins(tasks.CatchEnv()) >= 95  # the demos' expert: its own pick of the two, intercepted
    expert = sim.evaluate(tasks.CatchExpertPolicy(chunk_size=10), "catch", 100, n_action_steps=1, progress=False)
    random = sim.evaluate(tasks.RandomPolicy(-1.0, 1.0, 2), "catch", 100, progress=False)
    assert expert["success_rate"] >= 0.95 and random["success_rate"] <= 0.35, (expert, random["success_rate"])


def test_stale_actions_cost_success():
    """What the task is for: the same expert, its chunks executed d steps late (s = max(d, 1)),
    loses episodes as d grows, because the table may reverse after the chunk was planned."""
    rates = [sim.evaluate(tasks.CatchExpertPolicy(chunk_size=10), "catch", 100, n_action_steps=max(d, 1), delay=d,
                          progress=False)["success_rate"] for d in (0, 4)]
    assert rates[0] >= 0.95 and rates[1] <= rates[0] - 0.08, rates


def test_catch_demos_and_their_tokenizer(tmp_path):
    sim.main(["demos", "--task", "catch", "--episodes", "6", "--out", str(tmp_path)])
    dataset = HDF5Dataset(tmp_path, chunk_size=4)
    assert all(p.split()[0] in ("catch", "chase", "intercept") for p in dataset.tasks)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert all(sp.unk_id() not in sp.encode(p) for p in dataset.tasks)
    with pytest.raises(ValueError, match="reach task only"):
        tasks.record_demos(tmp_path / "x", 2, degraded=0.5, task="catch")
    with pytest.raises(ValueError, match="unknown task"):
        tasks.record_demos(tmp_path / "x", 2, task="juggle")


def test_train_on_the_catch_task(tmp_path):
    """train.py --task catch: its own cached demos, training, the closed-loop evaluation on catch."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "pi05", "--task", "catch", "--steps", "2",
           "--batch-size", "4", "--demo-episodes", "4", "--eval-episodes", "2", "--warmup", "1"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "built-in task (catch), 2 unseen episodes: success" in res.stdout, res.stdout[-2000:]
    assert json.loads((tmp_path / "runs" / "pi05" / "eval.json").read_text())["env"] == "catch"
    assert (tmp_path / "runs" / "catch_demos_4" / "tokenizer.model").exists()
    res = subprocess.run(cmd[:-6] + ["--task", "juggle"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "--task 'juggle': must be reach or catch" in res.stderr, res.stderr[-800:]


def test_the_expert_command_line_knows_both_tasks(capsys):
    sim.main(["eval", "--expert", "--env", "catch", "--episodes", "5", "--n-action-steps", "1", "--gif", "0"])
    assert "scripted expert on catch: success" in capsys.readouterr().out
    with pytest.raises(ValueError, match="built-in tasks' envs only"):
        sim.main(["eval", "--expert", "--env", "pusht"])
