"""The built-in tasks: laptop-sized worlds that prove the whole loop, their scripted experts and demos.

Two tasks share one table and camera: "reach" (below; the main command's) and "catch", a dynamic
one where the table turns and timing matters (its own section further down; the real-time
chunking study's).

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


def cap_speed(delta, speed=MAX_SPEED):
    """Scale a displacement down to length `speed` if it is longer (the agent's top speed)."""
    norm = float(np.linalg.norm(delta))
    return delta if norm <= speed else delta * (speed / norm)


def draw_scene(x, y, objects, positions, radius, background):
    """The table at the supersampled size, float32 (112, 112, 3): objects [(colour, shape)] at
    positions (N, 2); x, y are the pixel centres in table units."""
    scene = np.empty((*x.shape, 3), np.float32)
    scene[:] = background
    for (colour, shape), (cx, cy) in zip(objects, positions):
        if shape == "ball":
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
        else:  # a square of the ball's area
            half = radius * math.sqrt(math.pi) / 2
            inside = np.maximum(abs(x - cx), abs(y - cy)) <= half
        scene[inside] = COLOURS[colour]
    return scene


def finish_image(scene, x, y, agent):
    """The agent drawn over a scene, averaged down to the camera's uint8 (56, 56, 3)."""
    img = scene.copy()
    img[(x - agent[0]) ** 2 + (y - agent[1]) ** 2 <= AGENT_RADIUS ** 2] = AGENT_COLOUR
    s = SUPERSAMPLE
    img = img.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s, 3).mean(axis=(1, 3))  # (56, 56, 3)
    return np.round(img).astype(np.uint8)


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
        self.scene = draw_scene(self.x, self.y, self.objects, self.positions, OBJECT_RADIUS, BACKGROUND)
        return self.observation()  # the objects never move: drawn once, at the supersampled size

    def render(self):
        """The top camera: uint8 (56, 56, 3), the agent drawn over the objects."""
        return finish_image(self.scene, self.x, self.y, self.agent)

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
# The dynamic task ("catch"): the world moves, timing matters, two good ways to succeed
#
# The table turns: every object circles the table's centre at CATCH_OMEGA radians a step, and the
# turn reverses at random (probability CATCH_FLIP a step); the background's tint shows the way it
# turns now (grey: anticlockwise, blue: clockwise), so one image tells where everything will be.
# Two objects share the named colour and shape ("catch a red ball": either will do), and a
# distractor does not. Success: the agent's centre stays on one of the two for CATCH_HOLD steps
# in a row, within CATCH_MAX_STEPS. The expert chases the one nearer to where the agent starts.
# So stale actions cost (the turn may have reversed since the observation they were planned
# from) and so does switching between chunks that chose differently (each switch wastes steps,
# and the time limit leaves few to waste): what real-time chunking is for.

CATCH_OMEGA, CATCH_FLIP = 0.1, 0.15  # radians a step (an object at radius 0.7 moves 0.07), reversal chance
CATCH_SPEED = 0.12                   # the agent's top speed here: faster than any object
CATCH_RADIUS = OBJECT_RADIUS
CATCH_HOLD, CATCH_MAX_STEPS = 3, 16  # the demos' expert needs 7 steps on average
CATCH_TEMPLATES = ("catch a {}", "chase a {}", "intercept a {}")
CLOCKWISE_BACKGROUND = (200, 215, 240)


def rotate(points, angle):
    """Points (..., 2) turned anticlockwise by angle radians about the table's centre; angle
    broadcasts against points[..., 0] (one point at many angles: (K,) -> (K, 2))."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * points[..., 0] - s * points[..., 1], s * points[..., 0] + c * points[..., 1]], -1)


def catch_plan(target, omega, steps):
    """The expert's next `steps` actions against an object at `target` that turns omega a step
    (no reversal foreseen): where the object will be 1, 2, ... steps ahead. Heading each step for
    the object's next place, an agent faster than any object closes in on it and then rides
    along (as fast as aiming at the intercept point, measured, and simpler to learn: a chunk is
    the object's own path, whatever the agent's place). -> (steps, 2)."""
    return rotate(np.asarray(target, np.float64), omega * np.arange(1, steps + 1))


class CatchEnv(ReachEnv):
    """One episode of the catch task: reset(seed) -> obs; step(action) -> (obs, success, done).
    Observation, state and action as the reach task's."""
    name, max_steps = "catch", CATCH_MAX_STEPS

    def reset(self, seed):
        rng = np.random.default_rng(seed)
        colours = [str(c) for c in rng.choice(list(COLOURS), 2, replace=False)]
        shape = str(rng.choice(SHAPES))
        self.objects = [(colours[0], shape)] * 2 + [(colours[1], str(rng.choice(SHAPES)))]
        while True:  # on a ring around the centre, well apart (turning together, they stay apart)
            r, a = rng.uniform(0.3, 0.7, 3), rng.uniform(0, 2 * math.pi, 3)
            self.positions = np.stack([r * np.cos(a), r * np.sin(a)], -1)
            gaps = np.linalg.norm(self.positions[:, None] - self.positions[None], axis=-1)
            if gaps[np.triu_indices(3, 1)].min() >= 0.65:
                break
        while True:
            self.agent = rng.uniform(-0.9, 0.9, 2)
            if np.linalg.norm(self.positions - self.agent, axis=-1).min() >= 0.5:
                break
        self.omega = CATCH_OMEGA * float(rng.choice([-1.0, 1.0]))
        self.choice = int(np.argmin(np.linalg.norm(self.positions[:2] - self.agent, axis=-1)))  # the nearer one
        self.prompt = str(rng.choice(CATCH_TEMPLATES)).format(f"{colours[0]} {shape}")
        self.rng = rng
        self.t, self.held = 0, 0
        return self.observation()

    def render(self):
        background = BACKGROUND if self.omega > 0 else CLOCKWISE_BACKGROUND
        scene = draw_scene(self.x, self.y, self.objects, self.positions, CATCH_RADIUS, background)
        return finish_image(scene, self.x, self.y, self.agent)

    def step(self, action):
        action = np.asarray(action, np.float64)
        if action.shape != (2,) or not np.isfinite(action).all():
            raise ValueError(f"catch env: action must be 2 finite numbers (x, y), got {action!r}")
        self.agent = self.agent + cap_speed(np.clip(action, -1.0, 1.0) - self.agent, CATCH_SPEED)
        self.positions = rotate(self.positions, self.omega)
        if self.rng.random() < CATCH_FLIP:
            self.omega = -self.omega
        self.t += 1
        on = np.linalg.norm(self.positions[:2] - self.agent, axis=-1) <= CATCH_RADIUS
        self.held = self.held + 1 if on.any() else 0
        success = self.held >= CATCH_HOLD
        return self.observation(), success, success or self.t >= self.max_steps

    def expert_action(self):
        return catch_plan(self.positions[self.choice], self.omega, 1)[0]


# ----------------------------------------------------------------------------------------------
# Reference policies: anything with infer_batch(observations, noise=None) -> (E, C, A)


class ExpertPolicy:
    """The scripted expert, seeing only what a model sees: the colour word of the prompt picks
    the object, and the centre of its pixels in the image is every action of the chunk. It
    proves the task is solvable from the observation alone."""

    def __init__(self, chunk_size=6, camera="top"):
        self.chunk_size, self.camera = chunk_size, camera

    def named_pixels(self, obs):
        """-> the camera's image (int32) and the rows, cols of the prompt's colour in it."""
        colour = next((c for c in COLOURS if c in obs["prompt"].split()), None)
        if colour is None:
            raise ValueError(f"{type(self).__name__}: no colour of {list(COLOURS)} in prompt {obs['prompt']!r}")
        image = obs["images"][self.camera].astype(np.int32)
        rows, cols = np.nonzero((abs(image - COLOURS[colour]) < 40).all(axis=-1))
        if len(rows) == 0:
            raise ValueError(f"{type(self).__name__}: no {colour} pixels in camera '{self.camera}'")
        return image, rows, cols

    def infer_batch(self, observations, noise=None):
        chunks = []
        for obs in observations:
            image, rows, cols = self.named_pixels(obs)
            centre = [(cols.mean() + 0.5) / IMAGE_SIZE * 2 - 1, 1 - (rows.mean() + 0.5) / IMAGE_SIZE * 2]
            chunks.append([centre] * self.chunk_size)
        return np.array(chunks, np.float32)  # (E, C, 2)


class CatchExpertPolicy(ExpertPolicy):
    """The catch task's expert, seeing only what a model sees: the background's tint gives the
    way the table turns, the named colour's pixels the two objects (split in two by 2-means), the
    state the agent. It chases the nearer of the two and plans the chunk with catch_plan."""

    def infer_batch(self, observations, noise=None):
        chunks = []
        for obs in observations:
            image, rows, cols = self.named_pixels(obs)
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            tint = np.median(border, axis=0)
            clockwise = abs(tint - CLOCKWISE_BACKGROUND).sum() < abs(tint - BACKGROUND).sum()
            points = np.stack([(cols + 0.5) / IMAGE_SIZE * 2 - 1, 1 - (rows + 0.5) / IMAGE_SIZE * 2], -1)
            a = points[np.argmax(np.linalg.norm(points - points.mean(0), axis=-1))]
            b = points[np.argmax(np.linalg.norm(points - a, axis=-1))]
            for _ in range(5):  # 2-means: the two objects' centres
                near_a = np.linalg.norm(points - a, axis=-1) <= np.linalg.norm(points - b, axis=-1)
                a, b = points[near_a].mean(0), points[~near_a].mean(0)
            agent = np.asarray(obs["state"], np.float64)
            target = min((a, b), key=lambda c: np.linalg.norm(c - agent))
            omega = -CATCH_OMEGA if clockwise else CATCH_OMEGA
            chunks.append(catch_plan(target, omega, self.chunk_size))
        return np.array(chunks, np.float32)  # (E, C, 2)


TASKS = {"reach": ReachEnv, "catch": CatchEnv}
EXPERTS = {"reach": ExpertPolicy, "catch": CatchExpertPolicy}


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


def train_tokenizer(path, vocab_size=512, seed=0, extra=(), task="reach"):
    """A tiny SentencePiece model shaped like PaliGemma's (pad 0, EOS 1, BOS 2, "\\n" one piece,
    no dummy prefix, byte fallback), trained offline on every prompt of the task in every
    prompt format of the project: pi0 (the bare prompt), pi0.5 and pi0-FAST (with state bins,
    every number -1..255 many times) and FAST's "Action: ... |"; extra: more sentences (RECAP's
    indicator); task: whose prompts ("reach" or "catch"). Returns the processor."""
    rng = np.random.default_rng(seed)
    templates = {"reach": TEMPLATES, "catch": CATCH_TEMPLATES}[task]
    prompts = [t.format(f"{c} {s}") for t in templates for c in COLOURS for s in SHAPES]
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


def record_demos(out, episodes, seed=DEMO_SEED, progress=True, degraded=0.0, task="reach"):
    """Expert episodes of a task ("reach" or "catch") -> out/episode_NNNNN.hdf5 (ALOHA layout:
    /observations/qpos, /action, /observations/images/top; root attrs prompt, fps and success).
    degraded (reach only): the fraction of episodes a worse demonstrator records instead (2/3
    "wrong", 1/3 "wander"; degraded_action), chosen per episode from its seed. Returns the
    success count."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: one of {list(TASKS)}")
    if degraded and task != "reach":
        raise ValueError(f"degraded demonstrations exist for the reach task only, not {task!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env, successes = TASKS[task](), 0
    for i in tqdm(range(episodes), desc="demos", disable=not progress):
        obs, done, success = env.reset(seed + i), False, False
        rng = np.random.default_rng([seed + i, 1])  # apart from the layout's generator
        mode = "expert" if rng.random() >= degraded else ("wrong" if rng.random() < 2 / 3 else "wander")
        wrong = (env.target + 1 + int(rng.integers(NUM_OBJECTS - 1))) % NUM_OBJECTS if task == "reach" else None
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


