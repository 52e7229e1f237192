"""The continual pre-training frontier: forgetting vs learning on the Shakespeare -> Python shift.

  python -m experiments.continual.run [--quick] [--seeds 0,1,2] [--workdir runs/continual] [--data_dir DIR]

Arms: experiments/continual/figure.py; harness: experiments/harness.py. Writes continual.csv,
continual.png (loss curves), summary.md (claims), frontier.csv, frontier.png and
frontier_summary.md into the workdir; rerunning skips finished runs and resumes the others.
"""
import sys

from experiments import harness
from experiments.continual.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
