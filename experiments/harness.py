"""One experiment harness for every figure: arms x seeds, compute matching, resume, mean ± SE.

A figure is declarative (see experiments/upcycling/figure.py):

    Figure(name, title, arms=(Arm(name, config=lambda seed: <ConfigDict>, start_from=..., ...), ...),
           claims=(Claim(text, better="upcycled", worse="dense", domain="mean"), ...), plan={...})

`run(figure, argv)` is the whole command line (`--quick`, `--seeds 0,1,2`, `--workdir`,
`--data_dir`, `--stop_after_steps`):
  * every (arm, seed) is an ordinary moegrow workdir `<workdir>/<arm>/seed<k>`, trained by
    `moegrow.orchestrate.stages.train_and_evaluate` (growth stages included). A run that finished writes
    `done.json` and is never redone; an interrupted one resumes from its newest checkpoint. An arm
    with `start_from` begins from a copy of that arm's checkpoint (same seed) at `start_step`.
  * an arm's config may hold a `merge` section (merged once into step 0, then trained) or a `btx`
    section (moegrow.orchestrate.branching: branches, mix, MoE training); checkpoint paths in them
    written 'arm:<arm>/<rest>' name that arm's run of the same seed.
  * `plan.json` pins the figure's plan: a workdir written by another plan is refused.
  * compiled XLA programs are kept in `<workdir>/.xla_cache` (unless JAX_COMPILATION_CACHE_DIR
    names another cache), so every seed after the first, and a resumed figure, skips most
    compilation.
  * every evaluation of every run goes into one CSV `<name>.csv` (arm, seed, step, flops, x,
    domain, loss); `<name>.png` plots mean ± standard error over seeds against FLOPs;
    `summary.csv` / `summary.md` (also printed) hold each arm's final loss (mean ± SE) and, per
    claim, the effect `loss(worse) - loss(better)` paired by seed, its standard error
    `std(differences, ddof=1) / sqrt(n)`, and whether it is separated (|effect| > 2 SE).
FLOPs come from the one formula in `moegrow.flops` (`matched_steps` does compute matching); a
distilling stage also counts its teacher's forward pass on every batch (a third of a training step
of the teacher's model).
A figure's own report (`extra_report`) reuses the numbers here (`by_arm`, `mean_se_fields`,
`paired_effect`, `format_mean_se`, `table_head`, `write_summary`) and draws with experiments/plots.py.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import textwrap
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from experiments import plots
from moegrow import checkpoint
from moegrow.config import ModelConfig
from moegrow.flops import forward_flops_per_token, train_flops_per_token
from moegrow.orchestrate import parts, stages


@dataclasses.dataclass(frozen=True)
class Arm:
  """One curve of a figure. `config(seed)` is the complete run config (stages included);
  `start_from`: the arm whose run with the same seed provides the checkpoint at `start_step`
  this run starts from; `end_step`: the step at which the run counts as finished (default the
  config's last step; smaller for a run that stops partway through its own schedule); `reuse`:
  '<arm>/<subdir>' directories of another, finished arm's run (same seed) copied into this run
  before it starts, e.g. BTX branches that two arms would train identically."""
  name: str
  config: Callable[[int], ml_collections.ConfigDict]
  label: str = ""
  start_from: str | None = None
  start_step: int = 0
  end_step: int | None = None
  plotted: bool = True
  seed_offset: int = 0  # the run's train.seed is seed + seed_offset (another init and data order)
  flops_before: float = 0.0  # training FLOPs spent outside this run's own steps (e.g. BTX branches)
  reuse: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Claim:
  """A paper's claim as a comparison: `better` should end with a lower loss than `worse` on
  `domain` ('mean' = mean over domains)."""
  text: str
  better: str
  worse: str
  domain: str = "mean"


@dataclasses.dataclass(frozen=True)
class Figure:
  name: str
  title: str
  arms: tuple[Arm, ...]
  claims: tuple[Claim, ...]
  plan: dict  # JSON facts of the figure (steps, FLOPs); pinned in plan.json
  x_origin: float = 0.0  # FLOPs subtracted on the x axis (e.g. a shared checkpoint's sunk FLOPs)
  x_label: str = "training FLOPs"
  extra_report: Callable | None = None  # (figure, root, seeds, data_dir) -> anything: its own tables/plots
  replot: Callable | None = None  # (figure, root) -> list[plots.Drawn]: its own plots, from its CSVs in root


def size_name(size: bool | str) -> str:
  """A figure's size: True = 'quick' (tests), False = 'small' (the CPU run), or a name ('pod')."""
  return "quick" if size is True else "small" if size is False else str(size)


# ---------------------------------------------------------------- FLOPs

def flops_per_step(cfg: ModelConfig, config) -> float:
  """Training FLOPs of one step of `config`'s batch for model `cfg` (moegrow.flops.FORMULA)."""
  seq = int(config.data.seq_len)
  return train_flops_per_token(cfg, seq) * seq * int(config.train.batch_size)


def matched_steps(flops: float, cfg: ModelConfig, config) -> int:
  """Steps of model `cfg` that spend `flops` training FLOPs (rounded to the nearest step)."""
  return int(round(flops / flops_per_step(cfg, config)))


def teacher_flops_per_step(cfg: ModelConfig, config) -> float:
  """FLOPs of one forward pass of teacher model `cfg` over a step's batch of `config`."""
  seq = int(config.data.seq_len)
  return forward_flops_per_token(cfg, seq) * seq * int(config.train.batch_size)


def flops_at(config, step: int, plan: Sequence[parts.Stage] | None = None) -> float:
  """Training FLOPs a run of `config` has spent at global `step`, summed over its stages
  (`plan`: the config's resolved stages, if already at hand), a distilling stage's teacher forward
  passes included (the previous stage's model on every batch)."""
  plan = plan or parts.resolve_stages(config, parts.model_config(config))
  total = 0.0
  for st in plan:
    n = max(0, min(step, st.end) - st.start)
    total += n * flops_per_step(st.cfg, config)
    if (teacher := parts.teacher(st, plan)) is not None:
      total += n * teacher_flops_per_step(teacher, config)
  return total


# ---------------------------------------------------------------- runs

def size_arm_config(where: str, arg: str, sizes, configs: Callable[[str], dict]) -> ml_collections.ConfigDict:
  """The config of one arm named by a config file's `'<size>,<arm>'` argument; ValueError naming
  `where`, the sizes and the arms otherwise."""
  parts = arg.split(",")
  cfgs = configs(parts[0]) if len(parts) == 2 and parts[0] in sizes else {}
  if len(parts) != 2 or parts[1] not in cfgs:
    raise ValueError(f"{where}: expected '<size>,<arm>' with size in {sorted(sizes)} and arm in "
                     f"{sorted(cfgs or configs(min(sizes)))}, got {arg!r}")
  return cfgs[parts[1]]


def check_staged_arms(where: str, cfgs: dict, start: str, target: str, arms: Sequence[str], verb: str) -> None:
  """ValueError unless each of `arms` is a staged run whose first stage trains arm `start`'s model
  and whose last stage trains arm `target`'s model, ending where `start`'s run ends (so the arm may
  start from `start`'s checkpoint and be compared with `target` at equal steps)."""
  first, last = parts.model_config(cfgs[start]), parts.model_config(cfgs[target])
  for name in arms:
    plan = parts.resolve_stages(cfgs[name], parts.model_config(cfgs[name]))
    if plan[0].cfg != first or plan[-1].cfg != last or plan[-1].end != cfgs[start].train.steps:
      raise ValueError(f"{where}: arm {name} does not {verb} {start} into {target} over the same steps: "
                       + parts.config_diff(plan[-1].cfg, last))


def run_dir(root: str, arm: str, seed: int) -> str:
  return os.path.join(root, arm, f"seed{seed}")


def resolve_refs(config: ml_collections.ConfigDict, root: str, seed: int) -> None:
  """Checkpoint paths written 'arm:<arm>/<rest>' (in merge.sources, merge.base, btx.seed) become
  <root>/<arm>/seed<k>/<rest>: a merge or BTX arm reads other arms' runs of the same seed."""
  def path(v):
    if isinstance(v, str) and v.startswith("arm:"):
      arm, _, rest = v[4:].partition("/")
      return os.path.join(run_dir(root, arm, seed), rest)
    return v
  if "merge" in config:
    config.merge.sources = [path(v) for v in config.merge.sources]
    config.merge.base = path(config.merge.get("base", ""))
  if "btx" in config:
    config.btx.seed = path(config.btx.seed)


def arm_config(fig: Figure, arm: Arm, seed: int, data_dir: str, root: str = "") -> ml_collections.ConfigDict:
  c = arm.config(seed)
  c.train.seed = int(seed) + arm.seed_offset
  c.data.data_dir = data_dir
  resolve_refs(c, root, seed)
  return c


def trained_config(config) -> ml_collections.ConfigDict:
  """The config whose steps the run trains: a BTX config's mixed MoE run, else itself."""
  if "btx" in config:
    from moegrow.orchestrate import branching
    return branching.mixed_run_config(config)
  return config


def end_step(arm: Arm, config) -> int:
  """The arm's `end_step`, else the config's last step (its stages' end, or train.steps)."""
  if arm.end_step is not None:
    return arm.end_step
  config = trained_config(config)
  return parts.resolve_stages(config, parts.model_config(config))[-1].end


def train(config, workdir: str) -> dict:
  """Run one config: a BTX config end to end; a merge config merges (once), then trains; any
  other config trains (moegrow.orchestrate.stages)."""
  from moegrow.orchestrate import branching, merging
  if "btx" in config:
    return branching.btx_run(config, workdir)
  if "merge" in config and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    merging.merge_run(config, workdir)
  return stages.train_and_evaluate(config, workdir)


def run_one(fig: Figure, arm: Arm, seed: int, root: str, data_dir: str, stop_after_steps: int = 0) -> bool:
  """Train one (arm, seed) to its end (or `stop_after_steps` more steps). True if finished."""
  wd = run_dir(root, arm.name, seed)
  if os.path.exists(os.path.join(wd, "done.json")):
    print(f"[{arm.name} seed {seed}] finished earlier; skipping", flush=True)
    return True
  config = arm_config(fig, arm, seed, data_dir, root)
  end = end_step(arm, config)
  if arm.start_from:
    src = os.path.join(run_dir(root, arm.start_from, seed), "checkpoints", checkpoint.step_name(0, arm.start_step))
    checkpoint.seed_workdir(src, wd, arm.start_step)
  for ref in arm.reuse:
    copy_finished(root, ref, seed, wd)
  config.train.stop_at_step = end
  config.train.stop_after_steps = int(stop_after_steps)
  print(f"[{arm.name} seed {seed}] training in {wd} (to step {end})", flush=True)
  t0 = time.perf_counter()
  result = train(config, wd)
  finished = int(result["step"]) >= end and not result.get("preempted") and not result.get("btx_stopped_in")
  if finished:
    checkpoint.write_json(os.path.join(wd, "done.json"), {
        "step": int(result["step"]), "seconds": time.perf_counter() - t0,
        "final": {k: v for k, v in result.items() if k.startswith("eval/")}})
  return finished


def copy_finished(root: str, ref: str, seed: int, workdir: str) -> None:
  """Copy '<arm>/<subdir>' of that arm's finished run (same seed) to `workdir/<subdir>` unless it is
  there; the copy is written beside it and renamed, so a crash leaves nothing half-copied."""
  arm, sub = ref.split("/", 1)
  src, dst = os.path.join(run_dir(root, arm, seed), sub), os.path.join(workdir, sub)
  if os.path.exists(dst):
    return
  if not os.path.exists(os.path.join(run_dir(root, arm, seed), "done.json")) or not os.path.isdir(src):
    raise ValueError(f"reuse {ref!r}: {src} is not a finished run's directory (run arm {arm!r} first)")
  tmp = dst + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  os.replace(tmp, dst)
  print(f"[reuse] {src} -> {dst}", flush=True)


def _check_plan(root: str, fig: Figure) -> None:
  path = os.path.join(root, "plan.json")
  plan = json.loads(json.dumps(fig.plan))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != plan:
      raise ValueError(f"{path} was written by a different plan than this one "
                       f"(first difference in keys {sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))}); "
                       f"use another --workdir")
  else:
    checkpoint.write_json(path, plan)


# ---------------------------------------------------------------- results

def metrics_rows(workdir: str) -> list[dict]:
  """Every row of a run's metrics.jsonl, in order (none if it has no log; a torn last line of a
  killed run is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def read_evals(workdir: str) -> dict[int, dict[str, float]]:
  """step -> {domain: loss} from a run's metrics.jsonl (a resumed step's last row wins)."""
  out: dict[int, dict[str, float]] = {}
  for row in metrics_rows(workdir):
    for k, v in row.items():
      parts = k.split("/")
      if len(parts) == 3 and parts[0] == "eval" and parts[2] == "loss":
        out.setdefault(int(row["step"]), {})[parts[1]] = float(v)
  return out


def certificate_eval(workdir: str) -> dict[str, float] | None:
  """The step-0 evaluation of a run that starts from a merge (merge.json) or a BTX mix (btx.json)."""
  for name, key in (("merge.json", ("loss_result",)), ("btx.json", ("losses", "mix"))):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        out = json.load(f)
      for k in key:
        out = out[k]
      return {d: float(v) for d, v in out.items()}
  return None


def collect(fig: Figure, root: str, seeds: Sequence[int], data_dir: str = "") -> list[dict]:
  """Every evaluation of every plotted run: rows (arm, seed, step, flops, x, domain, loss),
  domain 'mean' = the mean over domains. A run started from another arm's checkpoint gets that
  run's evaluation at the start step as its first point; a run started from a merge or a BTX mix
  gets the certificate's evaluation of it at step 0."""
  arms = {a.name: a for a in fig.arms}
  rows = []
  for arm in fig.arms:
    if not arm.plotted:
      continue
    for seed in seeds:
      config = trained_config(arm_config(fig, arm, seed, data_dir, root))
      plan = parts.resolve_stages(config, parts.model_config(config))
      end = end_step(arm, config)
      ev = {s: e for s, e in read_evals(run_dir(root, arm.name, seed)).items() if s <= end}
      start = certificate_eval(run_dir(root, arm.name, seed))
      if start and 0 not in ev:
        ev[0] = start
      if arm.start_from:
        src = read_evals(run_dir(root, arms[arm.start_from].name, seed))
        if arm.start_step in src:
          ev = {arm.start_step: src[arm.start_step], **{s: e for s, e in ev.items() if s > arm.start_step}}
      for step in sorted(ev):
        flops = flops_at(config, step, plan) + arm.flops_before
        doms = dict(ev[step])
        doms["mean"] = domain_mean(doms)
        for dom, loss in doms.items():
          rows.append({"arm": arm.name, "seed": int(seed), "step": int(step), "flops": flops,
                       "x": flops - fig.x_origin, "domain": dom, "loss": loss})
  return rows


def write_csv(path: str, rows: list[dict], cols: Sequence[str] | None = None) -> None:
  cols = list(cols or (rows[0].keys() if rows else []))
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows({k: r.get(k, "") for k in cols} for r in rows)
  os.replace(tmp, path)


def read_csv(path: str) -> list[dict]:
  """Rows of a results CSV with numbers parsed (seed, step: int; flops, x, loss: float)."""
  with open(path) as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    r["seed"], r["step"] = int(r["seed"]), int(r["step"])
    for k in ("flops", "x", "loss"):
      r[k] = float(r[k])
  return rows


def read_csv_rows(path: str) -> list[dict]:
  """Rows of any CSV written by `write_csv`, with integers and floats parsed."""
  def parse(v: str):
    for tp in (int, float):
      try:
        return tp(v)
      except ValueError:
        pass
    return v
  with open(path) as f:
    return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def final_losses(rows: list[dict]) -> dict[tuple[str, str], dict[int, float]]:
  """(arm, domain) -> {seed: loss at that run's last evaluated step}."""
  last: dict[tuple[str, int], int] = {}
  for r in rows:
    key = (r["arm"], r["seed"])
    last[key] = max(last.get(key, r["step"]), r["step"])
  out: dict[tuple[str, str], dict[int, float]] = {}
  for r in rows:
    if r["step"] == last[(r["arm"], r["seed"])]:
      out.setdefault((r["arm"], r["domain"]), {})[r["seed"]] = r["loss"]
  return out


def domain_mean(losses: dict[str, float]) -> float:
  """The mean over domains of one evaluation {domain: loss}."""
  return float(np.mean(list(losses.values())))


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error of the mean, std(ddof=1)/sqrt(n) (nan for one value)."""
  a = np.asarray(list(xs), np.float64)
  if a.size == 0:
    return math.nan, math.nan
  return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan


def mean_se_curve(samples: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
  """(means, standard errors) of each point's samples, as arrays for `plots.band`; an undefined
  standard error (one sample) is 0: no band there."""
  stats = [mean_se(s) for s in samples]
  return np.array([m for m, _ in stats]), np.nan_to_num(np.array([se for _, se in stats]))


def by_arm(rows: Sequence[dict]) -> dict[str, list[dict]]:
  """Rows grouped by their 'arm', the arms in the order they first appear."""
  out: dict[str, list[dict]] = {}
  for r in rows:
    out.setdefault(r["arm"], []).append(r)
  return out


def mean_se_fields(rows: Sequence[dict], keys: Sequence[str]) -> dict[str, float]:
  """{key: mean, key + '_se': standard error} over the rows, for each of `keys` (nan, nan where a
  value is nan)."""
  out = {}
  for k in keys:
    out[k], out[k + "_se"] = mean_se([r[k] for r in rows])
  return out


def paired_effect(better: dict[int, float], worse: dict[int, float], seeds: Sequence[int] | None = None) -> dict:
  """The effect worse - better paired by seed, over `seeds` (default: the seeds both have,
  sorted): n, effect, se (its standard error) and separated (|effect| > 2 SE)."""
  seeds = sorted(set(better) & set(worse)) if seeds is None else list(seeds)
  effect, se = mean_se([worse[s] - better[s] for s in seeds])
  return {"n": len(seeds), "effect": effect, "se": se, "separated": bool(se == se and abs(effect) > 2 * se)}


def format_mean_se(m: float, se: float, spec: str = ".4f") -> str:
  """'m ± se' in format `spec`; 'm' alone when the SE is undefined; 'n/a' when the mean is."""
  if m != m:
    return "n/a"
  return f"{m:{spec}}" if se != se else f"{m:{spec}} ± {se:{spec}}"


def format_effect(r: dict) -> str:
  """A `paired_effect` as two markdown cells: 'effect ± SE | yes/no' (separated)."""
  return f"{r['effect']:+.4f} ± {r['se']:.4f} | {'yes' if r['separated'] else 'no'}"


def table_head(*cols: str) -> list[str]:
  """The two header lines of a markdown table with columns `cols`."""
  return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def write_summary(path: str, text: str, append: bool = False) -> None:
  """Write (or append) a markdown summary to `path` and print it."""
  with open(path, "a" if append else "w") as f:
    f.write(text)
  print(text, flush=True)


def summarize(rows: list[dict], claims: Sequence[Claim]) -> tuple[list[dict], list[dict]]:
  """(per-arm rows: arm, domain, n, mean, se) and (per-claim rows: claim, better, worse, domain,
  n, effect, se, separated). The effect is loss(worse) - loss(better), paired by seed over the
  seeds both arms have; positive supports the claim; separated when |effect| > 2 SE."""
  finals = final_losses(rows)
  arms = []
  for (arm, dom), by_seed in finals.items():
    m, se = mean_se(by_seed.values())
    arms.append({"arm": arm, "domain": dom, "n": len(by_seed), "mean": m, "se": se})
  out = []
  for c in claims:
    a, b = finals.get((c.better, c.domain), {}), finals.get((c.worse, c.domain), {})
    out.append({"claim": c.text, "better": c.better, "worse": c.worse, "domain": c.domain, **paired_effect(a, b)})
  return arms, out


def loss_at_flops(points: Sequence[tuple[float, float]], flops: float) -> float:
  """The loss of a curve [(flops, loss)] at `flops`, linear between its evaluations (nan outside)."""
  pts = sorted(points)
  xs, ys = [p[0] for p in pts], [p[1] for p in pts]
  if not pts or flops < xs[0] * (1 - 1e-9) or flops > xs[-1] * (1 + 1e-9):
    return math.nan
  return float(np.interp(flops, xs, ys))


def claims_at_equal_flops(rows: list[dict], claims: Sequence[Claim]) -> list[dict]:
  """Each claim again at equal training FLOPs: both arms' losses at the smaller of their final
  FLOPs (per seed; linear between evaluations), paired by seed. Rows as `summarize`'s claims, plus
  `flops` (the mean over seeds of where they are compared) and `differs` (the two arms' final FLOPs
  differ by more than 1%: only then is this a different comparison from the one at the end). The
  effect is nan where one arm's curve starts after the other's ends (no common FLOPs)."""
  out = []
  for c in claims:
    curves: dict[str, dict[int, list]] = {}
    for r in rows:
      if r["arm"] in (c.better, c.worse) and r["domain"] == c.domain:
        curves.setdefault(r["arm"], {}).setdefault(r["seed"], []).append((r["flops"], r["loss"]))
    seeds = sorted(set(curves.get(c.better, {})) & set(curves.get(c.worse, {})))
    at, diffs = {}, []
    better, worse = {}, {}
    for s in seeds:
      b, w = curves[c.better][s], curves[c.worse][s]
      at[s] = min(max(b)[0], max(w)[0])
      better[s], worse[s] = loss_at_flops(b, at[s]), loss_at_flops(w, at[s])
      diffs.append(abs(max(b)[0] - max(w)[0]) / max(max(b)[0], max(w)[0]))
    out.append({"claim": c.text, "better": c.better, "worse": c.worse, "domain": c.domain,
                "flops": float(np.mean(list(at.values()))) if at else math.nan,
                "differs": bool(diffs) and max(diffs) > 0.01, **paired_effect(better, worse, seeds)})
  return out


def summary_text(fig: Figure, arm_rows: list[dict], claim_rows: list[dict],
                 flops_rows: Sequence[dict] = ()) -> str:
  lines = [f"# {fig.title}", "", "Final validation loss (nats/token), mean ± standard error over seeds:", "",
           *table_head("arm", "domain", "seeds", "loss")]
  for r in arm_rows:
    lines.append(f"| {r['arm']} | {r['domain']} | {r['n']} | {r['mean']:.4f} ± {r['se']:.4f} |")
  if not claim_rows:
    return "\n".join(lines + ["", "No claims on the training curves: the figure's own report tests its claims "
                               "on what it measures after training."]) + "\n"
  lines += ["", "Claims (effect = loss(worse) - loss(better), paired by seed; > 0 supports the claim):", "",
            *table_head("claim", "better", "worse", "domain", "seeds", "effect ± SE", "separated (|effect| > 2 SE)")]
  for r in claim_rows:
    lines.append(f"| {r['claim']} | {r['better']} | {r['worse']} | {r['domain']} | {r['n']} | {format_effect(r)} |")
  differ = [r for r in flops_rows if r["differs"]]
  if flops_rows and not differ:
    lines += ["", "Every claim's two arms end at the same training FLOPs (within 1%): the claims above are "
              "also at equal FLOPs."]
  elif differ:
    lines += ["", "The same claims at equal training FLOPs, where the two arms end at different FLOPs: both "
              "arms' losses at the smaller of their final FLOPs (linear between evaluations), paired by seed:", "",
              *table_head("claim", "better", "worse", "domain", "at FLOPs", "seeds", "effect ± SE",
                          "separated (|effect| > 2 SE)")]
    for r in differ:
      effect = format_effect(r) if r["effect"] == r["effect"] else "n/a: one curve starts after the other ends | no"
      lines.append(f"| {r['claim']} | {r['better']} | {r['worse']} | {r['domain']} | {r['flops']:.3g} | {r['n']} | "
                   f"{effect} |")
  return "\n".join(lines) + "\n"


def curve_points(rows: Sequence[dict], arm: str, domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """One arm's curve on one domain: (x, mean, SE) over seeds at each step every seed reached, and
  the number of seeds."""
  pts: dict[int, list[tuple[float, float]]] = {}
  for r in rows:
    if r["arm"] == arm and r["domain"] == domain:
      pts.setdefault(r["step"], []).append((r["x"], r["loss"]))
  nseeds = max(len(v) for v in pts.values())
  steps = [s for s in sorted(pts) if len(pts[s]) == nseeds]
  m, se = mean_se_curve([[p[1] for p in pts[s]] for s in steps])
  return np.array([pts[s][0][0] for s in steps]), m, se, nseeds


def plot(path: str, fig: Figure, rows: list[dict]) -> list[plots.Drawn]:
  """One panel per domain ('mean' first): mean over seeds vs x, shaded ± standard error, one style
  per arm. Returns what it drew (x in the axis' units)."""
  plt = plots.pyplot()
  domains = ["mean"] + sorted({r["domain"] for r in rows} - {"mean"})
  labels = {a.name: a.label or a.name for a in fig.arms}
  xmax = max((abs(r["x"]) for r in rows), default=1.0) or 1.0
  scale = 10 ** math.floor(math.log10(xmax))
  f, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 4.3), squeeze=False)
  drawn = []
  for ax, dom in zip(axes[0], domains):
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
      x, m, se, nseeds = curve_points(rows, arm, dom)
      drawn.append(plots.band(ax, x / scale, m, se, label=f"{labels.get(arm, arm)} (n={nseeds})", panel=dom, series=arm,
                              ms=3, lw=1.4, markevery=max(1, len(x) // 12), **plots.arm_style(i)))
    plots.style_axes(ax, f"{fig.x_label} (x 1e{int(math.log10(scale))})", "validation loss (nats/token)",
                     "mean over domains" if dom == "mean" else dom)
  axes[0][0].legend(fontsize=8, loc="best")
  plots.save(f, path, f"{fig.title}: mean ± standard error over seeds")
  return drawn


def plot_claims(path: str, fig: Figure, claim_rows: list[dict], flops_rows: Sequence[dict] = ()) -> list[plots.Drawn]:
  """Each claim's effect loss(worse) - loss(better), paired by seed, ± its standard error: what the
  claim rests on (two arms' separate error bands can overlap while their paired difference is
  clear); where the two arms end at different FLOPs, the effect at equal FLOPs too (hollow, below).
  Returns what it drew (panels 'claims' and 'claims at equal FLOPs')."""
  plt = plots.pyplot()
  f, ax = plt.subplots(figsize=(11, 1.3 + 0.8 * len(claim_rows)))
  drawn = []
  at_flops = {r["claim"]: r for r in flops_rows if r["differs"]}
  for i, r in enumerate(claim_rows):
    st = plots.arm_style(i)
    drawn.append(plots.points(ax, [i], [r["effect"]], [r["se"]], label=r["claim"], panel="claims", series=r["claim"],
                              horizontal=True, color=st["color"], marker=st["marker"], ls="none", ms=6))
    if r["claim"] in at_flops and at_flops[r["claim"]]["effect"] == at_flops[r["claim"]]["effect"]:
      e = at_flops[r["claim"]]
      drawn.append(plots.points(ax, [i + 0.25], [e["effect"]], [e["se"]], label="", panel="claims at equal FLOPs",
                                series=r["claim"], horizontal=True, color=st["color"], marker=st["marker"], ls="none",
                                ms=6, mfc="none"))
  ax.axvline(0.0, color="0.3", lw=0.8)
  ax.set_yticks(range(len(claim_rows)), [textwrap.fill(f"{r['claim']} ({r['domain']}, n={r['n']})"
                                                       + (" [hollow: at equal FLOPs]" if r["claim"] in at_flops else ""),
                                                       45) for r in claim_rows], fontsize=8)
  ax.set_ylim(len(claim_rows) - 0.5, -0.5)
  plots.style_axes(ax, "loss(worse) - loss(better), paired by seed\n(> 0 supports the claim)", "", grid="x")
  plots.save(f, path, f"{fig.title}: the claims, mean ± SE of the paired differences")
  return drawn


def report(fig: Figure, root: str, seeds: Sequence[int], data_dir: str = "") -> tuple[list[dict], list[dict]]:
  """Write <name>.csv, <name>.png, <name>_claims.png (if the figure has claims), summary.csv and
  summary.md from the runs; print the summary."""
  rows = collect(fig, root, seeds, data_dir)
  write_csv(os.path.join(root, f"{fig.name}.csv"), rows, ["arm", "seed", "step", "flops", "x", "domain", "loss"])
  plot(os.path.join(root, f"{fig.name}.png"), fig, rows)
  arm_rows, claim_rows = summarize(rows, fig.claims)
  flops_rows = claims_at_equal_flops(rows, fig.claims)
  if claim_rows:
    plot_claims(os.path.join(root, f"{fig.name}_claims.png"), fig, claim_rows, flops_rows)
  write_csv(os.path.join(root, "summary.csv"),
            [{"kind": "arm", **r} for r in arm_rows] + [{"kind": "claim", **r} for r in claim_rows]
            + [{"kind": "claim_at_equal_flops", **r} for r in flops_rows if r["differs"]],
            ["kind", "arm", "claim", "better", "worse", "domain", "n", "mean", "se", "effect", "separated", "flops"])
  write_summary(os.path.join(root, "summary.md"), summary_text(fig, arm_rows, claim_rows, flops_rows))
  print(f"wrote {os.path.join(root, fig.name + '.csv')}, {os.path.join(root, fig.name + '.png')}, "
        f"{os.path.join(root, 'summary.md')}", flush=True)
  return arm_rows, claim_rows


def replot(fig: Figure, root: str) -> int:
  """Redraw a figure's PNGs from the CSVs in `root` (no run needed): the training curves, the
  claims (and claims.md: the summary's tables, claims at equal FLOPs included), and the figure's
  own plots where it has a `replot`."""
  rows = read_csv(os.path.join(root, f"{fig.name}.csv"))
  plot(os.path.join(root, f"{fig.name}.png"), fig, rows)
  if fig.claims:
    arm_rows, claim_rows = summarize(rows, fig.claims)
    flops_rows = claims_at_equal_flops(rows, fig.claims)
    plot_claims(os.path.join(root, f"{fig.name}_claims.png"), fig, claim_rows, flops_rows)
    with open(os.path.join(root, "claims.md"), "w") as f:  # the summary's tables, from the CSV alone
      f.write(summary_text(fig, arm_rows, claim_rows, flops_rows))
  if fig.replot is not None:
    fig.replot(fig, root)
  print(f"redrew the plots in {root}", flush=True)
  return 0


# ---------------------------------------------------------------- command line

def _compile_cache(root: str) -> None:
  """Keep XLA executables in `<root>/.xla_cache` unless a cache is configured already
  (JAX_COMPILATION_CACHE_DIR): seeds after the first reuse every compiled step."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(root), ".xla_cache"))


def run(make_figure: Callable[[bool], Figure], argv: Sequence[str] | None = None, default_seeds: str = "0,1,2") -> int:
  """The command line of a figure: trains every missing (arm, seed), then reports."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="tiny models, a few steps per run (tests)")
  ap.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {default_seeds}; quick: 0,1)")
  ap.add_argument("--workdir", default=None, help="default runs/<figure name>[_quick]")
  ap.add_argument("--data_dir", default=os.environ.get("MOEGROW_DATA_DIR", ""),
                  help="TFDS data dir (default: $MOEGROW_DATA_DIR, else ~/tensorflow_datasets)")
  ap.add_argument("--stop_after_steps", type=int, default=0,
                  help="stop every run after this many steps this invocation (rerun to resume)")
  ap.add_argument("--replot", action="store_true",
                  help="train nothing: redraw the PNGs from the CSVs in --workdir (e.g. the figure's results/)")
  ap.add_argument("--size", default=None, help="a size of the figure's SIZES (default: small; quick with --quick)")
  ap.add_argument("--aot", default="", metavar="TOPOLOGY",
                  help="train nothing: compile every distinct program of every arm for this TPU slice (e.g. "
                       "v5e-64; moegrow.aot) and estimate each arm's hours; writes aot.json and aot.md")
  ap.add_argument("--num_slices", type=int, default=1, help="with --aot: slices joined over DCN")
  args = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  fig = make_figure(args.size or args.quick)
  default_root = os.path.join("runs", fig.name + ("" if fig.plan.get("size", "small") == "small"
                                                  else "_" + fig.plan["size"]))
  if args.replot:
    return replot(fig, args.workdir or default_root)
  if args.aot:
    from experiments import pod
    return pod.report(fig, args.aot, args.workdir or default_root, args.num_slices)
  seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else default_seeds)).split(",") if s.strip()]
  root = args.workdir or default_root
  os.makedirs(root, exist_ok=True)
  _check_plan(root, fig)
  _compile_cache(root)
  print(f"{fig.title}: arms {[a.name for a in fig.arms]}, seeds {seeds}, in {root}", flush=True)
  for arm in fig.arms:
    for seed in seeds:
      if not run_one(fig, arm, seed, root, args.data_dir, args.stop_after_steps):
        print(f"[{arm.name} seed {seed}] stopped before its end; run the same command to resume", flush=True)
        return 1
  report(fig, root, seeds, args.data_dir)
  if fig.extra_report is not None:
    fig.extra_report(fig, root, seeds, data_dir=args.data_dir)
  return 0
