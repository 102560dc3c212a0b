"""A built-in task that proves the whole loop on a laptop, and closed-loop evaluation of policies.

The task ("reach"): a 2D table seen from above by one 56x56 camera, with three large objects of
distinct colours (red, green, blue, yellow; each a ball or a square) at random places, and the
agent, a small black disc. The prompt names one object ("reach the red ball", "go to the blue
square"); the others are distractors, so a policy must read the colour word AND find that colour
in the image. Success: the agent's centre is on the named object and so is the point it heads
for (it has arrived and stays; a random walk that crosses the object does not count).

    camera "top"   uint8 (56, 56, 3); x to the right, y up, the table is [-1, 1]^2
    state  (2,)    the agent's x, y in [-1, 1]
    action (2,)    the point x, y the agent heads for; it moves there by at most MAX_SPEED a step
    fps 10, at most MAX_STEPS = 25 steps; episodes are reproducible from their seed

Actions are absolute targets, as in gym-pusht (a position controller follows them): the scripted
expert commands the named object's centre at every step, so its chunks are constant and a
policy needs no arithmetic on the state, only to find the object. That matters for pi0.5, which
reads the state as text: 256 bin tokens whose embeddings a model trained from scratch must learn.

Evaluation follows openpi's action-chunk broker: ask the policy for a chunk of actions, execute
its first n_action_steps, then ask again. Episodes run in lockstep, so one policy call serves all
live episodes. Any object with `infer_batch(observations, noise=None) -> (N, C, A)` is a policy:
policy.py's Policy, or ExpertPolicy / RandomPolicy below. gym-pusht and gym-aloha run through the
same loop with adapters (optional extras: pip install gym-pusht / gym-aloha).

Command line:
    python sim.py demos --episodes 3000 --out demos/reach    # HDF5 episodes + norm_stats.json + tokenizer.model
    python sim.py eval --checkpoint ckpt/ --env builtin --episodes 200 [--seed S --n-action-steps K --out DIR]
    python sim.py eval --checkpoint ckpt/ --env pusht --episodes 50 --camera observation.image
    python sim.py eval --expert --env builtin            # the scripted expert, no checkpoint needed
    python sim.py eval --checkpoint ckpt/ --env aloha_sim    # gym-aloha through openpi's ALOHA request
    python sim.py collect --checkpoint ckpt/ --episodes 500 --out rollouts/   # labelled rollouts (RECAP)

Axis legend (paligemma.py's): E live episodes, C chunk (actions per policy call), A action dim, H/W image size.
"""

import argparse
import io
import json
import math
import os
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import HDF5Dataset, compute_norm_stats, resize_with_pad, save_norm_stats, write_hdf5_episode
from readers import require

# ----------------------------------------------------------------------------------------------
# The built-in task

COLOURS = {"red": (225, 35, 35), "green": (30, 170, 60), "blue": (35, 80, 230), "yellow": (240, 195, 20)}
SHAPES = ("ball", "square")
TEMPLATES = ("reach the {}", "go to the {}", "move to the {}")
BACKGROUND, AGENT_COLOUR = (225, 225, 225), (20, 20, 20)
IMAGE_SIZE, SUPERSAMPLE = 56, 2   # rendered at 112 px and averaged down: smooth edges, sub-pixel motion
NUM_OBJECTS = 3
OBJECT_RADIUS = 0.25              # table units: 7 px at 56 px, a ball is as wide as a 14-px ViT patch
AGENT_RADIUS = 0.08
MAX_SPEED = 0.1                   # per step: the expert needs at most ~17 steps
MAX_STEPS = 25
FPS = 10
DEMO_SEED, EVAL_SEED = 0, 1_000_000  # demos use seeds 0.., evaluation 10^6..: held-out layouts


def cap_speed(delta):
    """Scale a displacement down to length MAX_SPEED if it is longer (the agent's top speed)."""
    norm = float(np.linalg.norm(delta))
    return delta if norm <= MAX_SPEED else delta * (MAX_SPEED / norm)


class ReachEnv:
    """One episode of the reach task at a time: reset(seed) -> obs; step(action) -> (obs, success, done)."""
    name, cameras, state_dim, action_dim, fps, max_steps = "builtin", ("top",), 2, 2, FPS, MAX_STEPS
    action_low, action_high = -1.0, 1.0

    def __init__(self, camera="top"):
        self.camera = camera
        n = IMAGE_SIZE * SUPERSAMPLE
        centres = (np.arange(n) + 0.5) / n * 2 - 1
        self.x, self.y = np.meshgrid(centres, -centres)  # pixel centres in table units, (n, n) each

    def reset(self, seed):
        rng = np.random.default_rng(seed)
        names = rng.choice(list(COLOURS), NUM_OBJECTS, replace=False)
        self.objects = [(str(c), str(rng.choice(SHAPES))) for c in names]
        # rejection sampling: objects well apart, the agent away from all of them
        while True:
            self.positions = rng.uniform(-0.7, 0.7, (NUM_OBJECTS, 2))
            gaps = np.linalg.norm(self.positions[:, None] - self.positions[None], axis=-1)
            if gaps[np.triu_indices(NUM_OBJECTS, 1)].min() >= 0.65:
                break
        while True:
            self.agent = rng.uniform(-0.8, 0.8, 2)
            if np.linalg.norm(self.positions - self.agent, axis=-1).min() >= 0.6:
                break
        self.target = int(rng.integers(NUM_OBJECTS))
        colour, shape = self.objects[self.target]
        self.prompt = str(rng.choice(TEMPLATES)).format(f"{colour} {shape}")
        self.t = 0
        # the objects never move: draw them once, at the supersampled size
        self.scene = np.empty((*self.x.shape, 3), np.float32)
        self.scene[:] = BACKGROUND
        for (colour, shape), (cx, cy) in zip(self.objects, self.positions):
            if shape == "ball":
                inside = (self.x - cx) ** 2 + (self.y - cy) ** 2 <= OBJECT_RADIUS ** 2
            else:  # a square of the ball's area
                half = OBJECT_RADIUS * math.sqrt(math.pi) / 2
                inside = np.maximum(abs(self.x - cx), abs(self.y - cy)) <= half
            self.scene[inside] = COLOURS[colour]
        return self.observation()

    def render(self):
        """The top camera: uint8 (56, 56, 3), the agent drawn over the objects."""
        img = self.scene.copy()
        img[(self.x - self.agent[0]) ** 2 + (self.y - self.agent[1]) ** 2 <= AGENT_RADIUS ** 2] = AGENT_COLOUR
        s = SUPERSAMPLE
        img = img.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s, 3).mean(axis=(1, 3))  # (56, 56, 3)
        return np.round(img).astype(np.uint8)

    def observation(self):
        return {"images": {self.camera: self.render()}, "state": self.agent.astype(np.float32),
                "prompt": self.prompt}

    def step(self, action):
        action = np.asarray(action, np.float64)
        if action.shape != (2,) or not np.isfinite(action).all():
            raise ValueError(f"builtin env: action must be 2 finite numbers (x, y), got {action!r}")
        point = np.clip(action, -1.0, 1.0)
        self.agent = self.agent + cap_speed(point - self.agent)
        self.t += 1
        target = self.positions[self.target]
        success = max(np.linalg.norm(target - self.agent), np.linalg.norm(target - point)) <= OBJECT_RADIUS
        return self.observation(), success, success or self.t >= self.max_steps

    def expert_action(self):
        """The scripted expert: head for the named object's centre (a straight line at top speed)."""
        return self.positions[self.target].copy()

    def close(self):
        pass


# ----------------------------------------------------------------------------------------------
# Reference policies: anything with infer_batch(observations, noise=None) -> (E, C, A)


class ExpertPolicy:
    """The scripted expert, seeing only what a model sees: the colour word of the prompt picks
    the object, and the centre of its pixels in the image is every action of the chunk. It
    proves the task is solvable from the observation alone."""

    def __init__(self, chunk_size=6, camera="top"):
        self.chunk_size, self.camera = chunk_size, camera

    def infer_batch(self, observations, noise=None):
        chunks = []
        for obs in observations:
            colour = next((c for c in COLOURS if c in obs["prompt"].split()), None)
            if colour is None:
                raise ValueError(f"ExpertPolicy: no colour of {list(COLOURS)} in prompt {obs['prompt']!r}")
            image = obs["images"][self.camera].astype(np.int32)
            rows, cols = np.nonzero((abs(image - COLOURS[colour]) < 40).all(axis=-1))
            if len(rows) == 0:
                raise ValueError(f"ExpertPolicy: no {colour} pixels in camera '{self.camera}'")
            centre = [(cols.mean() + 0.5) / IMAGE_SIZE * 2 - 1, 1 - (rows.mean() + 0.5) / IMAGE_SIZE * 2]
            chunks.append([centre] * self.chunk_size)
        return np.array(chunks, np.float32)  # (E, C, 2)


class RandomPolicy:
    """Uniform random actions in [low, high], drawn from torch's global generator (as a flow
    policy draws its noise), so evaluate()'s seeding makes it reproducible."""

    def __init__(self, low, high, action_dim, chunk_size=6):
        self.low, self.high, self.action_dim, self.chunk_size = low, high, action_dim, chunk_size

    def infer_batch(self, observations, noise=None):
        u = torch.rand(len(observations), self.chunk_size, self.action_dim, dtype=torch.float64).numpy()
        return (self.low + u * (self.high - self.low)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Adapters for gym-pusht and gym-aloha: the same reset / step interface as ReachEnv


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


def make_env(name, **kwargs):
    envs = {"builtin": ReachEnv, "pusht": PushTEnv, "aloha": AlohaEnv, "aloha_sim": OpenpiAlohaSim}
    if name not in envs:
        raise ValueError(f"unknown env {name!r}: one of {list(envs)}")
    return envs[name](**kwargs)


# ----------------------------------------------------------------------------------------------
# Closed-loop evaluation


def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval of a success rate: honest near 0 and 1 and for small n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def frame(obs, env):
    """The first camera's image of an observation, HWC (ALOHA's requests carry CHW)."""
    image = obs["images"][env.cameras[0]]
    return np.moveaxis(image, 0, -1) if image.shape[0] == 3 and image.shape[-1] != 3 else image


def run_lockstep(policy, envs, seeds, s, d, rtc, n_frames, stats, bar, on_step=None):
    """One batch of episodes in lockstep to the end: a chunk is asked for at the start and once
    s actions of the current one ran; with a delay d the current chunk runs on for d steps and
    the new one takes over at its index d. -> (per-episode results, recorded frames).
    stats accumulates infer_s, step_s, calls, chunks and the switch jumps. on_step(seed, obs,
    action, success, done) sees every step (record_rollouts)."""
    obs = [env.reset(s_) for env, s_ in zip(envs, seeds)]
    frames = [[frame(o, envs[0])] for o in obs[:n_frames]]
    n = len(seeds)
    chunk, idx, pending, length, live, results = [None] * n, [0] * n, [None] * n, [0] * n, list(range(n)), []
    undecoded = [0] * n  # chunks per episode that did not decode (pi0-FAST)

    def switch():  # a chunk asked for d steps ago arrives and takes over at its index d
        for j in live:
            if pending[j] is not None and idx[j] == s + d:
                if s + d < len(chunk[j]):  # how far the switch moves the command
                    stats["jumps"].append(float(np.linalg.norm(pending[j][d] - chunk[j][s + d])))
                chunk[j], idx[j], pending[j] = pending[j], d, None

    while live:
        switch()
        need = [j for j in live if chunk[j] is None or (idx[j] == s and pending[j] is None)]
        if need:
            first_chunk = chunk[need[0]] is None  # lockstep: all or none of them start
            extra = {} if rtc is None or first_chunk else dict(
                prev_actions=np.stack([chunk[j] for j in need]), delay=d, execution_horizon=s, **rtc)
            t0 = time.perf_counter()
            actions = np.asarray(policy.infer_batch([obs[j] for j in need], **extra))  # (E, C, A)
            stats["infer_s"] += time.perf_counter() - t0
            stats["calls"], stats["chunks"] = stats["calls"] + 1, stats["chunks"] + len(need)
            if actions.ndim != 3 or len(actions) != len(need) or actions.shape[2] != envs[0].action_dim:
                raise ValueError(f"policy returned actions of shape {actions.shape}, expected "
                                 f"({len(need)}, chunk, {envs[0].action_dim})")
            if s + d > actions.shape[1]:
                raise ValueError(f"n_action_steps {s} (+ delay {d}) exceeds the policy's chunk of "
                                 f"{actions.shape[1]} actions: execute at most {actions.shape[1] - d} per call")
            valid = getattr(policy, "valid", None)  # pi0-FAST: False where an answer did not decode
            for i, (j, new) in enumerate(zip(need, actions)):
                if first_chunk:
                    chunk[j], idx[j] = new, 0
                else:
                    pending[j] = new  # the current chunk runs on for d more steps
                undecoded[j] += valid is not None and not valid[i]
        switch()  # with d = 0 the new chunk takes over at once
        t0 = time.perf_counter()
        for j in list(live):
            before, action = obs[j], chunk[j][idx[j]]
            obs[j], success, done = envs[j].step(action)
            if on_step is not None:
                on_step(seeds[j], before, action, success, done)
            idx[j], length[j] = idx[j] + 1, length[j] + 1
            if j < len(frames):
                frames[j].append(frame(obs[j], envs[j]))
            if done:
                live.remove(j)
                results.append(dict(seed=seeds[j], success=bool(success), length=length[j],
                                    prompt=obs[j].get("prompt"), undecoded_chunks=int(undecoded[j])))
                bar.update(1)
        stats["step_s"] += time.perf_counter() - t0
    return sorted(results, key=lambda r: r["seed"]), frames


def evaluate(policy, env_name="builtin", episodes=100, seed=EVAL_SEED, n_action_steps=5, *, batch_size=100,
             record=0, progress=True, env_kwargs=None, delay=0, rtc=None, on_step=None):
    """Run `episodes` seeded episodes (seeds seed, seed+1, ...) in closed loop, batch_size at a time.

    Every live episode of a batch replans at the same step, so each replan is one infer_batch call
    on all of them. torch's global generator is seeded with `seed`: a policy that samples noise
    from it gives the same results run after run. With record > 0 the first `record` episodes'
    camera frames come back under "videos" (not JSON: pop it before saving).

    delay d simulates inference latency, as a robot lives it: a chunk is asked for once
    n_action_steps (s) actions of the current one are executed; the current chunk keeps running
    for d more steps while the policy thinks; the new chunk then takes over at its index d (its
    first d actions are in the past). rtc (e.g. {"beta": 5.0}): ask with the previous chunk, so
    the policy guides the new one toward what is still being executed (real-time chunking);
    None: naive switching. "mean_jump" is the mean |new[d] - old[s + d]| over the switches."""
    if n_action_steps < 1 or episodes < 1 or batch_size < 1 or delay < 0:
        raise ValueError(f"need n_action_steps, episodes and batch_size >= 1 and delay >= 0, got {n_action_steps}, "
                         f"{episodes}, {batch_size}, {delay}")
    torch.manual_seed(seed)
    results, videos = [], []
    stats = dict(infer_s=0.0, step_s=0.0, calls=0, chunks=0, jumps=[])
    bar = tqdm(total=episodes, desc=f"eval {env_name}", disable=not progress)
    for first in range(0, episodes, batch_size):
        seeds = list(range(seed + first, seed + min(episodes, first + batch_size)))
        envs = [make_env(env_name, **(env_kwargs or {})) for _ in seeds]
        batch, frames = run_lockstep(policy, envs, seeds, n_action_steps, delay, rtc, max(0, record - first), stats,
                                     bar, on_step)
        for env in envs:
            env.close()
        results += batch
        videos += list(zip(frames, batch))
    bar.close()
    total_steps = sum(r["length"] for r in results)
    k = sum(r["success"] for r in results)
    lo, hi = wilson_interval(k, episodes)
    jumps, calls = stats["jumps"], stats["calls"]
    out = dict(env=env_name, episodes=episodes, seed=seed, n_action_steps=n_action_steps, delay=delay,
               rtc=rtc, mean_jump=float(np.mean(jumps)) if jumps else None, successes=k,
               success_rate=k / episodes, ci95=[lo, hi], mean_length=total_steps / episodes,
               infer_ms_per_call=1000 * stats["infer_s"] / max(calls, 1),
               infer_ms_per_chunk=1000 * stats["infer_s"] / max(stats["chunks"], 1),
               env_ms_per_step=1000 * stats["step_s"] / max(total_steps, 1), policy_calls=calls,
               undecoded_chunks=sum(r["undecoded_chunks"] for r in results),
               episodes_with_undecoded=sum(r["undecoded_chunks"] > 0 for r in results), results=results)
    if record:
        out["videos"] = videos[:record]
    return out


def save_eval(result, out, checkpoint=None):
    """Write an evaluate() result to out/eval.json and, when it recorded episodes, out/eval.gif.
    Pops result["videos"] (frames are not JSON); returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    videos = result.pop("videos", [])
    paths = [out / "eval.json"]
    paths[0].write_text(json.dumps(dict(result, checkpoint=checkpoint), indent=2))
    if videos:
        fps = {"builtin": FPS, "pusht": 10, "aloha": 50, "aloha_sim": 50}[result["env"]]
        paths.append(out / "eval.gif")
        save_gif(videos, paths[1], fps=min(fps, 25))
    return paths


def save_gif(videos, path, fps=FPS, tile=224):
    """Episodes side by side, each under its prompt; a finished episode holds its last frame
    inside a green (success) or red (failure) border."""
    height = max(round(tile * frames[0].shape[0] / frames[0].shape[1]) for frames, _ in videos)
    gif = []
    for s in range(max(len(frames) for frames, _ in videos)):
        canvas = Image.new("RGB", (tile * len(videos), height + 14), "white")
        draw = ImageDraw.Draw(canvas)
        for k, (frames, result) in enumerate(videos):
            frame = frames[min(s, len(frames) - 1)]
            size = (tile, round(tile * frame.shape[0] / frame.shape[1]))
            canvas.paste(Image.fromarray(frame).resize(size, Image.NEAREST), (k * tile, 14))
            draw.text((k * tile + 3, 1), result["prompt"][:36], fill="black")
            if s >= len(frames) - 1:
                colour = (40, 200, 60) if result["success"] else (220, 40, 40)
                draw.rectangle([k * tile, 14, (k + 1) * tile - 1, height + 13], outline=colour, width=3)
        gif.append(canvas)
    gif[0].save(path, save_all=True, append_images=gif[1:], duration=int(1000 / fps), loop=0)


# ----------------------------------------------------------------------------------------------
# Demonstrations: expert episodes as HDF5, norm stats, and a tiny tokenizer


def pi05_prompt_text(prompt, bins):
    """pi0.5's prompt string (pi05.tokenize_prompt), here only to train the tokenizer on it."""
    return f"Task: {prompt}, State: {' '.join(str(b) for b in bins)};\nAction: "


def train_tokenizer(path, vocab_size=512, seed=0, extra=()):
    """A tiny SentencePiece model shaped like PaliGemma's (pad 0, EOS 1, BOS 2, "\\n" one piece,
    no dummy prefix, byte fallback), trained offline on every prompt of the task in every
    prompt format of the project: pi0 (the bare prompt), pi0.5 and pi0-FAST (with state bins,
    every number -1..255 many times) and FAST's "Action: ... |"; extra: more sentences (RECAP's
    indicator). Returns the processor."""
    spm = _require("sentencepiece", "sentencepiece")
    rng = np.random.default_rng(seed)
    prompts = [t.format(f"{c} {s}") for t in TEMPLATES for c in COLOURS for s in SHAPES]
    sentences = []
    for i in range(6000):
        bins = rng.integers(-1, 256, size=rng.integers(1, 9))
        sentences += [prompts[i % len(prompts)], pi05_prompt_text(prompts[i % len(prompts)], bins), "Action: |"]
    sentences += list(extra) * 200
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        user_defined_symbols=["\n"], byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        split_by_unicode_script=False, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    Path(path).write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def degraded_action(env, mode, wrong, rng):
    """A worse demonstrator (RECAP's mixed-quality data): "wrong" heads for object `wrong`, not
    the named one (so it never succeeds), "wander" for a random point redrawn every 5 steps."""
    if mode == "wrong":
        return env.positions[wrong].copy()
    if env.t % 5 == 0:
        env.wander_point = rng.uniform(-0.9, 0.9, 2)
    return env.wander_point


def record_demos(out, episodes, seed=DEMO_SEED, progress=True, degraded=0.0):
    """Expert episodes -> out/episode_NNNNN.hdf5 (ALOHA layout: /observations/qpos, /action,
    /observations/images/top; root attrs prompt, fps and success). degraded: the fraction of
    episodes a worse demonstrator records instead (2/3 "wrong", 1/3 "wander"; degraded_action),
    chosen per episode from its seed. Returns the success count."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env, successes = ReachEnv(), 0
    for i in tqdm(range(episodes), desc="demos", disable=not progress):
        obs, done, success = env.reset(seed + i), False, False
        rng = np.random.default_rng([seed + i, 1])  # apart from the layout's generator
        mode = "expert" if rng.random() >= degraded else ("wrong" if rng.random() < 2 / 3 else "wander")
        wrong = (env.target + 1 + int(rng.integers(NUM_OBJECTS - 1))) % NUM_OBJECTS
        states, actions, images = [], [], []
        while not done:
            action = env.expert_action() if mode == "expert" else degraded_action(env, mode, wrong, rng)
            states.append(obs["state"]), actions.append(action), images.append(obs["images"]["top"])
            obs, success, done = env.step(action)
        successes += success
        write_hdf5_episode(out / f"episode_{i:05d}.hdf5", np.array(states), np.array(actions),
                           {"top": np.array(images)}, prompt=env.prompt, fps=FPS,
                           attrs={"success": bool(success), "behaviour": mode})
    return successes


def record_rollouts(policy, out, episodes, seed, n_action_steps=5, progress=True):
    """A policy's own closed-loop episodes -> out/episode_NNNNN.hdf5 like the demos, each with
    its success label (what RECAP learns from). Returns evaluate()'s result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    episodes_seen = {}

    def on_step(seed_, obs, action, success, done):
        ep = episodes_seen.setdefault(seed_, dict(states=[], actions=[], images=[], prompt=obs["prompt"]))
        ep["states"].append(obs["state"]), ep["actions"].append(action), ep["images"].append(obs["images"]["top"])
        if done:
            write_hdf5_episode(out / f"episode_{seed_ - seed:05d}.hdf5", np.array(ep["states"]),
                               np.array(ep["actions"]), {"top": np.array(ep["images"])}, prompt=ep["prompt"],
                               fps=FPS, attrs={"success": bool(success), "behaviour": "rollout"})
            del episodes_seen[seed_]

    return evaluate(policy, "builtin", episodes, seed, n_action_steps, progress=progress, on_step=on_step)


def rtc_sweep(policy, delays, episodes=100, beta=5.0, seed=EVAL_SEED, progress=False, methods=None,
              env_name="builtin", env_kwargs=None):
    """The latency study: for each delay d (execution horizon s = max(d, 1), the RTC paper's
    protocol), naive switching against real-time chunking: "rtc", inference-time guidance;
    "trained", a checkpoint trained with --rtc-max-delay continuing the committed steps.
    -> rows of results."""
    methods = methods or {"naive": None, "rtc": {"beta": beta}}
    rows = []
    for d in delays:
        for method, rtc in methods.items():
            r = evaluate(policy, env_name, episodes, seed, max(d, 1), delay=d, rtc=rtc, progress=progress,
                         env_kwargs=env_kwargs)
            rows.append(dict(delay=d, s=max(d, 1), method=method, success_rate=r["success_rate"], ci95=r["ci95"],
                             mean_length=r["mean_length"], mean_jump=r["mean_jump"]))
            jump = "-" if r["mean_jump"] is None else f"{r['mean_jump']:.3f}"
            print(f"d={d} s={max(d, 1)} {method:5s}: success {r['success_rate']:.0%} "
                  f"({r['ci95'][0]:.0%}-{r['ci95'][1]:.0%}), mean length {r['mean_length']:.1f}, mean jump {jump}",
                  flush=True)
    return rows


def plot_sweep(rows, path):
    """Success and switch jump against the delay, one line per method (pillow only)."""
    W, H, pad = 640, 300, 40
    img = Image.new("RGB", (2 * W, H), "white")
    draw = ImageDraw.Draw(img)
    delays = sorted({r["delay"] for r in rows})
    colours = {"naive": (214, 39, 40), "rtc": (31, 119, 180), "trained": (44, 160, 44)}
    jumps = [r["mean_jump"] for r in rows if r["mean_jump"] is not None] or [1.0]
    for panel, (key, top, title) in enumerate((("success_rate", 1.0, "success"), ("mean_jump", max(jumps), "jump at switches"))):
        x0 = panel * W
        draw.rectangle([x0 + pad, pad, x0 + W - pad, H - pad], outline=(180, 180, 180))
        draw.text((x0 + pad, 10), f"{title} vs delay d (0 to {delays[-1]}); max {top:.2f}", fill="black")
        for m, colour in [(m, c) for m, c in colours.items() if any(r["method"] == m for r in rows)]:
            pts = [(x0 + pad + r["delay"] / max(1, delays[-1]) * (W - 2 * pad), H - pad - r[key] / top * (H - 2 * pad))
                   for r in rows if r["method"] == m and r[key] is not None]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=3)
            for p in pts:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
            draw.text((x0 + W - pad - 60, pad + 5 + 15 * list(colours).index(m)), m, fill=colour)
    img.save(path)
    return path


def cmd_demos(args):
    t0 = time.perf_counter()
    expert = record_demos(args.out, args.episodes, args.seed)
    dataset = HDF5Dataset(args.out, chunk_size=1)
    save_norm_stats(compute_norm_stats(dataset, progress=False), Path(args.out) / "norm_stats.json")
    sp = train_tokenizer(Path(args.out) / "tokenizer.model", args.vocab_size)
    longest = max(len(sp.encode(pi05_prompt_text(p, [-1, 255]), add_bos=True)) for p in dataset.tasks)
    rand = evaluate(RandomPolicy(-1.0, 1.0, 2), "builtin", 200, EVAL_SEED, progress=False)
    print(f"wrote {args.episodes} episodes ({len(dataset)} frames, mean length "
          f"{len(dataset) / args.episodes:.1f}), norm_stats.json, tokenizer.model ({sp.get_piece_size()} "
          f"pieces; longest pi0.5 prompt {longest} tokens) to {args.out} in {time.perf_counter() - t0:.1f} s")
    print(f"expert success {expert}/{args.episodes}; random policy {rand['successes']}/200 "
          f"(95% CI {rand['ci95'][0]:.2f}-{rand['ci95'][1]:.2f})")


def cmd_collect(args):
    from policy import Policy
    r = record_rollouts(Policy(args.checkpoint, device=args.device, cfg_beta=args.cfg_beta), args.out, args.episodes,
                        args.seed, args.n_action_steps)
    print(f"wrote {args.episodes} episodes of {args.checkpoint} to {args.out}: {r['successes']} successful "
          f"(each file's `success` attribute)")


def run_train(out, *args):
    """train.py in a subprocess, exactly as a user runs it (skipped when out/final exists, so an
    interrupted study resumes); -> the exported checkpoint."""
    import subprocess
    import sys
    final = Path(out) / "final"
    if (final / "model.safetensors").exists():
        print(f"{final}: already trained, reused", flush=True)
        return final
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "train.py"), *map(str, args), "--out", str(out)]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return final


def cmd_rtc(args):
    """The sweep on a checkpoint, or (no --checkpoint) the whole study: train the model plainly
    and with training-time RTC (--rtc-max-delay max(delays), --rtc-prefix-share), then sweep
    naive / inference-time RTC on the first and the committed-prefix mode of the second."""
    from policy import Policy
    if args.checkpoint is None and args.env != "builtin":
        raise ValueError(f"--env {args.env}: give --checkpoint (the study trains on the built-in task only)")
    t0 = time.perf_counter()
    plain, trained = args.checkpoint, args.trained_checkpoint
    if plain is None:
        out = Path(args.out or "runs/rtc")
        common = ["--model", args.model, "--steps", args.steps, "--chunk", args.chunk, "--seed", args.seed,
                  "--eval-episodes", 0, *shlex.split(args.train_args)]
        plain = run_train(out / "plain", *common)
        trained = run_train(out / "trained", *common, "--rtc-max-delay", max(args.delays),
                            "--rtc-prefix-share", args.prefix_share)
    out = Path(args.out or plain)
    out.mkdir(parents=True, exist_ok=True)
    env_kwargs = {} if args.camera is None else {"camera": args.camera}
    sweep = dict(episodes=args.episodes, env_name=args.env, env_kwargs=env_kwargs)
    rows = rtc_sweep(Policy(plain, fast=True), args.delays, beta=args.beta, **sweep)
    if trained:  # trained with --rtc-max-delay: the committed steps continued
        rows += rtc_sweep(Policy(trained, fast=True), args.delays, methods={"trained": {}}, **sweep)
    lines = ["| delay d | " + " | ".join(f"{m}: success / jump" for m in dict.fromkeys(r["method"] for r in rows))
             + " |", "|---" * (1 + len({r["method"] for r in rows})) + "|"]
    for d in args.delays:
        cells = [f"{r['success_rate']:.0%} / " + ("-" if r["mean_jump"] is None else f"{r['mean_jump']:.3f}")
                 for r in rows if r["delay"] == d]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    (out / "rtc.json").write_text(json.dumps(dict(rows=rows, checkpoint=str(plain), trained_checkpoint=
                                                  trained and str(trained), env=args.env), indent=2))
    print(f"wrote {out / 'rtc.json'} and {plot_sweep(rows, out / 'rtc.png')} in "
          f"{(time.perf_counter() - t0) / 60:.1f} min")


def cmd_eval(args):
    env_kwargs = {} if args.camera is None else {"camera": args.camera}
    if args.env != "builtin":
        env_kwargs.update({k: v for k, v in dict(prompt=args.prompt, max_steps=args.max_steps).items() if v})
    if args.env in ("aloha", "aloha_sim"):
        env_kwargs["task"] = args.aloha_task
    if args.n_action_steps is None:  # openpi's ActionChunkBroker runs 10 per chunk in aloha_sim
        args.n_action_steps = 10 if args.env == "aloha_sim" else 5
    if args.expert:
        if args.env != "builtin":
            raise ValueError("--expert exists for the builtin env only")
        policy, name = ExpertPolicy(camera=args.camera or "top"), "scripted expert"
    elif args.checkpoint:
        from policy import Policy  # the model stack is imported only when a checkpoint is evaluated
        policy, name = Policy(args.checkpoint, device=args.device), args.checkpoint
    else:
        raise ValueError("give --checkpoint DIR (or --expert for the builtin env)")
    r = evaluate(policy, args.env, args.episodes, args.seed, args.n_action_steps, batch_size=args.batch_size,
                 record=args.gif, env_kwargs=env_kwargs)
    print(f"{name} on {args.env}: success {r['successes']}/{r['episodes']} = {r['success_rate']:.1%} "
          f"(95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}), mean episode length {r['mean_length']:.1f} steps")
    print(f"inference {r['infer_ms_per_call']:.1f} ms per call ({r['infer_ms_per_chunk']:.2f} ms per chunk), "
          f"env {r['env_ms_per_step']:.2f} ms per step, {r['policy_calls']} calls, n_action_steps {r['n_action_steps']}")
    if r["undecoded_chunks"]:
        print(f"WARNING: {r['undecoded_chunks']} chunks in {r['episodes_with_undecoded']} episodes did not decode "
              f"(pi0-FAST answers that are not FAST tokens; the robot got a best-effort chunk)")
    if args.out:
        print("wrote " + " and ".join(str(p) for p in save_eval(r, args.out, args.checkpoint)))


def main(argv=None):
    parser = argparse.ArgumentParser(description="The built-in reach task: demos and closed-loop evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    demos = sub.add_parser("demos", help="write expert episodes, norm_stats.json and tokenizer.model")
    demos.add_argument("--episodes", type=int, default=3000,
                       help="expert episodes (distinct layouts: 500 are memorised, 3000 generalise)")
    demos.add_argument("--out", required=True, help="output folder")
    demos.add_argument("--seed", type=int, default=DEMO_SEED, help="episode i uses seed + i")
    demos.add_argument("--vocab-size", type=int, default=512, help="SentencePiece vocabulary size")
    co = sub.add_parser("collect", help="a policy's own episodes with success labels (RECAP's rollouts)")
    co.add_argument("--checkpoint", required=True, help="checkpoint directory (policy.Policy)")
    co.add_argument("--episodes", type=int, default=500)
    co.add_argument("--out", required=True, help="output folder (HDF5 episodes like the demos)")
    co.add_argument("--seed", type=int, default=500_000, help="episode i uses seed + i (demos 0.., eval 10^6..)")
    co.add_argument("--n-action-steps", type=int, default=5)
    co.add_argument("--cfg-beta", type=float, default=None, help="RECAP checkpoints: classifier-free guidance")
    co.add_argument("--device", default="cpu")
    sw = sub.add_parser("rtc", help="latency study: naive switching vs real-time chunking as the delay grows")
    sw.add_argument("--checkpoint", default=None,
                    help="a pi0 / pi0.5 checkpoint to sweep (default: train one plainly and one with RTC, then sweep)")
    sw.add_argument("--trained-checkpoint", default=None, help="the same model trained with --rtc-max-delay")
    sw.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="inference delays d, in steps")
    sw.add_argument("--episodes", type=int, default=100)
    sw.add_argument("--beta", type=float, default=5.0, help="guidance weight cap (the paper's 5)")
    sw.add_argument("--env", default="builtin", choices=["builtin", "pusht", "aloha", "aloha_sim"],
                    help="the environment of the sweep (others need --checkpoint)")
    sw.add_argument("--camera", default=None, help="the policy's camera name for the env's camera")
    sw.add_argument("--out", default=None, help="folder for rtc.json and rtc.png (default: the checkpoint's, "
                    "or runs/rtc for the whole study)")
    st = sw.add_argument_group("the whole study (no --checkpoint): train.py's settings for both models")
    st.add_argument("--model", default="pi05", choices=["pi0", "pi05"])
    st.add_argument("--steps", type=int, default=6000)
    st.add_argument("--chunk", type=int, default=10, help="actions per chunk (d <= s <= chunk - d)")
    st.add_argument("--prefix-share", type=float, default=0.3,
                    help="training-time RTC: share of samples with a committed prefix (train.py --rtc-prefix-share)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--train-args", default="", help='more train.py flags for both, e.g. "--batch-size 16"')
    ev = sub.add_parser("eval", help="closed-loop evaluation of a checkpoint")
    ev.add_argument("--checkpoint", help="checkpoint directory (policy.Policy)")
    ev.add_argument("--expert", action="store_true", help="builtin only: evaluate the scripted expert instead")
    ev.add_argument("--env", default="builtin", choices=["builtin", "pusht", "aloha", "aloha_sim"],
                    help="aloha_sim: gym-aloha through openpi's ALOHA request (for openpi ALOHA checkpoints)")
    ev.add_argument("--episodes", type=int, default=100, help="number of seeded episodes")
    ev.add_argument("--seed", type=int, default=EVAL_SEED, help="episode i uses seed + i (demos use 0..)")
    ev.add_argument("--n-action-steps", type=int, default=None,
                    help="actions executed per chunk before replanning (default 5; aloha_sim 10, as openpi)")
    ev.add_argument("--batch-size", type=int, default=100, help="episodes run at once (one policy call)")
    ev.add_argument("--device", default="cpu", help="device of the policy")
    ev.add_argument("--camera", default=None, help="the policy's camera name for the env's camera")
    ev.add_argument("--prompt", default=None, help="pusht / aloha: the prompt (default: LeRobot's task)")
    ev.add_argument("--max-steps", type=int, default=None, help="pusht / aloha: episode limit")
    ev.add_argument("--aloha-task", default="transfer_cube", choices=["transfer_cube", "insertion"])
    ev.add_argument("--gif", type=int, default=4, help="episodes shown in the GIF (0: none)")
    ev.add_argument("--out", default=None, help="folder for eval.json and eval.gif")
    args = parser.parse_args(argv)
    {"demos": cmd_demos, "collect": cmd_collect, "rtc": cmd_rtc, "eval": cmd_eval}[args.command](args)


if __name__ == "__main__":
    main()
