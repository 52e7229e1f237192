"""ModelConfig (validation, JSON, defaults, derived sizes) and moegrow.flops against counts of the
parameters the model really creates and against hand computations."""
import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from moegrow import flops
from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.params.trees import flatten

from _tiny import model, moe


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, message", [
    (dict(gating="softmax"), r"gating='softmax' not in \('softmax_topk', 'topk_softmax', 'sigmoid_topk'\)"),
    (dict(dispatch="dropfull"), r"dispatch='dropfull' not in \('dropless', 'capacity'\)"),
    (dict(routing="random"), r"routing='random' not in"),
    (dict(moe_impl="cuda"), r"moe_impl='cuda' not in"),
    (dict(mlp_act="relu"), r"mlp_act='relu' not in"),
    (dict(moe_layers="odd"), r"moe_layers='odd' not in \('none', 'all', 'every_other'\)"),
    (dict(num_layers=4, moe_layers=(1, 4, -1)), r"moe_layers \[4, -1\] out of range for num_layers=4"),
    (dict(num_layers=4, moe_layers="every_other", num_experts=(2, 3, 4)),
     r"num_experts has 3 entries for 2 MoE layers \(1, 3\)"),
    (dict(num_layers=4, moe_layers=(0, 2), num_experts=(4,)), r"num_experts has 1 entries for 2 MoE layers \(0, 2\)"),
    (dict(moe_layers="all", num_experts=(4, 2), top_k=3), r"layer 1: top_k=3 > num_experts=2"),
    (dict(moe_layers="all", num_experts=2, top_k=3), r"layer 0: top_k=3 > num_experts=2"),
    (dict(moe_layers=(1,), num_experts=0, top_k=1), r"layer 1: num_experts=0 must be >= 1"),
])
def test_validation_errors_name_the_field(kw, message):
  with pytest.raises(ValueError, match=r"^ModelConfig: " + message):
    model(**kw)


def test_valid_edge_cases_pass_validation():
  # Expert-choice routing has no per-token top_k, so top_k may exceed the expert count.
  cfg = model(moe_layers="all", num_experts=2, top_k=3, routing="expert_choice")
  assert cfg.experts_in_layer(0) == 2
  # Duplicated layer ids count once, in sorted order; num_experts is per distinct MoE layer.
  cfg = model(num_layers=4, moe_layers=(3, 1, 3), num_experts=(2, 6))
  assert cfg.moe_layer_ids == (1, 3)
  assert [cfg.experts_in_layer(i) for i in range(4)] == [0, 2, 0, 6]
  # replace() validates too.
  with pytest.raises(ValueError, match="gating='x'"):
    cfg.replace(gating="x")


def test_moe_layer_patterns():
  assert model(num_layers=5, moe_layers="none").moe_layer_ids == ()
  assert model(num_layers=5, moe_layers="all").moe_layer_ids == (0, 1, 2, 3, 4)
  assert model(num_layers=5, moe_layers="every_other").moe_layer_ids == (1, 3)


def test_lists_become_tuples_and_config_stays_hashable():
  a = model(num_layers=4, moe_layers=[1, 3], num_experts=[2, 4])
  b = model(num_layers=4, moe_layers=(1, 3), num_experts=(2, 4))
  assert a.moe_layers == (1, 3) and a.num_experts == (2, 4)
  assert a == b and hash(a) == hash(b)


# ---------------------------------------------------------------- JSON, defaults, derived sizes

def test_json_round_trip_with_tuples():
  cfg = model(num_layers=4, moe_layers=(0, 3), num_experts=(3, 5), top_k=2, head_dim=12, mlp_act="gelu",
              tie_embeddings=False, gating="softmax_topk", capacity_factor=1.5, dtype="bfloat16")
  text = cfg.to_json()
  raw = json.loads(text)
  assert raw["moe_layers"] == [0, 3] and raw["num_experts"] == [3, 5]  # JSON has no tuples
  assert list(raw) == sorted(raw)  # sorted keys: stable files
  back = ModelConfig.from_json(text)
  assert back == cfg
  assert back.moe_layers == (0, 3) and isinstance(back.num_experts, tuple)
  assert back.to_json() == text
  # Every field survives, not only the ones compared by a custom __eq__.
  assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_from_dict_rejects_unknown_keys_all_listed():
  d = model().to_dict()
  d.update(zz_top=1, bogus=2)
  with pytest.raises(ValueError, match=r"unknown keys \['bogus', 'zz_top'\]"):
    ModelConfig.from_dict(d)


def test_defaults_are_the_declared_defaults():
  d = ModelConfig.defaults()
  assert set(d) == {f.name for f in dataclasses.fields(ModelConfig)}
  # Derived sizes are still 0 in the declared defaults ...
  assert d["head_dim"] == 0 and d["expert_d_ff"] == 0 and d["shared_d_ff"] == 0
  assert d["d_model"] == 256 and d["num_heads"] == 4 and d["d_ff"] == 1024 and d["moe_layers"] == "none"
  # ... and are derived by the constructor.
  cfg = ModelConfig(**d)
  assert (cfg.head_dim, cfg.expert_d_ff, cfg.shared_d_ff) == (64, 1024, 1024)
  assert ModelConfig.defaults() == d  # not mutated by the construction


def test_derived_sizes():
  cfg = model(d_model=48, num_heads=3, d_ff=40)
  assert cfg.head_dim == 16 and cfg.expert_d_ff == 40 and cfg.shared_d_ff == 40
  cfg = model(d_model=48, num_heads=3, d_ff=40, head_dim=7, expert_d_ff=24)
  assert cfg.head_dim == 7 and cfg.expert_d_ff == 24 and cfg.shared_d_ff == 24  # shared follows expert_d_ff
  cfg = model(expert_d_ff=24, shared_d_ff=5)
  assert cfg.shared_d_ff == 5
  # replace() keeps derived sizes unless they are reset to 0.
  base = model(d_model=16, num_heads=2)
  assert base.replace(d_model=32).head_dim == 8
  assert base.replace(d_model=32, head_dim=0).head_dim == 16


# ---------------------------------------------------------------- parameter counts

def _leaf_sizes(tree) -> dict[str, int]:
  return {p: int(np.prod(x.shape)) for p, x in flatten(tree).items()}


def _unused_expert_params(cfg, sizes) -> int:
  """(E - k) experts' parameters per MoE layer, from the stacked expert leaves of the real tree."""
  out = 0
  for i in cfg.moe_layer_ids:
    e = cfg.experts_in_layer(i)
    per_expert = sum(n for p, n in sizes.items()
                     if p.startswith(f"blocks/{i}/mlp/") and p.split("/")[-1].split("_")[-1] in ("EDF", "EFD")) // e
    out += (e - cfg.top_k) * per_expert
  return out


CONFIGS = {
    "dense_tied_swiglu": lambda: model(),
    "untied_gelu_head_dim": lambda: model(num_layers=3, mlp_act="gelu", tie_embeddings=False, head_dim=12),
    "moe_shared_per_layer_counts": lambda: model(num_layers=4, moe_layers="every_other", num_experts=(3, 5), top_k=2,
                                                 expert_d_ff=24, num_shared_experts=2, shared_d_ff=8),
    "moe_all_gelu_top1": lambda: model(moe_layers="all", num_experts=4, top_k=1, mlp_act="gelu", tie_embeddings=False),
    "moe_loss_free_sigmoid": lambda: model(moe_layers="all", num_experts=6, top_k=2, gating="sigmoid_topk",
                                           balance="loss_free"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_params_matches_created_parameters(name):
  cfg = CONFIGS[name]()
  real = _leaf_sizes(jax.eval_shape(lambda: tf.init_params(cfg, 0)))  # runs the init code, allocates nothing
  abstract = _leaf_sizes(tf.abstract_params(cfg))
  assert real == abstract
  counts = flops.count_params(cfg)
  assert counts["total"] == sum(real.values())
  assert counts["active"] == sum(real.values()) - _unused_expert_params(cfg, real)
  if not cfg.moe_layer_ids:
    assert counts["active"] == counts["total"]


def test_count_params_by_hand():
  # V=259, D=16, L=2, H=2, A=8, F=32, SwiGLU, tied.
  # embedding 259*16 = 4144, final norm 16; per layer: attention 4*16*2*8 = 1024, two norms 32,
  # MLP 3*16*32 = 1536 -> 2592.
  assert flops.count_params(model()) == {"total": 4144 + 16 + 2 * 2592, "active": 9344}
  # Layer 1 MoE: E=4, k=2, F_e=24, one shared expert of 8: attention+norms 1056, experts 4*3*16*24 = 4608,
  # router 16*4 + 4 = 68, shared 3*16*8 = 384 -> 6116; active experts 2*3*16*24 = 2304 -> 3812.
  assert flops.count_params(moe()) == {"total": 4160 + 2592 + 6116, "active": 4160 + 2592 + 3812}


def test_train_flops_per_token_by_hand():
  t = 8
  # Dense: N = D V + L (4 D H A + 3 D F) = 16*259 + 2*(1024 + 1536) = 9264; 6 N + 12 L T H A = 55584 + 3072.
  assert flops.matmul_params_per_token(model()) == 9264
  assert flops.train_flops_per_token(model(), t) == 58656.0
  # MoE (layer 1: k=2 of F_e=24, shared 8, E=4): layer 1 = 1024 + 3*16*(2*24 + 8) + 16*4 = 3776;
  # N = 4144 + 2560 + 3776 = 10480.
  assert flops.matmul_params_per_token(moe()) == 10480
  assert flops.train_flops_per_token(moe(), t) == 6.0 * 10480 + 12 * 2 * t * 2 * 8
  # GELU has two matrices per MLP; head_dim enters both the attention and the context term.
  cfg = model(mlp_act="gelu", head_dim=5, num_layers=1)
  n = 16 * 259 + 4 * 16 * 2 * 5 + 2 * 16 * 32
  assert flops.train_flops_per_token(cfg, 64) == 6.0 * n + 12 * 1 * 64 * 2 * 5
  assert math.isclose(flops.train_flops_per_token(cfg, 0), 6.0 * n)
