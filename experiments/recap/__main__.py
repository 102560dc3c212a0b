"""The RECAP experiment's commands: value, advantages, collect, and the whole demo with its table.

    python -m experiments.recap value --data D [D ...] --out V [--init V0] [--backbone P]
    python -m experiments.recap advantages --value V [V1 ...] --data D [D ...]
    python -m experiments.recap collect --checkpoint P --episodes 500 --out rollouts
    python -m experiments.recap demo --out runs/recap [--seed S]
    python -m experiments.recap diagnose --out runs/recap     # a finished demo's stages (diagnose.py)

recap.py beside this file holds the method (rewards, the value function, advantages); README.md
the measured tables and what they took.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import data
import plots
import sim
import tasks
from cli import above, at_least, main_guard
from experiments import run_train
from experiments.recap import diagnose
from experiments.recap.recap import (compute_advantages, episode_labels, load_value, train_value, value_separation,
                                     write_advantages)
from policy import Policy
from readers import open_dataset, write_hdf5_episode

def open_datasets(paths, chunk_size=1):
    return [open_dataset(p, chunk_size=chunk_size) for p in paths]


def train_policy(out, datasets, args, *extra):
    """train.py in a subprocess, exactly as a user runs it; -> the exported checkpoint."""
    return run_train(out, "--model", args.model, "--data", *datasets, "--eval-episodes", 0, "--seed", args.seed,
                         "--norm-stats", Path(datasets[0]) / "norm_stats.json", *extra)


def finetune(init, steps, lr):
    """train.py's flags that fine-tune a policy: from init's weights, no warm-up."""
    return "--init", init, "--warmup", 0, "--lr", lr, "--steps", steps


def conditioned(args):
    """train.py's flags that train with RECAP's indicator, dropped for --condition-dropout of the samples."""
    return "--conditions", 1, "--condition-dropout", args.condition_dropout


def closed_loop(checkpoint, episodes, cfg_beta=None):
    r = sim.evaluate(Policy(checkpoint, cfg_beta=cfg_beta), "builtin", episodes, tasks.EVAL_SEED, progress=False)
    return {k: r[k] for k in ("successes", "episodes", "success_rate", "ci95", "mean_length")}


def plot_values(tables, datasets, path, per_kind=12):
    """V along episodes (x: frame, y: V in [-1, 0]): green successes, red failures."""
    series, drawn = [], {True: 0, False: 0}
    for ds, table in zip(datasets, tables):
        for key, ok in zip(ds.episode_keys(), episode_labels(ds)[0]):
            if drawn[bool(ok)] < per_kind:
                drawn[bool(ok)] += 1
                v = table["episodes"][str(key)]["value"]
                series.append(("", list(range(len(v))), v, (40, 160, 60) if ok else (210, 40, 40), 2))
    return plots.save_chart(path, series, f"V along {drawn[True]} successful (green) and {drawn[False]} failed (red) "
                            "episodes, by frame", ylim=(-1, 0))


def record_rollouts(policy, out, episodes, seed, n_action_steps=5, progress=True):
    """A policy's own closed-loop episodes -> out/episode_NNNNN.hdf5 like the demos, each with
    its success label (what RECAP learns from). Returns sim.evaluate's result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    episodes_seen = {}

    def on_step(seed_, obs, action, success, done):
        ep = episodes_seen.setdefault(seed_, dict(states=[], actions=[], images=[], prompt=obs["prompt"]))
        ep["states"].append(obs["state"]), ep["actions"].append(action), ep["images"].append(obs["images"]["top"])
        if done:
            write_hdf5_episode(out / f"episode_{seed_ - seed:05d}.hdf5", np.array(ep["states"]),
                               np.array(ep["actions"]), {"top": np.array(ep["images"])}, prompt=ep["prompt"],
                               fps=tasks.FPS, attrs={"success": bool(success), "behaviour": "rollout"})
            del episodes_seen[seed_]

    return sim.evaluate(policy, "builtin", episodes, seed, n_action_steps, progress=progress, on_step=on_step)


def add_demo_args(p):
    p.add_argument("--out", default="runs/recap", help="the experiment's folder")
    p.add_argument("--model", default="pi0", choices=["pi0", "pi05"])
    p.add_argument("--episodes", type=at_least(2), default=2000, help="demonstrations, expert and degraded")
    p.add_argument("--degraded", type=float, default=0.4,
                   help="share of episodes by the degraded demonstrator (0.6 leaves fewer expert frames than the 30%% positive share)")
    p.add_argument("--steps", type=at_least(1), default=12000,
                   help="imitation (SFT) training steps, and RECAP's under --recap-start scratch (at 6000 the tiny pi0 "
                        "does not yet ground the indicator from scratch: with the true labels 29%%, at 12000 75%%)")
    p.add_argument("--recap-start", default="imitation", choices=["imitation", "scratch"],
                   help="the RECAP policy of iteration 1: fine-tuned from the imitation (SFT) policy with the indicator, "
                        "beside a control fine-tuned the same without it (imitation), or trained from scratch for "
                        "--steps (scratch: the indicator is read on some seeds only, see README)")
    p.add_argument("--recap-steps", type=at_least(1), default=6000,
                   help="--recap-start imitation: the fine-tuning steps of RECAP and of its control")
    p.add_argument("--recap-lr", type=above(0), default=2e-3,
                   help="--recap-start imitation: their peak learning rate, no warm-up (twice the imitation run's "
                        "peak: at 1e-3 a fine-tune from an SFT policy that ignores its prompt may never read the "
                        "indicator, at 3e-4 RECAP reads it far less; see README)")
    p.add_argument("--condition-dropout", type=at_least(0.0, float), default=0.1,
                   help="share of RECAP's training samples without the indicator (train.py's flag; the paper's 0.3 "
                        "is read far less in a 6000-step fine-tune of the tiny policy, see README)")
    p.add_argument("--value-steps", type=at_least(1), default=2500)
    p.add_argument("--label-sigma", type=at_least(0.0, float), default=0.05,
                   help="the value function's HL-Gauss target spread (0: the paper's one-hot bin; see README)")
    p.add_argument("--value-time", type=int, default=1, choices=(0, 1),
                   help="the value function sees each frame's time step (0: pi*0.6's inputs, whose value cannot tell "
                        "a failure near the time limit from one far from it; see README)")
    p.add_argument("--rollouts", type=at_least(0), default=1000, help="iteration 2: the RECAP policy's own episodes")
    p.add_argument("--finetune-steps", type=at_least(1), default=4000, help="iteration 2: policy fine-tuning steps")
    p.add_argument("--finetune-lr", type=above(0), default=3e-4, help="iteration 2: peak learning rate (no warm-up)")
    p.add_argument("--eval-episodes", type=at_least(1), default=300)
    p.add_argument("--cfg-beta", type=float, default=2.0, help="classifier-free guidance weight of the CFG row")
    p.add_argument("--n-steps", type=at_least(1), default=10, help="N of the N-step advantage")
    p.add_argument("--cross-fit", type=at_least(1), default=1,
                   help="K value functions, each held out from a K-th of the episodes, which it then values "
                        "(1: one, in-sample; 2 measured no better on this task, see README)")
    p.add_argument("--seed", type=int, default=0)


def markdown_table(rows):
    """{policy: closed_loop result} -> the table's lines (Markdown)."""
    return ["| policy | success | 95% CI | mean length |", "|---|---|---|---|"] + [
        f"| {name} | {x['successes']}/{x['episodes']} = {x['success_rate']:.1%} | "
        f"{x['ci95'][0]:.1%}-{x['ci95'][1]:.1%} | {x['mean_length']:.1f} |" for name, x in rows.items()]


def first_iteration(out, demos, imitation, args, rows):
    """The RECAP policy of iteration 1 and its control, the table's imitation row(s).
    --recap-start imitation (the default): both fine-tune the imitation (SFT) policy for
    --recap-steps at --recap-lr on the same data, one with the indicator (RECAP), one without (the
    control: imitation, same data, same steps), as pi*0.6 fine-tunes a task's SFT policy.
    scratch: RECAP trains from scratch for --steps beside the imitation policy."""
    if args.recap_start == "scratch":
        rows["imitation (same data, same steps)"] = closed_loop(imitation, args.eval_episodes)
        return train_policy(out / "recap1", [demos], args, "--steps", args.steps, *conditioned(args))
    rows[f"imitation, {args.steps} steps (where both fine-tunes start)"] = closed_loop(imitation, args.eval_episodes)
    flags = finetune(imitation, args.recap_steps, args.recap_lr)
    control = train_policy(out / "imitation_more", [demos], args, *flags)
    rows["imitation (same data, same steps)"] = closed_loop(control, args.eval_episodes)
    return train_policy(out / "recap1", [demos], args, *flags, *conditioned(args))


def check_demo_args(args):
    """What train.py would refuse only after the hour of training before it."""
    if args.cross_fit < 1:
        raise ValueError(f"--cross-fit {args.cross_fit}: expected K >= 1 value functions")
    if not 0 <= args.condition_dropout < 1:
        raise ValueError(f"--condition-dropout {args.condition_dropout}: expected a share in [0, 1)")


def cmd_demo(args):
    """Mixed-quality demos -> imitation (SFT) -> value -> RECAP vs its control, both fine-tuned
    from it (beta 1, CFG) -> one more iteration on the RECAP policy's own rollouts. Prints the
    table; writes recap.json, recap.md and value.png."""
    check_demo_args(args)
    t_start, out = time.perf_counter(), Path(args.out)
    demos = out / "data"
    if not (demos / "tokenizer.model").exists():
        ok = tasks.record_demos(demos, args.episodes, degraded=args.degraded)
        ds = open_dataset(demos, chunk_size=1)
        data.save_norm_stats(data.compute_norm_stats(ds, progress=False), demos / "norm_stats.json")
        tasks.train_tokenizer(demos / "tokenizer.model", extra=[f"\nAdvantage: {w}" for w in ("positive", "negative")]
                            + [f";\nAdvantage: {w};\nAction: " for w in ("positive", "negative")])
        print(f"demos: {args.episodes} episodes, {ok} successful ({args.degraded:.0%} by a degraded demonstrator)")
    rows, demo_ds = {}, open_dataset(demos, chunk_size=1)
    imitation = train_policy(out / "imitation", [demos], args, "--steps", args.steps)
    # the value function starts from the imitation policy's SigLIP + PaliGemma (pi*0.6 starts from a pretrained VLM)
    K = args.cross_fit
    fold = lambda k: (k, K) if K > 1 else None
    value1 = [train_value([demo_ds], out / f"value1_fold{k}", steps=args.value_steps, seed=args.seed + k,
                          backbone=imitation, label_sigma=args.label_sigma, fold=fold(k),
                          time_input=bool(args.value_time)) for k in range(K)]
    (table,) = compute_advantages(value1, [demo_ds], args.n_steps)
    write_advantages(demos, table)
    plot_values([table], [demo_ds], out / "value.png")
    separation = value_separation([table], [demo_ds])
    print("value function: mean V over successful / failed episodes {:.3f} / {:.3f}; first frames {:.3f} / {:.3f}; "
          "last frames {:.3f} / {:.3f} (AUC {:.2f})".format(*(separation[k][w] for w in ("all", "first", "last")
                                                            for k in ("success", "failure")), separation["last_frame_auc"]))
    recap1 = first_iteration(out, demos, imitation, args, rows)
    rows["RECAP, beta = 1"] = closed_loop(recap1, args.eval_episodes)
    rows[f"RECAP, CFG beta = {args.cfg_beta:g}"] = closed_loop(recap1, args.eval_episodes, args.cfg_beta)
    rollouts = out / "rollouts1"
    r = record_rollouts(Policy(recap1), rollouts, args.rollouts, seed=500_000, progress=False)
    print(f"rollouts of the RECAP policy: {r['successes']}/{r['episodes']} successful")
    diagnosis = diagnose.stages(out, value1, Policy(recap1), args.n_steps, table)
    print(diagnose.describe(diagnosis), flush=True)
    both = [demo_ds, open_dataset(rollouts, chunk_size=1)]
    value2 = [train_value(both, out / f"value2_fold{k}", steps=args.value_steps // 2, seed=args.seed + K + k,
                          init=out / f"value1_fold{k}", tokenizer=demos / "tokenizer.model",
                          norm_stats=demos / "norm_stats.json", label_sigma=args.label_sigma, fold=fold(k),
                          time_input=bool(args.value_time))
              for k in range(K)]
    for path, t in zip([demos, rollouts], compute_advantages(value2, both, args.n_steps)):
        write_advantages(path, t)
    flags = finetune(recap1, args.finetune_steps, args.finetune_lr)
    recap2 = train_policy(out / "recap2", [demos, rollouts], args, *flags, *conditioned(args))
    rows["RECAP, one more iteration (own rollouts), beta = 1"] = closed_loop(recap2, args.eval_episodes)
    lines = markdown_table(rows)
    print("\n".join(lines))
    minutes = (time.perf_counter() - t_start) / 60
    (out / "recap.md").write_text("\n".join(lines) + f"\n\n({minutes:.0f} min)\n")
    (out / "recap.json").write_text(json.dumps(dict(rows=rows, value=separation, diagnosis=diagnosis, args=vars(args),
                                                    minutes=minutes), indent=2))
    print(f"wrote {out / 'recap.md'}, {out / 'recap.json'}, {out / 'value.png'} in {minutes:.1f} min")


def cmd_diagnose(args):
    """A finished demo's stages (diagnose.py), from its value functions of iteration 1 and its
    RECAP policy -> printed and written to diagnosis.json."""
    out = Path(args.out)
    folds = sorted(out.glob("value1_fold*"))
    if not folds or not (out / "recap1" / "final").is_dir() or not (out / "rollouts1").is_dir():
        raise FileNotFoundError(f"{out}: expected a finished demo (value1_fold*/, recap1/final/, rollouts1/)")
    diagnosis = diagnose.stages(out, [load_value(f) for f in folds], Policy(out / "recap1" / "final"), args.n_steps)
    print(diagnose.describe(diagnosis))
    data.write_json(out / "diagnosis.json", diagnosis, indent=2)


def cmd_value(args):
    train_value(open_datasets(args.data), args.out, args.steps, args.batch_size, args.lr, args.seed, args.init,
                args.c_fail, backbone=args.backbone, label_sigma=args.label_sigma,
                fold=tuple(args.fold) if args.fold else None, time_input=args.time_input)


def cmd_advantages(args):
    value_fn = [load_value(v) for v in args.value]
    datasets = open_datasets(args.data)
    for path, ds, table in zip(args.data, datasets, compute_advantages(value_fn, datasets, args.n_steps,
                                                                       args.positive_fraction, args.c_fail)):
        written = write_advantages(path, table)
        share = np.mean([p for e in table["episodes"].values() for p in e["positive"]])
        print(f"wrote {written}: {len(table['episodes'])} episodes, {share:.1%} of frames positive")


def cmd_collect(args):
    r = record_rollouts(Policy(args.checkpoint, device=args.device, cfg_beta=args.cfg_beta), args.out, args.episodes,
                        args.seed, args.n_action_steps)
    print(f"wrote {args.episodes} episodes of {args.checkpoint} to {args.out}: {r['successes']} successful "
          f"(each file's `success` attribute)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("value", help="train a value function on labelled episodes")
    v.add_argument("--data", nargs="+", required=True, help="datasets (HDF5 or LeRobot) with success labels")
    v.add_argument("--out", required=True, help="where the value function goes")
    v.add_argument("--init", default=None, help="a value function to fine-tune")
    v.add_argument("--backbone", default=None, help="a policy checkpoint whose SigLIP + PaliGemma start the value function")
    v.add_argument("--steps", type=at_least(1), default=2000)
    v.add_argument("--batch-size", type=at_least(1), default=32)
    v.add_argument("--lr", type=above(0), default=1e-3)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--fold", type=int, nargs=2, metavar=("k", "K"), default=None,
                   help="cross-fitting: hold out the episodes j with j %% K == k (value them with this one)")
    v.add_argument("--time-input", type=int, default=None, choices=(0, 1),
                   help="the frame's time step in the prompt (default: --init's own, else 0, pi*0.6's inputs); "
                        "for tasks whose failures end at a time limit (README.md)")
    v.add_argument("--label-sigma", type=at_least(0.0, float), default=0.0,
                   help="HL-Gauss targets: spread each return over the bins with this std (0: the paper's one-hot bin)")
    a = sub.add_parser("advantages", help="N-step advantages and indicators -> <dataset>.conditions.json")
    a.add_argument("--value", nargs="+", required=True,
                   help="a value function (value), or K cross-fitted ones (value --fold k K, k = 0..K-1, in order)")
    a.add_argument("--data", nargs="+", required=True)
    a.add_argument("--n-steps", type=at_least(1), default=10, help="N of the N-step advantage")
    a.add_argument("--positive-fraction", type=float, default=0.3, help="share of each task's frames that are positive")
    for p in (v, a):
        p.add_argument("--c-fail", type=at_least(0.0, float), default=1.0, help="failure penalty, in units of the task's longest episode")
    co = sub.add_parser("collect", help="a policy's own episodes on the built-in task, with success labels")
    co.add_argument("--checkpoint", required=True, help="checkpoint directory (policy.Policy)")
    co.add_argument("--episodes", type=at_least(1), default=500)
    co.add_argument("--out", required=True, help="output folder (HDF5 episodes like the demos)")
    co.add_argument("--seed", type=int, default=500_000, help="episode i uses seed + i (demos 0.., eval 10^6..)")
    co.add_argument("--n-action-steps", type=at_least(1), default=5)
    co.add_argument("--cfg-beta", type=float, default=None, help="classifier-free guidance toward the condition")
    co.add_argument("--device", default="cpu")
    d = sub.add_parser("demo", help="the whole experiment on the built-in task, with the table")
    add_demo_args(d)
    dg = sub.add_parser("diagnose", help="a finished demo's stages: value, labels, the policy's reading of the indicator")
    dg.add_argument("--out", default="runs/recap", help="the demo's folder")
    dg.add_argument("--n-steps", type=at_least(1), default=10, help="N of the N-step advantage (the demo's)")
    args = parser.parse_args(argv)
    {"value": cmd_value, "advantages": cmd_advantages, "collect": cmd_collect, "demo": cmd_demo,
     "diagnose": cmd_diagnose}[args.command](args)


if __name__ == "__main__":
    with main_guard():
        main()
