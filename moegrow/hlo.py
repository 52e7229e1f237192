"""Reading compiled HLO text: the collectives one execution of a program runs.

XLA's text lists each computation once; a while loop's body (e.g. scanned layers) runs its trip
count, which the text gives only as the constant its condition compares the counter with. So the
collectives are counted per computation and weighted by how many times that computation runs.
"""
from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of HLO text ('ENTRY' for the entry)."""
  comps, name = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name = "ENTRY" if head.group(1) else head.group(2)
      comps[name] = []
    elif name is not None and line.startswith(" "):
      comps[name].append(line)
  return comps


def multiplicity(comps: dict[str, list[str]]) -> dict[str, int]:
  """How many times each computation runs per program execution: a while loop's body runs its
  trip count (the constant its condition compares the counter with), anything else once per call."""
  calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
  for c, lines in comps.items():
    for line in lines:
      body = re.search(r"\bbody=%([\w.\-]+)", line)
      cond = re.search(r"\bcondition=%([\w.\-]+)", line)
      trips = 1
      if body and cond and cond.group(1) in comps:
        consts = [int(v) for l in comps[cond.group(1)] for v in re.findall(r"s32\[\][^=]*?constant\((\d+)\)", l)]
        trips = consts[0] if len(consts) == 1 else 1
      for attr, callee in re.findall(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)", line):
        calls[c].append((callee, trips if attr == "body" else 1))
      for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
        calls[c] += [(callee, 1) for callee in re.findall(r"%([\w.\-]+)", group)]
  mult = {c: 0 for c in comps}

  def visit(c, m, depth=0):
    if c not in mult or depth > 64:
      return
    mult[c] += m
    for callee, k in calls.get(c, ()):
      visit(callee, m * k, depth + 1)
  visit("ENTRY", 1)
  return mult


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {'count', 'bytes'}} of the collectives one execution of compiled HLO runs, loops
  unrolled (a scanned layer's collectives count once per repetition); bytes are the results'
  sizes on one chip (for an async '-start' op, its largest buffer)."""
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  pat = re.compile(r"=\s*(\(.*?\)|\w+\[[\d,]*\]\S*)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  comps = computations(hlo_text)
  mult = multiplicity(comps) if "ENTRY" in comps else {}
  for c, lines in (comps.items() if comps else [("", hlo_text.splitlines())]):
    times = mult.get(c, 1) if mult else 1
    for line in lines:
      m = pat.search(line)
      if not m or not times:
        continue
      sizes = [_BYTES.get(dt, 4) * math.prod(int(n) for n in dims.split(",") if n)
               for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))]
      op = m.group(2)
      out[op]["count"] += times
      out[op]["bytes"] += times * ((max(sizes) if m.group(3) else sum(sizes)) if sizes else 0)
  return out
