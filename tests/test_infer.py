"""infer.py: the fast sampler against the readable one, and the websocket server against the real
openpi-client package (PyPI `openpi-client`)."""

import asyncio
import os
import threading
import urllib.request

import numpy as np
import pytest
import torch
from conftest import random_batch, train_tiny_sentencepiece

import infer
import pi0
import pi05


def tiny_model(module, cls):
    torch.manual_seed(0)
    model = cls(module.CONFIGS["tiny"]).eval()
    for name, p in model.named_parameters():  # adaRMS starts at zero: make pi0.5's time matter
        if "dense" in name:
            p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("module, cls", [(pi0, pi0.Pi0), (pi05, pi05.Pi05)], ids=["pi0", "pi05"])
def test_fast_sampler_matches_readable(module, cls):
    model = tiny_model(module, cls)
    cfg = model.cfg
    sampler = infer.FastSampler(model)
    for seed in (0, 1):  # a second observation reuses the static buffers
        batch = random_batch(cfg, B=2, seed=seed, actions=False)  # padded prompts, a masked camera
        assert not batch["token_masks"].all() and not batch["image_masks"].all()
        noise = torch.randn(2, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))
        expected = model.sample_actions(batch, noise=noise)
        torch.testing.assert_close(sampler(batch, noise), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("INFER_COMPILE_TEST"),
                    reason="torch.compile takes ~150 s on a 2-core CPU; set INFER_COMPILE_TEST=1")
def test_compiled_sampler_matches_readable():
    model = tiny_model(pi05, pi05.Pi05)
    batch = random_batch(model.cfg, B=2, actions=False)
    noise = torch.randn(2, model.cfg.action_horizon, model.cfg.action_dim)
    sampler = infer.FastSampler(model, compile_mode="default")
    torch.testing.assert_close(sampler(batch, noise), model.sample_actions(batch, noise=noise), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# serve: openpi's websocket protocol, driven by openpi_client

def make_checkpoint(path):
    """A tiny pi0 checkpoint directory for a LIBERO-like robot: 2 cameras, state 8, actions 7."""
    torch.manual_seed(0)
    model = pi0.Pi0(pi0.CONFIGS["tiny"])
    sp = train_tiny_sentencepiece(["pick up the red block", "put the bowl on the plate"] * 40, vocab_size=300)
    tok = path.parent / "tokenizer.model"
    tok.write_bytes(sp.serialized_model_proto())
    stats = {"state": {"mean": np.zeros(8), "std": np.ones(8) * 2},
             "actions": {"mean": np.arange(7) * 0.1, "std": np.ones(7) * 0.5}}
    policy = {"cameras": ["image", "wrist_image", None], "use_quantiles": False, "delta_mask": None,
              "action_dim": 7, "state_dim": 8}
    pi0.save_pretrained(model, path, norm_stats=stats, extra_files=[tok], json_files={"policy.json": policy})


def libero_obs(rng, size=64):
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.standard_normal(8).astype(np.float32),
            "prompt": "pick up the red block"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server on a free loopback port, in a thread with its own event loop."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny_pi0"
    make_checkpoint(ckpt)
    policy = infer.Policy(ckpt, fast=True)
    loop, ready, box = asyncio.new_event_loop(), threading.Event(), {}

    async def main():
        async with infer.make_server(policy, "127.0.0.1", 0, {"robot": "libero"}) as srv:
            box["server"], box["port"] = srv, srv.sockets[0].getsockname()[1]
            ready.set()
            await srv.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30), "server did not start"
    yield policy, box["port"]
    loop.call_soon_threadsafe(box["server"].close)
    thread.join(10)


def test_serve_matches_policy_with_openpi_client(server):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    policy, port = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read().strip() == b"OK"
    client = WebsocketClientPolicy("127.0.0.1", port)
    assert client.get_server_metadata() == {"robot": "libero"}
    rng = np.random.default_rng(0)
    cfg = policy.model.cfg
    for i in range(2):
        obs = libero_obs(rng)
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        out = client.infer(dict(obs, noise=noise))
        expected = policy.infer({"images": {"image": obs["observation/image"],
                                            "wrist_image": obs["observation/wrist_image"]},
                                 "state": obs["observation/state"], "prompt": obs["prompt"]}, noise=noise)
        assert out["actions"].shape == (cfg.action_horizon, 7) and out["actions"].dtype == np.float32
        np.testing.assert_allclose(out["actions"], expected["actions"], rtol=0, atol=1e-5)
        assert "infer_ms" in out["policy_timing"] and "infer_ms" in out["server_timing"]
        assert ("prev_total_ms" in out["server_timing"]) == (i > 0)  # absent on the first request
    # a seed makes a request deterministic without sending noise
    a, b = client.infer(dict(obs, seed=3)), client.infer(dict(obs, seed=3))
    np.testing.assert_array_equal(a["actions"], b["actions"])
    # the dataset's own keys work too
    own = client.infer({"images": {"image": obs["observation/image"], "wrist_image": obs["observation/image"]},
                        "state": obs["observation/state"],
                        "prompt": "x", "noise": noise})
    assert own["actions"].shape == (cfg.action_horizon, 7)


def test_serve_errors_then_serves_next_client(server):
    import websockets.sync.client
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    _, port = server
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
        ws.recv()  # metadata
        ws.send(b"\xc1 not msgpack")
        reply = ws.recv()
        assert isinstance(reply, str) and "Traceback" in reply  # errors are text frames
    client = WebsocketClientPolicy("127.0.0.1", port)
    bad = libero_obs(np.random.default_rng(1))
    bad["observation/image"] = np.zeros((64, 64), np.uint8)  # wrong shape
    with pytest.raises(RuntimeError, match="expected \\(H, W, 3\\)"):
        client.infer(bad)
    client = WebsocketClientPolicy("127.0.0.1", port)  # a following client is served normally
    out = client.infer(libero_obs(np.random.default_rng(2)))
    assert out["actions"].shape == (6, 7) and np.isfinite(out["actions"]).all()


@pytest.mark.parametrize("model, extra", [("pi05", ["--compare-uncached"]), ("pi0_fast", ["--decode-tokens", "4"])])
def test_bench_command_prints_settings_phases_and_json(model, extra):
    """The benchmark runs end to end on CPU and ends in one JSON line (a command, not a timing test)."""
    import json
    import subprocess
    import sys
    from conftest import ROOT
    res = subprocess.run([sys.executable, "infer.py", "bench", "--model", model, "--config", "tiny", "--iters", "2",
                          "--views", "1"] + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith(f"settings: model={model} config=tiny device=cpu")
    result = json.loads(lines[-1])
    assert result["model"] == model and result["p50_ms"] > 0 and result["peak_mib"] > 0
    if model == "pi0_fast":
        assert result["decode_tokens"] == 4 and result["prefill_ms"] > 0
    else:
        assert {"vision_ms", "prefix_ms", "denoise_ms", "uncached_p50_ms", "readable_p50_ms"} <= set(result)
