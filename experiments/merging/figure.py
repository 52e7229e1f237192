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
The tuned arms list the other domain at weight 0: trained on one domain, evaluated on both.
After training, `merge_report` merges the final checkpoints (moegrow.surgery.merge, in memory)
and evaluates every merge on the same validation batches (the training curves' evaluation batches):
  * interpolation theta(a) = (1 - a) theta_A + a theta_B, a in 0, 0.1, .., 1, for the pair
    (ft_0, ft_1) (one base) and (ft_0, scratch) (different inits); the loss barrier is
    max_a [L(a) - ((1 - a) L(0) + a L(1))] (Frankle et al. 2020, eq. 1) on the mean loss;
  * the uniform soup and the greedy soup of ft_0..ft_3 (Wortsman et al. 2022, recipe 1): the greedy
    soup and the best ingredient are chosen on `select_batches` other validation batches per
    domain (the ones after the reported ones), never on the batches they are reported on;
  * task arithmetic vs TIES vs DARE (linear and TIES-style) of tuned_shakespeare and tuned_python
    on base, at densities 0.2 .. 1.0, every method normalised (the mean of the kept task vectors).
Writes merging_points.csv (seed, panel, method, x, domain, loss; panel 'greedy selection' holds the
selection batches' losses, x the best ingredient's index), merging_summary.md and
merging_merges.png next to the harness's merging.csv / merging.png (training curves).
"""
from __future__ import annotations

import copy
import os

import jax
import ml_collections
import numpy as np

from experiments import plots, pod
from experiments.harness import (Arm, Figure, domain_mean, format_effect, mean_se, mean_se_curve, paired_effect,
                                 read_csv_rows, run_dir, size_name, table_head, write_csv, write_summary)
from moegrow.configs import lm
from moegrow.data import domain_name

SHAKESPEARE, PYTHON = "shakespeare_plays", "python_stdlib"
SIZES = {
    "small": dict(base_steps=150, ft_steps=100, eval_batches=64, select_batches=16, log_every=25, eval_every=50,
                  alphas=11, densities=(0.2, 0.4, 0.6, 0.8, 1.0), ingredients=4),
    "quick": dict(base_steps=4, ft_steps=3, eval_batches=1, select_batches=1, log_every=1, eval_every=3,
                  alphas=3, densities=(0.5, 1.0), ingredients=2),
    # configs/lm.py:pod's model made dense (d=1024, 16 layers, bfloat16; 0.2B parameters), sequence
    # 2048, batch 512, on C4 + code (50/50): base 10k steps (10B tokens), every fine-tune 5k more;
    # v5e-64. The papers merge fine-tunes of large pre-trained bases, whose task vectors are small
    # next to the weights (Yadav et al. 2023; Yu et al. 2024); the CPU size's base is 150 steps old.
    "pod": dict(base_steps=10_000, ft_steps=5_000, eval_batches=8, select_batches=4, log_every=100, eval_every=1000,
                alphas=11, densities=(0.2, 0.4, 0.6, 0.8, 1.0), ingredients=4, topology="v5e-64"),
}
LR_SCALE = (1.0, 0.5, 1.5, 0.25)  # ft_k's learning rate: base's times LR_SCALE[k]
TASK_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def base_config(size: str) -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"experiments/merging: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  if size == "pod":
    c = pod.base_config({pod.ENGLISH: 0.5, pod.CODE: 0.5})
    c.train.update(steps=s["base_steps"] + s["ft_steps"], warmup_steps=1000, log_every=s["log_every"],
                   eval_every=s["eval_every"], eval_batches=s["eval_batches"], checkpoint_every=5000,
                   keep_checkpoints=2)
    return c
  c = lm.get_config("tiny")
  if size != "quick":
    c.model.update(d_model=128, num_heads=4, d_ff=512)
  c.train.update(steps=s["base_steps"] + s["ft_steps"], batch_size=16, warmup_steps=2 if size == "quick" else 10,
                 log_every=s["log_every"], eval_every=s["eval_every"], eval_batches=s["eval_batches"],
                 eval_batch_size=16, checkpoint_every=10_000, keep_checkpoints=2)
  return c


def domains(size: str) -> tuple[str, str]:
  """The figure's two domains (dataset names) at `size`: the local corpora, or C4 and code at pod."""
  return pod.domains(size, (SHAKESPEARE, PYTHON))


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed and adds the arm's seed offset)."""
  s = SIZES[size]
  out = {"base": base_config(size), "scratch": base_config(size)}
  for k in range(s["ingredients"]):
    c = base_config(size)
    c.train.lr = c.train.lr * LR_SCALE[k]
    out[f"ft_{k}"] = c
  first, second = domains(size)
  for name, domain, other in (("tuned_shakespeare", first, second), ("tuned_python", second, first)):
    c = base_config(size)
    c.data.mixture = ml_collections.ConfigDict({domain: 1.0, other: 0.0})  # trained on one, evaluated on both
    out[name] = c
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
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
                extra_report=merge_report,
                replot=lambda fig, root: plot_merges(os.path.join(root, "merging_merges.png"), fig, read_csv_rows(
                    os.path.join(root, "merging_points.csv"))))


# ---------------------------------------------------------------- the merges

def barrier(alphas, losses) -> float:
  """Loss barrier max_a [L(a) - ((1 - a) L(0) + a L(1))] (Frankle et al. 2020, eq. 1)."""
  a, l = np.asarray(alphas, np.float64), np.asarray(losses, np.float64)
  return float(np.max(l - ((1 - a) * l[0] + a * l[-1])))


def report_and_select_sets(config, s: dict) -> tuple[dict, dict]:
  """({domain: batches} every merge is reported on, {domain: batches} the greedy soup selects on):
  the first `eval_batches` of each validation split (the training curves' evaluation batches) and
  the `select_batches` after them, so the soup is chosen on batches it is never scored on."""
  from moegrow.orchestrate import parts
  c = copy.deepcopy(config)
  c.train.eval_batches = s["eval_batches"] + s["select_batches"]
  both = parts.eval_sets(c)
  report = {d: b[:s["eval_batches"]] for d, b in both.items()}
  select = {d: b[s["eval_batches"]:] for d, b in both.items()}
  short = [d for d, b in select.items() if len(b) < s["select_batches"]]
  if short:
    raise ValueError(f"experiments/merging: the validation split of {short} holds fewer than "
                     f"{c.train.eval_batches} batches of {c.train.eval_batch_size} x {c.data.seq_len} tokens")
  return report, select


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
  evals, select = report_and_select_sets(config, s)
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
  held_out = lambda t: domain_mean({d: v["loss"] for d, v in probes.domain_losses(program, t, select).items()})
  soup, trace = merge_ops.greedy_soup(ingredients, held_out)
  measure(soup, "soup", "greedy soup", sum(r["added"] for r in trace))
  best_soup = min(r["soup_loss"] for r in trace if r["added"])  # the chosen soup's, on the selection batches
  chosen = (("best ingredient", trace[0]["loss"]), ("greedy soup", best_soup))
  rows.extend({"seed": seed, "panel": "greedy selection", "method": m, "x": float(trace[0]["ingredient"]),
               "domain": "mean", "loss": v} for m, v in chosen)
  for name in ("base", "tuned_shakespeare", "tuned_python"):
    measure(p[name], "task", name, 1.0)
  tuned = [p["tuned_shakespeare"], p["tuned_python"]]
  key = jax.random.key(seed)
  for method in TASK_METHODS:
    for density in (s["densities"] if method != "task_arithmetic" else (1.0,)):
      params = {"normalize": True} if method == "task_arithmetic" else {"normalize": True, "density": density}
      measure(merge_ops.merge(method, tuned, p["base"], key=key, **params), "task", method, density)
  return rows


def best_ingredient(rows: list[dict], seed: int) -> int:
  """The index of seed's ingredient with the lowest loss on the selection batches."""
  return int(next(r["x"] for r in rows if r["seed"] == seed and r["panel"] == "greedy selection"
                  and r["method"] == "best ingredient"))


def summary(fig: Figure, rows: list[dict], seeds) -> tuple[str, list[dict]]:
  """Mean ± SE per point, and the three claims paired by seed (separated: |effect| > 2 SE)."""
  at = lambda seed, panel, method, x=None, domain="mean": next(
      (r["loss"] for r in rows if r["seed"] == seed and r["panel"] == panel and r["method"] == method
       and r["domain"] == domain and (x is None or abs(r["x"] - x) < 1e-9)), np.nan)
  alphas = sorted({r["x"] for r in rows if r["panel"] == "interpolation"})
  bar = {pair: {s: barrier(alphas, [at(s, "interpolation", pair, a) for a in alphas]) for s in seeds}
         for pair in ("one base", "different inits")}
  best = {s: at(s, "soup", f"ft_{best_ingredient(rows, s)}") for s in seeds}
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
  lines.append(f"| best ingredient (chosen on the selection batches) | {len(best)} | {fmt(*mean_se(best.values()))} |")
  for m, v in soup.items():
    lines.append(f"| {m} | {len(v)} | {fmt(*mean_se(v.values()))} |")
  for m in TASK_METHODS:
    for d in (dens if m != "task_arithmetic" else (1.0,)):
      v = [at(s, "task", m, d) for s in seeds]
      lines.append(f"| {m}{'' if m == 'task_arithmetic' else f' density {d}'} | {len(v)} | {fmt(*mean_se(v))} |")
  for name in ("base", "tuned_shakespeare", "tuned_python"):
    for dom in (*(domain_name(d) for d in domains(fig.plan["size"])), "mean"):
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
  plot_merges(os.path.join(root, "merging_merges.png"), fig, rows)
  return claims


def _per_seed(rows: list[dict], panel: str, method: str, domain: str = "mean") -> dict[float, dict[int, float]]:
  """{x: {seed: loss}} of one method's points."""
  out: dict[float, dict[int, float]] = {}
  for r in rows:
    if r["panel"] == panel and r["method"] == method and r["domain"] == domain:
      out.setdefault(round(r["x"], 9), {})[r["seed"]] = r["loss"]
  return out


def _curve(by_x: dict[float, dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  xs = sorted(by_x)
  m, se = mean_se_curve([list(by_x[x].values()) for x in xs])
  return np.array(xs), m, se


def plot_merges(path: str, fig: Figure, rows: list[dict]) -> list[plots.Drawn]:
  """Six panels, mean ± SE over seeds. Top: the losses (interpolation; ingredients and soups; task
  merges against density). Bottom: what each claim compares, paired by seed: the loss above the
  line between the end points (the barrier's integrand), soup minus the best ingredient, merge
  minus task arithmetic. Returns what it drew."""
  plt = plots.pyplot()
  seeds = sorted({r["seed"] for r in rows})
  f, ((ax, bx, cx), (dx, ex, fx)) = plt.subplots(2, 3, figsize=(16, 8.6))
  drawn = []
  for i, pair in enumerate(("one base", "different inits")):
    by_x = _per_seed(rows, "interpolation", pair)
    x, m, se = _curve(by_x)
    label = f"{'ft_0 -> ft_1' if i == 0 else 'ft_0 -> scratch'} ({pair})"
    drawn.append(plots.band(ax, x, m, se, label=label, series=pair, panel="interpolation", ms=3, **plots.arm_style(i)))
    ends = {s: (by_x[x[0]][s], by_x[x[-1]][s]) for s in seeds}
    excess = {a: {s: by_x[a][s] - ((1 - a) * ends[s][0] + a * ends[s][1]) for s in seeds} for a in x}
    drawn.append(plots.band(dx, *_curve(excess), label=label, series=pair, panel="above the line", ms=3,
                            **plots.arm_style(i)))
  plots.style_axes(ax, "interpolation weight a", "validation loss, mean of domains", "linear mode connectivity",
                   legend_size=8)
  dx.axhline(0.0, color="0.3", lw=0.8)
  plots.style_axes(dx, "interpolation weight a", "L(a) - ((1 - a) L(0) + a L(1)), paired by seed",
                   "loss above the straight line (the barrier is its max)", legend_size=8)
  names = [f"ft_{k}" for k in range(fig.plan["ingredients"])] + ["uniform soup", "greedy soup"]
  for j, name in enumerate(names):  # one point per method, whatever x (the greedy soup's size) each seed had
    per_seed = {s: v for by_seed in _per_seed(rows, "soup", name).values() for s, v in by_seed.items()}
    m, se = mean_se(list(per_seed.values()))
    drawn.append(plots.points(bx, [j], [m], [se], label=name, series=name, panel="soups", **_point_style(j)))
  bx.set_xticks(range(len(names)), names, fontsize=8, rotation=20)
  plots.style_axes(bx, "", "validation loss, mean of domains", f"soups of {fig.plan['ingredients']} fine-tunes",
                   grid="y")
  best = {s: next(iter(_per_seed(rows, "soup", f"ft_{best_ingredient(rows, s)}").values()))[s] for s in seeds}
  for j, name in enumerate(("uniform soup", "greedy soup")):
    per_seed = {s: v for by_seed in _per_seed(rows, "soup", name).values() for s, v in by_seed.items()}
    m, se = mean_se([per_seed[s] - best[s] for s in seeds])
    drawn.append(plots.points(ex, [j], [m], [se], label=name, series=name, panel="soup - best",
                              **_point_style(len(names) - 2 + j)))
  ex.axhline(0.0, color="0.3", lw=0.8)
  ex.set_xticks([0, 1], ["uniform soup", "greedy soup"], fontsize=8)
  ex.set_xlim(-0.6, 1.6)
  plots.style_axes(ex, "", "soup - best ingredient, paired by seed",
                   "soup minus the best ingredient (chosen on the selection batches)", grid="y")
  ta = {s: v for by_seed in _per_seed(rows, "task", "task_arithmetic").values() for s, v in by_seed.items()}
  m, se = mean_se(list(ta.values()))
  cx.axhline(m, color="k", lw=1.2, label="task arithmetic (mean of task vectors)")
  cx.axhspan(m - np.nan_to_num(se), m + np.nan_to_num(se), color="k", alpha=0.1)
  drawn.append(plots.Drawn("task merges", "task_arithmetic", [1.0], [m], [float(np.nan_to_num(se))]))
  for i, method in enumerate(TASK_METHODS[1:], start=1):
    by_x = _per_seed(rows, "task", method)
    drawn.append(plots.points(cx, *_curve(by_x), label=method, series=method, panel="task merges",
                              **_point_style(i, line=True)))
    diff = {x: {s: v[s] - ta[s] for s in seeds} for x, v in by_x.items()}
    drawn.append(plots.points(fx, *_curve(diff), label=method, series=method, panel="merge - task arithmetic",
                              **_point_style(i, line=True)))
  for name, style in (("tuned_shakespeare", ":"), ("tuned_python", "--")):
    m, _ = mean_se([v for by_seed in _per_seed(rows, "task", name).values() for v in by_seed.values()])
    cx.axhline(m, color="0.5", ls=style, lw=1, label=f"{name.replace('_', ' ')} (evaluated on both domains)")
  plots.style_axes(cx, "density (fraction of each task vector kept)", "validation loss, mean of domains",
                   "Shakespeare-tuned + Python-tuned, merged on base", legend_size=7)
  fx.axhline(0.0, color="k", lw=1.2)
  plots.style_axes(fx, "density (fraction of each task vector kept)", "merge - task arithmetic, paired by seed",
                   "each merge minus task arithmetic", legend_size=7)
  plots.save(f, path, f"{fig.title}: mean ± standard error over {len(seeds)} seeds")
  return drawn


def _point_style(i: int, line: bool = False) -> dict:
  st = plots.arm_style(i)
  return {"color": st["color"], "marker": st["marker"], "ls": st["ls"] if line else "none"}
