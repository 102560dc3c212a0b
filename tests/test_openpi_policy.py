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


def test_the_converted_directory_describes_the_robot(converted):
    folder, config, policy = converted
    s, c = policy.settings, robots.OPENPI_CONFIGS[config["openpi_config_name"]]
    assert s["openpi_config"] == config["openpi_config_name"] and s["robot"] == c.robot
    assert s["action_dim"] == config["robot_action_width"] and s["use_quantiles"] == config["use_quantile_norm"]
    assert s["default_prompt"] == config["default_prompt"]
    meta = policy_mod.server_metadata(policy)
    assert meta["robot"] == c.robot and meta["action_horizon"] == config["action_horizon"]
    if c.robot == "aloha":
        assert meta["reset_pose"] == [0, -1.5, 1.5, 0, 0, 0]


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
    raw = raw_observation(np.load(os.path.join(folder, "cases.npz")), "case0/raw/", True)
    cam = raw["images"]["cam_high"]
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
    with pytest.raises(ValueError, match="has 7 values, expected 14"):
        policy.model_inputs([dict(raw, state=raw["state"][:7])])
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
        s = robots.policy_settings(name, use_quantiles=c.model != "pi0")
        robot = robots.ROBOTS[c.robot]
        assert s["action_dim"] == robot.action_width
        if s["delta_mask"] is not None:
            assert len(s["delta_mask"]) <= robot.action_width and not s["delta_mask"][-1]  # grippers absolute
        views = robots.model_overrides(name)["cameras"]
        assert views == list(s["views"]) and len(views) == 3
        assert s["empty_views_masked"] == (c.model != "pi0_fast")
