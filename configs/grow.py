"""The default growth experiment: dense -> sparse upcycling at a checkpoint boundary.

Stage 0 trains a dense byte-level LM on the Shakespeare + Python-stdlib mixture; at the
boundary its MLPs in every other layer are upcycled to E=8 experts, top-2 (renormalised gating:
the upcycled model computes exactly the dense function, certified on held-out batches), the Adam
moments are carried into every expert, and training continues on the same data stream.

Variants: `tiny` (tests: 2 x 100 steps, seconds), `small` (the main job: 2 x 300 steps of
16 x 256 bytes, d=256, 4 layers; ~7 minutes on 2 CPU cores), `pod` (dense -> E=8 -> E=16 at TPU
pod scale; see `pod()`).

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
  if variant == "pod":
    return pod()
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


def pod():
  """The pod-scale growth run: lm.py:pod's model (d=1024, 16 layers, 16 heads, d_ff 4096,
  bfloat16, sequence 2048, global batch 512, c4/en) dense for 20k steps, upcycled to E=8 top-2
  experts in every other layer (0.97B total / 0.37B active parameters) for 40k steps, then 8 -> 16
  experts (add_experts: exact, the new experts start as copies that cannot win until trained;
  1.77B total / 0.37B active) for 40k steps. Mesh (data=-1, fsdp=8, expert=8): 1 then 2 experts
  per chip. Check that every stage and boundary fits a slice before launching:
    python -m moegrow.aot --config=configs/grow.py:pod --topology=v5e-64
  (numbers per slice in benchmarks/README.md, "TPU slices").
  """
  c = lm.get_config("pod")
  c.model.update(moe_layers="none")  # stage 0 is dense; the ops below make it sparse
  c.train.steps = 100_000
  c.stages = (
      dict(name="dense", steps=20_000),
      dict(name="moe8", steps=40_000,
           ops=(dict(op="upcycle", layers="every_other", num_experts=8, top_k=2, gating="topk_softmax"),)),
      dict(name="moe16", steps=40_000, ops=(dict(op="add_experts", num_experts=16),)),
  )
  return c
