"""HF tensor names and layouts <-> moegrow parameter leaves (pure functions on arrays).

torch Linear weights are [out, in]; moegrow's are [in, ...out] with shape letters (docs/letters.md):
  q_proj [H*A, D] -> wq_DHA      k_proj, v_proj [U*A, D] -> wk_DUA, wv_DUA    o_proj [D, H*A] -> wo_HAD
  gate_proj [F, D] -> wact_DF    up_proj [F, D] -> wlin_DF                     down_proj [D, F] -> wo_FD
  router gate [E, D] -> router_DE (router_bias_E: 0; HF routers have no bias)
  dots1's gate.e_score_correction_bias [E] -> selection_bias_E (loss-free balancing's choice bias)
  experts: per expert (on disk: experts.<e>.{gate,up,down}_proj, Mixtral's w1, w3, w2) or fused
  (transformers 5 in memory: gate_up_proj [E, 2F, D], gate rows first; down_proj [E, D, F])
  -> wact_EDF, wlin_EDF, wo_EFD.
Import is a table `import_plan(cfg, arch)`: moegrow path -> the HF tensors it is made of and how, so
the reader loads one leaf's tensors at a time. Export `export_tensors` yields (name, array).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from moegrow.config import ModelConfig
from moegrow.hf.arch import ARCHS

BENIGN = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; not parameters


@dataclasses.dataclass(frozen=True)
class Source:
  """One moegrow leaf made of HF tensors `names` by `build(*arrays)`; `shapes`: their expected
  shapes (checked before `build`)."""
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  build: Callable[..., np.ndarray]


def _t(x):
  return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def _expert_names(prefix: str, e: int, mixtral: bool) -> tuple[str, str, str]:
  """(gate, up, down) tensor names of expert e as checkpoints store them."""
  if mixtral:
    return tuple(f"{prefix}.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
  return tuple(f"{prefix}.experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down"))


def _moe_prefix(i: int, mtype: str) -> str:
  return f"model.layers.{i}." + ("block_sparse_moe" if mtype == "mixtral" else "mlp")


def import_plan(cfg: ModelConfig, arch: str, available: set[str]) -> dict[str, Source]:
  """{moegrow leaf path: Source} for every leaf of `cfg` (router_bias_E excluded: zeros).
  `available`: the checkpoint's tensor names (picks per-expert or fused expert tensors)."""
  mtype = ARCHS[arch][0]
  d, h, u, a, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  plan = {"embed_VD": Source(("model.embed_tokens.weight",), ((v, d),), lambda x: x),
          "final_norm/scale_D": Source(("model.norm.weight",), ((d,),), lambda x: x)}
  if not cfg.tie_embeddings:
    plan["head_DV"] = Source(("lm_head.weight",), ((v, d),), _t)
  for i in range(cfg.num_layers):
    p, hp, at = f"blocks/{i}/", f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    plan[p + "attn_norm/scale_D"] = Source((hp + "input_layernorm.weight",), ((d,),), lambda x: x)
    plan[p + "mlp_norm/scale_D"] = Source((hp + "post_attention_layernorm.weight",), ((d,),), lambda x: x)
    for name, n in (("q", h), ("k", u), ("v", u)):
      letter = "H" if name == "q" else "U"
      plan[f"{p}attn/w{name}_D{letter}A"] = Source((f"{at}{name}_proj.weight",), ((n * a, d),),
                                                  lambda x, n=n: _t(x).reshape(d, n, a))
      if cfg.qkv_bias:
        plan[f"{p}attn/b{name}_{letter}A"] = Source((f"{at}{name}_proj.bias",), ((n * a,),),
                                                   lambda x, n=n: x.reshape(n, a))
    plan[p + "attn/wo_HAD"] = Source((at + "o_proj.weight",), ((d, h * a),), lambda x: _t(x).reshape(h, a, d))
    if cfg.qk_norm == "head":
      plan[p + "attn/qnorm_A"] = Source((at + "q_norm.weight",), ((a,),), lambda x: x)
      plan[p + "attn/knorm_A"] = Source((at + "k_norm.weight",), ((a,),), lambda x: x)
    elif cfg.qk_norm == "proj":
      plan[p + "attn/qnorm_HA"] = Source((at + "q_norm.weight",), ((h * a,),), lambda x: x.reshape(h, a))
      plan[p + "attn/knorm_UA"] = Source((at + "k_norm.weight",), ((u * a,),), lambda x: x.reshape(u, a))
    e = cfg.experts_in_layer(i)
    if not e:
      f = cfg.d_ff
      for leaf, w, shape in (("wact_DF", "gate", (f, d)), ("wlin_DF", "up", (f, d)), ("wo_FD", "down", (d, f))):
        plan[p + "mlp/" + leaf] = Source((f"{hp}mlp.{w}_proj.weight",), (shape,), _t)
      continue
    mp, f = _moe_prefix(i, mtype), cfg.expert_d_ff
    plan[p + "mlp/router_DE"] = Source((mp + ".gate.weight",), ((e, d),), _t)
    if f"{mp}.experts.gate_up_proj" in available:  # fused, gate rows first
      fused = f"{mp}.experts.gate_up_proj"
      plan[p + "mlp/wact_EDF"] = Source((fused,), ((e, 2 * f, d),), lambda x, f=f: _t(x[:, :f]))
      plan[p + "mlp/wlin_EDF"] = Source((fused,), ((e, 2 * f, d),), lambda x, f=f: _t(x[:, f:]))
      plan[p + "mlp/wo_EFD"] = Source((f"{mp}.experts.down_proj",), ((e, d, f),), _t)
    else:
      names = [_expert_names(mp, j, mtype == "mixtral") for j in range(e)]
      stack = lambda *xs: np.stack([_t(x) for x in xs])
      for k, (leaf, shape) in enumerate((("wact_EDF", (f, d)), ("wlin_EDF", (f, d)), ("wo_EFD", (d, f)))):
        plan[p + "mlp/" + leaf] = Source(tuple(n[k] for n in names), (shape,) * e, stack)
    if cfg.balance == "loss_free":  # dots1: the selection bias
      plan[p + "mlp/selection_bias_E"] = Source((mp + ".gate.e_score_correction_bias",), ((e,),), lambda x: x)
    if cfg.num_shared_experts:
      s = cfg.num_shared_experts * cfg.shared_d_ff
      sp = f"{hp}mlp.shared_experts." if mtype == "dots1" else f"{hp}mlp.shared_expert."
      for leaf, w, shape in (("wact_DF", "gate", (s, d)), ("wlin_DF", "up", (s, d)), ("wo_FD", "down", (d, s))):
        plan[p + "mlp/shared/" + leaf] = Source((f"{sp}{w}_proj.weight",), (shape,), _t)
      if cfg.shared_gate:
        plan[p + "mlp/shared_gate_D"] = Source((f"{hp}mlp.shared_expert_gate.weight",), ((1, d),), lambda x: x[0])
  return plan


def export_tensors(cfg: ModelConfig, arch: str, flat: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) of every tensor of `arch` for the moegrow params `flat` (path -> array), in
  the per-expert layout `save_pretrained` writes. Raises ValueError for a non-zero router bias
  (no HF router has one). Exact conversions: a tied head's 1/sqrt(d) is folded into the final
  norm, `expert_output_scale` into the experts' down projections (both up to float rounding)."""
  mtype = ARCHS[arch][0]
  get = lambda path: np.asarray(flat[path])
  yield "model.embed_tokens.weight", get("embed_VD")
  norm = get("final_norm/scale_D")
  if cfg.tie_embeddings and cfg.tied_logit_scale:  # logits = norm(x) E^T / sqrt(d)
    norm = (norm.astype(np.float32) / np.float32(math.sqrt(cfg.d_model))).astype(norm.dtype)
  yield "model.norm.weight", norm
  if not cfg.tie_embeddings:
    yield "lm_head.weight", _t(get("head_DV"))
  for i in range(cfg.num_layers):
    yield from _attention_tensors(cfg, i, get)
    if cfg.experts_in_layer(i):
      yield from _moe_tensors(cfg, arch, mtype, i, get)
    else:
      yield from _dense_mlp_tensors(i, get)


def _attention_tensors(cfg: ModelConfig, i: int, get) -> Iterator[tuple[str, np.ndarray]]:
  """Layer i's two norms and its attention: q/k/v (and their biases), o, the q/k norms."""
  d, h, u, a = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  p, hp, at = f"blocks/{i}/", f"model.layers.{i}.", f"model.layers.{i}.self_attn."
  yield hp + "input_layernorm.weight", get(p + "attn_norm/scale_D")
  yield hp + "post_attention_layernorm.weight", get(p + "mlp_norm/scale_D")
  for name, n in (("q", h), ("k", u), ("v", u)):
    letter = "H" if name == "q" else "U"
    yield f"{at}{name}_proj.weight", _t(get(f"{p}attn/w{name}_D{letter}A").reshape(d, n * a))
    if cfg.qkv_bias:
      yield f"{at}{name}_proj.bias", get(f"{p}attn/b{name}_{letter}A").reshape(n * a)
  yield at + "o_proj.weight", _t(get(p + "attn/wo_HAD").reshape(h * a, d))
  if cfg.qk_norm == "head":
    yield at + "q_norm.weight", get(p + "attn/qnorm_A")
    yield at + "k_norm.weight", get(p + "attn/knorm_A")
  elif cfg.qk_norm == "proj":
    yield at + "q_norm.weight", get(p + "attn/qnorm_HA").reshape(h * a)
    yield at + "k_norm.weight", get(p + "attn/knorm_UA").reshape(u * a)


def _dense_mlp_tensors(i: int, get) -> Iterator[tuple[str, np.ndarray]]:
  """Dense layer i's gate, up and down projections."""
  p, hp = f"blocks/{i}/", f"model.layers.{i}."
  for leaf, w in (("wact_DF", "gate"), ("wlin_DF", "up"), ("wo_FD", "down")):
    yield f"{hp}mlp.{w}_proj.weight", _t(get(p + "mlp/" + leaf))


def _moe_tensors(cfg: ModelConfig, arch: str, mtype: str, i: int, get) -> Iterator[tuple[str, np.ndarray]]:
  """MoE layer i: its router (ValueError for a non-zero router bias), each expert's projections
  (`expert_output_scale` folded into down), and Qwen2-MoE's shared expert."""
  p = f"blocks/{i}/"
  bias = get(p + "mlp/router_bias_E")
  if np.any(bias != 0):
    raise ValueError(f"export as {arch}: {p}mlp/router_bias_E is non-zero ({bias.tolist()}): no HF router has a "
                     "bias (add_experts sets one; train until the new experts are used and fold it, or grow "
                     "with a mode that leaves it at 0)")
  mp = _moe_prefix(i, mtype)
  yield mp + ".gate.weight", _t(get(p + "mlp/router_DE"))
  wo = get(p + "mlp/wo_EFD")
  if mtype == "dots1":  # routed_scaling_factor holds expert_output_scale; the bias is the selection bias
    sel = p + "mlp/selection_bias_E"
    yield mp + ".gate.e_score_correction_bias", get(sel) if cfg.balance == "loss_free" else np.zeros_like(bias)
  elif cfg.expert_output_scale != 1.0:
    wo = (wo.astype(np.float32) * np.float32(cfg.expert_output_scale)).astype(wo.dtype)
  mats = (get(p + "mlp/wact_EDF"), get(p + "mlp/wlin_EDF"), wo)
  for j in range(cfg.experts_in_layer(i)):
    for name, w in zip(_expert_names(mp, j, mtype == "mixtral"), mats):
      yield name, _t(w[j])
  if mtype == "qwen2_moe":  # always has a shared expert and its gate (zero-width when moegrow has none)
    yield from _qwen2_shared_tensors(cfg, i, get, wo.dtype)
  if mtype == "dots1":  # always has shared experts: moegrow's, or one whose output projection is 0
    sp, f, d = f"{mp}.shared_experts.", cfg.expert_d_ff, cfg.d_model
    for leaf, w, shape in (("wact_DF", "gate", (f, d)), ("wlin_DF", "up", (f, d)), ("wo_FD", "down", (d, f))):
      yield f"{sp}{w}_proj.weight", (_t(get(p + "mlp/shared/" + leaf)) if cfg.num_shared_experts
                                     else np.zeros(shape, wo.dtype))


def _qwen2_shared_tensors(cfg: ModelConfig, i: int, get, dt) -> Iterator[tuple[str, np.ndarray]]:
  """Qwen2-MoE layer i's shared expert and its gate: moegrow's, or zero-width ones of dtype `dt`."""
  p, hp = f"blocks/{i}/", f"model.layers.{i}."
  sp = f"{hp}mlp.shared_expert."
  if cfg.num_shared_experts:
    for leaf, w in (("wact_DF", "gate"), ("wlin_DF", "up"), ("wo_FD", "down")):
      yield f"{sp}{w}_proj.weight", _t(get(p + "mlp/shared/" + leaf))
    yield f"{hp}mlp.shared_expert_gate.weight", get(p + "mlp/shared_gate_D")[None]
  else:
    d = cfg.d_model
    for w, shape in (("gate", (0, d)), ("up", (0, d)), ("down", (d, 0))):
      yield f"{sp}{w}_proj.weight", np.zeros(shape, dt)
    yield f"{hp}mlp.shared_expert_gate.weight", np.zeros((1, d), dt)
