"""Hugging Face interop (moegrow.hf): import every supported architecture, export grown models, round
trips, bfloat16, training an imported model with configs/hf.py, and the errors.

The reference is always `transformers` run independently with torch on the same token ids (never the
certificates the code under test writes); moegrow's logits are computed here with
`moegrow.model.transformer.apply` on params restored from the moegrow checkpoint on disk. Every HF
weight gets noise after construction, so zero biases or unit norms cannot hide a mapping mistake.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from moegrow import checkpoint  # noqa: E402
from moegrow.configs import lm  # noqa: E402
from moegrow.hf import arch as archs  # noqa: E402
from moegrow.hf import convert, files  # noqa: E402
from moegrow.model import transformer as tf  # noqa: E402
from moegrow.orchestrate import parts, stages  # noqa: E402
from moegrow.params import trees  # noqa: E402
from moegrow.surgery import apply as surgery  # noqa: E402
from moegrow.train.steps import build_program  # noqa: E402

pytestmark = pytest.mark.slow  # slow tier: against transformers (torch)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300  # >= 259: byte tokens fit (the training test)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int64)
TOL = 1e-4
KEY = jax.random.PRNGKey(11)
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(num_experts=4, num_experts_per_tok=2)
SHARDED = {"llama"}  # saved with max_shard_size="20KB": an index and several shards (unless single=True)

# name -> (transformers config class, its arguments beyond COMMON)
HF = {
    "llama": ("LlamaConfig", dict(intermediate_size=64, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(intermediate_size=64, sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=64, tie_word_embeddings=False)),
    # head_dim differs from hidden/heads (32/4 = 8): an explicit head_dim must be read, not derived
    "qwen3": ("Qwen3Config", dict(intermediate_size=64, head_dim=16, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, mlp_only_layers=[0], norm_topk_prob=False,
                                         tie_word_embeddings=False, **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                                         norm_topk_prob=True, tie_word_embeddings=False, **MOE)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, norm_topk_prob=False, tie_word_embeddings=False, **MOE)),
    # sigmoid routing with a selection bias (randomised: it changes the choice), routed scaling,
    # a dense first layer and a shared expert; one expert group
    "dots1": ("Dots1Config", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                  topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, sliding_window=None,
                                  head_dim=8, tie_word_embeddings=False)),
}

# name -> the imported ModelConfig fields that must follow from config.json
EXPECT = {
    "llama": dict(num_kv_heads=2, head_dim=8, qkv_bias=False, qk_norm="none", tie_embeddings=True, moe_layer_ids=()),
    "mistral": dict(num_kv_heads=2, qkv_bias=False, qk_norm="none", tie_embeddings=False, moe_layer_ids=()),
    "qwen2": dict(num_kv_heads=2, qkv_bias=True, qk_norm="none", tie_embeddings=False, moe_layer_ids=()),
    "qwen3": dict(num_kv_heads=2, head_dim=16, qkv_bias=False, qk_norm="head", moe_layer_ids=()),
    "mixtral": dict(num_kv_heads=2, qkv_bias=False, qk_norm="none", gating="topk_softmax", moe_layer_ids=(0, 1),
                    num_experts=4, top_k=2, expert_d_ff=48, num_shared_experts=0),
    "qwen2_moe": dict(num_kv_heads=2, qkv_bias=True, qk_norm="none", gating="softmax_topk", moe_layer_ids=(1,),
                      num_experts=4, top_k=2, expert_d_ff=16, d_ff=64, num_shared_experts=1, shared_d_ff=24,
                      shared_gate=True),
    "qwen3_moe": dict(num_kv_heads=2, qkv_bias=False, qk_norm="head", gating="topk_softmax", moe_layer_ids=(0, 1),
                      expert_d_ff=16, num_shared_experts=0),
    "olmoe": dict(num_kv_heads=2, qkv_bias=False, qk_norm="proj", gating="softmax_topk", moe_layer_ids=(0, 1),
                  expert_d_ff=16, num_shared_experts=0),
    "dots1": dict(num_kv_heads=2, qkv_bias=False, qk_norm="head", gating="sigmoid_topk", balance="loss_free",
                  moe_layer_ids=(1,), num_experts=4, expert_d_ff=16, d_ff=64, num_shared_experts=1, shared_d_ff=16,
                  shared_gate=False, expert_output_scale=2.5),
}

ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "dots1": "Dots1ForCausalLM"}


# ---------------------------------------------------------------- helpers

def base():
  """The run config imports and exports use for the mesh and optimizer: one device."""
  c = lm.get_config("tiny")
  c.mesh.update(data=1, num_devices=1)
  return c


def hf_config(name, **over):
  cls, kw = HF[name]
  return getattr(transformers, cls)(**{**COMMON, **kw, **over})


def randomise(model, seed):
  """Every parameter (norms, biases and routers included) and selection bias (dots1's
  e_score_correction_bias buffers) plus noise of std in [0.1, 0.5]."""
  g = torch.Generator().manual_seed(seed)
  biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
  with torch.no_grad():
    for p in list(model.parameters()) + biases:
      std = 0.1 + 0.4 * torch.rand((), generator=g).item()
      p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def torch_logits(model) -> np.ndarray:
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS)).logits.float().numpy()


def hf_logits(directory) -> np.ndarray:
  """transformers' own loading of an HF directory, float32."""
  return torch_logits(transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32))


def moegrow_logits(cfg, params) -> np.ndarray:
  """float32 logits of moegrow's model, op by op (no jit: for these tiny models, compiling each
  primitive once for the whole module is much cheaper than compiling every model's forward)."""
  p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  with jax.disable_jit():
    return np.asarray(tf.apply(cfg.replace(dtype="float32"), p32, jnp.asarray(TOKENS, jnp.int32))[0])


def restored(workdir):
  """(params, cfg) of the newest moegrow checkpoint in `workdir`, read back from disk with Orbax
  directly (no target tree: the arrays exactly as they were written, in their stored dtype)."""
  src_dir, prefix, step = checkpoint.locate(str(workdir))
  mngr = checkpoint.manager(src_dir, read_only=True, step_prefix=prefix)
  try:
    cfg = checkpoint.model_config(checkpoint.read_meta(mngr, step))
    state = mngr.restore(step, args=ocp.args.Composite(**{checkpoint.STATE: ocp.args.StandardRestore()}))
  finally:
    mngr.close()
  params = jax.tree.map(np.asarray, state[checkpoint.STATE]["params"])
  shapes = lambda tree: {k: tuple(v.shape) for k, v in trees.flatten(tree).items()}
  assert shapes(params) == shapes(tf.abstract_params(cfg))  # every leaf of the config, nothing else
  return params, cfg


def max_diff(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def tensors(directory) -> dict:
  """Every tensor of an HF directory (single file or index + shards), via torch's safetensors."""
  index = os.path.join(directory, files.INDEX)
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  else:
    names = [files.SINGLE]
  out = {}
  for n in names:
    part = load_file(os.path.join(directory, n))
    assert not set(part) & set(out), f"{n}: tensors also in another shard"
    out.update(part)
  return out


def assert_bit_identical(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    g = got[name]
    assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), name
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[w.dtype]
    assert torch.equal(g.contiguous().view(bits), w.contiguous().view(bits)), f"{name} differs"


def save_run(workdir, cfg, params):
  """Write `params` of `cfg` as step 0 of a new moegrow run (as convert.import_model does)."""
  config = convert.run_config(cfg, base())
  program = build_program(cfg, config.train, parts.make_mesh(config))
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  with jax.disable_jit():  # op by op: cheaper than compiling the optimizer's init for every config
    state = {"params": params, "step": jnp.zeros((), jnp.int32), "opt_state": program.tx.init(params)}
  state = jax.device_put(state, program.state_sharding)
  mngr = parts.manager(str(workdir), 0, config.train)
  try:
    checkpoint.save(mngr, 0, state, {"model": cfg.to_dict(), "stage": 0, "lineage": []}, None)
    mngr.wait_until_finished()
  finally:
    mngr.close()


def grow(params, cfg, ops):
  new, cfg2, reports = surgery.apply_ops({"params": params}, cfg, ops, KEY, shapes=tf.abstract_params)
  return new["params"], cfg2, reports


def absent_or_empty(path) -> bool:
  return not os.path.exists(path) or not os.listdir(path)


def edit_config(directory, **fields):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    c = json.load(f)
  c.update(fields)
  with open(path, "w") as f:
    json.dump(c, f)


# ---------------------------------------------------------------- module fixtures (built once)

@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """name -> HF model directory (randomised, saved with save_pretrained) and its in-memory logits."""
  root = tmp_path_factory.mktemp("hf")
  cache = {}

  def get(name, dtype=None, single=False):
    shard = "20KB" if name in SHARDED and not single else None
    key = (name, dtype, shard)
    if key not in cache:
      torch.manual_seed(0)
      model = transformers.AutoModelForCausalLM.from_config(hf_config(name))
      randomise(model, seed=sorted(HF).index(name))
      if dtype is not None:
        model = model.to(dtype)
      d = str(root / f"{name}-{str(dtype).split('.')[-1]}-{shard}")
      model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
      cache[key] = types.SimpleNamespace(dir=d, logits=torch_logits(model.float()))
    return cache[key]

  return get


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory):
  """name -> the HF model imported as a moegrow run: its workdir, restored params and config."""
  root = tmp_path_factory.mktemp("runs")
  cache = {}

  def get(name, **kw):
    kw = {k: v for k, v in kw.items() if v is not None}
    key = (name, tuple(sorted(kw.items())))
    if key not in cache:
      src = hf_models(name, **kw)
      workdir = str(root / f"{name}-{len(cache)}")
      cert = convert.import_model(src.dir, workdir, base())
      params, cfg = restored(workdir)
      cache[key] = types.SimpleNamespace(src=src, workdir=workdir, cert=cert, params=params, cfg=cfg)
    return cache[key]

  return get


@pytest.fixture(scope="module")
def cli_runs(imported, hf_models, tmp_path_factory):
  """`python -m moegrow.hf import` on a bad directory and `... export` of the imported Llama, started
  as soon as that import exists so they run alongside the in-process tests (collected by
  test_cli_import_error_and_export_certificate; output to files: a full pipe would stall them)."""
  root = tmp_path_factory.mktemp("cli")
  bad = copy_of(hf_models("llama").dir, root, "bad")
  edit_config(bad, architectures=["GPT2LMHeadModel"])
  llama = imported("llama")
  env = dict(os.environ, PYTHONPATH=REPO)
  cmds = {"import": ["import", f"--from={bad}", f"--workdir={root / 'run'}"],
          "export": ["export", f"--from={llama.workdir}", f"--to={root / 'out'}"]}
  procs = {}
  for k, args in cmds.items():
    with open(root / f"{k}.log", "w") as log:
      procs[k] = subprocess.Popen([sys.executable, "-m", "moegrow.hf", *args], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
  yield root, llama, procs
  for p in procs.values():
    if p.poll() is None:
      p.kill()
      p.wait()


# ---------------------------------------------------------------- 1. import, every architecture

@pytest.mark.parametrize("name", list(HF))
def test_import_matches_transformers(name, imported, cli_runs):  # cli_runs: start the CLI runs early
  run = imported(name)
  for field, want in EXPECT[name].items():
    assert getattr(run.cfg, field) == want, (field, getattr(run.cfg, field), want)
  assert run.cfg.dtype == "float32" and not run.cfg.tied_logit_scale
  assert run.cert["architecture"] == ARCH_CLASS[name]
  ours = moegrow_logits(run.cfg, run.params)
  diff = max_diff(ours, run.src.logits)
  print(f"\n[hf] import {name}: max |moegrow - transformers| = {diff:.2e}")
  assert diff <= TOL
  assert np.abs(run.src.logits).max() > 1.0  # logits big enough for the tolerance to mean something


# ---------------------------------------------------------------- 2. bfloat16

def test_bfloat16_imports_as_bfloat16_and_round_trips_bit_exactly(imported, tmp_path):
  run = imported("llama", dtype=torch.bfloat16)
  assert run.cfg.dtype == "bfloat16" and run.cert["dtype"] == "bfloat16"
  assert {str(x.dtype) for x in jax.tree.leaves(run.params)} == {"bfloat16"}  # as stored in the checkpoint
  # the bf16 weights, upcast, are the function transformers computes from the same bf16 file
  diff = max_diff(moegrow_logits(run.cfg, run.params), hf_logits(run.src.dir))
  print(f"\n[hf] import llama bfloat16 (float32 compute): max |moegrow - transformers| = {diff:.2e}")
  assert diff <= TOL
  out = str(tmp_path / "bf16-out")
  cert = convert.export_model(run.workdir, out, base())
  assert cert["dtype"] == "bfloat16"
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  src = tensors(run.src.dir)
  assert {t.dtype for t in src.values()} == {torch.bfloat16}
  assert_bit_identical(tensors(out), src)


# ---------------------------------------------------------------- 3. round trips

CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "tie_word_embeddings", "num_experts_per_tok", "norm_topk_prob",
                 "mlp_only_layers", "moe_intermediate_size", "shared_expert_intermediate_size", "qkv_bias",
                 "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor", "n_group",
                 "topk_group")


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen2_moe", "dots1"])
def test_round_trip_is_bit_exact(name, imported, tmp_path):
  run = imported(name)
  shard = name in SHARDED
  if shard:  # the source is sharded: an index and several shards
    with open(os.path.join(run.src.dir, files.INDEX)) as f:
      assert len(set(json.load(f)["weight_map"].values())) >= 3
  out = str(tmp_path / f"{name}-out")
  convert.export_model(run.workdir, out, base(), max_shard_bytes=20_000 if shard else 5 * 2**30)
  src = tensors(run.src.dir)
  assert {t.dtype for t in src.values()} == {torch.float32}
  got = tensors(out)
  assert_bit_identical(got, src)
  if shard:  # the export is sharded too, with a complete index
    with open(os.path.join(out, files.INDEX)) as f:
      index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                           for k in range(1, len(shards) + 1)]
    assert sorted(index["weight_map"]) == sorted(src)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    assert not os.path.exists(os.path.join(out, files.SINGLE))
    for shard_file in shards:
      part = load_file(os.path.join(out, shard_file))
      assert sorted(part) == sorted(k for k, v in index["weight_map"].items() if v == shard_file)
      size = sum(t.numel() * t.element_size() for t in part.values())
      assert size <= 20_000 or len(part) == 1, (shard_file, size)  # only a single tensor may exceed the limit
  a, b = transformers.AutoConfig.from_pretrained(run.src.dir), transformers.AutoConfig.from_pretrained(out)
  assert type(a) is type(b)
  for field in CONFIG_FIELDS:
    if hasattr(a, field):
      assert getattr(a, field) == getattr(b, field), field
  assert a.rope_parameters["rope_theta"] == b.rope_parameters["rope_theta"]
  head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # None: derived
  assert head_dim(a) == head_dim(b)


# ---------------------------------------------------------------- 4. export after growth

def export_and_compare(workdir, out, arch, cfg, params):
  """Export `workdir` (holding `params` of `cfg`); max |transformers' logits from the export - moegrow's|."""
  cert = convert.export_model(str(workdir), str(out), base())
  assert cert["architecture"] == arch
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == [arch]
  return max_diff(moegrow_logits(cfg, params), hf_logits(str(out)))


GROWTH = {
    # dense Llama -> MoE in layer 1 only: only Qwen2-MoE holds dense layers next to MoE ones. softmax_topk
    # with a uniform router (exact): expert_output_scale E/k = 2 must be folded into the experts' down
    # projections (norm_topk_prob false). The topk_softmax every-other-layer upcycle is the training test's.
    "upcycle_every_other": ("llama", [dict(op="upcycle", layers="every_other", num_experts=4, top_k=2,
                                           gating="softmax_topk", router_std=0.0)], "Qwen2MoeForCausalLM", True),
    "upcycle_all": ("llama", [dict(op="upcycle", layers="all", num_experts=4, top_k=2)], "MixtralForCausalLM", True),
    "insert_blocks": ("llama", [dict(op="insert_blocks", positions=[1])], "LlamaForCausalLM", True),
    # copy_noise copies the source experts' router bias (0 after an import): exportable, not exact
    "add_experts_copy_noise": ("mixtral", [dict(op="add_experts", num_experts=6, mode="copy_noise")],
                               "MixtralForCausalLM", False),
    # a shrunk expert table (equal counts in every MoE layer) exports as the same class, fewer experts
    "prune_experts": ("mixtral", [dict(op="prune_experts", num_experts=2, saliency="list", keep={0: [3, 1], 1: [0, 2]})],
                      "MixtralForCausalLM", False),
    "merge_experts": ("qwen3_moe", [dict(op="merge_experts", num_experts=2, grouping="list",
                                         groups={0: [[0, 1], [2, 3]], 1: [[0, 3], [1, 2]]},
                                         usage={0: [0.1, 0.3, 0.4, 0.2], 1: [0.25, 0.25, 0.4, 0.1]})],
                      "Qwen3MoeForCausalLM", False),
    # sigmoid routing (renormalised: an exact upcycle) exports as dots1, with a zero shared expert
    "upcycle_sigmoid": ("qwen3", [dict(op="upcycle", num_experts=4, top_k=2, gating="sigmoid_topk")],
                        "Dots1ForCausalLM", True),
    # a pruned loss-free model: its selection bias, sliced, becomes dots1's e_score_correction_bias
    "prune_loss_free": ("dots1", [dict(op="prune_experts", num_experts=2, saliency="list", keep={1: [3, 0]})],
                        "Dots1ForCausalLM", False),
}


@pytest.mark.parametrize("case", list(GROWTH))
def test_export_after_growth(case, imported, tmp_path):
  name, ops, arch, exact = GROWTH[case]
  run = imported(name)
  params, cfg2, reports = grow(run.params, run.cfg, ops)
  assert all(r["exact"] for r in reports) == exact
  if case == "upcycle_every_other":
    assert cfg2.moe_layer_ids == (1,) and cfg2.expert_output_scale == 2.0 and cfg2.gating == "softmax_topk"
  save_run(tmp_path / "grown", cfg2, params)
  diff = export_and_compare(tmp_path / "grown", tmp_path / "out", arch, cfg2, params)
  print(f"\n[hf] export after {case} as {arch}: max |moegrow - transformers| = {diff:.2e}")
  assert diff <= TOL
  if exact:  # the grown model is still the source model: transformers' own source logits
    assert max_diff(hf_logits(str(tmp_path / "out")), run.src.logits) <= TOL
  if case == "insert_blocks":
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).num_hidden_layers == 3
  if case == "add_experts_copy_noise":
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).num_local_experts == 6
  if case in ("prune_experts", "merge_experts", "prune_loss_free"):
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert getattr(hf, "num_local_experts", getattr(hf, "num_experts", None)) == 2
  if case == "prune_loss_free":
    got = tensors(str(tmp_path / "out"))["model.layers.1.mlp.gate.e_score_correction_bias"].numpy()
    np.testing.assert_array_equal(got, tensors(run.src.dir)["model.layers.1.mlp.gate.e_score_correction_bias"]
                                  .numpy()[[0, 3]])


def test_export_refuses_a_nonzero_router_bias(imported, tmp_path):
  run = imported("mixtral")
  params, cfg2, (rep,) = grow(run.params, run.cfg, [dict(op="add_experts", num_experts=6, mode="exact")])
  assert rep["exact"]
  assert np.asarray(params["blocks"]["0"]["mlp"]["router_bias_E"])[4:].min() < -1000
  save_run(tmp_path / "grown", cfg2, params)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"blocks/0/mlp/router_bias_E is non-zero"):
    convert.export_model(str(tmp_path / "grown"), str(out), base())
  assert absent_or_empty(out)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temporary left either


# ---------------------------------------------------------------- 5. train an imported model (configs/hf.py)

def test_train_upcycle_with_configs_hf_then_export(hf_models, data_dir, tmp_path):
  from moegrow.configs import hf as hf_cfg
  src = hf_models("llama")
  workdir = str(tmp_path / "run")
  convert.import_model(src.dir, workdir, base())
  config = hf_cfg.get_config(f"{workdir},upcycle=4,steps=2")
  config.data.data_dir = data_dir
  config.data.seq_len = 32
  config.mesh.update(data=1, num_devices=1)
  config.train.update(batch_size=2, eval_batch_size=2, eval_batches=1, log_every=1, eval_every=0, checkpoint_every=2)
  result = stages.train_and_evaluate(config, workdir)
  assert result["step"] == 4 and result["stage"] == 1 and not result["stopped_early"]
  with open(os.path.join(workdir, "growth", "2.json")) as f:
    cert = json.load(f)
  assert [o["op"] for o in cert["ops"]] == ["upcycle"] and cert["loss_change"]
  for domain, change in cert["loss_change"].items():
    print(f"\n[hf] growth certificate {domain}: loss change {change:+.2e}")
    assert abs(change) < 1e-5, (domain, change)
  trained, cfg = restored(workdir)  # the final checkpoint, from disk
  assert cfg.moe_layer_ids == (1,) and cfg.experts_in_layer(1) == 4
  assert not np.array_equal(trained["embed_VD"], tensors(src.dir)["model.embed_tokens.weight"].numpy())  # it trained
  assert not np.asarray(trained["blocks"]["1"]["mlp"]["router_bias_E"]).any()  # frozen at 0: no HF router has one
  diff = export_and_compare(workdir, tmp_path / "out", "Qwen2MoeForCausalLM", cfg, trained)
  print(f"[hf] trained + upcycled llama exported as Qwen2-MoE: max |moegrow - transformers| = {diff:.2e}")
  assert diff <= TOL


def test_train_an_imported_moe_then_export(hf_models, data_dir, tmp_path):
  """An imported Mixtral trains as one stage (router biases frozen from the import on) and exports."""
  from moegrow.configs import hf as hf_cfg
  src = hf_models("mixtral")
  workdir = str(tmp_path / "run")
  convert.import_model(src.dir, workdir, base())
  config = hf_cfg.get_config(f"{workdir},steps=2")
  config.data.update(data_dir=data_dir, seq_len=32)
  config.mesh.update(data=1, num_devices=1)
  config.train.update(batch_size=2, eval_batch_size=2, eval_batches=1, log_every=1, eval_every=0, checkpoint_every=2)
  result = stages.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and not result["stopped_early"]
  trained, cfg = restored(workdir)
  assert not np.array_equal(np.asarray(trained["blocks"]["0"]["mlp"]["router_DE"]),
                            tensors(src.dir)["model.layers.0.block_sparse_moe.gate.weight"].numpy().T)  # it trained
  diff = export_and_compare(workdir, tmp_path / "out", "MixtralForCausalLM", cfg, trained)
  assert diff <= TOL


# ---------------------------------------------------------------- 6. errors

def copy_of(src, tmp_path, name="src"):
  d = str(tmp_path / name)
  shutil.copytree(src, d)
  return d


def test_import_refuses_an_unsupported_architecture(hf_models, tmp_path):
  d = copy_of(hf_models("llama").dir, tmp_path)
  edit_config(d, architectures=["GPT2LMHeadModel"])
  workdir = tmp_path / "run"
  with pytest.raises(archs.HFConfigError, match=r"config\.json: architectures=\['GPT2LMHeadModel'\]"):
    convert.import_model(d, str(workdir), base())
  assert absent_or_empty(workdir)


def test_import_refuses_a_missing_shard(hf_models, tmp_path):
  d = copy_of(hf_models("llama").dir, tmp_path)
  with open(os.path.join(d, files.INDEX)) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(d, shard))
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match=rf"{re.escape(files.INDEX)} lists shard file\(s\) that do not exist: "
                                              rf"\[.{re.escape(os.path.join(d, shard))}.\]"):
    convert.import_model(d, str(workdir), base())
  assert absent_or_empty(workdir)


def test_import_refuses_a_tensor_of_the_wrong_shape(hf_models, tmp_path):
  d = copy_of(hf_models("llama", single=True).dir, tmp_path)
  path = os.path.join(d, files.SINGLE)
  ts = load_file(path)
  name = "model.layers.1.self_attn.k_proj.weight"
  ts[name] = torch.zeros(8, 32)  # [U*A, D] = [16, 32] expected
  save_file(ts, path, metadata={"format": "pt"})
  for workdir in (tmp_path / "run", tmp_path / "empty"):  # absent, then existing and empty: left as it was
    if workdir.name == "empty":
      workdir.mkdir()
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: tensor {re.escape(name)} has shape \(8, 32\), "
                                         r"expected \(16, 32\)"):
      convert.import_model(d, str(workdir), base())
    assert os.path.isdir(workdir) == (workdir.name == "empty") and absent_or_empty(workdir)


@pytest.mark.parametrize("name, over, field", [
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_parameters.rope_type"),
    ("mistral", dict(sliding_window=4096), "sliding_window"),
    ("llama", dict(attention_bias=True), "attention_bias"),
])
def test_import_refuses_unrepresentable_features(name, over, field, tmp_path):
  d = str(tmp_path / "src")
  hf_config(name).save_pretrained(d)  # config.json only: refused before any weight is read
  edit_config(d, architectures=[ARCH_CLASS[name]], **over)
  workdir = tmp_path / "run"
  with pytest.raises(archs.HFConfigError, match=rf"config\.json: {field}="):
    convert.import_model(d, str(workdir), base())
  assert absent_or_empty(workdir)


def test_export_refusals(imported, tmp_path):
  llama = imported("llama")
  cases = {
      "gelu": (llama.cfg.replace(mlp_act="gelu"), r"mlp_act='gelu'"),
      "per_layer_experts": (None, r"num_experts=.*one expert count for every layer"),
  }
  sigmoid = llama.cfg.replace(moe_layers="all", num_experts=4, gating="sigmoid_topk", balance="loss_free")
  cases["loss_free_without_qk_norm"] = (sigmoid, r"Dots1ForCausalLM: qk_norm='none'")
  for case, (cfg, match) in cases.items():
    if cfg is not None:
      params = tf.init_params(cfg, 0)
    else:
      params, cfg, _ = grow(llama.params, llama.cfg, [dict(op="upcycle", layers=[0, 1], num_experts=[2, 4])])
    save_run(tmp_path / case, cfg, params)
    out = tmp_path / f"{case}-out"
    with pytest.raises(archs.HFConfigError, match=match):
      convert.export_model(str(tmp_path / case), str(out), base())
    assert absent_or_empty(out)
  with pytest.raises(archs.HFConfigError, match=r"gating='sigmoid_topk': only dots1"):
    convert.export_model(imported("dots1").workdir, str(tmp_path / "as-qwen3"), base(), arch="Qwen3MoeForCausalLM")
  out = tmp_path / "not-empty"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=f"{re.escape(str(out))} already exists and is not empty"):
    convert.export_model(llama.workdir, str(out), base())
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_cli_import_error_and_export_certificate(cli_runs):
  root, llama, procs = cli_runs
  outs = {}
  for k, p in procs.items():
    p.wait(timeout=300)
    with open(root / f"{k}.log") as f:
      outs[k] = f.read()
  assert procs["import"].returncode == 1, outs["import"]
  assert "moegrow: error:" in outs["import"] and "architectures=['GPT2LMHeadModel']" in outs["import"]
  assert "Traceback" not in outs["import"]
  assert absent_or_empty(root / "run")
  assert procs["export"].returncode == 0, outs["export"]
  assert "exported" in outs["export"] and "as LlamaForCausalLM" in outs["export"]
  line = [s for s in outs["export"].splitlines() if "max |moegrow - transformers| logit difference" in s]
  assert line, outs["export"]
  print(f"\n[hf] CLI export: {line[0]}")
  assert float(line[0].rsplit(":", 1)[1]) <= TOL
  assert max_diff(hf_logits(str(root / "out")), llama.src.logits) <= TOL
