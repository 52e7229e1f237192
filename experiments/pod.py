"""A figure at pod scale, checked ahead of time: does every program of every arm fit the slice, and
how long would each arm take?

  python -m experiments.<figure>.run --size=pod --aot=v5e-64 [--workdir=runs/<figure>_pod]

For every arm (seed 0: the seed is an argument of the train step, so seeds share their programs)
`moegrow.aot.compile_config` compiles, for the abstract devices of the named TPU slice, each
stage's train and eval steps and each stage boundary's growth; a BTX arm's branches too. A
program that another arm already compiled (same model, shapes, mesh, objective; see
`moegrow.aot.SCHEDULE_KEYS`) is compiled once. Per arm it reports the programs, whether each fits
(per-chip bytes from the compiler against the chip's HBM) and ESTIMATED hours: the arm's training
steps times the roofline step time of each stage's train step (`moegrow.aot`: a lower bound; the
evaluations, checkpoints and input pipeline are not counted). Writes aot.json and aot.md under
the workdir. Needs the TPU compiler (`pip install -e ".[tpu]"`); no TPU.
"""
from __future__ import annotations

import json
import os

import ml_collections

from experiments.harness import Figure, arm_config, end_step, trained_config
from moegrow.configs import lm
from moegrow.orchestrate import parts

# The TFDS datasets of the pod sizes, in place of the local corpora. English: C4 (the TFDS catalog,
# field 'text'). Code: the TFDS catalog has no source-code corpus; prepare one as a TFDS dataset
# with a 'text' field under this name in the data dir (e.g. The Stack's Python files), or name
# your own with --config.data.mixture.
ENGLISH, CODE = "c4/en", "the_stack_python"


def domains(size: str, local: tuple[str, str]) -> tuple[str, str]:
  """A two-domain figure's datasets at `size`: C4 and code at pod, else its `local` corpora."""
  return (ENGLISH, CODE) if size == "pod" else local


def base_config(mixture: dict | None = None) -> ml_collections.ConfigDict:
  """configs/lm.py:pod (d=1024, 16 layers, 16 heads, d_ff 4096, bfloat16, block remat, scanned
  blocks; sequence 2048, batch 512; mesh data=-1, fsdp=8, expert=8) made dense, on `mixture`
  (default C4 alone). A figure's pod size sets its own experts, steps and mesh on top."""
  c = lm.get_config("pod")
  c.model.moe_layers = "none"
  c.data.mixture = ml_collections.ConfigDict(mixture or {ENGLISH: 1.0})
  return c


def run_configs(config) -> list[tuple[str, object]]:
  """(label, config) of every run an arm makes: a BTX arm's branches (from step 0: the seed run's
  programs are the branches' too) and its mixed MoE run; any other arm's one run."""
  if "btx" not in config:
    return [("", config)]
  from moegrow.orchestrate import branching
  s = branching.spec(config)
  out = [(f"branch {b['name']}/", branching.branch_config(config, b, 0)) for b in s["branches"]]
  return out + [("mix/", trained_config(config))]


def arm_hours(config, rows: list[dict], start: int = 0, end: int | None = None) -> float | None:
  """Estimated hours of one run from step `start` to `end` (default its last): each stage's steps
  in that range times its train step's estimated seconds (None if a train step that runs did not
  compile or has no estimate)."""
  total = 0.0
  for st in parts.resolve_stages(config, parts.model_config(config)):
    n = max(0, min(st.end, st.end if end is None else end) - max(st.start, start))
    if not n:
      continue
    row = next((r for r in rows if r["program"].endswith(f"stage{st.index}/train_step")), None)
    if row is None or not row.get("estimated_step_seconds"):
      return None
    total += n * row["estimated_step_seconds"]
  return total / 3600


def trains_itself(arm, label: str) -> bool:
  """Whether `arm` trains the run `label` (from `run_configs`) itself: not a BTX branch it copies
  from another arm (`Arm.reuse` of '<arm>/branches')."""
  return not (label.startswith("branch ") and any(ref.split("/", 1)[-1] == "branches" for ref in arm.reuse))


def compile_arms(fig: Figure, topology: str, root: str = "", num_slices: int = 1, log=print) -> list[dict]:
  """One row per (arm, program) of the figure for the slice (moegrow.aot rows plus 'arm'), and one
  summary row per arm (kind 'arm': fits, hours)."""
  from moegrow import aot
  sl = aot.parse_topology(topology, num_slices)
  seen: dict = {}
  rows = []
  for arm in fig.arms:
    log(f"[{arm.name}]")
    mine, hours = [], 0.0
    for label, config in run_configs(arm_config(fig, arm, 0, data_dir="", root=root)):
      got = aot.compile_config(config, sl, log=log, seen=seen)
      for r in got:
        r.setdefault("arm", arm.name)  # a row first compiled here (it is `seen`'s); reused rows carry `same_as`
        r["program"] = label + r["program"]
      # the steps this arm trains itself: from its start checkpoint (another arm's) to its end
      h = (arm_hours(config, got, arm.start_step if arm.start_from else 0, end_step(arm, config) if not label else None)
           if trains_itself(arm, label) else 0.0)
      hours = None if h is None or hours is None else hours + h
      mine += [dict(r, arm=arm.name) for r in got]
    rows += mine
    rows.append({"kind": "arm", "arm": arm.name, "slice": sl.name, "chips": sl.chips,
                 "fits": all(r["fits"] for r in mine), "estimated_hours": hours,
                 "max_gib": max((r["memory_gib"]["total"] for r in mine if "memory_gib" in r), default=None),
                 "hbm_gib": sl.hbm_bytes / aot.GIB,
                 "compiled": sum(1 for r in mine if not r.get("same_as"))})
  return rows


def table(rows: list[dict]) -> str:
  """The per-arm summary as a markdown table."""
  lines = ["| arm | slice | fits | largest program, GiB per chip | programs compiled (others shared) | "
           "estimated hours (lower bound) |", "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("kind") != "arm":
      continue
    gib = "n/a" if r["max_gib"] is None else f"{r['max_gib']:.2f} / {r['hbm_gib']:.0f}"
    hours = "n/a" if r["estimated_hours"] is None else f"{r['estimated_hours']:.2f}"
    lines.append(f"| {r['arm']} | {r['slice']} | {'yes' if r['fits'] else '**no**'} | {gib} | {r['compiled']} | "
                 f"{hours} |")
  return "\n".join(lines)


def report(fig: Figure, topology: str, root: str, num_slices: int = 1) -> int:
  """The `--aot` command: compile, print and write aot.json / aot.md; 0 if every arm fits."""
  from moegrow import aot
  print(f"{fig.title}: every arm's programs for {topology} (ahead of time, no TPU)", flush=True)
  rows = compile_arms(fig, topology, root, num_slices, log=lambda s: print(s, flush=True))
  shared = lambda r: f" (same as {r['same_as']})" if r.get("same_as") else ""
  programs = [dict(r, program=f"{r['arm']}: {r['program']}{shared(r)}") for r in rows if r.get("kind") != "arm"]
  text = (f"# {fig.title}: ahead-of-time compile for {topology}\n\n{table(rows)}\n\nEvery program "
          f"(arms' rows; 'same as' = compiled once for an earlier arm):\n\n{aot.table(programs)}\n\n"
          "Hours and step times are ESTIMATES: the roofline lower bound of each train step (moegrow.aot) "
          "times the arm's steps; evaluation, checkpoints and input are not counted.\n")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "aot.md"), "w") as f:
    f.write(text)
  with open(os.path.join(root, "aot.json"), "w") as f:
    json.dump({"figure": fig.name, "topology": topology, "num_slices": num_slices, "rows": rows}, f, indent=1,
              sort_keys=True, default=str)
  print(text, flush=True)
  bad = [r["arm"] for r in rows if r.get("kind") == "arm" and not r["fits"]]
  if bad:
    print(f"does not fit {topology}: {', '.join(bad)}")
  return 1 if bad else 0
