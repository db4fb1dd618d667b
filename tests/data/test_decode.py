import io

import numpy as np
import pytest
import torch
from PIL import Image

from guie.config import PreprocessConfig
from guie.data import decode
from guie.data.augment import TrainTransform
from guie.data.dataset import ImageDataset
from guie.data.decode import (
    ResizeToTensor, as_pixels, decode_image, decode_pixels, draft_scale, resize_uint8,
)
from guie.data.preprocess import Preprocess
from guie.data.errors import DataError

BIG = 1 << 30


def _photo(width: int, height: int) -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.LANCZOS)


def _encode(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(800, 600), (600, 800), (447, 900), (448, 448), (300, 200),
                                  (1800, 1800), (4000, 3000)])
def test_draft_scale_is_pils_rule_and_keeps_the_short_side(size):
    img = Image.open(io.BytesIO(_encode(Image.new("RGB", size, (9, 99, 199)))))
    img.draft("RGB", (224, 224))
    scale = draft_scale(*size, 224)
    assert img.size == (-(-size[0] // scale), -(-size[1] // scale))
    assert min(img.size) >= min(224, min(size))


@pytest.mark.parametrize("size,subsampling", [((640, 480), 2), ((500, 700), 0), ((450, 450), 1)])
def test_backends_give_identical_pixels(monkeypatch, size, subsampling):
    data = _encode(_photo(*size), quality=90, subsampling=subsampling)
    pil = as_pixels(decode_image(data, "x.jpg", BIG, 224))
    fast = decode_pixels(data, "x.jpg", BIG, 224)
    assert fast.dtype == torch.uint8 and fast.shape == pil.shape
    assert torch.equal(fast, pil)
    monkeypatch.setattr(decode, "simplejpeg", None)
    assert torch.equal(decode_pixels(data, "x.jpg", BIG, 224), pil)


def test_grayscale_png_and_full_size():
    gray = _encode(_photo(500, 500).convert("L"), quality=90)
    assert decode_pixels(gray, "g.jpg", BIG, 224).shape == (3, 250, 250)
    png = _encode(_photo(500, 500), fmt="PNG")
    assert decode_pixels(png, "p.png", BIG, 224).shape == (3, 500, 500)  # no DCT to scale
    assert decode_pixels(_encode(_photo(500, 500)), "f.jpg", BIG).shape == (3, 500, 500)


@pytest.mark.parametrize("backend", ["simplejpeg", "pil"])
def test_bad_images_raise_data_errors_naming_the_record(monkeypatch, backend):
    if backend == "pil":
        monkeypatch.setattr(decode, "simplejpeg", None)
    data = _encode(_photo(400, 300))
    with pytest.raises(DataError, match="shard @ 12: cannot decode"):
        decode_pixels(data[: len(data) // 2], "shard @ 12", BIG, 224)
    with pytest.raises(DataError, match="big.jpg: image of 400x300 pixels exceeds"):
        decode_pixels(data, "big.jpg", 1000, 224)
    with pytest.raises(DataError, match="junk: cannot decode"):
        decode_pixels(b"\xff\xd8 not a jpeg", "junk", BIG, 224)


def test_fast_path_is_close_to_the_full_resolution_path():
    data = _encode(_photo(800, 600), quality=90)
    full = as_pixels(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224)))
    fast = ResizeToTensor(224)(decode_pixels(data, "x", BIG, 224))
    assert fast.shape == (3, 224, 224) and fast.is_contiguous()
    mse = float(((fast.double() - full.double()) ** 2).mean())
    assert 10 * np.log10(255**2 / mse) > 30


def test_resize_uint8_batched_and_identity():
    x = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    assert resize_uint8(x, (20, 10)).shape == (2, 3, 20, 10)
    assert torch.equal(resize_uint8(x[0], (40, 30)), x[0])


def test_dataset_hands_tensors_to_transforms_that_declare_a_decode_size(tmp_path):
    import pandas as pd

    (tmp_path / "a.jpg").write_bytes(_encode(_photo(900, 600)))
    df = pd.DataFrame({"path": [str(tmp_path / "a.jpg")], "offset": [-1], "length": [-1],
                       "label": [3]})
    seen = []

    class Probe:
        decode_size = 224

        def __call__(self, image):
            seen.append(image)
            return as_pixels(image).contiguous()

    pixels, label, _, size_hw = ImageDataset(df, Probe())[0]
    assert isinstance(seen[0], torch.Tensor) and pixels.shape == (3, 300, 450) and label == 3
    assert size_hw == (300, 450)  # the size it was decoded at, before the transform
    # An explicit decode_size with a PIL transform: PIL images, decoded at the reduced scale.
    img, _, _, _ = ImageDataset(df, lambda im: im, decode_size=224)[0]
    assert isinstance(img, Image.Image) and img.size == (450, 300)
    assert ImageDataset(df, Probe(), decode_size=0)[0][0].shape == (3, 600, 900)


def test_train_transform_takes_pil_or_tensor():
    transform = TrainTransform(("random_resized_crop", "hflip"),
                               Preprocess(PreprocessConfig(image_size=64)))
    assert transform.decode_size == 64
    img = _photo(120, 90)
    for image in (img, as_pixels(img)):
        out = transform(image)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and out.is_contiguous()
