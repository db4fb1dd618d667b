"""Labels, leave-one-out mP@5 (worked by hand) and the HTML page / contact sheet."""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from guie.retrieval.labels import labels_from_csv, labels_from_folders, leave_one_out
from guie.retrieval.report import (_LINE_PX, THUMB_SIDE, Match, QueryResult, SheetFont,
                                   SkippedFile, Thumbnails, _charmap, _fallback_font_paths,
                                   contact_sheet, write_report)


def line_embeddings(positions: dict[str, float]) -> tuple[torch.Tensor, list[str]]:
    paths = list(positions)
    return torch.tensor([[positions[p], 0.0] for p in paths]), paths


def test_leave_one_out_by_hand():
    # Points on a line. Classes: A = {a1, a2, a3}, B = {b1, b2}, C = {c1} (single image).
    emb, paths = line_embeddings({"a1": 0.0, "a2": 1.5, "c1": 3.2, "a3": 10.0, "b1": 11.3,
                                  "b2": 20.0})
    labels = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "c1": "C"}
    result = leave_one_out(emb, paths, labels, k=5)
    # A queries have 2 relevant images -> only the first 2 neighbours count; B queries have 1.
    # a1: a2, c1 -> 1/2     a2: a1, c1 -> 1/2     a3: b1, c1 -> 0
    # b1: a3 -> 0           b2: b1 -> 1           c1: not a query (its class has one image)
    by_path = {q.path: q for q in result.queries}
    assert {p: q.precision for p, q in by_path.items()} == {
        "a1": 0.5, "a2": 0.5, "a3": 0.0, "b1": 0.0, "b2": 1.0}
    assert result.map_at_k == pytest.approx(2.0 / 5)
    assert result.per_class == {"A": (pytest.approx(1 / 3), 3), "B": (0.5, 2)}
    assert result.single_image_classes == ["C"]
    assert [q.path for q in result.queries[:2]] == ["a3", "b1"]  # worst first
    assert by_path["a1"].neighbours == ["a2", "c1", "a3", "b1", "b2"]
    assert by_path["a1"].distances == pytest.approx([1.5, 3.2, 10.0, 11.3, 20.0], abs=1e-4)


def test_leave_one_out_counts_unlabelled_and_missing():
    emb, paths = line_embeddings({"x": 0.0, "y": 1.0, "z": 2.0})
    result = leave_one_out(emb, paths, {"x": "A", "z": "B", "gone.jpg": "A"}, k=5)
    assert result.map_at_k is None and result.queries == []
    assert result.single_image_classes == ["A", "B"]
    assert result.unlabelled == 1 and result.labels_not_indexed == ["gone.jpg"]


def test_labels_from_folders():
    assert labels_from_folders(["cats/a.jpg", "dogs/b.jpg", "dogs/deep/c.png"]) == {
        "cats/a.jpg": "cats", "dogs/b.jpg": "dogs", "dogs/deep/c.png": "dogs"}
    assert labels_from_folders(["cats/a.jpg", "top.jpg"]) is None  # an image outside classes
    assert labels_from_folders(["cats/a.jpg", "cats/b.jpg"]) is None  # one folder: no classes


def test_labels_from_csv(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label\na.jpg,cat\n{root / 'sub' / 'b.jpg'},dog\n\nc é.jpg,cat\n",
                        encoding="utf-8")
    assert labels_from_csv(csv_path, root) == {"a.jpg": "cat", "sub/b.jpg": "dog",
                                               "c é.jpg": "cat"}
    csv_path.write_text("a.jpg,cat\na.jpg,dog\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: a.jpg labelled both"):
        labels_from_csv(csv_path, root)
    csv_path.write_text("a.jpg\n")
    with pytest.raises(ValueError, match=r"labels.csv:1: expected 'path,label'"):
        labels_from_csv(csv_path, root)


def test_page_is_self_contained_and_escaped(tmp_path, load_photo):
    folder = tmp_path / "imgs"
    folder.mkdir()
    odd = folder / "<b>&'odd' é.png"
    load_photo("coffee").save(odd)
    load_photo("rocket").save(folder / "rocket.jpg")
    results = [QueryResult(odd.name, odd, (600, 400), [
        Match("rocket.jpg", folder / "rocket.jpg", 0.25, True),
        Match("deleted.jpg", folder / "deleted.jpg", 0.5, False)])]  # gone since indexing
    emb, paths = line_embeddings({"a": 0.0, "b": 0.3, "c": 0.5, "d": 3.0})
    loo = leave_one_out(emb, paths, {"a": "x", "b": "x", "c": "y", "d": "y"}, k=5)
    html_path, sheet_path = write_report(
        tmp_path / "out", results, [SkippedFile("index", "broken/x.jpg", "not an image")],
        ["model m.pt"], loo, index_root=folder)
    page = html_path.read_text(encoding="utf-8")
    sources = re.findall(r"<img src='([^']*)'", page)
    # The query row (3) + the two queries with P@5 < 1 (b, c) with 3 neighbours each.
    assert len(sources) == 3 + 2 * 4
    assert all(src.startswith("data:image/jpeg;base64,") for src in sources)
    assert "&lt;b&gt;&amp;&#x27;odd&#x27; é.png" in page and "<b>&'odd'" not in page
    assert "d = 0.2500" in page and "broken/x.jpg" in page and "not an image" in page
    assert "mP@5 = <b>0.5000</b>" in page and "single indexed image" in page
    assert "Worst queries (2 of the 2 with P@5 &lt; 1)" in page
    assert "class='match ok'" in page and "class='match bad'" in page
    with Image.open(sheet_path) as sheet:
        assert sheet.format == "PNG" and sheet.size == (3 * 168, 198)


def test_page_without_results_or_labels(tmp_path):
    html_path, sheet_path = write_report(tmp_path, [], [], ["nothing"], None)
    page = html_path.read_text(encoding="utf-8")
    assert "No query image could be embedded" in page and "The index has no labels" in page
    assert sheet_path.exists()


NO_FONT_HAS_IT = "\U0010fffd"  # a private-use code point: every font draws its missing-glyph box


def name_row(name: str, photo_file) -> np.ndarray:
    """The pixels of the file-name line under a query on a one-cell contact sheet."""
    sheet = contact_sheet([QueryResult(name, photo_file, (1, 1), [])], Thumbnails())
    top = THUMB_SIDE + 8 + _LINE_PX
    return np.asarray(sheet)[top:top + _LINE_PX + 4]


def test_contact_sheet_draws_non_ascii_names_with_their_glyphs(tmp_path, load_photo):
    photo_file = tmp_path / "chat.png"
    load_photo("chelsea").save(photo_file)
    accented, boxed = name_row("chat_é.png", photo_file), name_row(f"chat_{NO_FONT_HAS_IT}.png",
                                                                   photo_file)
    # Same text up to one character: the rows differ only if é is drawn as itself, not as the
    # box a font without it draws (PIL's default font, used before, made both rows the same).
    assert (accented != boxed).any()
    assert (accented < 128).any() and (name_row("chat_e.png", photo_file) != accented).any()
    font = SheetFont(11)
    for char in "chat_é.png":
        assert ord(char) in _charmap(font.font_for(char).path)


def glyph(font: SheetFont, text: str) -> np.ndarray:
    image = Image.new("L", (40, 20), 255)
    font.draw(ImageDraw.Draw(image), (2, 2), text)
    return np.asarray(image)


def test_a_character_dejavu_lacks_comes_from_another_installed_font():
    font = SheetFont(11)
    primary = _charmap(font.primary.path)
    # matplotlib ships STIX beside DejaVu: letters and symbols DejaVu Sans does not have.
    char = next(chr(c) for path in _fallback_font_paths() for c in sorted(_charmap(path) - primary)
                if unicodedata.category(chr(c))[0] in "LS")
    chosen = font.font_for(char)
    assert chosen is not font.primary and ord(char) in _charmap(chosen.path)
    assert (glyph(font, char) != glyph(font, NO_FONT_HAS_IT)).any()
    assert font.font_for(NO_FONT_HAS_IT) is font.primary  # nothing has it: the box, not a crash


def test_long_names_are_cut_to_the_cell_from_the_front():
    font = SheetFont(11)
    name = "a_really_long_folder_name/with_a_very_long_file_name_é_東京.jpg"
    cut = font.fit(name, 160)
    assert cut.startswith("…") and name.endswith(cut[1:]) and font.width_px(cut) <= 160
    assert font.fit("short.png", 160) == "short.png"
