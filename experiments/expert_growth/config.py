"""One arm of the expert-growth figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/expert_growth/config.py:small,grow50 --workdir=runs/g
(a grown arm alone trains its own 2-expert stage first; `python -m experiments.expert_growth.run`
starts every grown arm from e2's checkpoint at its switch step instead, for several seeds.)
Arms: e2, e4, grow25, grow50, grow75 (2 -> 4 experts, copy_noise, at 25/50/75% of 1000 steps).
Paper (Expert Upcycling, arXiv 2604.19835): gap closure (L_e2 - L_grown) / (L_e2 - L_e4) of
0.93-0.95, larger the earlier the growth. Measured (3 seeds, experiments/expert_growth/README.md):
the gap itself is not resolved at this scale (L_e2 - L_e4 = 0.013 ± 0.017 nats), so the
closures (grow25 0.39 ± 0.27, grow50 0.39 ± 0.03, grow75 0.18 ± 0.26) are undetermined; grow25
ends 0.019 ± 0.002 below grow75 (separated).
"""
from experiments.expert_growth import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,grow50"):
  return size_arm_config("experiments/expert_growth/config.py", arg or "small,grow50", figure.SIZES, figure.configs)
