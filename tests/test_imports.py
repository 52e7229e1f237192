"""The package's import structure, read statically with `ast`: no cycles, no arrow against the
layering (docs in moegrow/__init__.py), nothing imports the CLIs, no function-level imports of
moegrow modules. The checker is itself tested on synthetic input so a pass means something."""
from __future__ import annotations

import ast
import glob
import json
import os
import pathlib
import re
from collections import defaultdict

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Package directories of the shipped package (setup.py: configs/ ships as moegrow.configs).
ROOTS = {"moegrow": os.path.join(REPO, "moegrow"), "moegrow.configs": os.path.join(REPO, "configs")}

CLIS = ("moegrow.main", "moegrow.grow", "moegrow.merge", "moegrow.btx", "moegrow.hf.__main__")
NEVER = [  # (importer, imported): no module within the first may import one within the second
    *[("moegrow.surgery", t) for t in ("moegrow.model", "moegrow.sharding", "moegrow.checkpoint", "moegrow.train",
                                        "moegrow.orchestrate")],
    *[("moegrow.model", t) for t in ("moegrow.train", "moegrow.orchestrate", "moegrow.data", "moegrow.checkpoint")],
    ("moegrow.data", "moegrow.model"),
    ("moegrow.train", "moegrow.orchestrate"),  # the training machinery never reaches up to the orchestrators
    *[("moegrow.params", t) for t in ("moegrow.model", "moegrow.surgery", "moegrow.train", "moegrow.orchestrate",
                                       "moegrow.data", "moegrow.checkpoint", "moegrow.sharding")],
    ("moegrow.orchestrate.parts", "moegrow.orchestrate.boundary"),
    *[(a, "moegrow.orchestrate.stages") for a in ("moegrow.orchestrate.parts", "moegrow.orchestrate.boundary")],
]


# ---------------------------------------------------------------- the checker

def within(name: str, pkg: str) -> bool:
  return name == pkg or name.startswith(pkg + ".")


def module_files(roots=ROOTS) -> dict[str, tuple[str, bool]]:
  """{module name: (file, is_package)} for every .py file under the package roots."""
  out = {}
  for pkg, root in roots.items():
    for d, dirs, files in os.walk(root):
      dirs[:] = sorted(x for x in dirs if x != "__pycache__")
      rel = os.path.relpath(d, root)
      base = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
      for f in sorted(files):
        if f.endswith(".py"):
          is_pkg = f == "__init__.py"
          name = base if is_pkg else f"{base}.{f[:-3]}"
          if not (pkg == "moegrow" and within(name, "moegrow.configs")):
            out[name] = (os.path.join(d, f), is_pkg)
  return out


def imports_of(source: str, module: str, is_pkg: bool, known: set[str]) -> list[tuple[str, int, bool]]:
  """[(imported moegrow module, line, inside a function)] of one module's source.

  `from X import a` imports X.a when that is a module (a package's submodule), else X; relative
  imports are resolved against `module`.
  """
  tree = ast.parse(source)
  package = module if is_pkg else module.rpartition(".")[0]
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      lazy = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((a.name, child.lineno, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        if child.level:
          parts = package.split(".")
          if child.level - 1 >= len(parts):
            raise ValueError(f"{module}:{child.lineno}: relative import beyond the top-level package")
          base = ".".join(parts[:len(parts) - (child.level - 1)])
          base = f"{base}.{child.module}" if child.module else base
        else:
          base = child.module
        for a in child.names:
          sub = f"{base}.{a.name}"
          found.append((sub if sub in known else base, child.lineno, in_function))
      visit(child, lazy)

  visit(tree, False)
  return [(m, line, lazy) for m, line, lazy in found if within(m, "moegrow")]


def build_graph(roots=ROOTS):
  """(edges {module: {imported}}, lazy [(module, line, imported)])."""
  files = module_files(roots)
  known = set(files)
  edges, lazy = defaultdict(set), []
  for name, (path, is_pkg) in files.items():
    edges[name]
    with open(path, encoding="utf-8") as f:
      for target, line, is_lazy in imports_of(f.read(), name, is_pkg, known):
        if target != name:
          edges[name].add(target)
        if is_lazy:
          lazy.append((name, line, target))
  return dict(edges), lazy


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """One cycle [a, b, ..., a] per strongly connected component that has one (Tarjan)."""
  index, low, on_stack, stack, sccs = {}, {}, set(), [], []
  counter = [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      sccs.append(set(comp))

  for v in sorted(edges):
    if v not in index:
      strong(v)
  cycles = []
  for comp in sccs:
    start = min(comp)
    if len(comp) > 1 or start in edges.get(start, ()):
      cycles.append(_shortest_cycle(start, comp, edges))
  return sorted(cycles)


def _shortest_cycle(start, comp, edges) -> list[str]:
  """[start, ..., start] inside one strongly connected component (breadth first)."""
  prev, frontier, seen = {}, [start], {start}
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(edges.get(v, ())):
        if w == start:
          path = [v]
          while path[-1] != start:
            path.append(prev[path[-1]])
          return path[::-1] + [start]
        if w in comp and w not in seen:
          seen.add(w)
          prev[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"no cycle through {start}")


def forbidden_arrows(edges: dict[str, set[str]], never=NEVER, clis=CLIS) -> list[str]:
  bad = []
  for src in sorted(edges):
    for dst in sorted(edges[src]):
      for a, b in never:
        if within(src, a) and within(dst, b):
          bad.append(f"{src} -> {dst} (no {a} -> {b})")
      if dst in clis and src != dst:
        bad.append(f"{src} -> {dst} (nothing imports the CLIs)")
  return bad


# ---------------------------------------------------------------- the package

@pytest.fixture(scope="module")
def graph():
  return build_graph()


def test_graph_covers_the_package(graph):
  edges, _ = graph
  expected = {"moegrow", "moegrow.model", "moegrow.surgery", "moegrow.data", "moegrow.train", "moegrow.configs",
              "moegrow.main", "moegrow.grow", "moegrow.model.transformer", "moegrow.surgery.rules",
              "moegrow.orchestrate.stages", "moegrow.configs.lm", "moegrow.configs.grow"}
  assert expected <= set(edges)
  n_files = sum(f.endswith(".py") for root in ROOTS.values() for _, _, fs in os.walk(root) for f in fs)
  assert len(edges) == n_files
  # A few arrows that exist, so an empty graph cannot pass.
  assert {"moegrow.surgery.apply", "moegrow.checkpoint", "moegrow.data", "moegrow.model.transformer"} <= \
      edges["moegrow.orchestrate.boundary"]
  assert {"moegrow.orchestrate.parts", "moegrow.orchestrate.boundary", "moegrow.train.loop"} <= edges["moegrow.orchestrate.stages"]
  assert "moegrow.configs.lm" in edges["moegrow.configs.grow"]
  assert "moegrow.orchestrate.stages" in edges["moegrow.main"]


def test_no_import_cycles(graph):
  edges, _ = graph
  cycles = find_cycles(edges)
  assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_no_forbidden_arrows(graph):
  edges, _ = graph
  bad = forbidden_arrows(edges)
  assert not bad, "imports against the layering:\n  " + "\n  ".join(bad)


def test_no_function_level_imports_of_moegrow_modules(graph):
  _, lazy = graph
  assert not lazy, "function-level imports of moegrow modules:\n  " + "\n  ".join(
      f"{m}:{line} imports {t}" for m, line, t in lazy)


def top_level_names(path: str) -> set[str]:
  """Names a module binds at its top level (definitions, assignments, imports)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
      for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
  return names


def repo_sources():
  """(label, source) of every Python file and notebook code cell of the repository outside the package."""
  for folder in ("benchmarks", "experiments", "notebooks", "tests"):
    for path in sorted(glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True)):
      with open(path, encoding="utf-8") as f:
        yield os.path.relpath(path, REPO), f.read()
    for path in sorted(glob.glob(os.path.join(REPO, folder, "**", "*.ipynb"), recursive=True)):
      with open(path, encoding="utf-8") as f:
        nb = json.load(f)
      for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
          text = "".join(cell["source"])
          code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith(("%", "!")))
          yield f"{os.path.relpath(path, REPO)} cell {i}", code


def test_every_moegrow_import_names_an_existing_module_and_name():
  """After the move to subpackages: no import anywhere in the repository names a module or a
  name that no longer exists (e.g. the old flat `moegrow.layers`)."""
  files = module_files()
  known = set(files)
  sources = [(f"{name} ({os.path.relpath(path, REPO)})", pathlib.Path(path).read_text(encoding="utf-8"), name, is_pkg)
             for name, (path, is_pkg) in files.items()]
  sources += [(label, text, "__main__", False) for label, text in repo_sources()]
  assert len(sources) > len(files) + 10
  bad, checked = [], 0
  for label, text, module, is_pkg in sources:
    tree = ast.parse(text)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if within(a.name, "moegrow"):
            checked += 1
            if a.name not in known:
              bad.append(f"{label}:{node.lineno}: import {a.name} (no such module)")
      elif isinstance(node, ast.ImportFrom) and not node.level and node.module and within(node.module, "moegrow"):
        checked += 1
        if node.module not in known:
          bad.append(f"{label}:{node.lineno}: from {node.module} import ... (no such module)")
          continue
        defined = top_level_names(files[node.module][0])
        for a in node.names:
          if a.name != "*" and f"{node.module}.{a.name}" not in known and a.name not in defined:
            bad.append(f"{label}:{node.lineno}: from {node.module} import {a.name} (not defined there)")
  assert checked > 100
  assert not bad, "imports of things that do not exist:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------- the checker can fail

KNOWN = {"moegrow", "moegrow.config", "moegrow.checkpoint", "moegrow.params.trees", "moegrow.data",
         "moegrow.data.corpora", "moegrow.model", "moegrow.model.transformer", "moegrow.surgery", "moegrow.surgery.rules",
         "moegrow.surgery.op", "moegrow.surgery.apply", "moegrow.train", "moegrow.orchestrate.stages"}

SOURCE = '''
import os
import numpy as np
import moegrow.model.transformer as tf
from moegrow import data
from moegrow.config import ModelConfig
from moegrow.data.corpora import build
from moegrow.params import trees
from . import rules
from .op import Plan
from .. import checkpoint
from ..orchestrate import stages

def later():
  from moegrow.orchestrate import stages
  import moegrow
'''


def test_parser_resolves_every_import_form():
  got = imports_of(SOURCE, "moegrow.surgery.apply", False, KNOWN)
  assert [(m, lazy) for m, _, lazy in got] == [
      ("moegrow.model.transformer", False), ("moegrow.data", False), ("moegrow.config", False),
      ("moegrow.data.corpora", False), ("moegrow.params.trees", False), ("moegrow.surgery.rules", False),
      ("moegrow.surgery.op", False), ("moegrow.checkpoint", False), ("moegrow.orchestrate.stages", False),
      ("moegrow.orchestrate.stages", True), ("moegrow", True)]
  assert [line for _, line, _ in got][-2:] == [15, 16]
  # In a package's __init__, '.' is the package itself.
  got = imports_of("from . import rules\nfrom .. import checkpoint\n", "moegrow.surgery", True, KNOWN)
  assert [m for m, _, _ in got] == ["moegrow.surgery.rules", "moegrow.checkpoint"]


def test_checker_reports_cycles_and_forbidden_arrows():
  edges = {
      "moegrow.a": {"moegrow.b"}, "moegrow.b": {"moegrow.c"}, "moegrow.c": {"moegrow.a", "moegrow.config"},
      "moegrow.self": {"moegrow.self"}, "moegrow.config": set(),
      "moegrow.surgery.op": {"moegrow.model.transformer", "moegrow.config"},
      "moegrow.model.moe": {"moegrow.data"}, "moegrow.data.pipeline": {"moegrow.model"},
      "moegrow.train.loop": {"moegrow.orchestrate.stages", "moegrow.main"}, "moegrow.train.steps": {"moegrow.grow"},
      "moegrow.model.transformer": set(), "moegrow.orchestrate.stages": set(), "moegrow.main": set(), "moegrow.grow": set(),
      "moegrow.data": set(), "moegrow.model": set(),
  }
  assert find_cycles(edges) == [["moegrow.a", "moegrow.b", "moegrow.c", "moegrow.a"], ["moegrow.self", "moegrow.self"]]
  assert forbidden_arrows(edges) == [
      "moegrow.data.pipeline -> moegrow.model (no moegrow.data -> moegrow.model)",
      "moegrow.model.moe -> moegrow.data (no moegrow.model -> moegrow.data)",
      "moegrow.surgery.op -> moegrow.model.transformer (no moegrow.surgery -> moegrow.model)",
      "moegrow.train.loop -> moegrow.main (nothing imports the CLIs)",
      "moegrow.train.loop -> moegrow.orchestrate.stages (no moegrow.train -> moegrow.orchestrate)",
      "moegrow.train.steps -> moegrow.grow (nothing imports the CLIs)",
  ]
  # A prefix is a package boundary, not a string prefix: moegrow.models is not moegrow.model.
  assert forbidden_arrows({"moegrow.surgery": {"moegrow.models"}}) == []
  assert find_cycles({"moegrow.a": {"moegrow.b"}, "moegrow.b": set()}) == []


def test_checker_on_a_synthetic_package(tmp_path):
  root = tmp_path / "pkg"
  (root / "surgery").mkdir(parents=True)
  (root / "model").mkdir()
  (root / "__init__.py").write_text("")
  (root / "surgery" / "__init__.py").write_text("from moegrow.surgery import ops\n")
  (root / "surgery" / "ops.py").write_text("from ..model import net\n")
  (root / "model" / "__init__.py").write_text("")
  (root / "model" / "net.py").write_text("def f():\n  from moegrow.surgery import ops\n")
  edges, lazy = build_graph({"moegrow": str(root)})
  assert edges["moegrow.surgery.ops"] == {"moegrow.model.net"}
  assert find_cycles(edges) == [["moegrow.model.net", "moegrow.surgery.ops", "moegrow.model.net"]]
  assert forbidden_arrows(edges) == ["moegrow.surgery.ops -> moegrow.model.net (no moegrow.surgery -> moegrow.model)"]
  assert lazy == [("moegrow.model.net", 2, "moegrow.surgery.ops")]


def documented_edges(path=os.path.join(REPO, "docs", "architecture.md")) -> dict[str, set[str]]:
  """The import-edge table of docs/architecture.md as {module: {imported}} (full dotted names)."""
  text = open(path, encoding="utf-8").read()
  start = text.index("| module | imports from moegrow |")
  table = text[start:text.index("\n\n", start)].splitlines()[2:]
  full = lambda name: "moegrow." + name
  out = {}
  for row in table:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    mod = full(cells[0].strip("`"))
    out[mod] = set() if cells[1] == "nothing from moegrow" else {full(t.strip().strip("`")) for t in cells[1].split(",")}
  return out


def test_the_architecture_table_is_the_code(graph):
  """docs/architecture.md's table of import edges says exactly what the code imports, module by
  module: a new module, a new import or a removed one fails here until the table says so."""
  edges, _ = graph
  code = {m: set(ts) for m, ts in edges.items() if m != "moegrow" and not m.startswith("moegrow.configs")}
  doc = documented_edges()
  assert sorted(set(code) - set(doc)) == [], "modules missing from the table"
  assert sorted(set(doc) - set(code)) == [], "the table lists modules that do not exist"
  wrong = {m: {"code": sorted(code[m]), "table": sorted(doc[m])} for m in code if code[m] != doc[m]}
  assert not wrong, wrong


@pytest.mark.parametrize("package", ["moegrow", "moegrow.model", "moegrow.surgery", "moegrow.train",
                                     "moegrow.orchestrate", "moegrow.params", "moegrow.data", "moegrow.hf"])
def test_package_docstrings_list_their_modules(package):
  """Every module (and subpackage) of a package is named in backticks in its docstring, or listed
  by name at the start of a line (moegrow.hf)."""
  import ast
  folder = os.path.join(REPO, *package.split("."))
  with open(os.path.join(folder, "__init__.py"), encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  names = [f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"]
  names += [d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "__init__.py"))]
  missing = [n for n in sorted(names) if f"`{n}`" not in doc and not re.search(rf"^\s*{re.escape(n)}\s", doc, re.M)]
  assert not missing, f"{package}'s docstring does not name {missing}"
