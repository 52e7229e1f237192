"""Ahead-of-time compiles for TPU slices with the real TPU compiler (libtpu, no TPU needed):
memory accounting, meshes on 2-D and 3-D tori, the kernels a TPU mesh picks, expert parallelism in
the compiled HLO, FLOPs against the formula, and the CLI's refusals."""
import math
import re

import jax
import numpy as np
import pytest

from moegrow import aot, flops, sharding
from moegrow.configs import lm
from moegrow.hlo import collectives, computations, multiplicity
from moegrow.model import moe
from moegrow.orchestrate import parts
from moegrow.train import steps

pytestmark = pytest.mark.slow  # slow tier: ahead-of-time TPU compiles


def devices(topology):
  return aot.topology_devices(aot.parse_topology(topology))


def tiny_config(**model):
  c = lm.get_config("tiny,moe")
  c.model.update(**{"num_experts": 4, **model})
  c.train.update(batch_size=8, eval_batch_size=8)
  c.mesh.update(data=1, fsdp=1, expert=4)
  return c


def test_topology_names_and_refusals():
  assert aot.parse_topology("v5e-64") == aot.Slice("v5e", "8x8")
  assert aot.parse_topology("v4-128") == aot.Slice("v4", "4x4x4")  # 128 TensorCores = 64 chips
  assert aot.parse_topology("v5p:4x4x4", 2).chips == 128
  assert aot.parse_topology("v5e:2x2").name == "v5e-4"
  for bad, words in [("v9:2x2", "generation"), ("v5e:2x2x2", "2-D"), ("v4-6", "power of two"),
                     ("tpu", "expected")]:
    with pytest.raises(aot.AotError, match=words):
      aot.parse_topology(bad)


@pytest.mark.parametrize("topology,shape", [("v4:4x4x1", {"fsdp": 4, "expert": 4}),
                                            ("v5p:4x4x4", {"data": -1, "fsdp": 8, "expert": 8})])
def test_meshes_on_tori_that_need_split_physical_axes(topology, shape):
  """jax.make_mesh refuses these shapes on a torus (they split physical axes); make_mesh lays
  them out, every chip once."""
  devs = devices(topology)
  if topology.startswith("v5p"):  # the shape the pod config uses: jax.make_mesh cannot lay it out
    with pytest.raises(NotImplementedError):
      jax.make_mesh(tuple(sharding.mesh_sizes(shape, len(devs))), sharding.MESH_AXES, devices=devs)
  mesh = sharding.make_mesh(shape, devs)
  assert mesh.devices.size == len(devs)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devs)
  assert sharding.platform(mesh) == "tpu"


def test_multislice_mesh_puts_data_across_slices():
  sl = aot.parse_topology("v5e:2x2", num_slices=2)
  devs = aot.topology_devices(sl)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "expert": 2}, devs)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  for i in range(2):  # each data index is one slice; fsdp and expert stay inside it
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  with pytest.raises(ValueError, match="slices"):
    sharding.make_mesh({"data": 1, "fsdp": 8}, devs)


def test_kernels_follow_the_mesh_platform():
  v5e = sharding.make_mesh({"expert": 4}, devices("v5e:2x2"))
  v4 = sharding.make_mesh({"expert": 4}, devices("v4:2x2x1"))
  cfg = parts.model_config(tiny_config())
  assert moe.default_impl() == "blocks" and moe.exchange_of(cfg) == "gather"  # this CPU host
  with sharding.use_mesh(v5e):
    assert moe.default_impl() == "ragged_dot"
    assert moe.exchange_of(cfg) == "gather"  # v5e: no ragged all-to-all at scale (limited ICI routing)
  with sharding.use_mesh(v4):
    assert moe.default_impl() == "ragged_dot"
    assert moe.exchange_of(cfg) == "ragged"


def shard_bytes(tree, tiled=False):
  """Sum over leaves of one chip's shard size; `tiled`: in TPU memory, where the last two dims of
  an array are padded to (8, 128) tiles (a vector to 128 elements, a scalar takes one word)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = list(x.sharding.shard_shape(x.shape))
    if tiled and len(shape) >= 2:
      shape[-2], shape[-1] = -(-shape[-2] // 8) * 8, -(-shape[-1] // 128) * 128
    elif tiled and len(shape) == 1:
      shape[0] = -(-shape[0] // 128) * 128
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


@pytest.fixture(scope="module")
def tiny_v5e():
  sl = aot.parse_topology("v5e:2x2")
  c = tiny_config()
  rows = aot.compile_config(c, sl, log=None)
  return c, sl, {r["program"]: r for r in rows}


def test_tiny_train_step_compiles_and_argument_bytes_are_the_shards(tiny_v5e):
  c, sl, rows = tiny_v5e
  train = rows["stage0/train_step"]
  assert train["fits"] and train["fits_with_headroom"]
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=4), devices("v5e:2x2"))
  prog = steps.build_program(parts.model_config(c), c.train, mesh)
  batch = aot._batch_abstract(prog, 8, c.data.seq_len)
  got = train["memory_gib"]["argument"] * aot.GIB
  # Every chip holds its shards of the state and the batch (TPU pads arrays to tiles): a replicated
  # state (4x the expert tables) or a missing leaf would fall outside these bounds.
  assert shard_bytes(prog.abstract_state) + shard_bytes(batch) <= got
  assert got <= shard_bytes(prog.abstract_state, tiled=True) + shard_bytes(batch, tiled=True)
  # The state is donated: output aliases it, so the chip holds it once.
  assert train["memory_gib"]["alias"] * aot.GIB >= shard_bytes(prog.abstract_state["params"])
  assert set(rows) == {"stage0/train_step", "stage0/eval_step"}


def expert_table_gathers(hlo: str, cfg) -> list[str]:
  """all-gather instructions whose result is a whole expert table [E, D, F] or [E, F, D]."""
  e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_d_ff
  whole = {f"[{e},{d},{f}]", f"[{e},{f},{d}]"}
  found = [re.search(r"=\s*(\S+)\s+all-gather(-start)?\(", l) for l in hlo.splitlines()]
  return [m.group(1) for m in found if m and any(s in m.group(1) for s in whole)]


@pytest.mark.parametrize("exchange", ["gather", "ragged"])
def test_expert_parallel_step_gathers_no_expert_table(exchange):
  """On (fsdp=2, expert=2) each chip keeps its own experts (gathered over fsdp only): no all-gather
  of a whole expert table in the compiled train step; with every expert replicated (E=3 does not
  divide the expert axis) there is."""
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices("v4:2x2x1"))
  hlo = {}
  for e in (4, 3):
    c = tiny_config(expert_exchange=exchange, num_experts=e)
    cfg = parts.model_config(c)
    prog = steps.build_program(cfg, c.train, mesh)
    text = prog.train_step.lower(prog.abstract_state, aot._batch_abstract(prog, 8, c.data.seq_len)).compile().as_text()
    hlo[e] = (expert_table_gathers(text, cfg), collectives(text))
  assert hlo[4][0] == [], hlo[4][0][:2]
  assert hlo[3][0], "the replicated layout should gather whole expert tables"
  if exchange == "ragged":
    assert hlo[4][1]["ragged-all-to-all"]["count"] >= 2


def test_dense_compiled_flops_match_the_formula():
  c = lm.get_config("tiny")
  c.model.update(d_model=256, num_layers=2, num_heads=4, d_ff=1024, attention="reference", remat="none")
  c.data.seq_len = 256
  c.train.update(batch_size=8, eval_batch_size=8)
  c.mesh.update(data=4)
  sl = aot.parse_topology("v5e:2x2")
  rows = {r["program"]: r for r in aot.compile_config(c, sl, log=None)}
  train = rows["stage0/train_step"]
  want = flops.train_flops_per_token(parts.model_config(c), 256) * 8 * 256 / 4
  assert train["formula_flops_per_chip"] == pytest.approx(want)
  assert abs(train["flops_per_chip"] / want - 1) <= 0.10, (train["flops_per_chip"], want)


def test_cli_refuses_a_mesh_the_slice_cannot_hold(capsys):
  c = tiny_config()
  c.mesh.update(expert=8)  # 8 experts' axis on a 4-chip slice
  with pytest.raises(ValueError, match="mesh"):
    aot.compile_config(c, aot.parse_topology("v5e:2x2"), log=None)


def test_collectives_parser_counts_and_sizes():
  hlo = """
  %all-gather.1 = bf16[64,256]{1,0:T(8,128)(2,1)} all-gather(%p), channel_id=1
  %ags = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%q), channel_id=2
  %rs = f32[8]{0} reduce-scatter(%r), channel_id=3
  %ar = (f32[8]{0}, bf16[4]{0}) all-reduce(%a, %b), channel_id=4
  %x = f32[8]{0} add(%a, %b)
  """
  got = collectives(hlo)
  assert got["all-gather"] == {"count": 2, "bytes": 64 * 256 * 2 + 16 * 8 * 4}
  assert got["reduce-scatter"] == {"count": 1, "bytes": 32}
  assert got["all-reduce"] == {"count": 1, "bytes": 32 + 8}
  assert got["all-to-all"]["count"] == 0


def test_collectives_in_a_loop_count_once_per_trip():
  """A while loop's body runs its trip count (the constant its condition compares with): its
  collectives, and those of computations it calls, are counted that many times."""
  hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

%inner (p: f32[8]) -> f32[8] {
  %ar = f32[8]{0} all-reduce(%p), to_apply=%add
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[16]{0} all-gather(%x), dimensions={0}
  %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%inner
}

%cond (t: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %rs = f32[4]{0} reduce-scatter(%x), dimensions={0}
}
"""
  got = collectives(hlo)
  assert got["all-gather"] == {"count": 3, "bytes": 3 * 64}
  assert got["all-reduce"] == {"count": 3, "bytes": 3 * 32}
  assert got["reduce-scatter"] == {"count": 1, "bytes": 16}


def test_scanned_step_counts_the_body_per_repetition():
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices("v5e:2x2"))
  c = tiny_config(num_layers=4, scan_layers=True)
  prog = steps.build_program(parts.model_config(c), c.train, mesh)
  text = prog.train_step.lower(prog.abstract_state, aot._batch_abstract(prog, 8, c.data.seq_len)).compile().as_text()
  mult = multiplicity(computations(text))
  assert 2 in mult.values()  # the loop over 2 repetitions of (dense, MoE)
  once = sum(1 for l in text.splitlines() if re.search(r"=\s*\S+\s+all-gather\(", l))
  assert collectives(text)["all-gather"]["count"] > once


def test_cli_prints_the_table_writes_json_and_refuses_an_unknown_topology(tmp_path):
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "aot.json"
  cmd = [sys.executable, "-m", "moegrow.aot", "--config=configs/grow.py:tiny", "--topology=v5e-4",
         "--config.mesh.data=4", f"--json={out}"]
  p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  report = json.loads(out.read_text())
  programs = [r["program"] for r in report["programs"]]
  # Both stages' steps and the boundary's growth (dense -> upcycled MoE), each fitting.
  assert programs == ["stage0/train_step", "stage0/eval_step", "stage1/growth", "stage1/train_step",
                      "stage1/eval_step"]
  assert all(r["fits"] for r in report["programs"])
  assert "| stage1/growth | v5e-4 | yes |" in p.stdout
  bad = subprocess.run(cmd[:4] + ["--topology=v9:2x2"], cwd=repo, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert "moegrow: error: topology 'v9:2x2'" in bad.stderr


@pytest.mark.parametrize("op, distill", [
    (dict(op="prune_experts", num_experts=2, saliency="reap"), dict(weight=1.0)),
    (dict(op="merge_experts", num_experts=2, grouping="output", align=True), None),
])
def test_shrink_boundaries_compile_and_a_distilling_stage_counts_its_teacher(op, distill):
  c = lm.get_config("tiny,moe")
  c.model.update(num_experts=4, moe_layers="every_other")
  c.train.update(batch_size=8, eval_batch_size=8, steps=4)
  c.mesh.update(data=4, fsdp=1, expert=1)
  extra = {"distill": distill} if distill else {}
  c.stages = (dict(name="e4", steps=2), dict(name="e2", steps=2, ops=(op,), **extra))
  rows = aot.compile_config(c, aot.parse_topology("v5e-4"), log=None)
  assert [r["program"] for r in rows] == ["stage0/train_step", "stage0/eval_step", "stage1/growth",
                                           "stage1/train_step", "stage1/eval_step"]
  assert all(r["fits"] for r in rows), [r.get("error") for r in rows]
  # the formula's FLOPs per chip: the student's training step, plus (distilling) one forward pass
  # of the teacher, the model before the cut: a hand count
  st = parts.resolve_stages(c, parts.model_config(c))
  tokens, seq = 8 * c.data.seq_len, c.data.seq_len
  teacher = flops.forward_flops_per_token(st[0].cfg, seq) * tokens / 4 if distill else 0.0
  train = {r["program"]: r["formula_flops_per_chip"] for r in rows if r["program"].endswith("train_step")}
  assert train["stage0/train_step"] == pytest.approx(flops.train_flops_per_token(st[0].cfg, seq) * tokens / 4)
  assert train["stage1/train_step"] == pytest.approx(flops.train_flops_per_token(st[1].cfg, seq) * tokens / 4
                                                      + teacher)
