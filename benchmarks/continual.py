"""What continual-learning objectives cost: train-step time with EWC, distillation and both,
against the plain step of the same model.

  python -m benchmarks.continual [--quick]

Student: d=256, 4 layers, E=4 top-2 in every other layer (the model after add_experts 2 -> 4);
teacher (distillation): the pre-growth model, E=2. Batch 16 x 256 byte tokens, float32, one
device. EWC adds an elementwise penalty over every parameter (Fisher and anchor: two more
params-sized reads); distillation adds a teacher forward (no backward) and a KL over the vocab:
expected about +1/3 of a step (a forward is about a third of forward + backward). Candidates are
timed in alternating rounds in one process (median per call); the table reports ratios.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import header, print_table, time_interleaved, train_step_fn, write_json
from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.train import steps


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="short timings (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/continual.json")
  args = ap.parse_args()
  mt = 0.5 if args.quick else 3.0
  base = dict(d_model=256, num_layers=4, num_heads=4, d_ff=1024, moe_layers="every_other", top_k=2,
              expert_d_ff=1024)
  student, teacher = ModelConfig(**base, num_experts=4), ModelConfig(**base, num_experts=2)
  teacher_params = tf.init_params(teacher, 1)

  def ewc_ctx(state):
    p = state["params"]
    f32 = lambda x: jnp.abs(x).astype(jnp.float32) + 0  # a positive Fisher, its own buffers
    return {"fisher": jax.tree_util.tree_map(f32, p), "anchor": jax.tree_util.tree_map(lambda x: x + 0, p)}

  cands = {
      "plain": (None, lambda s: None),
      "EWC": (steps.Objective(ewc_weight=1.0), lambda s: {"ewc": ewc_ctx(s)}),
      "distill": (steps.Objective(distill_weight=0.5, temperature=2.0, teacher_cfg=teacher),
                  lambda s: {"teacher": teacher_params}),
      "EWC + distill": (steps.Objective(ewc_weight=1.0, distill_weight=0.5, temperature=2.0, teacher_cfg=teacher),
                        lambda s: {"ewc": ewc_ctx(s), "teacher": teacher_params}),
  }
  batch, seq = 16, 256
  fns, compile_s = {}, {}
  for name, (obj, ctx) in cands.items():
    fns[name], compile_s[name], _ = train_step_fn(student, batch, seq, obj, ctx)
  times = time_interleaved({n: (f, ()) for n, f in fns.items()}, 4 * mt)
  rows = [{"objective": n, "step ms": 1e3 * t, "vs plain": t / times["plain"], "compile s": compile_s[n]}
          for n, t in times.items()]
  print(header("continual-learning objectives: train-step time"))
  print(f"student d=256, 4 layers, E=4 top-2 every other layer; teacher E=2; batch {batch} x {seq}")
  print_table(rows, ["objective", "step ms", "vs plain", "compile s"])
  write_json(args.out, {"header": header("continual"), "rows": rows})


if __name__ == "__main__":
  main()
