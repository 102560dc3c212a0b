"""train.py end to end on a tiny HDF5 dataset: DDP equals one process, resume is exact, fp32 masters."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT, train_tiny_sentencepiece

import data
import readers
import recipes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for e in range(4):
        T = 12 + e  # episodes of different lengths: padded steps differ between ranks
        images = {"top": rng.integers(0, 255, (T, 56, 56, 3), dtype=np.uint8)}
        readers.write_hdf5_episode(out / f"ep{e}.hdf5", rng.normal(size=(T, 3)), np.cumsum(rng.normal(size=(T, 2)), 0),
                                images, prompt=["reach the red ball", "go to the blue square"][e % 2], fps=10)
    ds = readers.open_dataset(out, chunk_size=6)
    data.save_norm_stats(data.compute_norm_stats(ds, progress=False), out / "norm_stats.json")
    sp = train_tiny_sentencepiece(["reach the red ball", "go to the blue square",
                                   "Task: reach the red ball, State: 1 2 3 45 128 255 -1;\nAction: "] * 40)
    (out / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    return out


def run(args, out, nproc=1):
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = base + ["train.py", "--out", str(out), "--eval-episodes", "0", "--log-every", "1"] + args
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def common(dataset, model="pi05"):
    """pi0.5 with its whole recipe (FAST co-training, knowledge insulation): the most paths."""
    return ["--model", model, "--data", str(dataset), "--steps", "6", "--batch-size", "8", "--dropout", "0",
            "--warmup", "2", "--save-every", "100"] + (["--fast-targets", "1", "--knowledge-insulation", "1"]
                                                       if model == "pi05" else [])


def test_two_processes_equal_one_and_resume_is_exact(dataset, tmp_path):
    one = run(common(dataset), tmp_path / "one")
    two = run(common(dataset), tmp_path / "two", nproc=2)
    for a, b in zip(one, two):  # same global batch, same noise: the same loss curve
        for k in ("loss", "flow", "ce"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=f"step {a['step']} {k}")
    run(common(dataset) + ["--stop-after", "3"], tmp_path / "resumed")
    resumed = run(common(dataset) + ["--resume"], tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in one]  # bit for bit
    assert os.path.exists(tmp_path / "one" / "final" / "policy.json")


def test_two_node_agents_equal_one_process(dataset, tmp_path):
    """Two torchrun node agents rendezvousing over TCP, as on two hosts of a cluster (here both on
    this machine): the same losses as one process."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
           "train.py", "--out", str(tmp_path / "two"), "--eval-episodes", "0", "--log-every", "1"] + common(dataset, "pi0")
    agents = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, out[-2000:] + err[-4000:]
    two = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    one = run(common(dataset, "pi0"), tmp_path / "one")
    assert len(two) == len(one) == 6
    for a, b in zip(one, two):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5, atol=2e-6, err_msg=f"step {a['step']}")


def test_grad_accumulation_equals_one_big_batch(dataset, tmp_path):
    one = run(common(dataset, "pi0"), tmp_path / "one")
    acc = run(common(dataset, "pi0") + ["--grad-accum", "2"], tmp_path / "acc")
    from PIL import Image  # every run ends with its loss curves
    assert Image.open(tmp_path / "one" / "loss.png").size == (640, 360)
    np.testing.assert_allclose([r["loss"] for r in acc], [r["loss"] for r in one], rtol=2e-5, atol=2e-6)
    # the exported checkpoint plots its predictions against the recorded chunks
    res = subprocess.run([sys.executable, "policy.py", "plot", "--checkpoint", str(tmp_path / "one" / "final"),
                          "--data", str(dataset), "--out", str(tmp_path / "plot.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    from PIL import Image
    assert Image.open(tmp_path / "plot.png").size[0] > 100


def test_bf16_autocast_keeps_fp32_master_weights_and_optimizer_state(dataset, tmp_path):
    run(common(dataset, "pi0") + ["--precision", "bf16", "--steps", "2"], tmp_path / "bf16")
    state = torch.load(tmp_path / "bf16" / "checkpoints" / "step_0000002" / "train_state.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["weights"].values())
    opt = [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert opt and all(t.dtype == torch.float32 for t in opt)
    assert all(v.dtype == torch.float32 for v in state["ema"].values())


def test_fsdp_equals_one_process_and_resumes(dataset, tmp_path):
    one = run(common(dataset), tmp_path / "one")
    run(common(dataset) + ["--fsdp", "--stop-after", "3"], tmp_path / "fsdp", nproc=2)
    fsdp = run(common(dataset) + ["--fsdp", "--resume"], tmp_path / "fsdp", nproc=2)
    np.testing.assert_allclose([r["loss"] for r in fsdp], [r["loss"] for r in one], rtol=2e-5, atol=2e-6)


def test_pi0_fast_trains_and_exports(dataset, tmp_path):
    log = run(["--model", "pi0_fast", "--data", str(dataset), "--steps", "30", "--batch-size", "8",
               "--lr", "2e-3", "--warmup", "5", "--log-every", "10"], tmp_path / "fast")
    assert log[-1]["loss"] < log[0]["loss"] / 1.5
    assert os.path.exists(tmp_path / "fast" / "final" / "fast_tokenizer.json")
    from policy import Policy  # the exported checkpoint serves: chunks of the robot's width, flagged
    policy = Policy(tmp_path / "fast" / "final")
    obs = readers.open_dataset(dataset, chunk_size=6)[0]
    with warnings.catch_warnings():  # an undertrained model's answers may not decode
        warnings.simplefilter("ignore")
        actions = policy.infer_batch([obs, obs])
    assert actions.shape == (2, 6, 2) and np.isfinite(actions).all()
    assert policy.valid.shape == (2,) and policy.valid.dtype == bool


def test_lora_trains_only_adapters_and_merges_exactly():
    sys.path.insert(0, ROOT)
    from pi0 import CONFIGS, Pi0
    from conftest import random_batch
    from checkpoints import merged_state
    from lora import LoRALinear, add_lora
    torch.manual_seed(0)
    model = Pi0(CONFIGS["tiny"])
    model.requires_grad_(False)
    for e in range(2):
        add_lora(model.llm.expert(e), rank=4, alpha=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = random_batch(model.cfg)
    for _ in range(3):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)
    plain = Pi0(CONFIGS["tiny"])  # the merged weights in the plain model give the same outputs
    plain.load_state_dict(merged_state(model))
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim)
    torch.testing.assert_close(plain.sample_actions(batch, noise), model.sample_actions(batch, noise),
                               rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("model", ["pi05", "pi0"])
def test_readme_main_command_shortened(model, tmp_path):
    """The README's main job with few demos and steps: demos generated and cached, training, export,
    closed-loop evaluation with its summary. Checks the pipeline, not the success rate."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--steps", "3", "--batch-size", "8",
           "--demo-episodes", "6", "--eval-episodes", "3", "--warmup", "1"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)  # runs/ lands in tmp
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "expert success 6/6" in res.stdout
    assert "built-in task (reach), 3 unseen episodes: success" in res.stdout, res.stdout[-2000:]
    summary = json.loads((tmp_path / "runs" / model / "eval.json").read_text())
    assert summary["episodes"] == 3 and len(summary["results"]) == 3 and summary["env"] == "builtin"
    assert (tmp_path / "runs" / model / "eval.gif").stat().st_size > 0
    assert (tmp_path / "runs" / "builtin_demos_6" / "norm_stats.json").exists()
    # a second run reuses the cached demonstrations instead of writing them again
    res = subprocess.run(cmd + ["--out", "runs/again", "--eval-episodes", "0"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "expert success" not in res.stdout, res.stderr[-2000:]


def test_initial_weights_do_not_depend_on_what_ran_before():
    """The model is seeded right before it is built: generating the built-in demos in the same
    process (which draws from torch's generator) no longer changes the initial weights, so a
    fresh clone trains exactly what a run with cached demos trains."""
    sys.path.insert(0, ROOT)
    import models
    import train
    a = recipes.parse_args(["--model", "pi05"])[0]
    cfg = models.preset("pi05", "tiny")
    first = train.build_model(a, cfg, torch.device("cpu"), False)[1].state_dict()
    torch.rand(1000)  # what sim.py's demo generation does to the global generator
    second = train.build_model(a, cfg, torch.device("cpu"), False)[1].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fast_vocabulary_is_placed_as_openpi_places_it():
    """With PaliGemma's own 257152-piece tokenizer the fitted FAST ids take the 1024 <loc>
    tokens (it was 257152 - 129 - 257152 = -129, an error); a small tokenizer keeps its pieces."""
    from fast_tokenizer import fast_to_paligemma, fast_vocab_room
    room = fast_vocab_room(257152, 257152)
    assert room == 1024
    ids = fast_to_paligemma(np.arange(room), room, 257152)
    assert ids.max() == 257152 - 129 and ids.min() == 256000  # <loc1023> .. <loc0000>
    assert fast_vocab_room(1024, 512) == 383 and fast_vocab_room(1024, 512, wanted=100) == 100
    assert fast_to_paligemma(np.arange(383), 383, 1024).min() >= 512  # above every text piece (0..511)
    with pytest.raises(ValueError, match="leaves no room"):
        fast_vocab_room(600, 512)


@pytest.mark.parametrize("name", ["pi0", "pi05", "pi0_fast"])
def test_mfu_estimate_runs_for_every_model(name):
    sys.path.insert(0, ROOT)
    import models
    import train
    with torch.device("meta"):
        model = models.build(models.preset(name, "full"))
    mfu = train.estimate_mfu(model, model.cfg, batch=32, step_s=1.0, flops_peak=989e12)
    assert 0.01 < mfu < 1.0, mfu  # about 3.3-4.7 TFLOP per sample at openpi's sizes


def test_readme_main_command_learns(tmp_path):
    """The README's main job, shortened to about two minutes: 300 demonstrations, 1500 steps. It
    must learn: on the scenes it was trained on the policy reproduces the expert far more often
    than a random policy does (5%, sim.py demos prints it; 80% measured on a 2-core CPU). The
    headline figure on unseen scenes needs the full command (README)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "pi05", "--steps", "1500",
           "--demo-episodes", "300", "--eval-episodes", "0"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=2400)  # a hang guard; about 2-4 min alone
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    sys.path.insert(0, ROOT)
    import sim
    import tasks
    from policy import Policy
    r = sim.evaluate(Policy(tmp_path / "runs" / "pi05" / "final"), "builtin", 100, seed=tasks.DEMO_SEED, progress=False)
    assert r["success_rate"] >= 0.5, r["success_rate"]


class PaliGemmaSizedTokenizer:
    """A tiny SentencePiece model that reports PaliGemma's 257152 pieces, as the real tokenizer
    does: the FAST ids must then land on the top <loc> tokens (openpi's placement)."""

    def __init__(self, sp):
        self.sp = sp

    def vocab_size(self):
        return 257152

    def __getattr__(self, name):
        return getattr(self.sp, name)


def test_readme_fine_tune_command_from_a_converted_checkpoint(dataset, tmp_path, monkeypatch):
    """The README's fine-tune, on a tiny config: pi0.5 from a converted openpi checkpoint with
    PaliGemma's vocabulary size, FAST co-training and knowledge insulation on, named cameras."""
    from dataclasses import replace

    sys.path.insert(0, ROOT)
    import convert_jax
    import models
    import pi05
    import train
    cfg = replace(pi05.CONFIGS["tiny"], vocab_size=257152)
    params = tmp_path / "openpi" / "params"
    params.mkdir(parents=True)
    rng = np.random.default_rng(0)
    convert_jax.write_orbax(params, ((k, (rng.standard_normal(s) * 0.05).astype(np.float32))
                                     for k, s in convert_jax.openpi_shapes(cfg).items()))
    convert_jax.convert(tmp_path / "openpi", tmp_path / "pi05_base", action_horizon=6, max_token_len=48)
    real_load = models.load_sentencepiece
    monkeypatch.setattr(models, "load_sentencepiece", lambda path: PaliGemmaSizedTokenizer(real_load(path)))
    a = recipes.parse_args(["--model", "pi05", "--init", str(tmp_path / "pi05_base"), "--data", str(dataset),
                            "--tokenizer", str(dataset / "tokenizer.model"), "--cameras", "base_0_rgb=top",
                            "--fast-targets", "1", "--fast-tokenizer", "fit", "--knowledge-insulation", "1", "--batch-size", "4", "--lr", "2.5e-5",
                            "--steps", "2", "--log-every", "1", "--out", str(tmp_path / "run")])[0]
    train.main(a)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) and r["ce"] > 0 for r in log)
    from fast_tokenizer import FASTTokenizer, fast_to_paligemma
    fast = FASTTokenizer.load(str(tmp_path / "run" / "final" / "fast_tokenizer.json"))
    ids = fast_to_paligemma(np.arange(fast.vocab_size), fast.vocab_size, 257152)
    assert ids.min() >= 256000 and ids.max() == 257152 - 129  # on the <loc> tokens, as openpi's
    settings = json.load(open(tmp_path / "run" / "final" / "policy.json"))
    assert settings["cameras"] == ["top", None, None]  # two views zero-filled and masked


def test_cameras_map_by_name_or_by_flag_and_mismatches_list_both_sides():
    from types import SimpleNamespace
    sys.path.insert(0, ROOT)
    import train
    cfg = SimpleNamespace(cameras=("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"))
    ds = SimpleNamespace(cameras=["observation.images.top", "observation.images.wrist"])
    a = SimpleNamespace(openpi_config=None, cameras=None)
    with pytest.raises(ValueError, match="do not match by name: map them with --cameras"):
        train.camera_map(a, cfg, ds)
    a.cameras = "base_0_rgb=observation.images.top,left_wrist_0_rgb=observation.images.wrist"
    assert train.camera_map(a, cfg, ds) == ["observation.images.top", "observation.images.wrist", None]
    a.cameras = "base_0_rgb=observation.images.top"
    with pytest.raises(ValueError, match=r"cameras that feed no view: \['observation.images.wrist'\]"):
        train.camera_map(a, cfg, ds)
    a.cameras = "base_0_rgb=observation.images.top,wrist=observation.images.wrist"
    with pytest.raises(ValueError, match="not a view or not a camera: {'wrist'"):
        train.camera_map(a, cfg, ds)
    a.cameras = None
    same = SimpleNamespace(cameras=["base_0_rgb", "right_wrist_0_rgb"])  # same names: by name, gaps masked
    assert train.camera_map(a, cfg, same) == ["base_0_rgb", None, "right_wrist_0_rgb"]


@pytest.mark.parametrize("name", ["pi0", "pi05"])
@pytest.mark.parametrize("parts", [("llm", "expert"), ("expert",)])
def test_lora_trainable_counts_follow_openpis_rule(name, parts):
    """Trainable parameters per group, full size, against openpi's own rule computed from its
    parameter tree: LoRA factors per head (q: [N, D, r] + [N, r, H], kv: [2, K, D, r] + [2, K, r, H],
    attention output: [N, H, r] + [N, r, D], MLP: [2, D, r] + [2, r, F], [F, r] + [r, D]); frozen:
    every path matching `.*llm.*` (LoRA on PaliGemma) or `.*llm.*_1.*` (on the action expert only)."""
    import re
    sys.path.insert(0, ROOT)
    import convert_jax
    import models
    from lora import apply_openpi_lora
    cfg = models.preset(name, "full")
    ranks = {"llm": 16, "expert": 32}
    with torch.device("meta"):
        model = models.build(cfg)
        apply_openpi_lora(model, parts, ranks)
    ours = {"lora": 0, "other": 0}
    for n, p_ in model.named_parameters():
        if p_.requires_grad:
            ours["lora" if ".lora_" in n else "other"] += p_.numel()
    frozen = re.compile(".*llm.*" if "llm" in parts else ".*llm.*_1.*")
    want_other = sum(int(np.prod(s)) for path, s in convert_jax.openpi_shapes(cfg).items() if not frozen.match(path))
    want_lora = 0
    for part in parts:
        g, r = (cfg.llm if part == "llm" else cfg.expert), ranks[part]
        D, N, K, H, F_ = g.width, g.num_heads, g.num_kv_heads, g.head_dim, g.mlp_dim
        per_layer = (N * D * r + N * r * H) + (2 * K * D * r + 2 * K * r * H) + (N * H * r + N * r * D) \
            + (2 * D * r + 2 * r * F_) + (F_ * r + r * D)
        want_lora += g.depth * per_layer
    assert ours == {"lora": want_lora, "other": want_other}
    assert not model.llm.embed.weight.requires_grad or "llm" not in parts  # openpi freezes the embedding too


def test_condition_dropout_rate_and_exactness():
    """--condition-dropout p: a share p of the samples train on the prompt without its condition,
    drawn for the whole global batch from (seed, step); each rank takes its rows of one draw."""
    import recipes
    import train_step
    a = recipes.TrainConfig(seed=0, batch_size=2000, condition_dropout=0.3)
    cond, uncond = torch.ones(2000, 4, dtype=torch.long), torch.zeros(2000, 4, dtype=torch.long)
    batch = {"tokens": cond, "token_masks": cond.bool(), "uncond_tokens": uncond, "uncond_token_masks": uncond.bool()}
    out = train_step.drop_conditions(dict(batch), 3, a, 0, 1)
    dropped = (out["tokens"][:, 0] == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.04 and "uncond_tokens" not in out
    halves = [train_step.drop_conditions(dict({k: v[r::2] for k, v in batch.items()}), 3, a, r, 2) for r in range(2)]
    assert torch.equal(halves[1]["tokens"], out["tokens"][1::2])
