"""Serving: a checkpoint directory + raw robot observations -> robot actions, over openpi's websocket.

`Policy` applies exactly the transforms training used (resize-with-pad, normalization, the
model's own prompt format, padding), samples a normalized action chunk (the model's sampler or
infer.CompiledSampler for pi0 / pi0.5, greedy decoding for pi0-FAST), and undoes the normalization (and delta actions)
for the robot's own action width. The checkpoint directory is described in models.py.

What a request looks like is the checkpoint's policy.json: a checkpoint of an openpi config
(convert_jax.py / train.py --openpi-config) takes that robot's own request, by key name, with
openpi's robot transforms around the model (robots.py: ALOHA's adapt_to_pi, DROID's and
LIBERO's cameras); any other takes {"images": {camera: uint8 HWC}, "state", "prompt"} with the
cameras it was trained on.

The server speaks openpi's protocol, so openpi_client.WebsocketClientPolicy talks to it
unchanged: one metadata frame on connect, then msgpack request -> msgpack reply.

Commands:
  python policy.py serve --checkpoint DIR --port 8000     # openpi's websocket protocol
  python policy.py plot --checkpoint DIR --data DATASET   # predicted vs recorded chunks (PNG)

Axis legend (paligemma.py's): B observations, C chunk (action horizon), A action dim.
"""

import argparse
import asyncio
import collections
import http
import json
import logging
import os
import threading
import time
import traceback

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import guidance
import models
import plots
import robots
from cli import above, at_least, main_guard
from episodes import check_finite
from fast_universal import load_tokenizer
from infer import CompiledSampler
from loader import collate
from pi0_fast import extract_actions
from readers import open_dataset

log = logging.getLogger("policy")


class Policy:
    """Raw observations -> robot actions, for one checkpoint directory.

    observation: the robot's own request for a checkpoint of an openpi config (robots.py), else
    {"images": {camera key: uint8 (H, W, 3) or (3, H, W)}, "state": (S,), "prompt": str}
    """

    def __init__(self, path, device="cpu", num_steps=10, compiled=False, compile_mode=None,
                 cuda_graph=False, dtype=None, cfg_beta=None):
        """compiled=True samples with infer.CompiledSampler (pi0 / pi0.5; the same actions to
        ~1e-6), with an optional torch.compile mode and CUDA graph. dtype: the serving precision,
        None = bf16 on CUDA and fp32 on CPU. In bf16 the weights are loaded straight into bf16
        once (the precision policy's fp32 parameters aside) and the matmuls run in bf16: no fp32
        copy, no per-call weight casts. cfg_beta: for a checkpoint trained with a prompt condition
        (policy.json "condition"), classifier-free guidance toward it (1 = plain conditioned
        sampling; default: policy.json's)."""
        self.path, self.device, self.num_steps = str(path), torch.device(device), num_steps
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        low = self.dtype != torch.float32
        self.model = models.load(self.path, self.device, self.dtype if low else None).eval()
        self.autocast = lambda: torch.autocast(self.device.type, dtype=self.dtype, enabled=low)
        cfg = self.model.cfg
        self.flow = models.spec(cfg).flow
        if not self.flow:  # pi0-FAST: greedy tokens, then the FAST tokenizer reads them back
            ours = os.path.join(self.path, "fast_tokenizer.json")  # else openpi's HF folder, as converted
            self.fast = load_tokenizer(ours if os.path.exists(ours) else os.path.join(self.path, "fast_tokenizer"))
        elif compiled:
            self.sampler = CompiledSampler(self.model, num_steps, self.dtype, compile_mode, cuda_graph)
        else:
            self.sampler = lambda batch, noise, guide: self.model.sample_actions(batch, noise, num_steps, guide)
        with open(os.path.join(self.path, "policy.json")) as f:
            self.settings = json.load(f)
        self.robot = self.settings.get("robot")  # an openpi robot family (robots.ROBOTS), or None
        self.condition = self.settings.get("condition")  # a conditioned policy: {"text", "cfg_beta"}
        self.cfg_beta = cfg_beta if cfg_beta is not None else (self.condition or {}).get("cfg_beta", 1.0)
        if self.cfg_beta != 1.0 and not (self.condition and self.flow):
            raise ValueError(f"cfg_beta {self.cfg_beta}: classifier-free guidance needs a flow model trained with a "
                             f"prompt condition (policy.json 'condition'); this one has condition={self.condition}")
        self.sp = models.load_sentencepiece(os.path.join(self.path, "tokenizer.model"))
        s = self.settings
        width = cfg.action_dim if self.flow else None  # pi0-FAST pads nothing
        self.transforms = data.Transforms(
            tokenize=models.prompt_tokenizer(cfg, self.sp), cameras=s["cameras"],
            norm_stats=os.path.join(self.path, "norm_stats.json"), use_quantiles=s["use_quantiles"],
            delta_mask=s.get("delta_mask"), state_dim=width, action_dim=width,
            image_size=cfg.vision.image_size)
        check_settings(s, cfg, self.transforms.norm_stats, self.path)
        self.valid = None  # pi0-FAST: per example, whether the answer decoded to a real chunk
        self.model_ms = None  # the last call's sampling time (policy_timing)

    def sample(self, batch, noise=None, guide=None):
        """pi0 / pi0.5: normalized chunks (B, C, A) from the sampler, in the serving precision;
        classifier-free guidance (cfg_beta != 1) composed with any other guide."""
        B, cfg = len(batch["state"]), self.model.cfg
        if noise is None:  # drawn here: a cfg-guided batch holds every observation twice
            noise = torch.randn(B, cfg.action_horizon, cfg.action_dim, device=self.device)
        if self.cfg_beta != 1.0:
            batch, cfg_guide = guidance.cfg_batch(batch), guidance.cfg(self.cfg_beta)
            guide = cfg_guide if guide is None else (lambda velocity: guide(cfg_guide(velocity)))
        with self.autocast():
            return self.sampler(batch, noise, guide)

    def sample_tokens(self, batch):
        """pi0-FAST: greedy tokens -> action chunks. An answer that does not decode is flagged in
        self.valid (returned with the actions, and a warning on every call that has one), never
        silently turned into zeros for the robot."""
        cfg = self.model.cfg
        with self.autocast():
            tokens = self.model.sample_tokens(batch).cpu().numpy()
        out = [extract_actions(self.sp, self.fast, t, cfg.action_horizon, cfg.action_dim, cfg.vocab_size)
               for t in tokens]
        self.valid = np.array([v for _, v in out])
        if not self.valid.all():
            log.warning(f"pi0-FAST answers of examples {np.flatnonzero(~self.valid).tolist()} of this batch did not "
                        f"decode to action chunks; their actions are a best effort (Policy.valid is False there)")
        return torch.from_numpy(np.stack([a for a, _ in out]))

    def rtc_leftover(self, states, prev_actions, delay, execution_horizon):
        """Real-time chunking: the previous chunks (B, C, A_robot), as the robot got them -> their
        leftover prev[s:] aligned with the new chunk, in the model's space (deltas against the
        *new* observation's state, normalized, padded), (B, C, A_model); held at the last action
        past the overlap."""
        cfg, s, d = self.model.cfg, execution_horizon, delay
        C, A = cfg.action_horizon, self.settings["action_dim"]
        if execution_horizon is None:
            raise ValueError("real-time chunking needs execution_horizon: how many actions of the previous "
                             "chunk had been executed when this observation was taken")
        prev = check_finite(prev_actions, "prev_actions")
        if prev.shape != (len(states), C, A):
            raise ValueError(f"prev_actions has shape {prev.shape}, expected ({len(states)}, {C}, {A}): "
                             "the previous chunks as this policy returned them")
        if not 0 <= d <= s <= C - d:
            raise ValueError(f"real-time chunking needs 0 <= delay ({d}) <= execution_horizon ({s}) <= "
                             f"horizon - delay ({C} - {d})")
        leftover = np.concatenate([prev[:, s:], np.repeat(prev[:, -1:], s, axis=1)], axis=1)  # (B, C, A)
        if self.robot:  # the robot's units -> the model's (ALOHA: joints flipped, grippers converted)
            leftover = robots.robot_actions_to_model(self.settings, leftover)
        if self.settings.get("delta_mask") is not None:
            leftover = np.stack([data.delta_actions(a, st, self.settings["delta_mask"])
                                 for a, st in zip(leftover, states)])
        leftover = data.normalize(leftover, self.transforms.norm_stats["actions"], self.settings["use_quantiles"], "actions")
        target = data.pad_last(leftover, cfg.action_dim)[0]
        return torch.from_numpy(target).to(self.device)

    def rtc_weights(self, delay, execution_horizon):
        """The paper's soft mask over the chunk (guidance.rtc_mask), 0 on padded dims: (1, C, A_model)."""
        cfg = self.model.cfg
        dims = torch.from_numpy((np.arange(cfg.action_dim) < self.settings["action_dim"]).astype(np.float32))
        weights = guidance.rtc_mask(cfg.action_horizon, delay, cfg.action_horizon - execution_horizon)[:, None] * dims
        return weights[None].to(self.device)

    def realtime(self, states, prev_actions, delay, execution_horizon, guided=False, beta=5.0, jacobian="full"):
        """How the sampler continues the previous chunks (guidance.py): a checkpoint trained with
        --rtc-max-delay is given the committed steps (clean, at t = 0); any other (or guided=True)
        is guided toward them with the paper's soft mask (padded dims get no guidance)."""
        if not self.flow:
            raise ValueError("real-time chunking needs a flow-matching sampler: pi0 or pi0.5, not pi0-FAST")
        trained = self.settings.get("rtc_max_delay", 0)
        target = self.rtc_leftover(states, prev_actions, delay, execution_horizon)
        if not trained or guided:
            return guidance.rtc(target, self.rtc_weights(delay, execution_horizon), beta, jacobian)
        if delay > trained:
            raise ValueError(f"delay {delay} exceeds the {trained} steps this checkpoint was trained to continue "
                             f"(--rtc-max-delay); pass guided=True for guidance instead")
        return guidance.committed(target, torch.full((len(states),), delay, device=self.device))

    def robot_inputs(self, observation):
        """One request -> {"images", "image_masks"?, "state" (model space), "prompt"?}: openpi's
        robot transforms for an openpi config's checkpoint, else our own form, checked."""
        if self.robot:
            return robots.robot_inputs(self.settings, observation)
        if not isinstance(observation, dict) or "images" not in observation or "state" not in observation:
            have = sorted(observation) if isinstance(observation, dict) else type(observation).__name__
            raise KeyError(f"observation {have}: this checkpoint takes {{'images': {{camera: uint8 image}}, 'state', "
                           f"'prompt'}} with cameras {[c for c in self.settings['cameras'] if c]}")
        images = {k: robots.hwc(v, k) for k, v in dict(observation["images"]).items()}
        return {**observation, "images": images, "state": observation["state"]}

    def check_state(self, state):
        """The state at the edge, in the model's space: 1-D, the width the checkpoint was trained
        on, finite, and within 1e4 times the scale of its norm stats per dim (a reading of 1e30 is
        a broken sensor: normalized and sampled it would give actions of 1e30)."""
        state = np.asarray(state)
        want = self.settings.get("state_dim")
        if state.ndim != 1 or (want is not None and len(state) != want):
            raise ValueError(f"state has shape {state.shape}: this checkpoint takes a 1-D state of {want} values")
        state = check_finite(state, "state")
        stats = self.transforms.norm_stats["state"]
        scale = 1 + np.max([np.abs(np.asarray(v, np.float64)[:len(state)]) for v in stats.values()], axis=0)
        absurd = np.flatnonzero(np.abs(state) > 1e4 * scale)
        if absurd.size:
            raise ValueError(f"state dims {absurd.tolist()} are {[float(f'{v:.3g}') for v in state[absurd]]}, over 1e4 "
                             f"times the scale of this checkpoint's norm stats there "
                             f"({[float(f'{v:.3g}') for v in scale[absurd]]}): a broken reading?")
        return state

    def model_inputs(self, observations):
        """Requests -> (the model's batch dict, the states in the model's space (B, S) for the
        outputs' delta actions): robot inputs, default prompt, then data.Transforms."""
        samples = [self.robot_inputs(o) for o in observations]
        for s in samples:  # openpi's InjectDefaultPrompt: only where the request has none
            s["state"] = self.check_state(s["state"])
            s["prompt"] = request_prompt(s.get("prompt"), self.settings.get("default_prompt"))
            if self.condition:  # a conditioned policy acts as its condition says (RECAP: "Advantage: positive")
                s["condition"] = self.condition["text"]
        batch = collate([self.transforms(s) for s in samples])
        states = np.stack([np.asarray(s["state"], np.float32) for s in samples])
        return {k: v.to(self.device) for k, v in batch.items()}, states

    def robot_actions(self, actions, states):
        """Normalized model actions (B, C, A_model) -> the robot's (B, C, A_robot): unnormalize,
        deltas back to absolute against the model-space state, then the robot's own outputs."""
        A = self.settings["action_dim"]
        actions = data.unnormalize(actions[..., :A], self.transforms.norm_stats["actions"],
                                   self.settings["use_quantiles"])
        if self.settings.get("delta_mask") is not None:
            actions = np.stack([data.absolute_actions(a, s, self.settings["delta_mask"])
                                for a, s in zip(actions, states)])
        if self.robot:
            actions = robots.robot_outputs(self.settings, actions)
        return actions.astype(np.float32)

    def infer_batch(self, observations, noise=None, prev_actions=None, delay=0, execution_horizon=None, **rtc):
        """A list of observations -> (N, C, A_robot) float32 actions. With prev_actions (the
        previous chunks), the delay d and the execution horizon s, sampling is guided toward the
        actions the robot is still executing (real-time chunking; rtc: beta, jacobian)."""
        batch, states = self.model_inputs(observations)
        if not self.flow:
            t0 = time.perf_counter()
            actions = self.sample_tokens(batch).numpy()
            self.model_ms = 1000 * (time.perf_counter() - t0)
            return self.robot_outputs(actions, states)
        if noise is not None:
            noise = torch.as_tensor(noise, dtype=torch.float32, device=self.device)
        guide = None if prev_actions is None else self.realtime(states, prev_actions, delay, execution_horizon, **rtc)
        t0 = time.perf_counter()
        actions = self.sample(batch, noise, guide).cpu().numpy()
        self.model_ms = 1000 * (time.perf_counter() - t0)
        return self.robot_outputs(actions, states)

    def robot_outputs(self, actions, states):
        """Normalized model actions (B, C, A_model) -> the robot's (B, C, A_robot), checked: a
        non-finite action is an error, never sent to a robot."""
        out = self.robot_actions(actions, states)
        bad = ~np.isfinite(out)
        if bad.any():
            raise FloatingPointError(f"the model produced NaN or inf actions (examples "
                                     f"{sorted(set(np.nonzero(bad)[0].tolist()))}): not served; check the "
                                     f"checkpoint's weights and norm stats ({self.path})")
        return out

    def infer(self, observation, noise=None, prev_actions=None, delay=0, execution_horizon=None):
        """One observation -> {"actions": (C, A_robot), "policy_timing": {"infer_ms": the model's
        sampling time, as openpi's}}, and for pi0-FAST "valid": whether the answer decoded to a real
        chunk. prev_actions (C, A_robot), delay and execution_horizon: real-time chunking (see
        infer_batch)."""
        rtc = {} if prev_actions is None else dict(prev_actions=np.asarray(prev_actions, np.float32)[None], delay=delay,
                                                   execution_horizon=execution_horizon)
        actions = self.infer_batch([observation], None if noise is None else np.asarray(noise)[None], **rtc)
        out = {"actions": actions[0], "policy_timing": {"infer_ms": self.model_ms}}
        if self.valid is not None:
            out["valid"] = bool(self.valid[0])
        return out


def check_settings(s, cfg, stats, path):
    """policy.json against the model and its stats, at load: a mistake here would otherwise fail
    every request obscurely, or serve un-normalized dims."""
    where = os.path.join(path, "policy.json")
    if s.get("robot") is not None and s["robot"] not in robots.ROBOTS:
        raise ValueError(f"{where}: robot {s['robot']!r} is not one of {sorted(robots.ROBOTS)}")
    cams = s.get("cameras")
    if not isinstance(cams, list) or len(cams) != len(cfg.cameras) or not all(c is None or isinstance(c, str)
                                                                             for c in cams):
        raise ValueError(f"{where}: 'cameras' is {cams!r}: expected one camera name (or null) per model view "
                         f"{list(cfg.cameras)}")
    A, width = s.get("action_dim"), len(stats["actions"]["q01" if s["use_quantiles"] else "mean"])
    if not isinstance(A, int) or not 0 < A <= width or (cfg.action_dim and A > cfg.action_dim):
        raise ValueError(f"{where}: action_dim {A!r}: expected an integer in [1, {width}] (the norm stats' width)"
                         f" and at most the model's {cfg.action_dim}")


# ----------------------------------------------------------------------------------------------
# serve: openpi's websocket protocol (openpi_client.WebsocketClientPolicy talks to it)

REQUEST_KEYS = ("noise", "seed", "prev_actions", "delay", "execution_horizon")  # the protocol's own keys


def request_noise(msg, policy):
    """Optional determinism: a request's "noise" (C, A_model) float, or an int "seed" that draws it
    with numpy's default_rng(seed).standard_normal; neither: fresh torch noise."""
    cfg = policy.model.cfg
    shape = (cfg.action_horizon, cfg.action_dim)
    if "noise" in msg:
        noise = np.array(msg["noise"], np.float32)  # a writable copy of the zero-copy buffer
        if noise.shape != shape or not np.isfinite(noise).all() or np.abs(noise).max() > 50:
            raise ValueError(f"request 'noise' has shape {noise.shape} and values in [{noise.min():.3g}, "
                             f"{noise.max():.3g}]: expected N(0, 1) draws, finite, of shape (action_horizon, "
                             f"model action_dim) = {shape}")
        return noise
    if "seed" in msg:
        return np.random.default_rng(request_int(msg, "seed")).standard_normal(shape).astype(np.float32)
    return None


def request_int(msg, key, low=0):
    """A request's integer field (seed, delay, execution_horizon): an int >= low, never 1.5 or "1"."""
    value = msg[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"request '{key}' is {type(value).__name__} {value!r:.40}: expected an integer >= {low}")
    return int(value)


def request_prompt(value, default=None):
    """A request's prompt as text: a str, or (as openpi accepts) UTF-8 bytes or a 0-d numpy array of
    either; none: the checkpoint's default prompt; neither is an error, as in openpi."""
    if value is None:
        value = default
    if value is None:
        raise ValueError("Prompt is required: the request has no 'prompt' and this checkpoint no default prompt")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"request 'prompt' is bytes that are not UTF-8 ({e.reason})") from None
    if not isinstance(value, str):
        raise TypeError(f"request 'prompt' is {type(value).__name__} {value!r:.60}: expected text")
    return value


def server_metadata(policy):
    """The metadata frame a client gets on connect: what the checkpoint serves, plus policy.json's
    own "metadata" (e.g. a robot's reset pose)."""
    cfg, s = policy.model.cfg, policy.settings
    cameras = list(s["views"].values()) if policy.robot else s["cameras"]  # the request's image keys
    robot = {"robot": s["robot"], "openpi_config": s.get("openpi_config")} if policy.robot else {}
    return {"model": cfg.model, "action_horizon": cfg.action_horizon, "action_dim": s["action_dim"],
            "cameras": [c for c in cameras if c is not None], "dtype": str(policy.dtype).split(".")[-1],
            **robot, **s.get("metadata", {})}


def numpy_msgpack():
    """(packb, unpackb) with openpi_client.msgpack_numpy's encoding of numpy arrays and scalars."""
    try:
        import msgpack
    except ImportError:
        raise ImportError("serving needs msgpack: pip install websockets msgpack") from None

    def pack_default(obj):
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind in "OVc":
                raise ValueError(f"unsupported dtype {obj.dtype}")
            return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
        if isinstance(obj, np.generic):
            return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
        return obj

    def unpack_hook(obj):
        if b"__ndarray__" in obj:
            return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
        if b"__npgeneric__" in obj:
            return np.dtype(obj[b"dtype"]).type(obj[b"data"])
        return obj

    return (lambda obj: msgpack.packb(obj, default=pack_default),
            lambda raw: msgpack.unpackb(raw, object_hook=unpack_hook))


def parse_request(msg, policy):
    """A decoded request -> (observation, noise or None, real-time chunking keywords)."""
    if not isinstance(msg, dict):
        raise TypeError(f"a request is a dict observation, got {type(msg).__name__}")
    obs = {k: v for k, v in msg.items() if k not in REQUEST_KEYS}
    rtc = {k: msg[k] if k == "prev_actions" else request_int(msg, k)
           for k in ("prev_actions", "delay", "execution_horizon") if k in msg}
    if rtc and "prev_actions" not in rtc:
        raise ValueError(f"real-time chunking needs 'prev_actions' with {sorted(rtc)}")
    return obs, request_noise(msg, policy), rtc


def make_server(policy, host="0.0.0.0", port=8000, metadata=None, max_message_mb=16):
    """An asyncio websockets server (start it with `async with` or `await`): openpi's
    WebsocketPolicyServer. One metadata frame on connect, then msgpack request -> msgpack reply
    with "server_timing"; an error sends the traceback as a text frame and closes that
    connection with 1011 (the server keeps serving), as openpi does. A request larger than
    max_message_mb is refused by the websocket layer (close code 1009, "message too big").
    metadata: what the connect frame carries (default: server_metadata(policy))."""
    try:
        from websockets.asyncio.server import serve
        from websockets.frames import CloseCode
    except ImportError:
        raise ImportError("serving needs websockets: pip install websockets msgpack") from None
    packb, unpackb = numpy_msgpack()
    lock = asyncio.Lock()  # one inference at a time on the one model
    metadata = server_metadata(policy) if metadata is None else metadata

    async def handler(ws):
        await ws.send(packb(metadata))
        prev_total = None
        while True:
            t0 = time.monotonic()  # openpi's: from waiting for the request to sending the reply
            try:
                raw = await ws.recv()
            except Exception:  # the client went away
                return
            try:
                if isinstance(raw, str):
                    raise TypeError("a request is a binary frame of msgpack (openpi_client's packb), got a text frame")
                obs, noise, rtc = parse_request(unpackb(raw), policy)
                async with lock:
                    t_infer = time.monotonic()  # openpi's infer_ms: the policy call alone
                    result = await asyncio.to_thread(policy.infer, obs, noise, **rtc)
                result["server_timing"] = {"infer_ms": 1000 * (time.monotonic() - t_infer)}
                if prev_total is not None:
                    result["server_timing"]["prev_total_ms"] = prev_total
                await ws.send(packb(result))
                prev_total = 1000 * (time.monotonic() - t0)
            except Exception:
                await ws.send(traceback.format_exc())
                await ws.close(CloseCode.INTERNAL_ERROR, "Internal server error. Traceback included in previous frame.")
                return

    def health(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    return serve(handler, host, port, compression=None, max_size=int(max_message_mb * 2 ** 20),
                 process_request=health)


def serve_forever(args):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    policy = Policy(args.checkpoint, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                    num_steps=args.steps, compiled=True, compile_mode=args.compile, cuda_graph=args.cuda_graph,
                    dtype=dtype)

    async def main():
        async with make_server(policy, args.host, args.port, max_message_mb=args.max_message_mb) as server:
            print(f"serving {args.checkpoint} on ws://{args.host}:{args.port} (GET /healthz)")
            await server.serve_forever()

    asyncio.run(main())


# ----------------------------------------------------------------------------------------------
# The robot's side of real-time chunking (the RTC paper's Algorithm 1)

class RealTimeChunker:
    """Smooth control while the policy thinks: call get_action(observation) once per control
    tick; a background thread asks for the next chunk as soon as s_min actions of the current
    one have run, handing the policy that chunk, the delay d it expects (the largest of the last
    `delay_buffer` delays it saw) and the execution horizon s (actions consumed when the
    observation was taken). The robot keeps executing the current chunk meanwhile; the new one
    takes over at index t - s, the delay that actually happened, which joins the buffer.

    infer(observation, **rtc) -> (C, A) actions: for this project's Policy,
    `lambda obs, **rtc: policy.infer(obs, **rtc)["actions"]`; for openpi's websocket client,
    `lambda obs, **rtc: client.infer(dict(obs, **rtc))["actions"]`. Feasible when
    d <= s <= C - d: a chunk that runs dry raises."""

    def __init__(self, infer, s_min, delay_buffer=10):
        self.infer, self.s_min = infer, s_min
        self.cond = threading.Condition()
        self.chunk, self.t, self.observation, self.running = None, 0, None, True
        self.delays = collections.deque([0], maxlen=delay_buffer)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def get_action(self, observation):
        with self.cond:
            self.observation = observation
            if self.chunk is None:  # the first chunk: nothing to execute meanwhile, so wait for it
                self.chunk, self.t = np.asarray(self.infer(observation)), 0
                self.thread.start()
            if self.t >= len(self.chunk):
                raise RuntimeError(f"the chunk of {len(self.chunk)} actions ran dry: inference takes longer than "
                                   f"horizon - s_min steps (delays seen: {list(self.delays)})")
            action = self.chunk[self.t]
            self.t += 1
            self.cond.notify_all()
            return action

    def _loop(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.t >= self.s_min or not self.running)
                if not self.running:
                    return
                s, prev, obs, d = self.t, self.chunk.copy(), self.observation, max(self.delays)
            new = np.asarray(self.infer(obs, prev_actions=prev, delay=d, execution_horizon=s))
            with self.cond:
                self.chunk, self.t = new, self.t - s  # t is now the delay that happened
                self.delays.append(self.t)

    def close(self):
        with self.cond:
            self.running = False
            self.cond.notify_all()


# ----------------------------------------------------------------------------------------------
# plot: predicted vs recorded action chunks, one panel per action dimension (pillow only)

def plot(args):
    """Draw, for a few frames of a dataset, the recorded chunk (grey) and the predicted one (colour)."""
    policy = Policy(args.checkpoint, device=args.device or "cpu", num_steps=args.steps)
    if policy.robot:  # an openpi config's checkpoint: the dataset read as that config reads it
        ds = robots.open_robot_dataset(args.data, policy.settings["openpi_config"], policy.model.cfg.action_horizon)
        frames = np.linspace(0, len(ds) - 1, args.frames).astype(int)
        pairs = [ds.request(int(i)) for i in frames]
        samples, recorded = [q for q, _ in pairs], np.stack([s["actions"] for _, s in pairs])
    else:
        ds = open_dataset(args.data, chunk_size=policy.model.cfg.action_horizon)
        frames = np.linspace(0, len(ds) - 1, args.frames).astype(int)
        samples = [ds[int(i)] for i in frames]
        recorded = np.stack([s["actions"] for s in samples])
    torch.manual_seed(0)
    predicted = policy.infer_batch(samples)  # (F, C, A)
    F_, C, A = predicted.shape
    cell_w, cell_h = 300, 150
    img = Image.new("RGB", (cell_w * A, cell_h * F_), "white")
    draw = ImageDraw.Draw(img)
    for d in range(A):  # one panel per frame and action dim: chunk step on x, the action's value on y
        lo = min(predicted[..., d].min(), recorded[..., d].min())
        hi = max(predicted[..., d].max(), recorded[..., d].max())
        for f in range(F_):
            x0, y0 = d * cell_w, f * cell_h
            series = [("recorded", range(C), recorded[f, :, d], plots.GREY, 3),
                      ("predicted", range(C), predicted[f, :, d], plots.COLOURS[f % 5], 2)]
            plots.draw_chart(draw, (x0 + 50, y0 + 20, x0 + cell_w - 10, y0 + cell_h - 22), series,
                             f"frame {frames[f]}, dim {d}", ylim=(lo, hi + 1e-6))
    img.save(args.out)
    err = np.abs(predicted - recorded).mean()
    print(f"wrote {args.out}: {F_} frames x {A} dims, grey recorded, colour predicted; mean |error| {err:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="openpi websocket policy server")
    s.add_argument("--checkpoint", required=True, help="checkpoint directory")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=at_least(0), default=8000)
    s.add_argument("--steps", type=at_least(1), default=10, help="Euler steps")
    s.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    s.add_argument("--device", help="default: cuda if available, else cpu")
    s.add_argument("--compile", default=None, help='torch.compile mode ("default", "max-autotune", ...)')
    s.add_argument("--cuda-graph", action="store_true", help="one CUDA graph over the denoising loop")
    s.add_argument("--max-message-mb", type=above(0), default=16,
                   help="largest request accepted (MiB); larger ones close the connection with 1009")
    pl = sub.add_parser("plot", help="predicted vs recorded action chunks, per dimension")
    pl.add_argument("--checkpoint", required=True, help="checkpoint directory")
    pl.add_argument("--data", required=True, help="dataset (LeRobot dir or HDF5 file / dir)")
    pl.add_argument("--out", default="actions.png", help="PNG to write")
    pl.add_argument("--frames", type=at_least(1), default=4, help="frames spread over the dataset")
    pl.add_argument("--steps", type=at_least(1), default=10, help="Euler steps")
    pl.add_argument("--device", help="default: cpu")
    args = parser.parse_args(argv)
    {"serve": serve_forever, "plot": plot}[args.command](args)


if __name__ == "__main__":
    with main_guard():
        main()
