"""The one guarded decode: its callers (training, fetch verification, the retrieval rig) share
its pixel cap, its refusal message and its handling of PIL's process-global bomb limit."""
from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
from PIL import Image

from guie.data import decode, guarded_decode
from guie.data.dataset import ImageDataset, decode_rgb
from guie.data.errors import DataError, DataWarning
from guie.data.guarded_decode import MAX_IMAGE_PIXELS, decode_guarded
from guie.data.verify import _check_image
from guie.retrieval.images import SkippedImage, load_image


def _png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's header: a PNG declaring a huge size, with a token body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _encode(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _refusals(data: bytes, tmp_path, monkeypatch) -> dict[str, str]:
    """What each caller says about `data`."""
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    said = {}
    for name, call in [("decode_rgb", lambda: decode_rgb(data, "x")),
                       ("decode_pixels", lambda: decode.decode_pixels(data, "x", min_side=224)),
                       ("verify", lambda: _check_image(data, "x")),
                       ("retrieval", lambda: load_image(path))]:
        with pytest.raises((DataError, SkippedImage)) as caught:
            call()
        said[name] = caught.value.reason if isinstance(caught.value, SkippedImage) else \
            str(caught.value).removeprefix("x: ")
    monkeypatch.setattr(decode, "simplejpeg", None)  # the PIL backend of decode_pixels too
    with pytest.raises(DataError) as caught:
        decode.decode_pixels(data, "x", min_side=224)
    said["decode_pixels (PIL)"] = str(caught.value).removeprefix("x: ")
    table = pd.DataFrame({"path": [str(path)], "offset": [-1], "length": [-1], "label": [0]})
    with pytest.warns(DataWarning) as warned:
        assert ImageDataset(table)[0] is None
    said["ImageDataset"] = str(warned[0].message).removeprefix(f"skipping a bad image: {path}: ")
    return said


def test_a_bomb_is_refused_by_every_caller_with_the_same_message(tmp_path, monkeypatch):
    limit_before = Image.MAX_IMAGE_PIXELS
    said = _refusals(_png_header_only(30000, 30000), tmp_path, monkeypatch)
    assert set(said.values()) == {
        f"image of 30000x30000 pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit"}, said
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's own limit is lifted only meanwhile


def test_every_caller_uses_the_one_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(guarded_decode, "MAX_IMAGE_PIXELS", 1000)
    said = _refusals(_encode((40, 30), "PNG"), tmp_path, monkeypatch)
    assert set(said.values()) == {"image of 40x30 pixels exceeds the 1000-pixel limit"}, said


def test_only_the_retrieval_rig_shrinks_a_jpeg_over_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(guarded_decode, "MAX_IMAGE_PIXELS", 1000)
    data = _encode((40, 30), "JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    assert load_image(tmp_path / "a.jpg", max_pixels=None).size == (20, 15)  # at 1/2 scale
    for call in (lambda: decode_rgb(data, "x"), lambda: decode.decode_pixels(data, "x"),
                 lambda: _check_image(data, "x")):
        with pytest.raises(DataError, match="^x: image of 40x30 pixels exceeds the 1000-pixel"):
            call()


def test_decoder_failures_name_the_image_and_keep_the_error():
    with pytest.raises(guarded_decode.BadImage, match="^junk: cannot decode image") as caught:
        decode_guarded(b"not an image", "junk")
    assert isinstance(caught.value.error, Image.UnidentifiedImageError)


def test_pils_limit_is_restored_after_concurrent_decodes():
    limit_before = Image.MAX_IMAGE_PIXELS
    data = _encode((64, 48), "JPEG")
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: decode_guarded(data, "x").size, range(64)))
    assert set(sizes) == {(64, 48)} and Image.MAX_IMAGE_PIXELS == limit_before
