"""Branch-Train-MiX vs sparse upcycling vs a linear merge of the branches vs dense continuation.

  python -m experiments.btx.run [--quick] [--seeds 0,1,2] [--workdir runs/btx] [--data_dir DIR]

Arms: experiments/btx/figure.py; harness: experiments/harness.py. Writes btx.csv / btx.png
(validation loss vs FLOPs after the seed), summary.md (claims, routing), btx_routing.csv and
btx_routing.png into the workdir; rerunning skips finished runs and resumes the others.
"""
import sys

from experiments import harness
from experiments.btx.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
