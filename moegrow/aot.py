"""Ahead-of-time compilation for a TPU slice, from any host: will this config fit, and how fast?

  python -m moegrow.aot --config=configs/lm.py:pod --topology=v5e:8x8 [--num_slices=2] [--json=aot.json]

The real TPU compiler (libtpu: `pip install -e ".[tpu]"`) compiles, for abstract devices of the
named slice (`jax.experimental.topologies`), everything the run would compile: every stage's train
and eval steps (with its EWC / teacher inputs where configured) and every stage boundary's growth
(the ops from the old state's shardings to the new one's, moments included). Nothing runs and no
TPU is needed. For each program it reports, per chip:

  memory   argument, output, alias and temporary bytes (`memory_analysis()`); what the chip must
           hold = argument + output - alias + temporary (the train step donates its state, so the
           aliased bytes count once), against the chip's HBM, with the headroom left;
  FLOPs    `cost_analysis()['flops']` next to the `moegrow.flops` formula's share of one chip (a
           distilling stage's teacher forward pass included);
  traffic  count and result bytes of all-gather, reduce-scatter, all-reduce, all-to-all and
           ragged all-to-all in the compiled HLO (`moegrow.hlo`);
  time     ESTIMATES, lower bounds: a roofline of the train step (the formula's FLOPs, times
           remat's recompute, at the chip's peak, or the collective bytes at its ICI rate,
           whichever is longer, with perfect overlap and HBM traffic ignored) and the MFU it
           implies; XLA's cost-model time (`optimal_seconds`) where it gives one (it does not
           for programs with custom calls such as Pallas kernels, or loops);
  compile  seconds spent compiling.

A program the compiler refuses for memory is reported as not fitting, with the compiler's words.
Topologies: `<generation>:<chips>` as in `v5e:8x8`, `v4:4x4x4`, `v5p:4x4x4`, `v6e:4x4`, or the slice
names `v5e-64`, `v4-128`, `v5p-128`, `v6e-16` (v4 and v5p count TensorCores, two per chip).
Only one process at a time may hold libtpu (set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to share it).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # compiling for a TPU needs no device: keep jax's runtime on the CPU
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import json
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moegrow import flops, sharding
from moegrow.cli import run_command
from moegrow.hlo import collectives
from moegrow.model import transformer as tf
from moegrow.orchestrate import parts
from moegrow.orchestrate.boundary import growth_fn, with_loads
from moegrow.orchestrate.validate import validate_config
from moegrow.train.steps import Program, build_program, params_sharding

GIB = 2 ** 30
# Per chip, from the public spec sheets: HBM (GiB), peak bf16 matmul TFLOP/s, and the ICI rate the
# roofline uses (GB/s): the pod's all-reduce bandwidth over its chips where published (v4 1.1 PB/s
# / 4096, v5e 51.2 TB/s / 256, v6e 102.4 TB/s / 256), half the bidirectional per-chip ICI for v5p
# (1200 GB/s), as that ratio holds for v5e and v6e.
CHIPS = {
    "v4": {"hbm_gib": 32, "peak_tflops": 275, "ici_gbs": 269, "chip_config": "megacore", "cores_per_chip": 2},
    "v5e": {"hbm_gib": 16, "peak_tflops": 197, "ici_gbs": 200, "chip_config": "default", "cores_per_chip": 1},
    "v5p": {"hbm_gib": 95, "peak_tflops": 459, "ici_gbs": 600, "chip_config": "megacore", "cores_per_chip": 2},
    "v6e": {"hbm_gib": 32, "peak_tflops": 918, "ici_gbs": 400, "chip_config": "default", "cores_per_chip": 1},
}
# Train FLOPs as a multiple of forward + backward: "block" remat runs every block's forward twice.
REMAT_COMPUTE = {"none": 1.0, "dots": 1.0, "block": 4.0 / 3.0}


class AotError(ValueError):
  """A topology, mesh or installation problem, named."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: generation ('v5e'), chip grid ('8x8') and number of slices (DCN)."""
  generation: str
  grid: str
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(int(n) for n in self.grid.split("x")) * self.num_slices

  @property
  def name(self) -> str:
    cores = self.chips * CHIPS[self.generation]["cores_per_chip"] // self.num_slices
    base = f"{self.generation}-{cores}"
    return base if self.num_slices == 1 else f"{self.num_slices}x {base}"

  @property
  def hbm_bytes(self) -> int:
    return CHIPS[self.generation]["hbm_gib"] * GIB

  @property
  def peak_flops(self) -> float:
    return CHIPS[self.generation]["peak_tflops"] * 1e12

  @property
  def ici_bytes_per_second(self) -> float:
    return CHIPS[self.generation]["ici_gbs"] * 1e9


def _grid_for(generation: str, chips: int) -> str:
  """The usual chip grid of a slice of `chips` chips (2-D for v5e/v6e, 3-D for v4/v5p)."""
  if chips < 1 or chips & (chips - 1):
    raise AotError(f"topology: {chips} chips is not a power of two; name the grid instead (e.g. {generation}:4x4)")
  dims = [1, 1] if generation in ("v5e", "v6e") else [1, 1, 1]
  while math.prod(dims) < chips:  # double the smallest axis, the last ones first (4x8, 4x4x8, ...)
    j = min(range(len(dims)), key=lambda a: (dims[a], -a))
    dims[j] *= 2
  return "x".join(str(d) for d in sorted(dims))


def parse_topology(name: str, num_slices: int = 1) -> Slice:
  """'v5e:8x8' or 'v5e-64' (-> 8x8) -> Slice; AotError naming what is wrong."""
  m = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+){1,2})|-(\d+))", name.strip().lower())
  if not m or m.group(1) not in CHIPS:
    raise AotError(f"topology {name!r}: expected <generation>:<grid> (e.g. v5e:8x8, v4:4x4x4) or a slice name "
                   f"(e.g. v5e-64, v4-128) with generation in {sorted(CHIPS)}")
  gen = m.group(1)
  if num_slices < 1:
    raise AotError(f"num_slices={num_slices} must be >= 1")
  if m.group(2):
    grid = m.group(2)
    if len(grid.split("x")) != (2 if gen in ("v5e", "v6e") else 3):
      raise AotError(f"topology {name!r}: {gen} slices are {'2-D (AxB)' if gen in ('v5e', 'v6e') else '3-D (AxBxC)'}")
  else:
    cores = int(m.group(3))
    per = CHIPS[gen]["cores_per_chip"]
    if cores % per:
      raise AotError(f"topology {name!r}: {gen}-N counts TensorCores ({per} per chip); {cores} is not a multiple")
    grid = _grid_for(gen, cores // per)
  return Slice(gen, grid, num_slices)


def topology_devices(sl: Slice) -> list:
  """Abstract TPU devices of the slice (the TPU compiler is loaded; nothing runs)."""
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - part of jax
    raise AotError(f"jax.experimental.topologies is missing: {e}") from e
  dims = [int(n) for n in sl.grid.split("x")]
  host = tuple(min(h, d) for h, d in zip((2, 2, 1), dims + [1] * (3 - len(dims))))
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{sl.generation}:{sl.grid}",
                                        chip_config_name=CHIPS[sl.generation]["chip_config"],
                                        chips_per_host_bounds=host, num_slices=sl.num_slices)
  except Exception as e:  # libtpu missing, locked or unknown topology: its words, and ours
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ("; install the TPU compiler with pip install -e \".[tpu]\"" if "plugin" in msg.lower() or "libtpu" in msg.lower()
            and "lock" not in msg.lower() else "")
    if "lock" in msg.lower():
      hint = "; another process holds libtpu: wait for it, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1"
    raise AotError(f"cannot load the TPU topology {sl.generation}:{sl.grid} x{sl.num_slices}: {msg}{hint}") from e
  return list(topo.devices)


def _memory(compiled) -> dict[str, int]:
  ma = compiled.memory_analysis()
  get = lambda k: int(getattr(ma, k, 0) or 0)
  arg, out, alias, temp = (get("argument_size_in_bytes"), get("output_size_in_bytes"),
                           get("alias_size_in_bytes"), get("temp_size_in_bytes"))
  return {"argument": arg, "output": out, "alias": alias, "temporary": temp, "total": arg + out - alias + temp}


def _cost(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else (ca or {})
  return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
          "optimal_seconds": float(ca.get("optimal_seconds", 0.0))}


def _oom_words(e: Exception) -> str | None:
  msg = str(e)
  if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg or "out of memory" in msg.lower():
    lines = [l.strip() for l in msg.splitlines() if l.strip()]
    return " ".join(lines[:3])[:600]
  return None


def compile_one(name: str, kind: str, jitted, args: tuple, sl: Slice, formula_flops: float | None,
                headroom: float, remat: str = "none") -> dict[str, Any]:
  """Lower and compile one program for the slice; the report row (see the module docstring)."""
  t0 = time.perf_counter()
  row: dict[str, Any] = {"program": name, "kind": kind, "slice": sl.name, "chips": sl.chips,
                         "hbm_gib": sl.hbm_bytes / GIB}
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # the compiler's refusal is the answer: reported, and the next program compiles
    words = _oom_words(e)
    if words is None:
      first = [l.strip() for l in str(e).splitlines() if l.strip()]
      words = f"compile error: {type(e).__name__}: {' '.join(first[:2])[:600]}"
    row.update(compile_seconds=time.perf_counter() - t0, fits=False, fits_with_headroom=False, error=words)
    return row
  row["compile_seconds"] = time.perf_counter() - t0
  mem, cost = _memory(compiled), _cost(compiled)
  row["memory_gib"] = {k: v / GIB for k, v in mem.items()}
  row["headroom"] = 1.0 - mem["total"] / sl.hbm_bytes
  row["fits"] = mem["total"] <= sl.hbm_bytes
  row["fits_with_headroom"] = row["headroom"] >= headroom
  row["flops_per_chip"] = cost["flops"]  # XLA's count: a loop body (scanned layers) counts once
  row["formula_flops_per_chip"] = formula_flops
  # XLA's cost-model time where it gives one (it returns a negative sentinel for programs with ops
  # it cannot cost, e.g. custom calls and loops).
  row["xla_step_seconds"] = cost["optimal_seconds"] if cost["optimal_seconds"] > 0 else None
  row["collectives"] = collectives(compiled.as_text())
  comm_s = sum(c["bytes"] for c in row["collectives"].values()) / sl.ici_bytes_per_second
  row["collective_seconds"] = comm_s
  if formula_flops:
    # Roofline lower bound: the formula's FLOPs (times remat's recompute) at peak, or the chip's
    # collective bytes at its ICI rate, whichever is longer (perfect overlap; HBM traffic ignored).
    compute_s = formula_flops * REMAT_COMPUTE.get(remat, 1.0) / sl.peak_flops
    row["estimated_step_seconds"] = max(compute_s, comm_s)
    row["estimated_mfu"] = formula_flops / (row["estimated_step_seconds"] * sl.peak_flops)
    row["bound"] = "compute" if compute_s >= comm_s else "collectives"
  return row


def _abstract(shape, dtype, sh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def _ctx_abstract(program: Program):
  """Abstract `ctx` of a train step with an objective (EWC's Fisher and anchor, the teacher)."""
  if program.ctx_sharding is None:
    return None
  out = {}
  if "ewc" in program.ctx_sharding:
    a = jax.tree_util.tree_map(lambda s, h: _abstract(s.shape, jnp.float32, h), tf.abstract_params(program.cfg),
                               program.ctx_sharding["ewc"]["fisher"])
    out["ewc"] = {"fisher": a, "anchor": a}
  if "teacher" in program.ctx_sharding:
    t_cfg = program.objective.teacher_cfg
    out["teacher"] = jax.tree_util.tree_map(lambda s, h: _abstract(s.shape, s.dtype, h), tf.abstract_params(t_cfg),
                                            program.ctx_sharding["teacher"])
  return out


def _batch_abstract(program: Program, rows: int, seq: int) -> dict:
  b = _abstract((rows, seq), jnp.int32, program.batch_sharding)
  out = {"inputs": b, "targets": b}
  if "replay" in program.batch_keys:
    row_sh = jax.sharding.NamedSharding(program.mesh, sharding.logical_to_spec(("batch",), mesh=program.mesh))
    out["replay"] = _abstract((rows,), jnp.float32, row_sh)
  return out


def _placeholder_measurements(cfg) -> tuple:
  """Uniform expert loads (and REAP scores), zero centroids, one-hot features and identity
  hidden-unit permutations: the shapes growth ops need, for compiling."""
  loads = {str(i): [1.0 / cfg.experts_in_layer(i)] * cfg.experts_in_layer(i) for i in cfg.moe_layer_ids}
  means = {str(i): {"a": np.zeros(cfg.d_model), "b": np.ones(cfg.d_model)} for i in cfg.moe_layer_ids}
  feats = {str(i): {g: np.eye(cfg.experts_in_layer(i)).tolist() for g in ("output", "router")}
           for i in cfg.moe_layer_ids}
  blocks = tf.abstract_params(cfg)["blocks"]
  perms = {str(i): [list(range(blocks[str(i)]["mlp"]["wo_EFD"].shape[1]))] * cfg.experts_in_layer(i)
           for i in cfg.moe_layer_ids}
  return (lambda: loads), (lambda: means), (lambda: loads), (lambda: feats), (lambda usage: perms)


# Train-config keys that change numbers inside a program (a schedule's constants, the optimizer's
# scalars, the seed) or nothing in it (cadences), but not its shapes, memory or FLOPs: two programs
# that differ only here compile once (see `compile_config`'s `seen`).
SCHEDULE_KEYS = ("steps", "lr", "warmup_steps", "schedule", "min_lr_ratio", "b1", "b2", "weight_decay", "grad_clip",
                 "seed", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                 "async_checkpoint", "on_corrupt_checkpoint", "stop_after_steps", "stop_at_step")


def program_key(kind: str, *parts_) -> str:
  """A program's identity for de-duplication: its kind and a repr of what shapes it."""
  return kind + ":" + repr(parts_)


def _shaping_train(tr) -> dict:
  return {k: v for k, v in sorted(tr.to_dict().items()) if k not in SCHEDULE_KEYS}


def compile_config(config, sl: Slice, headroom: float = 0.10, log=print, seen: dict | None = None) -> list[dict]:
  """Compile every program of `config`'s run for the slice; one report row per program.
  `seen` ({program key: row}, shared across calls) compiles each distinct program once: a program
  already in it (same kind, model config, batch shapes, mesh, objective and train options other
  than SCHEDULE_KEYS, e.g. another seed or learning rate) reuses that row, marked `same_as`."""
  seen = {} if seen is None else seen
  validate_config(config, num_devices=sl.chips, process_count=max(1, sl.chips // 4))
  devices = topology_devices(sl)
  try:
    mesh = parts.make_mesh_from(config, devices)
  except ValueError as e:
    raise AotError(f"mesh {dict(config.mesh)} on {sl.name} ({sl.chips} chips): {e}") from e
  tr = config.train
  stages = parts.resolve_stages(config, parts.model_config(config))
  seq = int(config.data.seq_len)
  rows = []
  with sharding.use_mesh(mesh):
    programs = []
    for st in stages:
      obj = parts.objective(st, stages)
      programs.append(build_program(st.cfg, parts.stage_train(tr, st), mesh, obj))
    mesh_key = tuple(mesh.shape.items())
    for st, prog in zip(stages, programs):
      tr_key = _shaping_train(parts.stage_train(tr, st))
      if st.index > 0:  # the boundary into this stage: growth from the previous stage's state
        old_cfg, old = stages[st.index - 1].cfg, programs[st.index - 1]
        key = program_key("growth", old_cfg, st.cfg, st.ops, tr_key, st.ewc is not None, mesh_key)
        rows.append(_once(seen, key, f"stage{st.index}/growth", log,
                          lambda: _compile_growth(st, old_cfg, old, prog, sl, headroom)))
      tokens = int(tr.batch_size) * seq
      formula = flops.train_flops_per_token(tf.base_config(st.cfg), seq) * tokens / sl.chips
      if (teacher := parts.teacher(st, stages)) is not None:  # a distilling stage's teacher: forward, every batch
        formula += flops.forward_flops_per_token(tf.base_config(teacher), seq) * tokens / sl.chips
      train_args = (prog.abstract_state, _batch_abstract(prog, int(tr.batch_size), seq))
      if (ctx := _ctx_abstract(prog)) is not None:
        train_args += (ctx,)
      eval_args = (prog.abstract_state["params"], _batch_abstract(prog, int(tr.eval_batch_size), seq))
      name = f"stage{st.index}/train_step"
      rows.append(_once(seen, program_key("train", st.cfg, seq, tr_key, prog.objective, mesh_key), name, log,
                        lambda: compile_one(name, "train", prog.train_step, train_args, sl, formula, headroom,
                                            st.cfg.remat)))
      name = f"stage{st.index}/eval_step"
      rows.append(_once(seen, program_key("eval", st.cfg, seq, int(tr.eval_batch_size), mesh_key), name, log,
                        lambda: compile_one(name, "eval", prog.eval_step, eval_args, sl, None, headroom)))
  return rows


def _once(seen: dict, key: str, name: str, log, compile_fn) -> dict:
  """Program `name`'s row: compiled by `compile_fn` (and logged) the first time `key` is seen, else
  the row of the program first compiled under `key`, marked `same_as`."""
  if key in seen:
    return _reuse(seen[key], name, log)
  row = seen[key] = compile_fn()
  _log_row(row, log)
  return row


def _reuse(row: dict, name: str, log) -> dict:
  """A compiled program's row for another program with the same key."""
  first = row.get("same_as") or (f"{row['arm']}/{row['program']}" if row.get("arm") else row["program"])
  out = {k: v for k, v in row.items() if k != "arm"}
  out.update(program=name, same_as=first, compile_seconds=0.0)
  if log is not None:
    log(f"  {name:<22} same program as {out['same_as']} (compiled once)")
  return out


def _compile_growth(st, old_cfg, old, prog, sl: Slice, headroom: float) -> dict:
  """Compile the growth into stage `st` from the previous stage's state (`old`) to `prog`'s."""
  ops = with_loads(list(st.ops), *_placeholder_measurements(old_cfg))
  fisher = None
  if st.ewc:
    fisher = jax.tree_util.tree_map(lambda s, h: _abstract(s.shape, jnp.float32, h), tf.abstract_params(old_cfg),
                                    params_sharding(old_cfg, prog.mesh))
  run, out_sh, _ = growth_fn(old_cfg, ops, prog, with_fisher=fisher is not None)
  key = jax.eval_shape(lambda: jax.random.key(0))
  row = compile_one(f"stage{st.index}/growth", "growth", jax.jit(run, out_shardings=out_sh),
                    (old.abstract_state, key, fisher), sl, None, headroom)
  return row


def _log_row(row: dict, log) -> None:
  if log is None:
    return
  if "memory_gib" not in row:
    log(f"  {row['program']:<22} DOES NOT FIT ({row['compile_seconds']:.0f} s): {row['error'][:300]}")
    return
  mem = row["memory_gib"]
  log(f"  {row['program']:<22} {mem['total']:6.2f} / {row['hbm_gib']:.0f} GiB per chip "
      f"(headroom {100 * row['headroom']:.0f}%), compiled in {row['compile_seconds']:.0f} s")


def table(rows: list[dict]) -> str:
  """The report as a markdown table."""
  head = ("| program | slice | fits | per-chip GiB (arg + out - alias + temp) | headroom | TFLOP/chip "
          "(compiled / formula) | est. step s (roofline) | est. MFU | collectives (count, GiB) | compile s |")
  lines = [head, "|" + "---|" * 10]
  for r in rows:
    if "memory_gib" not in r:
      lines.append(f"| {r['program']} | {r['slice']} | **no** | {r['error'][:120]} | | | | | | "
                   f"{r['compile_seconds']:.0f} |")
      continue
    m = r["memory_gib"]
    fl = f"{r['flops_per_chip'] / 1e12:.2f}"
    if r.get("formula_flops_per_chip"):
      fl += f" / {r['formula_flops_per_chip'] / 1e12:.2f}"
    coll = ", ".join(f"{op} {c['count']} ({c['bytes'] / GIB:.2f})" for op, c in r["collectives"].items()
                     if c["count"])
    mfu = f"{100 * r['estimated_mfu']:.0f}% ({r['bound']}-bound)" if r.get("estimated_mfu") else ""
    lines.append(f"| {r['program']} | {r['slice']} | {'yes' if r['fits'] else '**no**'} | "
                 f"{m['total']:.2f} ({m['argument']:.2f} + {m['output']:.2f} - {m['alias']:.2f} + "
                 f"{m['temporary']:.2f}) / {r['hbm_gib']:.0f} | {100 * r['headroom']:.0f}% | {fl} | "
                 f"{_secs(r.get('estimated_step_seconds'))} | {mfu} | {coll or 'none'} | {r['compile_seconds']:.0f} |")
  return "\n".join(lines)


def _secs(s) -> str:
  return "n/a" if s is None else f"{s:.3f}"


def write_json(path: str, rows: list[dict], meta: dict) -> None:
  """The report as JSON, written atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"meta": meta, "programs": rows}, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def main(config, topology: str, num_slices: int = 1, json_path: str = "", headroom: float = 0.10) -> list[dict]:
  """The CLI: compile, print the table, write the JSON."""
  sl = parse_topology(topology, num_slices)
  print(f"moegrow.aot: compiling every program of the run for {sl.name} ({sl.generation}:{sl.grid}"
        f"{f' x {sl.num_slices} slices' if sl.num_slices > 1 else ''}, {sl.chips} chips, "
        f"{sl.hbm_bytes / GIB:.0f} GiB HBM each)", flush=True)
  rows = compile_config(config, sl, headroom, log=lambda s: print(s, flush=True))
  print(table(rows))
  print("Step times and MFU are estimates: a roofline lower bound on time (formula FLOPs with remat at peak, "
        "or collective bytes at the ICI rate); not measurements.")
  if json_path:
    write_json(json_path, rows, {"topology": topology, "num_slices": num_slices, "slice": sl.name,
                                 "chips": sl.chips, "headroom": headroom, "jax": jax.__version__})
    print(f"wrote {json_path}")
  bad = [r["program"] for r in rows if not r["fits"]]
  if bad:
    print(f"does not fit {sl.name}: {', '.join(bad)}")
  return rows


def _cli() -> None:
  from absl import app, flags, logging
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v5e:8x8, v4:4x4x4, v5p:4x4x4, or v5e-64, v4-128, ...")
  flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (data parallel across them).")
  flags.DEFINE_string("json", "", "Write the report here as JSON.")
  flags.DEFINE_float("headroom", 0.10, "Fraction of HBM to keep free for 'fits with headroom'.")
  flags.mark_flags_as_required(["config", "topology"])
  FLAGS = flags.FLAGS

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    run_command(lambda: main(FLAGS.config, FLAGS.topology, FLAGS.num_slices, FLAGS.json, FLAGS.headroom))
  app.run(run)


if __name__ == "__main__":
  _cli()
