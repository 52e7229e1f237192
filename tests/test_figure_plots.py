"""What each figure draws, against the committed CSVs in experiments/*/results: every plotted point's
mean and error bar equal the mean and standard error computed here from the CSV's rows with a plain
loop (statistics.stdev / sqrt(n)), and arms are told apart by colour, line style and marker."""
import collections
import importlib
import math
import os
import statistics

import numpy as np
import pytest

from experiments import harness, plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = sorted(d for d in os.listdir(os.path.join(REPO, "experiments"))
                 if os.path.exists(os.path.join(REPO, "experiments", d, "results", f"{d}.csv")))


# (figure, results folder, size): every committed result, the longer upcycling run included
RESULTS = [(n, "results", False) for n in FIGURES] + [("upcycling", "results_long", "long")]


def results(name, file, folder="results"):
  return os.path.join(REPO, "experiments", name, folder, file)


def se(xs):
  return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def _figure(name, size=False):
  return importlib.import_module(f"experiments.{name}.figure").figure(size)


def check_drawn(d, expected, where):
  """Drawn record `d` against {x: (mean, se)} computed from the CSV."""
  assert len(d.x) == len(expected), f"{where}: drew {len(d.x)} points, the CSV has {len(expected)}"
  for x, m, s in zip(d.x, d.mean, d.se):
    key = min(expected, key=lambda k: abs(k - x))
    assert abs(key - x) <= 1e-9 * max(1.0, abs(x)), f"{where}: x={x} is not in the CSV"
    assert m == pytest.approx(expected[key][0], abs=1e-12), f"{where} at x={x}: mean"
    assert s == pytest.approx(expected[key][1], abs=1e-12), f"{where} at x={x}: error bar"


def test_every_figure_has_committed_results():
  assert {"balance", "btx", "expert_growth", "merging", "preserving", "shrink", "stacking", "upcycling"} <= set(FIGURES)


def test_arm_styles_differ_in_their_combination_and_neighbours_in_every_part():
  styles = [tuple(sorted(plots.arm_style(i).items())) for i in range(40)]
  assert len(set(styles)) == 40
  for i in range(39):
    a, b = plots.arm_style(i), plots.arm_style(i + 1)
    assert a["color"] != b["color"] and a["ls"] != b["ls"] and a["marker"] != b["marker"]
  for i in range(30):  # one colour again: line style and marker differ
    a, b = plots.arm_style(i), plots.arm_style(i + 10)
    assert a["color"] == b["color"] and a["ls"] != b["ls"] and a["marker"] != b["marker"]


@pytest.mark.parametrize("name, folder, size", RESULTS)
def test_training_curves_are_the_csvs_mean_and_se_over_seeds(name, folder, size, tmp_path):
  fig = _figure(name, size)
  rows = harness.read_csv(results(name, f"{name}.csv", folder))
  drawn = harness.plot(str(tmp_path / "curves.png"), fig, rows)
  assert os.path.getsize(tmp_path / "curves.png") > 10_000
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["arm"], r["domain"], r["step"])].append((r["x"], r["loss"]))
  scale = 10 ** math.floor(math.log10(max(abs(r["x"]) for r in rows)))
  series = {(d.series, d.panel) for d in drawn}
  assert series == {(r["arm"], r["domain"]) for r in rows}, "every arm on every domain, once"
  for d in drawn:
    mine = {k[2]: v for k, v in groups.items() if k[0] == d.series and k[1] == d.panel}
    n = max(len(v) for v in mine.values())
    assert n >= 2, f"{name}: {d.series} has one seed"
    expected = {v[0][0] / scale: (sum(l for _, l in v) / n, se([l for _, l in v])) for v in mine.values()
                if len(v) == n}
    check_drawn(d, expected, f"{name}/{d.series}/{d.panel}")


def _groups(rows, key):
  out = collections.defaultdict(dict)
  for r in rows:
    out[key(r)][r["seed"]] = r["loss"]
  return out


def test_merging_plots_are_the_points_csvs_mean_and_se_and_the_paired_differences(tmp_path):
  from experiments.merging import figure as merging
  rows = harness.read_csv_rows(results("merging", "merging_points.csv"))
  drawn = {(d.panel, d.series): d for d in merging.plot_merges(str(tmp_path / "m.png"), merging.figure(False), rows)}
  mean = [r for r in rows if r["domain"] == "mean"]
  seeds = sorted({r["seed"] for r in rows})
  assert len(seeds) >= 2
  stat = lambda xs: (sum(xs) / len(xs), se(xs))
  for pair in ("one base", "different inits"):
    by_a = _groups([r for r in mean if r["panel"] == "interpolation" and r["method"] == pair], lambda r: r["x"])
    check_drawn(drawn[("interpolation", pair)], {a: stat(list(v.values())) for a, v in by_a.items()}, pair)
    a0, a1 = min(by_a), max(by_a)
    above = {a: stat([v[s] - ((1 - a) * by_a[a0][s] + a * by_a[a1][s]) for s in seeds]) for a, v in by_a.items()}
    check_drawn(drawn[("above the line", pair)], above, pair)
  soups = _groups([r for r in mean if r["panel"] == "soup"], lambda r: r["method"])  # grouped by method, not x
  names = sorted(m for m in soups if m.startswith("ft_")) + ["uniform soup", "greedy soup"]
  assert len(names) == 6
  for j, name in enumerate(names):
    assert len(soups[name]) == len(seeds)
    check_drawn(drawn[("soups", name)], {j: stat(list(soups[name].values()))}, name)
  chosen = {r["seed"]: int(r["x"]) for r in mean if r["panel"] == "greedy selection" and r["method"] == "best ingredient"}
  for j, name in enumerate(("uniform soup", "greedy soup")):
    diff = [soups[name][s] - soups[f"ft_{chosen[s]}"][s] for s in seeds]
    check_drawn(drawn[("soup - best", name)], {j: stat(diff)}, name)
  ta = _groups([r for r in mean if r["panel"] == "task" and r["method"] == "task_arithmetic"], lambda r: 0)[0]
  check_drawn(drawn[("task merges", "task_arithmetic")], {1.0: stat(list(ta.values()))}, "task arithmetic")
  for method in ("ties", "dare_linear", "dare_ties"):
    by_d = _groups([r for r in mean if r["panel"] == "task" and r["method"] == method], lambda r: r["x"])
    check_drawn(drawn[("task merges", method)], {d: stat(list(v.values())) for d, v in by_d.items()}, method)
    check_drawn(drawn[("merge - task arithmetic", method)],
                {d: stat([v[s] - ta[s] for s in seeds]) for d, v in by_d.items()}, method)


def test_continual_frontier_is_the_frontier_csvs_mean_and_se(tmp_path):
  from experiments.continual import figure as continual
  rows = harness.read_csv_rows(results("continual", "frontier.csv"))
  drawn = continual.plot_frontier(str(tmp_path / "f.png"), continual.figure(False), continual.frontier_summary(rows))
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  assert len(arms) >= 10 and {d.series for d in drawn} == set(arms)
  for d in drawn:
    mine = [r for r in rows if r["arm"] == d.series]
    assert len(mine) >= 2
    key = {"frontier": "forgetting", "frontier, Python loss": "python_loss", "drift": "drift"}[d.panel]
    xs = [r[key] for r in mine]
    x = {"frontier": sum(r["python_loss"] for r in mine) / len(mine), "frontier, Python loss": 0.0,
         "drift": float(arms.index(d.series))}[d.panel]
    check_drawn(d, {x: (sum(xs) / len(xs), se(xs))}, f"{d.series}/{d.panel}")
  assert not any(d.panel == "drift" and math.isnan(d.mean[0]) for d in drawn)


def test_expert_growth_gap_closure_is_the_csvs_mean_and_se(tmp_path):
  from experiments.expert_growth import figure as eg
  rows = harness.read_csv_rows(results("expert_growth", "gap_closure.csv"))
  (d,) = eg.plot_gap_closure(str(tmp_path / "g.png"), eg.figure(False), rows, eg.gap_closure_summary(rows))
  by = collections.defaultdict(list)
  for r in rows:
    by[r["switch_fraction"]].append(r["closure"])
  assert len(by) >= 3 and min(len(v) for v in by.values()) >= 2
  check_drawn(d, {x: (sum(v) / len(v), se(v)) for x, v in by.items()}, "gap closure")


def test_btx_routing_cells_are_the_csvs_mean_and_se_over_seeds(tmp_path):
  from experiments.btx import figure as btx
  rows = harness.read_csv_rows(results("btx", "btx_routing.csv"))
  drawn = btx.plot_routing(str(tmp_path / "r.png"), btx.figure(False), rows)
  cells = collections.defaultdict(list)
  for r in rows:
    cells[(f"{r['arm']}, {r['when']}", f"L{r['layer']} {r['domain']} -> expert {r['expert']}")].append(r["fraction"])
  assert {(d.panel, d.series) for d in drawn} == set(cells)
  for d in drawn:
    v = cells[(d.panel, d.series)]
    assert len(v) >= 2
    check_drawn(d, {0.0: (sum(v) / len(v), se(v))}, f"{d.panel}/{d.series}")


def test_shrink_cut_bars_are_the_paired_differences_mean_and_se(tmp_path):
  from experiments.shrink import figure as shrink
  rows = harness.read_csv_rows(results("shrink", "cut.csv"))
  drawn = shrink.plot_cut(str(tmp_path / "c.png"), shrink.figure(False), shrink.cut_summary(rows))
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  assert {(d.panel, d.series) for d in drawn} == {(k, a) for k in ("cut", "vs_e8") for a in arms}
  for d in drawn:
    a, b = {"cut": ("L_cut", "L_before"), "vs_e8": ("L_final", "L_e8")}[d.panel]
    diff = [r[a] - r[b] for r in rows if r["arm"] == d.series]
    assert len(diff) >= 2
    check_drawn(d, {float(arms.index(d.series)): (sum(diff) / len(diff), se(diff))}, f"{d.panel}/{d.series}")


# merging states its claims in its own report (tested above), on its merges, not on training curves
@pytest.mark.parametrize("name, folder, size", [r for r in RESULTS if _figure(r[0], r[2]).claims])
def test_claims_are_the_paired_differences_of_the_final_losses(name, folder, size, tmp_path):
  fig = _figure(name, size)
  rows = harness.read_csv(results(name, f"{name}.csv", folder))
  _, claim_rows = harness.summarize(rows, fig.claims)
  drawn = harness.plot_claims(str(tmp_path / "claims.png"), fig, claim_rows,
                              harness.claims_at_equal_flops(rows, fig.claims))
  at_flops = {d.series: d for d in drawn if d.panel == "claims at equal FLOPs"}
  drawn = [d for d in drawn if d.panel == "claims"]
  last = {}
  for r in rows:
    last[(r["arm"], r["seed"])] = max(last.get((r["arm"], r["seed"]), -1), r["step"])
  final = {(r["arm"], r["domain"], r["seed"]): r["loss"] for r in rows if r["step"] == last[(r["arm"], r["seed"])]}
  assert [d.series for d in drawn] == [c.text for c in fig.claims]
  for i, (c, d) in enumerate(zip(fig.claims, drawn)):
    seeds = sorted({s for (a, dom, s) in final if a == c.better and dom == c.domain}
                   & {s for (a, dom, s) in final if a == c.worse and dom == c.domain})
    diff = [final[(c.worse, c.domain, s)] - final[(c.better, c.domain, s)] for s in seeds]
    assert len(diff) >= 2, c.text
    check_drawn(d, {float(i): (sum(diff) / len(diff), se(diff))}, c.text)
    # at equal FLOPs: both curves at the smaller of their final FLOPs, by linear interpolation
    curve = lambda arm, s: sorted((r["flops"], r["loss"]) for r in rows
                                  if r["arm"] == arm and r["seed"] == s and r["domain"] == c.domain)
    ends = [(curve(c.better, s)[-1][0], curve(c.worse, s)[-1][0]) for s in seeds]
    if max(abs(a - b) / max(a, b) for a, b in ends) <= 0.01:
      assert c.text not in at_flops, c.text
      continue
    if any(min(a, b) < max(curve(c.better, s)[0][0], curve(c.worse, s)[0][0]) for s, (a, b) in zip(seeds, ends)):
      assert c.text not in at_flops, f"{c.text}: the curves share no FLOPs, nothing to draw"
      continue
    diff = []
    for s, (a, b) in zip(seeds, ends):
      f = min(a, b)
      interp = lambda pts: float(np.interp(f, [p[0] for p in pts], [p[1] for p in pts]))
      diff.append(interp(curve(c.worse, s)) - interp(curve(c.better, s)))
    check_drawn(at_flops[c.text], {i + 0.25: (sum(diff) / len(diff), se(diff))}, f"{c.text} at equal FLOPs")


@pytest.mark.parametrize("name", FIGURES)
def test_replot_redraws_every_png_from_the_csvs_alone(name, tmp_path, capsys):
  import shutil
  root = tmp_path / "results"
  shutil.copytree(os.path.join(REPO, "experiments", name, "results"), root)
  pngs = sorted(p for p in os.listdir(root) if p.endswith(".png"))
  for p in pngs:
    os.remove(root / p)
  fig = _figure(name)
  assert harness.run(fig_factory(name), ["--replot", f"--workdir={root}"]) == 0
  made = sorted(p for p in os.listdir(root) if p.endswith(".png"))
  assert f"{name}.png" in made and (f"{name}_claims.png" in made) == bool(fig.claims)
  own = {"btx": "btx_routing.png", "continual": "frontier.png", "expert_growth": "gap_closure.png",
         "merging": "merging_merges.png", "shrink": "cut.png"}
  assert name not in own or own[name] in made
  for p in made:
    with open(root / p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def fig_factory(name):
  return importlib.import_module(f"experiments.{name}.figure").figure
