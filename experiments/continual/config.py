"""One arm of the continual figure as an ordinary moegrow config.

  python -m moegrow.main --config=experiments/continual/config.py:small,grow_freeze_distill --workdir=runs/c
(every arm but `joint` expects base's checkpoint N copied into its workdir first, or trains its
own stage 0; `python -m experiments.continual.run` does all of it, for several seeds.)
Expected (3 seeds, mean): Shakespeare forgetting plain 0.86, replay_25 0.20, ewc_hi 0.37,
grow_freeze 0.89, grow_freeze_distill 0.18, lora_4 0.65, lora_64 0.84 nats; Python loss 2.37-2.44
except ewc_hi (2.69), grow_freeze_distill (2.68), lora_4 (2.78) and lora_16 (2.56).
`pod,<arm>`: the same arm at pod scale (C4 then code; see the README's pod section).
See experiments/continual/README.md.
"""
from experiments.continual import figure
from experiments.harness import size_arm_config


def get_config(arg: str = "small,plain"):
  return size_arm_config("experiments/continual/config.py", arg or "small,plain", figure.SIZES, figure.configs)
