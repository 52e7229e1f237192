"""Drawing shared by the figures: headless pyplot, one style per arm, mean ± standard error bands
and error bars, axes, saving.

Numbers (means, standard errors) come from experiments/harness.py; this module only draws them.
Every function that draws a mean ± SE returns what it drew as a `Drawn` record, and each figure's
plot function returns its records: the tests compare them with the SE computed from the CSV.
matplotlib is imported when a plot is drawn, not when a figure module is imported.
"""
from __future__ import annotations

import dataclasses

import numpy as np

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def arm_style(i: int) -> dict:
  """Matplotlib style of the i-th arm: colour, line style and marker each cycle at their own period
  (10, 4, 8), so arms 0..39 differ in their combination and two arms of one colour (10 apart) differ
  in line style and marker too."""
  return {"color": f"C{i % 10}", "ls": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)]}


@dataclasses.dataclass
class Drawn:
  """What a plot drew: in `panel`, the series `series` (an arm, a method), at `x`, means `mean` and
  error bars ± `se` (0 where undefined)."""
  panel: str
  series: str
  x: list
  mean: list
  se: list


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (every plot is written to a file)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _drawn(ax, series, x, mean, se, panel) -> Drawn:
  return Drawn(panel or ax.get_title(), series, [float(v) for v in x], [float(v) for v in mean],
               [float(v) for v in np.nan_to_num(np.asarray(se, np.float64))])


def band(ax, x, mean, se, color, label: str, panel: str = "", series: str = "", **line) -> Drawn:
  """The curve `mean` against `x` (`line`: its matplotlib style), shaded ± `se`; recorded as
  `series` (default `label`) in `panel` (default the axes' title)."""
  x, mean, se = (np.asarray(v, np.float64) for v in (x, mean, se))
  ax.plot(x, mean, color=color, label=label, **line)
  ax.fill_between(x, mean - np.nan_to_num(se), mean + np.nan_to_num(se), color=color, alpha=0.2, lw=0)
  return _drawn(ax, series or label, x, mean, se, panel)


def points(ax, x, mean, se, label: str, panel: str = "", series: str = "", horizontal: bool = False,
           **style) -> Drawn:
  """Means with ± `se` error bars at `x` (`style`: matplotlib's errorbar style; `horizontal`: the
  means on the x axis, at heights `x`)."""
  x, mean, se = (np.asarray(v, np.float64) for v in (x, mean, se))
  style = {"capsize": 3, "ms": 4, **style}
  if horizontal:
    ax.errorbar(mean, x, xerr=np.nan_to_num(se), label=label, **style)
  else:
    ax.errorbar(x, mean, yerr=np.nan_to_num(se), label=label, **style)
  return _drawn(ax, series or label, x, mean, se, panel)


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
