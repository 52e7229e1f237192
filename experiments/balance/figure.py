"""Auxiliary-loss-free load balancing against the auxiliary loss, at E=16 and E=32 experts.

Wang et al. 2024 (arXiv 2408.15664, table 1 and fig. 3) report that a per-expert selection bias
moved by b_e += u * sign(mean load - load_e) balances the experts better than an auxiliary loss
(global MaxVio 0.04 against 0.72 at 1B parameters) and ends at a lower validation loss (2.93
against 2.96 perplexity-log at 1B), because it adds no gradient that competes with the LM loss.

Model: configs/lm.py:tiny with an MoE MLP in every other layer (layer 1 of 2), top-2 of E experts,
sigmoid scores renormalised over the chosen two (DeepSeek-V3 / the paper's gating), d=64, d_ff 256
per expert; the two corpora 50/50; T steps of 16 x 64 tokens, one warm-up + cosine schedule.
Arms (same data order and initialisation per seed):
  aux<E>   the Switch load-balancing loss, weight 0.01 (moegrow's default), no selection bias;
  free<E>  loss-free balancing (balance_rate u = 1e-3, the paper's), no auxiliary loss;
  fast<E>  loss-free balancing with u = 1e-2: at this scale (1,024 tokens a step, learning rate
           3e-3) the router's logits move faster than the paper's u can follow (a pilot: u = 1e-3
           left the load as uneven as the auxiliary loss did).
Load: each logged step's fraction of the layer's token-expert choices per expert; max / mean load
(the paper's MaxVio + 1) per step, its mean over the second half of training and its last value.
`--quick`: 6 steps, E = 16 only (tests).
"""
from __future__ import annotations

import copy
import os

import ml_collections
import numpy as np

from experiments import plots, pod
from experiments.harness import (Arm, Claim, Figure, by_arm, format_mean_se, mean_se, mean_se_curve, metrics_rows,
                                 run_dir, size_name, table_head, write_csv, write_summary)
from moegrow.configs import lm

TOP_K, LAYER = 2, "1"
RATE, FAST_RATE, AUX_WEIGHT = 1e-3, 1e-2, 0.01
SIZES = {
    "small": dict(steps=1000, warmup_steps=10, eval_every=250, log_every=10, eval_batches=64, experts=(16, 32)),
    "quick": dict(steps=6, warmup_steps=2, eval_every=3, log_every=1, eval_batches=1, experts=(16,)),
    # configs/lm.py:pod's model with E=16 / 32 sigmoid top-2 experts in every other layer, 20k steps
    # of 512 x 2048 tokens on C4, v5e-64 (expert axis 8: two or four experts per chip). The paper's
    # runs: 1B-3B parameters, tens of thousands of steps (Wang et al. 2024, table 1); at 1000 CPU
    # steps the paper's u = 1e-3 spends most of the run undoing an early collapse.
    "pod": dict(steps=20_000, warmup_steps=2000, eval_every=2000, log_every=100, eval_batches=8, experts=(16, 32),
                batch_size=512, eval_batch_size=64, topology="v5e-64"),
}


def base_config(size: str, experts: int, rate: float | None) -> ml_collections.ConfigDict:
  """The E-expert model; `rate`: loss-free balancing at that rate (None: the auxiliary loss)."""
  if size not in SIZES:
    raise ValueError(f"experiments/balance: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  c = pod.base_config() if size == "pod" else lm.get_config("tiny")
  c.model.update(moe_layers="every_other", num_experts=experts, top_k=TOP_K, gating="sigmoid_topk")
  if rate is not None:
    c.model.update(balance="loss_free", balance_rate=rate, aux_loss_weight=0.0)
  else:
    c.model.update(balance="aux_loss", aux_loss_weight=AUX_WEIGHT)
  if size != "pod":
    c.data.mixture = ml_collections.ConfigDict({"shakespeare_plays": 0.5, "python_stdlib": 0.5})
  c.train.update(steps=s["steps"], batch_size=s.get("batch_size", 16), warmup_steps=s["warmup_steps"],
                 log_every=s["log_every"], eval_every=s["eval_every"], eval_batches=s["eval_batches"],
                 eval_batch_size=s.get("eval_batch_size", 16),
                 checkpoint_every=s["steps"], keep_checkpoints=2)
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed)."""
  out = {}
  for e in SIZES[size]["experts"]:
    out[f"aux{e}"] = base_config(size, e, None)
    out[f"free{e}"] = base_config(size, e, RATE)
    out[f"fast{e}"] = base_config(size, e, FAST_RATE)
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  s, cfgs = SIZES[size], configs(size)
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  arms, claims = [], []
  for e in s["experts"]:
    arms += [Arm(f"aux{e}", make(f"aux{e}"), f"E={e}, auxiliary loss {AUX_WEIGHT}"),
             Arm(f"free{e}", make(f"free{e}"), f"E={e}, loss-free (u={RATE})"),
             Arm(f"fast{e}", make(f"fast{e}"), f"E={e}, loss-free (u={FAST_RATE})")]
    claims += [Claim(f"loss-free balancing (u={RATE}) ends at a lower loss than the auxiliary loss (E={e})",
                     f"free{e}", f"aux{e}"),
               Claim(f"loss-free balancing (u={FAST_RATE}) ends at a lower loss than the auxiliary loss (E={e})",
                     f"fast{e}", f"aux{e}")]
  plan = {"size": size, "steps": s["steps"], "experts": list(s["experts"]), "top_k": TOP_K, "rates": [RATE, FAST_RATE],
          "aux_weight": AUX_WEIGHT, "eval_batches": s["eval_batches"], "log_every": s["log_every"]}
  return Figure("balance", f"Load balancing: auxiliary loss vs loss-free ({size})", tuple(arms), tuple(claims),
                plan=plan, extra_report=load_report)


# ---------------------------------------------------------------- loads

def load_curve(workdir: str) -> list[tuple[int, float]]:
  """[(step, max / mean expert load of the MoE layer)] over a run's logged steps."""
  out = []
  for row in metrics_rows(workdir):
    loads = [v for k, v in row.items() if k.startswith(f"moe/{LAYER}/load/")]
    if loads and "loss" in row:
      out.append((int(row["step"]), float(np.max(loads) / np.mean(loads))))
  return sorted(dict(out).items())


def load_rows(fig: Figure, root: str, seeds) -> list[dict]:
  """Per arm and seed: max/mean load averaged over the second half of training, and at the end."""
  t = fig.plan["steps"]
  rows = []
  for arm in fig.arms:
    for seed in seeds:
      curve = load_curve(run_dir(root, arm.name, seed))
      if not curve or curve[-1][0] != t:
        continue
      late = [v for s, v in curve if s > t // 2]
      rows.append({"arm": arm.name, "seed": int(seed), "max_over_mean_late": float(np.mean(late)),
                   "max_over_mean_final": curve[-1][1]})
  return rows


def load_report(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Write load.csv (per arm and seed), load_summary.md (mean ± SE, and loss-free minus aux paired
  by seed) and load.png (max/mean load over training, mean ± SE bands); print the summary."""
  rows = load_rows(fig, root, seeds)
  write_csv(os.path.join(root, "load.csv"), rows, ["arm", "seed", "max_over_mean_late", "max_over_mean_final"])
  summary = []
  for arm, mine in by_arm(rows).items():
    e = {"arm": arm, "n": len(mine)}
    for k in ("max_over_mean_late", "max_over_mean_final"):
      e[k], e[k + "_se"] = mean_se([r[k] for r in mine])
    summary.append(e)
  t = fig.plan["steps"]
  lines = [f"# {fig.title}: expert load", "",
           f"max / mean expert load of the MoE layer (1 = perfectly balanced; the paper's MaxVio + 1), mean ± "
           f"standard error over seeds: averaged over the logged steps after step {t // 2}, and at step {t}.", "",
           *table_head("arm", "seeds", f"max/mean load, steps {t // 2}-{t}", f"max/mean load at {t}")]
  for e in summary:
    lines.append(f"| {e['arm']} | {e['n']} | {format_mean_se(e['max_over_mean_late'], e['max_over_mean_late_se'], '.3f')}"
                 f" | {format_mean_se(e['max_over_mean_final'], e['max_over_mean_final_se'], '.3f')} |")
  per = {(r["arm"], r["seed"]): r for r in rows}
  lines += ["", "Loss-free minus auxiliary loss, paired by seed (< 0: loss-free is better balanced):", "",
            *table_head("experts", "loss-free arm", "seeds", "difference in max/mean load (late)",
                        "difference at the end")]
  for e in fig.plan["experts"]:
    for arm in (f"free{e}", f"fast{e}"):
      pairs = [(per[(arm, s)], per[(f"aux{e}", s)]) for s in seeds if (arm, s) in per and (f"aux{e}", s) in per]
      cells = []
      for k in ("max_over_mean_late", "max_over_mean_final"):
        m, se = mean_se([a[k] - b[k] for a, b in pairs])
        sep = "separated" if se == se and abs(m) > 2 * se else "not separated"
        cells.append("n/a" if m != m else (f"{m:+.3f} ({sep})" if se != se else f"{m:+.3f} ± {se:.3f} ({sep})"))
      lines.append(f"| {e} | {arm} | {len(pairs)} | " + " | ".join(cells) + " |")
  write_summary(os.path.join(root, "load_summary.md"), "\n".join(lines) + "\n")
  if rows:
    plot_load(os.path.join(root, "load.png"), fig, root, seeds)
  return summary


def plot_load(path: str, fig: Figure, root: str, seeds) -> list[plots.Drawn]:
  """Max / mean expert load against the step, mean ± SE over seeds, one style per arm (log scale).
  Returns what it drew."""
  plt = plots.pyplot()
  f, ax = plt.subplots(figsize=(7, 4.3))
  drawn = []
  for i, arm in enumerate(fig.arms):
    curves = [dict(load_curve(run_dir(root, arm.name, s))) for s in seeds]
    curves = [c for c in curves if c]
    if not curves:
      continue
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    m, se = mean_se_curve([[c[s] for c in curves] for s in steps])
    drawn.append(plots.band(ax, np.array(steps), m, se, label=f"{arm.label} (n={len(curves)})", panel="load",
                            series=arm.name, lw=1.4, ms=3, markevery=max(1, len(steps) // 12),
                            **plots.arm_style(i)))
  ax.axhline(1.0, color="0.3", lw=0.8)
  ax.set_yscale("log")
  plots.style_axes(ax, "training step", "max / mean expert load", legend_size=8)
  plots.save(f, path, f"{fig.title}: mean ± SE over seeds")
  return drawn
