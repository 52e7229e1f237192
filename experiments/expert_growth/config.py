"""One arm of the expert-growth figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/expert_growth/config.py:small,grow50 --workdir=runs/g
(a grown arm alone trains its own 2-expert stage first; `python -m experiments.expert_growth.run`
starts every grown arm from e2's checkpoint at its switch step instead, for several seeds.)
Arms: e2, e4, grow25, grow50, grow75 (2 -> 4 experts, copy_noise, at 25/50/75% of 1000 steps).
Expected (Expert Upcycling, arXiv 2604.19835): gap closure (L_e2 - L_grown) / (L_e2 - L_e4) of
0.93-0.95, larger the earlier the growth: grow25 > grow50 > grow75 > 0, final losses
e4 <= grow25 <= grow50 <= grow75 <= e2. The full 3-seed run is pending; a seed-0 pilot of single
arms gave final mean losses e2 2.0530, e4 2.0423, grow50 2.0463 (closure 0.63; grow50 alone:
about 3 minutes on 2 busy CPU cores). See experiments/expert_growth/README.md.
"""
from experiments.expert_growth import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,grow50"):
  return size_arm_config("experiments/expert_growth/config.py", arg or "small,grow50", figure.SIZES, figure.configs)
