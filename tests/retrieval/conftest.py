"""Shared fixtures: a tiny contract-following TorchScript model and a folder of awkward images.

The images are real photos shipped with scikit-image, saved in every format, mode and failure
the retrieval rig must survive. The folder is built once per session (the huge JPEG takes ~1 s).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from torch import nn

HUGE_SIDE = 13500  # 182 M pixels: over twice PIL's bomb limit, so PIL alone refuses to open it


class TinyContractModel(nn.Module):
    """The competition contract on a budget: [B,3,H,W] 0..255 at any size -> [B,64] unit norm."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(3 * 8 * 8 + 3, 64, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = F.adaptive_avg_pool2d(x, [8, 8])  # any H, W (even 1 x 1) to 8 x 8
        colour = x.mean(dim=(2, 3))  # [B, 3]: keeps a flat image's embedding non-zero
        layout = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
        features = torch.cat([layout, 4.0 * colour], dim=1)
        return F.normalize(features @ self.projection, dim=1)


def save_model(path: Path, seed: int = 0) -> Path:
    torch.jit.script(TinyContractModel(seed)).save(str(path))
    return path


@pytest.fixture(scope="session")
def make_model():
    """save_model(path, seed) for tests that need several models."""
    return save_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "saved_model.pt", seed=0)


@pytest.fixture(scope="session")
def load_photo():
    """photo(name): a scikit-image sample photo as a PIL image."""
    return photo


@pytest.fixture(scope="session")
def huge_side() -> int:
    return HUGE_SIDE


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def write_png16_rgb(path: Path, rgb8: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (PIL cannot write one): 16-bit samples = 8-bit x 257."""
    height, width, _ = rgb8.shape
    samples = (rgb8.astype(">u2") * 257).reshape(height, width * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in samples)  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares a huge size (a decompression bomb's header) with a token body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def build_photo_folder(root: Path) -> dict[str, Path]:
    """One sub-folder per class (so labels exist) holding every case; returns name -> path."""
    astronaut, coffee, chelsea, rocket = (photo(n) for n in ("astronaut", "coffee", "chelsea",
                                                              "rocket"))
    files: dict[str, Path] = {}

    def put(name: str, rel: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        files[name] = path
        return path

    astronaut.save(put("jpeg", "astronaut/astronaut.jpg"), quality=90)
    astronaut.save(put("webp", "astronaut/astronaut.webp"), quality=85)
    astronaut.convert("CMYK").save(put("cmyk", "astronaut/astronaut_cmyk.jpg"), quality=90)
    astronaut.resize((HUGE_SIDE, HUGE_SIDE), Image.Resampling.NEAREST).save(
        put("huge", "astronaut/astronaut_huge.jpg"), quality=50)

    coffee.save(put("png", "coffee/coffee.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": store the upright photo turned 90 CCW
    coffee.transpose(Image.Transpose.ROTATE_90).save(put("exif6", "coffee/coffee_exif6.jpg"),
                                                     quality=90, exif=exif)
    palette = coffee.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(put("palette", "coffee/coffee_palette.png"), transparency=0)
    coffee.save(put("non_ascii", "coffee/café_東京.jpg"), quality=90)

    chelsea.save(put("chelsea", "chelsea/chelsea.jpg"), quality=90)
    chelsea.convert("L").save(put("gray", "chelsea/chelsea_gray.png"))
    rgba = chelsea.convert("RGBA")
    alpha = np.full((chelsea.height, chelsea.width), 255, np.uint8)
    alpha[:, : chelsea.width // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(put("rgba", "chelsea/chelsea_rgba.png"))
    gray16 = np.asarray(chelsea.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray16).save(put("gray16", "chelsea/chelsea_16bit.png"))
    write_png16_rgb(put("rgb16", "chelsea/chelsea_rgb16.png"), np.asarray(chelsea))

    rocket.save(put("rocket", "rocket/rocket.jpg"), quality=90)
    second = coffee.resize(rocket.size)
    rocket.save(put("gif", "rocket/rocket_anim.gif"), save_all=True, append_images=[second],
                duration=200, loop=0)
    rocket.resize((64, 43)).save(put("small", "rocket/rocket_small.png"))

    Image.new("RGB", (1, 1), (200, 30, 30)).save(put("one_pixel", "tiny/one_pixel.png"))

    put("text", "broken/not_an_image.jpg").write_text("this is a text file, not a JPEG\n")
    whole = (root / "astronaut/astronaut.jpg").read_bytes()
    put("truncated", "broken/truncated.jpg").write_bytes(whole[: len(whole) // 3])
    write_png_header_only(put("bomb", "broken/bomb.png"), 30000, 30000)
    return files


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("photos") / "index"
    return root, build_photo_folder(root)
