"""config.json <-> ModelConfig for the supported Hugging Face architectures.

Import reads every field that changes the function and refuses, naming the field, what moegrow
cannot represent exactly (RoPE scaling, sliding windows, output-projection or MLP biases,
activations other than SiLU, ...). Export picks the HF class that holds the model exactly and
refuses, with the reason, models no class can hold. Weight-level conditions (a non-zero router
bias) are checked in moegrow.hf.weights.

Conventions both ways: torch Linear weights are [out, in] (transposed in moegrow.hf.weights);
RoPE is rotate-half in both; `wact` = gate_proj (the SiLU branch), `wlin` = up_proj; a tied head
has no 1/sqrt(d) factor in HF (`tied_logit_scale=False` on import). Mixtral renormalises the
top-k router probabilities (moegrow `topk_softmax`); Qwen-MoE and OLMoE do so when
`norm_topk_prob` is true, else they use the top-k of the full softmax (`softmax_topk`). dots1
(rednote's DeepSeek-V3-style MoE with Qwen3's attention) routes by sigmoid scores renormalised over
the chosen k (`sigmoid_topk`), chooses with a per-expert bias `e_score_correction_bias` (moegrow's
loss-free `selection_bias_E`), scales the routed output by `routed_scaling_factor`
(`expert_output_scale`) and always has shared experts; it is the class that holds a model with
sigmoid routing or loss-free balancing, and moegrow reads it with one expert group
(`n_group` = `topk_group`, no group restriction).
"""
from __future__ import annotations

from typing import Any

from moegrow.config import DTYPES, ModelConfig

# architectures entry -> (model_type, has MoE layers)
ARCHS = {"LlamaForCausalLM": ("llama", False), "MistralForCausalLM": ("mistral", False),
         "Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False),
         "MixtralForCausalLM": ("mixtral", True), "Qwen2MoeForCausalLM": ("qwen2_moe", True),
         "Qwen3MoeForCausalLM": ("qwen3_moe", True), "OlmoeForCausalLM": ("olmoe", True),
         "Dots1ForCausalLM": ("dots1", True)}
QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "dots1": "head", "olmoe": "proj"}  # model_type -> qk_norm
MAX_POSITIONS = 4096  # written on export; moegrow has no position limit (RoPE, no learnt positions)


class HFConfigError(ValueError):
  """A config.json field moegrow or the target class cannot represent exactly."""


def _fail(where: str, field: str, value, why: str):
  raise HFConfigError(f"{where}: {field}={value!r}: {why}")


def architecture(hf: dict, where: str) -> str:
  """The single supported `architectures` entry of a config.json dict."""
  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in ARCHS:
    _fail(where, "architectures", archs, f"expected exactly one of {sorted(ARCHS)}")
  return archs[0]


def _rope_theta(hf: dict, where: str) -> float:
  rope = hf.get("rope_parameters") or {}
  if hf.get("rope_scaling"):
    _fail(where, "rope_scaling", hf["rope_scaling"], "RoPE scaling variants are not implemented in moegrow")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    _fail(where, "rope_parameters.rope_type", kind, "only the default RoPE is implemented in moegrow")
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    _fail(where, "partial_rotary_factor", rope.get("partial_rotary_factor", hf.get("partial_rotary_factor")),
          "moegrow rotates the whole head")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def _dtype(hf: dict) -> str:
  """The compute dtype of an import: the checkpoint's (`dtype`, older `torch_dtype`), else float32."""
  dt = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
  return dt if dt in DTYPES else "float32"


def _refuse_attention_extras(hf: dict, mtype: str, where: str) -> None:
  if hf.get("attention_bias"):
    _fail(where, "attention_bias", True, "moegrow's attention has no output-projection bias")
  if hf.get("mlp_bias"):
    _fail(where, "mlp_bias", True, "moegrow's MLPs have no biases")
  if hf.get("hidden_act", "silu") != "silu":
    _fail(where, "hidden_act", hf.get("hidden_act"), "moegrow's SwiGLU uses SiLU")
  if hf.get("attention_dropout", 0.0):
    _fail(where, "attention_dropout", hf["attention_dropout"], "moegrow has no attention dropout")
  if hf.get("clip_qkv") is not None:
    _fail(where, "clip_qkv", hf["clip_qkv"], "moegrow does not clip q/k/v")
  window = hf.get("sliding_window")
  if mtype == "dots1" and window is not None and int(hf.get("max_window_layers") or 0) < int(hf["num_hidden_layers"]):
    _fail(where, "sliding_window", window, f"layers from max_window_layers={hf.get('max_window_layers')} on attend "
          "to a window; moegrow attends to the whole context")
  if mtype == "mistral" and window is not None:
    _fail(where, "sliding_window", window, "moegrow attends to the whole context (set it to null only if "
          "every sequence you use is at most that long)")
  if hf.get("use_sliding_window"):
    _fail(where, "use_sliding_window", True, "moegrow attends to the whole context")
  kinds = set(hf.get("layer_types") or ["full_attention"])
  if kinds != {"full_attention"}:
    _fail(where, "layer_types", sorted(kinds), "moegrow has only full attention")


def model_config(hf: dict, where: str = "config.json") -> ModelConfig:
  """The moegrow ModelConfig of a supported HF config.json dict (exact, or HFConfigError naming the
  file and the field: unrepresentable, missing, or of the wrong type)."""
  try:
    return _model_config(hf, where)
  except HFConfigError:
    raise
  except KeyError as e:
    raise HFConfigError(f"{where}: required field {e.args[0]!r} is missing") from e
  except (TypeError, ValueError) as e:
    raise HFConfigError(f"{where}: a field has the wrong type or value ({e})") from e


def _model_config(hf: dict, where: str) -> ModelConfig:
  arch = architecture(hf, where)
  mtype, moe = ARCHS[arch]
  _refuse_attention_extras(hf, mtype, where)
  heads = int(hf["num_attention_heads"])
  d = int(hf["hidden_size"])
  kw: dict[str, Any] = dict(
      vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or d // heads),
      d_ff=int(hf["intermediate_size"]), mlp_act="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      tied_logit_scale=False, rope_theta=_rope_theta(hf, where), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      dtype=_dtype(hf),
      qkv_bias=mtype == "qwen2" or (mtype == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
      qk_norm=QK_NORM.get(mtype, "none"))
  if moe:
    n = int(hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts") or 0)
    if n < 1:
      _fail(where, "num_experts", n, "an MoE architecture needs at least one expert")
    layers = tuple(range(kw["num_layers"]))
    if mtype == "dots1":
      layers = layers[int(hf.get("first_k_dense_replace") or 0):]
    if mtype in ("qwen2_moe", "qwen3_moe"):
      step, dense = int(hf.get("decoder_sparse_step", 1)), set(hf.get("mlp_only_layers") or ())
      layers = tuple(i for i in layers if i not in dense and (i + 1) % step == 0)
    norm = True if mtype == "mixtral" else bool(hf.get("norm_topk_prob", False))
    kw.update(moe_layers=layers if len(layers) < kw["num_layers"] else "all", num_experts=n,
              top_k=int(hf["num_experts_per_tok"]), gating="topk_softmax" if norm else "softmax_topk",
              expert_d_ff=int(hf["intermediate_size"] if mtype in ("mixtral", "olmoe") else hf["moe_intermediate_size"]),
              router_jitter=float(hf.get("router_jitter_noise", 0.0)),
              aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.01)), z_loss_weight=0.0)
    if mtype == "dots1":
      kw.update(_dots1_fields(hf, where))
    if not layers:
      kw["moe_layers"] = "none"
    shared = int(hf.get("shared_expert_intermediate_size") or 0) if mtype == "qwen2_moe" else 0
    if shared:
      kw.update(num_shared_experts=1, shared_d_ff=shared, shared_gate=True)
  return ModelConfig(**kw)


def _dots1_fields(hf: dict, where: str) -> dict[str, Any]:
  """dots1's routing as moegrow fields: sigmoid_topk gates, a loss-free selection bias, the routed
  scaling, shared experts of the experts' width (HFConfigError for expert groups that restrict the
  choice, or unnormalised gates)."""
  if not hf.get("norm_topk_prob"):
    _fail(where, "norm_topk_prob", hf.get("norm_topk_prob"), "moegrow's sigmoid_topk renormalises the chosen "
          "experts' scores")
  groups, chosen = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
  if groups != chosen:
    _fail(where, "topk_group", chosen, f"a choice restricted to {chosen} of n_group={groups} expert groups is not "
          "implemented in moegrow (n_group = topk_group keeps every group)")
  shared = int(hf.get("n_shared_experts") or 0)
  return dict(gating="sigmoid_topk", balance="loss_free", expert_output_scale=float(hf.get("routed_scaling_factor", 1.0)),
              num_shared_experts=shared, shared_d_ff=int(hf["moe_intermediate_size"]), aux_loss_weight=0.0)


def _needs(ok: bool, arch: str, field: str, value, why: str) -> None:
  if not ok:
    raise HFConfigError(f"export as {arch}: {field}={value!r}: {why}")


def choose(cfg: ModelConfig) -> str:
  """The HF class that holds `cfg` exactly (check it with `hf_config`)."""
  if not cfg.moe_layer_ids:
    return {"none": "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM",
            "head": "Qwen3ForCausalLM"}.get(cfg.qk_norm, "LlamaForCausalLM")
  if cfg.gating == "sigmoid_topk" or cfg.balance == "loss_free":
    return "Dots1ForCausalLM"
  if cfg.qk_norm == "head":
    return "Qwen3MoeForCausalLM"
  if cfg.qk_norm == "proj":
    return "OlmoeForCausalLM"
  every = len(cfg.moe_layer_ids) == cfg.num_layers
  if every and cfg.gating == "topk_softmax" and not cfg.qkv_bias and not cfg.num_shared_experts:
    return "MixtralForCausalLM"
  return "Qwen2MoeForCausalLM"


def hf_config(cfg: ModelConfig, arch: str | None = None, special: dict | None = None) -> dict:
  """config.json of `cfg` as `arch` (default: `choose(cfg)`); HFConfigError naming the field and
  the reason when that class cannot hold the model exactly. `special`: bos/eos/pad token ids."""
  arch = arch or choose(cfg)
  if arch not in ARCHS:
    raise HFConfigError(f"export: arch={arch!r} is not one of {sorted(ARCHS)}")
  mtype, moe = ARCHS[arch]
  _check_exportable(cfg, arch, mtype, moe)
  out: dict[str, Any] = {
      "architectures": [arch], "model_type": mtype, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "use_cache": True,
      "initializer_range": 0.02, "dtype": cfg.dtype,
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(special or {})}
  out.update(_family_fields(cfg, mtype))
  if moe:
    out.update(_moe_fields(cfg, mtype))
  return out


def _check_exportable(cfg: ModelConfig, arch: str, mtype: str, moe: bool) -> None:
  """HFConfigError naming the field unless class `arch` (of model_type `mtype`) holds `cfg` exactly."""
  _needs(not cfg.lora_rank, arch, "lora_rank", cfg.lora_rank, "merge the adapters first (growth op merge_lora)")
  _needs(cfg.mlp_act == "swiglu", arch, "mlp_act", cfg.mlp_act, "HF models of this family use SwiGLU (SiLU)")
  _needs(not cfg.qkv_bias or mtype in ("qwen2", "qwen2_moe"), arch, "qkv_bias", True,
         "only Qwen2 and Qwen2-MoE have q/k/v biases")
  _needs(mtype != "qwen2" or cfg.qkv_bias, arch, "qkv_bias", False, "Qwen2 always has q/k/v biases; use Llama")
  want_norm = QK_NORM.get(mtype, "none")
  _needs(cfg.qk_norm == want_norm, arch, "qk_norm", cfg.qk_norm, f"{arch} has qk_norm={want_norm!r}")
  if not moe:
    _needs(not cfg.moe_layer_ids, arch, "moe_layers", cfg.moe_layers, "a dense class cannot hold MoE layers")
  else:
    _check_moe_exportable(cfg, arch, mtype)


def _check_moe_exportable(cfg: ModelConfig, arch: str, mtype: str) -> None:
  """The MoE layers' conditions of an MoE class: one expert count, dropless token choice, the
  class's layer pattern, gating and shared experts."""
  ids = cfg.moe_layer_ids
  _needs(bool(ids), arch, "moe_layers", cfg.moe_layers, "an MoE class needs MoE layers; export as a dense class")
  counts = {cfg.experts_in_layer(i) for i in ids}
  _needs(len(counts) == 1, arch, "num_experts", cfg.num_experts,
         "HF MoE classes have one expert count for every layer")
  _needs(cfg.routing == "token_choice", arch, "routing", cfg.routing, "HF routers are token choice")
  _needs(cfg.dispatch == "dropless", arch, "dispatch", cfg.dispatch,
         "HF MoE layers never drop tokens; a capacity-dispatch model's logits would differ")
  _needs(len(ids) == cfg.num_layers or mtype in ("qwen2_moe", "qwen3_moe", "dots1"), arch, "moe_layers",
         cfg.moe_layers, f"{arch} has MoE in every layer; Qwen2-MoE / Qwen3-MoE hold dense layers (mlp_only_layers)")
  if mtype == "dots1":
    _check_dots1(cfg, arch)
    return
  _needs(cfg.gating != "sigmoid_topk", arch, "gating", cfg.gating,
         "only dots1 (Dots1ForCausalLM) routes by sigmoid scores")
  _needs(cfg.balance != "loss_free", arch, "balance", cfg.balance,
         "only dots1 (Dots1ForCausalLM) holds a selection bias (e_score_correction_bias)")
  _needs(mtype != "mixtral" or cfg.gating == "topk_softmax", arch, "gating", cfg.gating,
         "Mixtral renormalises the top-k probabilities (topk_softmax)")
  _needs(not cfg.num_shared_experts or (mtype == "qwen2_moe" and cfg.shared_gate), arch, "num_shared_experts",
         cfg.num_shared_experts, "only Qwen2-MoE has shared experts, and it gates them (shared_gate=True); no "
         "class in this list holds ungated (DeepSeek-style) shared experts")


def _check_dots1(cfg: ModelConfig, arch: str) -> None:
  """dots1's conditions: sigmoid_topk gates, dense layers only before the MoE ones
  (first_k_dense_replace), shared experts ungated and of the experts' width (or none)."""
  ids = cfg.moe_layer_ids
  _needs(cfg.gating == "sigmoid_topk", arch, "gating", cfg.gating,
         "dots1 routes by sigmoid scores renormalised over the chosen experts (sigmoid_topk)")
  _needs(ids == tuple(range(ids[0], cfg.num_layers)), arch, "moe_layers", cfg.moe_layers,
         "dots1's MoE layers are every layer from first_k_dense_replace on")
  _needs(not cfg.num_shared_experts or (cfg.shared_d_ff == cfg.expert_d_ff and not cfg.shared_gate), arch,
         "shared_d_ff", cfg.shared_d_ff, f"dots1's shared experts are ungated and as wide as its experts "
         f"(expert_d_ff={cfg.expert_d_ff})")


def _family_fields(cfg: ModelConfig, mtype: str) -> dict[str, Any]:
  """The fields a model_type's config carries to say what moegrow lacks (biases, sliding windows)."""
  out: dict[str, Any] = {}
  if mtype in ("llama", "qwen3", "qwen3_moe", "olmoe", "dots1"):
    out["attention_bias"] = False
  if mtype == "dots1":
    out.update(sliding_window=None, max_window_layers=cfg.num_layers, layer_types=["full_attention"] * cfg.num_layers)
  if mtype == "llama":
    out["mlp_bias"] = False
  if mtype in ("mistral", "mixtral"):
    out["sliding_window"] = None
  if mtype in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  return out


def _moe_fields(cfg: ModelConfig, mtype: str) -> dict[str, Any]:
  """An MoE class's expert fields, under the names its model_type uses."""
  ids = cfg.moe_layer_ids
  e = cfg.experts_in_layer(ids[0])
  out: dict[str, Any] = dict(num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_weight,
                             output_router_logits=False)
  if mtype in ("mixtral", "olmoe"):  # the experts' width is intermediate_size
    out.update(num_local_experts=e, intermediate_size=cfg.expert_d_ff, router_jitter_noise=0.0)
  if mtype == "dots1":  # a model without shared experts gets one of zero output (moegrow.hf.weights)
    out.update(n_routed_experts=e, moe_intermediate_size=cfg.expert_d_ff, first_k_dense_replace=ids[0],
               n_shared_experts=max(1, cfg.num_shared_experts), norm_topk_prob=True, n_group=1, topk_group=1,
               routed_scaling_factor=cfg.expert_output_scale)
    return out
  if mtype != "mixtral":
    out.update(num_experts=e, num_local_experts=e, norm_topk_prob=cfg.gating == "topk_softmax")
  if mtype in ("qwen2_moe", "qwen3_moe"):
    out.update(moe_intermediate_size=cfg.expert_d_ff, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(cfg.num_layers) if i not in ids])
  if mtype == "qwen2_moe":
    out.update(qkv_bias=cfg.qkv_bias,
               shared_expert_intermediate_size=cfg.num_shared_experts * cfg.shared_d_ff)
  if mtype == "olmoe":
    out["clip_qkv"] = None
  return out
