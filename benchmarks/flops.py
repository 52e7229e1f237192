"""Model FLOPs per token for MFU (PaLM appendix B convention: 6N + 12 L T D)."""
from __future__ import annotations

from moegrow.config import ModelConfig

FORMULA = ("train FLOPs/token = 6 * N_active_matmul + 12 * L * T * H * A, where N_active_matmul = "
           "sum over layers of [4 D H A (attention) + m D F_active (MLP; m=3 SwiGLU, 2 GELU; "
           "F_active = k * F_expert + F_shared in MoE layers) + D E (router)] + D V (output head)")


def matmul_params_per_token(cfg: ModelConfig) -> int:
  m = 3 if cfg.mlp_act == "swiglu" else 2
  n = cfg.d_model * cfg.vocab_size
  for i in range(cfg.num_layers):
    n += 4 * cfg.d_model * cfg.num_heads * cfg.head_dim
    e = cfg.experts_in_layer(i)
    if e:
      f = cfg.top_k * cfg.expert_d_ff + cfg.num_shared_experts * cfg.shared_d_ff
      n += m * cfg.d_model * f + cfg.d_model * e
    else:
      n += m * cfg.d_model * cfg.d_ff
  return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  return 6.0 * matmul_params_per_token(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
