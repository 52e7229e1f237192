"""Metrics that show forgetting, at the end of a growth stage: per domain, the validation loss
now minus before the growth (forgetting; negative = better), and for MoE layers that had experts
before it, routing drift (the fraction of the domain's tokens whose top-k includes a new expert)
and per-expert load. Written to `<workdir>/continual/stage<i>.json`, a heatmap of the loads to
`stage<i>_loads.png`, and the scalars to metrics.jsonl as forgetting/<domain>, drift/<domain>."""
from __future__ import annotations

import os

import jax
import numpy as np

from moegrow import checkpoint
from moegrow.config import ModelConfig
from moegrow.train import plot, probes


def first_new_experts(prev: ModelConfig, cfg: ModelConfig) -> dict[str, int]:
  """{layer: index of the first expert added} for layers that had experts before and gained some
  (add_experts appends new experts after the old ones)."""
  out = {}
  if prev.num_layers != cfg.num_layers:
    return out  # layers moved (insert_blocks/stack): no layer-by-layer correspondence
  for i in cfg.moe_layer_ids:
    e_old = prev.experts_in_layer(i)
    if 0 < e_old < cfg.experts_in_layer(i):
      out[str(i)] = e_old
  return out


def stage_report(workdir: str, stage_index: int, step: int, prev: ModelConfig, cfg: ModelConfig, params, evals,
                 loss_now: dict[str, float], loss_before: dict[str, float] | None, mesh) -> dict:
  """The end-of-stage forgetting report (see the module docstring); returns its scalars."""
  row = {}
  if loss_before:
    row.update({f"forgetting/{d}": loss_now[d] - loss_before[d] for d in loss_now if d in loss_before})
  report = {"stage": stage_index, "step": int(step), "loss_now": loss_now, "loss_before": loss_before}
  if cfg.moe_layer_ids:
    first_new = first_new_experts(prev, cfg)
    routing = probes.routing_report(cfg, params, evals, mesh, first_new)
    report.update(first_new_expert=first_new, routing=routing)
    for d, layers in routing.items():
      drifts = [m["drift"] for m in layers.values() if m["drift"] is not None]
      if drifts:
        row[f"drift/{d}"] = float(np.mean(drifts))
    if jax.process_index() == 0:
      plot.plot_loads(os.path.join(workdir, "continual", f"stage{stage_index}_loads.png"), routing,
                      f"stage {stage_index}: expert load per domain at step {step}", first_new)
  report["scalars"] = row
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "continual", f"stage{stage_index}.json"), report)
  return row
