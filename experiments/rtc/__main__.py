"""The real-time chunking latency study: naive switching against both of PI's remedies, d = 0..4.

    python -m experiments.rtc --out runs/rtc                        # the whole study (README.md)
    python -m experiments.rtc --env catch --out runs/rtc_catch      # the same on the dynamic task
    python -m experiments.rtc --env catch --chunk 6 --delays 0 1 2 3 --out runs/rtc_catch6   # its best-learnt chunk
    python -m experiments.rtc --checkpoint CKPT [--trained-checkpoint CKPT2] --env pusht --delays 0 1 2 3
    python -m experiments.rtc --checkpoint CKPT --env catch --first-actions   # where its first chunks go

Without --checkpoint it trains a pi0.5 on the built-in task (reach, or catch) twice (train.py in subprocesses,
plainly and with training-time RTC: --rtc-max-delay max(delays) --rtc-prefix-share), then for
every delay d (execution horizon s = max(d, 1), the RTC paper's protocol) evaluates naive
switching and inference-time RTC on the first model and the committed-prefix mode of the second
(sim.evaluate with a simulated inference delay). Prints the table; writes rtc.json and rtc.png.
"""

import argparse
import json
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import plots
from cli import main_guard
from experiments import run_train
from policy import Policy
from sim import ENVS, evaluate
from tasks import CATCH_RADIUS, EVAL_SEED, CatchEnv, rotate


def rtc_sweep(policy, delays, episodes=100, beta=5.0, seed=EVAL_SEED, progress=False, methods=None,
              env_name="builtin", env_kwargs=None):
    """For each delay d: naive switching against real-time chunking: "rtc", inference-time
    guidance; "trained", a checkpoint trained with --rtc-max-delay continuing the committed steps.
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


def first_actions(policy, scenes=100, samples=16, seed=EVAL_SEED):
    """Where a policy's first chunk on the catch task goes: `samples` chunks for the first
    observation of each of `scenes` unseen scenes, each first action counted by the object whose
    next place is nearest it (the copy the expert chases, the other copy, the distractor) or
    none within CATCH_RADIUS. -> shares of each and the mean distance to the chased copy's next
    place when there. Tells a policy that picks between the copies from one that lands between
    them."""
    torch.manual_seed(seed)
    counts, misses = dict(chased=0, other=0, distractor=0, none=0), []
    for s in range(seed, seed + scenes):
        env = CatchEnv()
        obs = env.reset(s)
        nexts = rotate(env.positions, env.omega)  # (3, 2): copies 0, 1 and the distractor, one step on
        for action in np.asarray(policy.infer_batch([obs] * samples))[:, 0]:
            dist = np.linalg.norm(nexts - action, axis=-1)
            k = int(np.argmin(dist))
            key = "none" if dist[k] > CATCH_RADIUS else "distractor" if k == 2 else "chased" if k == env.choice else "other"
            counts[key] += 1
            if key == "chased":
                misses.append(float(dist[k]))
    n = scenes * samples
    return {**{k: v / n for k, v in counts.items()}, "chased_miss": float(np.mean(misses)) if misses else None}


def plot_sweep(rows, path):
    """Success and switch jump against the delay, one line per method."""
    img = Image.new("RGB", (1280, 320), "white")
    draw = ImageDraw.Draw(img)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for panel, (key, title) in enumerate((("success_rate", "success vs delay d"), ("mean_jump", "jump at switches vs d"))):
        series = [(m, [r["delay"] for r in rows if r["method"] == m], [r[key] for r in rows if r["method"] == m],
                   plots.COLOURS[i], 3) for i, m in enumerate(methods)]
        plots.draw_chart(draw, (panel * 640 + 60, 30, panel * 640 + 620, 290), series, title,
                         ylim=(0, 1) if key == "success_rate" else None)
    img.save(path)
    return path


def table(rows, delays):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| delay d | " + " | ".join(f"{m}: success / jump" for m in methods) + " |", "|---" * (1 + len(methods)) + "|"]
    for d in delays:
        cells = [f"{r['success_rate']:.0%} / " + ("-" if r["mean_jump"] is None else f"{r['mean_jump']:.3f}")
                 for r in rows if r["delay"] == d]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study(args):
    """The sweep on a checkpoint, or (no --checkpoint) the whole study: train, then sweep."""
    task = {"builtin": "reach", "catch": "catch"}.get(args.env)
    if args.checkpoint is None and task is None:
        raise SystemExit(f"--env {args.env}: give --checkpoint (the study trains on the built-in tasks only: "
                         f"--env builtin or catch)")
    t0 = time.perf_counter()
    if args.first_actions:
        if args.checkpoint is None or args.env != "catch":
            raise SystemExit("--first-actions: give --checkpoint and --env catch")
        shares = first_actions(Policy(args.checkpoint, compiled=True), args.episodes)
        print("first actions on catch: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if k != "chased_miss")
              + f"; miss on the chased copy {shares['chased_miss']:.3f}")
        return shares
    plain, trained = args.checkpoint, args.trained_checkpoint
    if plain is None and 2 * max(max(args.delays), 1) > args.chunk:  # before the training, not after it
        raise SystemExit(f"--chunk {args.chunk} --delays {' '.join(map(str, args.delays))}: d = {max(args.delays)} "
                         f"needs a chunk of {2 * max(max(args.delays), 1)} or more (s = max(d, 1) actions run, then "
                         f"d more while the next chunk is computed)")
    if plain is None:
        out = Path(args.out or "runs/rtc")
        common = ["--model", args.model, "--task", task, "--steps", args.steps, "--chunk", args.chunk, "--seed",
                  args.seed, "--eval-episodes", 0, *shlex.split(args.train_args)]
        plain = run_train(out / "plain", *common)
        trained = run_train(out / "trained", *common, "--rtc-max-delay", max(args.delays),
                            "--rtc-prefix-share", args.prefix_share)
    out = Path(args.out or plain)
    out.mkdir(parents=True, exist_ok=True)
    sweep = dict(episodes=args.episodes, env_name=args.env, env_kwargs={} if args.camera is None else {"camera": args.camera})
    rows = rtc_sweep(Policy(plain, compiled=True), args.delays, beta=args.beta, **sweep)
    if trained:  # trained with --rtc-max-delay: the committed steps continued
        rows += rtc_sweep(Policy(trained, compiled=True), args.delays, methods={"trained": {}}, **sweep)
    print(table(rows, args.delays))
    (out / "rtc.json").write_text(json.dumps(dict(rows=rows, checkpoint=str(plain), trained_checkpoint=
                                                  trained and str(trained), env=args.env), indent=2))
    print(f"wrote {out / 'rtc.json'} and {plot_sweep(rows, out / 'rtc.png')} in "
          f"{(time.perf_counter() - t0) / 60:.1f} min")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="latency study: naive switching vs real-time chunking as the delay grows")
    p.add_argument("--checkpoint", default=None,
                   help="a pi0 / pi0.5 checkpoint to sweep (default: train one plainly and one with RTC, then sweep)")
    p.add_argument("--trained-checkpoint", default=None, help="the same model trained with --rtc-max-delay")
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="inference delays d, in steps")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--beta", type=float, default=5.0, help="guidance weight cap (the paper's 5)")
    p.add_argument("--env", default="builtin", choices=list(ENVS), help="the environment of the sweep: builtin "
                   "(the reach task) and catch (the dynamic task) train their own models, others need --checkpoint")
    p.add_argument("--camera", default=None, help="the policy's camera name for the env's camera")
    p.add_argument("--first-actions", action="store_true", help="catch: where the checkpoint's first chunks go "
                   "(the copy the expert chases, the other, the distractor, none) on --episodes scenes, no sweep")
    p.add_argument("--out", default=None, help="folder for rtc.json and rtc.png (default: the checkpoint's, "
                   "or runs/rtc for the whole study)")
    st = p.add_argument_group("the whole study (no --checkpoint): train.py's settings for both models")
    st.add_argument("--model", default="pi05", choices=["pi0", "pi05"])
    st.add_argument("--steps", type=int, default=6000)
    st.add_argument("--chunk", type=int, default=10, help="actions per chunk (d <= s <= chunk - d)")
    st.add_argument("--prefix-share", type=float, default=0.3,
                    help="training-time RTC: share of samples with a committed prefix (train.py --rtc-prefix-share)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--train-args", default="", help='more train.py flags for both, e.g. "--batch-size 16"')
    return study(p.parse_args(argv))


if __name__ == "__main__":
    with main_guard():
        main()
