"""The forgetting-vs-learning frontier of continual pre-training on the English -> Python shift.

Stage 0 (shared, `base`): a small MoE (d=128, 2 layers, layer 1 E=2 top-1; d=64 in --quick)
trained on Shakespeare only for N steps. Stage 1: each arm continues base's checkpoint N for M steps on Python:
  plain          fine-tune on Python;
  replay_5/25    with 5%, 25% of the rows replayed from Shakespeare;
  ewc_lo/mid/hi  EWC (Fisher of base on Shakespeare) at three lambdas;
  grow_freeze    add_experts 2 -> 4 (copy_noise) + freeze the old experts and router columns
                 (Lifelong-MoE, Chen et al. 2023);
  grow_freeze_distill  the same + distillation from base (alpha 0.5, T 2) on every token;
  grow_freeze_replay5  the same as grow_freeze + 5% replay;
  lora_4/16/64   LoRA adapters of rank 4, 16, 64 (alpha = 2 r, Biderman et al. 2024) on attention
                 q/k/v/o and the dense and expert MLP weights, base frozen; `plain` is the full
                 fine-tuning they are compared with (same steps, schedule and learning rate);
  joint          the reference: the same model trained on both domains from the start, N + M steps.
Every arm has the same schedule (one cosine over N + M steps, warm-up 10) and the same data seed
per seed. Learning = the final Python validation loss; forgetting = the final Shakespeare loss
minus base's at step N (same seed); routing drift (grown arms) = the fraction of Shakespeare
tokens whose top-1 is a new expert. `--quick`: a few steps and a subset of arms (tests).
"""
from __future__ import annotations

import copy
import json
import math
import os

import ml_collections
import numpy as np

from experiments import plots, pod
from experiments.harness import (Arm, Claim, Figure, by_arm, format_mean_se, mean_se_fields, read_csv_rows,
                                 read_evals, run_dir, size_name, table_head, write_csv, write_summary)
from moegrow.configs import lm
from moegrow.data import domain_name

OLD, NEW = "shakespeare_plays", "python_stdlib"
GROW = (dict(op="add_experts", num_experts=4, mode="copy_noise", noise_std=0.01),)
EWC = {"ewc_lo": 100.0, "ewc_mid": 3000.0, "ewc_hi": 100000.0}
LORA_RANKS = (4, 16, 64)
SIZES = {
    "small": dict(base_steps=200, new_steps=100, eval_batches=64, log_every=20, eval_every=50),
    "quick": dict(base_steps=4, new_steps=3, eval_batches=1, log_every=1, eval_every=3),
    # configs/lm.py:pod's model (d=1024, 16 layers, bfloat16, sequence 2048, batch 512) with E=2
    # top-1 experts in every other layer (2 -> 4 in the grown arms), base 10k steps on C4 (10B
    # tokens), every arm 5k more on code; v5e-64, expert axis 2. Why: replay's and EWC's
    # trade-offs are reported for models pre-trained for billions of tokens (Ibrahim et al. 2024:
    # 405M and 10B parameters, 300B tokens), whose forgetting is not the CPU size's 200-step base
    # relearning its first domain; LoRA's "learns less, forgets less" is measured on 7B models
    # (Biderman et al. 2024), where rank 16 is a small fraction of the width.
    "pod": dict(base_steps=10_000, new_steps=5_000, eval_batches=8, log_every=100, eval_every=1000,
                warmup_steps=1000, ewc_batch_size=64, topology="v5e-64", mesh=dict(data=-1, fsdp=8, expert=2)),
}
QUICK_ARMS = ("plain", "ewc_hi", "grow_freeze_distill", "lora_4")  # every code path but replay (unit-tested)


def domains(size: str) -> tuple[str, str]:
  """(old, new): the figure's first and second domain at `size`: Shakespeare then Python, or C4
  then code at pod (the arms keep their names; columns named 'python' / 'shakespeare' are the new
  and the old domain)."""
  return pod.domains(size, (OLD, NEW))


def stage1(name: str, size: str = "small") -> dict:
  """Stage 1 of arm `name` (its options on top of the new domain's mixture)."""
  spec = dict(name="python", mixture={domains(size)[1]: 1.0})
  if name.startswith("replay_"):
    spec["replay"] = dict(fraction=int(name.split("_")[1]) / 100)
  elif name in EWC:
    spec["ewc"] = dict(weight=EWC[name], batches=4, batch_size=SIZES[size].get("ewc_batch_size", 16))
  elif name.startswith("grow_freeze"):
    spec.update(ops=GROW, freeze_old_experts=True)
    if name.endswith("distill"):
      spec["distill"] = dict(weight=0.5, temperature=2.0)
    if name.endswith("replay5"):
      spec["replay"] = dict(fraction=0.05)
  elif name.startswith("lora_"):
    rank = int(name.split("_")[1])
    spec["lora"] = dict(rank=rank, lora_alpha=2.0 * rank)
  elif name != "plain":
    raise ValueError(f"experiments/continual: unknown arm {name!r}")
  return spec


def base_config(size: str) -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"experiments/continual: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  if size == "pod":
    c = pod.base_config()
    c.model.update(moe_layers="every_other", num_experts=2, top_k=1)
    c.mesh.update(s["mesh"])
    c.train.update(steps=0, warmup_steps=s["warmup_steps"], log_every=s["log_every"], eval_every=s["eval_every"],
                   eval_batches=s["eval_batches"], checkpoint_every=s["new_steps"], keep_checkpoints=2)
    return c
  c = lm.get_config("tiny")
  c.model.update(moe_layers="every_other", num_experts=2, top_k=1)
  if size != "quick":
    c.model.update(d_model=128, num_heads=4, d_ff=512)
  c.train.update(steps=0, batch_size=16, warmup_steps=2 if size == "quick" else 10, log_every=s["log_every"],
                 eval_every=s["eval_every"], eval_batches=s["eval_batches"], eval_batch_size=16,
                 checkpoint_every=10_000, keep_checkpoints=2)
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed)."""
  s = SIZES[size]
  names = ["plain", "replay_5", "replay_25", *EWC, "grow_freeze", "grow_freeze_distill",
           "grow_freeze_replay5", *(f"lora_{r}" for r in LORA_RANKS)]
  old, new = domains(size)
  out = {}
  for name in ["base"] + names:
    c = base_config(size)
    c.stages = (dict(name="shakespeare", steps=s["base_steps"], mixture={old: 1.0}),
                stage1("plain" if name == "base" else name, size))
    out[name] = c
  joint = base_config(size)
  joint.data.mixture = ml_collections.ConfigDict({old: 0.5, new: 0.5})
  joint.train.steps = s["base_steps"] + s["new_steps"]
  out["joint"] = joint
  for name, c in out.items():
    if name != "joint":
      c.stages = (c.stages[0], dict(c.stages[1], steps=s["new_steps"]))
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  quick = size == "quick"
  s, cfgs = SIZES[size], configs(size)
  n = s["base_steps"]
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  names = [k for k in cfgs if k not in ("base",) and (not quick or k in QUICK_ARMS)]
  arms = [Arm("base", make("base"), end_step=n, plotted=False)]
  for name in names:
    if name == "joint":
      arms.append(Arm(name, make(name), "joint training (reference)"))
    else:
      arms.append(Arm(name, make(name), name.replace("_", " "), start_from="base", start_step=n))
  old, new = (domain_name(d) for d in domains(size))  # the metrics' names: c4/en -> c4
  claims = [Claim("EWC (high lambda) forgets less than plain fine-tuning", "ewc_hi", "plain", old),
            Claim("plain fine-tuning learns Python better than EWC (high lambda)", "plain", "ewc_hi", new),
            Claim("new experts + freezing + distillation forget less than plain", "grow_freeze_distill", "plain", old),
            Claim("LoRA (r=4) forgets less than full fine-tuning", "lora_4", "plain", old)]
  if not quick:
    claims += [Claim("25% replay forgets less than plain fine-tuning", "replay_25", "plain", old),
               Claim("5% replay forgets less than plain fine-tuning", "replay_5", "plain", old),
               Claim("EWC: high lambda forgets less than low", "ewc_hi", "ewc_lo", old),
               Claim("EWC: low lambda learns Python better than high", "ewc_lo", "ewc_hi", new),
               Claim("new experts + freezing forget less than plain", "grow_freeze", "plain", old),
               Claim("distillation reduces the remaining forgetting", "grow_freeze_distill", "grow_freeze", old),
               # Biderman et al. 2024: LoRA learns less and forgets less, more so at lower rank
               Claim("full fine-tuning learns Python better than LoRA (r=64)", "plain", "lora_64", new),
               Claim("full fine-tuning learns Python better than LoRA (r=16)", "plain", "lora_16", new),
               Claim("LoRA r=64 learns Python better than r=4", "lora_64", "lora_4", new),
               Claim("LoRA (r=16) forgets less than full fine-tuning", "lora_16", "plain", old),
               Claim("LoRA (r=64) forgets less than full fine-tuning", "lora_64", "plain", old),
               Claim("LoRA r=4 forgets less than r=64", "lora_4", "lora_64", old)]
  plan = {"size": size, "base_steps": n, "new_steps": s["new_steps"], "eval_batches": s["eval_batches"],
          "arms": names, "ewc": EWC, "lora_ranks": LORA_RANKS}
  return Figure("continual", f"Continual pre-training, Shakespeare -> Python ({size})", tuple(arms), tuple(claims),
                plan=plan, x_label="training FLOPs", extra_report=frontier,
                replot=lambda fig, root: plot_frontier(os.path.join(root, "frontier.png"), fig, frontier_summary(
                    read_csv_rows(os.path.join(root, "frontier.csv")))))


# ---------------------------------------------------------------- the frontier

def _drift(workdir: str, old: str) -> float:
  path = os.path.join(workdir, "continual", "stage1.json")
  if not os.path.exists(path):
    return math.nan
  with open(path) as f:
    return float(json.load(f).get("scalars", {}).get(f"drift/{old}", math.nan))


def frontier_rows(fig: Figure, root: str, seeds) -> list[dict]:
  """Per (arm, seed): Python loss, Shakespeare forgetting (vs base at step N), routing drift."""
  n, (old, new) = fig.plan["base_steps"], (domain_name(d) for d in domains(fig.plan["size"]))
  rows = []
  for arm in fig.arms:
    if not arm.plotted:
      continue
    for seed in seeds:
      base = read_evals(run_dir(root, "base", seed)).get(n, {})
      ev = read_evals(run_dir(root, arm.name, seed))
      if not ev or old not in base:
        continue
      last = ev[max(ev)]
      rows.append({"arm": arm.name, "seed": int(seed), "python_loss": last[new],
                   "shakespeare_loss": last[old], "forgetting": last[old] - base[old],
                   "drift": _drift(run_dir(root, arm.name, seed), old)})
  return rows


def frontier_summary(rows: list[dict]) -> list[dict]:
  """Per arm (in order): n, and mean and SE of the Python loss, the forgetting and the drift."""
  return [{"arm": arm, "n": len(mine), **mean_se_fields(mine, ("python_loss", "forgetting", "drift"))}
          for arm, mine in by_arm(rows).items()]


def frontier(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Write frontier.csv (per run), frontier_summary.md (mean ± SE per arm) and frontier.png."""
  rows = frontier_rows(fig, root, seeds)
  write_csv(os.path.join(root, "frontier.csv"), rows,
            ["arm", "seed", "python_loss", "shakespeare_loss", "forgetting", "drift"])
  summary = frontier_summary(rows)
  lines = [f"# {fig.title}: the frontier", "",
           "Mean ± standard error over seeds. Forgetting = Shakespeare loss at the end minus base's at "
           f"step {fig.plan['base_steps']}; drift = fraction of Shakespeare tokens routed to a new expert.", "",
           *table_head("arm", "seeds", "Python loss", "Shakespeare forgetting", "routing drift")]
  for e in summary:
    cells = [format_mean_se(e[k], e[k + "_se"]) for k in ("python_loss", "forgetting", "drift")]
    lines.append(f"| {e['arm']} | {e['n']} | " + " | ".join(cells) + " |")
  write_summary(os.path.join(root, "frontier_summary.md"), "\n".join(lines) + "\n")
  plot_frontier(os.path.join(root, "frontier.png"), fig, summary)
  return summary


def plot_frontier(path: str, fig: Figure, summary: list[dict]) -> list[plots.Drawn]:
  """Left: each arm's mean Python loss against its mean forgetting, ± SE both ways, one style per
  arm (told apart by the legend, not by labels on the points, which overlap). Right: routing drift.
  Returns what it drew (x: the Python loss, mean: the forgetting; and the drift)."""
  plt = plots.pyplot()
  f, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [3, 2]})
  drawn = []
  for i, e in enumerate(summary):
    st = plots.arm_style(i)
    ax.errorbar(e["python_loss"], e["forgetting"], xerr=np.nan_to_num(e["python_loss_se"]),
                yerr=np.nan_to_num(e["forgetting_se"]), color=st["color"], marker=st["marker"], ls="none", ms=6,
                capsize=3, label=f"{e['arm']} (n={e['n']})")
    drawn.append(plots.Drawn("frontier", e["arm"], [e["python_loss"]], [e["forgetting"]],
                             [float(np.nan_to_num(e["forgetting_se"]))]))
    drawn.append(plots.Drawn("frontier, Python loss", e["arm"], [0.0], [e["python_loss"]],
                             [float(np.nan_to_num(e["python_loss_se"]))]))
  ax.axhline(0, color="k", lw=0.6)
  plots.style_axes(ax, "Python validation loss (learning; lower is better)",
                   "Shakespeare loss increase (forgetting; lower is better)")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  names = [e["arm"] for e in summary]
  for i, e in enumerate(summary):
    if e["drift"] != e["drift"]:
      bx.text(0.005, i, "n/a (no new experts)", va="center", fontsize=7, color="0.4")
      continue
    st = plots.arm_style(i)
    bx.barh(i, e["drift"], xerr=np.nan_to_num(e["drift_se"]), color=st["color"], capsize=3)
    drawn.append(plots.Drawn("drift", e["arm"], [float(i)], [e["drift"]], [float(np.nan_to_num(e["drift_se"]))]))
  bx.set_yticks(range(len(names)), names, fontsize=7)
  bx.set_xlabel("routing drift: Shakespeare tokens to new experts")
  bx.grid(alpha=0.3, axis="x")
  plots.save(f, path, f"{fig.title}: mean ± standard error over seeds")
  return drawn
