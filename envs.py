"""The field's simulators through one interface: gym-pusht, gym-aloha, and gym-aloha as openpi drives it.

Every environment here has the built-in task's interface (tasks.ReachEnv): reset(seed) -> obs,
step(action) -> (obs, success, done), close(), and name / cameras / state_dim / action_dim / fps /
max_steps / action_low / action_high; an observation is {"images": {camera: image}, "state",
"prompt"} (or, for openpi's configs, the robot's own request). sim.py evaluates policies on any of
them. Each simulator is an optional extra, imported when its environment is made, with the pip
command in the error when it is missing: pip install gym-pusht / gym-aloha.
"""

import os

import numpy as np

from data import resize_with_pad
from readers import require

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
