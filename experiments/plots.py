"""Drawing shared by the figures: headless pyplot, mean ± standard error bands, axes, saving.

Numbers (means, standard errors) come from experiments/harness.py; this module only draws them.
matplotlib is imported when a plot is drawn, not when a figure module is imported.
"""
from __future__ import annotations


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (every plot is written to a file)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def band(ax, x, mean, se, color, label: str, **line) -> None:
  """The curve `mean` against `x` (`line`: its matplotlib style), shaded ± `se`."""
  ax.plot(x, mean, color=color, label=label, **line)
  ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2, lw=0)


def style_axes(ax, xlabel: str, ylabel: str, title: str = "", legend_size: float = 0, grid: str = "both") -> None:
  """Axis labels, an optional title, a light grid (on `grid`: 'both', 'x' or 'y') and, when
  `legend_size` is set, a legend in that font size at the best place."""
  if title:
    ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, axis=grid)
  if legend_size:
    ax.legend(fontsize=legend_size, loc="best")


def save(f, path: str, title: str = "", tight_bbox: bool = False) -> None:
  """Write figure `f` to `path` at 110 dpi under the suptitle `title` (if any), and close it.
  Laid out by tight_layout, or (`tight_bbox`, for a figure with a colorbar) cropped to what it draws."""
  if title:
    f.suptitle(title, fontsize=10)
  if tight_bbox:
    f.savefig(path, dpi=110, bbox_inches="tight")
  else:
    f.tight_layout()
    f.savefig(path, dpi=110)
  pyplot().close(f)
