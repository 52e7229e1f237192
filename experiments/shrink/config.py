"""One arm of the shrink figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/shrink/config.py:small,prune_reap --workdir=runs/s
(a shrunk arm alone trains its own 8-expert stage first; `python -m experiments.shrink.run` starts
every shrunk arm from e8's checkpoint at the cut instead, for several seeds.)
Arms: e8, e4, prune_frequency, prune_reap, prune_random, merge_output, prune_reap_distill (8 -> 4
experts after N steps, then M steps of recovery). Results and the measured effects:
experiments/shrink/README.md.
"""
from experiments.harness import size_arm_config
from experiments.shrink import figure


def get_config(arg: str = "small,prune_reap"):
  return size_arm_config("experiments/shrink/config.py", arg or "small,prune_reap", figure.SIZES, figure.configs)
