"""Executes the notebooks in a fresh kernel and checks what they printed (slow tier); checks that the
stored notebooks are up to date with their make scripts, executed and free of machine paths (fast)."""
import importlib.util
import os
import re
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "01_grow_a_model.ipynb")
NOTEBOOK_02 = os.path.join(REPO, "notebooks", "02_continual.ipynb")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

_spec = importlib.util.spec_from_file_location("nbmake", os.path.join(REPO, "notebooks", "nbmake.py"))
nbmake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nbmake)

STEP_RE = re.compile(r"^step\s+(\d+)\s+loss\s+([-+0-9.eE]+|nan|inf)", re.M)
CERT_RE = re.compile(r"^(\S+)\s+([-+0-9.eE]+|nan|inf)\s+([-+0-9.eE]+|nan|inf)\s+\S+\s*$", re.M)


def kernel_env(data_dir, tmp_path):
  """Environment of a fresh kernel (nbmake.execute, which also builds the stored notebooks, runs them in
  a kernel started with it): XLA_FLAGS (8 simulated devices) as set by conftest, the repo on
  PYTHONPATH, scratch dirs (TMPDIR too) under tmp_path, the session's corpora."""
  return dict(nbmake.kernel_env(str(tmp_path)), MOEGROW_DATA_DIR=data_dir)


def cell_text(nb, tag):
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return "".join(o.get("text", "") for o in cells[0].get("outputs", []) if o.get("output_type") == "stream")


def check_dense_training(text):
  steps = [(int(s), float(x)) for s, x in STEP_RE.findall(text)]
  assert len(steps) >= 2, f"no 'step N  loss X' lines in the first training's output:\n{text}"
  (s0, first), (s1, last) = steps[0], steps[-1]
  assert s1 > s0
  assert last < first, f"loss did not go down in the first training: step {s0} {first} -> step {s1} {last}"


def check_certificate(text):
  rows = {d: (float(b), float(a)) for d, b, a in CERT_RE.findall(text)}
  assert set(rows) == {"shakespeare_plays", "python_stdlib"}, f"certificate rows not found:\n{text}"
  for domain, (before, after) in rows.items():
    assert abs(after - before) <= 1e-5, f"{domain}: held-out loss {before} before growth, {after} after"


@pytest.mark.slow
def test_checks_reject_bad_outputs():
  """The output checks can fail (no kernel needed)."""
  check_dense_training("step   1  loss 6.0000\nstep  40  loss 3.0000\n")
  with pytest.raises(AssertionError):
    check_dense_training("step   1  loss 6.0000\nstep  40  loss 6.5000\n")
  with pytest.raises(AssertionError):
    check_dense_training("step   1  loss 6.0000\nstep  40  loss nan\n")
  with pytest.raises(AssertionError):
    check_dense_training("")
  good = ("domain                    before       after  |change|\n"
          "shakespeare_plays      3.3340750   3.3340750   0.0e+00\n"
          "python_stdlib          3.3203280   3.3203282   2.4e-07\n")
  check_certificate(good)
  with pytest.raises(AssertionError):
    check_certificate(good.replace("3.3203282", "3.3204282"))
  with pytest.raises(AssertionError):
    check_certificate(good.replace("3.3203282", "nan"))
  with pytest.raises(AssertionError):
    check_certificate(good.splitlines()[0])


@pytest.mark.slow
def test_notebook_01_grow_a_model(data_dir, tmp_path):
  env = kernel_env(data_dir, tmp_path)
  t0 = time.perf_counter()
  nb = nbmake.execute(NOTEBOOK, env)
  print(f"notebook executed in {time.perf_counter() - t0:.1f} s with {sys.executable}")
  check_dense_training(cell_text(nb, "dense-train"))
  check_certificate(cell_text(nb, "certificate"))
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors


FRONTIER_RE = re.compile(r"^(plain|protected)\s+([-+0-9.eE]+|nan|inf)\s+([-+0-9.eE]+|nan|inf)\s+([-+0-9.eE]+|nan|inf)\s*$",
                         re.M)


def check_frontier(text):
  rows = {a: tuple(float(x) for x in v) for a, *v in FRONTIER_RE.findall(text)}
  assert set(rows) == {"plain", "protected"}, f"frontier rows not found:\n{text}"
  for arm, (python, forgetting, _) in rows.items():
    assert 0 < python < 10 and abs(forgetting) < 10, (arm, python, forgetting)
  drift = rows["protected"][2]
  assert 0 <= drift <= 1, f"routing drift {drift} is not a fraction"


def check_frozen(text):
  assert "old experts bit-identical: True" in text, text
  values = [float(v) for v in re.findall(r"\(\d+, ([-+0-9.eE]+)\)", text)]
  assert values and all(v >= 0 for v in values) and max(values) > 0, f"EWC penalty not logged > 0:\n{text}"


@pytest.mark.slow
def test_checks_of_notebook_02_reject_bad_outputs():
  good = "arm         python_loss  forgetting   drift\nplain            2.5000      0.4000     nan\nprotected        2.6000      0.1000   0.250\n"
  check_frontier(good)
  for bad in (good.replace("0.250", "1.250"), good.replace("2.5000", "nan"), good.splitlines()[0]):
    with pytest.raises(AssertionError):
      check_frontier(bad)
  frozen = "old experts bit-identical: True\nEWC penalty (step, value): (61, 0.00e+00), (80, 3.10e-03)\n"
  check_frozen(frozen)
  for bad in (frozen.replace("True", "False"), frozen.replace("3.10e-03", "0.00e+00"), frozen.replace("3.10e-03", "-1")):
    with pytest.raises(AssertionError):
      check_frozen(bad)


@pytest.mark.slow
def test_notebook_02_continual(data_dir, tmp_path):
  env = kernel_env(data_dir, tmp_path)
  nb = nbmake.execute(NOTEBOOK_02, env)
  check_frontier(cell_text(nb, "frontier"))
  check_frozen(cell_text(nb, "frozen"))
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors


NOTEBOOK_03 = os.path.join(REPO, "notebooks", "03_merge_and_mix.ipynb")
NUM = r"[-+0-9.eE]+|nan|inf"
LOSS_ROW_RE = re.compile(rf"^(\S+)\s+({NUM})\s+({NUM})\s+({NUM})\s*$", re.M)
TRACE_RE = re.compile(rf"^\s+\+\s+(\S+)\s+own\s+({NUM})\s+soup\s+({NUM})\s+(kept|dropped)\s*$", re.M)
ROUTE_RE = re.compile(rf"^(hidden|random)\s+(\S+)\s+(\d+)\s+({NUM})\s+({NUM})\s*$", re.M)
OWN_EXPERT = {"shakespeare_plays": 0, "python_stdlib": 1}  # branch e (English, Python) -> expert e


def loss_rows(text, required):
  """{model: (shakespeare_plays, python_stdlib, mean)} of a loss table; every value finite."""
  rows = {m: tuple(float(x) for x in v) for m, *v in LOSS_ROW_RE.findall(text)}
  missing = set(required) - set(rows)
  assert not missing, f"loss rows {sorted(missing)} not found:\n{text}"
  for m, (en, py, mean) in rows.items():
    assert all(0 < x < 10 for x in (en, py, mean)), f"{m}: losses {en}, {py}, {mean} not finite in (0, 10)"
    assert abs(mean - (en + py) / 2) <= 1e-3, f"{m}: mean {mean} is not the mean of {en} and {py}"
  return rows


def check_soup(text):
  rows = loss_rows(text, {"uniform-soup", "greedy-soup"})
  ingredients = {m: r for m, r in rows.items() if not m.endswith("-soup")}
  assert len(ingredients) >= 2, f"fewer than 2 ingredients:\n{text}"
  best = min(r[2] for r in ingredients.values())
  greedy = rows["greedy-soup"][2]
  assert greedy <= best, f"greedy soup's mean loss {greedy} > its best ingredient's {best}"
  trace = TRACE_RE.findall(text)
  assert sorted(t[0] for t in trace) == sorted(ingredients), f"greedy trace does not list every ingredient:\n{text}"
  assert trace[0][3] == "kept" and float(trace[0][1]) == best, f"greedy soup does not start at the best:\n{text}"
  last_kept = [float(s) for _, _, s, k in trace if k == "kept"][-1]
  assert abs(last_kept - greedy) <= 1e-4, f"greedy soup's loss {greedy} is not its trace's last kept {last_kept}"


def check_ties(text):
  rows = loss_rows(text, {"base", "english", "python", "task-arithmetic", "ties"})
  assert rows["english"][0] < rows["base"][0], "the English fine-tune is no better on English than the base"
  assert rows["python"][1] < rows["base"][1], "the Python fine-tune is no better on Python than the base"


def check_merge_run(text):
  assert "merge_run result == in-memory ties: True" in text, text


def check_btx(text):
  loss_rows(text, {"english", "python", "btx-hidden", "btx-random"})
  load = {}
  for router, domain, layer, e0, e1 in ROUTE_RE.findall(text):
    assert abs(float(e0) + float(e1) - 1) <= 2e-3, f"{router} {domain} layer {layer}: loads {e0} + {e1} != 1"
    load[router, domain, layer] = (float(e0), float(e1))
  layers = sorted({k[2] for k in load})
  want = {(r, d, i) for r in ("hidden", "random") for d in OWN_EXPERT for i in layers}
  assert layers and set(load) == want, f"routing table incomplete:\n{text}"
  own = {(r, i): [load[r, d, i][e] for d, e in OWN_EXPERT.items()] for r in ("hidden", "random") for i in layers}
  for i in layers:
    hidden, random = sum(own["hidden", i]) / 2, sum(own["random", i]) / 2
    assert hidden > 0.5 and hidden > random, (
        f"layer {i}: hidden-state routing sends {hidden:.3f} of tokens to their domain's expert, random {random:.3f}")
  assert any(min(own["hidden", i]) > 0.5 for i in layers), (
      f"in no layer does the hidden-state router send most of each domain's tokens to its own expert:\n{text}")


@pytest.mark.slow
def test_checks_of_notebook_03_reject_bad_outputs():
  head = "model             shakespeare_plays      python_stdlib               mean\n"
  soup = (head + "english    2.6459  3.4806  3.0633\npython     3.0545  3.0342  3.0444\n"
          "mix@3e-3   2.7602  3.0612  2.9107\nuniform-soup  2.7227  3.0583  2.8905\n"
          "greedy-soup   2.6748  3.1099  2.8923\n\ngreedy trace (...):\n"
          "  + mix@3e-3  own 2.9107  soup 2.9107  kept\n  + python    own 3.0444  soup 2.9181  dropped\n"
          "  + english   own 3.0633  soup 2.8923  kept\n")
  check_soup(soup)
  worse = soup.replace("2.6748  3.1099  2.8923", "2.7748  3.1099  2.9423").replace("soup 2.8923", "soup 2.9423")
  dropped = "  + python    own 3.0444  soup 2.9181  dropped\n"
  for bad in (worse, soup.replace("2.6748", "nan"), soup.replace(dropped, ""),
              soup.replace("uniform-soup", "uniform soup")):
    with pytest.raises(AssertionError):
      check_soup(bad)
  ties = (head + "base  2.8781  3.1538  3.0159\nenglish  2.6459  3.4806  3.0633\npython  3.0545  3.0342  3.0444\n"
          "task-arithmetic  2.7875  3.3270  3.0572\nties  2.7300  3.1562  2.9431\n")
  check_ties(ties)
  for bad in (ties.replace("3.3270", "inf"), ties.replace("ties  ", "tie  "),
              ties.replace("python  3.0545  3.0342  3.0444", "python  3.0545  3.2342  3.1444")):
    with pytest.raises(AssertionError):
      check_ties(bad)
  check_merge_run("merge_run result == in-memory ties: True\n")
  with pytest.raises(AssertionError):
    check_merge_run("merge_run result == in-memory ties: False\n")
  btx = (head + "english  2.6459  3.4806  3.0633\npython  3.0545  3.0342  3.0444\n"
         "btx-hidden  2.7172  3.1379  2.9275\nbtx-random  2.7719  3.1663  2.9691\n\n"
         "router   domain             layer  expert0  expert1\n"
         "hidden   python_stdlib          0    0.521    0.479\nhidden   python_stdlib          1    0.341    0.659\n"
         "hidden   shakespeare_plays      0    0.865    0.135\nhidden   shakespeare_plays      1    0.546    0.454\n"
         "random   python_stdlib          0    0.609    0.391\nrandom   python_stdlib          1    0.720    0.280\n"
         "random   shakespeare_plays      0    0.360    0.640\nrandom   shakespeare_plays      1    0.615    0.385\n")
  check_btx(btx)
  for bad in (btx.replace("0.546    0.454", "0.446    0.554"),  # no layer with both domains at home
              btx.replace("0.360    0.640", "0.960    0.040"),  # random as aligned as hidden in layer 0
              btx.replace("0.341    0.659", "0.341    0.759"),  # loads do not sum to 1
              btx.replace("random   python_stdlib          1    0.720    0.280\n", ""),
              btx.replace("btx-random  2.7719", "btx-random  nan")):
    with pytest.raises(AssertionError):
      check_btx(bad)


@pytest.mark.slow
def test_notebook_03_merge_and_mix(data_dir, tmp_path):
  env = kernel_env(data_dir, tmp_path)
  t0 = time.perf_counter()
  nb = nbmake.execute(NOTEBOOK_03, env)
  print(f"notebook executed in {time.perf_counter() - t0:.1f} s")
  check_soup(cell_text(nb, "soup"))
  check_ties(cell_text(nb, "ties"))
  check_merge_run(cell_text(nb, "merge-run"))
  check_btx(cell_text(nb, "btx"))
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors


# ---------------------------------------------------------------- the stored notebooks (fast: no kernel)


def test_stored_notebooks_are_up_to_date_executed_and_clean():
  """`python notebooks/nbmake.py --check` passes (each stored notebook's cells: type, id, source and tags,
  are its make script's), and each is stored executed: every code cell run in order, no errors, a plot
  in 02 and 03, under 1 MB, no wall-clock numbers and nothing that names the machine that ran it."""
  scripts = nbmake.make_scripts()
  assert sorted(os.path.basename(p) for p in scripts) == ["01_grow_a_model.ipynb", "02_continual.ipynb",
                                                          "03_merge_and_mix.ipynb"]
  for path, cells in scripts.items():
    nb = nbformat.read(path, as_version=4)
    stale = nbmake.stale_cells(nb, nbmake.build(cells))
    assert not stale, f"{path} is stale, run python notebooks/nbmake.py {os.path.basename(path)[:2]}: {stale}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path} is not stored executed: run python notebooks/nbmake.py {os.path.basename(path)[:2]}")
    outputs = [o for c in code for o in c.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"], path
    assert not [t for _, t in nbmake.output_texts(nb) if re.search(r"[0-9]k tok/s|ETA [0-9]", t)], path
    assert nbmake.machine_specific(nb) == [], path
    assert os.path.getsize(path) < 1_000_000, path
    if not path.endswith("01_grow_a_model.ipynb"):
      assert any("image/png" in o.get("data", {}) for o in outputs), f"{path}: no plot stored"


def test_nbmake_checks_can_fail():
  """The --check comparison ignores outputs and counts but sees every cell change; machine paths are found."""
  cells = [("md", "# title"), ("code", "print(1)", ["tag"])]
  nb = nbmake.build(cells)
  nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
  nb.cells[1].execution_count = 3
  assert nbmake.stale_cells(nb, nbmake.build(cells)) == []
  for changed in ([("md", "# title"), ("code", "print(2)", ["tag"])], [("md", "# title"), ("code", "print(1)")],
                  [("md", "# title"), ("md", "print(1)", ["tag"])], cells[:1], [*cells, ("md", "end")]):
    assert nbmake.stale_cells(nb, nbmake.build(changed)), changed
  for text, bad in (("loss 2.5\n", False), ("growing <root>/plain/checkpoints/60\n", False),
                    (f"wrote {REPO}/x\n", True), ("at /tmp/moegrow_x/1\n", True), ("from /home/someone/x\n", True),
                    (f"in {os.path.expanduser('~')}/x\n", True)):
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    assert bool(nbmake.machine_specific(nb)) == bad, text
