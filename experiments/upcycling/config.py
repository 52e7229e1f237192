"""One arm of the Sparse Upcycling figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/upcycling/config.py:small,upcycled --workdir=runs/up
(`dense` and `upcycled` expect dense_base's checkpoint N copied into their workdir first;
`python -m experiments.upcycling.run` does all of it, for several seeds.)
Arms: dense_base, dense, upcycled, moe_scratch; sizes: small (the figure), quick (tests).
"""
from experiments.upcycling import figure


def get_config(arg: str = "small,upcycled"):
  parts = (arg or "small,upcycled").split(",")
  arms = ("dense_base", "dense", "upcycled", "moe_scratch")
  if len(parts) != 2 or parts[1] not in arms:
    raise ValueError(f"experiments/upcycling/config.py: expected '<size>,<arm>' with arm in {arms}, got {arg!r}")
  return figure.configs(parts[0])[parts[1]]
