"""One arm of the G_stack figure (Du et al. 2024) as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/stacking/config.py:small,stack10 --workdir=runs/s
(a grown arm given alone trains its own 2-layer stage 0, identical to shallow's for the same seed;
`shallow` given alone trains 2 layers for the whole T steps, while the figure stops it at the last
switch point.) The whole figure, sharing the shallow runs:

  python -m experiments.stacking.run --seeds 0,1,2

Arms: shallow, deep_scratch, stack10, stack25, stack50; sizes: small (the figure: d=64, 2 -> 4
layers, T = 480 steps, switches at 48 / 120 / 240), quick (tests).
Expected (3 seeds, final mean loss at T): deep_scratch 2.190, stack10 2.199, stack25 2.204,
stack50 2.227 (stack10 beats stack50 by 0.028 ± 0.016, not separated; stack10 vs deep_scratch not
separated). The paper's claim, at 7B: G_stack reaches the from-scratch loss with 54.6% fewer FLOPs;
here 1 seed of 3 reaches it (6% / 12% saved at 10% / 25%). See experiments/stacking/README.md.
"""
from experiments.stacking import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,stack10"):
  return size_arm_config("experiments/stacking/config.py", arg or "small,stack10", figure.SIZES, figure.configs)
