"""Pod configs x TPU slices, compiled ahead of time on this host (no TPU): does each program fit,
per-chip memory, a roofline step-time estimate and its MFU, collective traffic, compile seconds.

  python -m benchmarks.tpu [--configs=configs/lm.py:pod,configs/grow.py:pod] [--slices=v5e-64,v4-128,v5p-128]

Needs the TPU compiler (`pip install -e ".[tpu]"`). One process compiles everything (libtpu is
loaded once). Step times and MFU are estimates, lower bounds on time (moegrow.aot: the formula's
FLOPs at peak or the collective bytes at the ICI rate, whichever is longer), not measurements.
Writes benchmarks/results/tpu.json and prints the summary table of benchmarks/README.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling needs no device

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

from moegrow import aot  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(spec: str):
  """'configs/lm.py:pod' -> the ConfigDict (as --config does)."""
  path, _, arg = spec.partition(":")
  module = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(module)
  module.loader.exec_module(mod)
  return mod.get_config(arg)


def summary(config: str, sl: aot.Slice, rows: list[dict]) -> dict:
  trains = [r for r in rows if r["kind"] == "train"]
  fitted = [r for r in rows if "memory_gib" in r]
  worst = max(fitted, key=lambda r: r["memory_gib"]["total"]) if fitted else None
  coll = lambda r: sum(c["bytes"] for c in r.get("collectives", {}).values()) / aot.GIB
  return {
      "config": config, "slice": sl.name, "programs": len(rows),
      "fits": all(r["fits"] for r in rows), "fits_with_headroom": all(r.get("fits_with_headroom") for r in rows),
      "max_gib": worst["memory_gib"]["total"] if worst else None, "max_program": worst["program"] if worst else None,
      "hbm_gib": sl.hbm_bytes / aot.GIB,
      "train": [{"program": r["program"], "gib": r.get("memory_gib", {}).get("total"),
                 "step_s": r.get("estimated_step_seconds"), "mfu": r.get("estimated_mfu"),
                 "collective_gib": coll(r) if "collectives" in r else None} for r in trains],
      "compile_s": sum(r["compile_seconds"] for r in rows),
  }


def _num(v, fmt: str) -> str:
  return "n/a" if v is None else format(v, fmt)


def markdown(sums: list[dict]) -> str:
  lines = ["| config | slice | fits (>= 10% headroom) | max per-chip GiB (program) | train step: est. s, est. MFU, "
           "collectives GiB per chip | compile s (all programs) |", "|" + "---|" * 6]
  for s in sums:
    train = "; ".join(f"{t['program'].split('/')[0]}: {_num(t['step_s'], '.2f')} s, "
                      f"{_num(t['mfu'] and 100 * t['mfu'], '.0f')}%, {_num(t['collective_gib'], '.1f')} GiB"
                      for t in s["train"])
    fits = ("yes" if s["fits_with_headroom"] else "yes, < 10% headroom") if s["fits"] else "**no**"
    mx = "n/a" if s["max_gib"] is None else f"{s['max_gib']:.2f} / {s['hbm_gib']:.0f} ({s['max_program']})"
    lines.append(f"| {s['config']} | {s['slice']} | {fits} | {mx} | {train} | {s['compile_s']:.0f} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default="configs/lm.py:pod,configs/grow.py:pod")
  ap.add_argument("--slices", default="v5e-64,v4-128,v5p-128")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "tpu.json"))
  args = ap.parse_args()
  sums, everything = [], []
  t0 = time.perf_counter()
  for spec in args.configs.split(","):
    for name in args.slices.split(","):
      sl = aot.parse_topology(name)
      print(f"== {spec} on {sl.name}", flush=True)
      rows = aot.compile_config(load_config(spec), sl, log=lambda s: print(s, flush=True))
      for r in rows:
        r["config"] = spec
      everything += rows
      sums.append(summary(spec, sl, rows))
  aot.write_json(args.out, everything, {"summaries": sums, "wall_seconds": time.perf_counter() - t0})
  print(markdown(sums))
  print(f"wrote {os.path.relpath(args.out)}; step times and MFU are roofline estimates (lower bounds on time), not measurements")


if __name__ == "__main__":
  main()
