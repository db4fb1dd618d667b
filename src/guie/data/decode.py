"""Fast image decode for training: JPEGs decoded at a reduced scale, resized in torch.

Turning a 400-800 px JPEG into a 224 training tensor with PIL spends about a third of its time
decoding the full image and two thirds in PIL's resize of it (field guide section 7). So:

- libjpeg inverse-transforms the DCT blocks at 1/2, 1/4 or 1/8 scale almost for free. We take
  the coarsest of those scales that keeps both sides >= the target size (PIL's draft-mode rule),
  so the resize that follows only ever shrinks, as it would from the full image.
- the pixels go straight into a uint8 tensor, and torch's antialiased uint8 resize (bicubic,
  a = -0.5, like PIL's) is several times faster than PIL's.
- simplejpeg, when installed, decodes JPEGs instead of PIL: the same libjpeg-turbo at the same
  scale, so the pixels are identical (tests/data/test_decode.py), about 25% faster because
  it decodes straight into a numpy array (PIL copies its RGBX image out through `tobytes`).

`python -m bench` measures it (figure `decode_speedup`) and the PSNR against the
full-resolution path. Non-JPEG images decode at full size. Both backends share the bomb guard
and pixel cap of `guie.data.guarded_decode`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from guie.data.guarded_decode import check_pixel_cap, decode_guarded, scaled_size

try:
    import simplejpeg
except ImportError:  # optional: PIL's draft mode gives the same pixels, a little slower
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8"


def draft_scale(width: int, height: int, min_side: int) -> int:
    """The JPEG DCT downscale (1, 2, 4 or 8) keeping both sides >= min_side; PIL's draft rule."""
    scale = 1
    if min_side > 0:
        while scale < 8 and min(width, height) // (2 * scale) >= min_side:
            scale *= 2
    return scale


def decode_image(data: bytes, where: str, max_pixels: int | None = None,
                 min_side: int = 0) -> Image.Image:
    """RGB PIL image; with `min_side` > 0 a JPEG is decoded at `draft_scale`. DataError naming
    `where` if the data is corrupt or the image is over the cap (`guie.data.guarded_decode`:
    MAX_IMAGE_PIXELS unless `max_pixels` is given)."""
    # Only what PIL calls JPEG: an MPO (a JPEG with more pictures) is decoded whole.
    return decode_guarded(data, where, max_pixels, mode="RGB", draft_scale=lambda img: (
        draft_scale(*img.size, min_side) if img.format == "JPEG" else 1))


def decode_pixels(data: bytes, where: str, max_pixels: int | None = None,
                  min_side: int = 0) -> torch.Tensor:
    """Like `decode_image`, as uint8 [3, H, W] viewing HWC memory (see `as_pixels`)."""
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            height = width = 0  # unreadable header: PIL decides, and names the error
        check_pixel_cap(width, height, where, max_pixels)
        if width and height:
            scale = draft_scale(width, height, min_side)
            try:
                min_width, min_height = scaled_size((width, height), scale)
                rgb = simplejpeg.decode_jpeg(data, "RGB", min_height=min_height,
                                             min_width=min_width)
                return torch.from_numpy(rgb).permute(2, 0, 1)
            except ValueError:
                pass  # CMYK, truncated, ...: PIL handles it or raises a DataError
    return as_pixels(decode_image(data, where, max_pixels, min_side))


def as_pixels(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image or uint8 [3, H, W] tensor -> uint8 [3, H, W]. From PIL the tensor views HWC
    memory (channels-last: what torch's fast uint8 resize wants; .contiguous() for CHW)."""
    if isinstance(image, torch.Tensor):
        return image
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def resize_uint8(images: torch.Tensor, size: tuple[int, int],
                 mode: str = "bicubic") -> torch.Tensor:
    """uint8 [3, H, W] or [B, 3, H, W] -> uint8 at `size` (h, w), antialiased when shrinking."""
    batched = images.ndim == 4
    x = images if batched else images.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=list(size), mode=mode, antialias=True, align_corners=False)
    return x if batched else x[0]


class ResizeToTensor:
    """Image (PIL or uint8 [3, H, W]) -> uint8 [3, size, size], aspect ignored (`Preprocess`'s
    squash mode). Its `decode_size` puts `ImageDataset` on the fast decode path."""

    def __init__(self, size: int, mode: str = "bicubic"):
        self.size = int(size)
        self.mode = mode
        self.decode_size = self.size

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return resize_uint8(as_pixels(image), (self.size, self.size), self.mode).contiguous()
