"""Function-preserving growth vs non-preserving growth: the loss spike at the growth step.

MSG (Yao et al. 2024, arXiv 2305.02869) and Net2Net (Chen et al. 2016): growth that keeps the
function (Net2Wider copies, new blocks with zero output projections, or MSG's masks ramping new
units in) avoids the loss spike that non-preserving growth causes, recovers at once, and ends at an
equal or lower loss at matched FLOPs.

Every arm is a dense byte-level LM on the Shakespeare + Python mixture (configs/lm.py `tiny`:
d=64, 2 heads; d_ff 128, 2 layers). `small` trains S + M steps with a no-op stage boundary at S
(the same data and schedule as the grown arms; its certificate is the no-growth control). Every
grown arm starts from small's checkpoint at step S (same seed) and grows there:
  wide_exact     widen_mlp d_ff 128 -> 256, Net2Wider copies (outgoing rows halved): exact;
  wide_random    widen_mlp method='fresh': new units at init scale, no mask (not preserving:
                 MSG's baseline);
  wide_noisy     (full size) Net2Wider copies + noise_std=3: each new unit's input weights are its
                 source's plus Gaussian noise of 3x the matrix's std (strongly non-preserving);
  wide_ramped    widen_mlp with ramp_steps=N (MSG): new units at init scale, their output rows
                 times a mask 0 -> 1 over N steps (exact at the boundary);
  deep_exact     insert_blocks at positions (2, 3): 2 -> 4 layers, zero output projections: exact;
  deep_random    insert_blocks (2, 3) init='random': output projections at init scale, no mask
                 (not preserving: MSG's baseline);
  deep_stack     (full size) stack (G_stack, Du et al. 2024): layers 2, 3 copy 0, 1 (not preserving);
  deep_ramped    insert_blocks (2, 3) with ramp_steps=N (MSG): output projections at init scale
                 behind a mask 0 -> 1 over N steps;
  wide_scratch / deep_scratch (full size only): the grown architectures trained from scratch for
                 the steps that spend the grown arms' FLOPs (harness.matched_steps).
Same seed = same stage-0 model and the same data order; one cosine schedule over S + M steps.

NOTE: measured once (seed 0, the small model at step 150, held-out loss 2.697 on the run's 4 x 16
eval rows per domain): fresh units without a mask change it by only +0.0017 (widen) and +0.0001
nats (insert), since init-scale units are small next to trained ones; noisy copies by +0.024
(σ=1) and +0.615 (σ=3); G_stack by +0.070. The full figure runs both kinds of non-preserving
growth: fresh units (MSG's baseline) and copies (noisy Net2Wider, G_stack).

The spike (per run, `spike.csv`; ℓ_t = the training loss logged at step t, i.e. the loss of the
parameters after t-1 steps on batch t; w = the smoothing window):
  cert_before / cert_after / cert_change   the growth certificate (<run>/growth/<S>.json): held-out
                 loss of the model at step S before and after the growth ops (mean over domains);
  train_before   mean of ℓ over steps S-w+1..S (the small model's last w steps: "loss at S-1");
  train_next     ℓ_{S+1}: the grown model's first training batch ("loss at S+1");
  train_peak     max of ℓ over steps S+1..S+K (K = the ramp length N); spike = train_peak - train_before;
  recover_steps  the first k >= 1 with mean(ℓ_{S+k..S+k+w-1}) <= train_before (nan: never);
  final_loss     the last held-out evaluation (mean over domains); final_flops its training FLOPs.
The training losses before S come from small's log of the same seed (the grown runs start at S).
"""
from __future__ import annotations

import copy
import json
import math
import os

import ml_collections
import numpy as np

from experiments import harness, plots, pod
from experiments.harness import (Arm, Claim, Figure, by_arm, domain_mean, format_mean_se, mean_se_curve,
                                 mean_se_fields, paired_effect, read_evals, run_dir, size_name, table_head, write_csv,
                                 write_summary)
from moegrow.configs import lm
from moegrow.orchestrate import parts

SIZES = {
    "small": dict(d_model=64, num_heads=2, d_ff=128, small_steps=150, grown_steps=150, ramp_steps=20,
                  window=10, batch_size=16, warmup=10, log_every=1, eval_every=10, eval_batches=4),
    "quick": dict(d_model=32, num_heads=2, d_ff=32, small_steps=4, grown_steps=4, ramp_steps=2,
                  window=1, batch_size=8, warmup=2, log_every=1, eval_every=4, eval_batches=1),
    # configs/lm.py:pod's model made dense (d=1024, 16 layers, d_ff 4096, bfloat16: 0.2B
    # parameters), sequence 2048, batch 512, on C4; grown after 10k steps (10B tokens) to d_ff 8192
    # or 32 layers, 10k steps more; v5e-64. Why: MSG's and Net2Net's spikes are measured on models
    # trained long enough that new, unmasked units disturb a function the model has learned (Yao
    # et al. 2024: BERT-large and GPT-2-sized models); at the CPU size fresh units move the loss by
    # 0.002 nats. The training loss is logged every step: the spike is a per-step quantity.
    "pod": dict(d_model=1024, num_heads=16, d_ff=4096, small_steps=10_000, grown_steps=10_000, ramp_steps=1000,
                window=50, batch_size=512, warmup=1000, log_every=1, eval_every=1000, eval_batches=8,
                eval_batch_size=64, num_layers=16, topology="v5e-64"),
}
WIDE_NOISE = 3.0  # wide_random: noise_std of widen_mlp (relative to each weight matrix's std)


def depth_positions(size: str) -> tuple[int, ...]:
  """insert_blocks' positions at `size`: L new blocks on top of the L old ones (L = 2 but at pod),
  the layout G_stack gives."""
  n = SIZES[size].get("num_layers", 2)
  return tuple(range(n, 2 * n))


GROWN = ("wide_exact", "wide_random", "wide_ramped", "deep_exact", "deep_random", "deep_ramped")
COPIES = ("wide_noisy", "deep_stack")  # full size only: non-preserving copies
SCRATCH = ("wide_scratch", "deep_scratch")
LABELS = {
    "small": "small, no growth",
    "wide_exact": "widen x2, Net2Wider (exact)",
    "wide_random": "widen x2, fresh units, no mask (not preserving)",
    "wide_noisy": f"widen x2, noisy copies σ={WIDE_NOISE} (not preserving)",
    "wide_ramped": "widen x2, ramped mask (MSG)",
    "deep_exact": "2 -> 4 layers, zero-output blocks (exact)",
    "deep_random": "2 -> 4 layers, random-init blocks, no mask (not preserving)",
    "deep_stack": "2 -> 4 layers, G_stack copies (not preserving)",
    "deep_ramped": "2 -> 4 layers, ramped mask (MSG)",
    "wide_scratch": "wide model from scratch (matched FLOPs)",
    "deep_scratch": "deep model from scratch (matched FLOPs)",
}


def growth_ops(arm: str, size: str) -> tuple:
  """The growth ops of arm `arm` at step S ('small': none)."""
  s = SIZES[size]
  n, f2 = s["ramp_steps"], 2 * s["d_ff"]
  ops = {
      "small": (),
      "wide_exact": (dict(op="widen_mlp", d_ff=f2, method="round_robin"),),
      "wide_random": (dict(op="widen_mlp", d_ff=f2, method="fresh"),),
      "wide_noisy": (dict(op="widen_mlp", d_ff=f2, method="round_robin", noise_std=WIDE_NOISE),),
      "wide_ramped": (dict(op="widen_mlp", d_ff=f2, ramp_steps=n),),
      "deep_exact": (dict(op="insert_blocks", positions=depth_positions(size)),),
      "deep_random": (dict(op="insert_blocks", positions=depth_positions(size), init="random"),),
      "deep_stack": (dict(op="stack", times=2),),
      "deep_ramped": (dict(op="insert_blocks", positions=depth_positions(size), ramp_steps=n),),
  }
  if arm not in ops:
    raise ValueError(f"experiments/preserving: unknown growth arm {arm!r}; use {sorted(ops)}")
  return ops[arm]


def base_config(size: str) -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"experiments/preserving: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  if size == "pod":
    c = pod.base_config()
  else:
    c = lm.get_config("tiny")  # dense, 2 layers, byte vocabulary, seq 64, both corpora 50/50
  c.model.update(d_model=s["d_model"], num_heads=s["num_heads"], d_ff=s["d_ff"])
  c.train.update(steps=0, batch_size=s["batch_size"], warmup_steps=s["warmup"], log_every=s["log_every"],
                 eval_every=s["eval_every"], eval_batches=s["eval_batches"],
                 eval_batch_size=s.get("eval_batch_size", 16), checkpoint_every=10_000, keep_checkpoints=2)
  if size == "quick":  # one device, whatever the process simulates: fewer, smaller programs to compile
    c.mesh.update(data=1, num_devices=1)
  return c


def grown_config(arm: str, size: str) -> ml_collections.ConfigDict:
  """Small for S steps, then `arm`'s growth ops and M steps (one schedule over S + M)."""
  s = SIZES[size]
  c = base_config(size)
  c.stages = (dict(name="small", steps=s["small_steps"]),
              dict(name=arm if arm != "small" else "small_cont", steps=s["grown_steps"], ops=growth_ops(arm, size)))
  return c


def scratch_config(arm: str, size: str) -> ml_collections.ConfigDict:
  """The grown architecture of `arm`'s kind from scratch, for the steps that spend its FLOPs."""
  grown = grown_config("wide_exact" if arm == "wide_scratch" else "deep_exact", size)
  plan = parts.resolve_stages(grown, parts.model_config(grown))
  c = base_config(size)
  big = plan[-1].cfg
  c.model.update(d_ff=big.d_ff, num_layers=big.num_layers)
  c.train.steps = harness.matched_steps(harness.flops_at(grown, plan[-1].end, plan), big, c)
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed)."""
  out = {name: grown_config(name, size) for name in ("small",) + GROWN + (COPIES if size != "quick" else ())}
  out.update({name: scratch_config(name, size) for name in SCRATCH})
  return out


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  quick = size == "quick"
  s, cfgs = SIZES[size], configs(size)
  S = s["small_steps"]
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  arms = [Arm("small", make("small"), LABELS["small"])]
  arms += [Arm(name, make(name), LABELS[name], start_from="small", start_step=S)
           for name in GROWN + (() if quick else COPIES)]
  if not quick:
    arms += [Arm(name, make(name), LABELS[name]) for name in SCRATCH]
  claims = [Claim("exact Net2Wider ends lower than widening with fresh unmasked units", "wide_exact", "wide_random"),
            Claim("ramped (MSG) widening ends lower than non-preserving widening", "wide_ramped", "wide_random"),
            Claim("zero-output block insertion ends lower than random-init blocks", "deep_exact", "deep_random"),
            Claim("ramped (MSG) block insertion ends lower than random-init blocks", "deep_ramped", "deep_random")]
  if not quick:
    claims += [Claim("exact Net2Wider ends lower than noisy (non-preserving) copies", "wide_exact", "wide_noisy"),
               Claim("zero-output block insertion ends lower than G_stack copies", "deep_exact", "deep_stack"),
               Claim("exact widening at least matches the wide model from scratch (matched FLOPs)", "wide_exact",
                     "wide_scratch"),
               Claim("exact deepening at least matches the deep model from scratch (matched FLOPs)", "deep_exact",
                     "deep_scratch")]
  plan = {"size": size, **s, "wide_noise": WIDE_NOISE, "depth_positions": depth_positions(size),
          "arms": [a.name for a in arms],
          "scratch_steps": {n: int(cfgs[n].train.steps) for n in SCRATCH}}
  return Figure("preserving", f"Function-preserving vs non-preserving growth ({size})", tuple(arms), tuple(claims),
                plan=plan, x_label="training FLOPs", extra_report=spike_report)


# ---------------------------------------------------------------- the spike

SPIKE_COLS = ["arm", "seed", "kind", "method", "growth_step", "cert_before", "cert_after", "cert_change",
              "train_before", "train_next", "train_peak", "spike", "recover_steps", "final_loss", "final_flops"]


def train_losses(workdir: str) -> dict[int, float]:
  """step -> training loss from a run's metrics.jsonl (rows with a 'loss' key; a resumed step's
  last row wins)."""
  return {int(r["step"]): float(r["loss"]) for r in harness.metrics_rows(workdir) if "loss" in r}


def spike_numbers(losses: dict[int, float], S: int, window: int, peak_steps: int) -> dict[str, float]:
  """train_before, train_next, train_peak, spike, recover_steps from the training losses
  {step: ℓ_step} around the growth step S (definitions: the module docstring)."""
  nan = math.nan
  before = [losses.get(t, nan) for t in range(S - window + 1, S + 1)]
  train_before = float(np.mean(before))
  peak = [losses[t] for t in range(S + 1, S + peak_steps + 1) if t in losses]
  train_peak = max(peak) if peak else nan
  recover = nan
  last = max(losses, default=S)
  for k in range(1, last - S - window + 2):
    ahead = [losses.get(t, nan) for t in range(S + k, S + k + window)]
    if float(np.mean(ahead)) <= train_before:
      recover = float(k)
      break
  return {"train_before": train_before, "train_next": losses.get(S + 1, nan), "train_peak": train_peak,
          "spike": train_peak - train_before, "recover_steps": recover}


def certificate(workdir: str, step: int) -> dict | None:
  path = os.path.join(workdir, "growth", f"{int(step)}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def spike_rows(fig: Figure, root: str, seeds) -> list[dict]:
  """One row per run: the boundary (certificate), the training-loss spike and recovery, the end."""
  p = fig.plan
  S, w, K = p["small_steps"], p["window"], p["ramp_steps"]
  nan = math.nan
  rows = []
  for arm in fig.arms:
    for seed in seeds:
      wd = run_dir(root, arm.name, seed)
      ev = read_evals(wd)
      if not ev:
        continue
      config = harness.trained_config(harness.arm_config(fig, arm, seed, ""))
      end = max(ev)
      kind, _, method = arm.name.partition("_")
      row = {"arm": arm.name, "seed": int(seed), "kind": "none" if arm.name == "small" else kind,
             "method": "none" if arm.name == "small" else method,
             "final_loss": domain_mean(ev[end]), "final_flops": harness.flops_at(config, end)}
      cert = certificate(wd, S)
      if arm.name in SCRATCH or cert is None:
        row.update({k: nan for k in SPIKE_COLS if k not in row and k not in ("growth_step",)})
        row["growth_step"] = ""
        rows.append(row)
        continue
      doms = sorted(cert["loss_before"])
      row.update(growth_step=S,
                 cert_before=float(np.mean([cert["loss_before"][d] for d in doms])),
                 cert_after=float(np.mean([cert["loss_after"][d] for d in doms])),
                 cert_change=float(np.mean([cert["loss_change"][d] for d in doms])))
      # steps <= S: the shared small model (small's log, same seed); steps > S: this run's own
      losses = ({t: v for t, v in train_losses(run_dir(root, "small", seed)).items() if t <= S}
                | {t: v for t, v in train_losses(wd).items() if t > S})
      row.update(spike_numbers(losses, S, w, K))
      rows.append(row)
  return rows


def spike_report(fig: Figure, root: str, seeds, data_dir: str = "") -> list[dict]:
  """Write spike.csv (per run), spike_summary.md (mean ± SE per arm + the spike's paired
  comparisons) and spike.png (training loss around the growth step); print the summary."""
  rows = spike_rows(fig, root, seeds)
  write_csv(os.path.join(root, "spike.csv"), rows, SPIKE_COLS)
  p = fig.plan
  keys = ("cert_change", "train_before", "train_next", "spike", "recover_steps", "final_loss")
  summary = []
  for arm, mine in by_arm(rows).items():
    e = {"arm": arm, "n": len(mine), **mean_se_fields(mine, keys)}  # nan, nan where a run has nan
    e.update({k + "_never": sum(1 for r in mine if r[k] != r[k]) for k in keys})
    summary.append(e)
  lines = [f"# {fig.title}: the loss spike at the growth step", "",
           f"Growth at step S = {p['small_steps']}; mean ± standard error over seeds. Δ cert = held-out loss change "
           "across the growth ops (growth certificate); ℓ before = mean training loss of "
           + (f"steps S-{p['window'] - 1}..S" if p["window"] > 1 else "step S") + "; ℓ at S+1 = the grown model's first training batch; spike = max ℓ over "
           f"S+1..S+{p['ramp_steps']} minus ℓ before; recover = steps until the mean of the next {p['window']} "
           "training losses is back at ℓ before; final = last held-out loss (mean over domains).", "",
           *table_head("arm", "seeds", "Δ cert", "ℓ before", "ℓ at S+1", "spike", "recover (steps)", "final loss")]
  fmt = lambda e, k, spec=".4f": format_mean_se(e[k], e[k + "_se"], spec)
  for e in summary:
    rec = fmt(e, "recover_steps", ".1f")
    if e["recover_steps_never"]:
      rec = f"never in {e['recover_steps_never']}/{e['n']} runs" if e["recover_steps_never"] == e["n"] else \
          f"{e['recover_steps_never']}/{e['n']} never"
    lines.append(f"| {e['arm']} | {e['n']} | {fmt(e, 'cert_change', '.6f')} | {fmt(e, 'train_before')} | "
                 f"{fmt(e, 'train_next')} | {fmt(e, 'spike')} | {rec} | {fmt(e, 'final_loss')} |")
  lines += ["", "The spike, paired by seed (effect = value(non-preserving) - value(preserving); > 0 supports the "
            "claim; separated when |effect| > 2 SE):", "",
            *table_head("comparison", "quantity", "seeds", "effect ± SE", "separated")]
  for kind in ("wide", "deep"):
    for good in ("exact", "ramped"):
      a, b = f"{kind}_{good}", f"{kind}_random"
      for q in ("train_next", "spike", "cert_change"):
        effect = paired_effect({r["seed"]: r[q] for r in rows if r["arm"] == a},
                               {r["seed"]: r[q] for r in rows if r["arm"] == b})
        if effect["n"]:
          lines.append(f"| {b} vs {a} | {q} | {effect['n']} | {format_mean_se(effect['effect'], effect['se'])} | "
                       f"{'yes' if effect['separated'] else 'no'} |")
  write_summary(os.path.join(root, "spike_summary.md"), "\n".join(lines) + "\n")
  plot_spike(os.path.join(root, "spike.png"), fig, root, seeds)
  return summary


def plot_spike(path: str, fig: Figure, root: str, seeds) -> list[plots.Drawn]:
  """Training loss around the growth step (mean over seeds ± SE), one panel per growth kind, every
  grown arm of that kind (the copies included), one style per arm. Returns what it drew."""
  plt = plots.pyplot()
  p = fig.plan
  S = p["small_steps"]
  lo, hi = max(1, S - 4 * p["ramp_steps"]), S + 6 * p["ramp_steps"]
  f, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
  small = {s: train_losses(run_dir(root, "small", s)) for s in seeds}
  drawn = []
  for ax, kind in zip(axes[0], ("wide", "deep")):
    names = ["small"] + [a.name for a in fig.arms if a.name in GROWN + COPIES and a.name.startswith(kind + "_")]
    for i, name in enumerate(names):
      per_seed = []
      for s in seeds:
        own = train_losses(run_dir(root, name, s))
        if not own:
          continue
        per_seed.append({t: (small[s].get(t) if t <= S else own.get(t)) for t in range(lo, hi + 1)})
      if not per_seed:
        continue
      steps = [t for t in range(lo, hi + 1) if all(d.get(t) is not None for d in per_seed)]
      m, se = mean_se_curve([[d[t] for d in per_seed] for t in steps])
      drawn.append(plots.band(ax, steps, m, se, label=f"{LABELS.get(name, name)} (n={len(per_seed)})", panel=kind,
                              series=name, lw=1.3, ms=3, markevery=max(1, len(steps) // 10), **plots.arm_style(i)))
    ax.axvline(S + 0.5, color="k", lw=0.7, ls="--")
    plots.style_axes(ax, "step", "training loss (nats/token)", f"{kind} growth at step {S}", legend_size=7)
  plots.save(f, path, f"{fig.title}: training loss around the growth step, mean ± SE over seeds")
  return drawn
