import io

import numpy as np
import pytest
import torch
from PIL import Image

from guie.data import guarded_decode
from guie.data.dataset import (
    ImageDataset, collate_skip_bad, decode_rgb, pil_to_uint8_tensor, read_bytes,
)
from guie.data.errors import DataError, DataWarning
from guie.data.sources import merge_sources
from guie.data.tfrecord import encode_example, index_shard, write_tfrecord


def _jpeg(w=40, h=30, color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


def _resize_32(img):
    return pil_to_uint8_tensor(img.resize((32, 32)))


@pytest.fixture
def mixed_table(tmp_path):
    """Two good image files, one truncated JPEG, and a shard with one CRC-damaged record."""
    import pandas as pd

    good = _jpeg()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "good2.png").write_bytes(good)  # extension lies; content decides
    (tmp_path / "bad.jpg").write_bytes(good[: len(good) // 2])
    shard = tmp_path / "s.tfrec"
    write_tfrecord(shard, [encode_example(_jpeg(), 5), encode_example(_jpeg(), 6)])
    idx = index_shard(shard, use_cache=False)
    raw = bytearray(shard.read_bytes())
    raw[int(idx.offsets[1]) + 40] ^= 0xFF  # damage record 2 after indexing
    shard.write_bytes(bytes(raw))
    files = [str(tmp_path / n) for n in ("good.jpg", "bad.jpg", "good2.png")]
    return pd.DataFrame({
        "path": files + [str(shard)] * 2,
        "offset": [-1, -1, -1, int(idx.offsets[0]), int(idx.offsets[1])],
        "length": [-1, -1, -1, int(idx.lengths[0]), int(idx.lengths[1])],
        "label": [1, 2, 3, 5, 6],
    })


def test_decode_and_tensor():
    img = decode_rgb(_jpeg(40, 30), "x.jpg")
    assert img.mode == "RGB" and img.size == (40, 30)
    t = pil_to_uint8_tensor(img)
    assert t.dtype == torch.uint8 and t.shape == (3, 30, 40)
    assert abs(int(t[0, 15, 20]) - 200) < 6
    gray = io.BytesIO()
    Image.new("L", (8, 8), 9).save(gray, format="PNG")
    assert decode_rgb(gray.getvalue(), "g.png").mode == "RGB"
    with pytest.raises(DataError, match="where-it-was: cannot decode"):
        decode_rgb(b"not an image", "where-it-was")


def test_pixel_limit(monkeypatch):
    monkeypatch.setattr(guarded_decode, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="big.jpg: image of 40x30 pixels exceeds"):
        decode_rgb(_jpeg(40, 30), "big.jpg")


def test_dataset_skips_bad_images(mixed_table):
    data = ImageDataset(mixed_table, transform=_resize_32)
    assert len(data) == 5
    items = []
    with pytest.warns(DataWarning) as caught:
        items = [data[i] for i in range(len(data))]
    assert [it is None for it in items] == [False, True, False, False, True]
    messages = " ".join(str(w.message) for w in caught)
    assert "bad.jpg" in messages
    assert f"s.tfrec: record at byte offset {mixed_table['offset'][4] - 12} fails" in messages
    images, labels, indices, sizes_hw, n_bad = collate_skip_bad(items)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [1, 3, 5] and labels.dtype == torch.int64
    assert indices.tolist() == [0, 2, 3] and n_bad == 2
    assert sizes_hw.tolist() == [[30, 40]] * 3  # before the transform resized them

    batch = collate_skip_bad([None, None])
    assert batch.images.numel() == 0 and batch.labels.shape == (0,)
    assert batch.indices.dtype == torch.int64 and batch.sizes_hw.shape == (0, 2)
    assert batch.n_bad == 2


def test_sizes_are_reported_on_the_fast_decode_path_too(mixed_table):
    """A pixel transform at a reduced JPEG scale: the size is the decoded one, same ratio."""
    class Pixels32:
        decode_size = 8  # 40x30 decodes at 1/2 scale (both sides stay >= 8)

        def __call__(self, pixels):
            return torch.nn.functional.interpolate(pixels[None].float(), size=(32, 32))[0]

    item = ImageDataset(mixed_table.iloc[[0]], transform=Pixels32())[0]
    h, w = item[3]
    assert item[0].shape == (3, 32, 32) and w / h == pytest.approx(40 / 30, rel=0.05)
    assert (h, w) != (30, 40)


def test_collate_rejects_mixed_shapes():
    batch = [(torch.zeros(3, 4, 4, dtype=torch.uint8), 0, 0, (4, 4)),
             (torch.zeros(3, 5, 4, dtype=torch.uint8), 1, 1, (5, 4))]
    with pytest.raises(ValueError, match="different shapes"):
        collate_skip_bad(batch)


def test_read_bytes_file_and_record(mixed_table):
    row = mixed_table.iloc[3]
    assert read_bytes(row.path, int(row.offset), int(row.length))[:2] == b"\xff\xd8"
    assert read_bytes(mixed_table.path[0])[:2] == b"\xff\xd8"


@pytest.mark.filterwarnings("ignore::guie.data.errors.DataWarning")
def test_dataloader_with_workers(sample_data):
    root, sources = sample_data
    df = merge_sources(sources, root).sample(48, random_state=0).reset_index(drop=True)
    loader = torch.utils.data.DataLoader(
        ImageDataset(df, transform=_resize_32), batch_size=16, num_workers=2,
        collate_fn=collate_skip_bad)
    seen = []
    for images, labels, indices, _, n_bad in loader:
        assert n_bad == 0 and images.shape[1:] == (3, 32, 32)
        np.testing.assert_array_equal(labels.numpy(), df["label"].to_numpy()[indices.numpy()])
        seen += indices.tolist()
    assert sorted(seen) == list(range(48))
