"""The docs: the site builds with `mkdocs build --strict` (a dead link or anchor, a page missing
from the nav, an unknown generated block fail it), the README stays short and its links lead
somewhere, and the measured tables on the site come from the results under benchmarks/results/
at build time, not from numbers pasted into the pages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MAX_README_LINES = 200


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for this module into a temporary folder (never into the checkout)."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def _nav_pages() -> list[str]:
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    return [page for entry in config["nav"] for page in entry.values()]


def _page(site: Path, name: str) -> str:
    """A built page's HTML, with the line breaks between table cells taken out."""
    html = (site / name / "index.html").read_text()
    return re.sub(r">\s+<", "><", html)


def _sources() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))


def test_the_site_builds_strict_with_every_page(site):
    for page in _nav_pages():
        built = site / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert built.is_file(), page
    # the results' figures are served from outside docs/ and shown
    assert (site / "figures" / "study" / "study.png").is_file()
    assert 'src="../figures/study/study.png"' in _page(site, "results")


def test_the_readme_is_short_and_its_links_lead_somewhere():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:|#", link)]
    assert relative
    for link in relative:
        assert (REPO / link.split("#")[0]).exists(), f"README.md links to a missing {link}"
    linked = {link.split("#")[0] for link in relative}
    for page in _nav_pages():
        assert f"docs/{page}" in linked, f"README.md has no link to docs/{page}"
    # the two set-up commands, exactly, at the top
    head = "\n".join(text.splitlines()[:12])
    assert "./setup.sh && .venv/bin/dtrain train " in head
    assert "./setup.sh && .venv/bin/python -m pytest -q " in head


def _generated(site: Path, page: str, *cells: str) -> None:
    """A table row of `cells`, formatted from a result file as the page formats them, is on the
    built page, and no page's source holds those values: they can only have come from the
    results at build time (a pasted row, stale or current, fails)."""
    assert "".join(f"<td>{c}</td>" for c in cells) in _page(site, page), (
        f"{' | '.join(cells)} is not a row of the built {page} page"
    )
    values = [c for c in cells if re.search(r"\d", c)]
    pasted = r"\W+".join(re.escape(v) for v in values)
    assert not re.search(pasted, _sources()), f"{' | '.join(values)} is pasted into docs/*.md"


def test_the_results_page_shows_the_json_results(site):
    quick = json.loads((RESULTS / "accuracy_quick.json").read_text())
    summary = quick["summary"]["iam"]
    _generated(
        site,
        "results",
        *(f"{summary[k][0]:.3f} ± {summary[k][1]:.3f}" for k in ("test_last", "test_best")),
    )

    tune = json.loads((RESULTS / "tune.json").read_text())
    asha, full = tune["searches"]["asha"], tune["searches"]["full"]
    share = asha["trial_epochs"] / full["trial_epochs"]
    _generated(site, "results", f"{asha['trial_epochs']} ({share:.0%})")

    job = json.loads((RESULTS / "main_job.json").read_text())
    chosen = job["results"][job["chosen"]]
    _generated(
        site,
        "results",
        *(
            f"{chosen['tuning'][str(seed)]['val_clean_accuracy']:.3f}"
            for seed in job["tuning_seeds"]
        ),
        f"{chosen['summary']['val_clean_mean']:.3f}",
    )

    gain = json.loads((RESULTS / "review_gain.json").read_text())
    accuracy = gain["clean_test_accuracy"]
    _generated(
        site,
        "results",
        "clean test accuracy, last checkpoint",
        f"{accuracy['before']['last']:.3f}",
        f"{accuracy['after']['last']:.3f}",
    )


def test_the_results_page_shows_the_study_tables(site):
    """Every table row of study.md (benchmarks/study_report.py writes it) is on the page."""
    html = _page(site, "results")
    lines = (RESULTS / "study" / "study.md").read_text().splitlines()
    rows = [  # the body rows: not a header (the line above `|---|`), not the rule itself
        line
        for line, below in zip(lines, [*lines[1:], ""], strict=True)
        if line.startswith("| ") and not below.startswith("|---")
    ]
    assert len(rows) > 40
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert "".join(f"<td>{c}</td>" for c in cells) in html, line
    assert rows[0] not in _sources()


def test_the_performance_page_shows_the_json_results(site):
    result = json.loads((RESULTS / "step_breakdown_cpu-2cores.json").read_text())
    row = result["rows"]["iam/eager"]
    _generated(
        site,
        "performance",
        "<code>iam/eager</code>",
        f"{row['images_per_s']:.0f}",
        f"{row['step_ms']:.0f} ± {row['step_ms_iqr'] / 2:.0f}",
    )
    scale = json.loads((RESULTS / "scale_model.json").read_text())
    moved = f"moves {scale['gather_MB_per_step']:.2f} MB"
    assert moved in _page(site, "performance") and moved not in _sources()
