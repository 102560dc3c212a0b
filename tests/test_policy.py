"""policy.py: Policy on raw observations, and the websocket server against the real openpi-client
package (PyPI `openpi-client`)."""

import asyncio
import json
import threading
import urllib.request

import numpy as np
import pytest
import torch
from conftest import train_tiny_sentencepiece

import models
import pi0
import policy as policy_mod
import robots



def make_checkpoint(path):
    """A tiny pi0 checkpoint directory for a LIBERO-like robot: 2 cameras, state 8, actions 7."""
    torch.manual_seed(0)
    model = pi0.Pi0(pi0.CONFIGS["tiny"])
    sp = train_tiny_sentencepiece(["pick up the red block", "put the bowl on the plate"] * 40, vocab_size=300)
    tok = path.parent / "tokenizer.model"
    tok.write_bytes(sp.serialized_model_proto())
    stats = {"state": {"mean": np.zeros(8), "std": np.ones(8) * 2},
             "actions": {"mean": np.arange(7) * 0.1, "std": np.ones(7) * 0.5}}
    # openpi's LIBERO robot (requests in its keys, by name), without pi0_libero's deltas
    policy = dict(robots.policy_settings("pi0_libero"), delta_mask=None)
    models.save_pretrained(model, path, norm_stats=stats, extra_files=[tok], json_files={"policy.json": policy})


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
    policy = policy_mod.Policy(ckpt, compiled=True)
    loop, ready, box = asyncio.new_event_loop(), threading.Event(), {}

    async def main():
        async with policy_mod.make_server(policy, "127.0.0.1", 0, {"robot": "libero"}) as srv:
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
        expected = policy.infer(obs, noise=noise)
        assert out["actions"].shape == (cfg.action_horizon, 7) and out["actions"].dtype == np.float32
        np.testing.assert_allclose(out["actions"], expected["actions"], rtol=0, atol=1e-5)
        assert "infer_ms" in out["policy_timing"] and "infer_ms" in out["server_timing"]
        assert ("prev_total_ms" in out["server_timing"]) == (i > 0)  # absent on the first request
    # a seed makes a request deterministic without sending noise
    a, b = client.infer(dict(obs, seed=3)), client.infer(dict(obs, seed=3))
    np.testing.assert_array_equal(a["actions"], b["actions"])
    # cameras are read by key name: swapping the two images changes the answer
    swapped = dict(obs, **{"observation/image": obs["observation/wrist_image"],
                           "observation/wrist_image": obs["observation/image"]})
    assert np.abs(client.infer(dict(swapped, noise=noise))["actions"] - out["actions"]).max() > 1e-4
    # another robot's request is an error frame naming what this checkpoint takes
    with pytest.raises(RuntimeError, match="libero observation lacks \['observation/image'"):
        WebsocketClientPolicy("127.0.0.1", port).infer(
            {"images": {"image": obs["observation/image"]}, "state": obs["observation/state"], "prompt": "x"})


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
    with pytest.raises(RuntimeError, match="expected \\(height, width, 3\\)"):
        client.infer(bad)
    client = WebsocketClientPolicy("127.0.0.1", port)  # a following client is served normally
    out = client.infer(libero_obs(np.random.default_rng(2)))
    assert out["actions"].shape == (6, 7) and np.isfinite(out["actions"]).all()




@pytest.mark.parametrize("case, message", [
    ("nan_state", "state has NaN or inf"),
    ("float_image_out_of_range", "image 'observation/image' is float32 with values in [255, 255]"),
    ("uint16_image", "image 'observation/image' has dtype uint16"),
    ("bad_noise", "request 'noise' has shape (3, 3)"),
    ("absurd_noise", "expected N(0, 1) draws"),
    ("absurd_state", "state dims [0] are [1e+30], over 1e4 times the scale"),
    ("narrow_state", "libero state (observation/state) has 2 values, expected 8"),
    ("state_2d", "state 'observation/state' has shape (1, 8): expected a 1-D vector"),
    ("empty_image", "image 'observation/image' has shape (0, 0, 3), expected (height, width, 3), not empty"),
    ("prompt_int", "request 'prompt' is int 123: expected text"),
    ("float_seed", "request 'seed' is float 1.7: expected an integer >= 0"),
    ("float_delay", "request 'delay' is float 1.5: expected an integer >= 0"),
    ("text_delay", "request 'delay' is str '1': expected an integer >= 0"),
    ("nan_prev_actions", "prev_actions has NaN or inf"),
])
def test_every_bad_request_gets_an_error_frame_and_the_next_is_served(server, case, message):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    _, port = server
    obs = libero_obs(np.random.default_rng(3))
    rtc = dict(prev_actions=np.zeros((6, 7), np.float32), delay=1, execution_horizon=2)
    change = {
        "nan_state": {"observation/state": np.full(8, np.nan, np.float32)},
        "float_image_out_of_range": {"observation/image": np.full((64, 64, 3), 255.0, np.float32)},
        "uint16_image": {"observation/image": np.zeros((64, 64, 3), np.uint16)},
        "bad_noise": {"noise": np.zeros((3, 3), np.float32)},
        "absurd_noise": {"noise": np.full((6, 8), 1e30, np.float32)},
        "absurd_state": {"observation/state": np.array([1e30] + [0] * 7, np.float32)},
        "narrow_state": {"observation/state": np.zeros(2, np.float32)},
        "state_2d": {"observation/state": np.zeros((1, 8), np.float32)},
        "empty_image": {"observation/image": np.zeros((0, 0, 3), np.uint8)},
        "prompt_int": {"prompt": 123},
        "float_seed": {"seed": 1.7},
        "float_delay": dict(rtc, delay=1.5),
        "text_delay": dict(rtc, delay="1"),
        "nan_prev_actions": dict(rtc, prev_actions=np.full((6, 7), np.nan, np.float32)),
    }[case]
    obs.update(change)
    with pytest.raises(RuntimeError) as e:
        WebsocketClientPolicy("127.0.0.1", port).infer(obs)
    assert message in str(e.value)
    out = WebsocketClientPolicy("127.0.0.1", port).infer(libero_obs(np.random.default_rng(4)))
    assert out["actions"].shape == (6, 7) and np.isfinite(out["actions"]).all()


def test_float_images_in_unit_range_are_served_as_openpi_does(server):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    policy, port = server
    obs = libero_obs(np.random.default_rng(5))
    as_float = dict(obs, **{k: obs[k].astype(np.float32) / 255 for k in ("observation/image", "observation/wrist_image")},
                    noise=np.zeros((6, 8), np.float32))
    as_uint8 = dict(obs, noise=np.zeros((6, 8), np.float32))
    client = WebsocketClientPolicy("127.0.0.1", port)
    a, b = client.infer(as_float)["actions"], client.infer(as_uint8)["actions"]
    np.testing.assert_allclose(a, b, atol=0.02)  # 255 * (x / 255) truncates to x or x - 1


def test_oversized_request_is_refused_and_metadata_describes_the_checkpoint(tmp_path):
    import websockets.exceptions
    import websockets.sync.client
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt)
    policy = policy_mod.Policy(ckpt, compiled=True)
    meta = policy_mod.server_metadata(policy)
    assert meta == {"model": "pi0", "action_horizon": 6, "action_dim": 7, "robot": "libero",
                    "openpi_config": "pi0_libero", "cameras": ["observation/image", "observation/wrist_image"],
                    "dtype": "float32"}
    loop, ready, box = asyncio.new_event_loop(), threading.Event(), {}

    async def main():
        async with policy_mod.make_server(policy, "127.0.0.1", 0, max_message_mb=0.5) as srv:
            box["server"], box["port"] = srv, srv.sockets[0].getsockname()[1]
            ready.set()
            await srv.wait_closed()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        with websockets.sync.client.connect(f"ws://127.0.0.1:{box['port']}", max_size=None) as ws:
            import msgpack
            assert msgpack.unpackb(ws.recv()) == meta  # the metadata frame
            ws.send(b"x" * (1 << 20))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
                ws.recv()
            assert e.value.rcvd.code == 1009  # message too big
    finally:
        loop.call_soon_threadsafe(box["server"].close)
        thread.join(10)


def test_requests_with_and_without_the_previous_chunk(server):
    """Real-time chunking over the wire: a request may carry the previous chunk, the delay and
    the execution horizon; the reply is Policy's guided chunk."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    policy, port = server
    client = WebsocketClientPolicy("127.0.0.1", port)
    obs = libero_obs(np.random.default_rng(7))
    noise = np.random.default_rng(8).standard_normal((6, 8)).astype(np.float32)
    plain = client.infer(dict(obs, noise=noise))["actions"]
    prev = plain + 0.5
    guided = client.infer(dict(obs, noise=noise, prev_actions=prev, delay=2, execution_horizon=2))["actions"]
    local = policy.infer(obs, noise, prev_actions=prev,
                         delay=2, execution_horizon=2)["actions"]
    np.testing.assert_allclose(guided, local, atol=1e-5)
    assert np.abs(guided - plain).max() > 1e-3  # the guidance changed the chunk
    with pytest.raises(RuntimeError, match="needs 'prev_actions'"):
        client.infer(dict(obs, delay=2))


def test_a_nan_weight_is_refused_at_load_and_nan_actions_are_never_served(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt)
    policy = policy_mod.Policy(ckpt)
    monkeypatch.setattr(policy, "sample", lambda *a, **k: torch.full((1, 6, 8), float("nan")))
    with pytest.raises(FloatingPointError, match="NaN or inf actions .*not served"):
        policy.infer(libero_obs(np.random.default_rng(0)))
    weights = load_file(ckpt / "model.safetensors")
    weights["action_out_proj.weight"][0, 0] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"config": json.dumps(policy.model.cfg.to_dict(),
                                                                                   sort_keys=True)})
    with pytest.raises(ValueError, match=r"model.safetensors: NaN or inf in 1 tensor\(s\): action_out_proj.weight"):
        policy_mod.Policy(ckpt)


@pytest.mark.parametrize("edit, message", [
    (dict(robot="spot"), "robot 'spot' is not one of"),
    (dict(cameras=["a", "b"]), "'cameras' is \\['a', 'b'\\]: expected one camera name \\(or null\\) per model view"),
    (dict(action_dim=9), "action_dim 9: expected an integer in \\[1, 7\\]"),
])
def test_a_bad_policy_json_is_an_error_at_load(tmp_path, edit, message):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt)
    settings = json.loads((ckpt / "policy.json").read_text())
    (ckpt / "policy.json").write_text(json.dumps(dict(settings, **edit)))
    with pytest.raises(ValueError, match=message):
        policy_mod.Policy(ckpt)
