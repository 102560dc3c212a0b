"""openpi's robot configs as data: what each robot sends, how it reaches the model, what goes back.

A released openpi checkpoint is only half of a policy. The other half is its *config* (openpi's
`training/config.py` + `policies/*_policy.py`): which request key feeds which model camera, which
views are zero-filled and whether the model may look at them, how the state is assembled, ALOHA's
joint flips and gripper conversion (`adapt_to_pi`), which action dims are deltas, the chunk length,
the prompt format, the default prompt, z-score or quantile stats and where they live in the
checkpoint's assets. Get one of them wrong and the model still answers, with wrong actions.

Here that half is two tables, read top to bottom:

  ROBOTS          one entry per robot family (ALOHA, DROID, LIBERO): its request keys, its
                  cameras per model, its state, its action width, its delta mask;
  OPENPI_CONFIGS  one entry per openpi config name: the family plus the per-config overrides
                  (model, horizon, default prompt, asset id, deltas on or off, training recipe).

`policy_settings(name, model_cfg)` turns an entry into the `policy.json` a checkpoint carries
(convert_jax.py --openpi-config and train.py --openpi-config write it); `robot_inputs` and
`robot_outputs` are openpi's `<Robot>Inputs` / `<Robot>Outputs` for it, used by policy.Policy at
inference and by train.py on LeRobot data (with the actions). Everything else (normalization,
resize-with-pad, the prompt, padding) is data.Transforms, shared with checkpoints trained here.

Values are openpi's (commit 15a9616: `training/config.py`, `policies/{aloha,droid,libero}_policy.py`).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import models
from episodes import DatasetView, as_uint8_image, check_finite
from readers import open_dataset

# ----------------------------------------------------------------------------------------------
# ALOHA's adapt_to_pi: the space of the ALOHA runtime -> the space pi's base models were trained in
#
# The pi runtime flips the sign of four joints and measures the grippers as an angle; the standard
# ALOHA runtime reports a linear finger position. openpi converts on the way in (state; at training
# also the actions, with the inverse of the output map) and back on the way out (actions).

ALOHA_JOINT_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], np.float64)  # 2 x (6 joints, gripper)
ALOHA_GRIPPERS = [6, 13]


def gripper_to_angular(x):
    """ALOHA state gripper (normalized linear position) -> pi's normalized gripper angle."""
    x = x * (0.05800 - 0.01844) + 0.01844  # ALOHA's puppet gripper range, closed .. open, in metres
    # the inverse of Interbotix's angle -> finger position linkage (arm 0.036 m, horn 0.022 m)
    arm, horn = 0.036, 0.022
    angle = np.arcsin(np.clip((horn ** 2 + x ** 2 - arm ** 2) / (2 * horn * x), -1.0, 1.0))
    return (angle - 0.5476) / (1.6296 - 0.5476)  # pi's encoder range (2405 .. 3110 of 4096), radians


def gripper_from_angular(x):
    """pi's gripper action -> ALOHA's gripper joint command (a linear map, not the inverse above)."""
    return (x + 0.5476 - (-0.6213)) / (1.4910 - (-0.6213))  # ALOHA's gripper joint range, radians


def gripper_from_angular_inv(x):
    """The inverse of gripper_from_angular: recorded ALOHA actions -> pi's space, for training."""
    return x * (1.4910 - (-0.6213)) + (-0.6213) - 0.5476


def aloha_state_to_pi(state):
    state = ALOHA_JOINT_FLIP * state
    state[..., ALOHA_GRIPPERS] = gripper_to_angular(state[..., ALOHA_GRIPPERS])
    return state


def aloha_actions_from_pi(actions):
    actions = ALOHA_JOINT_FLIP * actions
    actions[..., ALOHA_GRIPPERS] = gripper_from_angular(actions[..., ALOHA_GRIPPERS])
    return actions


def aloha_actions_to_pi(actions):
    actions = ALOHA_JOINT_FLIP * actions
    actions[..., ALOHA_GRIPPERS] = gripper_from_angular_inv(actions[..., ALOHA_GRIPPERS])
    return actions


# ----------------------------------------------------------------------------------------------
# Robot families


def make_bool_mask(*dims):
    """openpi's make_bool_mask: (6, -1, 6, -1) -> 6 x True, 1 x False, 6 x True, 1 x False."""
    return np.concatenate([np.full(abs(d), d > 0) for d in dims]).astype(bool)



@dataclass(frozen=True)
class Robot:
    """One robot family, openpi's <Robot>Inputs / <Robot>Outputs.

    views: model camera -> request image key, or None for a view this robot does not have (a
    zero image; pi0 / pi0.5 mask it out, pi0-FAST looks at it). fast_views: the same for pi0-FAST
    where its camera names differ."""
    views: dict
    state: tuple                  # request keys, concatenated (in order) into the state
    state_widths: tuple           # their widths
    action_width: int             # the robot's action dims; outputs are sliced to them
    delta_mask: tuple             # make_bool_mask dims of the joints that become deltas
    image_group: str | None = None  # ALOHA nests its images under "images"; the others are flat
    optional_images: tuple = ()   # may be absent: zero image, masked (ALOHA's wrist cameras)
    ignored_images: tuple = ()    # accepted and unused (ALOHA's cam_low)
    fast_views: dict | None = None
    adapt_to_pi: bool = False
    dataset: dict = field(default_factory=dict)   # training: request key <- LeRobot key (repack)


ROBOTS = {
    # Bimanual ALOHA (Trossen): {"images": {"cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist":
    # uint8 CHW}, "state": 14}; state and actions are 2 x (6 joints, gripper).
    "aloha": Robot(
        views={"base_0_rgb": "cam_high", "left_wrist_0_rgb": "cam_left_wrist", "right_wrist_0_rgb": "cam_right_wrist"},
        state=("state",), state_widths=(14,), action_width=14, delta_mask=(6, -1, 6, -1),
        image_group="images", optional_images=("cam_left_wrist", "cam_right_wrist"), ignored_images=("cam_low",),
        adapt_to_pi=True,
        dataset={"images/cam_high": "observation.images.top", "state": "observation.state", "actions": "action"}),
    # DROID (Franka): an exterior and a wrist camera, 7 joint positions + 1 gripper position;
    # actions are 7 joint velocities + the gripper position (so no deltas by default).
    "droid": Robot(
        views={"base_0_rgb": "observation/exterior_image_1_left", "left_wrist_0_rgb": "observation/wrist_image_left",
               "right_wrist_0_rgb": None},
        fast_views={"base_0_rgb": "observation/exterior_image_1_left", "base_1_rgb": None,
                    "wrist_0_rgb": "observation/wrist_image_left"},
        state=("observation/joint_position", "observation/gripper_position"), state_widths=(7, 1), action_width=8,
        delta_mask=(7, -1),
        dataset={"observation/exterior_image_1_left": "exterior_image_1_left",
                 "observation/wrist_image_left": "wrist_image_left", "observation/joint_position": "joint_position",
                 "observation/gripper_position": "gripper_position", "actions": "actions"}),
    # LIBERO (simulated Franka): agent view + wrist view, state = eef position 3 + axis-angle 3 +
    # gripper 2, actions 7 (the dataset's actions are already deltas; pi0 adds a second delta).
    "libero": Robot(
        views={"base_0_rgb": "observation/image", "left_wrist_0_rgb": "observation/wrist_image",
               "right_wrist_0_rgb": None},
        state=("observation/state",), state_widths=(8,), action_width=7, delta_mask=(6, -1),
        dataset={"observation/image": "image", "observation/wrist_image": "wrist_image",
                 "observation/state": "state", "actions": "actions"}),
}


# ----------------------------------------------------------------------------------------------
# openpi's configs: a family plus overrides


@dataclass(frozen=True)
class OpenpiConfig:
    robot: str
    model: str                            # pi0 | pi05 | pi0_fast
    asset_id: str                         # the norm stats: <checkpoint>/assets/<asset_id>/norm_stats.json
    action_horizon: int | None = None     # None: the model's default (50 for pi0 / pi0.5)
    action_dim: int | None = None         # pi0-FAST: the width its tokens encode
    max_token_len: int | None = None      # None: the model's default (48 / 200 / 250)
    model_fields: dict = field(default_factory=dict)  # other fields of the model's config it sets
    default_prompt: str | None = None
    deltas: bool = False                  # joints as deltas against the chunk's first state
    repo_id: str | None = None            # training data (LeRobot repo id)
    dataset: dict | None = None           # training repack, if not the family's
    prompt_from_task: bool = False        # training prompt = the LeRobot task
    base_stats: bool = False              # training normalizes with the base checkpoint's stats
    metadata: dict = field(default_factory=dict)  # openpi's policy_metadata, sent to a client on connect


_PEN = {"images/cam_high": "observation.images.cam_high", "images/cam_left_wrist": "observation.images.cam_left_wrist",
        "images/cam_right_wrist": "observation.images.cam_right_wrist", "state": "observation.state",
        "actions": "action"}
_RESET = {"reset_pose": [0, -1.5, 1.5, 0, 0, 0]}  # the four ALOHA inference configs' policy_metadata
_FAST = {"openpi_positions": True}  # pi0-FAST: openpi's decoding positions (its off-by-one), for its actions

OPENPI_CONFIGS = {
    # ALOHA: inference configs for the base models, and the fine-tunes
    "pi0_aloha": OpenpiConfig("aloha", "pi0", "trossen", deltas=True, metadata=_RESET),
    "pi05_aloha": OpenpiConfig("aloha", "pi05", "trossen", deltas=True, metadata=_RESET),
    "pi0_aloha_towel": OpenpiConfig("aloha", "pi0", "trossen", deltas=True, default_prompt="fold the towel",
                                    metadata=_RESET),
    "pi0_aloha_tupperware": OpenpiConfig("aloha", "pi0", "trossen", deltas=True, metadata=_RESET,
                                         default_prompt="open the tupperware and put the food on the plate"),
    "pi0_aloha_pen_uncap": OpenpiConfig("aloha", "pi0", "trossen", deltas=True, default_prompt="uncap the pen",
                                        repo_id="physical-intelligence/aloha_pen_uncap_diverse", dataset=_PEN,
                                        base_stats=True),
    "pi05_aloha_pen_uncap": OpenpiConfig("aloha", "pi05", "trossen", deltas=True, default_prompt="uncap the pen",
                                         repo_id="physical-intelligence/aloha_pen_uncap_diverse", dataset=_PEN,
                                         base_stats=True),
    "pi0_aloha_sim": OpenpiConfig("aloha", "pi0", "lerobot/aloha_sim_transfer_cube_human", default_prompt="Transfer cube",
                                  repo_id="lerobot/aloha_sim_transfer_cube_human"),
    # DROID: joint velocities out, so absolute actions
    "pi0_droid": OpenpiConfig("droid", "pi0", "droid", action_horizon=10),
    "pi05_droid": OpenpiConfig("droid", "pi05", "droid", action_horizon=15),
    "pi0_fast_droid": OpenpiConfig("droid", "pi0_fast", "droid", action_horizon=10, action_dim=8, model_fields=_FAST),
    "pi05_droid_finetune": OpenpiConfig("droid", "pi05", "droid", action_horizon=16, prompt_from_task=True,
                                        base_stats=True),
    # trained from DROID's RLDS release in joint-position space: the 7 joints become deltas
    "pi05_full_droid_finetune": OpenpiConfig("droid", "pi05", "droid", action_horizon=16, deltas=True,
                                             base_stats=True),
    "pi0_fast_full_droid_finetune": OpenpiConfig("droid", "pi0_fast", "droid", action_horizon=16, action_dim=8,
                                                 max_token_len=180, deltas=True, model_fields=_FAST),
    # DROID in joint-position space (openpi's PolaRiS configs, trained from RLDS: deltas on the
    # joints, the checkpoint's own `droid` stats) and RoboArena's DROID baselines
    "pi05_droid_jointpos_polaris": OpenpiConfig("droid", "pi05", "droid", action_horizon=15, deltas=True,
                                                base_stats=True),
    "pi0_droid_jointpos_polaris": OpenpiConfig("droid", "pi0", "droid", action_horizon=10, max_token_len=100,
                                               deltas=True, base_stats=True),
    "pi0_droid_jointpos_100k_polaris": OpenpiConfig("droid", "pi0", "droid", action_horizon=10, max_token_len=100,
                                                    deltas=True, base_stats=True),
    "pi0_fast_droid_jointpos_polaris": OpenpiConfig("droid", "pi0_fast", "droid", action_horizon=10, action_dim=8,
                                                    max_token_len=180, deltas=True, base_stats=True,
                                                    model_fields=_FAST),
    "paligemma_fast_droid": OpenpiConfig("droid", "pi0_fast", "droid", action_horizon=15, action_dim=8,
                                         prompt_from_task=True, model_fields=_FAST),
    "paligemma_fast_specialist_droid": OpenpiConfig("droid", "pi0_fast", "droid", action_horizon=15, action_dim=8,
                                                    prompt_from_task=True, model_fields=_FAST),
    "paligemma_diffusion_droid": OpenpiConfig("droid", "pi0", "droid", action_horizon=10, action_dim=8,
                                              prompt_from_task=True),
    # LIBERO
    "pi0_libero": OpenpiConfig("libero", "pi0", "physical-intelligence/libero", deltas=True,
                               repo_id="physical-intelligence/libero", prompt_from_task=True),
    "pi05_libero": OpenpiConfig("libero", "pi05", "physical-intelligence/libero", action_horizon=10,
                                model_fields={"discrete_state_input": False}, repo_id="physical-intelligence/libero",
                                prompt_from_task=True),
    "pi0_fast_libero": OpenpiConfig("libero", "pi0_fast", "physical-intelligence/libero", action_horizon=10,
                                    action_dim=7, max_token_len=180, deltas=True, model_fields=_FAST,
                                    repo_id="physical-intelligence/libero", prompt_from_task=True),
    "pi0_libero_low_mem_finetune": OpenpiConfig("libero", "pi0", "physical-intelligence/libero", deltas=True,
                                                repo_id="physical-intelligence/libero", prompt_from_task=True),
    "pi0_fast_libero_low_mem_finetune": OpenpiConfig("libero", "pi0_fast", "physical-intelligence/libero",
                                                     action_horizon=10, action_dim=7, max_token_len=180, deltas=True,
                                                     model_fields=_FAST,
                                                     repo_id="physical-intelligence/libero", prompt_from_task=True),
}


def openpi_config(name):
    if name not in OPENPI_CONFIGS:
        raise KeyError(f"unknown openpi config '{name}'; supported: {', '.join(OPENPI_CONFIGS)}")
    return OPENPI_CONFIGS[name]


def model_views(robot, model):
    """(model camera -> request key or None, whether a None view is masked out) for one model:
    openpi's pi0-FAST names its cameras its own way and looks at its zero views."""
    spec = models.spec(model)
    return getattr(robot, spec.robot_views) or robot.views, spec.masks_absent_views


def model_overrides(name):
    """Our model config fields that this openpi config sets (the rest come from the weights)."""
    c = openpi_config(name)
    views, _ = model_views(ROBOTS[c.robot], c.model)
    out = {"cameras": list(views), "action_horizon": c.action_horizon, "max_token_len": c.max_token_len,
           "action_dim": c.action_dim, **c.model_fields}
    return {k: v for k, v in out.items() if v is not None}


def policy_settings(name):
    """policy.json for a checkpoint of openpi config `name`: everything Policy needs to serve it."""
    c = openpi_config(name)
    use_quantiles = models.spec(c.model).quantile_norm
    robot = ROBOTS[c.robot]
    views, masked = model_views(robot, c.model)
    return {"openpi_config": name, "robot": c.robot, "views": views, "empty_views_masked": masked,
            "cameras": list(views), "adapt_to_pi": robot.adapt_to_pi, "action_dim": robot.action_width,
            "state_dim": sum(robot.state_widths), "use_quantiles": use_quantiles,
            "delta_mask": make_bool_mask(*robot.delta_mask).tolist() if c.deltas else None,
            "default_prompt": c.default_prompt, "metadata": dict(c.metadata)}


# ----------------------------------------------------------------------------------------------
# Robot I/O: a request in the robot's own keys <-> the model-facing sample (openpi's Inputs/Outputs)


def hwc(image, key):
    """A robot image as uint8 HWC: CHW is recognised by its leading 3 (openpi's _parse_image),
    float in [0, 1] is scaled to uint8 as openpi does; anything else is an error naming the key."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.moveaxis(image, 0, -1)
    return np.ascontiguousarray(as_uint8_image(image, key))


def robot_inputs(settings, request, state=None):
    """A request in the robot's keys -> {"images": {model camera: uint8 HWC}, "image_masks":
    {camera: bool}, "state": (S,) in the model's space, "prompt"?, "actions"? (C, A) in the
    model's space}. settings: the checkpoint's policy.json (policy_settings). state: the robot's
    state already assembled (a dataset's state column) instead of the request's state keys."""
    robot = ROBOTS[settings["robot"]]
    if not isinstance(request, dict):
        raise TypeError(f"expected a dict observation, got {type(request).__name__}")
    images = request
    if robot.image_group:
        if not isinstance(request.get(robot.image_group), dict):
            raise KeyError(f"{settings['robot']} observation needs '{robot.image_group}': {{camera: image}} "
                           f"(have keys {sorted(request)})")
        images = request[robot.image_group]
        known = set(robot.views.values()) | set(robot.ignored_images)
        if set(images) - known:
            raise ValueError(f"{settings['robot']} observation has unknown cameras {sorted(set(images) - known)}; "
                             f"expected some of {sorted(known - {None})}")
    wanted = [k for k in settings["views"].values() if k is not None]
    missing = [k for k in wanted if k not in images and k not in robot.optional_images]
    missing += [k for k in robot.state if k not in request and state is None]
    if missing:
        raise KeyError(f"{settings['robot']} observation lacks {missing} (have {sorted(request)})")
    present = {k: hwc(images[k], k) for k in wanted if k in images}
    blank = np.zeros_like(next(iter(present.values())))  # openpi: zeros_like the first camera's image
    out = {"images": {}, "image_masks": {}}
    for view, key in settings["views"].items():
        out["images"][view] = present.get(key, blank)
        out["image_masks"][view] = key in present or (key is None and not settings["empty_views_masked"])
    if state is None:
        for k in robot.state:
            if np.ndim(request[k]) > 1:
                raise ValueError(f"state '{k}' has shape {np.shape(request[k])}: expected a 1-D vector")
        state = np.concatenate([np.asarray(request[k], np.float64).reshape(-1) for k in robot.state])
    state = np.asarray(state, np.float64)
    if state.shape != (sum(robot.state_widths),):
        raise ValueError(f"{settings['robot']} state ({' + '.join(robot.state)}) has {state.size} values, "
                         f"expected {sum(robot.state_widths)}")
    check_finite(state, "state")
    out["state"] = aloha_state_to_pi(state) if settings["adapt_to_pi"] else state
    if "prompt" in request:
        out["prompt"] = request["prompt"]
    if "actions" in request:  # training
        out["actions"] = robot_actions_to_model(settings, request["actions"])
    return out


def robot_actions_to_model(settings, actions):
    """The robot's actions (..., C, width) -> the model's space (the inverse of robot_outputs
    before deltas): how recorded actions are trained on, and how real-time chunking reads the
    chunk the robot is executing."""
    actions = np.array(actions, np.float64)
    return aloha_actions_to_pi(actions) if settings.get("adapt_to_pi") else actions


def robot_outputs(settings, actions):
    """Model-space absolute actions (..., C, A >= robot width) -> the robot's (..., C, width)."""
    actions = np.array(actions[..., :settings["action_dim"]], np.float64)
    return aloha_actions_from_pi(actions) if settings.get("adapt_to_pi") else actions


# ----------------------------------------------------------------------------------------------
# Training on a robot's dataset the way openpi reads it: its columns repacked into the robot's
# request (openpi's RepackTransform), then the same robot_inputs as at inference, with actions


class RobotDataset(DatasetView):
    """A dataset (readers.py) seen through an openpi config: samples are robot_inputs of the
    repacked request (model cameras, zero views, ALOHA's adapt_to_pi on state and actions); state
    and actions columns are in the model's space too, for norm stats and the FAST tokenizer.
    data.Transforms then takes deltas and normalizes, exactly as for any other dataset."""

    def __init__(self, dataset, settings, images, prompt_from_task=True):
        super().__init__(dataset)
        self.settings, self.images = settings, images  # images: request key <- camera
        # openpi's prompt: the LeRobot task, or (configs without prompt_from_task) the default prompt
        self.prompt = None if prompt_from_task else settings["default_prompt"]
        self.cameras = list(settings["views"])  # the model's views
        state = dataset.state.astype(np.float64)
        self.state = (aloha_state_to_pi(state) if settings["adapt_to_pi"] else state).astype(np.float32)
        self.actions = robot_actions_to_model(settings, dataset.actions).astype(np.float32)

    def request(self, i):
        """Frame i as the robot would send it (its own keys; the state under its state key), with
        the recorded action chunk in the robot's units: what policy.py plot feeds a checkpoint."""
        s = self.dataset[i]
        robot = ROBOTS[self.settings["robot"]]
        group = robot.image_group
        images = {key.split("/", 1)[1] if group else key: s["images"][cam] for key, cam in self.images.items()}
        request = {group: images} if group else dict(images)
        prompt = self.prompt if self.prompt is not None else s["prompt"]
        parts = np.split(np.asarray(s["state"]), np.cumsum(robot.state_widths)[:-1])  # the dataset's columns, as sent
        return dict(request, **dict(zip(robot.state, parts)), prompt=prompt), s

    def __getitem__(self, i):
        request, s = self.request(i)
        out = robot_inputs(self.settings, dict(request, actions=s["actions"]))
        return dict(out, action_is_pad=s["action_is_pad"])

    def action_chunks(self, rows):
        chunks, is_pad = self.dataset.action_chunks(rows)
        return robot_actions_to_model(self.settings, chunks).astype(np.float32), is_pad

    def describe(self):
        return dict(self.dataset.describe(), openpi_config=self.settings["openpi_config"], cameras=self.images)


def parse_cameras(spec):
    """--cameras "A=B,C=D" -> {"A": "B", "C": "D"} (None: no mapping); "A=" or "A" maps A to nothing."""
    if not spec:
        return None
    return dict(p.split("=", 1) if "=" in p else (p, "") for p in spec.split(","))


def dataset_columns(name, cameras, lerobot=True, override=None):
    """(request image key -> dataset camera, state column, action column) for openpi config
    `name` on a dataset with these cameras: the config's repack names LeRobot columns; an HDF5
    (ALOHA layout) file names its cameras like the robot's request; override {the robot's image
    key (e.g. cam_high): dataset camera} (train.py --cameras) maps others. A camera the robot
    needs that the dataset lacks is an error listing both sides."""
    c = openpi_config(name)
    robot, repack = ROBOTS[c.robot], c.dataset or ROBOTS[c.robot].dataset
    keys = {(k.split("/", 1)[1] if robot.image_group else k): k for k in repack
            if k not in robot.state and k != "actions"}
    override = dict(override or {})
    bad = {k: v for k, v in override.items() if k not in keys or v not in cameras}
    if bad:
        raise KeyError(f"--cameras {bad}: {name}'s cameras are {sorted(keys)}, the dataset's {list(cameras)}")
    images = {}
    for key, column in repack.items():
        if key in robot.state or key == "actions":
            continue
        in_request = key.split("/", 1)[1] if robot.image_group else key
        found = [override[in_request]] if in_request in override else \
            [cam for cam in ((column,) if lerobot else ()) + (in_request,) if cam in cameras]
        if found:
            images[key] = found[0]
        elif in_request not in robot.optional_images:
            raise KeyError(f"{name} needs camera '{column}' (the robot's {key}); the dataset has {list(cameras)}")
    return images, [repack[k] for k in robot.state], repack["actions"]


def open_robot_dataset(path, name, chunk_size, cameras=None):
    """Open a LeRobot or HDF5 dataset at `path` as openpi config `name` reads it (RobotDataset);
    cameras: {the robot's image key: dataset camera} where the names differ."""
    c = openpi_config(name)
    robot, repack = ROBOTS[c.robot], c.dataset or ROBOTS[c.robot].dataset
    columns = dict(state_key=[repack[k] for k in robot.state], action_key=repack["actions"])
    lerobot = (Path(path) / "meta" / "info.json").exists()
    probe = open_dataset(path, chunk_size, **(columns if lerobot else {}))  # which cameras it has
    images, state, actions = dataset_columns(name, probe.cameras, lerobot, cameras)
    kwargs = dict(cameras=list(images.values()), **(columns if lerobot else {}))
    settings = policy_settings(name)
    return RobotDataset(open_dataset(path, chunk_size, **kwargs), settings, images, c.prompt_from_task)
