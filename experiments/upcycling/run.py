"""Sparse Upcycling figure: dense continuation vs upcycled MoE vs MoE from scratch, at equal FLOPs.

  python -m experiments.upcycling.run [--quick] [--seeds 0,1,2] [--workdir runs/upcycling] [--data_dir DIR]

Arms and compute matching: experiments/upcycling/figure.py; harness: experiments/harness.py.
Writes upcycling.csv, upcycling.png, summary.csv and summary.md into the workdir; rerunning
skips finished runs and resumes interrupted ones.
"""
import sys

from experiments import harness
from experiments.upcycling.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure))
