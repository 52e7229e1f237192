"""What LoRA saves and costs: optimizer-state memory and train-step time, full fine-tuning vs
LoRA at ranks 4, 16, 64 on the same MoE.

  python -m benchmarks.lora [--quick]

Model: d=256, 4 layers, E=4 top-2 in every other layer, batch 16 x 256 byte tokens, float32, one
device. LoRA adapts attention q/k/v/o and every dense and expert MLP weight (one A, B per
expert); the base is frozen and has no optimizer state (optax multi_transform with
set_to_zero). The effective weights W + (alpha/r) A B are formed before the layers run: 2 e in
out r FLOPs per adapted matrix per forward, reported next to the model's forward FLOPs per step.
Candidates are timed in alternating rounds in one process (median per call); ratios vs full.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks.common import header, print_table, time_interleaved, train_step_fn, write_json
from moegrow.config import ModelConfig
from moegrow.flops import train_flops_per_token
from moegrow.model import transformer as tf
from moegrow.orchestrate.validate import BASE_FROZEN
from moegrow.params import lora, trees


def mib(tree) -> float:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)) / 2**20


def candidate(cfg: ModelConfig, frozen: tuple, batch: int, seq: int):
  """(step closure, compile seconds, params MiB, optimizer-state MiB)."""
  step = train_step_fn(cfg, batch, seq, frozen=frozen)
  state = step.program.abstract_state
  return step.run, step.compile_s, mib(state["params"]), mib(state["opt_state"])


def adapter_flops(cfg: ModelConfig) -> int:
  """Forward FLOPs of forming every effective weight: 2 e in out r per adapted matrix."""
  base = tf.abstract_params(tf.base_config(cfg))
  flat = trees.flatten(base)
  total = 0
  for p in lora.targets(base, cfg.lora_targets):
    e, i, o = lora.factor_axes(p, flat[p].shape)
    total += 2 * e * i * o * cfg.lora_rank
  return total


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="short timings (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/lora.json")
  args = ap.parse_args()
  mt = 0.5 if args.quick else 3.0
  base = ModelConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024, moe_layers="every_other", num_experts=4,
                     top_k=2, expert_d_ff=1024)
  batch, seq = 16, 256
  cands = {"full fine-tuning": (base, ())}
  for r in (4, 16, 64):
    cands[f"LoRA r={r}"] = (base.replace(lora_rank=r), (BASE_FROZEN,))
  fns, rows = {}, []
  for name, (cfg, frozen) in cands.items():
    fns[name], compile_s, p_mib, o_mib = candidate(cfg, frozen, batch, seq)
    rows.append({"candidate": name, "params MiB": p_mib, "opt state MiB": o_mib, "compile s": compile_s,
                 "adapter GFLOP/step": adapter_flops(cfg) / 1e9 if cfg.lora_rank else 0.0})
  times = time_interleaved({n: (f, ()) for n, f in fns.items()}, 4 * mt)
  full = rows[0]
  model_gflop = train_flops_per_token(base, seq) * seq * batch / 3 / 1e9  # forward only
  for r in rows:
    r.update({"step ms": 1e3 * times[r["candidate"]], "time vs full": times[r["candidate"]] / times[rows[0]["candidate"]],
              "opt state vs full": r["opt state MiB"] / full["opt state MiB"]})
  print(header("LoRA: optimizer state and train-step time"))
  print(f"d=256, 4 layers, E=4 top-2 every other layer; batch {batch} x {seq}; model forward "
        f"{model_gflop:.1f} GFLOP per step")
  print_table(rows, ["candidate", "params MiB", "opt state MiB", "opt state vs full", "step ms", "time vs full",
                     "adapter GFLOP/step", "compile s"])
  write_json(args.out, {"header": header("lora"), "rows": rows, "model_forward_gflop": model_gflop})


if __name__ == "__main__":
  main()
