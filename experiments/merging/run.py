"""Weight merging on one base: linear mode connectivity, soups, task arithmetic vs TIES vs DARE.

  python -m experiments.merging.run [--quick] [--seeds 0,1,2] [--workdir runs/merging] [--data_dir DIR]

Arms and merges: experiments/merging/figure.py; harness: experiments/harness.py. Writes
merging.csv / merging.png (training curves), merging_points.csv, merging_summary.md and
merging_merges.png (the merges) into the workdir; rerunning skips finished runs and merges.
"""
import sys

from experiments import harness
from experiments.merging.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
