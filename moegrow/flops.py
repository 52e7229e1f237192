"""Parameter and FLOP counts of a model config: the one formula used by the model summary,
the benchmarks and the experiments' compute matching.

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L T H A, where N
counts the matmul parameters one token passes through (active ones only in MoE layers) and the
second term is attention's score and value products over a context of T.
"""
from __future__ import annotations

from moegrow.config import ModelConfig

FORMULA = ("train FLOPs/token = 6 * N_active_matmul + 12 * L * T * H * A, where N_active_matmul = "
           "sum over layers of [2 D (H + U) A (attention; U key/value heads) + m D F_active (MLP; m=3 SwiGLU, 2 GELU; "
           "F_active = k * F_expert + F_shared in MoE layers) + D E (router)] + D V (output head)")


def _mats(cfg: ModelConfig) -> int:
  return 3 if cfg.mlp_act == "swiglu" else 2


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Total and per-token active parameter counts (embedding included once)."""
  d, hd, h, m = cfg.d_model, cfg.head_dim, cfg.num_heads, _mats(cfg)
  u = cfg.num_kv_heads
  attn = 2 * d * (h + u) * hd + 2 * d  # q, o: H heads; k, v: U heads; two norms
  attn += (h + 2 * u) * hd if cfg.qkv_bias else 0
  attn += {"none": 0, "head": 2 * hd, "proj": (h + u) * hd}[cfg.qk_norm]
  total = active = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d
  for i in range(cfg.num_layers):
    e = cfg.experts_in_layer(i)
    total += attn
    active += attn
    if e == 0:
      total += m * d * cfg.d_ff
      active += m * d * cfg.d_ff
    else:
      shared = cfg.num_shared_experts * m * d * cfg.shared_d_ff + (d if cfg.num_shared_experts and cfg.shared_gate else 0)
      router = d * e + e + (e if cfg.balance == "loss_free" else 0)  # router, its bias, a selection bias
      total += e * m * d * cfg.expert_d_ff + router + shared
      active += cfg.top_k * m * d * cfg.expert_d_ff + router + shared  # k experts per token
  return {"total": total, "active": active}


def matmul_params_per_token(cfg: ModelConfig) -> int:
  """N_active_matmul of FORMULA."""
  m = _mats(cfg)
  n = cfg.d_model * cfg.vocab_size
  for i in range(cfg.num_layers):
    n += 2 * cfg.d_model * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim  # q, o; k, v
    e = cfg.experts_in_layer(i)
    if e:
      f = cfg.top_k * cfg.expert_d_ff + cfg.num_shared_experts * cfg.shared_d_ff
      n += m * cfg.d_model * f + cfg.d_model * e
    else:
      n += m * cfg.d_model * cfg.d_ff
  return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """FORMULA: 6 N_active_matmul + 12 L T H A."""
  return 6.0 * matmul_params_per_token(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """One forward pass (a distillation teacher's): a third of FORMULA's training FLOPs, whose
  backward pass is twice the forward."""
  return train_flops_per_token(cfg, seq_len) / 3.0
