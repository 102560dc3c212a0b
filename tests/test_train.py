"""train.py end to end on a tiny HDF5 dataset: DDP equals one process, resume is exact, fp32 masters."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, train_tiny_sentencepiece

import data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for e in range(4):
        T = 12 + e  # episodes of different lengths: padded steps differ between ranks
        images = {"top": rng.integers(0, 255, (T, 56, 56, 3), dtype=np.uint8)}
        data.write_hdf5_episode(out / f"ep{e}.hdf5", rng.normal(size=(T, 3)), np.cumsum(rng.normal(size=(T, 2)), 0),
                                images, prompt=["reach the red ball", "go to the blue square"][e % 2], fps=10)
    ds = data.open_dataset(out, chunk_size=6)
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
    return ["--model", model, "--data", str(dataset), "--steps", "6", "--batch-size", "8", "--dropout", "0",
            "--warmup", "2", "--save-every", "100"]


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


def test_grad_accumulation_equals_one_big_batch(dataset, tmp_path):
    one = run(common(dataset, "pi0"), tmp_path / "one")
    acc = run(common(dataset, "pi0") + ["--grad-accum", "2"], tmp_path / "acc")
    np.testing.assert_allclose([r["loss"] for r in acc], [r["loss"] for r in one], rtol=2e-5, atol=2e-6)


def test_bf16_autocast_keeps_fp32_master_weights_and_optimizer_state(dataset, tmp_path):
    run(common(dataset, "pi0") + ["--precision", "bf16", "--steps", "2"], tmp_path / "bf16")
    state = torch.load(tmp_path / "bf16" / "checkpoint" / "train_state.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["weights"].values())
    opt = [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert opt and all(t.dtype == torch.float32 for t in opt)
    assert all(v.dtype == torch.float32 for v in state["ema"].values())
