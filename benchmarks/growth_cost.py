"""Growth cost (issue "scale and speed"): time and peak memory of growing a checkpoint offline vs a
plain Orbax restore + save of the grown size.

  python -m benchmarks.growth_cost [--quick] [--out benchmarks/results/growth_cost.json]

Setup: a real stage-0 checkpoint of a dense byte-level LM (default d=512, 8 layers, d_ff=2048,
8 heads; --quick: d=128, 2 layers, d_ff=512), written the way the trainer writes it (one train
step on the data mixture, so params and Adam moments are dense random-looking floats, metadata
{model, stage, lineage}, data iterator state), with configs/grow.py's stages (stage 1: upcycle
every other layer to E=8 top-2). Each job runs in its OWN subprocess, so its peak RSS is its own:
  make      writes the source checkpoint (not part of the comparison);
  idle      imports jax + moegrow (trainer, data, Orbax) and starts the backend: runtime RSS;
  grow      stages.grow_offline (what `python -m moegrow.grow` runs): restore at the old
            shapes, certificate eval, upcycle params + moments under jit, certificate eval, save;
  baseline  checkpoint.restore of the grown checkpoint + checkpoint.save to a new directory with
            the same managers (async save, then wait).
Timed region (in the child, after imports): from just before checkpoint.restore to just after
the save has finished. The grow child wraps the library's own functions (restore, held-out eval,
own_buffers, save) to time its phases and records jit compile time per phase through
jax.monitoring. Targets: growth time <= 1.2 x restore+save; peak RSS - runtime <= 1.1 x
(old + new state bytes), state = params + optimizer state (Adam mu, nu), float32.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"full": dict(d_model=512, num_layers=8, num_heads=8, d_ff=2048),
         "quick": dict(d_model=128, num_layers=2, num_heads=2, d_ff=512)}
TIME_TARGET, MEM_TARGET = 1.2, 1.1
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
MB = 2**20


# ------------------------------------------------------------------ child side

def _maxrss() -> int:
  """Peak RSS of this process in bytes."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r if sys.platform == "darwin" else r * 1024)


def _rss() -> int:
  """Current RSS of this process in bytes (0 where /proc is missing)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def _config(size: str):
  from moegrow.configs import grow as grow_config
  c = grow_config.get_config("small")
  c.model.update(**SIZES[size])
  return c


class Phases:
  """A timeline of labelled segments: wall seconds, jit compile seconds, RSS at the end of each."""

  def __init__(self):
    import jax
    self.label, self.t = "start", time.perf_counter()
    self.rows: list[dict] = []
    self.compile = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **_):
    if event in COMPILE_EVENTS:
      self.compile += duration

  def mark(self, label: str) -> float:
    now = time.perf_counter()
    self.rows.append({"phase": self.label, "s": now - self.t, "compile_s": self.compile, "rss_mb": _rss() / MB,
                      "peak_rss_mb": _maxrss() / MB, "t_end": now})
    self.label, self.t, self.compile = label, now, 0.0
    return now

  def wrap(self, module, name: str, label, after, block_args: bool = False, block_out: bool = True) -> None:
    """Time calls of module.name as `label`, then start phase `after` (each a str, or a callable
    of the call number)."""
    import jax
    fn = getattr(module, name, None)
    if fn is None:
      print(f"warning: {module.__name__}.{name} not found; phases are coarser", file=sys.stderr)
      return
    calls = [0]

    def timed(*args, **kw):
      if block_args:  # finish the work this call waits on anyway, so it is billed to the phase before
        jax.block_until_ready([a for a in args if not hasattr(a, "eval_step")])
      n = calls[0]
      calls[0] += 1
      self.mark(label(n) if callable(label) else label)
      out = fn(*args, **kw)
      if block_out:
        jax.block_until_ready(out)
      self.mark(after(n) if callable(after) else after)
      return out
    setattr(module, name, timed)


def child_make(args) -> dict:
  import jax
  from moegrow import checkpoint
  from moegrow.orchestrate import parts
  from moegrow.params.trees import to_plain
  from moegrow.train import loop, steps
  config = _config(args.size)
  plan = parts.resolve_stages(config, parts.model_config(config))
  tr = config.train
  mesh = parts.make_mesh(config)
  old, new = (steps.build_program(st.cfg, tr, mesh) for st in plan[:2])
  state = old.init(jax.random.key(tr.seed))
  it = parts.train_iter(config)
  state, _ = old.train_step(state, steps.to_global(old, next(it)))  # dense, non-zero Adam moments
  meta = parts.checkpoint_meta(plan[0], [], step=0)
  mngr = parts.manager(os.path.join(args.dir, "src"), 0, tr)
  checkpoint.save(mngr, int(state["step"]), state, meta, loop.global_data_state(it))
  mngr.wait_until_finished()
  mngr.close()

  def nbytes(tree):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))

  def nparams(p):
    return int(sum(x.size for x in jax.tree_util.tree_leaves(p["params"])))
  return {"old_state_bytes": nbytes(old.abstract_state), "new_state_bytes": nbytes(new.abstract_state),
          "old_params": nparams(old.abstract_state), "new_params": nparams(new.abstract_state),
          "old_model": plan[0].cfg.to_dict(), "new_model": plan[1].cfg.to_dict(),
          "ops": to_plain(config.stages[1]["ops"])}


def child_idle(args) -> dict:
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint  # noqa: F401
  from moegrow import checkpoint  # noqa: F401
  from moegrow.orchestrate import stages  # noqa: F401
  jax.block_until_ready(jnp.zeros(()) + 1)  # start the backend
  return {}


def child_grow(args) -> dict:
  from moegrow import checkpoint
  from moegrow.orchestrate import boundary, stages
  from moegrow.train import probes
  config = _config(args.size)
  ph = Phases()
  ph.wrap(stages, "eval_sets", "load held-out batches", "setup: read meta, build programs")
  ph.wrap(checkpoint, "restore", "restore (old shapes)", "certificate setup")
  ph.wrap(probes, "domain_losses",
          lambda n: "certificate eval (old model)" if n == 0 else "certificate eval (grown model)",
          lambda n: "grow: jit upcycle params+moments, opt init" if n == 0 else "certificate json",
          block_args=True)
  ph.wrap(boundary, "own_buffers", "own_buffers copy", "device_put", block_args=True)
  ph.wrap(checkpoint, "save", "save (dispatch)", "save (wait for async write) + close")
  t0 = ph.mark("pre-restore setup")
  cert = stages.grow_offline(config, os.path.join(args.dir, "src"), args.workdir)
  t1 = ph.mark("end")
  rows = ph.rows[1:]
  i = next((k for k, r in enumerate(rows) if r["phase"] == "restore (old shapes)"), 0)
  t_restore = rows[i]["t_end"] - rows[i]["s"] if i else t0  # no restore phase found: whole call
  return {"timed_s": t1 - t_restore, "grow_offline_s": t1 - t0, "phases": rows,
          "compile_s": sum(r["compile_s"] for r in rows[i:]),
          "certificate_s": sum(r["s"] for r in rows if r["phase"].startswith("certificate eval")),
          "certificate_exec_s": sum(r["s"] - r["compile_s"] for r in rows if r["phase"].startswith("certificate eval")),
          "loss_change": cert["loss_change"], "params": [cert["params_before"], cert["params_after"]]}


def child_baseline(args) -> dict:
  import jax
  from moegrow import checkpoint
  from moegrow.orchestrate import parts
  from moegrow.train import steps
  config = _config(args.size)
  src_dir, prefix, step = checkpoint.locate(args.workdir)
  src = checkpoint.manager(src_dir, read_only=True, step_prefix=prefix)
  meta = checkpoint.read_meta(src, step)
  prog = steps.build_program(checkpoint.model_config(meta), config.train, parts.make_mesh(config))
  dst = checkpoint.manager(args.dst, keep=config.train.keep_checkpoints, step_prefix=prefix)
  t0 = time.perf_counter()
  state, meta, data_state = checkpoint.restore(src, step, prog.abstract_state)
  jax.block_until_ready(state)
  t1 = time.perf_counter()
  rss = {"rss_after_restore_mb": _rss() / MB, "peak_rss_after_restore_mb": _maxrss() / MB}
  checkpoint.save(dst, step, state, meta, data_state)
  dst.wait_until_finished()
  dst.close()
  t2 = time.perf_counter()
  src.close()
  return {"timed_s": t2 - t0, "restore_s": t1 - t0, "save_s": t2 - t1, **rss}


CHILDREN = {"make": child_make, "idle": child_idle, "grow": child_grow, "baseline": child_baseline}


def run_child(args) -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # as the CLIs do: Orbax logs every file at INFO
  out = CHILDREN[args.child](args)
  out["peak_rss"] = _maxrss()
  print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ parent side

def spawn(job: str, size: str, tmp: str, **paths) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.growth_cost", f"--child={job}", f"--size={size}", f"--dir={tmp}"]
  cmd += [f"--{k}={v}" for k, v in paths.items()]
  t0 = time.perf_counter()
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
  if p.returncode or not lines:
    sys.stderr.write(p.stdout[-5000:] + p.stderr[-5000:])
    raise SystemExit(f"child {job} failed (exit {p.returncode})")
  out = json.loads(lines[-1][len("RESULT "):])
  out["wall_s"] = wall
  return out


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="d=128, 2 layers (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/growth_cost.json")
  ap.add_argument("--repeats", type=int, default=1, help="grow/baseline pairs (median time, max RSS)")
  ap.add_argument("--tmpdir", default=None, help="where the checkpoints go (default: the system temp dir)")
  ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
  for k in ("child", "size", "dir", "workdir", "dst"):
    ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    return run_child(args)

  from benchmarks.common import header, print_table, write_json
  size = "quick" if args.quick else "full"
  tmp = tempfile.mkdtemp(prefix="growth_cost_", dir=args.tmpdir)
  try:
    made = spawn("make", size, tmp)
    idle = spawn("idle", size, tmp)
    grows, bases = [], []
    for r in range(args.repeats):
      wd = os.path.join(tmp, f"grown{r}")
      grows.append(spawn("grow", size, tmp, workdir=wd))
      bases.append(spawn("baseline", size, tmp, workdir=wd, dst=os.path.join(tmp, f"copy{r}")))
    disk = {"old": dir_bytes(os.path.join(tmp, "src", "checkpoints")),
            "new": dir_bytes(os.path.join(tmp, "grown0", "checkpoints"))}
  finally:
    if not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      print(f"checkpoints kept in {tmp}")

  runtime = idle["peak_rss"]
  g = min(grows, key=lambda x: abs(x["timed_s"] - np.median([y["timed_s"] for y in grows])))
  b = min(bases, key=lambda x: abs(x["timed_s"] - np.median([y["timed_s"] for y in bases])))
  g_rss, b_rss = max(x["peak_rss"] for x in grows), max(x["peak_rss"] for x in bases)
  old_b, new_b = made["old_state_bytes"], made["new_state_bytes"]
  jobs = [
      {"job": "idle (imports + backend)", "timed_s": None, "child_wall_s": idle["wall_s"], "peak_rss_MB": runtime / MB,
       "minus_runtime_MB": 0.0},
      {"job": "grow (grow_offline)", "timed_s": g["timed_s"], "child_wall_s": g["wall_s"], "peak_rss_MB": g_rss / MB,
       "minus_runtime_MB": (g_rss - runtime) / MB},
      {"job": "baseline restore+save (grown size)", "timed_s": b["timed_s"], "child_wall_s": b["wall_s"],
       "peak_rss_MB": b_rss / MB, "minus_runtime_MB": (b_rss - runtime) / MB},
  ]
  one_off = g["compile_s"] + g["certificate_exec_s"]
  ratios = {
      "time grow / restore+save": g["timed_s"] / b["timed_s"],
      "time (grow - all compile - certificate eval) / restore+save": (g["timed_s"] - one_off) / b["timed_s"],
      "mem (grow RSS - runtime) / (old + new state)": (g_rss - runtime) / (old_b + new_b),
      "mem (baseline RSS - runtime) / new state": (b_rss - runtime) / new_b,
  }
  targets = {"time grow / restore+save": TIME_TARGET, "mem (grow RSS - runtime) / (old + new state)": MEM_TARGET}
  m_old, m_new = made["old_model"], made["new_model"]
  print(header("growth cost: offline grow vs Orbax restore+save of the grown size"))
  print(f"# dense d={m_old['d_model']} L={m_old['num_layers']} d_ff={m_old['d_ff']} -> ops {made['ops']}")
  print(f"# params {made['old_params']:,} -> {made['new_params']:,}; state (params + Adam, float32) "
        f"{old_b / MB:.0f} MB -> {new_b / MB:.0f} MB in memory, {disk['old'] / MB:.0f} MB -> {disk['new'] / MB:.0f} MB "
        f"on disk; timed = restore start .. save finished; repeats {args.repeats}")
  print_table(jobs, ["job", "timed_s", "child_wall_s", "peak_rss_MB", "minus_runtime_MB"])
  print(f"\nbaseline: restore {b['restore_s']:.2f} s (RSS after it {b['rss_after_restore_mb']:.0f} MB, peak so far "
        f"{b['peak_rss_after_restore_mb']:.0f} MB), save {b['save_s']:.2f} s")
  print("grow phases (compile_s = jit trace+lower+compile inside the phase; peak RSS so far at its end):")
  prow = [{"phase": r["phase"], "s": r["s"], "compile_s": r["compile_s"], "rss_MB_at_end": r["rss_mb"],
           "peak_rss_MB_so_far": r["peak_rss_mb"]} for r in g["phases"]]
  print_table(prow, ["phase", "s", "compile_s", "rss_MB_at_end", "peak_rss_MB_so_far"])
  print(f"one-off costs inside the timed growth ({g['timed_s']:.2f} s): jit compile (all phases) {g['compile_s']:.2f} s, "
        f"certificate eval {g['certificate_s']:.2f} s ({g['certificate_exec_s']:.2f} s excluding its compile); "
        f"certificate loss change {g['loss_change']}")
  print()
  print_table([{"ratio": k, "value": v, "target": f"<= {targets[k]}" if k in targets else "",
                "ok": (v <= targets[k]) if k in targets else ""} for k, v in ratios.items()],
              ["ratio", "value", "target", "ok"])
  write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "header": header("growth cost"), "size": size,
                        "old_model": m_old, "new_model": m_new, "ops": made["ops"],
                        "params": [made["old_params"], made["new_params"]],
                        "state_bytes": {"old": old_b, "new": new_b}, "disk_bytes": disk,
                        "jobs": jobs, "grow_phases": prow, "grow_runs": grows, "baseline_runs": bases,
                        "idle": idle, "ratios": ratios, "targets": targets})


if __name__ == "__main__":
  main()
