"""`search` end to end on the awkward photo folder, then the page rendered in headless Chromium.

Set GUIE_UPDATE_SCREENSHOT=1 to also copy the screenshot to docs/retrieval-screenshot.png
(the README's picture); by default the test writes nothing outside its temporary folder.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from guie_cli.main import main

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The injected check: after the load event, count <img> that did not decode.
BROKEN_IMAGE_PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter(img => !(img.complete && img.naturalWidth > 0));
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-broken', String(broken.length));
});
</script>"""


def run_cli(argv: list[str]) -> int:
    """`submit.py ARGV` as the command line runs it, errors printed by guie_cli.main."""
    return main(argv)


@pytest.fixture(scope="module")
def searched(photo_folder, model_path, load_photo, tmp_path_factory):
    """One search run: a query folder (a crop, a mirrored photo, a corrupt file) on the index."""
    root, _ = photo_folder
    base = tmp_path_factory.mktemp("search")
    queries = base / "queries"
    queries.mkdir()
    load_photo("chelsea").crop((50, 20, 350, 280)).save(queries / "chelsea_crop.jpg")
    load_photo("rocket").transpose(0).save(queries / "rocket_mirrored.png")
    load_photo("coffee").save(queries / "コーヒー.webp")
    (queries / "empty.png").write_bytes(b"")
    out = base / "out"
    argv = ["search", "--model", str(model_path), "--index", str(root), "--query", str(queries),
            "--out", str(out), "--k", "5"]
    status = run_cli(argv)
    # Later tests search again into `out`; keep this run's page for the browser test.
    shutil.copyfile(out / "report.html", base / "first_report.html")
    return argv, out, status


def test_search_writes_the_report(searched, capsys):
    _, out, status = searched
    assert status == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    for name in ("chelsea_crop.jpg", "rocket_mirrored.png", "コーヒー.webp"):
        assert name in page
    for skipped in ("broken/not_an_image.jpg", "broken/truncated.jpg", "broken/bomb.png",
                    "empty.png"):
        assert skipped in page
    assert "café_東京.jpg" in page and "leave-one-out mP@5 = " in page
    assert "tiny" in page  # the single-image class is listed
    assert all(src.startswith("data:image/jpeg;base64,")
               for src in re.findall(r"<img src='([^']*)'", page))
    with open(out / "neighbours.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 5
    top = {r["query"]: r["neighbour"] for r in rows if r["rank"] == "1"}
    assert top["chelsea_crop.jpg"].startswith("chelsea/")
    assert top["コーヒー.webp"].startswith("coffee/")
    assert (out / "contact_sheet.png").stat().st_size > 10_000


def test_second_run_reuses_the_index_and_query_inside_index_skips_itself(
        searched, photo_folder, capsys):
    argv, out, _ = searched
    root, files = photo_folder
    capsys.readouterr()
    query = files["non_ascii"]
    argv = argv[:argv.index("--query") + 1] + [str(query)] + argv[argv.index("--query") + 2:]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"index .*: 17 images, 3 skipped \(0 embedded, 20 reused", printed)
    assert re.search(r"queries .*: 1 images, 0 skipped \(0 embedded, 1 reused", printed)
    with open(out / "neighbours.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["query"] for r in rows] == ["coffee/café_東京.jpg"] * 5
    assert "coffee/café_東京.jpg" not in {r["neighbour"] for r in rows}
    assert rows[0]["neighbour"] in {"coffee/coffee.png", "coffee/coffee_exif6.jpg"}


def test_bad_arguments_are_reported(tmp_path, model_path, capsys):
    status = run_cli(["search", "--model", str(tmp_path / "none.pt"), "--index", str(tmp_path),
                      "--query", str(tmp_path), "--out", str(tmp_path / "o")])
    assert status == 2
    missing = tmp_path / "none.pt"
    assert capsys.readouterr().err == f"error: search: --model {missing} does not exist\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image\n")
    status = run_cli(["search", "--model", str(model_path), "--index", str(empty),
                      "--query", str(empty), "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert status == 2 and last.startswith(f"error: search: no image in {empty} could be embedded")
    assert "e.g. notes.txt: not an image" in last


def _chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_page_renders_in_chromium_without_broken_images(searched, tmp_path):
    _, out, _ = searched
    binary = _chromium()
    report = out.parent / "first_report.html"
    page = report.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", BROKEN_IMAGE_PROBE + "</body>"), encoding="utf-8")
    dom = _run_chromium(binary, tmp_path / "profile1", "--dump-dom", probe.as_uri())
    found = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-broken="(\d+)"', dom.stdout)
    assert found, f"probe did not run; chromium said: {dom.stderr[-2000:]}"
    images, broken = map(int, found.groups())
    assert images == page.count("<img ") and images > 20
    assert broken == 0

    screenshot = tmp_path / "retrieval-screenshot.png"
    shot = _run_chromium(binary, tmp_path / "profile2", "--hide-scrollbars",
                         "--window-size=1280,1500", f"--screenshot={screenshot}",
                         report.as_uri())
    assert screenshot.exists() and screenshot.stat().st_size > 50_000, shot.stderr[-2000:]
    if os.environ.get("GUIE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, REPO / "docs" / "retrieval-screenshot.png")


def test_csv_labels_and_a_bad_csv(tmp_path, model_path, load_photo, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("coffee", "rocket"):
        load_photo(name).save(flat / f"{name}.png")
        load_photo(name).resize((120, 80)).save(flat / f"{name}_small.jpg")
    labels = flat / "labels.csv"  # inside the index folder: not indexed, not "skipped"
    labels.write_text("path,label\ncoffee.png,cup\ncoffee_small.jpg,cup\n"
                      "rocket.png,launch\nrocket_small.jpg,launch\n")
    argv = ["search", "--model", str(model_path), "--index", str(flat), "--query",
            str(flat / "rocket.png"), "--out", str(tmp_path / "out"), "--labels", str(labels),
            "--batch-size", "2", "--max-side", "100"]
    assert run_cli(argv) == 0
    assert "leave-one-out mP@5 = 1.0000 over 4 labelled queries" in capsys.readouterr().out
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Skipped files (0)" in page and "class='match ok'" in page

    labels.write_text("coffee.png\n")
    assert run_cli(argv) == 2
    assert capsys.readouterr().err.startswith("error: search: bad --labels file")
