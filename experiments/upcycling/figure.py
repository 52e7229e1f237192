"""Sparse Upcycling (Komatsuzaki et al. 2023) as a harness figure: dense continuation vs the
upcycled MoE vs the same MoE from scratch, at equal extra training FLOPs.

Arms (seed k of every arm shares the data order and dense init of seed k):
  dense_base   dense model (configs/lm.py:<base>), the first N steps of the dense schedule: the
               shared checkpoint (never modified afterwards; not plotted);
  dense        a copy of dense_base's checkpoint N, continued dense to N + M_dense;
  upcycled     a copy of dense_base's checkpoint N, its MLPs in every other layer upcycled to E=8
               top-2 experts (configs/grow.py semantics), trained M steps;
  moe_scratch  the upcycled architecture (configs/lm.py:<base>,moe) from scratch for S steps.
Compute matching (moegrow.flops, F = training FLOPs per step):
  M_dense = M * F_moe / F_dense (the same extra FLOPs as the upcycled continuation);
  S = (N * F_dense + M * F_moe) / F_moe (the dense run's sunk FLOPs plus that extra budget).
dense_base + dense form ONE warm-up + cosine schedule over N + M_dense steps (an uninterrupted
dense run); the upcycled run is one cosine over N + M (its learning rate steps down at the
boundary); the scratch MoE has its own over S. All end annealed at the same extra FLOPs.
"""
from __future__ import annotations

import copy

import ml_collections

from experiments.harness import (Arm, Claim, Figure, flops_per_step, matched_steps, size_name)
from moegrow.configs import grow as grow_configs
from moegrow.configs import lm
from moegrow.orchestrate import parts

UPCYCLE = dict(op="upcycle", layers="every_other", num_experts=8, top_k=2, gating="topk_softmax")
# size -> base variant of configs/lm.py, N dense steps, M upcycled steps, cadence, evaluation set.
# "small" narrows configs/lm.py small (d=256, sequence 256) to d=128 and sequence 128, and runs
# N=300 + M=150 steps evaluated every 100, so that three seeds fit in 30 minutes on 2 CPU cores.
SIZES = {
    "small": dict(base="small", dense_steps=300, moe_steps=150, warmup_steps=30, eval_every=100,
                  log_every=25, checkpoint_every=150, eval_batches=32,
                  model=dict(d_model=128, num_heads=4, d_ff=512), seq_len=128),
    # the longer run (1.7x the steps, about 50 min alone on 2 CPU cores): results_long/
    "long": dict(base="small", dense_steps=500, moe_steps=250, warmup_steps=50, eval_every=50,
                 log_every=25, checkpoint_every=250, eval_batches=32,
                 model=dict(d_model=128, num_heads=4, d_ff=512), seq_len=128),
    "quick": dict(base="tiny", dense_steps=6, moe_steps=4, warmup_steps=2, eval_every=2,
                  log_every=2, checkpoint_every=100, eval_batches=2),
    # configs/lm.py:pod's model (d=1024, 16 layers, bfloat16, sequence 2048, batch 512 on c4/en;
    # E=8 top-2 in every other layer: 0.97B total / 0.37B active parameters): N = 20k dense steps
    # (21B tokens), M = 10k upcycled steps. The paper's gains over dense continuation show on
    # well-trained checkpoints of 100M+ parameter models (Komatsuzaki et al. 2023, Fig. 2-3);
    # the CPU size's dense model has seen 1.2M tokens.
    "pod": dict(base="pod", dense_steps=20_000, moe_steps=10_000, warmup_steps=2000, eval_every=2000,
                log_every=100, checkpoint_every=2000, eval_batches=8, topology="v5e-64"),
}


def plan(size: str) -> dict:
  """Steps and FLOPs of every arm: pure arithmetic on the configs."""
  if size not in SIZES:
    raise ValueError(f"experiments/upcycling: unknown size {size!r}; use {sorted(SIZES)}")
  s = SIZES[size]
  dense_c, moe_c = _base(s), _base(s, ",moe")
  f_dense = flops_per_step(parts.model_config(dense_c), dense_c)
  f_moe = flops_per_step(parts.model_config(moe_c), moe_c)
  n, m = s["dense_steps"], s["moe_steps"]
  m_dense = matched_steps(m * f_moe, parts.model_config(dense_c), dense_c)
  scratch = matched_steps(n * f_dense + m * f_moe, parts.model_config(moe_c), moe_c)
  return {"size": size, "base": s["base"], "dense_steps": n, "moe_steps": m, "dense_extra_steps": m_dense,
          "scratch_steps": scratch, "flops_per_step": {"dense": f_dense, "moe": f_moe}, "sunk_flops": n * f_dense,
          "extra_flops": m * f_moe, "eval_batches": s["eval_batches"],
          "end_step": {"dense_base": n, "dense": n + m_dense, "upcycled": n + m, "moe_scratch": scratch}}


def _base(s: dict, moe: str = "") -> ml_collections.ConfigDict:
  """configs/lm.py's `base` variant with the size's model and sequence overrides."""
  c = lm.get_config(s["base"] + moe)
  if not moe:
    c.model.moe_layers = "none"  # configs/lm.py:pod is sparse by default
  c.model.update(s.get("model", {}))
  c.data.seq_len = s.get("seq_len", c.data.seq_len)
  return c


def _finish(c: ml_collections.ConfigDict, s: dict, steps: int) -> ml_collections.ConfigDict:
  c.train.update(steps=steps, warmup_steps=s["warmup_steps"], eval_every=s["eval_every"],
                 log_every=s["log_every"], checkpoint_every=s["checkpoint_every"], eval_batches=s["eval_batches"])
  return c


def configs(size: str) -> dict[str, ml_collections.ConfigDict]:
  """Each arm's config (seed 0; the harness sets the seed)."""
  p, s = plan(size), SIZES[size]
  up = grow_configs.get_config(s["base"])
  up.model.update(s.get("model", {}))
  up.data.seq_len = s.get("seq_len", up.data.seq_len)
  up.stages = (dict(name="dense", steps=p["dense_steps"]), dict(name="upcycled", steps=p["moe_steps"],
                                                               ops=(dict(UPCYCLE),)))
  return {"dense_base": _finish(_base(s), s, p["end_step"]["dense"]),  # stops at N
          "dense": _finish(_base(s), s, p["end_step"]["dense"]),
          "upcycled": _finish(up, s, p["end_step"]["upcycled"]),
          "moe_scratch": _finish(_base(s, ",moe"), s, p["end_step"]["moe_scratch"])}


def figure(size: bool | str = False) -> Figure:
  """The figure at `size`: True = 'quick', False = 'small', or a size's name (see SIZES)."""
  size = size_name(size)
  p, cfgs = plan(size), configs(size)
  up_cfg = parts.resolve_stages(cfgs["upcycled"], parts.model_config(cfgs["upcycled"]))[-1].cfg
  if up_cfg != parts.model_config(cfgs["moe_scratch"]):
    raise ValueError("the scratch MoE differs from the upcycled model: "
                     + parts.config_diff(parts.model_config(cfgs["moe_scratch"]), up_cfg))
  n = p["dense_steps"]
  make = lambda name: (lambda seed: copy.deepcopy(cfgs[name]))
  arms = (Arm("dense_base", make("dense_base"), end_step=n, plotted=False),
          Arm("dense", make("dense"), "dense continued", start_from="dense_base", start_step=n),
          Arm("upcycled", make("upcycled"), "upcycled MoE (E=8, top-2)", start_from="dense_base", start_step=n),
          Arm("moe_scratch", make("moe_scratch"), "MoE from scratch (x = total - dense sunk FLOPs)"))
  claims = (Claim("upcycling beats dense continuation at equal extra FLOPs", "upcycled", "dense"),
            Claim("upcycling beats the same MoE from scratch given sunk + extra FLOPs", "upcycled", "moe_scratch"))
  return Figure("upcycling", f"Sparse upcycling ({size})", arms, claims, plan=p, x_origin=p["sunk_flops"],
                x_label="training FLOPs after the dense checkpoint")
