"""From a run's mislabel ranking to a clinician's review and back: `dtrain review` writes the page
and the CSV of the most suspicious labels, `dtrain relabel` turns the filled CSV into a new
dataset version that the loader reads, leaving the original as it was."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_dataset, small_overrides, write_stripes
from PIL import Image

from dtrain.commands.main import main
from dtrain.errors import DataError
from dtrain.prepare import PrepareConfig, prepare
from dtrain.prepare.noise import transition_matrix
from dtrain.prepare.shard_writer import sha256
from dtrain.runs.review_work import review_size, thumbnail, zoom_view
from dtrain.runs.reviewed_dataset import relabel

# a class name that HTML and CSV must both carry intact
ODD_CLASS = 'vertical <b>&"co"'
QUIET = "--no-progress"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 48-image two-class dataset in 8-sample shards, with an extra manifest column (as other
    tools add), and one epoch of training on it."""
    from dtrain.config import load_config
    from dtrain.train import train

    root = tmp_path_factory.mktemp("review")
    images = write_stripes(root / "img", 24)
    (images / "vertical").rename(images / ODD_CLASS)
    data = prepare(
        PrepareConfig(
            source=str(images),
            out=str(root / "ds"),
            noise="symmetric",
            noise_rate=0.2,
            shard_size=8,
            progress=False,
        )
    )
    manifest = pq.read_table(data / "manifest.parquet")
    patients = pa.array([f"p{i % 7}" for i in range(manifest.num_rows)])
    pq.write_table(manifest.append_column("patient_id", patients), data / "manifest.parquet")
    run = root / "run"
    train(load_config(None, small_overrides(data, run, 8, "train.epochs=1")))
    return {"data": data, "run": run, "classes": json.loads((data / "dataset.json").read_text())}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def shard_samples(folder: Path) -> dict[str, dict]:
    """key -> {shard, members} of every sample in every shard of a dataset folder."""
    found = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                entry = found.setdefault(key, {"shard": shard.name, "members": {}})
                entry["members"][ext] = tar.extractfile(info).read()
    return found


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`dtrain ARGV` in this process: its exit status and what it wrote to stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def test_review_lists_the_most_suspicious_labels_first(trained, tmp_path, capsys):
    out = tmp_path / "review"
    code, _ = run_cli(capsys, "review", str(trained["run"]), "--top=6", f"--out={out}", QUIET)
    assert code == 0
    classes = trained["classes"]["classes"]
    ranked = pq.read_table(trained["run"] / "label_scores.parquet").to_pylist()
    ranked.sort(key=lambda r: r["rank"])
    samples = shard_samples(trained["data"])
    rows = read_csv(out / "review.csv")
    assert list(rows[0]) == [
        "rank",
        "key",
        "image",
        "thumbnail",
        "given_label",
        "predicted_label",
        "suspicion",
        "corrected_label",
    ]
    assert [r["key"] for r in rows] == [r["key"] for r in ranked[:6]]
    scores = [float(r["suspicion"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for row, scored in zip(rows, ranked, strict=False):
        assert int(row["rank"]) == scored["rank"]
        assert row["image"] == scored["source"] and row["image"]
        assert row["given_label"] == classes[scored["noisy_label"]]
        assert row["predicted_label"] == classes[scored["predicted_label"]]
        assert float(row["suspicion"]) == pytest.approx(scored["score"], abs=1e-4)
        assert row["corrected_label"] == ""
        with Image.open(out / row["thumbnail"]) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) == 128
        image = samples[row["key"]]["members"]["png"]  # the page shows this sample's image
        assert (out / row["thumbnail"]).read_bytes() == thumbnail(image)

        zoom = out / "zoom" / Path(row["thumbnail"]).name
        assert zoom.read_bytes() == zoom_view(image)
        with Image.open(zoom) as view:  # the 32 px image as it is: the browser enlarges it
            assert view.format == "PNG" and view.size == (32, 32)

    page = (out / "index.html").read_text()
    # one inline script, the data as JSON beside it; nothing fetched from anywhere
    assert page.count("<script>") == 1 and page.count('<script type="application/json"') == 1
    assert "://" not in page and " src=" not in page.replace(' src="thumbs/', "")
    assert "default-src 'none'" in page
    at = [page.index(f'<img src="{r["thumbnail"]}"') for r in rows]
    assert at == sorted(at)  # the page's order is the CSV's
    assert ODD_CLASS not in page and "vertical &lt;b&gt;&amp;&quot;co&quot;" in page
    assert 'vertical \\u003cb\\u003e\\u0026\\"co\\"' in page  # in the JSON block
    for row, scored in zip(rows, ranked, strict=False):  # a figure that orders ties of suspicion
        assert f"#{row['rank']} <small>of {len(ranked)}" in page
        assert f"loss <b>{scored['loss_score']:.3f}</b>" in page
    assert not list(tmp_path.glob(".*"))  # the staging folder was renamed into place


def test_a_started_review_is_never_replaced(trained, capsys):
    run = trained["run"]
    assert run_cli(capsys, "review", str(run), QUIET)[0] == 0
    csv_path = run / "review" / "review.csv"
    rows = read_csv(csv_path)
    assert len(rows) == review_size(34) == 3  # the default: a tenth of the train set
    assert review_size(20_000) == 500 and review_size(50, fraction=0.5) == 25
    assert run_cli(capsys, "review", str(run), "--top", "4", QUIET)[0] == 0  # unstarted
    rows = read_csv(csv_path)
    rows[2]["corrected_label"] = "drop"
    before = write_csv(csv_path, rows).read_bytes()

    code, err = run_cli(capsys, "review", str(run), "--top", "5", QUIET)
    assert code == 2 and str(csv_path) in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert csv_path.read_bytes() == before

    assert run_cli(capsys, "review", str(run), "--top=5", "--overwrite", QUIET)[0] == 0
    assert [r["corrected_label"] for r in read_csv(csv_path)] == [""] * 5

    work = run / "review" / "review.xlsx"  # the clinician saved their work beside it
    work.write_bytes(b"their corrections")
    code, err = run_cli(capsys, "review", str(run), "--top", "4", QUIET)
    assert code == 2 and "review.xlsx" in err and work.read_bytes() == b"their corrections"
    work.unlink()

    (run / "notes").mkdir()
    (run / "notes" / "mine.txt").write_text("not a review")
    code, err = run_cli(capsys, "review", str(run), "--out", str(run / "notes"), "--overwrite")
    assert code == 2 and "not a review folder" in err
    assert (run / "notes" / "mine.txt").read_text() == "not a review"


@pytest.fixture(scope="module")
def filled(trained, tmp_path_factory) -> dict:
    """A review of the top 8 with one label changed (by name), one dropped, one confirmed (the
    given class written back) and the rest empty, plus a val sample changed by class index."""
    folder = tmp_path_factory.mktemp("filled")
    main(["review", str(trained["run"]), "--top", "8", "--out", str(folder), QUIET])
    classes = trained["classes"]["classes"]
    rows = read_csv(folder / "review.csv")
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    rows[0]["corrected_label"] = other[rows[0]["given_label"]]
    rows[1]["corrected_label"] = "drop"
    rows[2]["corrected_label"] = rows[2]["given_label"]
    manifest = pq.read_table(trained["data"] / "manifest.parquet").to_pylist()
    val = next(r for r in manifest if r["split"] == "val")
    rows.append(
        {
            **dict.fromkeys(rows[0], ""),
            "key": val["key"],
            "corrected_label": str(1 - val["noisy_label"]),
        }
    )
    changes = {
        rows[0]["key"]: ("train", rows[0]["given_label"], rows[0]["corrected_label"]),
        rows[1]["key"]: ("train", rows[1]["given_label"], "drop"),
        val["key"]: ("val", classes[val["noisy_label"]], classes[1 - val["noisy_label"]]),
    }
    return {"csv": write_csv(folder / "review.csv", rows), "changes": changes}


def test_relabel_writes_a_new_version_with_exactly_the_reviewed_changes(
    trained, filled, tmp_path, capsys
):
    data, classes = trained["data"], trained["classes"]["classes"]
    original_files = file_digests(data)
    new = tmp_path / "new"
    code, _ = run_cli(capsys, "relabel", str(data), str(filled["csv"]), f"--out={new}", QUIET)
    assert code == 0
    assert file_digests(data) == original_files

    changes = filled["changes"]
    dropped = {k for k, (_, _, new_label) in changes.items() if new_label == "drop"}
    relabelled = {k: classes.index(v[2]) for k, v in changes.items() if k not in dropped}
    old_samples, new_samples = shard_samples(data), shard_samples(new)
    assert set(new_samples) == set(old_samples) - dropped
    for key, sample in new_samples.items():
        old = old_samples[key]
        old_record, record = (
            json.loads(old["members"]["json"]),
            json.loads(sample["members"]["json"]),
        )
        label = relabelled.get(key, old_record["noisy_label"])
        assert int(sample["members"]["cls"]) == record["noisy_label"] == label
        assert record == {**old_record, "noisy_label": label}  # clean label and the rest kept
        assert sample["members"]["png"] == old["members"]["png"]

    old_manifest = pq.read_table(data / "manifest.parquet").to_pylist()
    manifest = pq.read_table(new / "manifest.parquet").to_pylist()
    expected = [
        {
            **row,
            "noisy_label": relabelled.get(row["key"], row["noisy_label"]),
            "is_noisy": row["clean_label"] != relabelled.get(row["key"], row["noisy_label"]),
            "original_label": row["noisy_label"],
        }
        for row in old_manifest
        if row["key"] not in dropped
    ]
    assert manifest == expected  # patient_id and every other column kept

    meta, old_meta = (json.loads((d / "dataset.json").read_text()) for d in (new, data))
    changed_shards = {old_samples[k]["shard"] for k in changes}
    for name, info in meta["shards"].items():
        with tarfile.open(new / name) as tar:
            assert info["count"] == len(tar.getnames()) // 3
        assert info["bytes"] == (new / name).stat().st_size and info["sha256"] == sha256(new / name)
        linked = os.stat(new / name).st_ino == os.stat(data / name).st_ino
        assert linked == (name not in changed_shards)
    for split, stats in meta["splits"].items():
        rows = [r for r in manifest if r["split"] == split]
        clean = np.array([r["clean_label"] for r in rows])
        noisy = np.array([r["noisy_label"] for r in rows])
        in_shards = [i["count"] for i in meta["shards"].values() if i["split"] == split]
        assert stats["count"] == len(rows) == sum(in_shards)
        assert stats["per_class_noisy"] == np.bincount(noisy, minlength=2).tolist()
        assert stats["noise_rate"] == pytest.approx((clean != noisy).mean())
        assert np.allclose(
            stats["transition_matrix"], transition_matrix(clean, noisy, 2), atol=1e-6
        )
    assert meta["relabel"]["changed"] == 2 and meta["relabel"]["dropped"] == 1
    assert meta["relabel"]["review_sha256"] == sha256(filled["csv"])
    assert meta["request"] != old_meta["request"] and meta["noise"] == old_meta["noise"]

    audit = {r["key"]: (r["split"], r["old"], r["new"]) for r in read_csv(new / "relabel.csv")}
    assert audit == changes

    from dtrain.dataset.loader import make_loader, split_urls

    labels = {r["key"]: r["noisy_label"] for r in manifest}
    for split in ("train", "val", "test"):
        loader = make_loader(split_urls(new, split), train=False, batch_size=8, image_size=32)
        seen = {}
        for batch in loader:
            for key, label, valid in zip(batch["key"], batch["label"], batch["valid"], strict=True):
                if valid:
                    seen[key] = int(label)
        assert seen == {r["key"]: labels[r["key"]] for r in manifest if r["split"] == split}

    # the same request again does nothing; `dtrain prepare` never takes NEW for the original
    assert run_cli(capsys, "relabel", str(data), str(filled["csv"]), "--out", str(new))[0] == 0
    request = ["--noise=symmetric", "--noise-rate=0.2", "--shard-size=8"]
    code, err = run_cli(capsys, "prepare", str(data.parent / "img"), f"--out={new}", *request)
    assert code == 2 and "relabel" in err

    # relabelling the val sample back reproduces the original shard byte for byte
    val_key = next(k for k, v in changes.items() if v[0] == "val")
    back = write_csv(
        tmp_path / "back.csv", [{"key": val_key, "corrected_label": changes[val_key][1]}]
    )
    relabel(new, back, tmp_path / "back", progress=False)
    val_shard = old_samples[val_key]["shard"]
    assert sha256(tmp_path / "back" / val_shard) == sha256(data / val_shard)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"corrected_label": "diagonal"},
            r"line 3 \(key KEY\): corrected_label 'diagonal' is not a class; write one of "
            r"horizontal, vertical <b>&\"co\"",
        ),
        ({"key": "s9999999", "corrected_label": ""}, r"line 3: key 's9999999' is not in the"),
        ({"corrected_label": "7"}, r"line 3 .*'7' is not a class"),
    ],
)
def test_relabel_refuses_a_bad_row_naming_it(trained, tmp_path, row, message):
    keys = pq.read_table(trained["data"] / "manifest.parquet").column("key").to_pylist()
    rows = [{"key": keys[0], "corrected_label": "drop"}, {"key": keys[1], **row}]
    review = write_csv(tmp_path / "review.csv", rows)
    with pytest.raises(DataError, match=message.replace("KEY", keys[1])):
        relabel(trained["data"], review, tmp_path / "new", progress=False)
    assert not list(tmp_path.glob("*new*")) and not list(tmp_path.glob(".*"))


def test_relabel_names_a_missing_column_in_one_line(trained, tmp_path, capsys):
    review = tmp_path / "review.csv"
    review.write_text("key,label\ns0000001,horizontal\n")
    code, err = run_cli(
        capsys, "relabel", str(trained["data"]), str(review), "--out", str(tmp_path / "new")
    )
    assert code == 2 and "no 'corrected_label' column (its columns: key, label)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    inside = trained["data"] / "v2"
    code, err = run_cli(capsys, "relabel", str(trained["data"]), str(review), "--out", str(inside))
    assert code == 2 and "is inside the dataset" in err and not inside.exists()


def test_relabel_reads_a_spreadsheet_export_with_bom_and_semicolons(trained, tmp_path):
    keys = pq.read_table(trained["data"] / "manifest.parquet").column("key").to_pylist()
    review = tmp_path / "review.csv"
    review.write_bytes(f"\ufeffkey;rank;corrected_label\n{keys[0]};1;drop\n".encode())
    new = relabel(trained["data"], review, tmp_path / "new", progress=False)
    assert read_csv(new / "relabel.csv")[0]["key"] == keys[0]


def test_relabel_refuses_to_empty_a_split(trained, tmp_path):
    manifest = pq.read_table(trained["data"] / "manifest.parquet").to_pylist()
    rows = [{"key": r["key"], "corrected_label": "drop"} for r in manifest if r["split"] == "val"]
    review = write_csv(tmp_path / "review.csv", rows)
    with pytest.raises(DataError, match=f"{review} drops every val sample"):
        relabel(trained["data"], review, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_relabel_refuses_a_shard_that_changed_since_it_was_written(trained, tmp_path):
    data = copy_dataset(trained["data"], tmp_path / "data")
    row = pq.read_table(data / "manifest.parquet").to_pylist()[0]
    shard = data / row["shard"]
    damaged = bytearray(shard.read_bytes())
    damaged[-2000] ^= 0xFF  # inside the last member's payload or padding: still a valid tar
    shard.write_bytes(bytes(damaged))
    review = write_csv(tmp_path / "review.csv", [{"key": row["key"], "corrected_label": "drop"}])
    with pytest.raises(DataError, match=f"shard {shard} has sha256"):
        relabel(data, review, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    """Headless Debian Chromium driven through its own WebDriver (no driver download); skips,
    saying why, where either or selenium is missing (.ci/install-browser installs them)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("no chromium and chromedriver on PATH: run .ci/install-browser (as root)")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,900"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield driver
    driver.quit()


@pytest.fixture
def served(tmp_path) -> Iterator[Callable[[Path], str]]:
    """`tmp_path` served on a free localhost port, as docs/own-data.md tells reviewers to
    (`python -m http.server`): Chromium keeps a file:// page's localStorage unreliably (a
    probe that reloads a file:// page lost its count in 57 of 60 loads, over http in none)."""
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    yield lambda folder: base + folder.relative_to(tmp_path).as_posix() + "/index.html"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def open_page(driver, url: str) -> None:
    """Load a review's page and wait until its script has restored the saved work."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'")
    )


def press(driver, keys: str) -> None:
    """Type `keys` into the page as the reviewer would."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def page_state(driver) -> dict:
    """What the reviewer sees: the progress line, each card's decision and state text, which
    card is highlighted, and whether the zoom is open."""
    return driver.execute_script(
        """const cards = Array.from(document.querySelectorAll('#cards > .card'));
        const kind = (c) => ['keep', 'relabel', 'drop'].find((k) => c.classList.contains(k));
        return {progress: document.getElementById('progress').textContent,
                kinds: cards.map((c) => kind(c) || ''),
                states: cards.map((c) => c.querySelector('.state').textContent),
                current: cards.findIndex((c) => c.classList.contains('current')),
                zoomed: !document.getElementById('zoom').hidden};"""
    )


def click_action(driver, card: int, label: str) -> None:
    """Click the button of card `card` whose text starts with `label`."""
    from selenium.webdriver.common.by import By

    cards = driver.find_elements(By.CSS_SELECTOR, "#cards > .card")
    button = next(
        b
        for b in cards[card].find_elements(By.CSS_SELECTOR, ".actions button")
        if b.text.startswith(label)
    )
    button.click()


def export(driver, folder: Path) -> Path:
    """Click Export and return the review.csv the browser downloaded into `folder`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder.mkdir()
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)}
    )
    driver.find_element(By.ID, "export").click()
    done = folder / "review.csv"
    WebDriverWait(driver, 10).until(lambda _: done.is_file() and len(list(folder.iterdir())) == 1)
    return done


def test_a_clinician_works_through_the_page_in_a_browser(
    trained, browser, served, tmp_path, capsys
):
    """Keys and clicks decide, progress counts, zoom enlarges, a reload keeps the work, another
    review starts empty, and the exported CSV makes `dtrain relabel` change exactly the labels
    decided on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    data, run, classes = trained["data"], trained["run"], trained["classes"]["classes"]
    out = tmp_path / "review"
    assert run_cli(capsys, "review", str(run), "--top=8", f"--out={out}", QUIET)[0] == 0
    rows = read_csv(out / "review.csv")
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    open_page(browser, served(out))
    state = page_state(browser)
    assert state["progress"] == "0 of 8 reviewed" and state["current"] == 0
    first = browser.find_element(By.CSS_SELECTOR, "#cards > .card img")
    assert browser.execute_script("return arguments[0].naturalWidth", first) == 128

    press(browser, str(classes.index(other[rows[0]["given_label"]]) + 1))  # relabel by key
    assert page_state(browser)["progress"] == "1 of 8 reviewed"
    press(browser, "d")
    press(browser, "k")
    state = page_state(browser)
    assert state["progress"] == "3 of 8 reviewed" and state["current"] == 3
    assert state["kinds"][:4] == ["relabel", "drop", "keep", ""]
    assert state["states"][0] == f"Relabelled to {other[rows[0]['given_label']]}"
    press(browser, Keys.ARROW_UP + "u")  # undo the keep, then keep again
    assert page_state(browser)["progress"] == "2 of 8 reviewed"
    press(browser, "k")
    click_action(browser, 3, "Relabel to")  # a second click on a decision undoes it
    assert page_state(browser)["kinds"][3] == "relabel"
    click_action(browser, 3, "Relabel to")
    click_action(browser, 4, "Relabel to")
    state = page_state(browser)
    assert state["progress"] == "4 of 8 reviewed" and state["current"] == 5
    assert state["kinds"] == ["relabel", "drop", "keep", "", "relabel", "", "", ""]
    assert not browser.find_elements(By.CSS_SELECTOR, ".actions b")  # class names stay text

    press(browser, "z")
    zoom = browser.find_element(By.ID, "zoom-img")
    assert page_state(browser)["zoomed"] and zoom.get_attribute("alt") == rows[5]["key"]
    assert browser.execute_script("return arguments[0].naturalWidth", zoom) == 32
    fitted = zoom.size["width"]
    assert fitted >= 600  # the 32 px image fills the screen
    press(browser, "++")
    assert browser.find_element(By.ID, "zoom-level").text == "156%"
    assert zoom.size["width"] == pytest.approx(fitted * 1.5625, abs=2)
    press(browser, Keys.ESCAPE)
    assert not page_state(browser)["zoomed"]

    browser.refresh()
    open_page(browser, served(out))
    state = page_state(browser)
    assert state["progress"] == "4 of 8 reviewed" and state["current"] == 3  # first one left
    assert state["kinds"] == ["relabel", "drop", "keep", "", "relabel", "", "", ""]

    other_review = tmp_path / "other"  # same run and same first keys, another review
    assert run_cli(capsys, "review", str(run), "--top=5", f"--out={other_review}", QUIET)[0] == 0
    open_page(browser, served(other_review))
    assert page_state(browser)["progress"] == "0 of 5 reviewed"

    open_page(browser, served(out))
    exported = read_csv(export(browser, tmp_path / "downloads"))
    decided = {
        rows[0]["key"]: other[rows[0]["given_label"]],
        rows[1]["key"]: "drop",
        rows[2]["key"]: rows[2]["given_label"],
        rows[4]["key"]: other[rows[4]["given_label"]],
    }
    assert exported == [{**r, "corrected_label": decided.get(r["key"], "")} for r in rows]
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]

    new = tmp_path / "new"
    csv_path = tmp_path / "downloads" / "review.csv"
    assert run_cli(capsys, "relabel", str(data), str(csv_path), f"--out={new}", QUIET)[0] == 0
    audit = {r["key"]: (r["old"], r["new"]) for r in read_csv(new / "relabel.csv")}
    assert audit == {
        r["key"]: (r["given_label"], decided[r["key"]]) for r in (rows[0], rows[1], rows[4])
    }
    before = {
        r["key"]: r["noisy_label"] for r in pq.read_table(data / "manifest.parquet").to_pylist()
    }
    after = {
        r["key"]: r["noisy_label"] for r in pq.read_table(new / "manifest.parquet").to_pylist()
    }
    changed = {k: classes[v] for k, v in after.items() if v != before[k]}
    assert changed == {k: v for k, v in decided.items() if k in (rows[0]["key"], rows[4]["key"])}
    assert set(before) - set(after) == {rows[1]["key"]}


def test_the_page_shows_hostile_text_as_text(trained, browser, served, tmp_path, capsys):
    """A source path made to break out of the HTML, the JSON block or the CSV is shown and
    exported as the plain text it is, and runs nothing: an export with no decisions is the
    review.csv `dtrain review` wrote, byte for byte."""
    from selenium.webdriver.common.by import By

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    hostile = (
        '</script><script>document.title="pwned"</script>'
        '<img src=x onerror="document.title=\'pwned\'">, "quoted",\nnext line &amp;'
    )
    scores = pq.read_table(run / "label_scores.parquet").to_pylist()
    first = min(scores, key=lambda r: r["rank"])
    first["source"] = hostile
    pq.write_table(pa.Table.from_pylist(scores), run / "label_scores.parquet")
    out = tmp_path / "review"
    assert run_cli(capsys, "review", str(run), "--top=3", f"--out={out}", QUIET)[0] == 0
    open_page(browser, served(out))
    assert browser.title.startswith("Label review")
    path = browser.find_element(By.CSS_SELECTOR, "#cards > .card .path")
    assert browser.execute_script("return arguments[0].textContent", path) == (
        f"{first['key']} · {hostile}"
    )
    exported = export(browser, tmp_path / "downloads")
    assert exported.read_bytes() == (out / "review.csv").read_bytes()


def python_heap_peak(work) -> int:
    """The most the Python heap grew (tracemalloc) while `work()` ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


LARGE = 100_000  # rows added to a manifest or a ranking to stand for a large dataset


def test_review_reads_only_the_reviewed_rows_into_python(trained, tmp_path):
    """A run of a million samples ranks a million: `dtrain review --top 5` must not make a
    Python dict of each (about a kilobyte apiece), only of the five it shows."""
    from dtrain.runs.review_work import write_review

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    scores = pq.read_table(run / "label_scores.parquet")
    filler = [f"z{i:07d}" for i in range(LARGE)]  # ranked after every real sample
    extra = {name: pa.repeat(scores.column(name)[0], LARGE) for name in scores.column_names}
    extra |= {"key": filler, "source": filler, "rank": np.arange(LARGE) + scores.num_rows + 1}
    extra = pa.table(extra, scores.schema)
    pq.write_table(pa.concat_tables([extra, scores]), run / "label_scores.parquet")

    out = tmp_path / "review"
    peak = python_heap_peak(lambda: write_review(run, out, top=5, progress=False))
    rows = read_csv(out / "review.csv")
    best = sorted(scores.to_pylist(), key=lambda r: r["rank"])[:5]
    assert [r["key"] for r in rows] == [r["key"] for r in best]
    assert f"of {LARGE + scores.num_rows} by suspicion" in (out / "index.html").read_text()
    assert peak / LARGE < 100, f"{peak / LARGE:.0f} bytes of Python heap per ranked sample"


def test_relabel_of_a_few_rows_holds_no_python_row_per_manifest_row(
    trained, filled, tmp_path, monkeypatch
):
    """A few corrections to a large dataset cost the manifest's columns, not a Python dict per
    row, nor a directory sync per hard-linked shard: the manifest grows by LARGE train rows (in
    an untouched shard), the relabelled version holds exactly the old rows with the review's
    changes."""
    data = copy_dataset(trained["data"], tmp_path / "data")
    manifest = pq.read_table(data / "manifest.parquet")
    meta = json.loads((data / "dataset.json").read_text())
    changed_shards = {r["shard"] for r in manifest.to_pylist() if r["key"] in filled["changes"]}
    untouched = next(n for n, i in meta["shards"].items() if n not in changed_shards)
    filler = {name: np.zeros(LARGE, np.int64) for name in ("clean_label", "noisy_label", "group")}
    filler |= {
        "key": [f"z{i:07d}" for i in range(LARGE)],
        "shard": [untouched] * LARGE,
        "split": ["train"] * LARGE,
        "is_noisy": np.zeros(LARGE, bool),
        "source": [""] * LARGE,
        "patient_id": [""] * LARGE,
    }
    large = pa.concat_tables(
        [manifest, pa.table({n: filler[n] for n in manifest.column_names}, manifest.schema)]
    )
    pq.write_table(large, data / "manifest.parquet")

    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    new = tmp_path / "new"
    peak = python_heap_peak(lambda: relabel(data, filled["csv"], new, progress=False))
    assert len(synced) < len(meta["shards"]) - len(changed_shards)
    written = pq.read_table(new / "manifest.parquet")
    assert written.num_rows == large.num_rows - 1  # the one dropped row
    assert written.slice(written.num_rows - LARGE).column("noisy_label").to_pylist() == [0] * LARGE
    audit = {r["key"]: (r["split"], r["old"], r["new"]) for r in read_csv(new / "relabel.csv")}
    assert audit == filled["changes"]
    assert peak / LARGE < 100, f"{peak / LARGE:.0f} bytes of Python heap per manifest row"
