"""Helpers of the figure tests: run a figure's entry point in a fresh process, check a figure's CSV."""
import math
import os
import subprocess
import sys

from _tiny import csv_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1)


def run_module(module, *args, timeout=600, ok=True):
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                     timeout=timeout)
  if ok:
    assert p.returncode == 0, f"{module} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return p


def check_results_csv(path, arms, seeds):
  """Every arm and seed, finite losses, >= 2 points per (arm, seed, domain), strictly increasing x."""
  rows = csv_rows(path)
  assert rows, f"{path} has no rows"
  assert {r["arm"] for r in rows} == set(arms), f"arms {sorted({r['arm'] for r in rows})}"
  assert {int(r["seed"]) for r in rows} == set(seeds)
  bad = [r for r in rows if not math.isfinite(float(r["loss"]))]
  assert not bad, f"non-finite losses: {bad[:3]}"
  domains = {r["domain"] for r in rows}
  assert {"mean", "shakespeare_plays", "python_stdlib"} <= domains, f"domains {sorted(domains)}"
  for a in arms:
    for s in seeds:
      for d in domains:
        xs = [float(r["x"]) for r in rows if r["arm"] == a and int(r["seed"]) == s and r["domain"] == d]
        assert len(xs) >= 2, f"{a}/{s}/{d}: {len(xs)} points"
        assert all(b > x for x, b in zip(xs, xs[1:])), f"{a}/{s}/{d}: x not increasing: {xs}"
  return rows
