"""Configs of the Sparse Upcycling experiment (Komatsuzaki et al. 2023), one per run.

`get_config("<size>,<variant>")`, size `small` (the figure) or `quick` (tests, seconds):
  dense_base   the dense model of configs/lm.py:<base>, trained for N steps (the shared checkpoint);
  dense        the same dense model continued from step N for M_dense more steps;
  upcycled     configs/grow.py:<base>: stage 0 = the dense N steps (restored, not retrained), then
               its MLPs in every other layer upcycled to E=8 top-2 experts, trained for M steps;
  moe_scratch  configs/lm.py:<base>,moe (the upcycled architecture) trained from scratch for S steps.
Compute matching (FLOPs per training token = 6 * active params + 6 * layers * seq_len * d_model,
the causal-attention term 12 * L * T * d / 2; per step x batch x seq_len):
  M_dense = round(M * F_moe / F_dense)           same extra FLOPs as the upcycled continuation;
  S       = round((N * F_dense + M * F_moe) / F_moe)  the dense run's sunk FLOPs + that extra budget.
All runs share data mixture, batch, seed and the configs' warm-up + cosine schedule (decay to 0.1x).
The dense run and its dense continuation form ONE cosine over N + M_dense steps (dense_base stops at
N via `stop_after_steps`), so the dense curve is exactly the schedule of an uninterrupted dense run;
the upcycled run is one cosine over N + M (configs/grow.py: one schedule over all stages), so at the
boundary its learning rate steps down from the dense value (lr(N) of an N+M_dense cosine) to that of
an N+M cosine; the scratch MoE has its own cosine over S steps. Every variant ends annealed (0.1x lr)
at the same extra FLOPs, which is where they are compared.

Any variant runs alone through the normal entry point, e.g.
  python -m moegrow.main --config=experiments/upcycling/config.py:small,upcycled --workdir=runs/upcycling/upcycled
(the upcycled and dense runs expect the dense_base checkpoint `checkpoints/<N>` copied into their
workdir first; `python -m experiments.upcycling.run` does all of it).
"""
from __future__ import annotations

import ml_collections

from configs import grow as grow_configs
from configs import lm
from moegrow.config import ModelConfig, count_params

VARIANTS = ("dense_base", "dense", "upcycled", "moe_scratch")
UPCYCLE = dict(op="upcycle", layers="every_other", num_experts=8, top_k=2, gating="topk_softmax")
# size -> base variant of configs/lm.py, N dense steps, M upcycled steps, logging/eval cadence.
SIZES = {
    "small": dict(base="small", dense_steps=500, moe_steps=250, warmup_steps=50, eval_every=50,
                  log_every=25, checkpoint_every=100),
    "quick": dict(base="tiny", dense_steps=6, moe_steps=4, warmup_steps=2, eval_every=2,
                  log_every=2, checkpoint_every=100),
}
FLOPS_FORMULA = "train FLOPs/token = 6 * active_params + 6 * num_layers * seq_len * d_model (causal attention)"


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  return 6 * count_params(cfg)["active"] + 6 * cfg.num_layers * seq_len * cfg.d_model


def _model(c) -> ModelConfig:
  return ModelConfig.from_dict(c.model.to_dict())


def plan(size: str = "small") -> dict:
  """Steps and FLOPs of every variant (pure arithmetic on the configs, no JAX)."""
  if size not in SIZES:
    raise ValueError(f"experiments/upcycling/config.py: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  dense_c, moe_c = lm.get_config(s["base"]), lm.get_config(s["base"] + ",moe")
  tokens = dense_c.train.batch_size * dense_c.data.seq_len
  f_dense = flops_per_token(_model(dense_c), dense_c.data.seq_len) * tokens
  f_moe = flops_per_token(_model(moe_c), moe_c.data.seq_len) * tokens
  n, m = s["dense_steps"], s["moe_steps"]
  m_dense = int(round(m * f_moe / f_dense))
  scratch = int(round((n * f_dense + m * f_moe) / f_moe))
  return {
      "size": size, "base": s["base"], "dense_steps": n, "moe_steps": m, "dense_extra_steps": m_dense,
      "scratch_steps": scratch, "tokens_per_step": tokens, "flops_per_step": {"dense": f_dense, "moe": f_moe},
      "lr_schedule": {"kind": "warmup + cosine to 0.1x", "horizon": {"dense_base": n + m_dense, "dense": n + m_dense,
                                                                    "upcycled": n + m, "moe_scratch": scratch}},
      "sunk_flops": n * f_dense, "extra_flops": m * f_moe, "flops_formula": FLOPS_FORMULA,
      # global step at which each variant's run ends
      "end_step": {"dense_base": n, "dense": n + m_dense, "upcycled": n + m, "moe_scratch": scratch},
  }


def get_config(arg: str = "small,upcycled") -> ml_collections.ConfigDict:
  parts = (arg or "small,upcycled").split(",")
  if len(parts) != 2 or parts[1] not in VARIANTS:
    raise ValueError(f"experiments/upcycling/config.py: expected '<size>,<variant>' with variant in {VARIANTS}, "
                     f"got {arg!r}")
  size, variant = parts
  p, s = plan(size), SIZES[size]
  if variant == "upcycled":
    c = grow_configs.get_config(s["base"])
    c.stages = (dict(name="dense", steps=p["dense_steps"]),
                dict(name="upcycled", steps=p["moe_steps"], ops=(dict(UPCYCLE),)))
  elif variant == "moe_scratch":
    c = lm.get_config(s["base"] + ",moe")
  else:
    c = lm.get_config(s["base"])
  c.train.update(steps=p["end_step"][variant], warmup_steps=s["warmup_steps"],
                 eval_every=s["eval_every"], log_every=s["log_every"], checkpoint_every=s["checkpoint_every"])
  if variant == "dense_base":  # the first N steps of the dense run's one schedule
    c.train.update(steps=p["end_step"]["dense"], stop_after_steps=p["dense_steps"])
  return c
