"""One arm of the balance figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/balance/config.py:small,free16 --workdir=runs/b
Arms: aux16, free16, aux32, free32 (sigmoid top-2 routing; the Switch auxiliary loss, or loss-free
balancing's selection bias). Results and the measured effects: experiments/balance/README.md.
"""
from experiments.balance import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,free16"):
  return size_arm_config("experiments/balance/config.py", arg or "small,free16", figure.SIZES, figure.configs)
