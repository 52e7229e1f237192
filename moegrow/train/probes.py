"""Probes: measurements of a model on fixed data, for logs, certificates and growth ops that
need data (per-domain held-out loss; per-layer expert loads for add_experts' most_loaded)."""
from __future__ import annotations

import math

import jax
import numpy as np

from moegrow import sharding
from moegrow.model import transformer as tf
from moegrow.train.steps import Program


def domain_losses(program: Program, params, sets: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
  """{domain: {'loss': mean nats/token[, 'bpb': bits per byte]}} over every batch of each domain
  (bits per byte where the batches carry `num_bytes`). Padding tokens do not count."""
  out = {}
  for domain, batches in sets.items():
    nll = count = nbytes = 0.0
    for b in batches:
      s, c = program.eval_step(params, sharding.from_full(b, program.batch_sharding))
      nll, count, nbytes = nll + float(s), count + float(c), nbytes + b.get("num_bytes", 0)
    out[domain] = {"loss": nll / count}
    if nbytes:
      out[domain]["bpb"] = nll / math.log(2) / nbytes
  return out


def evaluate(program: Program, params, sets: dict[str, list[dict]]) -> dict[str, float]:
  """`domain_losses` as flat metrics: eval/<domain>/loss and eval/<domain>/bpb."""
  return {f"eval/{d}/{k}": v for d, m in domain_losses(program, params, sets).items() for k, v in m.items()}


def expert_loads(cfg, params, batches: list[dict], mesh) -> dict[str, list[float]]:
  """Per MoE layer, the fraction of token-expert assignments each expert receives on `batches`
  (the input of add_experts' source='most_loaded')."""
  rows = np.concatenate([b["inputs"] for b in batches])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # readable on every process
  tokens = jax.make_array_from_callback(rows.shape, replicated, lambda i: rows[i])
  loads = jax.jit(lambda p, t: {i: m["load"] for i, m in tf.apply(cfg, p, t)[1]["layers"].items()},
                  out_shardings=replicated)(params, tokens)
  return {i: np.asarray(v).tolist() for i, v in loads.items()}
