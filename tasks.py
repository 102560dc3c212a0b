"""The built-in task: a laptop-sized world that proves the whole loop, its scripted expert and demos.

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

Any object with `infer_batch(observations, noise=None) -> (E, C, A)` is a policy: policy.py's
Policy, or ExpertPolicy / RandomPolicy below. sim.py evaluates them in closed loop, and its
`demos` command writes the expert's episodes with their norm stats and a tiny tokenizer.

Axis legend (paligemma.py's): E episodes, C chunk (actions per policy call), A action dim.
"""

import io
import math
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

import pi05
from readers import write_hdf5_episode

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
        self.camera, self.cameras = camera, (camera,)
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
# Demonstrations: expert episodes as HDF5, and a tiny tokenizer


def train_tokenizer(path, vocab_size=512, seed=0, extra=()):
    """A tiny SentencePiece model shaped like PaliGemma's (pad 0, EOS 1, BOS 2, "\\n" one piece,
    no dummy prefix, byte fallback), trained offline on every prompt of the task in every
    prompt format of the project: pi0 (the bare prompt), pi0.5 and pi0-FAST (with state bins,
    every number -1..255 many times) and FAST's "Action: ... |"; extra: more sentences (RECAP's
    indicator). Returns the processor."""
    rng = np.random.default_rng(seed)
    prompts = [t.format(f"{c} {s}") for t in TEMPLATES for c in COLOURS for s in SHAPES]
    sentences = []
    for i in range(6000):
        bins = rng.integers(-1, 256, size=rng.integers(1, 9))
        sentences += [prompts[i % len(prompts)], pi05.prompt_text(prompts[i % len(prompts)], bins), "Action: |"]
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


