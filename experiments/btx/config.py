"""One arm of the btx figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/btx/config.py:small,ft_0 --workdir=runs/m
(the btx arms read the seed arm's checkpoint 150 from btx.seed: give it a real path;
`python -m experiments.btx.run` runs every arm for 3 seeds.)
Expected: see experiments/btx/README.md.
"""
from experiments.btx import figure


def get_config(arg: str = "small,btx"):
  parts = (arg or "small,btx").split(",")
  cfgs = figure.configs(parts[0]) if len(parts) == 2 else {}
  if len(parts) != 2 or parts[1] not in cfgs:
    raise ValueError(f"experiments/btx/config.py: expected '<size>,<arm>' with arm in {sorted(cfgs)}, "
                     f"got {arg!r}")
  return cfgs[parts[1]]
