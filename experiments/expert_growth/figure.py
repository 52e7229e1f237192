"""Growing the expert table mid-run: 2 -> 4 experts at 25%, 50% or 75% of a fixed token budget.

Expert Upcycling (arXiv 2604.19835) reports that growing the expert table partway through
training closes 93-95% of the gap between the model that keeps the small table throughout and
the one that has the large table from the start, at matched tokens, and more the earlier it grows.

Model: configs/lm.py:tiny with an MoE MLP in every other layer (2 layers: layer 1 is MoE), E=2
top-2 experts (topk_softmax gating: the router learns from the LM loss; 2 -> 4 keeps the active
compute, only the expert table grows); d=64, 2 heads, d_ff 256; T = 1000 steps (8 in --quick).
Data: the mixture of both embedded corpora (Shakespeare, Python stdlib, 50/50). Every arm trains T steps of
the same batches (same seed) under the same schedule (warm-up, one cosine over T):
  e2       2 experts throughout;
  e4       4 experts from the start (the target);
  grow25   2 experts for T/4 steps, then add_experts 2 -> 4 (copy_noise: new expert j is a copy of
  grow50   old expert j mod 2, weights and router column plus gaussian noise of 0.01 x their std;
  grow75   copies carry their source's Adam moments) at T/4, T/2, 3T/4; trained on to T.
The first S steps of a grown arm are exactly e2's first S steps (same config, schedule and data),
so a grown arm starts from a copy of e2's checkpoint at S (harness `start_from`) and trains only
its grown stage; its growth certificate is `<run>/growth/<S>.json`.

Not run: `grow50_loaded` (duplicating the most-loaded experts). add_experts(source='most_loaded')
copies old experts in decreasing load order, cycling (new expert j copies order[j mod E]), so
2 -> 4 copies each old expert exactly once whatever the loads: the same grown model as
round_robin up to the order of the two new experts and which noise draw each gets (and with top-2
of 2 every token reaches both experts, so the measured loads are exactly [0.5, 0.5] and the
sources are round_robin's to the bit). It cannot tell load-based from uniform duplication here.

Gap closure per grown arm and seed (paired): (L_e2 - L_grown) / (L_e2 - L_e4), L the final
validation loss, mean over domains (`gap_closure.csv`, `gap_closure_summary.md`, `gap_closure.png`).
`--quick`: 8 steps, switches at 2/4/6, one evaluation batch (tests).
"""
from __future__ import annotations

import copy
import os

import ml_collections
import numpy as np

from experiments import plots, pod
from experiments.harness import (Arm, Claim, Figure, by_arm, check_staged_arms, domain_mean, format_mean_se, mean_se,
                                 mean_se_fields, read_csv_rows, read_evals, run_dir, size_name, table_head, write_csv,
                                 write_summary)
from moegrow.configs import lm

SMALL, BIG = "e2", "e4"
E_SMALL, E_BIG, TOP_K = 2, 4, 2
NOISE_STD = 0.01
SWITCHES = {"grow25": 0.25, "grow50": 0.50, "grow75": 0.75}  # grown arm -> fraction of T at which it grows
SIZES = {
    # T steps of 16 x 64 tokens; eval_every and checkpoint_every divide every switch step.
    # configs/lm.py:tiny's width (d=64): at d=128 and 400 steps e4 ended 0.027 nats WORSE than e2 (seed 0
    # pilot: no gap to close); at d=64 and 1000 steps, in less time, e4 ended 0.011 better.
    "small": dict(steps=1000, warmup_steps=10, eval_every=125, log_every=50, eval_batches=64),
    "quick": dict(steps=8, warmup_steps=2, eval_every=2, log_every=2, eval_batches=1),
    # configs/lm.py:pod's model with E=2 -> 4 top-2 experts in every other layer, 20k steps of
    # 512 x 2048 tokens on C4 (21B tokens), v5e-64 (expert axis 2: one then two experts per chip).
    # The claim needs a gap L_e2 - L_e4 far above its SE (0.002 ± 0.009 nats at the CPU size); at a fixed
    # active size, more experts lower the loss steadily at this scale (Fedus et al. 2022, fig. 4;
    # Clark et al. 2022).
    "pod": dict(steps=20_000, warmup_steps=2000, eval_every=1000, log_every=100, eval_batches=8,
                batch_size=512, eval_batch_size=64, topology="v5e-64", mesh=dict(data=-1, fsdp=8, expert=2)),
}


def switch_step(size: str, arm: str) -> int:
  return int(round(SWITCHES[arm] * SIZES[size]["steps"]))


def base_config(size: str) -> ml_collections.ConfigDict:
  """The E=2 model and the training set-up every arm shares."""
  if size not in SIZES:
    raise ValueError(f"experiments/expert_growth: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  c = pod.base_config() if size == "pod" else lm.get_config("tiny")
  c.model.update(moe_layers="every_other", num_experts=E_SMALL, top_k=TOP_K, gating="topk_softmax")
  if size != "pod":
    c.data.mixture = ml_collections.ConfigDict({"shakespeare_plays": 0.5, "python_stdlib": 0.5})
  c.mesh.update(s.get("mesh", {}))
  checkpoint_every = int(np.gcd.reduce([switch_step(size, a) for a in SWITCHES]))
  c.train.update(steps=s["steps"], batch_size=s.get("batch_size", 16), warmup_steps=s["warmup_steps"],
                 log_every=s["log_every"], eval_every=s["eval_every"], eval_batches=s["eval_batches"],
                 eval_batch_size=s.get("eval_batch_size", 16),
                 checkpoint_every=checkpoint_every, keep_checkpoints=s["steps"] // checkpoint_every + 2)
  return c


def grow_op() -> dict:
  return dict(op="add_experts", num_experts=E_BIG, mode="copy_noise", noise_std=NOISE_STD)


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed)."""
  t = SIZES[size]["steps"]
  out = {SMALL: base_config(size)}
  big = base_config(size)
  big.model.num_experts = E_BIG
  out[BIG] = big
  for name in SWITCHES:
    n = switch_step(size, name)
    c = base_config(size)
    c.stages = (dict(name=f"e{E_SMALL}", steps=n), dict(name=f"e{E_BIG}", steps=t - n, ops=(grow_op(),)))
    out[name] = c
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  s, cfgs = SIZES[size], configs(size)
  check_staged_arms("experiments/expert_growth", cfgs, SMALL, BIG, list(SWITCHES), "grow")
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  arms = [Arm(SMALL, make(SMALL), f"{E_SMALL} experts throughout"),
          Arm(BIG, make(BIG), f"{E_BIG} experts from the start")]
  for name, frac in SWITCHES.items():
    arms.append(Arm(name, make(name), f"{E_SMALL} -> {E_BIG} at {frac:.0%} of T (copy_noise)",
                    start_from=SMALL, start_step=switch_step(size, name)))
  claims = (Claim(f"{E_BIG} experts from the start beat {E_SMALL} (the gap growth should close)", BIG, SMALL),
            Claim("growing at 50% beats keeping 2 experts", "grow50", SMALL),
            Claim("4 experts from the start beat growing at 75%", BIG, "grow75"),
            Claim("growing earlier (25%) beats growing later (75%)", "grow25", "grow75"))
  plan = {"size": size, "steps": s["steps"], "switch_steps": {a: switch_step(size, a) for a in SWITCHES},
          "experts": [E_SMALL, E_BIG], "top_k": TOP_K, "grow_op": grow_op(), "eval_batches": s["eval_batches"],
          "model": {k: cfgs[SMALL].model[k] for k in ("d_model", "num_heads", "d_ff", "num_layers", "moe_layers")}}
  return Figure("expert_growth", f"Growing the expert table {E_SMALL} -> {E_BIG} mid-run ({size})", tuple(arms),
                claims, plan=plan, extra_report=gap_closure, replot=_replot)


# ---------------------------------------------------------------- gap closure

def final_mean_loss(workdir: str, step: int) -> float | None:
  """The mean over domains of the run's evaluation at `step` (None if it has none)."""
  ev = read_evals(workdir).get(step)
  return domain_mean(ev) if ev else None


def closure(l_small: float, l_big: float, l_grown: float) -> float:
  """(L_small - L_grown) / (L_small - L_big): 1 = grown matches the large table, 0 = no better than small."""
  gap = l_small - l_big
  return (l_small - l_grown) / gap if gap != 0 else float("nan")


def gap_closure_rows(fig: Figure, root: str, seeds) -> list[dict]:
  """Per grown arm and seed: L_small (e2), L_big (e4), L_grown and the closure, all at step T."""
  t = fig.plan["steps"]
  rows = []
  for seed in seeds:
    small, big = (final_mean_loss(run_dir(root, a, seed), t) for a in (SMALL, BIG))
    if small is None or big is None:
      continue
    for arm in fig.plan["switch_steps"]:
      grown = final_mean_loss(run_dir(root, arm, seed), t)
      if grown is None:
        continue
      rows.append({"arm": arm, "seed": int(seed), "switch_step": fig.plan["switch_steps"][arm],
                   "switch_fraction": fig.plan["switch_steps"][arm] / t, "L_small": small, "L_big": big,
                   "L_grown": grown, "closure": closure(small, big, grown)})
  return rows


def _replot(fig: Figure, root: str) -> list[plots.Drawn]:
  rows = read_csv_rows(os.path.join(root, "gap_closure.csv"))
  return plot_gap_closure(os.path.join(root, "gap_closure.png"), fig, rows, gap_closure_summary(rows))


def gap_closure_summary(rows: list[dict]) -> list[dict]:
  """Per grown arm: n, switch step and fraction, mean and SE of the closure, the losses and the gap."""
  summary = []
  for arm, mine in by_arm(rows).items():
    entry = {"arm": arm, "n": len(mine), "switch_step": mine[0]["switch_step"],
             "switch_fraction": mine[0]["switch_fraction"],
             **mean_se_fields(mine, ("closure", "L_grown", "L_small", "L_big"))}
    entry["gap"], entry["gap_se"] = mean_se([r["L_small"] - r["L_big"] for r in mine])
    summary.append(entry)
  return summary


def gap_closure(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Write gap_closure.csv (per arm and seed), gap_closure_summary.md (mean ± SE per arm, paired
  by seed) and gap_closure.png; print the summary."""
  rows = gap_closure_rows(fig, root, seeds)
  write_csv(os.path.join(root, "gap_closure.csv"), rows,
            ["arm", "seed", "switch_step", "switch_fraction", "L_small", "L_big", "L_grown", "closure"])
  summary = gap_closure_summary(rows)
  lines = [f"# {fig.title}: gap closure", "",
           f"Closure = (L_{SMALL} - L_grown) / (L_{SMALL} - L_{BIG}) per seed (paired), L = final validation "
           f"loss at step {fig.plan['steps']} (mean over domains); mean ± standard error over seeds. "
           "1 = the grown model matches 4 experts from the start; 0 = no better than 2 throughout. "
           "The ratio is unstable when the gap L_e2 - L_e4 is not clearly above its SE.", "",
           *table_head("arm", "grows at step", "seeds", "gap L_e2 - L_e4", "L_grown", "gap closure")]
  for e in summary:
    cells = [format_mean_se(e[k], e[k + "_se"]) for k in ("gap", "L_grown", "closure")]
    lines.append(f"| {e['arm']} | {e['switch_step']} ({e['switch_fraction']:.0%}) | {e['n']} | "
                 + " | ".join(cells) + " |")
  write_summary(os.path.join(root, "gap_closure_summary.md"), "\n".join(lines) + "\n")
  if summary:
    plot_gap_closure(os.path.join(root, "gap_closure.png"), fig, rows, summary)
  return summary


def plot_gap_closure(path: str, fig: Figure, rows: list[dict], summary: list[dict]) -> list[plots.Drawn]:
  """Each arm's closure, mean ± SE over seeds, and every seed's value beside it; no line joins the
  arms (their order is a switch time, not a trend the data shows). Returns what it drew."""
  plt = plots.pyplot()
  f, ax = plt.subplots(figsize=(6.4, 4.5))
  x = [e["switch_fraction"] for e in summary]
  drawn = [plots.points(ax, x, [e["closure"] for e in summary], [e["closure_se"] for e in summary],
                        label=f"mean ± SE (n={max(e['n'] for e in summary)})", panel="gap closure", series="closure",
                        color="C0", marker="o", ls="none", ms=6, capsize=4)]
  ax.scatter([r["switch_fraction"] for r in rows], [r["closure"] for r in rows], s=12, color="0.5",
             label="per seed", zorder=3)
  ax.axhline(1.0, color="C2", lw=0.8, ls="--", label=f"{E_BIG} experts from the start")
  ax.axhline(0.0, color="C3", lw=0.8, ls=":", label=f"{E_SMALL} experts throughout")
  ax.set_xticks(x, [f"{v:.0%}" for v in x])
  plots.style_axes(ax, f"growth {E_SMALL} -> {E_BIG} at (fraction of the {fig.plan['steps']} steps)", "gap closure",
                   legend_size=8)
  ax.set_title(f"{fig.title}", fontsize=9)
  plots.save(f, path)
  return drawn
