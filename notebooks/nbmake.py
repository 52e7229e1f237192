"""Builds a notebook from a list of cells (`make_NN.py` scripts): ("md" | "code", source[, tags]).
Notebooks are stored without outputs; `--check` exits 1 when the stored file differs."""
import os

import nbformat


def build(cells) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                 "language_info": {"name": "python"}}
  for i, cell in enumerate(cells):
    kind, src, tags = cell[0], cell[1], (cell[2] if len(cell) > 2 else [])
    c = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
    c.id = f"cell-{i:02d}"
    if tags:
      c.metadata["tags"] = list(tags)
    nb.cells.append(c)
  nbformat.validate(nb)
  return nb


def main(path: str, cells, argv) -> int:
  text = nbformat.writes(build(cells)) + "\n"
  script = f"python notebooks/make_{os.path.basename(path)[:2]}.py"
  if "--check" in argv:
    with open(path) as f:
      same = f.read() == text
    print(f"{path}: {'up to date' if same else 'STALE: run ' + script}")
    return 0 if same else 1
  with open(path, "w") as f:
    f.write(text)
  print(f"wrote {os.path.relpath(path)}")
  return 0
