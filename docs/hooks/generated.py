"""mkdocs hook: the pages' generated blocks, filled from benchmarks/results/ at build time.

A page holds `<!-- generated: NAME -->` ... `<!-- end: NAME -->`; `on_page_markdown` puts the
block's current Markdown there (benchmarks/performance.py renders it from the JSON results and
benchmarks/results/study/study.md), so no measured number on the site is pasted by hand. The
figures (`figure:PATH` blocks) are PNGs under benchmarks/results/, outside docs_dir: `on_files`
adds each to the site under `figures/PATH`. An unknown or unclosed block fails the build."""

from __future__ import annotations

import posixpath
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# performance.py imports its neighbours as `from common import ...`, as a script would
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import performance  # noqa: E402

FIGURES = "figures"  # where the results' PNGs are served, under the site root


def on_files(files, config):
    for png in sorted(performance.RESULTS.rglob("*.png")):
        uri = f"{FIGURES}/{png.relative_to(performance.RESULTS).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)

    def figure_url(path: str) -> str:
        return posixpath.relpath(f"{FIGURES}/{path}", here or ".")

    try:
        return performance.fill(markdown, figure_url, where=f"docs/{page.file.src_uri}")
    except ValueError as err:
        raise PluginError(str(err)) from None
