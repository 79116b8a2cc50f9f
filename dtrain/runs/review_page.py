"""The review page `dtrain review` writes: one HTML file a clinician works in, offline.

Each image gets one click or key: keep its label, relabel it to a class, or drop it. Decisions
are kept in the browser's localStorage under the review's own id (a reload keeps them; two
reviews never mix), progress is counted, the image opens zoomed, and an export button downloads
the filled review.csv (the CSV's own columns, with corrected_label filled: the class name for a
relabel, the given class for a keep, `drop`) that `dtrain relabel` applies.

Everything is inline: no network, no external script, style or font, and a Content Security
Policy that lets only this page's own script and style (pinned by hash) run. Untrusted values
(keys, paths, class names) reach the HTML escaped and the script only as JSON data in a
non-executed block with `<`, `>` and `&` escaped; the script sets them as text, never as markup."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path

from dtrain.runs.reviewed_dataset import CORRECTION_COLUMN, DROP

# the folder beside the page with each image at up to ZOOM_SIDE px, which the zoom shows
ZOOM = "zoom"
ZOOM_SIDE = 512
# number keys 1..9 relabel to the first nine classes; more classes get buttons only
KEYED_CLASSES = 9

STYLE = """
:root { --keep: #2e7d32; --relabel: #1565c0; --drop: #c62828; }
body { font-family: system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #f4f4f4; }
header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #ccc;
  padding: 0.6em 1.2em; }
header h1 { font-size: 1.2em; margin: 0; }
header p, header details { margin: 0.3em 0 0; font-size: 0.9em; }
.bar { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
#progress { font-weight: bold; font-size: 1.1em; } progress { width: 14em; height: 0.9em; }
#export { font-size: 1em; padding: 0.35em 1em; background: #1b1b1b; color: #fff; border: 0;
  border-radius: 4px; cursor: pointer; }
#warning { color: var(--drop); font-weight: bold; }
kbd { font-family: ui-monospace, monospace; font-size: 0.85em; border: 1px solid #999;
  border-bottom-width: 2px; border-radius: 3px; padding: 0 0.3em; background: #fafafa;
  color: #1b1b1b; }
code { font-family: ui-monospace, monospace; font-size: 0.9em; word-break: break-all; }
ol { list-style: none; margin: 0; padding: 0.8em 1.2em 40vh; }
.card { display: grid; grid-template-columns: auto minmax(14em, 1fr) auto; gap: 1em;
  align-items: center; background: #fff; border: 2px solid #ddd; border-left-width: 8px;
  border-radius: 6px; padding: 0.5em 0.8em; margin-bottom: 0.5em; scroll-margin: 9em 0 2em; }
.card.current { border-color: #f9a825; box-shadow: 0 0 0 3px #f9a82566; }
.card.keep { border-left-color: var(--keep); } .card.relabel { border-left-color: var(--relabel); }
.card.drop { border-left-color: var(--drop); } .card.drop img { opacity: 0.4; }
.thumb { padding: 0; border: 1px solid #999; background: #000; cursor: zoom-in; width: 128px;
  height: 128px; display: grid; place-items: center; }
.thumb img { display: block; max-width: 128px; max-height: 128px; }
.info { line-height: 1.5; } .rank { font-size: 1.3em; font-weight: bold; }
.rank small, .scores small { font-weight: normal; color: #555; }
.labels b { font-size: 1.1em; }
.path { font-size: 0.8em; color: #555; word-break: break-all; }
.state { font-weight: bold; min-height: 1.4em; }
.keep .state { color: var(--keep); } .relabel .state { color: var(--relabel); }
.drop .state { color: var(--drop); }
.actions { display: flex; flex-direction: column; gap: 0.3em; min-width: 13em; }
.actions button { text-align: left; font-size: 0.95em; padding: 0.3em 0.6em; cursor: pointer;
  background: #fafafa; border: 1px solid #aaa; border-radius: 4px; }
.actions button.suggested { border-color: var(--relabel); }
.actions button[aria-pressed="true"] { color: #fff; }
.actions button[data-act="keep"][aria-pressed="true"] { background: var(--keep); }
.actions button[data-act="relabel"][aria-pressed="true"] { background: var(--relabel); }
.actions button[data-act="drop"][aria-pressed="true"] { background: var(--drop); }
#zoom { position: fixed; inset: 0; z-index: 3; background: #000; color: #eee; display: flex;
  flex-direction: column; }
#zoom[hidden] { display: none; }
#zoom-bar { display: flex; gap: 1em; align-items: center; padding: 0.4em 1em; background: #222;
  flex-wrap: wrap; }
#zoom-bar button { font-size: 1em; min-width: 2.4em; cursor: pointer; } #zoom-caption { flex: 1; }
#zoom-stage { flex: 1; overflow: auto; display: flex; cursor: grab; }
#zoom-img { margin: auto; display: block; flex: none; }
"""

SCRIPT = """
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("review-data").textContent);
  const rows = data.rows, classes = data.classes;
  const cards = Array.from(document.querySelectorAll("#cards > .card"));
  const storeKey = "dtrain-review:" + data.id;
  const $ = (id) => document.getElementById(id);
  const decisions = new Map();  // key -> corrected_label (a class name or "drop")
  let storage = null;
  function warn(text) { $("warning").textContent = text; }
  try {
    storage = window.localStorage;
    const saved = JSON.parse(storage.getItem(storeKey) || "[]");
    const keys = new Set(rows.map((r) => r.key));
    const values = new Set(classes.concat([data.drop]));
    for (const pair of Array.isArray(saved) ? saved : []) {
      if (Array.isArray(pair) && keys.has(pair[0]) && values.has(pair[1])) {
        decisions.set(pair[0], pair[1]);
      }
    }
  } catch (err) {
    storage = null;
    warn("This browser keeps no work across reloads here: export before closing the page.");
  }
  function save() {
    try {
      if (storage) storage.setItem(storeKey, JSON.stringify(Array.from(decisions)));
    } catch (err) {
      warn("Could not save your work in the browser: export before closing the page.");
    }
  }
  function render(i) {
    const card = cards[i], row = rows[i], value = decisions.get(row.key);
    const kind = value === undefined ? "" :
      value === data.drop ? "drop" : value === row.given_label ? "keep" : "relabel";
    card.classList.remove("keep", "relabel", "drop");
    if (kind) card.classList.add(kind);
    for (const button of card.querySelectorAll("button[data-act]")) {
      const act = button.dataset.act;
      const pressed = act === kind &&
        (act !== "relabel" || classes[Number(button.dataset.cls)] === value);
      button.setAttribute("aria-pressed", String(pressed));
    }
    card.querySelector(".state").textContent =
      kind === "keep" ? "Kept as " + value :
      kind === "relabel" ? "Relabelled to " + value :
      kind === "drop" ? "Dropped" : "";
  }
  function progress() {
    const done = rows.filter((r) => decisions.has(r.key)).length;
    $("progress").textContent = done + " of " + rows.length + " reviewed";
    $("progress-bar").value = done;
  }
  let current = 0;
  function moveTo(i) {
    current = Math.max(0, Math.min(cards.length - 1, i));
    for (const card of cards) card.classList.toggle("current", card === cards[current]);
    cards[current].scrollIntoView({ block: "nearest" });
    if (!$("zoom").hidden) showZoom();
  }
  function decide(i, value) {
    const key = rows[i].key;
    if (value === null) decisions.delete(key); else decisions.set(key, value);
    save();
    render(i);
    progress();
  }
  // zoom: the image fitted to the screen, then scaled by the wheel, +/- or the buttons
  let scale = 1;
  function fit() {
    const img = $("zoom-img"), stage = $("zoom-stage");
    if (!img.naturalWidth) return;
    const base = Math.min(stage.clientWidth / img.naturalWidth,
                          stage.clientHeight / img.naturalHeight);
    img.style.width = img.naturalWidth * base * scale + "px";
    img.style.height = img.naturalHeight * base * scale + "px";
    $("zoom-level").textContent = Math.round(scale * 100) + "%";
  }
  function zoomBy(factor, x, y) {
    const stage = $("zoom-stage"), box = stage.getBoundingClientRect();
    const px = x === undefined ? box.width / 2 : x - box.left;
    const py = y === undefined ? box.height / 2 : y - box.top;
    const fx = (stage.scrollLeft + px) / stage.scrollWidth;
    const fy = (stage.scrollTop + py) / stage.scrollHeight;
    scale = Math.max(1, Math.min(16, scale * factor));
    fit();
    stage.scrollLeft = fx * stage.scrollWidth - px;
    stage.scrollTop = fy * stage.scrollHeight - py;
  }
  function showZoom() {
    const row = rows[current], img = $("zoom-img");
    const thumb = cards[current].querySelector(".thumb");
    $("zoom").hidden = false;
    scale = 1;
    if (img.getAttribute("src") !== thumb.dataset.zoom) {
      img.style.width = img.style.height = "0";
      img.src = thumb.dataset.zoom;
    }
    img.alt = row.key;
    fit();
    const value = decisions.get(row.key);
    $("zoom-caption").textContent = "#" + row.rank + "  given " + row.given_label +
      ", model says " + row.predicted_label +
      (value === undefined ? "" : "  (" + cards[current].querySelector(".state").textContent +
       ")");
  }
  function hideZoom() { $("zoom").hidden = true; }
  $("zoom-img").addEventListener("load", fit);
  window.addEventListener("resize", fit);
  $("zoom-stage").addEventListener("wheel", (e) => {
    e.preventDefault();
    zoomBy(e.deltaY < 0 ? 1.25 : 0.8, e.clientX, e.clientY);
  }, { passive: false });
  let drag = null;
  $("zoom-stage").addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY };
    e.currentTarget.setPointerCapture(e.pointerId);
  });
  $("zoom-stage").addEventListener("pointermove", (e) => {
    if (!drag) return;
    e.currentTarget.scrollLeft -= e.clientX - drag.x;
    e.currentTarget.scrollTop -= e.clientY - drag.y;
    drag = { x: e.clientX, y: e.clientY };
  });
  $("zoom-stage").addEventListener("pointerup", () => { drag = null; });
  $("zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("zoom-fit").addEventListener("click", () => { scale = 1; fit(); });
  $("zoom-close").addEventListener("click", hideZoom);
  // the filled review.csv: the columns and quoting of the one dtrain review wrote
  function cell(value) {
    const text = String(value);
    return /[",\\r\\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }
  function csvText() {
    const lines = [data.columns.map(cell).join(",")];
    for (const row of rows) {
      const filled = Object.assign({}, row);
      filled[data.correction] = decisions.get(row.key) || "";
      lines.push(data.columns.map((c) => cell(filled[c])).join(","));
    }
    return lines.join("\\n") + "\\n";
  }
  $("export").addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([csvText()], { type: "text/csv;charset=utf-8" }));
    const link = document.createElement("a");
    link.href = url;
    link.download = "review.csv";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    $("exported").textContent = "Exported review.csv (" + $("progress").textContent +
      "): apply it with the dtrain relabel command above.";
  });
  function act(i, button) {
    const row = rows[i];
    const value = button.dataset.act === "keep" ? row.given_label :
      button.dataset.act === "drop" ? data.drop : classes[Number(button.dataset.cls)];
    decide(i, decisions.get(row.key) === value ? null : value);  // a second click undoes
  }
  $("cards").addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    if (!card) return;
    const i = cards.indexOf(card);
    const button = e.target.closest("button[data-act]");
    if (button) {
      act(i, button);
      moveTo(decisions.has(rows[i].key) ? i + 1 : i);
    } else if (e.target.closest(".thumb")) {
      moveTo(i);
      showZoom();
    } else {
      moveTo(i);
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const zoomed = !$("zoom").hidden, key = e.key.toLowerCase();
    const row = rows[current];
    if (key === "k") { decide(current, row.given_label); moveTo(current + 1); }
    else if (key === "d") { decide(current, data.drop); moveTo(current + 1); }
    else if (/^[1-9]$/.test(key) && Number(key) <= Math.min(classes.length, data.keyed)) {
      decide(current, classes[Number(key) - 1]); moveTo(current + 1);
    }
    else if (key === "u" || key === "backspace") { decide(current, null); if (zoomed) showZoom(); }
    else if (key === "arrowdown" || key === "j") moveTo(current + 1);
    else if (key === "arrowup") moveTo(current - 1);
    else if (key === "z") { if (zoomed) hideZoom(); else showZoom(); }
    else if (key === "escape" && zoomed) hideZoom();
    else if (zoomed && (key === "+" || key === "=")) zoomBy(1.25);
    else if (zoomed && key === "-") zoomBy(0.8);
    else if (zoomed && key === "0") { scale = 1; fit(); }
    else return;
    e.preventDefault();
  });
  $("progress-bar").max = rows.length;
  cards.forEach((_, i) => render(i));
  progress();
  const first = rows.findIndex((r) => !decisions.has(r.key));
  moveTo(first === -1 ? 0 : first);
  document.documentElement.dataset.ready = "true";
})();"""


def _esc(value: object) -> str:
    """Text or an attribute value as HTML shows it, never as markup."""
    return html.escape(str(value), quote=True)


def _json_block(value: object) -> str:
    """JSON that a <script type="application/json"> block holds safely: no `</script>`, `<!--`
    or `&` sequence can end or change the block, whatever the strings inside."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _csp_hash(text: str) -> str:
    """The CSP source that lets exactly this inline script or style run."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _figure(value: float, digits: int) -> str:
    """A score as the page shows it (a sample never scored shows n/a)."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _card(row: dict, loss: float, classes: list[str], total: int) -> str:
    """One image's card: thumbnail (click to zoom), rank and scores, and its decision buttons."""
    zoom = f"{ZOOM}/{Path(row['thumbnail']).name}"
    buttons = [
        f'<button type="button" data-act="keep">Keep {_esc(row["given_label"])} '
        "<kbd>K</kbd></button>"
    ]
    for number, name in enumerate(classes, 1):
        if name == row["given_label"]:
            continue
        key = f" <kbd>{number}</kbd>" if number <= KEYED_CLASSES else ""
        suggested = ' class="suggested"' if name == row["predicted_label"] else ""
        buttons.append(
            f'<button type="button" data-act="relabel" data-cls="{number - 1}"{suggested}>'
            f"Relabel to {_esc(name)}{key}</button>"
        )
    buttons.append('<button type="button" data-act="drop">Drop image <kbd>D</kbd></button>')
    return f"""<li class="card">
<button type="button" class="thumb" data-zoom="{_esc(zoom)}" title="Zoom (Z)">
<img src="{_esc(row["thumbnail"])}" alt="{_esc(row["key"])}" loading="lazy"></button>
<div class="info">
<div class="rank">#{_esc(row["rank"])} <small>of {total} by suspicion</small></div>
<div class="scores">loss <b>{_figure(loss, 3)}</b> &middot; suspicion
{_esc(row["suspicion"] or "n/a")}</div>
<div class="labels">given <b>{_esc(row["given_label"])}</b> &middot; model says
<b>{_esc(row["predicted_label"])}</b></div>
<div class="path">{_esc(row["key"])} &middot; {_esc(row["image"])}</div>
<div class="state" aria-live="polite"></div>
</div>
<div class="actions">{"".join(buttons)}</div>
</li>"""


def render_page(
    rows: list[dict],
    losses: list[float],
    classes: list[str],
    columns: tuple[str, ...],
    run_dir: Path,
    dataset: Path,
    review_id: str,
    total: int,
) -> str:
    """The review page for `rows` (review.csv's rows, most suspicious first), each with its
    per-sample loss; `total` is how many training labels the run ranked."""
    data = {
        "id": review_id,
        "columns": list(columns),
        "correction": CORRECTION_COLUMN,
        "drop": DROP,
        "keyed": KEYED_CLASSES,
        "classes": classes,
        "rows": rows,
    }
    csp = (
        f"default-src 'none'; img-src 'self' data:; style-src {_csp_hash(STYLE)}; "
        f"script-src {_csp_hash(SCRIPT)}; base-uri 'none'; form-action 'none'"
    )
    keyed = ", ".join(
        f"<kbd>{n}</kbd> {_esc(name)}" for n, name in enumerate(classes[:KEYED_CLASSES], 1)
    )
    cards = "\n".join(
        _card(row, loss, classes, total) for row, loss in zip(rows, losses, strict=True)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<link rel="icon" href="data:,">
<title>Label review: {_esc(run_dir)}</title>
<style>{STYLE}</style></head><body>
<header>
<div class="bar"><h1>Label review: the {len(rows)} most suspicious of {total} training
labels</h1><span id="progress">0 of {len(rows)} reviewed</span>
<progress id="progress-bar" value="0"></progress>
<button type="button" id="export">Export review.csv</button>
<span id="exported"></span><span id="warning"></span></div>
<p><b>Keys</b> on the highlighted image, which then moves on: <kbd>K</kbd> keep the given
label &middot; relabel to {keyed} &middot; <kbd>D</kbd> drop the image &middot; <kbd>U</kbd> undo
&middot; <kbd>&uarr;</kbd> <kbd>&darr;</kbd> move &middot; <kbd>Z</kbd> zoom (wheel or
<kbd>+</kbd> <kbd>-</kbd> to magnify). Or click. Work is kept in this browser across reloads.
Then export and apply:
<code>dtrain relabel {_esc(dataset)} review.csv --out NEW_DATASET</code></p>
<details><summary>About this review</summary><p>Run <code>{_esc(run_dir)}</code>. Most
suspicious first, by rank; the loss (higher: the model disagrees more with the given label)
tells apart suspects whose suspicion looks the same. In the exported file
<code>{CORRECTION_COLUMN}</code> holds the new class, the given class for a keep, or
<code>{DROP}</code>; rows left empty keep their label. Without a browser, fill
<code>{CORRECTION_COLUMN}</code> in the <code>review.csv</code> beside this page instead.</p>
</details>
</header>
<ol id="cards">
{cards}
</ol>
<div id="zoom" hidden><div id="zoom-bar"><span id="zoom-caption"></span>
<span><kbd>K</kbd> keep &middot; <kbd>1</kbd>&ndash;<kbd>{min(len(classes), KEYED_CLASSES)}</kbd>
relabel &middot; <kbd>D</kbd> drop &middot; <kbd>&uarr;</kbd> <kbd>&darr;</kbd> move</span>
<span id="zoom-level"></span>
<button type="button" id="zoom-out" title="Zoom out (-)">&minus;</button>
<button type="button" id="zoom-in" title="Zoom in (+)">+</button>
<button type="button" id="zoom-fit" title="Fit (0)">Fit</button>
<button type="button" id="zoom-close" title="Close (Esc)">Close</button></div>
<div id="zoom-stage"><img id="zoom-img" alt=""></div></div>
<script type="application/json" id="review-data">{_json_block(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
