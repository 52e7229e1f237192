"""The default growth experiment: dense -> sparse upcycling at a checkpoint boundary.

Stage 0 trains a dense byte-level LM on the Shakespeare + Python-stdlib mixture; at the
boundary its MLPs in every other layer are upcycled to E=8 experts, top-2 (renormalised gating:
the upcycled model computes exactly the dense function, certified on held-out batches), the Adam
moments are carried into every expert, and training continues on the same data stream.

Variants: `tiny` (tests: 2 x 100 steps, seconds), `small` (the main job: 2 x 300 steps of
16 x 256 bytes, d=256, 4 layers; ~7 minutes on 2 CPU cores).

Command:
  python -m moegrow.main --config=configs/grow.py:small --workdir=runs/grow
Expected (small): the certificate shows a held-out loss change |dloss| < 1e-5 on both domains
(measured: held-out loss 3.00445 -> 3.00445 python_stdlib, 2.14338 -> 2.14338 shakespeare_plays,
changes 0 and 0; 4.26M -> 15.28M parameters); final validation bits/byte 2.66 (python_stdlib)
and 2.66 (shakespeare_plays) at step 600. An earlier machine gave 2.70 / 2.73 with the same code
path (float summation order differs between CPUs). Wall: 7m20s on a 2-core machine with a
469 GFLOP/s matmul peak; about 4x that on one with 118 GFLOP/s.
"""
from moegrow.configs import lm


def get_config(arg: str = "small"):
  variant = arg or "small"
  c = lm.get_config(variant)
  steps = {"tiny": 100, "small": 300}[variant]
  c.train.steps = 2 * steps
  if variant == "tiny":
    c.train.update(eval_every=100, checkpoint_every=100)
  else:
    c.train.update(eval_every=150, checkpoint_every=150)
  c.stages = (
      dict(name="dense", steps=steps),
      dict(name="moe8", steps=steps,
           ops=(dict(op="upcycle", layers="every_other", num_experts=8, top_k=2, gating="topk_softmax"),)),
  )
  return c
