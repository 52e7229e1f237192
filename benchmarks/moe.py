"""MoE vs dense: train-step time at equal active FLOPs, MFU, and the MoE layer alone.

  python -m benchmarks.moe [--quick]

Table 1 (train step, d=256, 4 layers, byte vocab, batch 16 x 256): dense d_ff=1024; MoE E=8
top-2 in every other layer (expert d_ff=1024), dropless and capacity 1.25; the dense model with
the same active FLOPs per token (d_ff=2048 in the MoE layers, 1024 elsewhere). Per-layer MLP costs
add, so its step time is measured as the mean of the all-1024 and all-2048 dense models.
Table 2 (layer alone, forward + backward, 4096 tokens, d=256): MoE E=8 top-2 expert hidden 1024
vs a dense SwiGLU MLP of hidden 2048 (same active FLOPs). Ratios are measured in one process,
candidates timed in alternating rounds (median per call).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import header, matmul_peak, print_table, time_interleaved, train_step_fn, write_json
from moegrow.flops import FORMULA, train_flops_per_token
from moegrow.config import ModelConfig
from moegrow.model.layers import Mlp
from moegrow.model.moe import MoeMlp

def layer_fn(layer, x):
  """(jitted forward + backward of sum(y^2), args) for an MLP or MoE layer."""
  g, s = nnx.split(layer)

  def loss(s, x):
    y = nnx.merge(g, s)(x)
    y = y[0] if isinstance(y, tuple) else y
    return jnp.sum(y * y)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (s, x)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="short timings (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/moe.json")
  args = ap.parse_args()
  mt = 0.5 if args.quick else 3.0
  peak = max(matmul_peak(jnp.float32, (1024, 2048)).values())
  base = dict(d_model=256, num_layers=4, num_heads=4, d_ff=1024)
  moe = dict(base, moe_layers="every_other", num_experts=8, top_k=2, expert_d_ff=1024)
  models = {
      "dense d_ff=1024": ModelConfig(**base),
      "dense d_ff=2048": ModelConfig(**dict(base, d_ff=2048)),
      "MoE E=8 k=2 dropless": ModelConfig(**moe, dispatch="dropless"),
      "MoE E=8 k=2 capacity 1.25": ModelConfig(**moe, dispatch="capacity", capacity_factor=1.25),
  }
  batch, seq = 16, 256
  times = time_interleaved({name: (train_step_fn(cfg, batch, seq).run, ()) for name, cfg in models.items()}, 4 * mt)
  times["dense equal-active"] = (times["dense d_ff=1024"] + times["dense d_ff=2048"]) / 2
  flops = {n: train_flops_per_token(c, seq) * batch * seq for n, c in models.items()}
  flops["dense equal-active"] = flops["MoE E=8 k=2 dropless"]
  eq = times["dense equal-active"]
  rows = [{"model": n, "step_ms": 1e3 * t, "vs_equal_active": t / eq, "tokens_per_s": batch * seq / t,
           "MFU": flops[n] / t / peak} for n, t in times.items()]
  print(header("MoE vs dense") + f" | measured float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  print(f"# {FORMULA}")
  print_table(rows, ["model", "step_ms", "vs_equal_active", "tokens_per_s", "MFU"])

  x = jax.random.normal(jax.random.key(0), (8, 512, 256))
  layers = {"dense MLP hidden 2048": Mlp(256, 2048, "swiglu", jnp.float32, nnx.Rngs(0))}
  for impl in ("blocks", "ragged_dot"):
    cfg = ModelConfig(**dict(moe, num_layers=1, moe_layers="all", moe_impl=impl))
    layers[f"MoE dropless ({impl})"] = MoeMlp(cfg, 8, nnx.Rngs(0))
  for impl, name in (("blocks", "MoE capacity 1.25 (blocks)"), ("ragged_dot", "MoE capacity 1.25 (einsum)")):
    cfg = ModelConfig(**dict(moe, num_layers=1, moe_layers="all", dispatch="capacity", moe_impl=impl))
    layers[name] = MoeMlp(cfg, 8, nnx.Rngs(0))
  lt = time_interleaved({n: layer_fn(l, x) for n, l in layers.items()}, 4 * mt)
  d = lt["dense MLP hidden 2048"]
  layer_flops = 3 * 2 * 3 * 4096 * 256 * 2048
  lrows = [{"layer (fwd+bwd, 4096 tokens)": n, "ms": 1e3 * t, "vs_dense": t / d, "MFU": layer_flops / t / peak}
           for n, t in lt.items()]
  print()
  print_table(lrows, ["layer (fwd+bwd, 4096 tokens)", "ms", "vs_dense", "MFU"])
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "peak_flops": peak, "formula": FORMULA,
                        "train_step": rows, "layer": lrows})


if __name__ == "__main__":
  main()
