"""One arm of the function-preserving growth figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/preserving/config.py:small,wide_ramped --workdir=runs/p
(a grown arm given alone trains its own stage 0, identical to small's for the same seed;
`python -m experiments.preserving.run --seeds 0,1,2` runs every arm and seed, sharing stage 0, and
writes the spike table.) Arms: small, wide_exact, wide_random, wide_noisy, wide_ramped,
deep_exact, deep_random, deep_stack, deep_ramped, wide_scratch, deep_scratch; sizes: small (the
figure), quick (tests), pod (README, "Pod scale").
Expected (3 seeds, mean): the certificate's loss change at step 150 is exactly 0 for *_exact,
*_ramped and small, +0.002 for the fresh random units (wide_random, deep_random), +0.72 for
wide_noisy and +0.06 for deep_stack; final losses 2.60-2.65: exact widening ends 0.022 behind
fresh units (separated, against the claim), no other arm separated from its exact counterpart. See experiments/preserving/README.md.
"""
from experiments.preserving import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,wide_exact"):
  return size_arm_config("experiments/preserving/config.py", arg or "small,wide_exact", figure.SIZES, figure.configs)
