"""Function-preserving vs non-preserving growth: the loss spike at the growth step.

  python -m experiments.preserving.run [--quick] [--seeds 0,1,2] [--workdir runs/preserving] [--data_dir DIR]

Arms: experiments/preserving/figure.py; harness: experiments/harness.py. Writes preserving.csv,
preserving.png (held-out loss vs FLOPs), summary.md (final-loss claims), spike.csv (one row per
run: certificate, training-loss spike, steps to recover, final loss), spike_summary.md (mean ± SE
per arm and the spike's paired comparisons) and spike.png (training loss around the growth step)
into the workdir; rerunning skips finished runs and resumes the others.
"""
import sys

from experiments import harness
from experiments.preserving.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
