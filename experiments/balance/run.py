"""Auxiliary-loss vs loss-free load balancing at E=16 and E=32 experts, top-2.

  python -m experiments.balance.run [--quick] [--seeds 0,1,2] [--workdir runs/balance] [--data_dir DIR]

Arms: experiments/balance/figure.py; harness: experiments/harness.py. Writes balance.csv,
balance.png (loss curves), summary.md (claims), load.csv, load_summary.md and load.png (max / mean
expert load over training) into the workdir; rerunning skips finished runs and resumes the others.
"""
import sys

from experiments import harness
from experiments.balance.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
