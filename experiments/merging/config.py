"""One arm of the merging figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/merging/config.py:small,ft_0 --workdir=runs/m
(fine-tune arms expect base's checkpoint 150 copied into their workdir first, or train their own
first 150 steps; `python -m experiments.merging.run` does all of it, and the merges, for 3 seeds.)
Expected (3 seeds, mean loss over both domains): loss barrier 0.000 between two fine-tunes of
base, 0.81 ± 0.05 between models from different inits; uniform soup 2.323, greedy soup 2.317
vs best ingredient 2.326; task arithmetic 2.387, TIES (density 0.4) 2.470. See
experiments/merging/README.md.
"""
from experiments.merging import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,base"):
  return size_arm_config("experiments/merging/config.py", arg or "small,base", figure.SIZES, figure.configs)
