"""Executes the notebooks in a fresh kernel and checks what they printed."""
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

STEP_RE = re.compile(r"^step\s+(\d+)\s+loss\s+([-+0-9.eE]+|nan|inf)", re.M)
CERT_RE = re.compile(r"^(\S+)\s+([-+0-9.eE]+|nan|inf)\s+([-+0-9.eE]+|nan|inf)\s+\S+\s*$", re.M)


def _kernel_manager_class():
  """'python3' = ipykernel in THIS interpreter (sys.executable), whatever kernel specs the machine
  has installed (a user-level python3 spec may point at another Python)."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  class HereKernelManager(KernelManager):
    def __init__(self, **kw):
      kw.setdefault("kernel_spec_manager", KernelSpecManager(kernel_dirs=[]))
      super().__init__(**kw)
  return HereKernelManager


def execute(path, env, timeout=600):
  """Runs the notebook at `path` with extra environment `env`; returns the executed notebook."""
  nb = nbformat.read(path, as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     kernel_manager_class=_kernel_manager_class(),
                                     resources={"metadata": {"path": REPO}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


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


def test_notebook_01_grow_a_model(data_dir, tmp_path):
  env = {"MOEGROW_DATA_DIR": data_dir,  # XLA_FLAGS (8 simulated devices) is inherited from conftest
         "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
         "IPYTHONDIR": str(tmp_path / "ipython"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
         "MPLBACKEND": "Agg"}
  t0 = time.perf_counter()
  nb = execute(NOTEBOOK, env)
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


def test_notebook_02_continual(data_dir, tmp_path):
  env = {"MOEGROW_DATA_DIR": data_dir,
         "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
         "IPYTHONDIR": str(tmp_path / "ipython"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
         "MPLBACKEND": "Agg"}
  nb = execute(NOTEBOOK_02, env)
  check_frontier(cell_text(nb, "frontier"))
  check_frozen(cell_text(nb, "frozen"))
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
