"""Every figure's README follows experiments/TEMPLATE.md: its six sections in the template's order,
the figure's own command, and relative links (images, results) that exist."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
FIGURES = sorted(d for d in os.listdir(EXPERIMENTS) if os.path.exists(os.path.join(EXPERIMENTS, d, "figure.py")))


def template_sections() -> list[str]:
  """The template's section names ('## 1. Claim' -> 'Claim')."""
  with open(os.path.join(EXPERIMENTS, "TEMPLATE.md")) as f:
    return [m.group(1).strip() for m in re.finditer(r"^## \d+\. (.+)$", f.read(), re.M)]


def test_the_template_has_six_sections():
  assert template_sections() == ["Claim", "Command and time", "Set-up", "Result (n seeds, date)",
                                 "What disagrees, and why", "Pod scale"]


@pytest.mark.parametrize("name", FIGURES)
def test_readme_follows_the_template(name):
  with open(os.path.join(EXPERIMENTS, name, "README.md")) as f:
    text = f.read()
  headings = re.findall(r"^## (.+)$", text, re.M)
  wanted = [s.split(" (")[0] for s in template_sections()]
  assert [next((w for w in wanted if h.startswith(w)), h) for h in headings] == wanted, headings
  assert f"python -m experiments.{name}.run" in text
  assert "--size=pod --aot=" in text  # the pod size's ahead-of-time check
  for link in re.findall(r"\]\(([^)#\s]+)\)", text):
    if "://" not in link:
      assert os.path.exists(os.path.join(EXPERIMENTS, name, link)), f"{name}/README.md links to missing {link}"
