import os
import struct

import numpy as np
import pytest

from guie.data import tfrecord as tfr
from guie.data.errors import DataError, DataWarning
from guie.data.tfrecord import (
    encode_example, encode_features, frame_record, index_shard,
    masked_crc32c, parse_example, read_record, write_tfrecord,
)


def _naive_crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the test oracle."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _naive_masked(data: bytes) -> int:
    crc = _naive_crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % (1 << 32)


def _write_shard(path, n=5):
    records = [encode_example(f"jpeg-{i}".encode() * (i + 1), 100 + i) for i in range(n)]
    write_tfrecord(path, records)
    return records


def test_masked_crc_matches_bitwise_oracle():
    assert _naive_crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    for data in (b"", b"123456789", bytes(range(256)), struct.pack("<Q", 12345)):
        assert masked_crc32c(data) == _naive_masked(data)
    framed = frame_record(b"payload")
    assert struct.unpack_from("<I", framed, 8)[0] == _naive_masked(framed[:8])
    assert struct.unpack_from("<I", framed, len(framed) - 4)[0] == _naive_masked(b"payload")


def test_round_trip(tmp_path):
    path = tmp_path / "a-train-00.tfrec"
    records = _write_shard(path)
    idx = index_shard(path, use_cache=False)
    assert len(idx) == 5 and idx.num_bad == 0 and idx.domains is None
    assert idx.labels.tolist() == [100, 101, 102, 103, 104]
    assert idx.offsets.dtype == np.int64 and idx.offsets[0] == 12
    for i, (off, length) in enumerate(zip(idx.offsets, idx.lengths, strict=True)):
        data = read_record(str(path), int(off), int(length), verify_crc=True)
        assert data == records[i]
        assert read_record(str(path), int(off), int(length), verify_crc=False) == data
        feats = parse_example(data)
        assert feats["image/encoded"] == [f"jpeg-{i}".encode() * (i + 1)]
        assert feats["image/class/label"] == [100 + i]
    assert os.path.getsize(path) == int(idx.offsets[-1] + idx.lengths[-1] + 4)


def test_domain_feature_is_indexed(tmp_path):
    path = tmp_path / "d.tfrec"
    write_tfrecord(path, [encode_example(b"x", 1, "cars"), encode_example(b"y", 2, "memes")])
    assert index_shard(path, use_cache=False).domains.tolist() == ["cars", "memes"]


def test_packed_and_unpacked_lists():
    values = [0, 1, 300, 2**40, -5]
    packed = parse_example(encode_features({"v": values}, packed=True))
    unpacked = parse_example(encode_features({"v": values}, packed=False))
    assert packed == unpacked == {"v": values}
    floats = parse_example(encode_features({"f": [0.5, -2.0]}, packed=False))
    assert floats["f"] == [0.5, -2.0]
    assert parse_example(encode_features({"f": [0.5, -2.0]}))["f"] == [0.5, -2.0]
    # Only the asked-for keys are decoded.
    both = encode_features({"a": [b"x"], "b": [7]})
    assert parse_example(both, ["b"]) == {"b": [7]}


def test_malformed_message_raises():
    with pytest.raises(DataError, match="malformed"):
        parse_example(b"\x0a\xff\x01\x00")  # length 255 in a 4-byte message
    with pytest.raises(DataError, match="malformed"):
        parse_example(b"\x0b")  # wire type 3 (groups)


def test_malformed_record_names_file_and_offset(tmp_path):
    path = tmp_path / "m.tfrec"
    good = encode_example(b"x", 1)
    write_tfrecord(path, [good, b"\x0a\xff\x01\x00"])
    second = 12 + len(good) + 4
    with pytest.raises(DataError, match=rf"m\.tfrec.*byte offset {second}.*malformed"):
        index_shard(path, use_cache=False)


def test_flipped_data_byte_is_counted_and_skipped(tmp_path):
    path = tmp_path / "f.tfrec"
    records = _write_shard(path)
    clean = index_shard(path, use_cache=False)
    raw = bytearray(path.read_bytes())
    bad_at = int(clean.offsets[2]) + 3
    raw[bad_at] ^= 0xFF
    path.write_bytes(bytes(raw))
    record_start = int(clean.offsets[2]) - 12
    with pytest.warns(DataWarning, match=rf"f\.tfrec.*byte offset {record_start}"):
        idx = index_shard(path, use_cache=False)
    assert idx.num_bad == 1 and idx.labels.tolist() == [100, 101, 103, 104]
    assert read_record(str(path), int(idx.offsets[2]), int(idx.lengths[2])) == records[3]
    with pytest.raises(DataError, match=rf"f\.tfrec.*byte offset {record_start}.*CRC"):
        read_record(str(path), int(clean.offsets[2]), int(clean.lengths[2]))


@pytest.mark.parametrize("cut", [5, 20])  # inside a header; inside a payload
def test_truncated_shard_names_file_and_offset(tmp_path, cut):
    path = tmp_path / "t.tfrec"
    _write_shard(path, n=3)
    clean = index_shard(path, use_cache=False)
    last_start = int(clean.offsets[2]) - 12
    path.write_bytes(path.read_bytes()[: last_start + cut])
    with pytest.raises(DataError, match=rf"t\.tfrec: truncated shard.*byte offset {last_start}"):
        index_shard(path, use_cache=False)


def test_corrupt_length_header_raises(tmp_path):
    path = tmp_path / "h.tfrec"
    _write_shard(path, n=2)
    raw = bytearray(path.read_bytes())
    raw[1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"h\.tfrec: corrupt record header at byte offset 0"):
        index_shard(path, use_cache=False)


def test_index_cache_reused_and_invalidated(tmp_path, monkeypatch):
    path = tmp_path / "c.tfrec"
    _write_shard(path)
    cache = tmp_path / "cache"
    scans = []
    real_scan = tfr._scan_shard
    monkeypatch.setattr(tfr, "_scan_shard", lambda p, v: scans.append(v) or real_scan(p, v))

    first = index_shard(path, cache_dir=cache)
    assert len(scans) == 1 and len(list(cache.glob("*.npz"))) == 1
    again = index_shard(path, cache_dir=cache)
    assert len(scans) == 1
    np.testing.assert_array_equal(again.offsets, first.offsets)
    np.testing.assert_array_equal(again.labels, first.labels)
    index_shard(path, cache_dir=cache, verify_crc=False)  # a verified index serves it
    assert len(scans) == 1

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    index_shard(path, cache_dir=cache)
    assert len(scans) == 2
    with open(path, "ab") as f:
        f.write(frame_record(encode_example(b"new", 7)))
    assert index_shard(path, cache_dir=cache).labels.tolist()[-1] == 7
    assert len(scans) == 3


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIE_CACHE_DIR", str(tmp_path / "g"))
    assert tfr.index_cache_dir() == tmp_path / "g" / "tfrecord-index"
    path = tmp_path / "e.tfrec"
    _write_shard(path, n=1)
    index_shard(path)
    assert len(list((tmp_path / "g" / "tfrecord-index").glob("*.npz"))) == 1
