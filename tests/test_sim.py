"""sim.py: the built-in reach task, its demos, closed-loop evaluation, and the gym-pusht adapter."""

import json
import math

import numpy as np
import pytest
import torch

import pi05
import sim
import tasks
from data import Transforms, load_norm_stats
from loader import collate
from readers import HDF5Dataset


def random_policy():
    return tasks.RandomPolicy(-1.0, 1.0, action_dim=2)


def expert_wins(env, seeds=range(100)):
    """How many episodes the privileged expert (the one that writes the demos) wins on env."""
    wins = 0
    for seed in seeds:
        env.reset(seed)
        done = False
        while not done:
            _, success, done = env.step(env.expert_action())
        wins += success
    return wins


def test_expert_solves_the_task_and_a_random_policy_does_not():
    assert expert_wins(tasks.ReachEnv()) >= 95  # the privileged expert that writes the demos
    # the expert that sees only the observation, and a random policy, through evaluate()
    expert = sim.evaluate(tasks.ExpertPolicy(), "builtin", 100, progress=False)
    random = sim.evaluate(random_policy(), "builtin", 100, progress=False)
    assert expert["success_rate"] >= 0.95, expert["success_rate"]
    assert random["success_rate"] <= 0.10, random["success_rate"]
    assert expert["mean_length"] < tasks.MAX_STEPS < random["mean_length"] + 5


def test_evaluation_is_reproducible_and_follows_the_chunk_broker():
    run = lambda seed: sim.evaluate(random_policy(), "builtin", 30, seed, n_action_steps=3, batch_size=16,
                                    progress=False)
    a, b, c = run(7), run(7), run(8)
    assert a["results"] == b["results"] and a["successes"] == b["successes"]
    assert [r["prompt"] for r in a["results"]] != [r["prompt"] for r in c["results"]]
    # n_action_steps actions of each chunk run before the next call; episodes share each call
    r = sim.evaluate(tasks.ExpertPolicy(chunk_size=6), "builtin", 20, n_action_steps=4, batch_size=20, progress=False)
    assert r["policy_calls"] == math.ceil(max(x["length"] for x in r["results"]) / 4)


def test_bad_actions_raise():
    env = tasks.ReachEnv()
    env.reset(0)
    with pytest.raises(ValueError, match="action must be 2"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="expected"):
        sim.evaluate(tasks.RandomPolicy(0, 1, action_dim=3), "builtin", 2, progress=False)


def test_wilson_interval():
    assert sim.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert sim.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_demos_write_what_training_reads(tmp_path, capsys):
    sim.main(["demos", "--episodes", "5", "--out", str(tmp_path)])
    assert "expert success 5/5" in capsys.readouterr().out
    ds = HDF5Dataset(tmp_path, chunk_size=6)
    assert ds.num_episodes == 5 and ds.fps == tasks.FPS and ds.cameras == ["top"]
    sample = ds[0]
    env = tasks.ReachEnv()
    first = env.reset(tasks.DEMO_SEED)
    assert sample["prompt"] == env.prompt and sample["images"]["top"].shape == (56, 56, 3)
    np.testing.assert_array_equal(sample["images"]["top"], first["images"]["top"])
    np.testing.assert_allclose(sample["state"], first["state"])
    np.testing.assert_allclose(sample["actions"][0], env.expert_action(), atol=1e-6)
    assert sample["actions"].shape == (6, 2)
    stats = load_norm_stats(tmp_path / "norm_stats.json")
    assert {len(stats[k]["q99"]) for k in ("state", "actions")} == {2}

    # the tokenizer: PaliGemma's special ids, and every prompt format short and in-vocabulary
    import sentencepiece as spm
    from pi05 import CONFIGS, Pi05, tokenize_prompt
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.get_piece_size() <= 512 and (sp.pad_id(), sp.eos_id(), sp.bos_id()) == (0, 1, 2)
    assert len(sp.encode("\n")) == 1 and len(sp.encode("Action: |")) <= 3
    for prompt in ["move to the yellow square", "reach the red ball"]:
        text = pi05.prompt_text(prompt, [-1, 255, 0, 128])
        assert not any(sp.is_byte(i) for i in sp.encode(text)), [sp.id_to_piece(i) for i in sp.encode(text)]

    # one demo batch through the tiny pi0.5: the data fit the model the project demo trains
    cfg = CONFIGS["tiny"]
    transforms = Transforms(tokenize=lambda p, s: tokenize_prompt(sp, p, s, 16), cameras=["top", None, None],
                            norm_stats=str(tmp_path / "norm_stats.json"), use_quantiles=True,
                            state_dim=cfg.action_dim, action_dim=cfg.action_dim, image_size=56)
    batch = collate([transforms(ds[i]) for i in range(0, len(ds), 7)])
    assert batch["token_masks"].sum(1).max() <= 16 and batch["tokens"].max() < cfg.vocab_size
    torch.manual_seed(0)
    assert torch.isfinite(Pi05(cfg)(batch)["loss"])


def test_eval_command_writes_summary_and_gif(tmp_path, capsys):
    sim.main(["eval", "--expert", "--episodes", "6", "--gif", "2", "--out", str(tmp_path)])
    assert "success 6/6" in capsys.readouterr().out
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["successes"] == 6 and len(summary["ci95"]) == 2 and len(summary["results"]) == 6
    from PIL import Image
    gif = Image.open(tmp_path / "eval.gif")
    assert gif.n_frames == 1 + max(r["length"] for r in summary["results"][:2])


def test_pusht_adapter_closed_loop():
    pytest.importorskip("gym_pusht")

    class Checked(tasks.RandomPolicy):
        def infer_batch(self, observations, noise=None):
            for obs in observations:
                assert obs["images"]["observation.image"].shape == (96, 96, 3)
                assert obs["images"]["observation.image"].dtype == np.uint8
                assert obs["state"].shape == (2,) and obs["state"].dtype == np.float32
                assert obs["prompt"].startswith("Push the T")
            return super().infer_batch(observations)

    r = sim.evaluate(Checked(0.0, 512.0, action_dim=2), "pusht", 2, seed=0, n_action_steps=4,
                     env_kwargs={"max_steps": 10}, record=1, progress=False)
    assert [x["length"] for x in r["results"]] == [10, 10] and r["successes"] == 0
    assert len(r["videos"][0][0]) == 11 and r["policy_calls"] == 3


def test_missing_extra_names_the_pip_package(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "gym_aloha", None)  # as if not installed: importing it raises
    with pytest.raises(ImportError, match="pip install gym-aloha"):
        sim.make_env("aloha")
