"""One arm of the btx figure as an ordinary moegrow config.

  python -m moegrow.btx --config=experiments/btx/config.py:small,btx --workdir=runs/b \
      --config.btx.seed=<a seed run's checkpoint>
(`python -m experiments.btx.run` runs every arm, the seed included, for 3 seeds.)
Expected (3 seeds, mean validation loss over both domains): dense continuation 2.153, sparse
upcycling 2.168, BTX 2.332 (hidden-state router) / 2.330 (random), linear merge of the
branches 2.313; hidden-state routing sends 78% / 61% of Shakespeare / Python tokens to their
own branch's expert at the mix. `pod,<arm>`: the arm at pod scale (README, "Pod scale").
See experiments/btx/README.md.
"""
from experiments.btx import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,btx"):
  return size_arm_config("experiments/btx/config.py", arg or "small,btx", figure.SIZES, figure.configs)
