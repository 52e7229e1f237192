"""Plot the Sparse Upcycling experiment: validation loss vs extra training FLOPs after the dense checkpoint.

  python -m experiments.upcycling.plot [--workdir runs/upcycling]

Reads `plan.json` and every run's `metrics.jsonl` under the workdir; writes `upcycling.csv`
(variant, step, extra_flops, total_flops, domain, loss, bpb; domain `mean` = mean over domains)
and `upcycling.png` (one panel for the mean, one per domain), and prints final losses at equal
extra FLOPs. x = FLOPs spent after the dense checkpoint at step N: (step - N) * FLOPs/step for the
dense and upcycled continuations (both start from the dense run's evaluation at step N, the
upcycling being function-preserving), and step * FLOPs/step - N * dense FLOPs/step (its total
minus the dense run's sunk FLOPs) for the MoE from scratch, whose early points are negative.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os

import numpy as np

CURVES = ("dense", "upcycled", "moe_scratch")
LABELS = {"dense": "dense continued", "upcycled": "upcycled MoE (E=8, top-2)",
          "moe_scratch": "MoE from scratch (x = total - dense sunk FLOPs)"}
STYLE = {"dense": ("tab:blue", "o"), "upcycled": ("tab:red", "s"), "moe_scratch": ("tab:green", "^")}


def read_evals(workdir: str) -> dict[int, dict[str, dict[str, float]]]:
  """step -> domain -> {'loss', 'bpb'} from a run's metrics.jsonl (a resumed step's last row wins)."""
  out: dict[int, dict[str, dict[str, float]]] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      for k, v in row.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("loss", "bpb"):
          out.setdefault(int(row["step"]), {}).setdefault(parts[1], {})[parts[2]] = float(v)
  return out


def rows(workdir: str) -> list[dict]:
  """One row per (variant, eval step, domain incl. 'mean'), sorted by variant order then step."""
  with open(os.path.join(workdir, "plan.json")) as f:
    plan = json.load(f)
  n, fp = plan["dense_steps"], plan["flops_per_step"]
  base = read_evals(os.path.join(workdir, "dense_base"))
  if n not in base:
    raise ValueError(f"{workdir}/dense_base/metrics.jsonl has no evaluation at the dense checkpoint (step {n})")
  out = []
  for v in CURVES:
    ev = read_evals(os.path.join(workdir, v))
    end = plan["end_step"][v]
    if v == "moe_scratch":
      points = {s: e for s, e in ev.items() if s <= end}
      total = lambda s: s * fp["moe"]
    else:
      points = {n: base[n], **{s: e for s, e in ev.items() if n < s <= end}}
      f = fp["dense" if v == "dense" else "moe"]
      total = lambda s, f=f: n * fp["dense"] + (s - n) * f
    for s in sorted(points):
      doms = points[s]
      mean = {k: float(np.mean([d[k] for d in doms.values()])) for k in ("loss", "bpb")}
      for dom, d in list(doms.items()) + [("mean", mean)]:
        out.append({"variant": v, "step": s, "extra_flops": total(s) - plan["sunk_flops"], "total_flops": total(s),
                    "domain": dom, "loss": d["loss"], "bpb": d["bpb"]})
  return out


def write_csv(path: str, table: list[dict]) -> None:
  cols = ["variant", "step", "extra_flops", "total_flops", "domain", "loss", "bpb"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in table:
      w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) and k in ("loss", "bpb") else r[k]) for k in cols})


def curve(table, variant, domain):
  pts = sorted((r["extra_flops"], r["loss"]) for r in table if r["variant"] == variant and r["domain"] == domain)
  return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def summary(table: list[dict]) -> tuple[list[dict], float]:
  """Per variant: final point, and every variant's loss interpolated at the common budget
  (the smallest final extra FLOPs over the variants)."""
  domains = list(dict.fromkeys(r["domain"] for r in table))
  budget = min(curve(table, v, "mean")[0][-1] for v in CURVES)
  out = []
  for v in CURVES:
    last = max(r["step"] for r in table if r["variant"] == v)
    row = {"variant": v, "steps": last, "extra_flops": curve(table, v, "mean")[0][-1]}
    for d in domains:
      x, y = curve(table, v, d)
      row[f"{d}@budget"] = float(np.interp(budget, x, y))
    out.append(row)
  return out, budget


def plot(path: str, table: list[dict], plan: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  domains = ["mean"] + [d for d in dict.fromkeys(r["domain"] for r in table) if d != "mean"]
  fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 4.3))
  scale = 10 ** math.floor(math.log10(max(plan["extra_flops"], 1)))
  xmax = max(r["extra_flops"] for r in table) / scale
  for ax, d in zip(np.atleast_1d(axes), domains):
    lo, hi = math.inf, -math.inf
    for v in CURVES:
      x, y = curve(table, v, d)
      x = x / scale
      keep = x >= 0  # the scratch MoE enters from the left edge: keep one point before 0
      first = int(np.argmax(keep)) if keep.any() else len(x)
      x, y = x[max(first - 1, 0):], y[max(first - 1, 0):]
      color, marker = STYLE[v]
      ax.plot(x, y, color=color, marker=marker, ms=3.5, lw=1.6, label=LABELS[v])
      vis = y[x >= 0]
      if vis.size:
        lo, hi = min(lo, vis.min()), max(hi, vis.max())
    pad = 0.08 * (hi - lo) if hi > lo else 0.05
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(0, xmax * 1.02 if xmax > 0 else 1)
    ax.set_title("mean over domains" if d == "mean" else d)
    ax.set_xlabel(f"extra training FLOPs after the dense checkpoint (x 1e{int(math.log10(scale))})")
    ax.set_ylabel("validation loss (nats/byte-token)")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend(fontsize=8, loc="best")
  fp = plan["flops_per_step"]
  fig.suptitle(f"Sparse upcycling ({plan['size']}): dense checkpoint after {plan['dense_steps']} steps "
               f"(sunk {plan['sunk_flops']:.2e} FLOPs); dense {fp['dense']:.2e}, MoE {fp['moe']:.2e} FLOPs/step",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "plan.json")) as f:
    plan = json.load(f)
  table = rows(workdir)
  write_csv(os.path.join(workdir, "upcycling.csv"), table)
  plot(os.path.join(workdir, "upcycling.png"), table, plan)
  summ, budget = summary(table)
  cols = [k for k in summ[0]]
  print(f"validation loss (nats/token) at equal extra FLOPs = {budget:.3e} (linear interpolation between evals)")
  print("  ".join(f"{c:>22}" for c in cols))
  for r in summ:
    print("  ".join(f"{r[c]:>22.4f}" if isinstance(r[c], float) and c != "extra_flops" else
                    (f"{r[c]:>22.3e}" if c == "extra_flops" else f"{r[c]:>22}") for c in cols))
  print(f"wrote {os.path.join(workdir, 'upcycling.csv')} and {os.path.join(workdir, 'upcycling.png')}")
  return summ


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default=os.path.join("runs", "upcycling"))
  main(ap.parse_args().workdir)
