"""G_stack (Du et al. 2024): growing 2 -> 4 layers by stacking at 10% / 25% / 50% of the budget
vs the 4-layer model from scratch.

  python -m experiments.stacking.run [--quick] [--seeds 0,1,2] [--workdir runs/stacking] [--data_dir DIR]

Arms: experiments/stacking/figure.py; harness: experiments/harness.py. Writes stacking.csv,
stacking.png (held-out loss vs training FLOPs), summary.md (final losses at equal tokens and the
claims), flops_saved.csv (per grown run: L*, F_scratch, F_grown, saved) and
flops_saved_summary.md (mean ± SE per arm, with 'never' counts) into the workdir; rerunning skips
finished runs and resumes the others.
"""
import sys

from experiments import harness
from experiments.stacking.figure import figure

if __name__ == "__main__":
  sys.exit(harness.run(figure, default_seeds="0,1,2"))
