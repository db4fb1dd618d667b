"""Loading images from real folders the way the Kaggle host feeds them: RGB uint8, original size.

Real folders hold more than clean RGB JPEGs. Handled here:
- formats: anything PIL opens (JPEG, PNG, WebP, GIF, BMP, TIFF, ...); animated files give their
  first frame;
- modes: grayscale, 1-bit, palette (with or without transparency), RGBA/LA (composited on white,
  as a viewer shows them), CMYK, 16-bit grayscale (scaled, not clipped), float;
- EXIF orientation (the pixels a viewer shows, not the ones stored);
- huge images: PIL's decompression-bomb refusal is replaced by our own bounds. A JPEG is decoded
  at a reduced scale (libjpeg draft mode) so no more than `max_decode_pixels` are ever held; any
  other format larger than `max_decode_pixels` is skipped, because it can only be decoded whole.
  Whatever is decoded is then downscaled to at most `max_pixels` (and `max_side`, if given);
- files that are not images or are corrupt raise `SkippedImage` with a reason, never anything else.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Larger images are downscaled to this many pixels (4096 x 4096): bigger inputs are pointless
# for a model that resizes internally, and a float copy of one is already 200 MB.
DEFAULT_MAX_PIXELS = 4096 * 4096
# No decoder ever holds more than this many pixels (~0.25 GB as RGBA).
DEFAULT_MAX_DECODE_PIXELS = 64_000_000
_WHITE = (255, 255, 255)


class SkippedImage(Exception):
    """The file could not be used as an image; `reason` says why (shown in the report)."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # [H, W, 3] uint8 RGB, upright
    original_size: tuple[int, int]  # (width, height) after EXIF orientation, before any downscale

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    def to_tensor(self) -> torch.Tensor:
        """[1, 3, H, W] uint8, contiguous: the host's input layout."""
        return torch.from_numpy(self.pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


def list_files(root: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Every regular file under root (recursively), sorted, skipping hidden names and `exclude`.

    All files are returned, not only those with image extensions: files that turn out not to be
    images are reported as skipped, so nothing in the folder disappears silently.
    """
    root = Path(root)
    excluded = {Path(p).resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not _is_excluded(here / d, excluded))
        for name in filenames:
            path = here / name
            if name.startswith(".") or _is_excluded(path, excluded) or not path.is_file():
                continue
            found.append(path)
    return sorted(found)


def _is_excluded(path: Path, excluded: set[Path]) -> bool:
    return bool(excluded) and path.resolve() in excluded


def fit_size(width: int, height: int, max_side: int | None, max_pixels: int | None
             ) -> tuple[int, int]:
    """The largest (w, h) with the same aspect ratio within both caps; never upscales."""
    scale = 1.0
    if max_side is not None and max(width, height) > max_side:
        scale = min(scale, max_side / max(width, height))
    if max_pixels is not None and width * height > max_pixels:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    if scale >= 1.0:
        return width, height
    return max(1, int(width * scale)), max(1, int(height * scale))


def load_image(path: Path | str, max_side: int | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> LoadedImage:
    """Upright RGB uint8 pixels of `path`, downscaled only where a cap requires it.

    Raises SkippedImage (with a reason) for anything that is not a usable image.
    """
    path = Path(path)
    try:
        with _pil_size_check_off(), Image.open(path) as im:
            return _decode(im, max_side, max_pixels, max_decode_pixels)
    except SkippedImage as exc:
        raise SkippedImage(path, exc.reason) from None
    except Image.UnidentifiedImageError:
        raise SkippedImage(path, "not an image (no image format recognises it)") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; a bad file is never fatal
        raise SkippedImage(path, f"unreadable or corrupt ({type(exc).__name__}: {exc})") from None


def _decode(im: Image.Image, max_side: int | None, max_pixels: int | None,
            max_decode_pixels: int) -> LoadedImage:
    stored_w, stored_h = im.size
    if stored_w < 1 or stored_h < 1:
        raise SkippedImage("", f"empty image ({stored_w} x {stored_h})")
    orientation = _exif_orientation(im)
    turned = orientation in (5, 6, 7, 8)  # transposes and 90-degree turns swap the sides
    original = (stored_h, stored_w) if turned else (stored_w, stored_h)
    final_w, final_h = fit_size(*original, max_side, max_pixels)
    target = (final_h, final_w) if turned else (final_w, final_h)  # in stored orientation
    scale = _jpeg_draft_scale((stored_w, stored_h), target, max_decode_pixels)
    if scale > 1:
        im.draft(im.mode, (max(1, stored_w // scale), max(1, stored_h // scale)))  # JPEG only
    if im.size[0] * im.size[1] > max_decode_pixels:
        raise SkippedImage("", (
            f"too large to decode within the pixel cap: {stored_w} x {stored_h} = "
            f"{stored_w * stored_h:,} pixels > {max_decode_pixels:,} (only JPEG can be decoded "
            f"at reduced scale, at most 1/8)"))
    im.load()
    # exif_transpose only where needed: it copies the image even when there is nothing to do.
    rgb = _to_rgb(ImageOps.exif_transpose(im) if orientation in range(2, 9) else im)
    if rgb.size[0] < final_w or rgb.size[1] < final_h:
        final_w, final_h = rgb.size  # the decode cap forced a smaller decode: never upscale
    if rgb.size != (final_w, final_h):
        rgb = rgb.resize((final_w, final_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    # np.array copies: PIL-backed arrays are read-only, which torch.from_numpy warns about.
    return LoadedImage(pixels=np.array(rgb, dtype=np.uint8), original_size=original)


def _jpeg_draft_scale(stored: tuple[int, int], target: tuple[int, int], max_decode_pixels: int
                      ) -> int:
    """libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 scale: the largest scale still at least `target`
    (free speed), or larger where the decode cap demands it (bounded memory wins over quality)."""
    width, height = stored
    scale = 1
    for s in (2, 4, 8):
        if -(-width // s) >= target[0] and -(-height // s) >= target[1]:
            scale = s
    while scale < 8 and -(-width // scale) * -(-height // scale) > max_decode_pixels:
        scale *= 2
    return scale


def _exif_orientation(im: Image.Image) -> int:
    """EXIF tag 0x0112: 1 = upright, 2..8 = mirrored and/or turned; 1 where absent or broken."""
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the rotation
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples: PIL's own convert would clip everything above 255 to white. Mode "I"
        # (32-bit) holds 16-bit PNG/TIFF data in older Pillows, 8-bit data if nothing exceeds 255.
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or np.max(arr, initial=0.0) > 255:
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0  # 0..1 or 0..255 floats
        gray = np.clip(np.nan_to_num(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "La":  # premultiplied: PIL converts it to LA only
        im, mode = im.convert("LA"), "LA"
    if (mode == "P" and "transparency" in im.info) or mode in ("PA", "RGBa"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, _WHITE + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


@contextlib.contextmanager
def _pil_size_check_off() -> Iterator[None]:
    """Lift PIL's decompression-bomb refusal while opening: `_decode` enforces its own caps.

    PIL refuses any image over 2 x MAX_IMAGE_PIXELS at open time, before one could choose to
    decode it at reduced scale. The cap is process-global, so it is restored right after.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved
