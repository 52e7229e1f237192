"""Depth growth by stacking (G_stack, Du et al. 2024, arXiv 2405.15319): when to grow.

Claim: a shallow model grown by stacking its layers (L -> 2L, new layer j = old layer j mod L)
partway through training reaches the loss of the deep model trained from scratch with fewer FLOPs
(54.6% saved at 7B), and growing too late loses the advantage.

Every arm is a dense byte-level LM on the Shakespeare + Python mixture (configs/lm.py `tiny`:
d=64, 2 heads, sequence 64; d_ff 128), one cosine schedule over T steps, batch 16:
  deep_scratch  4 layers from scratch for T steps;
  shallow       2 layers on the same T-step schedule, trained to the latest switch point
                (S_max = 50% of T); its checkpoints at every switch point start the grown arms;
  stack10/25/50 start from shallow's checkpoint at S = 10% / 25% / 50% of T (same seed), apply
                `stack` (times=2: 2 -> 4 layers, layers 2, 3 copy 0, 1) and train 4 layers to T.
So every arm but shallow sees the same T x batch tokens (the same data order for a seed); the grown
arms spend fewer FLOPs on them (S steps at 2 layers). The x axis is training FLOPs (moegrow.flops
via harness.flops_at, summed over a run's stages).

FLOPs saved (`flops_saved.csv`, one row per grown arm and seed; ℓ(F) = the held-out loss, mean
over domains, of a run's evaluations at training FLOPs F):
  L_star     deep_scratch's final loss (its evaluation at step T);
  F_scratch  the FLOPs at which deep_scratch's evaluations first reach <= L_star (`first_reach`;
             at most its FLOPs at T, which it is whenever its last evaluation is its lowest);
  F_grown    the FLOPs at which the grown run's evaluations first reach <= L_star: linear
             interpolation between the two evaluations around the crossing, nan = never within
             the budget. The grown run's evaluations are shallow's at S (the grown run's starting
             point) and the grown run's own after S;
  saved      1 - F_grown / F_scratch (nan when never).
`flops_saved_summary.md`: mean ± standard error per arm over the seeds that reached L_star, and
how many never did.
"""
from __future__ import annotations

import copy
import math
import os

import ml_collections

from experiments import harness, pod
from experiments.harness import (Arm, Claim, Figure, by_arm, domain_mean, format_mean_se, mean_se_fields, read_evals,
                                 run_dir, size_name, table_head, write_csv, write_summary)
from moegrow.configs import lm

SIZES = {
    # full: T = 480 steps of 16 x 64 bytes; switches at steps 48, 120, 240; evaluation every 24
    # steps (the switch points' common divisor) on 16 x 8 sequences per domain
    "small": dict(d_model=64, num_heads=2, d_ff=128, layers=2, total_steps=480, batch_size=16, warmup=10,
                  lr=1e-2, log_every=8, eval_batches=16, eval_batch_size=8),
    "quick": dict(d_model=32, num_heads=2, d_ff=32, layers=2, total_steps=12, batch_size=8, warmup=2,
                  lr=1e-2, log_every=1, eval_batches=1, eval_batch_size=8),
    # configs/lm.py:pod's width (d=1024, 16 heads, d_ff 4096, bfloat16), dense, 8 -> 16 layers
    # (0.2B -> 0.4B parameters), T = 20k steps of 512 x 2048 tokens on C4 (21B tokens), v5e-64.
    # The paper stacks models of hundreds of millions of parameters after billions of tokens and
    # finds an early growth point best (Du et al. 2024); at the CPU size (d=64, 480 steps) growing
    # at 10% beats 50% at equal tokens but not at equal FLOPs.
    "pod": dict(d_model=1024, num_heads=16, d_ff=4096, layers=8, total_steps=20_000, batch_size=512, warmup=2000,
                lr=3e-4, log_every=100, eval_batches=8, eval_batch_size=64, topology="v5e-64"),
}
FRACTIONS = {"stack10": 0.10, "stack25": 0.25, "stack50": 0.50}  # switch point as a fraction of T
GROWN = tuple(FRACTIONS)
STACK_TIMES = 2
LABELS = {
    "deep_scratch": "4 layers from scratch",
    "shallow": "2 layers (to the last switch point)",
    "stack10": "G_stack 2 -> 4 at 10% of the budget",
    "stack25": "G_stack 2 -> 4 at 25% of the budget",
    "stack50": "G_stack 2 -> 4 at 50% of the budget",
}
ARMS = ("shallow", "deep_scratch") + GROWN


def switch_steps(size: str) -> dict[str, int]:
  """Each grown arm's switch step S = round(fraction x T), at least 1."""
  T = SIZES[size]["total_steps"]
  return {a: max(1, int(round(f * T))) for a, f in FRACTIONS.items()}


def eval_every(size: str) -> int:
  """The evaluation (and shallow's checkpoint) interval: the switch points' greatest common
  divisor, so shallow is evaluated and checkpointed at every switch point."""
  return math.gcd(*switch_steps(size).values())


def base_config(size: str) -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"experiments/stacking: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  # dense, byte vocabulary; tiny: seq 64, both corpora 50/50; pod: seq 2048, C4, its mesh
  c = pod.base_config() if size == "pod" else lm.get_config("tiny")
  c.model.update(d_model=s["d_model"], num_heads=s["num_heads"], d_ff=s["d_ff"], num_layers=s["layers"])
  c.train.update(steps=0, batch_size=s["batch_size"], warmup_steps=s["warmup"], lr=s["lr"],
                 log_every=s["log_every"], eval_every=eval_every(size), eval_batches=s["eval_batches"],
                 eval_batch_size=s["eval_batch_size"], checkpoint_every=10_000, keep_checkpoints=2)
  if size == "quick":  # one device, whatever the process simulates: fewer, smaller programs to compile
    c.mesh.update(data=1, num_devices=1)
  return c


def shallow_config(size: str) -> ml_collections.ConfigDict:
  """2 layers on the T-step schedule (one stage named like the grown arms' first), checkpointed
  at every switch point and keeping all of them up to the last one."""
  c = base_config(size)
  T, every = SIZES[size]["total_steps"], eval_every(size)
  c.stages = (dict(name="shallow", steps=T),)
  c.train.update(checkpoint_every=every, keep_checkpoints=max(switch_steps(size).values()) // every + 1)
  return c


def grown_config(arm: str, size: str) -> ml_collections.ConfigDict:
  """2 layers for S steps, then `stack` (x2) and 4 layers to T (one schedule over T)."""
  if arm not in FRACTIONS:
    raise ValueError(f"experiments/stacking: unknown grown arm {arm!r}; use {sorted(FRACTIONS)}")
  c = base_config(size)
  T, S = SIZES[size]["total_steps"], switch_steps(size)[arm]
  c.stages = (dict(name="shallow", steps=S),
              dict(name="deep", steps=T - S, ops=(dict(op="stack", times=STACK_TIMES),)))
  return c


def scratch_config(size: str) -> ml_collections.ConfigDict:
  """The stacked (4-layer) model from scratch for the whole T steps."""
  c = base_config(size)
  c.model.num_layers = SIZES[size]["layers"] * STACK_TIMES
  c.train.steps = SIZES[size]["total_steps"]
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed)."""
  out = {"shallow": shallow_config(size), "deep_scratch": scratch_config(size)}
  out.update({a: grown_config(a, size) for a in GROWN})
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  s, cfgs, sw = SIZES[size], configs(size), switch_steps(size)
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  arms = [Arm("shallow", make("shallow"), LABELS["shallow"], end_step=max(sw.values())),
          Arm("deep_scratch", make("deep_scratch"), LABELS["deep_scratch"])]
  arms += [Arm(a, make(a), LABELS[a], start_from="shallow", start_step=sw[a]) for a in GROWN]
  claims = [Claim("at equal tokens (fewer FLOPs), G_stack at 10% ends lower than the deep model from scratch",
                  "stack10", "deep_scratch"),
            Claim("growing early beats growing late: G_stack at 10% ends lower than at 50%", "stack10", "stack50")]
  T = s["total_steps"]
  plan = {"size": size, **s, "fractions": FRACTIONS, "switch_steps": sw, "eval_every": eval_every(size),
          "stack_times": STACK_TIMES, "arms": [a.name for a in arms],
          "flops": {a: harness.flops_at(cfgs[a], T) for a in ("deep_scratch",) + GROWN}}
  return Figure("stacking", f"G_stack: when to grow 2 -> 4 layers ({size})", tuple(arms), tuple(claims),
                plan=plan, x_label="training FLOPs", extra_report=flops_saved_report)


# ---------------------------------------------------------------- FLOPs saved

SAVED_COLS = ["arm", "seed", "switch_step", "L_star", "F_scratch", "F_grown", "saved", "final_loss", "final_flops"]


def first_reach(points: list[tuple[float, float]], target: float) -> float:
  """The FLOPs at which a curve [(flops, loss), ...] (sorted by FLOPs) first reaches loss <=
  `target`: the first point if it already does, else linear interpolation between the last point
  above and the first point at or below; nan if no point reaches it."""
  for i, (f, loss) in enumerate(points):
    if loss <= target:
      if i == 0:
        return float(f)
      f0, l0 = points[i - 1]
      return float(f0 + (l0 - target) / (l0 - loss) * (f - f0))
  return math.nan


def curve(fig: Figure, root: str, arm: Arm, seed: int) -> list[tuple[float, float]]:
  """[(training FLOPs, held-out loss mean over domains)] of a run: a grown run starts with its
  source's evaluation at its start step, then its own evaluations after it."""
  config = harness.trained_config(harness.arm_config(fig, arm, seed, ""))
  ev = read_evals(run_dir(root, arm.name, seed))
  if arm.start_from:
    src = read_evals(run_dir(root, arm.start_from, seed))
    ev = {s: e for s, e in ev.items() if s > arm.start_step}
    if arm.start_step in src:
      ev[arm.start_step] = src[arm.start_step]
  return [(harness.flops_at(config, s), domain_mean(ev[s])) for s in sorted(ev)]


def saved_rows(fig: Figure, root: str, seeds) -> list[dict]:
  arms = {a.name: a for a in fig.arms}
  nan = math.nan
  rows = []
  for seed in seeds:
    scratch = curve(fig, root, arms["deep_scratch"], seed)
    if not scratch:
      continue
    L_star = scratch[-1][1]
    F_scratch = first_reach(scratch, L_star)
    for name in GROWN:
      pts = curve(fig, root, arms[name], seed)
      if not pts:
        continue
      F = first_reach(pts, L_star)
      rows.append({"arm": name, "seed": int(seed), "switch_step": arms[name].start_step, "L_star": L_star,
                   "F_scratch": F_scratch, "F_grown": F, "saved": 1.0 - F / F_scratch if F == F else nan,
                   "final_loss": pts[-1][1], "final_flops": pts[-1][0]})
  return rows


def flops_saved_report(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Write flops_saved.csv (per grown run) and flops_saved_summary.md (mean ± SE per arm over the
  seeds that reached L_star, with the count that never did); print the summary."""
  rows = saved_rows(fig, root, seeds)
  write_csv(os.path.join(root, "flops_saved.csv"), rows, SAVED_COLS)
  lines = [f"# {fig.title}: FLOPs to reach the deep-from-scratch model's final loss", "",
           "L* = deep_scratch's final held-out loss (mean over domains); F_scratch = the FLOPs at which "
           "deep_scratch first reaches L*; F_grown = the FLOPs at which the grown run first reaches L* "
           "(linear interpolation between evaluations); saved = 1 - F_grown / F_scratch. Mean ± standard "
           "error over the seeds that reached L* within the token budget; 'never' counts the others.", "",
           *table_head("arm", "switch step", "seeds", "never", "L*", "F_scratch", "F_grown", "saved", "final loss",
                       "final FLOPs")]
  specs = {"L_star": ".4f", "F_scratch": ".3e", "F_grown": ".3e", "saved": ".3f", "final_loss": ".4f",
           "final_flops": ".3e"}
  summary = []
  for name, mine in by_arm(rows).items():
    reached = [r for r in mine if r["F_grown"] == r["F_grown"]]
    e = {"arm": name, "n": len(mine), "never": len(mine) - len(reached), "switch_step": mine[0]["switch_step"],
         **mean_se_fields(mine, ("L_star", "F_scratch", "final_loss", "final_flops")),
         **mean_se_fields(reached, ("F_grown", "saved"))}
    summary.append(e)
    cells = [format_mean_se(e[k], e[k + "_se"], spec) for k, spec in specs.items()]
    lines.append(f"| {name} | {e['switch_step']} | {e['n']} | {e['never']}/{e['n']} | " + " | ".join(cells) + " |")
  write_summary(os.path.join(root, "flops_saved_summary.md"), "\n".join(lines) + "\n")
  return summary
