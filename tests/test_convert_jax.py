"""convert_jax.py end to end: openpi's orbax checkpoints (the fixtures' two on-disk layouts) ->
our checkpoint directory -> the models' normal loading path -> openpi's own outputs.

Every fixture folder under JAX_REFERENCE_DIR that holds a checkpoint/ is converted; sizes and
flags come from its own config.json.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_close, jax_reference_dir
from safetensors.torch import load_file

import convert_jax
import models
from convert_jax import (config_from_shapes, detect_model, main, model_from_params,
                         openpi_shapes, openpi_to_state_dict, write_orbax)
from models import MODELS


def classes(name):
    """(Config, Model) of a model file, through the registry."""
    return models.spec(name).config, models.spec(name).model

ROOT = jax_reference_dir()
FIXTURES = sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d, "checkpoint")))
# the released layout given as the checkpoint dir, the training layout as a step dir
LAYOUTS = {"released": "checkpoint", "training": os.path.join("checkpoint", "train_format", "1")}


def flags(fx):
    """The CLI flags for what the weights cannot tell, from the fixture's config.json."""
    c = fx.config
    return ["--action-horizon", str(c["action_horizon"]), "--max-token-len", str(c["max_token_len"]),
            "--cameras", ",".join(c["cameras"]), "--action-dim", str(c["action_dim"])]


def test_fixtures_exist():
    assert FIXTURES, f"no <model>/checkpoint folders under {ROOT} (set JAX_REFERENCE_DIR)"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", FIXTURES)
def test_converted_checkpoint_reproduces_openpi(name, layout, jax_fixture, tmp_path):
    fx = jax_fixture(name)
    model_name = fx.config["model"]
    main([os.path.join(fx.dir, LAYOUTS[layout]), str(tmp_path / "ckpt"), "--model", model_name,
          *flags(fx)])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]  # no assets
    # the weights: bit for bit what the same table makes of params.npz
    config_cls, model_cls = classes(model_name)
    with torch.device("meta"):
        reference = openpi_to_state_dict(fx.params, model_cls(fx.model_config(config_cls)))
    converted = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert converted.keys() == reference.keys()
    for k, v in reference.items():
        assert converted[k].dtype == torch.float32 and torch.equal(converted[k], v), k
    # the model's normal loading path, with the architecture read from the weights alone
    model = models.load(tmp_path / "ckpt").eval()
    assert model.cfg == fx.model_config(config_cls)
    batch, out = fx.batch(), fx.outputs
    with torch.no_grad():
        if model_name == "pi0_fast":
            model.cfg.openpi_positions = True  # openpi's training positions, for parity
            batch["token_ar_masks"] = torch.from_numpy(fx.inputs["token_ar_mask"]).long()
            batch["token_loss_masks"] = torch.from_numpy(fx.inputs["token_loss_mask"])
            assert_close(model.compute_loss(batch), out["loss"], 1e-4, 1e-4, "loss")
        else:
            noise, time = torch.from_numpy(fx.inputs["noise"]), torch.from_numpy(fx.inputs["time"])
            x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * batch["actions"]
            assert_close(model.velocity(batch, x_t, time), out["v_t"], 1e-4, 2e-4, "v_t")
            actions = model.sample_actions(batch, noise=torch.from_numpy(fx.inputs["sample_noise"]),
                                           num_steps=10)
            assert_close(actions, out["sample/num_steps_10/actions"], 1e-4, 5e-4, "actions")


def test_accepted_paths():
    """A checkpoint dir, a training step dir, or either's params/ folder."""
    ckpt = os.path.join(ROOT, FIXTURES[0], "checkpoint")
    step = os.path.join(ckpt, "train_format", "1")
    for given, params in [(ckpt, f"{ckpt}/params"), (f"{ckpt}/params", f"{ckpt}/params"),
                          (step, f"{step}/params"), (f"{step}/params", f"{step}/params")]:
        assert convert_jax.find_checkpoint(given) == (params, os.path.join(os.path.dirname(params), "assets"))
    with pytest.raises(FileNotFoundError, match="train_format/params: no orbax checkpoint"):
        convert_jax.find_checkpoint(os.path.dirname(step))  # the run, not one of its steps


def test_norm_stats_from_assets(jax_fixture, tmp_path):
    fx = jax_fixture(FIXTURES[0])
    src = tmp_path / "src"
    shutil.copytree(os.path.join(fx.dir, "checkpoint", "params"), src / "params")
    stats = {aid: {"state": {"mean": [i], "std": [1.0], "q01": [-1.0], "q99": [1.0]}}
             for i, aid in enumerate(["trossen", "physical-intelligence/libero"])}
    for aid, s in stats.items():
        os.makedirs(src / "assets" / aid)
        with open(src / "assets" / aid / "norm_stats.json", "w") as f:
            json.dump({"norm_stats": s}, f)
    with pytest.raises(ValueError, match="several asset ids.*physical-intelligence/libero.*trossen"):
        main([str(src), str(tmp_path / "out"), *flags(fx)])
    with pytest.raises(ValueError, match="asset id droid: no .*found: .*trossen"):
        main([str(src), str(tmp_path / "out"), "--asset-id", "droid", *flags(fx)])
    assert not os.path.exists(tmp_path / "out")  # nothing written on an error
    main([str(src), str(tmp_path / "out"), "--asset-id", "physical-intelligence/libero", *flags(fx)])
    with open(tmp_path / "out" / "norm_stats.json") as f:
        assert json.load(f) == {"norm_stats": stats["physical-intelligence/libero"]}


def test_bf16_output(jax_fixture, tmp_path):
    fx = jax_fixture(FIXTURES[0])
    src = os.path.join(fx.dir, "checkpoint")
    main([src, str(tmp_path / "fp32"), *flags(fx)])
    main([src, str(tmp_path / "bf16"), "--dtype", "bf16", *flags(fx)])
    fp32, bf16 = (load_file(tmp_path / d / "model.safetensors") for d in ("fp32", "bf16"))
    for k, v in fp32.items():
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], v.to(torch.bfloat16)), k


def test_bf16_source(jax_fixture, tmp_path):
    """Checkpoints stored in bfloat16 are read (via ml_dtypes) and widened to fp32 exactly."""
    import ml_dtypes
    fx = jax_fixture(FIXTURES[0])
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in fx.params.items()}
    write_orbax(tmp_path / "src" / "params", bf16.items())
    main([str(tmp_path / "src"), str(tmp_path / "out"), *flags(fx)])
    converted = load_file(tmp_path / "out" / "model.safetensors")
    model = classes(fx.config["model"])[1](fx.model_config(classes(fx.config["model"])[0]))
    expected = openpi_to_state_dict({k: v.astype(np.float32) for k, v in bf16.items()}, model)
    assert all(torch.equal(converted[k], v) for k, v in expected.items())


@pytest.mark.parametrize("name", FIXTURES)
def test_wrong_model_flag_is_an_error(name, jax_fixture, tmp_path):
    fx = jax_fixture(name)
    wrong = next(m for m in MODELS if m != fx.config["model"])
    with pytest.raises(ValueError, match=f"--model {wrong}, but the checkpoint holds a {fx.config['model']}"):
        main([os.path.join(fx.dir, "checkpoint"), str(tmp_path / "out"), "--model", wrong, *flags(fx)])


@pytest.mark.parametrize("name", FIXTURES)
def test_broken_trees_name_the_array(name, jax_fixture, tmp_path):
    fx = jax_fixture(name)
    params = dict(fx.params)
    key = "PaliGemma/llm/layers/mlp/linear"
    build = lambda tree: model_from_params(tree, action_dim=fx.config["action_dim"])
    removed = {k: v for k, v in params.items() if k != key}
    with pytest.raises(ValueError, match=f"missing in checkpoint: {key}"):
        build(removed)
    with pytest.raises(ValueError, match=f"unused in checkpoint: {key}_renamed"):
        build(dict(removed, **{key + "_renamed": params[key]}))
    with pytest.raises(ValueError, match=f"shape: {key}"):
        build(dict(params, **{key: params[key][:, :-1]}))
    sizing = "PaliGemma/llm/layers/attn/q_einsum/w"  # needed to size the model
    with pytest.raises(ValueError, match=f"missing in checkpoint: {sizing} \\(needed to infer"):
        build({k: v for k, v in params.items() if k != sizing})
    # and on disk: a checkpoint written like openpi's, with one array left out
    write_orbax(tmp_path / "broken" / "params", removed.items())
    with pytest.raises(ValueError, match=f"missing in checkpoint: {key}"):
        main([str(tmp_path / "broken"), str(tmp_path / "out"), *flags(fx)])
    write_orbax(tmp_path / "complete" / "params", params.items())  # the same writer: it converts
    main([str(tmp_path / "complete"), str(tmp_path / "out"), *flags(fx)])


def test_detection_needs_one_kind_of_time_conditioning():
    shapes = openpi_shapes(classes("pi0")[0]())  # shapes only: nothing is allocated
    with pytest.raises(ValueError, match="both pi0's state_proj and pi0.5's time_mlp_in"):
        detect_model(dict(shapes, **{"time_mlp_in/kernel": (1024, 1024)}))
    with pytest.raises(ValueError, match="neither pi0's state_proj nor pi0.5's time_mlp_in"):
        detect_model({k: v for k, v in shapes.items() if not k.startswith("state_proj")})


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_full_size_architecture_from_shapes(model_name):
    """The full-size openpi layouts (no weights, only shapes) give back openpi's default configs."""
    cfg = classes(model_name)[0]()
    shapes = openpi_shapes(cfg)
    assert detect_model(shapes) == model_name
    assert config_from_shapes(shapes, model_name) == cfg
    assert cfg.vision.num_heads == 16 and cfg.llm.width == 2048  # So400m/14, Gemma 2B


def test_openpi_shapes_match_fixtures(jax_fixture):
    for name in FIXTURES:
        fx = jax_fixture(name)
        cfg = fx.model_config(classes(fx.config["model"])[0])
        assert openpi_shapes(cfg) == {k: v.shape for k, v in fx.params.items()}, name
        assert np.all([fx.params[k].dtype == np.float32 for k in fx.params])
