"""Growing the expert table 2 -> 4 mid-run: gap closure vs the switch point.

  python -m experiments.expert_growth.run [--quick] [--seeds 0,1,2] [--workdir runs/expert_growth] [--data_dir DIR]

Arms: experiments/expert_growth/figure.py; harness: experiments/harness.py. Writes
expert_growth.csv, expert_growth.png (loss curves), summary.md (claims), gap_closure.csv,
gap_closure_summary.md and gap_closure.png into the workdir; rerunning skips finished runs and
resumes the others.
"""
import sys

from experiments import harness
from experiments.expert_growth.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
