"""One arm of the Sparse Upcycling figure (Komatsuzaki et al. 2023) as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/upcycling/config.py:small,upcycled --workdir=runs/up
(`dense` and `upcycled` expect dense_base's checkpoint N copied into their workdir first.) The
whole figure, sharing the dense checkpoints, about 27 minutes on 2 CPU cores:

  python -m experiments.upcycling.run --seeds 0,1,2

Arms: dense_base, dense, upcycled, moe_scratch; sizes: small (the figure: d=128, N = 300 dense
steps, M = 150 upcycled steps, E=8 top-2 in layers 1 and 3), quick (tests).
Expected (3 seeds, final mean loss at equal extra FLOPs): dense 1.965, upcycled 1.978, scratch
MoE 2.055 (upcycled beats the scratch MoE by 0.077 ± 0.006, separated; upcycled vs dense
-0.013 ± 0.009, not separated). See experiments/upcycling/README.md.
"""
from experiments.upcycling import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,upcycled"):
  return size_arm_config("experiments/upcycling/config.py", arg or "small,upcycled", figure.SIZES, figure.configs)
