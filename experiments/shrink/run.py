"""Shrinking the expert table 8 -> 4 mid-run: pruning, merging, distillation, against scratch.

  python -m experiments.shrink.run [--quick] [--seeds 0,1,2] [--workdir runs/shrink] [--data_dir DIR]

Arms: experiments/shrink/figure.py; harness: experiments/harness.py. Writes shrink.csv, shrink.png
(loss curves), summary.md (claims), cut.csv, cut_summary.md and cut.png (the loss right after the
cut and after recovery, per arm) into the workdir; rerunning skips finished runs and resumes the
others.
"""
import sys

from experiments import harness
from experiments.shrink.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
