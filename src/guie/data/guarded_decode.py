"""The one guarded PIL decode that every image reader goes through: training and evaluation
(`guie.data.decode`), fetch verification (`guie.data.verify`) and the retrieval rig
(`guie.retrieval.images`).

Pixel cap, one policy: no image whose stored size is over `MAX_IMAGE_PIXELS` is decoded. A
caller that lets a JPEG shrink (`shrink_to_fit`: the retrieval rig, which downscales anyway)
gets one over the cap decoded at the libjpeg draft scale (1/2, 1/4 or 1/8) that brings it under;
any other format over the cap can only be decoded whole, so it is refused. A refusal always reads
`image of WxH pixels exceeds the N-pixel limit`.

PIL's own decompression-bomb check is process-global and refuses at open time anything over
twice its limit, before a JPEG could be decoded at reduced scale; it is lifted while decoding
here (our cap replaces it) and restored after. Decoder failures (corrupt, truncated, not an
image) become a `BadImage` naming the image, with the decoder's exception kept as `error`.
"""
from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from guie.data.errors import DataError

# 8k x 8k: far beyond any photo in these data sets and about 200 MB decoded as RGB (270 MB RGBA).
# The cap training and fetch verification always had; the retrieval rig's own 64 M (5% lower)
# gave way, so a data set that verifies is also one the rig and training decode alike.
MAX_IMAGE_PIXELS = 8192 * 8192
_MAX_DRAFT_SCALE = 8  # libjpeg's coarsest DCT scale

_pil_check_lock = threading.Lock()
_pil_check_lifters = 0  # decodes running with PIL's check lifted (threads share the global)
_pil_saved_limit: int | None = None


class BadImage(DataError):
    """An image the guarded decode refused or could not decode; the message is
    `<where>: <reason>`. `error`: the decoder's exception, None for a refusal over the cap."""

    def __init__(self, where: str, reason: str, error: BaseException | None = None):
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.error = error


def check_pixel_cap(width: int, height: int, where: str, max_pixels: int | None = None) -> None:
    """BadImage if a `width` x `height` image is over the cap (default: MAX_IMAGE_PIXELS)."""
    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width * height > cap:
        raise _over_cap(where, (width, height), cap)


def decode_guarded(source: bytes | str | Path, where: str, max_pixels: int | None = None,
                   draft_scale: Callable[[Image.Image], int] | None = None,
                   shrink_to_fit: bool = False, mode: str | None = None) -> Image.Image:
    """Open `source` (encoded bytes or a file), check the cap, decode: the loaded image, in
    `mode` if given (else as stored). BadImage naming `where` on a refusal or a decoder failure.

    max_pixels: the cap, MAX_IMAGE_PIXELS unless given. draft_scale(opened image) -> 1, 2, 4 or
    8: the JPEG draft scale the caller wants (other formats ignore it). shrink_to_fit: see the
    module doc; False refuses any image over the cap.
    """
    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with _pil_check_lifted(), Image.open(
                io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            width, height = stored = img.size
            # Checked before the caller looks at the image (reading a PNG's EXIF decodes it).
            can_shrink = shrink_to_fit and isinstance(img, JpegImageFile)
            if _pixels(scaled_size(stored, _MAX_DRAFT_SCALE if can_shrink else 1)) > cap:
                raise _over_cap(where, stored, cap)
            scale = draft_scale(img) if draft_scale is not None else 1
            while (can_shrink and scale < _MAX_DRAFT_SCALE
                   and _pixels(scaled_size(stored, scale)) > cap):
                scale *= 2
            if scale > 1:
                img.draft(img.mode, (max(1, width // scale), max(1, height // scale)))
            if _pixels(img.size) > cap:  # a JPEG whose draft did not apply
                raise _over_cap(where, stored, cap)
            img.load()  # decode now: a truncated file fails here, not in the caller
            return img if mode is None or img.mode == mode else img.convert(mode)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(where, f"cannot decode image: {e}", e) from None


def _over_cap(where: str, stored: tuple[int, int], cap: int) -> BadImage:
    return BadImage(where, f"image of {stored[0]}x{stored[1]} pixels exceeds the {cap}-pixel limit")


def scaled_size(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """The size libjpeg decodes at 1/scale (sides rounded up)."""
    return -(-size[0] // scale), -(-size[1] // scale)


def _pixels(size: tuple[int, int]) -> int:
    return size[0] * size[1]


@contextmanager
def _pil_check_lifted() -> Iterator[None]:
    """PIL's global bomb limit off while any guarded decode runs, restored by the last one (a
    plain save/restore from two threads could leave it off for good)."""
    global _pil_check_lifters, _pil_saved_limit
    with _pil_check_lock:
        if _pil_check_lifters == 0:
            _pil_saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _pil_check_lifters += 1
    try:
        yield
    finally:
        with _pil_check_lock:
            _pil_check_lifters -= 1
            if _pil_check_lifters == 0:
                Image.MAX_IMAGE_PIXELS = _pil_saved_limit
