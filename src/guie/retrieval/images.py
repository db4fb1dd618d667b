"""Loading images from real folders the way the Kaggle host feeds them: RGB uint8, original size.

Real folders hold more than clean RGB JPEGs. Handled here:
- formats: anything PIL opens (JPEG, PNG, WebP, GIF, BMP, TIFF, ...); animated files give their
  first frame;
- modes: grayscale, 1-bit, palette (with or without transparency), RGBA/LA (composited on white,
  as a viewer shows them), CMYK, 16-bit grayscale (scaled, not clipped), float;
- EXIF orientation (the pixels a viewer shows, not the ones stored);
- huge images: decoded by the kit's one guarded decode (`guie.data.guarded_decode`) with its
  pixel cap as `max_decode_pixels`, allowed to shrink: a JPEG over the cap is decoded at a reduced
  scale (libjpeg draft mode) that fits it; any other format over it is skipped, because it can
  only be decoded whole. Whatever is decoded is then downscaled to at most `max_pixels` (and
  `max_side`, if given);
- files that are not images or are corrupt raise `SkippedImage` with a reason, never anything else.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from guie.data.guarded_decode import BadImage, decode_guarded, scaled_size

# Larger images are downscaled to this many pixels (4096 x 4096): bigger inputs are pointless
# for a model that resizes internally, and a float copy of one is already 200 MB.
DEFAULT_MAX_PIXELS = 4096 * 4096
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
               max_decode_pixels: int | None = None) -> LoadedImage:
    """Upright RGB uint8 pixels of `path`, downscaled only where a cap requires it.

    max_decode_pixels: the decode cap (default: the guarded decode's MAX_IMAGE_PIXELS).
    Raises SkippedImage (with a reason) for anything that is not a usable image.
    """
    path = Path(path)
    try:
        return _load(path, max_side, max_pixels, max_decode_pixels)
    except SkippedImage as exc:
        raise SkippedImage(path, exc.reason) from None
    except BadImage as exc:  # over the cap, or the decoder failed
        raise SkippedImage(path, exc.reason if exc.error is None else _unusable(exc.error)) \
            from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; a bad file is never fatal
        raise SkippedImage(path, _unusable(exc)) from None


def _unusable(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (no image format recognises it)"
    return f"unreadable or corrupt ({type(exc).__name__}: {exc})"


@dataclass(frozen=True)
class _Plan:
    """What the opened (not yet decoded) image asks for."""
    orientation: int  # EXIF
    original: tuple[int, int]  # (w, h) upright, at full size
    final: tuple[int, int]  # (w, h) upright, within the caps
    draft_scale: int  # the JPEG draft scale that still gives at least `final`


def _plan(im: Image.Image, max_side: int | None, max_pixels: int | None) -> _Plan:
    stored_w, stored_h = im.size
    if stored_w < 1 or stored_h < 1:
        raise SkippedImage("", f"empty image ({stored_w} x {stored_h})")
    orientation = _exif_orientation(im)
    turned = orientation in (5, 6, 7, 8)  # transposes and 90-degree turns swap the sides
    original = (stored_h, stored_w) if turned else (stored_w, stored_h)
    final_w, final_h = fit_size(*original, max_side, max_pixels)
    target = (final_h, final_w) if turned else (final_w, final_h)  # in stored orientation
    return _Plan(orientation, original, (final_w, final_h),
                 _jpeg_draft_scale((stored_w, stored_h), target))


def _load(path: Path, max_side: int | None, max_pixels: int | None,
          max_decode_pixels: int | None) -> LoadedImage:
    plan: _Plan | None = None  # set by the decode once the image is open

    def draft_scale(im: Image.Image) -> int:
        nonlocal plan
        plan = _plan(im, max_side, max_pixels)
        return plan.draft_scale

    im = decode_guarded(path, str(path), max_decode_pixels, draft_scale, shrink_to_fit=True)
    # exif_transpose only where needed: it copies the image even when there is nothing to do.
    rgb = _to_rgb(ImageOps.exif_transpose(im) if plan.orientation in range(2, 9) else im)
    final_w, final_h = plan.final
    if rgb.size[0] < final_w or rgb.size[1] < final_h:
        final_w, final_h = rgb.size  # the decode cap forced a smaller decode: never upscale
    if rgb.size != (final_w, final_h):
        rgb = rgb.resize((final_w, final_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    # np.array copies: PIL-backed arrays are read-only, which torch.from_numpy warns about.
    return LoadedImage(pixels=np.array(rgb, dtype=np.uint8), original_size=plan.original)


def _jpeg_draft_scale(stored: tuple[int, int], target: tuple[int, int]) -> int:
    """libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 scale: the largest scale still at least `target`
    (free speed; the guarded decode shrinks further where its cap demands it)."""
    scale = 1
    for s in (2, 4, 8):
        scaled_w, scaled_h = scaled_size(stored, s)
        if scaled_w >= target[0] and scaled_h >= target[1]:
            scale = s
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
