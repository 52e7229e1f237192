"""Train, and optionally upcycle, a model imported from Hugging Face.

  python -m moegrow.hf import --from=<HF model dir> --workdir=runs/llama
  python -m moegrow.main --config=configs/hf.py:runs/llama --workdir=runs/llama
  python -m moegrow.main --config=configs/hf.py:runs/llama,upcycle=8 --workdir=runs/llama
  python -m moegrow.hf export --from=runs/llama --to=runs/llama-moe-hf

Arguments: `<workdir of the import>[,upcycle=E][,steps=N]`. The model is the imported one
(`<workdir>/hf_import.json`) and the data tokenizer the model's own (`<workdir>/tokenizer`, else
bytes). `upcycle=E`: a first stage of N steps on the dense model, then every other layer's MLP
upcycled to E experts, top-2 (`topk_softmax`: exact, the growth certificate shows Δloss = 0), and
N more steps. Router biases stay frozen at 0 in every stage (`moegrow.hf.convert.HF_FROZEN`: no HF
router has one, so the trained model stays exportable; the import's optimizer state has the same
layout).
Continued pre-training settings: lr 3e-5 (a pretrained model's learning rate), warm-up 20 steps,
cosine to 10%; the rest (data mixture, batch, mesh) is configs/lm.py `small`
and can be overridden with `--config.<field>=<value>`.
"""
import os

import ml_collections

from moegrow.configs import lm
from moegrow.hf import convert


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  if not parts:
    raise ValueError("configs/hf.py: give the import's workdir, e.g. --config=configs/hf.py:runs/llama")
  workdir, opts = parts[0], dict(p.split("=", 1) for p in parts[1:] if "=" in p)
  bad = [p for p in parts[1:] if "=" not in p] + sorted(set(opts) - {"upcycle", "steps"})
  if bad:
    raise ValueError(f"configs/hf.py: unknown option(s) {bad}; use upcycle=E, steps=N")
  cfg = convert.imported_model(workdir)
  c = convert.run_config(cfg, lm.get_config("small"))
  tok = os.path.join(workdir, "tokenizer")
  c.data.tokenizer = tok if os.path.exists(os.path.join(tok, "tokenizer.json")) else "bytes"
  steps = int(opts.get("steps", 200))
  c.train.update(steps=steps, lr=3e-5, warmup_steps=min(20, steps), eval_every=max(1, steps // 2),
                 checkpoint_every=max(1, steps // 2))
  if "upcycle" in opts:
    c.stages = (dict(name="dense", steps=steps),
                dict(name="upcycled", steps=steps, ops=(dict(op="upcycle", layers="every_other",
                                                             num_experts=int(opts["upcycle"]), top_k=2,
                                                             gating="topk_softmax"),)))
    c.train.steps = 2 * steps
  return c
