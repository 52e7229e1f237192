"""Shrinking the expert table mid-run: 8 -> 4 experts by pruning or merging, then recovery.

REAP (Lasby et al. 2025, arXiv 2510.13999) reports that pruning experts by router-weighted
activation (gate x ||expert output||) keeps more of an MoE than pruning by router frequency, and
that pruning beats merging experts (HC-SMoE, Chen et al. 2024) at generative tasks; all are one-shot
there. Here the cut happens inside a run: an E=8 top-2 model trains N steps, is shrunk to 4 experts
at a stage boundary (saliencies and merge features measured there on held-out rows), and trains M
more steps with its Adam moments carried.

Model: configs/lm.py:tiny with an MoE MLP in every other layer (layer 1 of 2), top-2 of E experts,
topk_softmax gating; d=64, 2 heads, d_ff 256 per expert. Data: the two embedded corpora, 50/50.
Every arm trains N + M steps of the same batches under one schedule (warm-up, cosine over N + M):
  e8                    8 experts throughout (no shrink);
  e4                    4 experts from scratch, the same tokens (the shrunk model's shape);
  prune_frequency       after N steps keep the 4 experts the router selects most often;
  prune_reap            ... the 4 of highest REAP saliency;
  prune_random          ... 4 at random (seeded);
  merge_output          merge the 8 into 4 groups clustered by mean output (HC-SMoE), each the
                        usage-weighted mean of its members;
  merge_output_aligned  the same, each expert's hidden units permuted onto the layer's most used
                        expert's first (MC-SMoE's weight matching);
  prune_reap_distill    prune_reap, then M steps with distillation from the model before the cut
                        (loss 0.5 CE + 0.5 KL(teacher || student), T = 1).
A shrunk arm's first N steps are e8's (same config, schedule and data): it starts from a copy of
e8's checkpoint at N (harness `start_from`). E=8 and E=4 top-2 layers cost the same FLOPs per token
(the same two experts per token; the router's E columns aside), so equal tokens are equal FLOPs,
except for the distilled arm, whose teacher's forward passes (a third of a step of the 8-expert
model) the harness counts on the x axis.

`cut.csv` / `cut_summary.md` / `cut.png` (per shrunk arm and seed, paired): the validation loss of
e8 at step N, of the shrunk model right after the cut (its step-N checkpoint, evaluated on the same
batches), and after recovery at N + M, against e8 and e4 at N + M.
`--quick`: N = 4, M = 2, one evaluation batch (tests).
"""
from __future__ import annotations

import copy
import json
import math
import os

import ml_collections
import numpy as np

from experiments import plots, pod
from experiments.harness import (Arm, Claim, Figure, arm_config, by_arm, check_staged_arms, domain_mean,
                                 format_mean_se, mean_se, read_csv_rows, read_evals, run_dir, size_name, table_head,
                                 write_csv, write_summary)
from moegrow import checkpoint
from moegrow.configs import lm
from moegrow.orchestrate import parts

E_BIG, E_SMALL, TOP_K = 8, 4, 2
BIG, SMALL = "e8", "e4"
CUTS = {
    "prune_frequency": dict(op="prune_experts", num_experts=E_SMALL, saliency="frequency"),
    "prune_reap": dict(op="prune_experts", num_experts=E_SMALL, saliency="reap"),
    "prune_random": dict(op="prune_experts", num_experts=E_SMALL, saliency="random", seed=0),
    "merge_output": dict(op="merge_experts", num_experts=E_SMALL, grouping="output"),
    "merge_output_aligned": dict(op="merge_experts", num_experts=E_SMALL, grouping="output", align=True),
    "prune_reap_distill": dict(op="prune_experts", num_experts=E_SMALL, saliency="reap"),
}
DISTILL = {"prune_reap_distill": dict(weight=0.5, temperature=1.0)}
LABELS = {"prune_frequency": "prune: router frequency", "prune_reap": "prune: REAP",
          "prune_random": "prune: random", "merge_output": "merge: output clusters (HC-SMoE)",
          "merge_output_aligned": "merge: output clusters, aligned", "prune_reap_distill": "prune: REAP + distillation"}
SIZES = {
    # N + M steps of 16 x 64 tokens; 64 evaluation batches of 16 x 64 per domain every 100 steps.
    "small": dict(pre=1200, post=400, warmup_steps=10, eval_every=100, log_every=50, eval_batches=64),
    "quick": dict(pre=4, post=2, warmup_steps=2, eval_every=2, log_every=2, eval_batches=1),
    # configs/lm.py:pod's model, E=8 top-2 in every other layer, cut to 4 after 20k of 25k steps of
    # 512 x 2048 tokens on C4, v5e-64 (expert axis 4: two then one expert per chip). The papers
    # prune trained MoEs whose experts have specialised (REAP: Qwen3 and others, 10B+ parameters);
    # at the CPU size e8 is only 0.006 nats ahead of e4, too little to hand down.
    "pod": dict(pre=20_000, post=5_000, warmup_steps=2000, eval_every=1000, log_every=100, eval_batches=8,
                batch_size=512, eval_batch_size=64, topology="v5e-64", mesh=dict(data=-1, fsdp=8, expert=4)),
}


def base_config(size: str, experts: int = E_BIG) -> ml_collections.ConfigDict:
  """The E-expert model and the training set-up every arm shares."""
  if size not in SIZES:
    raise ValueError(f"experiments/shrink: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  c = pod.base_config() if size == "pod" else lm.get_config("tiny")
  c.model.update(moe_layers="every_other", num_experts=experts, top_k=TOP_K, gating="topk_softmax")
  if size != "pod":
    c.data.mixture = ml_collections.ConfigDict({"shakespeare_plays": 0.5, "python_stdlib": 0.5})
  c.mesh.update(s.get("mesh", {}))
  steps = s["pre"] + s["post"]
  every = math.gcd(s["pre"], s["post"])
  c.train.update(steps=steps, batch_size=s.get("batch_size", 16), warmup_steps=s["warmup_steps"],
                 log_every=s["log_every"], eval_every=s["eval_every"], eval_batches=s["eval_batches"],
                 eval_batch_size=s.get("eval_batch_size", 16),
                 checkpoint_every=every, keep_checkpoints=steps // every + 2)
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed)."""
  s = SIZES[size]
  out = {BIG: base_config(size), SMALL: base_config(size, E_SMALL)}
  for name, op in CUTS.items():
    c = base_config(size)
    cut = dict(name=f"e{E_SMALL}", steps=s["post"], ops=(dict(op),))
    if name in DISTILL:
      cut["distill"] = dict(DISTILL[name], replay_only=False)
    c.stages = (dict(name=f"e{E_BIG}", steps=s["pre"]), cut)
    out[name] = c
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  s, cfgs = SIZES[size], configs(size)
  check_staged_arms("experiments/shrink", cfgs, BIG, SMALL, list(CUTS), "shrink")
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  arms = [Arm(BIG, make(BIG), f"{E_BIG} experts throughout"), Arm(SMALL, make(SMALL), f"{E_SMALL} experts from scratch")]
  arms += [Arm(name, make(name), f"{LABELS[name]} at step {s['pre']}", start_from=BIG, start_step=s["pre"])
           for name in CUTS]
  claims = (Claim("no shrink beats the best-kept shrink (REAP) after recovery", BIG, "prune_reap"),
            Claim("REAP pruning beats random pruning", "prune_reap", "prune_random"),
            Claim("REAP pruning beats frequency pruning", "prune_reap", "prune_frequency"),
            Claim("REAP pruning beats merging by output (HC-SMoE)", "prune_reap", "merge_output"),
            Claim("aligned merging beats plain merging", "merge_output_aligned", "merge_output"),
            Claim("distillation from the model before the cut helps recovery", "prune_reap_distill", "prune_reap"),
            Claim("a trained 8-expert model shrunk to 4 (REAP) beats 4 experts from scratch", "prune_reap", SMALL))
  plan = {"size": size, "pre_steps": s["pre"], "post_steps": s["post"], "experts": [E_BIG, E_SMALL], "top_k": TOP_K,
          "cuts": CUTS, "distill": DISTILL, "eval_batches": s["eval_batches"],
          "model": {k: cfgs[BIG].model[k] for k in ("d_model", "num_heads", "d_ff", "num_layers", "moe_layers")}}
  return Figure("shrink", f"Shrinking the expert table {E_BIG} -> {E_SMALL} mid-run ({size})", tuple(arms), claims,
                plan=plan, extra_report=cut_report,
                replot=lambda fig, root: plot_cut(os.path.join(root, "cut.png"), fig, cut_summary(read_csv_rows(
                    os.path.join(root, "cut.csv")))))


# ---------------------------------------------------------------- the cut

def cut_losses(config, workdir: str, step: int) -> dict[str, float] | None:
  """{domain: validation loss} of the shrunk model right after the cut (the step-`step`
  checkpoint of the run's second stage) on the run's own evaluation batches; cached in
  `<workdir>/cut_eval.json`. None if the run has no such checkpoint."""
  path = os.path.join(workdir, "cut_eval.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from moegrow.train import probes
  from moegrow.train.steps import build_program
  plan = parts.resolve_stages(config, parts.model_config(config))
  st = plan[1]
  mngr = parts.manager(workdir, st.index, config.train, read_only=True)
  try:
    if step not in mngr.all_steps():
      return None
    program = build_program(st.cfg, parts.stage_train(config.train, st), parts.make_mesh(config))
    state, _, _ = checkpoint.restore(mngr, step, program.abstract_state)
  finally:
    mngr.close()
  losses = {d: float(v["loss"]) for d, v in probes.domain_losses(program, state["params"], parts.eval_sets(config)).items()}
  checkpoint.write_json(path, losses)
  return losses


def cut_rows(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Per shrunk arm and seed (mean over domains): e8 at the cut, the shrunk model right after it,
  the shrunk arm at the end, e8 and e4 at the end."""
  n, t = fig.plan["pre_steps"], fig.plan["pre_steps"] + fig.plan["post_steps"]
  arms = {a.name: a for a in fig.arms}
  rows = []
  for seed in seeds:
    big, small = read_evals(run_dir(root, BIG, seed)), read_evals(run_dir(root, SMALL, seed))
    if n not in big or t not in big or t not in small:
      continue
    for name in CUTS:
      wd = run_dir(root, name, seed)
      end = read_evals(wd).get(t)
      cut = cut_losses(arm_config(fig, arms[name], seed, data_dir, root), wd, n) if end else None
      if cut is None:
        continue
      rows.append({"arm": name, "seed": int(seed), "L_before": domain_mean(big[n]), "L_cut": domain_mean(cut),
                   "L_final": domain_mean(end), "L_e8": domain_mean(big[t]), "L_e4": domain_mean(small[t])})
  return rows


DIFFS = {"cut": ("L_cut", "L_before"), "vs_e8": ("L_final", "L_e8"), "vs_e4": ("L_final", "L_e4")}


def cut_summary(rows: list[dict]) -> list[dict]:
  """Per arm: n, each paired difference of DIFFS (mean, SE) and the final loss (mean, SE)."""
  summary = []
  for arm, mine in by_arm(rows).items():
    entry = {"arm": arm, "n": len(mine)}
    for k, (a, b) in DIFFS.items():
      entry[k], entry[k + "_se"] = mean_se([r[a] - r[b] for r in mine])
    entry["final"], entry["final_se"] = mean_se([r["L_final"] for r in mine])
    summary.append(entry)
  return summary


def cut_report(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Write cut.csv, cut_summary.md (mean ± SE over seeds of each paired difference) and cut.png;
  print the summary."""
  rows = cut_rows(fig, root, seeds, data_dir)
  write_csv(os.path.join(root, "cut.csv"), rows, ["arm", "seed", "L_before", "L_cut", "L_final", "L_e8", "L_e4"])
  summary = cut_summary(rows)
  n, t = fig.plan["pre_steps"], fig.plan["pre_steps"] + fig.plan["post_steps"]
  lines = [f"# {fig.title}: the cut and the recovery", "",
           f"Validation loss (nats/token, mean over domains), differences paired by seed, mean ± standard error "
           f"over seeds. Cut: the shrunk model at step {n} minus e8 at step {n} (the same weights before the "
           f"cut). Recovered: the shrunk arm at step {t} minus e8 (no shrink) / e4 (4 experts from scratch) at "
           f"step {t}; > 0 means behind.", "",
           *table_head("arm", "seeds", "loss change at the cut", f"loss at {t}", "minus e8", "minus e4")]
  for e in summary:
    cells = [format_mean_se(e["final"], e["final_se"])] + [_signed(e[k], e[k + "_se"]) for k in ("vs_e8", "vs_e4")]
    cells.insert(0, _signed(e["cut"], e["cut_se"]))
    lines.append(f"| {e['arm']} | {e['n']} | " + " | ".join(cells) + " |")
  write_summary(os.path.join(root, "cut_summary.md"), "\n".join(lines) + "\n")
  if summary:
    plot_cut(os.path.join(root, "cut.png"), fig, summary)
  return summary


def _signed(m: float, se: float) -> str:
  """'+m ± se' (the SE unsigned; 'n/a' without a mean; the mean alone with one seed)."""
  return "n/a" if m != m else (f"{m:+.4f}" if se != se else f"{m:+.4f} ± {se:.4f}")


def plot_cut(path: str, fig: Figure, summary: list[dict]) -> list[plots.Drawn]:
  """Two panels of paired differences with their SE: the loss change at the cut, and the gap to
  no shrink (e8) after recovery. One style per arm (colour and hatch). Returns what it drew."""
  plt = plots.pyplot()
  f, axes = plt.subplots(1, 2, figsize=(10, 4.3), gridspec_kw={"width_ratios": [1.25, 1]})
  names = [e["arm"] for e in summary]
  y = np.arange(len(names))
  hatches = ["", "//", "..", "xx", "\\\\", "oo", "++", "--"]
  drawn = []
  for ax, key, title in ((axes[0], "cut", f"right after the cut (step {fig.plan['pre_steps']})"),
                         (axes[1], "vs_e8", "after recovery, minus no shrink (e8)")):
    for j, e in enumerate(summary):
      se = float(np.nan_to_num(e[key + "_se"]))
      ax.barh(y[j], e[key], xerr=se, color=plots.arm_style(j)["color"], hatch=hatches[j % len(hatches)],
              edgecolor="0.2", capsize=4)
      drawn.append(plots.Drawn(key, e["arm"], [float(y[j])], [e[key]], [se]))
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_yticks(y, [LABELS.get(nm, nm) for nm in names] if key == "cut" else [], fontsize=8)
    plots.style_axes(ax, "loss change (nats/token), mean ± SE", "", title, grid="x")
  n = max(e["n"] for e in summary)
  plots.save(f, path, f"{fig.title} (n={n} seeds, paired)")
  return drawn
