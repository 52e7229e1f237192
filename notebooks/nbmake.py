"""Builds the notebooks from their `make_NN.py` scripts and stores them EXECUTED, outputs and plots included.

  python notebooks/nbmake.py              # every notebook: build from make_NN.py, execute in a fresh kernel,
                                          # store it with its outputs (a few minutes each on 2 CPU cores)
  python notebooks/nbmake.py 02           # only notebooks/02_*.ipynb (`python notebooks/make_02.py` is the same)
  python notebooks/nbmake.py --check      # exit 1 if a stored notebook's cells differ from its make script
  python notebooks/nbmake.py --no-execute # cells only, no outputs (drafting; the tests want them executed)

A make script holds CELLS, a list of ("md" | "code", source[, tags]); edit the cells there, never in the
.ipynb. `--check` compares what the make script decides (each cell's type, id, source and tags) and ignores
outputs and execution counts, so it stays meaningful for executed notebooks.

Execution uses the tests' environment (tests/test_notebooks.py runs the notebooks with `execute` and `kernel_env`):
JAX on the CPU with 8 simulated devices and LLVM at -O0 (tests/conftest.py), the Agg backend, the
repository root as working directory and on PYTHONPATH, ipykernel of this interpreter, and a fresh
temporary TMPDIR, IPython and runtime dir that are removed afterwards; the corpora are built beforehand
(MOEGROW_DATA_DIR) so that no dataset-building log is stored. Notebooks are executed one at a time.

Stored outputs are made reproducible (two runs on one machine gave byte-identical files): each cell's prints are one
output per stream, the kernel's timing metadata and Python version are not stored, paths in the kernel's
TMPDIR read `<root>/...` (the notebooks' `root = tempfile.mkdtemp(...)`) and the data dir `<data_dir>`,
and the training log's wall-clock throughput and ETA are elided (`…k tok/s | ETA …`). Then the outputs
are checked: no errors and nothing machine-specific (the repository's location, the temporary or home
dir, the user or host name, absolute paths under /tmp, /home, /Users, ...); the command fails instead of
storing such an output.
"""
import getpass
import glob
import importlib.util
import os
import re
import shutil
import socket
import sys
import tempfile

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METADATA = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}}


def build(cells) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata = nbformat.from_dict(METADATA)
  for i, cell in enumerate(cells):
    kind, src, tags = cell[0], cell[1], (cell[2] if len(cell) > 2 else [])
    c = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
    c.id = f"cell-{i:02d}"
    if tags:
      c.metadata["tags"] = list(tags)
    nb.cells.append(c)
  nbformat.validate(nb)
  return nb


def cell_sources(nb):
  """What a make script decides, per cell: (type, id, source, tags); outputs and counts left out."""
  return [(c.cell_type, c.get("id"), c.source, list(c.get("metadata", {}).get("tags", []))) for c in nb.cells]


def stale_cells(stored, built):
  """Descriptions of the differences between two notebooks' cells (empty when the same)."""
  a, b = cell_sources(stored), cell_sources(built)
  fields = ("type", "id", "source", "tags")
  diffs = [f"cell {i} ({y[1]}): {', '.join(f for f, u, v in zip(fields, x, y) if u != v)} differ(s)"
           for i, (x, y) in enumerate(zip(a, b)) if x != y]
  if len(a) != len(b):
    diffs.append(f"{len(a)} cells stored, {len(b)} in the make script")
  return diffs


# ---------------------------------------------------------------- executing


def kernel_env(tmp):
  """Environment for a fresh kernel: the tests' (tests/conftest.py), with every scratch dir under `tmp`."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
  if "--xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
  work = os.path.join(tmp, "tmp")
  os.makedirs(work, exist_ok=True)
  return {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "XLA_FLAGS": flags.strip(),
          "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
          "IPYTHONDIR": os.path.join(tmp, "ipython"), "JUPYTER_RUNTIME_DIR": os.path.join(tmp, "runtime"),
          "MPLBACKEND": "Agg", "TMPDIR": work}


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


def execute(nb, env, timeout=600):
  """Runs notebook `nb` (a path or a NotebookNode, outputs replaced) in a fresh kernel with extra
  environment `env`, working directory the repository root; returns the executed notebook."""
  import nbclient
  if isinstance(nb, str):
    nb = nbformat.read(nb, as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
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


def output_texts(nb):
  """(cell index, text) of every textual output: streams, text/plain and the like, tracebacks."""
  for i, c in enumerate(nb.cells):
    for o in c.get("outputs", []):
      if o.get("output_type") == "stream":
        yield i, o.get("text", "")
      elif o.get("output_type") == "error":
        yield i, "\n".join([o.get("ename", ""), o.get("evalue", ""), *o.get("traceback", [])])
      for mime, v in o.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
          yield i, v if isinstance(v, str) else str(v)


def machine_specific(nb, extra=()):
  """Lines of `nb`'s outputs that name this machine: its paths, user or host."""
  home, user, host = os.path.expanduser("~"), getpass.getuser(), socket.gethostname()
  literal = [p for p in (REPO, os.path.realpath(REPO), tempfile.gettempdir(), home, sys.prefix, *extra)
             if p and p != os.sep]
  patterns = [re.compile(r"(?<![\w.])/(tmp|var|private|home|Users|root|work|mnt|opt)/"), re.compile(r"[A-Za-z]:\\"),
              re.compile(rf"[/\\@]{re.escape(user)}\b"), re.compile(rf"\b{re.escape(host)}\.|@{re.escape(host)}\b")]
  bad = []
  for i, text in output_texts(nb):
    for line in text.splitlines():
      if any(p in line for p in literal) or any(p.search(line) for p in patterns):
        bad.append(f"cell {i}: {line.strip()[:200]}")
  return bad


def build_data(data_dir):
  """Builds the local corpora in `data_dir` (as the tests' `data_dir` fixture does), so the notebooks'
  outputs hold no dataset-building logs; returns `data_dir`."""
  import subprocess
  code = "import sys; from moegrow import data; [data.build(n, sys.argv[1]) for n in data.LOCAL_DATASETS]"
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  done = subprocess.run([sys.executable, "-c", code, data_dir], env=env, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"building the corpora failed:\n{done.stderr[-3000:]}")
  return data_dir


# The training log's throughput and ETA (moegrow.train.logbook) differ every run: elided, width kept.
WALL_CLOCK = [(r"(?<=\| )( *[0-9.]+)k tok/s \| ETA \S+", lambda m: f"{'…':>{len(m[1])}}k tok/s | ETA …")]


def coalesce_streams(nb):
  """One output per run of stdout (stderr) prints: how they were split into messages depends on timing."""
  for c in nb.cells:
    merged = []
    for o in c.get("outputs", []):
      if merged and o.output_type == "stream" == merged[-1].output_type and o.name == merged[-1].name:
        merged[-1].text += o.text
      else:
        merged.append(o)
    if c.cell_type == "code":
      c.outputs = merged
  return nb


def scrub(nb, substitutions):
  """Rewrites every textual output of `nb` in place with the (regex, replacement) `substitutions`."""
  def sub(text):
    for pattern, repl in substitutions:
      text = re.sub(pattern, repl, text)
    return text
  for c in nb.cells:
    for o in c.get("outputs", []):
      if o.get("output_type") == "stream":
        o.text = sub(o.text)
      for mime, v in o.get("data", {}).items():
        if mime.startswith("text/") and isinstance(v, str):
          o.data[mime] = sub(v)


def run(path, cells, timeout=600):
  """Builds the notebook at `path` from `cells`, executes it and returns it; raises when an output
  is an error or names this machine."""
  tmp = tempfile.mkdtemp(prefix="nbmake_")
  try:
    env = dict(kernel_env(tmp), MOEGROW_DATA_DIR=build_data(os.path.join(tmp, "data")))
    nb = coalesce_streams(execute(build(cells), env, timeout))
    work = {env["TMPDIR"], os.path.realpath(env["TMPDIR"])}
    data = {env["MOEGROW_DATA_DIR"], os.path.realpath(env["MOEGROW_DATA_DIR"])}
    scrub(nb, [(re.escape(d) + r"(?![\w.-])", "<data_dir>") for d in data] +
              [(re.escape(w) + r"[/\\][^/\\\s'\"]+", "<root>") for w in work] + WALL_CLOCK)
    errors = [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb.cells)
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    bad = machine_specific(nb, extra=(tmp, os.path.realpath(tmp)))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  if errors or bad:
    raise RuntimeError(f"{os.path.basename(path)} not written:\n  " + "\n  ".join(errors + bad))
  nb.metadata = nbformat.from_dict(METADATA)  # not the kernel's language_info (its Python version)
  nbformat.validate(nb)
  return nb


# ---------------------------------------------------------------- command line


def make_scripts(names=()):
  """{notebook path: CELLS} for notebooks/make_NN.py, all or those whose NN is in `names`."""
  out = {}
  for script in sorted(glob.glob(os.path.join(HERE, "make_[0-9][0-9].py"))):
    nn = os.path.basename(script)[5:7]
    if names and nn not in names:
      continue
    spec = importlib.util.spec_from_file_location(f"make_{nn}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, HERE)
    try:
      spec.loader.exec_module(module)
    finally:
      sys.path.remove(HERE)
    out[module.PATH] = module.CELLS
  missing = set(names) - {os.path.basename(p)[:2] for p in out}
  if missing:
    raise SystemExit(f"no notebooks/make_NN.py for {sorted(missing)}")
  return out


def main(argv) -> int:
  names = [a for a in argv if not a.startswith("-")]
  unknown = [a for a in argv if a.startswith("-") and a not in ("--check", "--no-execute")]
  if unknown:
    raise SystemExit(f"unknown options {unknown}\n{__doc__}")
  status = 0
  for path, cells in make_scripts(names).items():
    rel = os.path.relpath(path, REPO)
    if "--check" in argv:
      diffs = stale_cells(nbformat.read(path, as_version=4), build(cells)) if os.path.exists(path) else ["missing"]
      print(f"{rel}: {'up to date' if not diffs else 'STALE: run python notebooks/nbmake.py ' + rel[10:12]}")
      for d in diffs:
        print(f"  {d}")
      status |= bool(diffs)
      continue
    if "--no-execute" in argv:
      nb = build(cells)
    else:
      print(f"executing {rel} ...", flush=True)
      nb = run(path, cells)
    with open(path, "w") as f:
      f.write(nbformat.writes(nb) + "\n")
    n = sum(bool(c.get("outputs")) for c in nb.cells)
    print(f"wrote {rel} ({os.path.getsize(path) / 1e3:.0f} kB, {n} cells with outputs)")
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
