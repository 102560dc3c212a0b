"""Where a RECAP run wins or loses, stage by stage, on the built-in task's demo.

RECAP is a chain: a value function must tell good frames from bad (on episodes it never saw), the
advantage labels built from it must mark the expert's frames and few others, and the policy must
act on the indicator it was trained with. A run that ends level with imitation lost it at one of
these; each function below measures one link:

    value_separation (recap.py)   V's mean over successful / failed episodes and the last-frame AUC
    label_quality                 purity and recall of the positive frames against the expert's
    indicator_reading             first actions told "positive" against told "negative"

The demo prints each as it goes and keeps them in recap.json ("diagnosis"); `python -m
experiments.recap diagnose --out runs/recap` recomputes them for a finished run.
"""

from pathlib import Path

import h5py
import numpy as np
import torch

import tasks
from experiments.recap.recap import compute_advantages, indicator, value_separation
from readers import HDF5Dataset, open_dataset


def behaviours(ds):
    """Each episode's demonstrator as record_demos (and the demo's rollouts) wrote it: "expert",
    "wrong", "wander" or "rollout"."""
    if not isinstance(ds, HDF5Dataset):
        raise TypeError(f"{type(ds).__name__}: the demonstrators are known for the demo's HDF5 episodes only")
    found = []
    for path in ds.files:
        with h5py.File(path, "r") as f:
            if "behaviour" not in f.attrs:
                raise KeyError(f"{path}: no `behaviour` attribute (tasks.record_demos writes it)")
            found.append(str(f.attrs["behaviour"]))
    return found


def label_quality(table, ds):
    """The advantage labels against who made each frame -> purity (share of the positive frames
    that are the expert's), recall (share of the expert's frames marked positive) and the
    positive share of each demonstrator's frames. A pure, complete set is what RECAP needs: the
    indicator then says "act as the expert"."""
    by_who = {}
    for key, who in zip(ds.episode_keys(), behaviours(ds)):
        by_who.setdefault(who, []).extend(table["episodes"][str(key)]["positive"])
    positives = sum(sum(v) for v in by_who.values())
    expert = by_who.get("expert", [])
    return {"purity": sum(expert) / positives if positives else float("nan"),
            "recall": float(np.mean(expert)) if expert else float("nan"),
            "positive_share": {who: float(np.mean(v)) for who, v in sorted(by_who.items())}}


def first_action_targets(policy, scenes, samples, seed):
    """Which object each first action of `samples` chunks on `scenes` unseen reach scenes lands on
    -> shares of "named" (the prompt's: where the expert goes), "other" and "none" (farther than an
    object's radius from all)."""
    counts = dict(named=0, other=0, none=0)
    for s in range(seed, seed + scenes):
        env = tasks.ReachEnv()
        obs = env.reset(s)
        for action in np.asarray(policy.infer_batch([obs] * samples))[:, 0]:
            dist = np.linalg.norm(env.positions - action, axis=-1)  # (objects,)
            k = int(np.argmin(dist))
            counts["none" if dist[k] > tasks.OBJECT_RADIUS else "named" if k == env.target else "other"] += 1
    return {k: v / (scenes * samples) for k, v in counts.items()}


def indicator_reading(policy, scenes=100, samples=8, seed=tasks.EVAL_SEED):
    """Does the policy act on its indicator? The same first observations told "Advantage:
    positive" and told "negative" (the same noise) -> first_action_targets of each. A policy that
    reads it heads for the named object far more often when told positive."""
    served = policy.condition
    if not served:
        raise ValueError(f"{policy.path}: not trained with a prompt condition (policy.json has no 'condition')")
    shares = {}
    try:
        for positive in (True, False):
            policy.condition = {**served, "text": indicator(positive)}  # what Policy puts in every prompt
            torch.manual_seed(seed)
            shares["positive" if positive else "negative"] = first_action_targets(policy, scenes, samples, seed)
    finally:
        policy.condition = served
    return shares


def describe_value(sep):
    return (f"mean V successful / failed {sep['success']['all']:.3f} / {sep['failure']['all']:.3f}, "
            f"last frames AUC {sep['last_frame_auc']:.2f}")


def describe_labels(quality):
    shares = ", ".join(f"{who} {x:.0%}" for who, x in quality["positive_share"].items())
    return f"purity {quality['purity']:.0%}, recall {quality['recall']:.0%} (positive frames by demonstrator: {shares})"


def describe_reading(shares):
    pos, neg = shares["positive"], shares["negative"]
    return (f"first actions on the named object told positive {pos['named']:.0%}, told negative {neg['named']:.0%} "
            f"(on another object {pos['other']:.0%} / {neg['other']:.0%})")


# each stage's name, as recap.json and diagnosis.json key it, and how it is said in one line
STAGES = (("value on the demos", describe_value),
          ("value on the policy's own rollouts (held out)", describe_value),
          ("advantage labels on the demos", describe_labels),
          ("the RECAP policy's reading of the indicator", describe_reading))


def stages(out, value_fns, policy, n_steps=10, demo_table=None):
    """Every link of a demo run in `out` (its data/, rollouts1/ and the RECAP policy of iteration
    1): V on the demos it trained on and on the policy's own rollouts (other scenes, never seen by
    it), the demos' labels against their demonstrators, and the policy's reading of the indicator.
    demo_table: the demos' advantages when already computed with value_fns."""
    out = Path(out)
    demos, rollouts = (open_dataset(out / d, chunk_size=1) for d in ("data", "rollouts1"))
    if demo_table is None:
        (demo_table,) = compute_advantages(value_fns, [demos], n_steps)
    (rollout_table,) = compute_advantages(value_fns, [rollouts], n_steps)
    found = (value_separation([demo_table], [demos]), value_separation([rollout_table], [rollouts]),
             label_quality(demo_table, demos), indicator_reading(policy))
    return {name: x for (name, _), x in zip(STAGES, found)}


def describe(diagnosis):
    """The stages as lines, as the demo prints them."""
    return "\n".join(f"{name}: {say(diagnosis[name])}" for name, say in STAGES)
