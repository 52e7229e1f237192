"""Machine matmul peak, dense train-step MFU at two sizes, compile time, cost as work grows.

  python -m benchmarks.mfu [--quick]

1. float32 / bfloat16 matmul throughput at several sizes (the MFU denominator: best float32).
2. Dense train-step MFU: d=256/4 layers and d=512/8 layers, byte vocabulary, batch 16 x 256.
3. Compile time of each train step.
4. MoE step time vs E in {2, 4, 8, 16, 32} at k=2 (every other layer, dropless; should stay flat)
   and dense step time vs sequence length 256 -> 2048 at a fixed 4096 tokens per batch.
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks.common import header, matmul_peak, print_table, time_fn, time_interleaved, train_step_fn, write_json
from moegrow.flops import FORMULA, train_flops_per_token
from moegrow.config import ModelConfig


def matmul_ceiling(cfg: ModelConfig, batch: int, seq: int, min_time: float) -> float:
  """Seconds for just the train step's matrix products (forward x@W and both backward
  products per weight, attention score/value products), run back to back in one jit."""
  n, d, f, h, a, v = batch * seq, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim, cfg.vocab_size
  shapes = [(n, d, h * a)] * 4 + [(n, d, f)] * (3 if cfg.mlp_act == "swiglu" else 2) + [(n, f, d)]
  shapes = shapes * cfg.num_layers + [(n, d, v)]
  import jax
  keys = iter(jax.random.split(jax.random.key(0), 4 * len(shapes) + 8))
  args = []
  for m, k, o in shapes:  # forward, grad wrt input, grad wrt weight
    args += [(jax.random.normal(next(keys), (m, k)), jax.random.normal(next(keys), (k, o)))]
    args += [(jax.random.normal(next(keys), (m, o)), jax.random.normal(next(keys), (o, k)))]
    args += [(args[-2][0].T, args[-1][0])]
  qk = [jax.random.normal(next(keys), (batch, h, seq, a)) for _ in range(2)]

  def run(args, qk):
    out = [x @ w for x, w in args]
    for layer in range(cfg.num_layers):  # per layer: scores + 5 products of the same size
      s = jnp.einsum("BHTA,BHSA->BHTS", qk[0] + layer, qk[1])  # (values fwd, 4 in the backward)
      out += [jnp.einsum("BHTS,BHSA->BHTA", s + i, qk[1]) for i in range(5)]
    return sum(o.sum() for o in out)
  return time_fn(jax.jit(run), args, qk, min_time=min_time)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default="benchmarks/results/mfu.json")
  args = ap.parse_args()
  mt = 0.5 if args.quick else 3.0
  print(header("matmul peak, MFU, compile time, scaling"))
  peaks = []
  for dt in (jnp.float32, jnp.bfloat16):
    for n, fl in matmul_peak(dt, (512, 1024, 2048), min_time=mt / 2).items():
      peaks.append({"dtype": jnp.dtype(dt).name, "n": n, "GFLOP/s": fl / 1e9})
  print_table(peaks, ["dtype", "n", "GFLOP/s"])
  peak = max(p["GFLOP/s"] for p in peaks if p["dtype"] == "float32") * 1e9
  print(f"\n# {FORMULA}")
  rows = []
  for name, cfg in {"d=256 L=4": ModelConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024),
                    "d=512 L=8": ModelConfig(d_model=512, num_layers=8, num_heads=8, d_ff=2048)}.items():
    run, compile_s, _ = train_step_fn(cfg, 16, 256)
    t = time_fn(run, min_time=mt)
    fl = train_flops_per_token(cfg, 256) * 16 * 256
    ceiling = matmul_ceiling(cfg, 16, 256, mt)
    rows.append({"model": name, "step_ms": 1e3 * t, "tokens/s": 16 * 256 / t, "GFLOP/step": fl / 1e9,
                 "MFU": fl / t / peak, "matmuls_only_ms": 1e3 * ceiling, "ceiling_MFU": fl / ceiling / peak,
                 "compile_s": compile_s})
  print_table(rows, ["model", "step_ms", "tokens/s", "GFLOP/step", "MFU", "matmuls_only_ms", "ceiling_MFU",
                     "compile_s"])
  steps, erows = {}, []
  for e in (2, 4, 8, 16, 32):
    cfg = ModelConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024, moe_layers="every_other",
                      num_experts=e, top_k=2)
    run, compile_s, _ = train_step_fn(cfg, 16, 256)
    steps[e] = (run, ())
    erows.append({"experts": e, "compile_s": compile_s})
  times = time_interleaved(steps, 5 * mt)
  for r in erows:
    r["step_ms"] = 1e3 * times[r["experts"]]
    r["vs_E=2"] = r["step_ms"] / erows[0]["step_ms"]
  print()
  print_table(erows, ["experts", "step_ms", "vs_E=2", "compile_s"])
  srows, steps = [], {}
  cfg = ModelConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024)
  for seq in (256, 512, 1024, 2048):
    steps[seq] = (train_step_fn(cfg, 4096 // seq, seq).run, ())
  times = time_interleaved(steps, 4 * mt)
  for seq, t in times.items():
    fl = train_flops_per_token(cfg, seq) * 4096
    srows.append({"seq_len": seq, "batch": 4096 // seq, "step_ms": 1e3 * t, "MFU": fl / t / peak})
  for r in srows:
    r["vs_256"] = r["step_ms"] / srows[0]["step_ms"]
  print()
  print_table(srows, ["seq_len", "batch", "step_ms", "vs_256", "MFU"])
  write_json(args.out, {"peaks": peaks, "formula": FORMULA, "mfu": rows, "experts": erows, "seq": srows})


if __name__ == "__main__":
  main()
