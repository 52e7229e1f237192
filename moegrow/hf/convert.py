"""Import a Hugging Face model directory as a moegrow run, export a moegrow checkpoint as one.

  import_model(src, workdir, config): config.json -> ModelConfig (moegrow.hf.arch), every tensor
    read one at a time, checked against its expected shape, laid out as moegrow's leaf and placed
    straight onto the run's mesh sharding in its stored dtype; saved as step 0 of `workdir` with a
    fresh optimizer state and lineage naming the source; the tokenizer files are copied to
    `<workdir>/tokenizer/`. The source directory is only read.
  export_model(src, to, arch): a moegrow checkpoint (workdir, checkpoints dir or step dir) ->
    config.json + sharded safetensors + index in `to`, written atomically.
Both write a certificate (`<workdir>/hf_import.json`, `<to>/moegrow_export.json`): moegrow's
logits on a fixed prompt and, when `transformers` is installed, the max |logit difference| to
transformers' model read from the HF directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moegrow import checkpoint
from moegrow.config import DTYPES, ModelConfig
from moegrow.data import tokenizer as tokenization
from moegrow.hf import arch as archs
from moegrow.hf import files
from moegrow.hf.weights import BENIGN, import_plan, export_tensors
from moegrow.model import transformer as tf
from moegrow.orchestrate.parts import make_mesh, manager
from moegrow.params import ramp
from moegrow.params.trees import flatten, unflatten
from moegrow.train.steps import build_program
from moegrow.workdir_lock import WorkdirLock

PROMPT_LEN = 16
# No HF router has a bias: runs of imported models keep moegrow's router_bias_E frozen at 0 (so the
# optimizer holds no state for it, and the trained model still exports).
HF_FROZEN = (r"/router_bias_E$",)
FLOAT32_KEPT = ("e_score_correction_bias",)  # dots1 keeps its selection bias in float32 in any checkpoint
IMPORT_CERT, EXPORT_CERT = "hf_import.json", "moegrow_export.json"


def prompt(vocab_size: int) -> np.ndarray:
  """The certificate's fixed prompt: 16 token ids spread over the vocabulary, [1, 16]."""
  return ((np.arange(PROMPT_LEN, dtype=np.int64) * 7919 + 3) % vocab_size).astype(np.int32)[None]


def moegrow_logits(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
  """float32 logits of `params` (compute and weights in float32)."""
  cfg32 = cfg.replace(dtype="float32")
  p32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return np.asarray(jax.jit(tf.apply, static_argnums=0)(cfg32, p32, jnp.asarray(tokens))[0])


def transformers_logits(directory: str, tokens: np.ndarray) -> np.ndarray | None:
  """float32 logits of the HF model in `directory`, or None when transformers is not installed."""
  try:
    import torch  # noqa: PLC0415 - optional: an independent reference, not a dependency
    import transformers  # noqa: PLC0415
  except ImportError:
    return None
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def certificate(cfg: ModelConfig, params: dict, hf_dir: str) -> dict[str, Any]:
  tokens = prompt(cfg.vocab_size)
  ours = moegrow_logits(cfg, params, tokens)
  theirs = transformers_logits(hf_dir, tokens)
  out = {"prompt": tokens[0].tolist(), "moegrow_logits_last": ours[0, -1, :8].tolist(),
         "moegrow_logits_mean_abs": float(np.abs(ours).mean())}
  if theirs is not None:
    out["max_abs_logit_diff_vs_transformers"] = float(np.abs(ours - theirs).max())
  return out


def certificate_text(cert: dict) -> str:
  lines = [f"logits on the fixed prompt {cert['prompt'][:6]}...: mean |logit| {cert['moegrow_logits_mean_abs']:.4f}"]
  if "max_abs_logit_diff_vs_transformers" in cert:
    lines.append(f"max |moegrow - transformers| logit difference: {cert['max_abs_logit_diff_vs_transformers']:.3e}")
  else:
    lines.append("transformers is not installed: no comparison")
  return "\n".join(lines)


def run_config(cfg: ModelConfig, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the run config `base` (e.g. configs/lm.py's) holding model `cfg`, with the router
  bias frozen (`HF_FROZEN`)."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.model = ml_collections.ConfigDict(cfg.to_dict())
  frozen = tuple(c.train.get("frozen", ()) or ())
  c.train.frozen = frozen + tuple(f for f in HF_FROZEN if f not in frozen)
  return c


# ---------------------------------------------------------------- import

def read_config(src: str) -> dict:
  path = os.path.join(src, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: not a Hugging Face model directory")
  return files.read_json(path)


def load_params(reader: files.Reader, cfg: ModelConfig, arch: str, shardings: dict | None = None) -> dict:
  """Every leaf of `cfg` from `reader`, shape-checked, in the stored dtype; placed with
  `shardings` (path -> NamedSharding) when given. Unknown tensors are an error (nothing is
  dropped silently); a tied model's duplicate lm_head must equal its embedding."""
  names = reader.names()
  plan = import_plan(cfg, arch, names)
  wanted = {n for s in plan.values() for n in s.names}
  extra = sorted(n for n in names - wanted if not n.endswith(BENIGN) and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if extra:
    raise ValueError(f"{reader.directory}: tensor(s) the {arch} config has no place for: {extra[:8]}"
                     f"{' ...' if len(extra) > 8 else ''} (first in {reader.path(extra[0])})")
  missing = sorted(wanted - names)
  if missing:
    raise ValueError(f"{reader.directory}: tensor(s) missing for {arch}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  flat, dtypes = {}, set()
  for path, src in plan.items():
    arrays = []
    for name, want in zip(src.names, src.shapes):
      x = reader.get(name)
      if tuple(x.shape) != tuple(want):
        raise ValueError(f"{reader.path(name)}: tensor {name} has shape {tuple(x.shape)}, expected {tuple(want)} "
                         f"for {path} of the config")
      if not name.endswith(FLOAT32_KEPT):
        dtypes.add(str(x.dtype))
      arrays.append(x)
    flat[path] = _place(src.build(*arrays), shardings, path)
  if len(dtypes) > 1:
    raise ValueError(f"{reader.directory}: tensors of several dtypes {sorted(dtypes)}; moegrow imports one dtype")
  dt = next(iter(dtypes))
  for path in flat:  # a selection bias kept in float32 by a bfloat16 checkpoint: the model's dtype
    if path.endswith("selection_bias_E"):
      flat[path] = _place(np.asarray(flat[path]).astype(dt), shardings, path)
  for i in cfg.moe_layer_ids:  # no HF router has a bias
    path = f"blocks/{i}/mlp/router_bias_E"
    flat[path] = _place(np.zeros((cfg.experts_in_layer(i),), dt), shardings, path)
  if cfg.tie_embeddings and "lm_head.weight" in names:
    if not np.array_equal(reader.get("lm_head.weight"), np.asarray(flat["embed_VD"])):
      raise ValueError(f"{reader.path('lm_head.weight')}: tie_word_embeddings is true but lm_head.weight differs "
                       "from model.embed_tokens.weight")
  return unflatten(flat)


def _place(x: np.ndarray, shardings: dict | None, path: str):
  if shardings is None:
    return jnp.asarray(x)
  sh = shardings[path]
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def import_model(src: str, workdir: str, base: ml_collections.ConfigDict) -> dict[str, Any]:
  """Import the HF model directory `src` as step 0 of the new run `workdir` (see the module
  docstring), with the mesh and optimizer of the run config `base`; returns the certificate (also
  `<workdir>/hf_import.json`)."""
  hf = read_config(src)
  arch = archs.architecture(hf, os.path.join(src, "config.json"))
  cfg = archs.model_config(hf, os.path.join(src, "config.json"))
  reader = files.Reader(src)
  config = run_config(cfg, base)
  tok_files = list(files.iter_files(src, files.TOKENIZER_FILES))
  if any(f.endswith("tokenizer.json") for f in tok_files):
    config.data.tokenizer = os.path.join(os.path.abspath(workdir), "tokenizer")
  tr, mesh = config.train, make_mesh(config)
  with _nothing_left_on_failure(workdir):
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir, enabled=jax.process_index() == 0):
      mngr = manager(workdir, 0, tr)
      try:
        if mngr.latest_step() is not None:
          raise ValueError(f"{workdir} already holds checkpoints; import into a new --workdir")
        program = build_program(cfg, tr, mesh)
        shardings = flatten(program.state_sharding["params"])
        params = load_params(reader, cfg, arch, shardings)
        state = jax.jit(lambda p: {"params": p, "step": jnp.zeros((), jnp.int32),
                                   "opt_state": program.tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), p))},
                        out_shardings=program.state_sharding)(params)
        dtype = str(jax.tree.leaves(params)[0].dtype)
        entry = {"hf_import": os.path.abspath(src), "architecture": arch, "dtype": dtype,
                 "files": sorted(set(reader.file_of.values()))}
        checkpoint.save(mngr, 0, state, {"model": cfg.to_dict(), "stage": 0, "lineage": [entry]}, None)
        mngr.wait_until_finished()
      finally:
        mngr.close()
        reader.close()
    cert = dict(entry, model=cfg.to_dict(), **certificate(cfg, params, src))
    if jax.process_index() == 0:
      if tok_files:
        os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
        for f in tok_files:
          _copy(f, os.path.join(workdir, "tokenizer", os.path.basename(f)))
      checkpoint.write_json(os.path.join(workdir, IMPORT_CERT), cert)
  return cert


@contextlib.contextmanager
def _nothing_left_on_failure(workdir: str):
  """A failed import leaves `workdir` as it found it when it was absent or empty: no lock file, no
  empty or partial checkpoint (a workdir that held anything before is never touched)."""
  existed = os.path.exists(workdir)
  fresh = not existed or not os.listdir(workdir)
  try:
    yield
  except BaseException:
    if fresh and jax.process_index() == 0 and os.path.isdir(workdir):
      if not existed:
        shutil.rmtree(workdir, ignore_errors=True)
      else:
        for name in os.listdir(workdir):
          path = os.path.join(workdir, name)
          if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
          else:
            os.remove(path)
    raise


def _copy(src: str, dst: str) -> None:
  with open(src, "rb") as f:
    data = f.read()
  with open(dst + ".tmp", "wb") as f:
    f.write(data)
  os.replace(dst + ".tmp", dst)


def imported_model(workdir: str) -> ModelConfig:
  """The model config an import wrote into `workdir`."""
  path = os.path.join(workdir, IMPORT_CERT)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run `python -m moegrow.hf import --workdir={workdir}` first")
  with open(path) as f:
    return ModelConfig.from_dict(json.load(f)["model"])


# ---------------------------------------------------------------- export

def restore_for_export(source: str, base: ml_collections.ConfigDict) -> tuple[dict, ModelConfig, str]:
  """(params as host numpy, model config without ramps, step dir) of a moegrow checkpoint,
  restored on one device (`base`: any run config; its mesh and optimizer are not used: the params
  are restored at the shapes of the checkpoint's model config, the optimizer state as it was stored,
  whatever the run's `frozen` entries made of its layout)."""
  src_dir, prefix, step = checkpoint.locate(source)
  mngr = checkpoint.manager(src_dir, read_only=True, step_prefix=prefix)
  try:
    cfg = checkpoint.model_config(checkpoint.read_meta(mngr, step))
    config = run_config(cfg, base)
    config.mesh.update(data=1, fsdp=1, expert=1, tensor=1, num_devices=1)
    program = build_program(cfg, config.train, make_mesh(config))
    abstract = program.abstract_state
    try:
      stored = mngr.item_metadata(int(step))[checkpoint.STATE]
      stored = getattr(stored, "tree", stored)
    except Exception:  # noqa: BLE001 - metadata is advisory; restore reports real errors
      stored = None
    if isinstance(stored, dict) and "opt_state" in stored:
      one = abstract["step"].sharding  # replicated on the one-device mesh
      abstract = dict(abstract, opt_state=jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                                       stored["opt_state"], is_leaf=lambda m: hasattr(m, "shape")))
    state, _, _ = checkpoint.restore(mngr, step, abstract)
    where = checkpoint.step_dir(mngr, step)
  finally:
    mngr.close()
  params = state["params"]
  if cfg.ramps:  # ramped growth: fold the masks into the weights (exact for any mask value)
    params, cfg = tf.fold_ramps(cfg, params), ramp.strip(cfg)
  return jax.tree.map(np.asarray, jax.device_get(params)), cfg, where


def export_model(source: str, to: str, base: ml_collections.ConfigDict, arch: str | None = None,
                 dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
  """Write the moegrow checkpoint at `source` as an HF model directory `to` (new); returns the
  certificate (also `<to>/moegrow_export.json`)."""
  if os.path.exists(to) and os.listdir(to):
    raise FileExistsError(f"{to} already exists and is not empty; export into a new directory")
  params, cfg, where = restore_for_export(source, base)
  workdir = _workdir_of(where)
  tok_dir = os.path.join(workdir, "tokenizer") if workdir else None
  special = _special_ids(tok_dir)
  hf = archs.hf_config(cfg, arch, special)
  arch = hf["architectures"][0]
  dtype = dtype or cfg.dtype
  if dtype not in DTYPES:
    raise ValueError(f"export: dtype={dtype!r} not in {DTYPES}")
  hf["dtype"] = dtype
  np_dtype = jnp.dtype(dtype)
  tensors = (_finite(n, x.astype(np_dtype), where) for n, x in export_tensors(cfg, arch, flatten(params)))
  extra = list(files.iter_files(tok_dir, files.TOKENIZER_FILES)) if tok_dir else []
  files.write(to, hf, tensors, max_shard_bytes=max_shard_bytes, extra_files=extra)
  cert = {"source": where, "architecture": arch, "dtype": dtype, **certificate(cfg, params, to)}
  checkpoint.write_json(os.path.join(to, EXPORT_CERT), cert)
  return cert


def _finite(name: str, x, where: str):
  """(name, x) when every value of the tensor is finite: a cast that overflows (float32 to float16)
  is refused naming the tensor, and the export leaves nothing behind."""
  if not np.all(np.isfinite(np.asarray(x, np.float32))):
    raise FloatingPointError(f"export of checkpoint {where}: tensor {name} holds NaN or infinity as "
                             f"{np.dtype(x.dtype).name}; nothing was written (export at a wider dtype)")
  return name, x


def _workdir_of(step_dir: str) -> str | None:
  ckpts = os.path.dirname(step_dir)
  return os.path.dirname(ckpts) if os.path.basename(ckpts) == "checkpoints" else None


def _special_ids(tok_dir: str | None) -> dict:
  if not tok_dir or not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    return {}
  tok = tokenization.load(tok_dir)
  return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}

