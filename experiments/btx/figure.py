"""Branch-Train-MiX (Sukhbaatar et al. 2024) vs sparse upcycling vs a linear merge of the branches
vs dense continuation, at matched training tokens after a shared dense seed.

Arms (d=128, 2 layers, dense seed; d=64 in --quick). Every MoE has E=2 experts in every layer,
top-1 Switch gating ('softmax_topk': the expert's output times its router probability):
  seed        dense, trained S steps on Shakespeare + Python (50/50) (not plotted);
  dense       the seed continued T = 2M + K steps on the same mixture (one cosine over S + T);
  upcycle     the seed's MLPs upcycled to 2 experts (sparse upcycling), trained T steps;
  btx         two branches from the seed, M steps each on one domain (Shakespeare, Python), mixed
              (branch e's MLP = expert e, the rest averaged, hidden-state router: each layer's
              mean MLP input per domain), then K steps on the mixture (fresh optimizer);
  btx_random  the same with a random router;
  btm         the two branches (btx's, read only) averaged into one dense model (a linear
              merge, Branch-Train-Merge-style), then K steps on the mixture;
  rebake      the distilled re-bake: btx's final MoE -> a dense student of the seed's size
              (`to_dense`, k=1: each layer's most-loaded expert), trained R more steps with
              distillation from the frozen btx MoE (weight 0.5, T 1);
  rebake_plain  the same student, the same R steps and tokens, no teacher.
Every arm trains on 2M + K batches after the seed (the branches' tokens included); the x axis
counts training FLOPs after the seed (moegrow.flops). `routing_report` measures, at the end, the
fraction of each domain's validation tokens whose top-1 expert is each expert, per layer
(btx_routing.csv, btx_routing.png), next to the same at the mix (from btx.json).
"""
from __future__ import annotations

import copy
import json
import os

import ml_collections
import numpy as np

from experiments import plots, pod
from experiments.harness import (Arm, Claim, Figure, flops_per_step, format_mean_se, mean_se, read_csv_rows, run_dir,
                                 size_name, table_head, write_csv, write_summary)
from moegrow.configs import lm
from moegrow.data import domain_name
from moegrow.orchestrate import parts
from moegrow.orchestrate.branching import mixed_run_config

OLD, NEW = "shakespeare_plays", "python_stdlib"
MIX = {OLD: 0.5, NEW: 0.5}
MOE = dict(layers="all", num_experts=2, top_k=1, gating="softmax_topk")
SIZES = {
    # evaluated every 100 steps and at every run's end (every 50 until 2026-12-06: 36 minutes)
    "small": dict(seed_steps=150, branch_steps=100, mix_steps=100, rebake_steps=100, eval_batches=64,
                  log_every=25, eval_every=100),
    "quick": dict(seed_steps=4, branch_steps=3, mix_steps=3, rebake_steps=2, eval_batches=1, log_every=1,
                  eval_every=3),
    # configs/lm.py:pod's model made dense (d=1024, 16 layers, bfloat16: 0.2B parameters) as the
    # seed, sequence 2048, batch 512, on C4 + code (50/50): seed 10k steps (10B tokens), branches
    # 5k each, the mix 5k, the re-bake 5k; v5e-64, expert axis 2. Why: BTX's gain over dense
    # continuation and upcycling comes from branches that become domain experts on billions of
    # tokens each (Sukhbaatar et al. 2024: Llama-2 7B, 3 branches); the CPU branches train 100 steps.
    "pod": dict(seed_steps=10_000, branch_steps=5_000, mix_steps=5_000, rebake_steps=5_000, eval_batches=8,
                log_every=100, eval_every=1000, warmup_steps=1000, topology="v5e-64",
                mesh=dict(data=-1, fsdp=8, expert=2)),
}
ROUTED = ("btx", "btx_random", "upcycle")
# every code path: start_from, BTX, reused branches, merge, re-bake
QUICK_ARMS = ("seed", "dense", "btx", "btx_random", "btm", "rebake")


def domains(size: str) -> tuple[str, str]:
  """The two domains (datasets) at `size`: the local corpora, or C4 and code at pod (the arms and
  branches keep their names: the 'shakespeare' branch trains on C4, 'python' on code)."""
  return pod.domains(size, (OLD, NEW))


def base_config(size: str) -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"experiments/btx: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  steps = s["seed_steps"] + 2 * s["branch_steps"] + s["mix_steps"]
  if size == "pod":
    c = pod.base_config(dict.fromkeys(domains(size), 0.5))
    c.mesh.update(s["mesh"])
    c.train.update(steps=steps, warmup_steps=s["warmup_steps"], log_every=s["log_every"], eval_every=s["eval_every"],
                   eval_batches=s["eval_batches"], checkpoint_every=s["branch_steps"], keep_checkpoints=2)
    return c
  c = lm.get_config("tiny")
  if size != "quick":
    c.model.update(d_model=128, num_heads=4, d_ff=512)
  c.data.mixture = ml_collections.ConfigDict(MIX)
  c.train.update(steps=steps, batch_size=16,
                 warmup_steps=2 if size == "quick" else 10, log_every=s["log_every"], eval_every=s["eval_every"],
                 eval_batches=s["eval_batches"], eval_batch_size=16, checkpoint_every=10_000, keep_checkpoints=2)
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed and resolves 'arm:' paths)."""
  s = SIZES[size]
  n, t = s["seed_steps"], 2 * s["branch_steps"] + s["mix_steps"]
  first, second = domains(size)
  out = {"seed": base_config(size), "dense": base_config(size)}
  up = base_config(size)
  up.stages = (dict(name="seed", steps=n), dict(name="upcycled", steps=t, ops=(dict(op="upcycle", **MOE),)))
  out["upcycle"] = up
  for name, router in (("btx", "hidden"), ("btx_random", "random")):
    c = base_config(size)
    c.train.steps = s["mix_steps"]
    c.btx = dict(seed=f"arm:seed/checkpoints/{n}",
                 branches=[dict(name="shakespeare", mixture={first: 1.0}, steps=s["branch_steps"]),
                           dict(name="python", mixture={second: 1.0}, steps=s["branch_steps"])],
                 layers=MOE["layers"], top_k=MOE["top_k"], gating=MOE["gating"], router=router)
    out[name] = c
  btm = base_config(size)
  btm.train.steps = s["mix_steps"]
  btm.merge = dict(sources=("arm:btx/branches/shakespeare", "arm:btx/branches/python"), base="", method="linear",
                   params={}, overrides=[], seed=0)
  out["btm"] = btm
  for name, kl_weight in (("rebake", 0.5), ("rebake_plain", 0.0)):
    c = mixed_run_config(out["btx"])
    rebake = dict(name="rebake", steps=s["rebake_steps"], ops=(dict(op="to_dense", k=1),))
    if kl_weight:
      rebake["distill"] = dict(weight=kl_weight, temperature=1.0)
    c.stages = (dict(name="btx", steps=s["mix_steps"]), rebake)
    c.train.steps = 0  # the stages' total
    out[name] = c
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  quick = size == "quick"
  s, cfgs = SIZES[size], configs(size)
  n, m = s["seed_steps"], s["branch_steps"]
  dense_step = flops_per_step(parts.model_config(cfgs["seed"]), cfgs["seed"])
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  before = (n + 2 * m) * dense_step  # the seed's and both branches' FLOPs
  arms = [Arm("seed", make("seed"), end_step=n, plotted=False),
          Arm("dense", make("dense"), "dense continuation", start_from="seed", start_step=n),
          Arm("upcycle", make("upcycle"), "sparse upcycling", start_from="seed", start_step=n),
          Arm("btx", make("btx"), "BTX (hidden-state router)", flops_before=before),
          # the same branches as btx's (same seed, data and steps): copied, not trained again
          Arm("btx_random", make("btx_random"), "BTX (random router)", flops_before=before,
              reuse=("btx/branches",)),
          Arm("btm", make("btm"), "linear merge of the branches (BTM)", flops_before=before),
          Arm("rebake", make("rebake"), "re-baked dense student (distilled)", start_from="btx",
              start_step=s["mix_steps"], flops_before=before),
          Arm("rebake_plain", make("rebake_plain"), "re-baked dense student (no teacher)", start_from="btx",
              start_step=s["mix_steps"], flops_before=before)]
  arms = tuple(a for a in arms if not quick or a.name in QUICK_ARMS)
  names = {a.name for a in arms}
  claims = [Claim("BTX beats dense continuation", "btx", "dense"),
            Claim("BTX beats the linear merge of its branches", "btx", "btm"),
            Claim("BTX beats sparse upcycling", "btx", "upcycle"),
            Claim("hidden-state router init beats a random router", "btx", "btx_random"),
            Claim("BTX beats dense continuation on Python", "btx", "dense", domain_name(domains(size)[1])),
            Claim("BTX beats dense continuation on Shakespeare", "btx", "dense", domain_name(domains(size)[0])),
            Claim("the distilled re-bake beats the same student without a teacher", "rebake", "rebake_plain"),
            Claim("the distilled re-bake beats dense continuation", "rebake", "dense")]
  claims = tuple(c for c in claims if c.better in names and c.worse in names)
  plan = {"size": size, "arms": sorted(names), "seed_steps": n, "branch_steps": m, "mix_steps": s["mix_steps"],
          "rebake_steps": s["rebake_steps"],
          "eval_batches": s["eval_batches"], "moe": MOE}
  return Figure("btx", f"Branch-Train-MiX vs upcycling vs merging ({size})", arms, claims, plan=plan,
                x_origin=n * dense_step, x_label="training FLOPs after the seed", extra_report=routing_report,
                replot=lambda fig, root: plot_routing(os.path.join(root, "btx_routing.png"), fig, read_csv_rows(
                    os.path.join(root, "btx_routing.csv"))))


# ---------------------------------------------------------------- routing

def routing_rows(fig: Figure, root: str, seed: int) -> list[dict]:
  """Per routed arm, layer, domain and expert: the fraction of the domain's validation tokens whose
  top-1 expert it is, at the end of training and (BTX arms) at the mix."""
  from moegrow.orchestrate import merging
  from moegrow.train import probes

  size = fig.plan["size"]
  rows = []
  for arm in [a for a in ROUTED if a in fig.plan["arms"]]:
    config = configs(size)[arm]
    config.train.seed = seed
    if "btx" in config:
      config = mixed_run_config(config)
    cfg = parts.resolve_stages(config, parts.model_config(config))[-1].cfg
    mesh = parts.make_mesh(config)
    evals = parts.eval_sets(config, [OLD, NEW])
    params = merging.restore_params(run_dir(root, arm, seed), mesh, parts.stage_train(
        config.train, parts.resolve_stages(config, parts.model_config(config))[-1]))[0]
    report = probes.routing_report(cfg, params, evals, mesh, {})
    for dom, layers in report.items():
      for layer, v in layers.items():
        rows += [{"arm": arm, "seed": seed, "when": "end", "layer": int(layer), "domain": dom, "expert": e,
                  "fraction": f} for e, f in enumerate(v["load"])]
    cert = os.path.join(run_dir(root, arm, seed), "btx.json")
    if os.path.exists(cert):
      with open(cert) as f:
        at_mix = json.load(f)["routing"]
      rows += [{"arm": arm, "seed": seed, "when": "mix", "layer": int(layer), "domain": dom, "expert": e,
                "fraction": frac} for dom, layers in at_mix.items() for layer, load in layers.items()
               for e, frac in enumerate(load)]
  return rows


def routing_report(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Write btx_routing.csv and btx_routing.png (mean over seeds), and print the own-expert share."""
  rows = [r for seed in seeds for r in routing_rows(fig, root, seed)]
  write_csv(os.path.join(root, "btx_routing.csv"), rows, ["arm", "seed", "when", "layer", "domain", "expert",
                                                          "fraction"])
  lines = ["", "Routing: fraction of each domain's validation tokens sent to 'its own' expert (expert 0 for",
           "Shakespeare, 1 for Python: the branch it came from), mean over layers, mean ± SE over seeds:", "",
           *table_head("arm", "when", "Shakespeare -> expert 0", "Python -> expert 1")]
  for arm in ROUTED:
    for when in ("mix", "end"):
      own = {}
      for dom, e in ((OLD, 0), (NEW, 1)):
        per_seed = [[r["fraction"] for r in rows if r["arm"] == arm and r["when"] == when and
                             r["domain"] == dom and r["expert"] == e and r["seed"] == s] for s in seeds]
        per_seed = [float(np.mean(x)) for x in per_seed if x]
        own[dom] = mean_se(per_seed)
      if own[OLD][0] == own[OLD][0]:
        lines.append(f"| {arm} | {when} | {format_mean_se(*own[OLD], '.3f')} | {format_mean_se(*own[NEW], '.3f')} |")
  write_summary(os.path.join(root, "summary.md"), "\n".join(lines) + "\n", append=True)
  plot_routing(os.path.join(root, "btx_routing.png"), fig, rows)
  return rows


def plot_routing(path: str, fig: Figure, rows: list[dict]) -> list[plots.Drawn]:
  """One heatmap per (arm, when): the fraction of each domain's tokens each expert gets, per layer,
  mean over seeds, with its standard error in every cell. Returns what it drew."""
  plt = plots.pyplot()
  panels = [(a, w) for a in ROUTED for w in ("mix", "end") if any(r["arm"] == a and r["when"] == w for r in rows)]
  layers = sorted({r["layer"] for r in rows})
  seeds = sorted({r["seed"] for r in rows})
  f, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 1.2 + 0.75 * len(layers) * 2), squeeze=False)
  drawn = []
  for ax, (arm, when) in zip(axes[0], panels):
    grid = np.zeros((2 * len(layers), 2))
    for li, layer in enumerate(layers):
      for di, dom in enumerate((OLD, NEW)):
        for e in range(2):
          per_seed = [r["fraction"] for r in rows if r["arm"] == arm and r["when"] == when and r["layer"] == layer
                      and r["domain"] == dom and r["expert"] == e]
          m, se = mean_se(per_seed)
          grid[2 * li + di, e] = m
          panel = f"{arm}, {when}"
          drawn.append(plots.Drawn(panel, f"L{layer} {dom} -> expert {e}", [0.0], [m], [float(np.nan_to_num(se))]))
          ax.text(e, 2 * li + di, f"{m:.2f}\n± {np.nan_to_num(se):.2f}", ha="center", va="center",
                  color="w" if m < 0.6 else "k", fontsize=7.5)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks([0, 1], ["expert 0", "expert 1"], fontsize=8)
    ax.set_yticks(range(2 * len(layers)), [f"L{l} {d[:6]}" for l in layers for d in (OLD, NEW)]
                  if ax is axes[0][0] else [], fontsize=8)  # one row of labels: the panels share them
    ax.set_title(f"{arm}, {'at the mix' if when == 'mix' else 'after training'}", fontsize=9)
  f.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="fraction of the domain's tokens (top-1)")
  f.suptitle(f"{fig.title}: routing per domain, mean ± SE over {len(seeds)} seeds", fontsize=10, y=1.02)
  plots.save(f, path, tight_bbox=True)
  return drawn
