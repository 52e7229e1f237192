"""Loss curves of a run: `<workdir>/loss.png` and `loss.csv` from metrics.jsonl (+ growth steps).

  python -m moegrow.train.plot <workdir>
"""
from __future__ import annotations

import csv
import glob
import json
import os
import sys


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = []
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue  # a torn line of a killed run (the next run repairs the file)
    return rows


def plot_run(workdir: str) -> str:
  """Writes loss.csv (step, series, value) and loss.png; returns the PNG path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  series: dict[str, list[tuple[int, float]]] = {}
  for r in rows:
    for k, v in r.items():
      if k == "loss" or (k.startswith("eval/") and k.endswith("/loss")):
        series.setdefault("train" if k == "loss" else k[5:-5], []).append((r["step"], v))
  growth = sorted(int(os.path.basename(p)[:-5]) for p in glob.glob(os.path.join(workdir, "growth", "*.json")))
  with open(os.path.join(workdir, "loss.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", "series", "loss"])
    for name, pts in series.items():
      w.writerows((s, name, f"{v:.6f}") for s, v in pts)
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, pts in series.items():
    xs, ys = zip(*pts)
    style = dict(lw=0.8, alpha=0.6) if name == "train" else dict(marker="o", lw=1.8)
    ax.plot(xs, ys, label=name if name == "train" else f"validation: {name}", **style)
  for g in growth:
    ax.axvline(g, color="k", ls="--", lw=1)
    ax.annotate("growth", (g, ax.get_ylim()[1]), xytext=(3, -12), textcoords="offset points", fontsize=8)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/byte token)")
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out = os.path.join(workdir, "loss.png")
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


if __name__ == "__main__":
  print(plot_run(sys.argv[1]))


def plot_loads(path: str, routing: dict, title: str, first_new: dict | None = None) -> str:
  """Heatmap of per-expert load (rows: domain x MoE layer, columns: experts); a line marks the
  first new expert of each layer that grew. `routing` is `probes.routing_report`'s output."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  labels, rows = [], []
  for d, layers in routing.items():
    for i, m in layers.items():
      labels.append(f"{d} / layer {i}")
      rows.append(m["load"])
  width = max(len(r) for r in rows)
  grid = np.full((len(rows), width), np.nan)
  for r, load in enumerate(rows):
    grid[r, :len(load)] = load
  # Room for the row labels, the title and the colorbar's label even with few experts or rows.
  fig, ax = plt.subplots(figsize=(max(5.0, 2.8 + 0.5 * width), max(2.6, 1.2 + 0.35 * len(rows))))
  im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
  ax.set_xticks(range(width))
  ax.set_yticks(range(len(rows)), labels, fontsize=7)
  ax.set_xlabel("expert")
  for e in sorted(set((first_new or {}).values())):
    ax.axvline(e - 0.5, color="w", lw=1.5, ls="--")
  fig.colorbar(im, ax=ax, label="fraction of assignments")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path
