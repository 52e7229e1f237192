"""Weight merging on one base: linear mode connectivity, soups, and task-vector merges.

Arms (all dense, d=128, 2 layers; d=64 in --quick; one cosine schedule over N + M steps):
  base               trained on Shakespeare + Python (50/50) for N steps: the shared base (not plotted);
  ft_0 .. ft_3       base's checkpoint N fine-tuned M more steps on the same mixture (the data
                     stream continues where base's stopped), each at its own learning rate
                     (x1, x0.5, x1.5, x0.25 of base's schedule): the soup's ingredients; ft_0
                     and ft_1 are "two fine-tunes of one base";
  scratch            the same model from another random init (seed offset 1000), N + M steps;
  tuned_shakespeare  base's checkpoint N fine-tuned M steps on Shakespeare only;
  tuned_python       base's checkpoint N fine-tuned M steps on Python only.
After training, `merge_report` merges the final checkpoints (moegrow.surgery.merge, in memory)
and evaluates every merge on the same validation batches:
  * interpolation theta(a) = (1 - a) theta_A + a theta_B, a in 0, 0.1, .., 1, for the pair
    (ft_0, ft_1) (one base) and (ft_0, scratch) (different inits); the loss barrier is
    max_a [L(a) - ((1 - a) L(0) + a L(1))] (Frankle et al. 2020, eq. 1) on the mean loss;
  * the uniform soup and the greedy soup of ft_0..ft_3 (Wortsman et al. 2022, recipe 1; the
    greedy soup's held-out set is the same validation batches: no separate test split here);
  * task arithmetic vs TIES vs DARE (linear and TIES-style) of tuned_shakespeare and tuned_python
    on base, at densities 0.2 .. 1.0, every method normalised (the mean of the kept task vectors).
Writes merging_points.csv (seed, panel, method, x, domain, loss), merging_summary.md and
merging_merges.png next to the harness's merging.csv / merging.png (training curves).
"""
from __future__ import annotations

import copy
import os

import jax
import ml_collections
import numpy as np

from experiments import plots
from experiments.harness import (Arm, Figure, domain_mean, format_effect, mean_se, mean_se_curve, paired_effect,
                                 run_dir, table_head, write_csv, write_summary)
from moegrow.configs import lm

SHAKESPEARE, PYTHON = "shakespeare_plays", "python_stdlib"
SIZES = {
    "small": dict(base_steps=150, ft_steps=100, eval_batches=64, log_every=25, eval_every=50,
                  alphas=11, densities=(0.2, 0.4, 0.6, 0.8, 1.0), ingredients=4),
    "quick": dict(base_steps=4, ft_steps=3, eval_batches=1, log_every=1, eval_every=3,
                  alphas=3, densities=(0.5, 1.0), ingredients=2),
}
LR_SCALE = (1.0, 0.5, 1.5, 0.25)  # ft_k's learning rate: base's times LR_SCALE[k]
TASK_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def base_config(size: str) -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"experiments/merging: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  c = lm.get_config("tiny")
  if size != "quick":
    c.model.update(d_model=128, num_heads=4, d_ff=512)
  c.train.update(steps=s["base_steps"] + s["ft_steps"], batch_size=16, warmup_steps=2 if size == "quick" else 10,
                 log_every=s["log_every"], eval_every=s["eval_every"], eval_batches=s["eval_batches"],
                 eval_batch_size=16, checkpoint_every=10_000, keep_checkpoints=2)
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed and adds the arm's seed offset)."""
  s = SIZES[size]
  out = {"base": base_config(size), "scratch": base_config(size)}
  for k in range(s["ingredients"]):
    c = base_config(size)
    c.train.lr = c.train.lr * LR_SCALE[k]
    out[f"ft_{k}"] = c
  for name, domain in (("tuned_shakespeare", SHAKESPEARE), ("tuned_python", PYTHON)):
    c = base_config(size)
    c.data.mixture = ml_collections.ConfigDict({domain: 1.0})
    out[name] = c
  return out


def figure(quick: bool = False) -> Figure:
  size = "quick" if quick else "small"
  s, cfgs = SIZES[size], configs(size)
  n = s["base_steps"]
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  arms = [Arm("base", make("base"), end_step=n, plotted=False)]
  arms += [Arm(f"ft_{k}", make(f"ft_{k}"), f"fine-tune {k} (lr x{LR_SCALE[k]:g})", start_from="base",
               start_step=n) for k in range(s["ingredients"])]
  arms.append(Arm("scratch", make("scratch"), "another init, from scratch", seed_offset=1000))
  arms += [Arm(name, make(name), name.replace("_", " "), start_from="base", start_step=n)
           for name in ("tuned_shakespeare", "tuned_python")]
  plan = {"size": size, "base_steps": n, "ft_steps": s["ft_steps"], "eval_batches": s["eval_batches"],
          "ingredients": s["ingredients"], "lr_scale": list(LR_SCALE), "densities": list(s["densities"]),
          "alphas": s["alphas"]}
  return Figure("merging", f"Weight merging on one base ({size})", tuple(arms), (), plan=plan,
                extra_report=merge_report)


# ---------------------------------------------------------------- the merges

def barrier(alphas, losses) -> float:
  """Loss barrier max_a [L(a) - ((1 - a) L(0) + a L(1))] (Frankle et al. 2020, eq. 1)."""
  a, l = np.asarray(alphas, np.float64), np.asarray(losses, np.float64)
  return float(np.max(l - ((1 - a) * l[0] + a * l[-1])))


def seed_points(fig: Figure, root: str, seed: int) -> list[dict]:
  """Every merge of one seed's final checkpoints, evaluated: rows (seed, panel, method, x, domain, loss)."""
  from moegrow.orchestrate import merging, parts
  from moegrow.surgery import merge as merge_ops
  from moegrow.train import probes
  from moegrow.train.steps import build_program

  s = SIZES[fig.plan["size"]]
  config = configs(fig.plan["size"])["base"]
  config.train.seed = seed
  mesh, tr = parts.make_mesh(config), config.train
  evals = parts.eval_sets(config)
  p = {a.name: merging.restore_params(run_dir(root, a.name, seed), mesh, tr)[0] for a in fig.arms}
  program = build_program(parts.model_config(config), tr, mesh)
  rows = []

  def measure(params, panel, method, x):
    losses = {d: v["loss"] for d, v in probes.domain_losses(program, params, evals).items()}
    losses["mean"] = domain_mean(losses)
    rows.extend({"seed": seed, "panel": panel, "method": method, "x": float(x), "domain": d, "loss": v}
                for d, v in losses.items())
    return losses["mean"]

  for pair, (a, b) in (("one base", ("ft_0", "ft_1")), ("different inits", ("ft_0", "scratch"))):
    for alpha in np.linspace(0.0, 1.0, s["alphas"]):
      merged = p[a] if alpha == 0 else p[b] if alpha == 1 else merge_ops.merge(
          "linear", [p[a], p[b]], weights=[1.0 - float(alpha), float(alpha)])
      measure(merged, "interpolation", pair, alpha)
  ingredients = [p[f"ft_{k}"] for k in range(s["ingredients"])]
  for k, x in enumerate(ingredients):
    measure(x, "soup", f"ft_{k}", k)
  measure(merge_ops.merge("linear", ingredients), "soup", "uniform soup", 0)
  soup, trace = merge_ops.greedy_soup(ingredients, lambda t: measure(t, "greedy trace", "candidate", len(rows)))
  measure(soup, "soup", "greedy soup", sum(r["added"] for r in trace))
  rows[:] = [r for r in rows if r["panel"] != "greedy trace"]
  for name in ("base", "tuned_shakespeare", "tuned_python"):
    measure(p[name], "task", name, 1.0)
  tuned = [p["tuned_shakespeare"], p["tuned_python"]]
  key = jax.random.key(seed)
  for method in TASK_METHODS:
    for density in (s["densities"] if method != "task_arithmetic" else (1.0,)):
      params = {"normalize": True} if method == "task_arithmetic" else {"normalize": True, "density": density}
      measure(merge_ops.merge(method, tuned, p["base"], key=key, **params), "task", method, density)
  return rows


def summary(fig: Figure, rows: list[dict], seeds) -> tuple[str, list[dict]]:
  """Mean ± SE per point, and the three claims paired by seed (separated: |effect| > 2 SE)."""
  at = lambda seed, panel, method, x=None, domain="mean": next(
      (r["loss"] for r in rows if r["seed"] == seed and r["panel"] == panel and r["method"] == method
       and r["domain"] == domain and (x is None or abs(r["x"] - x) < 1e-9)), np.nan)
  alphas = sorted({r["x"] for r in rows if r["panel"] == "interpolation"})
  bar = {pair: {s: barrier(alphas, [at(s, "interpolation", pair, a) for a in alphas]) for s in seeds}
         for pair in ("one base", "different inits")}
  k = fig.plan["ingredients"]
  best = {s: min(at(s, "soup", f"ft_{i}") for i in range(k)) for s in seeds}
  soup = {m: {s: at(s, "soup", m) for s in seeds} for m in ("uniform soup", "greedy soup")}
  dens = fig.plan["densities"]
  d_mid = 0.4 if 0.4 in dens else dens[0]
  task = {m: {s: at(s, "task", m, None if m == "task_arithmetic" else d_mid) for s in seeds}
          for m in TASK_METHODS}
  claims = [
      ("different inits have a higher loss barrier than two fine-tunes of one base", bar["different inits"],
       bar["one base"]),
      ("the uniform soup beats the best ingredient", best, soup["uniform soup"]),
      ("the greedy soup is no worse than the best ingredient", best, soup["greedy soup"]),
      (f"TIES (density {d_mid}) beats task arithmetic", task["task_arithmetic"], task["ties"]),
      (f"DARE-TIES (density {d_mid}) beats task arithmetic", task["task_arithmetic"], task["dare_ties"]),
  ]
  out, lines = [], [f"# {fig.title}: merges", "",
                    "Mean validation loss over both domains (nats/token), mean ± standard error over seeds.", "",
                    *table_head("quantity", "seeds", "value")]
  fmt = lambda m, se: f"{m:.4f}" if se != se else f"{m:.4f} ± {se:.4f}"
  for pair, v in bar.items():
    lines.append(f"| loss barrier, {pair} | {len(v)} | {fmt(*mean_se(v.values()))} |")
  lines.append(f"| best ingredient | {len(best)} | {fmt(*mean_se(best.values()))} |")
  for m, v in soup.items():
    lines.append(f"| {m} | {len(v)} | {fmt(*mean_se(v.values()))} |")
  for m in TASK_METHODS:
    for d in (dens if m != "task_arithmetic" else (1.0,)):
      v = [at(s, "task", m, d) for s in seeds]
      lines.append(f"| {m}{'' if m == 'task_arithmetic' else f' density {d}'} | {len(v)} | {fmt(*mean_se(v))} |")
  for name in ("base", "tuned_shakespeare", "tuned_python"):
    for dom in (SHAKESPEARE, PYTHON, "mean"):
      v = [at(s, "task", name, 1.0, dom) for s in seeds]
      lines.append(f"| {name}, {dom} | {len(v)} | {fmt(*mean_se(v))} |")
  lines += ["", "Claims (effect = worse - better, paired by seed; > 0 supports the claim):", "",
            *table_head("claim", "seeds", "effect ± SE", "separated (|effect| > 2 SE)")]
  for text, worse, better in claims:
    out.append({"claim": text, **paired_effect(better, worse, seeds)})
    lines.append(f"| {text} | {out[-1]['n']} | {format_effect(out[-1])} |")
  return "\n".join(lines) + "\n", out


def merge_report(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Merge and evaluate every seed's checkpoints (cached per seed); write CSV, summary, PNG."""
  from experiments.harness import read_csv_rows
  rows = []
  for seed in seeds:
    cache = os.path.join(run_dir(root, "merges", seed), "points.csv")
    if os.path.exists(cache):
      rows += read_csv_rows(cache)
      continue
    print(f"[merges seed {seed}] merging and evaluating", flush=True)
    mine = seed_points(fig, root, seed)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    write_csv(cache, mine, ["seed", "panel", "method", "x", "domain", "loss"])
    rows += mine
  write_csv(os.path.join(root, "merging_points.csv"), rows, ["seed", "panel", "method", "x", "domain", "loss"])
  text, claims = summary(fig, rows, seeds)
  write_summary(os.path.join(root, "merging_summary.md"), text)
  _plot(os.path.join(root, "merging_merges.png"), fig, rows)
  return claims


def _plot(path: str, fig: Figure, rows: list[dict]) -> None:
  plt = plots.pyplot()

  def curve(panel, method, domain="mean"):
    xs = sorted({r["x"] for r in rows if r["panel"] == panel and r["method"] == method})
    m, se = mean_se_curve([[r["loss"] for r in rows if r["panel"] == panel and r["method"] == method
                            and r["domain"] == domain and abs(r["x"] - x) < 1e-9] for x in xs])
    return np.array(xs), m, se

  f, (ax, bx, cx) = plt.subplots(1, 3, figsize=(16, 4.6))
  for i, pair in enumerate(("one base", "different inits")):
    x, m, se = curve("interpolation", pair)
    plots.band(ax, x, m, se, f"C{i}", f"{'ft_0 -> ft_1' if i == 0 else 'ft_0 -> scratch'} ({pair})", marker="o", ms=3)
  plots.style_axes(ax, "interpolation weight a", "validation loss, mean of domains", "linear mode connectivity",
                   legend_size=8)
  names = [f"ft_{k}" for k in range(fig.plan["ingredients"])] + ["uniform soup", "greedy soup"]
  stats = [curve("soup", n) for n in names]
  bx.bar(range(len(names)), [s[1].mean() for s in stats], yerr=[s[2].mean() for s in stats], capsize=3,
         color=["0.6"] * (len(names) - 2) + ["C2", "C3"])
  lo = min(s[1].min() for s in stats)
  bx.set_ylim(lo - 0.05, max(s[1].max() for s in stats) + 0.03)
  bx.set_xticks(range(len(names)), names, fontsize=8, rotation=20)
  bx.set_title("soups of 4 fine-tunes"), bx.set_ylabel("validation loss, mean of domains"), bx.grid(alpha=0.3, axis="y")
  for i, method in enumerate(TASK_METHODS):
    x, m, se = curve("task", method)
    if method == "task_arithmetic":
      cx.axhline(m[0], color="k", lw=1.2, label="task arithmetic (mean of task vectors)")
      cx.axhspan(m[0] - se[0], m[0] + se[0], color="k", alpha=0.1)
      continue
    cx.errorbar(x, m, yerr=se, fmt="o-", color=f"C{i}", ms=3, capsize=3, label=method)
  for name, style in (("tuned_shakespeare", ":"), ("tuned_python", "--")):
    _, m, _ = curve("task", name)
    cx.axhline(m[0], color="0.5", ls=style, lw=1, label=name.replace("_", " "))
  plots.style_axes(cx, "density (fraction of each task vector kept)", "validation loss, mean of domains",
                   "Shakespeare-tuned + Python-tuned, merged on base", legend_size=7)
  plots.save(f, path, f"{fig.title}: mean ± standard error over seeds")
