"""The retrieval report: one self-contained HTML page and a PNG contact sheet.

The page embeds every thumbnail as a base64 JPEG data URI, so it can be mailed or attached to a
Kaggle dataset and still show everything. It lists each query with its top-k neighbours (file
name, distance, and green/red where labels say right/wrong), the leave-one-out mP@k section when
the index has labels, and every skipped file with its reason. The contact sheet writes file
names in DejaVu Sans (shipped with matplotlib), falling back per character to any installed font
that has the glyph, so `chat_é.png` is not drawn as `chat_□.png`.
"""
from __future__ import annotations

import base64
import functools
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from guie.retrieval.images import SkippedImage, load_image
from guie.retrieval.labels import LeaveOneOut

THUMB_SIDE = 160  # pixels, longest side
THUMB_MIN_SIDE = 48  # smaller images (down to 1 x 1) are enlarged, pixelated, to stay visible
WORST_QUERIES = 10
SHEET_MAX_ROWS = 50  # queries drawn on the contact sheet (the page shows all)
_SHEET_TEXT_PX = 30
_SHEET_FONT_PX = 11
_LINE_PX = 12
_COLOURS = {True: "#1a7f37", False: "#cf222e", None: "#8c959f"}


@dataclass(frozen=True)
class Match:
    name: str  # as shown: path relative to the index folder
    file: Path  # where the thumbnail is read from
    distance: float
    correct: bool | None = None  # None where labels cannot say


@dataclass(frozen=True)
class QueryResult:
    name: str
    file: Path
    size: tuple[int, int]  # (width, height) of the original image
    matches: list[Match]


@dataclass(frozen=True)
class SkippedFile:
    where: str  # "index" or "query"
    name: str
    reason: str


class Thumbnails:
    """Thumbnails loaded once per file: PIL images for the sheet, data URIs for the page."""

    def __init__(self, side: int = THUMB_SIDE):
        self.side = side
        self._images: dict[Path, Image.Image] = {}
        self._uris: dict[Path, str] = {}

    def image(self, file: Path) -> Image.Image:
        if file not in self._images:
            try:
                thumb = Image.fromarray(load_image(file, max_side=self.side).pixels)
            except SkippedImage:  # changed or deleted since it was indexed: show a grey tile
                thumb = Image.new("RGB", (self.side, self.side), (200, 200, 200))
            if max(thumb.size) < THUMB_MIN_SIDE:
                scale = THUMB_MIN_SIDE / max(thumb.size)
                thumb = thumb.resize((max(1, round(thumb.width * scale)),
                                      max(1, round(thumb.height * scale))),
                                     Image.Resampling.NEAREST)
            self._images[file] = thumb
        return self._images[file]

    def data_uri(self, file: Path) -> str:
        if file not in self._uris:
            buffer = io.BytesIO()
            self.image(file).save(buffer, format="JPEG", quality=82)
            self._uris[file] = ("data:image/jpeg;base64,"
                                + base64.b64encode(buffer.getvalue()).decode("ascii"))
        return self._uris[file]


def write_report(out_dir: Path | str, results: Sequence[QueryResult],
                 skipped: Sequence[SkippedFile], summary: Sequence[str],
                 leave_one_out: LeaveOneOut | None = None, index_root: Path | None = None,
                 thumbnails: Thumbnails | None = None) -> tuple[Path, Path]:
    """Write report.html and contact_sheet.png into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs = thumbnails or Thumbnails()
    page = _page(results, skipped, summary, leave_one_out, index_root, thumbs)
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8", errors="replace")
    sheet_path = out_dir / "contact_sheet.png"
    contact_sheet(results, thumbs).save(sheet_path)
    return html_path, sheet_path


def _page(results, skipped, summary, loo, index_root, thumbs: Thumbnails) -> str:
    parts = [_HEAD, "<h1>Retrieval report</h1>", "<ul class='summary'>"]
    parts += [f"<li>{_esc(line)}</li>" for line in summary]
    parts.append("</ul><nav><a href='#queries'>Queries</a> · <a href='#labels'>Leave-one-out</a>"
                 f" · <a href='#skipped'>Skipped files ({len(skipped)})</a></nav>")
    parts.append(f"<section id='queries'><h2>Queries ({len(results)})</h2>")
    if not results:
        parts.append("<p>No query image could be embedded.</p>")
    for result in results:
        parts.append(_row(result.name, result.file, f"{result.size[0]} × {result.size[1]}",
                          [(m.name, m.file, m.distance, m.correct) for m in result.matches],
                          thumbs))
    parts.append("</section>")
    parts.append(_leave_one_out_section(loo, index_root, thumbs))
    parts.append(_skipped_section(skipped))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _row(name: str, file: Path, caption: str, matches, thumbs: Thumbnails) -> str:
    cells = [f"<figure class='query'>{_img(file, name, thumbs)}"
             f"<figcaption><b>{_esc(name)}</b><br>{_esc(caption)}</figcaption></figure>"]
    for rank, (match_name, match_file, distance, correct) in enumerate(matches, start=1):
        verdict = {True: " ok", False: " bad", None: ""}[correct]
        cells.append(f"<figure class='match{verdict}'>{_img(match_file, match_name, thumbs)}"
                     f"<figcaption>#{rank} · d = {distance:.4f}<br>{_esc(match_name)}"
                     f"</figcaption></figure>")
    return "<div class='row'>" + "".join(cells) + "</div>"


def _img(file: Path, name: str, thumbs: Thumbnails) -> str:
    return f"<img src='{thumbs.data_uri(file)}' alt='{_esc(name)}' title='{_esc(name)}'>"


def _leave_one_out_section(loo: LeaveOneOut | None, index_root: Path | None,
                           thumbs: Thumbnails) -> str:
    parts = ["<section id='labels'><h2>Leave-one-out on the index</h2>"]
    if loo is None:
        parts.append("<p>The index has no labels (one sub-folder per class, or --labels CSV).</p>")
        return "\n".join(parts + ["</section>"])
    if loo.map_at_k is None:
        parts.append("<p>No class has two indexed images, so there is no query.</p>")
    else:
        parts.append(f"<p class='score'>mP@{loo.k} = <b>{loo.map_at_k:.4f}</b> over "
                     f"{len(loo.queries)} queries (each labelled image against all the others)."
                     "</p>")
    parts.append(f"<p>Classes with a single indexed image (not queries, still in the index): "
                 f"{len(loo.single_image_classes)}"
                 + (f" ({_esc(', '.join(loo.single_image_classes[:20]))}"
                    f"{' …' if len(loo.single_image_classes) > 20 else ''})"
                    if loo.single_image_classes else "")
                 + f". Unlabelled images (distractors): {loo.unlabelled}. Labelled files not "
                   f"in the index: {len(loo.labels_not_indexed)}.</p>")
    if loo.per_class:
        parts.append(f"<table><tr><th>class</th><th>queries</th><th>mP@{loo.k}</th></tr>")
        for label, (score, count) in sorted(loo.per_class.items(), key=lambda kv: kv[1][0]):
            parts.append(f"<tr><td>{_esc(label)}</td><td>{count}</td><td>{score:.4f}</td></tr>")
        parts.append("</table>")
    worst = [q for q in loo.queries if q.precision < 1.0][:WORST_QUERIES]
    if loo.queries and not worst:
        parts.append(f"<p>Every query has P@{loo.k} = 1.</p>")
    if worst and index_root is not None:
        imperfect = sum(q.precision < 1.0 for q in loo.queries)
        parts.append(f"<h3>Worst queries ({len(worst)} of the {imperfect} with "
                     f"P@{loo.k} &lt; 1)</h3>")
        for score in worst:
            # Every member of a class with two or more images is a query, so queries name them all.
            classmates = {q.path for q in loo.queries if q.label == score.label}
            matches = [(n, index_root / n, d, n in classmates)
                       for n, d in zip(score.neighbours, score.distances, strict=True)]
            parts.append(_row(score.path, index_root / score.path,
                              f"class {score.label} · P@{loo.k} = {score.precision:.2f}",
                              matches, thumbs))
    return "\n".join(parts + ["</section>"])


def _skipped_section(skipped: Sequence[SkippedFile]) -> str:
    parts = [f"<section id='skipped'><h2>Skipped files ({len(skipped)})</h2>"]
    if not skipped:
        return parts[0] + "<p>None.</p></section>"
    parts.append("<table><tr><th>set</th><th>file</th><th>reason</th></tr>")
    parts += [f"<tr><td>{_esc(s.where)}</td><td>{_esc(s.name)}</td><td>{_esc(s.reason)}</td></tr>"
              for s in skipped]
    return "\n".join(parts + ["</table></section>"])


def contact_sheet(results: Sequence[QueryResult], thumbs: Thumbnails) -> Image.Image:
    """One row per query (at most SHEET_MAX_ROWS): the query, then its neighbours."""
    rows = list(results[:SHEET_MAX_ROWS])
    cell_w, cell_h = thumbs.side + 8, thumbs.side + 8 + _SHEET_TEXT_PX
    columns = 1 + max((len(r.matches) for r in rows), default=0)
    sheet = Image.new("RGB", (max(1, columns) * cell_w, max(1, len(rows)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = SheetFont(_SHEET_FONT_PX)
    for row_no, result in enumerate(rows):
        cells = [(result.file, result.name, "query", None)] + [
            (m.file, m.name, f"#{rank} d={m.distance:.3f}", m.correct)
            for rank, m in enumerate(result.matches, start=1)]
        for col, (file, name, line, correct) in enumerate(cells):
            x, y = col * cell_w, row_no * cell_h
            thumb = thumbs.image(file)
            colour = "#0969da" if col == 0 else _COLOURS[correct]
            draw.rectangle([x + 1, y + 1, x + cell_w - 2, y + thumbs.side + 6], outline=colour,
                           width=3)
            sheet.paste(thumb, (x + 4 + (thumbs.side - thumb.width) // 2,
                                y + 4 + (thumbs.side - thumb.height) // 2))
            for line_no, text in enumerate((line, font.fit(name, cell_w - 8))):
                font.draw(draw, (x + 4, y + thumbs.side + 9 + _LINE_PX * line_no), text)
    return sheet


class SheetFont:
    """Text in DejaVu Sans, which matplotlib ships (Latin, Greek, Cyrillic, ...), each character
    the primary font lacks drawn in the first installed font matplotlib knows that has it (CJK
    where the machine has such a font). PIL's own default font has ASCII only."""

    def __init__(self, size_px: int):
        import matplotlib

        primary = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        self.size_px = size_px
        self.primary = ImageFont.truetype(str(primary), size_px)
        self._primary_path = str(primary)
        self._by_path: dict[str, ImageFont.FreeTypeFont] = {self._primary_path: self.primary}
        self._path_of: dict[str, str] = {}  # character -> the font file that draws it

    def font_for(self, char: str) -> ImageFont.FreeTypeFont:
        """The font that draws `char`: the primary, a fallback with the glyph, else the primary
        (whose missing-glyph box then shows that no installed font has it)."""
        path = self._path_of.get(char)
        if path is None:
            path = next((p for p in (self._primary_path, *_fallback_font_paths())
                         if ord(char) in _charmap(p)), self._primary_path)
            self._path_of[char] = path
        if path not in self._by_path:
            self._by_path[path] = ImageFont.truetype(path, self.size_px)
        return self._by_path[path]

    def runs(self, text: str) -> list[tuple[str, ImageFont.FreeTypeFont]]:
        """`text` cut into pieces that one font draws."""
        runs: list[tuple[str, ImageFont.FreeTypeFont]] = []
        for char in text:
            font = self.font_for(char)
            if runs and runs[-1][1] is font:
                runs[-1] = (runs[-1][0] + char, font)
            else:
                runs.append((char, font))
        return runs

    def width_px(self, text: str) -> float:
        return sum(font.getlength(run) for run, font in self.runs(text))

    def fit(self, text: str, width_px: int) -> str:
        """`text`, or its end after "…" where the whole is wider than `width_px`."""
        if self.width_px(text) <= width_px:
            return text
        for start in range(1, len(text)):
            if self.width_px("…" + text[start:]) <= width_px:
                return "…" + text[start:]
        return "…"

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str,
             fill: str = "black") -> None:
        """Draw `text` with its top-left at `xy`, every run on the primary font's baseline."""
        x, baseline = float(xy[0]), xy[1] + self.primary.getmetrics()[0]
        for run, font in self.runs(text):
            draw.text((x, baseline), run, fill=fill, font=font, anchor="ls")
            x += font.getlength(run)


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):  # a font file FreeType cannot read: no glyphs
        return frozenset()


@functools.lru_cache(maxsize=1)
def _fallback_font_paths() -> tuple[str, ...]:
    """Installed fonts matplotlib has indexed, except "Last Resort" (a glyph for every code point
    that is itself a placeholder box)."""
    from matplotlib import font_manager

    return tuple(sorted({entry.fname for entry in font_manager.fontManager.ttflist
                         if not entry.name.lower().startswith("last resort")}))


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Retrieval report</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1f2328; }
h1 { margin-top: 0; } .summary { color: #57606a; } nav { margin: 8px 0 16px; }
.row { display: flex; gap: 10px; align-items: flex-start; padding: 10px 0;
       border-bottom: 1px solid #d0d7de; overflow-x: auto; }
figure { margin: 0; width: 172px; flex: none; }
figure img { display: block; max-width: 160px; max-height: 160px; border: 4px solid #8c959f;
             border-radius: 4px; background: #f6f8fa; }
figure.query img { border-color: #0969da; } figure.ok img { border-color: #1a7f37; }
figure.bad img { border-color: #cf222e; }
figcaption { font-size: 12px; word-break: break-all; margin-top: 4px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; }
.score { font-size: 18px; }
</style></head><body>"""
