"""Executes notebooks/01_grow_a_model.ipynb in a fresh kernel and checks what it printed."""
import os
import re
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "01_grow_a_model.ipynb")

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
