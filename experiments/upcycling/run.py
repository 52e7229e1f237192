"""Sparse Upcycling figure: dense continuation vs upcycled MoE vs MoE from scratch, at equal FLOPs.

  python -m experiments.upcycling.run [--quick] [--workdir runs/upcycling] [--data_dir DIR]

Runs, each a normal moegrow workdir under --workdir (configs: experiments/upcycling/config.py):
  dense_base/   dense model, N steps: the one shared dense checkpoint (never modified afterwards);
  dense/        copy of dense_base's checkpoint N, continued dense for M_dense steps;
  upcycled/     copy of dense_base's checkpoint N, upcycled to E=8 top-2 (every other layer), M steps;
  moe_scratch/  the same MoE architecture from scratch, S steps = sunk + extra FLOPs.
Then plot.py writes upcycling.csv and upcycling.png into --workdir. Rerunning the command skips
finished runs and resumes interrupted ones from their newest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def step_dir(workdir: str, step: int, stage: int = 0) -> str:
  return os.path.join(workdir, "checkpoints", str(step) if stage == 0 else f"stage{stage}_{step}")


def final_checkpoint(workdir: str, variant: str, plan: dict) -> str:
  return step_dir(workdir, plan["end_step"][variant], stage=1 if variant == "upcycled" else 0)


def seed_from_dense(base_dir: str, workdir: str, step: int) -> None:
  """Copy dense_base's checkpoint `step` into a fresh workdir (whole step directory, atomically)."""
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    return  # already seeded (and maybe trained on): resume logic picks the newest checkpoint
  src = step_dir(base_dir, step)
  if not os.path.isdir(src):
    raise FileNotFoundError(f"dense checkpoint {src} is missing; cannot start {workdir}")
  tmp = os.path.join(workdir, ".seeding")
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, os.path.join(tmp, str(step)))
  os.replace(tmp, os.path.join(workdir, "checkpoints"))


def check_plan(workdir: str, plan: dict) -> None:
  path = os.path.join(workdir, "plan.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != plan:
      raise ValueError(f"{path} was written by a different plan (size {old.get('size')!r}, steps "
                       f"{old.get('end_step')}) than this one (size {plan['size']!r}, steps {plan['end_step']}); "
                       f"use another --workdir")
  else:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(plan, f, indent=2)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="tiny model, a few steps per run (tests)")
  ap.add_argument("--workdir", default=os.path.join("runs", "upcycling"))
  ap.add_argument("--data_dir", default=os.environ.get("MOEGROW_DATA_DIR", ""),
                  help="TFDS data dir (default: $MOEGROW_DATA_DIR, else ~/tensorflow_datasets)")
  args = ap.parse_args(argv)

  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from experiments.upcycling import config as configs
  from experiments.upcycling import plot
  from moegrow import boundary, train

  size = "quick" if args.quick else "small"
  plan = configs.plan(size)
  cfgs = {v: configs.get_config(f"{size},{v}") for v in configs.VARIANTS}
  for c in cfgs.values():
    c.data.data_dir = args.data_dir
  up = boundary.resolve_stages(cfgs["upcycled"], train.model_config(cfgs["upcycled"]))[-1].cfg
  if up != train.model_config(cfgs["moe_scratch"]):
    raise ValueError("the scratch MoE differs from the upcycled model: "
                     + boundary.config_diff(train.model_config(cfgs["moe_scratch"]), up))
  check_plan(args.workdir, plan)
  fp = plan["flops_per_step"]
  print(f"upcycling [{size}]: N={plan['dense_steps']} dense steps, then dense +{plan['dense_extra_steps']} | "
        f"upcycled +{plan['moe_steps']} | MoE from scratch {plan['scratch_steps']} steps; "
        f"FLOPs/step dense {fp['dense']:.3e}, MoE {fp['moe']:.3e} ({plan['flops_formula']})", flush=True)

  times_path = os.path.join(args.workdir, "timings.json")
  timings = json.load(open(times_path)) if os.path.exists(times_path) else {}
  base_dir = os.path.join(args.workdir, "dense_base")
  for v in configs.VARIANTS:
    wd = os.path.join(args.workdir, v)
    if os.path.isdir(final_checkpoint(wd, v, plan)):
      print(f"[{v}] finished earlier ({final_checkpoint(wd, v, plan)}); skipping", flush=True)
      continue
    if v in ("dense", "upcycled"):
      seed_from_dense(base_dir, wd, plan["dense_steps"])
    if v == "dense_base":  # stop at N, also when resuming an interrupted dense_base
      done = [int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()] \
          if os.path.isdir(os.path.join(wd, "checkpoints")) else []
      cfgs[v].train.stop_after_steps = plan["dense_steps"] - max(done, default=0)
    print(f"[{v}] training in {wd}", flush=True)
    t0 = time.perf_counter()
    result = train.train_and_evaluate(cfgs[v], wd)
    timings[v] = timings.get(v, 0.0) + time.perf_counter() - t0
    with open(times_path, "w") as f:
      json.dump(timings, f, indent=2)
    if result.get("preempted") or not os.path.isdir(final_checkpoint(wd, v, plan)):
      print(f"[{v}] stopped before its end; run the same command to resume", flush=True)
      return 1
  print(f"wall time per run (s): {json.dumps({k: round(t, 1) for k, t in timings.items()})}, "
        f"total {sum(timings.values()):.0f} s", flush=True)
  plot.main(args.workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
