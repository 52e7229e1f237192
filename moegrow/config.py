"""Frozen model configuration.

`ModelConfig` is the single source of truth for a model's shapes. It is stored as JSON
beside every checkpoint, so a checkpoint can always be restored at the shapes that wrote it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

MOE_PATTERNS = ("none", "all", "every_other")
GATINGS = ("softmax_topk", "topk_softmax", "sigmoid_topk")
BALANCES = ("aux_loss", "loss_free")
DISPATCHES = ("dropless", "capacity")
ROUTINGS = ("token_choice", "expert_choice")
MOE_IMPLS = ("auto", "blocks", "ragged_dot")
ATTENTIONS = ("auto", "reference", "blockwise", "splash", "cudnn")
REMATS = ("none", "block", "dots")
EXPERT_EXCHANGES = ("auto", "gather", "ragged")
DTYPES = ("float32", "bfloat16", "float16")
QK_NORMS = ("none", "head", "proj")
# LoRA's default targets: attention projections and dense / shared / expert MLP weights.
LORA_TARGETS = (r"blocks/\d+/attn/w[qkvo]_\w+", r"blocks/\d+/mlp/(shared/)?w(act|lin|o)_\w+")
RAMP_KINDS = ("scale", "logbias")  # how a ramp's mask m acts on its slice (see moegrow.params.ramp)


def ramp_entries(ramps) -> tuple:
  """`ramps` (lists or tuples, e.g. read back from JSON) as nested tuples
  ((name, steps, ((kind, path, axis, start, stop), ...)), ...); ValueError naming the entry
  that is malformed."""
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  seq = lambda v: isinstance(v, (list, tuple))
  if not seq(ramps):
    raise ValueError(f"ModelConfig: ramps={ramps!r} must be a tuple of (name, steps, targets) entries")
  out, names = [], set()
  for n, r in enumerate(ramps):
    if not (seq(r) and len(r) == 3 and isinstance(r[0], str) and re.fullmatch(r"[A-Za-z0-9_.-]+", r[0])
            and is_int(r[1]) and r[1] >= 1 and seq(r[2]) and len(r[2]) >= 1):
      raise ValueError(f"ModelConfig: ramps[{n}]={r!r} must be (name: str without '/', steps: int >= 1, "
                       "targets: a non-empty tuple of (kind, path, axis, start, stop))")
    if r[0] in names:
      raise ValueError(f"ModelConfig: ramps[{n}]: name {r[0]!r} is used twice")
    names.add(r[0])
    targets = []
    for j, t in enumerate(r[2]):
      if not (seq(t) and len(t) == 5 and t[0] in RAMP_KINDS and isinstance(t[1], str) and t[1]
              and all(is_int(x) for x in t[2:]) and t[2] >= 0 and 0 <= t[3] < t[4]):
        raise ValueError(f"ModelConfig: ramps[{n}] ({r[0]}) target {j}={t!r} must be (kind in {RAMP_KINDS}, "
                         "param path, axis >= 0, start >= 0, stop > start)")
      targets.append(tuple(t))
    out.append((r[0], int(r[1]), tuple(targets)))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer with optional MoE MLPs.

  `moe_layers` is a pattern ("none", "all", "every_other": layers 1, 3, 5, ...) or an
  explicit tuple of layer indices. `num_experts` is one count for every MoE layer or a
  tuple with one count per MoE layer (per-layer expert counts).
  """
  vocab_size: int = 259
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 0  # 0: d_model // num_heads
  num_kv_heads: int = 0  # grouped-query attention: key/value heads (0: num_heads; 1: multi-query)
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  qk_norm: str = "none"  # RMSNorm on q and k before RoPE: "head" (over head_dim, weights shared by
  # heads: Qwen3), "proj" (over the whole projection, H*A / U*A: OLMoE) or "none"
  d_ff: int = 1024
  mlp_act: str = "swiglu"  # or "gelu"
  tie_embeddings: bool = True
  tied_logit_scale: bool = True  # tied head: logits = x E^T / sqrt(d_model) (False: x E^T, as in HF models)
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype; parameters and router are float32
  # Attention kernel: "reference" (einsum, [B, H, T, S] scores), "blockwise" (online softmax over key
  # blocks of attention_block, plain JAX), "splash" (TPU Pallas kernel), "cudnn" (GPU, bf16/fp16);
  # "auto": splash on TPU, cudnn on GPU for bf16/fp16, reference otherwise (by the mesh's platform).
  attention: str = "auto"
  attention_block: int = 512
  # Activation rematerialisation per block: "none", "block" (save only block inputs), "dots" (save
  # matmul outputs, recompute the rest).
  remat: str = "none"
  # Run the blocks as one jax.lax.scan over repetitions of the layers' pattern (e.g. dense + MoE
  # pairs): one repetition is compiled instead of every layer. Params stay one entry per layer.
  scan_layers: bool = False
  # Mixture of experts.
  moe_layers: Any = "none"
  num_experts: Any = 8
  top_k: int = 2
  expert_d_ff: int = 0  # 0: d_ff
  num_shared_experts: int = 0
  shared_d_ff: int = 0  # 0: expert_d_ff (per shared expert)
  shared_gate: bool = False  # shared experts' output times sigmoid(x . shared_gate_D) (Qwen2-MoE)
  # "topk_softmax" renormalises the softmax over the chosen k, "softmax_topk" does not;
  # "sigmoid_topk": sigmoid scores, renormalised over the chosen k (DeepSeek-V3).
  gating: str = "topk_softmax"
  # Load balancing: "aux_loss" (the Switch loss, aux_loss_weight) or "loss_free" (Wang et al. 2024: a
  # per-expert bias params[...]['selection_bias_E'] added to the scores for the top-k choice only,
  # moved by balance_rate * sign(mean load - load) after every step; moegrow.params.balance).
  balance: str = "aux_loss"
  balance_rate: float = 1e-3
  routing: str = "token_choice"  # "expert_choice" is a non-causal ablation
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  moe_impl: str = "auto"  # expert FFN kernel: "blocks" (fused loops, CPU), "ragged_dot" (TPU/GPU; batched
  # einsum for capacity buffers); "auto" picks by backend
  # Expert parallelism of dropless dispatch on a mesh with an `expert` axis (each chip holds E/ne
  # experts, tokens travel to them; moegrow.model.moe): "gather" (all-gather tokens, reduce-scatter
  # outputs; runs everywhere), "ragged" (ragged all-to-all; TPU/GPU), "auto" by the mesh's platform.
  expert_exchange: str = "auto"
  # Rows of a chip's expert buffer as a multiple of its balanced share (tokens x top_k of one chip's
  # group share); 0: the worst case (every token of the group to one chip), nothing can be dropped.
  # Below the worst case, assignments past the buffer are dropped and counted in the `dropped` metric.
  expert_buffer_factor: float = 0.0
  router_jitter: float = 0.0
  router_init_std: float = 0.02
  expert_output_scale: float = 1.0
  aux_loss_weight: float = 0.01
  z_loss_weight: float = 1e-3
  seq_aux_loss_weight: float = 0.0  # DeepSeek-V3's sequence-wise balance loss (its alpha; eq. 17-20)
  # LoRA adapters (moegrow.params.lora) under params['lora']: W + (lora_alpha / lora_rank) A B on
  # every weight whose path matches a regex in lora_targets; lora_rank 0: no adapters.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: Any = LORA_TARGETS
  # Ramped growth (moegrow.params.ramp; MSG, Yao et al. 2024): entries (name, steps N, targets), each target
  # (kind, param path, axis, start, stop): the slice [start, stop) along `axis` of that weight is
  # masked by m = params['ramp'][name], which training moves 0 -> 1 over N steps. (): no ramps.
  ramps: Any = ()

  def __post_init__(self):
    self._check_fields()
    fix = lambda k, v: object.__setattr__(self, k, v)
    if self.head_dim == 0:
      fix("head_dim", self.d_model // self.num_heads)
    if self.num_kv_heads == 0:
      fix("num_kv_heads", self.num_heads)
    if self.expert_d_ff == 0:
      fix("expert_d_ff", self.d_ff)
    if self.shared_d_ff == 0:
      fix("shared_d_ff", self.expert_d_ff)
    if isinstance(self.moe_layers, list):
      fix("moe_layers", tuple(self.moe_layers))
    if isinstance(self.num_experts, list):
      fix("num_experts", tuple(self.num_experts))
    if isinstance(self.lora_targets, list):
      fix("lora_targets", tuple(self.lora_targets))
    fix("ramps", ramp_entries(self.ramps))
    self._validate()

  def _check_fields(self):
    """Types and ranges of single fields; each error starts with `<field>=<value>`."""
    def need(ok, field, allowed):
      if not ok:
        raise ValueError(f"ModelConfig: {field}={getattr(self, field)!r} must be {allowed}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for f in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "top_k", "attention_block"):
      need(is_int(getattr(self, f)) and getattr(self, f) >= 1, f, "an integer >= 1")
    for f in ("head_dim", "num_kv_heads", "expert_d_ff", "num_shared_experts", "shared_d_ff", "lora_rank"):
      need(is_int(getattr(self, f)) and getattr(self, f) >= 0, f, "an integer >= 0")
    for f in ("rope_theta", "norm_eps", "capacity_factor", "expert_output_scale", "lora_alpha"):
      need(is_num(getattr(self, f)) and getattr(self, f) > 0, f, "a finite number > 0")
    for f in ("router_init_std", "aux_loss_weight", "z_loss_weight", "seq_aux_loss_weight", "balance_rate"):
      need(is_num(getattr(self, f)) and getattr(self, f) >= 0, f, "a finite number >= 0")
    need(is_num(self.router_jitter) and 0 <= self.router_jitter < 1, "router_jitter", "in [0, 1)")
    need(is_num(self.expert_buffer_factor) and self.expert_buffer_factor >= 0, "expert_buffer_factor",
         "a finite number >= 0 (0: the worst case, no drops)")
    need(isinstance(self.tie_embeddings, bool), "tie_embeddings", "a bool")
    for f in ("qkv_bias", "tied_logit_scale", "shared_gate", "scan_layers"):
      need(isinstance(getattr(self, f), bool), f, "a bool")
    for f, allowed in (("dtype", DTYPES), ("mlp_act", ("swiglu", "gelu")), ("gating", GATINGS), ("balance", BALANCES),
                       ("qk_norm", QK_NORMS),
                       ("dispatch", DISPATCHES), ("routing", ROUTINGS), ("moe_impl", MOE_IMPLS),
                       ("attention", ATTENTIONS), ("remat", REMATS), ("expert_exchange", EXPERT_EXCHANGES)):
      if getattr(self, f) not in allowed:
        raise ValueError(f"ModelConfig: {f}={getattr(self, f)!r} not in {allowed}")
    if isinstance(self.moe_layers, str):
      if self.moe_layers not in MOE_PATTERNS:
        raise ValueError(f"ModelConfig: moe_layers={self.moe_layers!r} not in {MOE_PATTERNS} or a tuple of ints")
    else:
      need(isinstance(self.moe_layers, (list, tuple)) and all(is_int(i) for i in self.moe_layers), "moe_layers",
           f"one of {MOE_PATTERNS} or a tuple of layer indices")
    t = self.lora_targets
    need(isinstance(t, (list, tuple)) and t and all(isinstance(x, str) for x in t), "lora_targets",
         "a non-empty tuple of path regexes")
    e = self.num_experts
    need(is_int(e) or (isinstance(e, (list, tuple)) and all(is_int(i) for i in e)), "num_experts",
         "an integer or one integer per MoE layer")

  def _validate(self):
    def need(ok, msg):
      if not ok:
        raise ValueError(f"ModelConfig: {msg}")
    need(self.num_heads % self.num_kv_heads == 0,
         f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (query heads per group)")
    if not isinstance(self.moe_layers, str):
      bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
      need(not bad, f"moe_layers {bad} out of range for num_layers={self.num_layers}")
    n = len(self.moe_layer_ids)
    if isinstance(self.num_experts, tuple):
      need(len(self.num_experts) == n, f"num_experts has {len(self.num_experts)} entries for {n} MoE layers "
           f"{self.moe_layer_ids}")
    need(self.balance != "loss_free" or self.routing == "token_choice",
         f"balance='loss_free' biases the token-choice top-k; routing={self.routing!r} has none")
    for i in self.moe_layer_ids:
      e = self.experts_in_layer(i)
      need(e >= 1, f"layer {i}: num_experts={e} must be >= 1")
      need(self.routing == "expert_choice" or self.top_k <= e, f"layer {i}: top_k={self.top_k} > num_experts={e}")

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    if self.moe_layers == "none":
      return ()
    if self.moe_layers == "all":
      return tuple(range(self.num_layers))
    if self.moe_layers == "every_other":
      return tuple(range(1, self.num_layers, 2))
    return tuple(sorted(set(int(i) for i in self.moe_layers)))

  def experts_in_layer(self, i: int) -> int:
    """Number of experts in layer i (0 for a dense MLP)."""
    ids = self.moe_layer_ids
    if i not in ids:
      return 0
    if isinstance(self.num_experts, tuple):
      return int(self.num_experts[ids.index(i)])
    return int(self.num_experts)

  def replace(self, **kw) -> "ModelConfig":
    # Derived sizes are re-derived only if the caller resets them to 0.
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    lists = lambda v: [lists(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {k: lists(v) if isinstance(v, tuple) else v for k, v in d.items()}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"ModelConfig: unknown keys {unknown}")
    return cls(**d)

  @classmethod
  def from_json(cls, s: str) -> "ModelConfig":
    return cls.from_dict(json.loads(s))

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """Every field's declared default (derived sizes still 0), e.g. the base of a config file."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def fan_in_std(*dims: int) -> float:
  """The model's initialisation scale, N(0, 1/fan_in): used by the model's layers and by growth
  ops that add units at the same scale."""
  return 1.0 / math.sqrt(math.prod(dims))
