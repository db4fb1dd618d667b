"""TFRecord shards (motono0223's GUIE data sets) without TensorFlow.

A record is `uint64 LE length | masked CRC-32C(length bytes) | data | masked CRC-32C(data)`
and each payload is a `tf.train.Example` whose protobuf we encode and parse by hand:
Example{1: Features{1: map<string, Feature>}}, Feature oneof {1 BytesList, 2 FloatList,
3 Int64List}, each list's field 1 repeated (numbers packed or not; both are parsed).

Training reads records at random, so a shard is indexed once (offsets, lengths and labels of
its payloads) and the index is cached as a sidecar under `index_cache_dir()`: Kaggle inputs
are read-only, so the cache never lives next to the shard. `read_record` then fetches a
payload with one `pread`.

Damage policy (why: a bad record is recoverable, a broken framing is not):
- data CRC mismatch: the record is counted in `ShardIndex.num_bad`, skipped, and a warning
  names the file and offset; the records after it are still read.
- truncated shard (short header, or a length that runs past the end of the file) or a
  length-CRC mismatch: `DataError` naming the file and byte offset. No partial index is
  kept: a truncated download should be fixed, not trained on silently.
- a payload with a valid CRC that is not a parseable Example: `DataError`, file and offset.
"""
from __future__ import annotations

import hashlib
import os
import struct
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from guie.data.errors import DataError, DataWarning

LABEL_KEY = "image/class/label"
IMAGE_KEY = "image/encoded"
DOMAIN_KEY = "image/domain"  # optional; our sample data sets write it, motono's shards do not
_HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of it
_FOOTER_BYTES = 4
_MASK_DELTA = 0xA282EAD8
_READ_BUFFER_BYTES = 1 << 20
_MAX_OPEN_FILES = 128


if google_crc32c.implementation != "c":
    warnings.warn(
        "google_crc32c is using its pure-Python fallback; CRC checks over tens of GB of shards "
        "will be very slow (reinstall google-crc32c with its C extension, or verify_crc=False)",
        RuntimeWarning, stacklevel=2,
    )


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


# --- protobuf encoding -------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _encode_feature(key: str, values: list, packed: bool) -> bytes:
    if all(isinstance(v, (bytes, bytearray)) for v in values):
        inner = b"".join(_len_field(1, bytes(v)) for v in values)
        feature = _len_field(1, inner)
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if packed:
            inner = _len_field(1, b"".join(_varint(int(v)) for v in values))
        else:
            inner = b"".join(_varint(1 << 3) + _varint(int(v)) for v in values)
        feature = _len_field(3, inner)
    elif all(isinstance(v, (float, np.floating)) for v in values):
        if packed:
            inner = _len_field(1, struct.pack(f"<{len(values)}f", *values))
        else:
            inner = b"".join(_varint((1 << 3) | 5) + struct.pack("<f", v) for v in values)
        feature = _len_field(2, inner)
    else:
        raise TypeError(f"feature {key!r}: values must be all bytes, all ints or all floats")
    entry = _len_field(1, key.encode()) + _len_field(2, feature)
    return _len_field(1, entry)


def encode_features(features: Mapping[str, list], packed: bool = True) -> bytes:
    """Serialize a tf.train.Example from {key: [bytes...] | [int...] | [float...]}."""
    body = b"".join(_encode_feature(k, list(v), packed) for k, v in features.items())
    return _len_field(1, body)


def encode_example(image_bytes: bytes, label: int, domain: str | None = None) -> bytes:
    """The Example motono0223's shards hold; `domain` adds an optional `image/domain`."""
    features: dict[str, list] = {IMAGE_KEY: [bytes(image_bytes)], LABEL_KEY: [int(label)]}
    if domain is not None:
        features[DOMAIN_KEY] = [domain.encode()]
    return encode_features(features)


# --- protobuf parsing --------------------------------------------------------------------

def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DataError(f"malformed tf.train.Example: varint runs past byte {end}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DataError(f"malformed tf.train.Example: varint too long at byte {pos}")


def _fields(buf: memoryview, pos: int, end: int):
    """Yield (field number, wire type, value) of one message; value is an int or a span."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 2:
            size, pos = _read_varint(buf, pos, end)
            value, pos = (pos, pos + size), pos + size
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise DataError(f"malformed tf.train.Example: wire type {wire} at byte {pos}")
        if pos > end:
            raise DataError(f"malformed tf.train.Example: field {number} runs past byte {end}")
        yield number, wire, value


def _to_int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_list(buf: memoryview, kind: int, start: int, end: int) -> list:
    out: list = []
    for number, wire, value in _fields(buf, start, end):
        if number != 1:
            continue
        if kind == 1 and wire == 2:
            out.append(bytes(buf[value[0]:value[1]]))
        elif kind == 3 and wire == 0:
            out.append(_to_int64(value))
        elif kind == 3 and wire == 2:  # packed
            pos, stop = value
            while pos < stop:
                v, pos = _read_varint(buf, pos, stop)
                out.append(_to_int64(v))
        elif kind == 2 and wire == 5:
            out.append(struct.unpack_from("<f", buf, value[0])[0])
        elif kind == 2 and wire == 2:  # packed
            count, rest = divmod(value[1] - value[0], 4)
            if rest:
                raise DataError("malformed tf.train.Example: packed floats not a multiple of 4")
            out.extend(struct.unpack_from(f"<{count}f", buf, value[0]))
        else:
            raise DataError(f"malformed tf.train.Example: list kind {kind} has wire type {wire}")
    return out


def parse_example(data: bytes, keys: Iterable[str] | None = None) -> dict[str, list]:
    """Parse a serialized tf.train.Example into {key: list}; `keys` limits what is decoded.

    Raises DataError on a malformed message (the caller adds the file and offset)."""
    buf = memoryview(data)
    wanted = None if keys is None else set(keys)
    out: dict[str, list] = {}
    for n1, w1, features in _fields(buf, 0, len(buf)):
        if n1 != 1 or w1 != 2:
            continue
        for n2, w2, entry in _fields(buf, *features):
            if n2 != 1 or w2 != 2:
                continue
            key, feature = None, None
            for n3, w3, span in _fields(buf, *entry):
                if n3 == 1 and w3 == 2:
                    key = bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")
                elif n3 == 2 and w3 == 2:
                    feature = span
            if key is None or (wanted is not None and key not in wanted):
                continue
            values: list = []
            if feature is not None:
                for kind, w4, span in _fields(buf, *feature):
                    if kind in (1, 2, 3) and w4 == 2:
                        values = _parse_list(buf, kind, *span)
            out[key] = values
    return out


# --- record framing ----------------------------------------------------------------------

def frame_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + bytes(data)
            + struct.pack("<I", masked_crc32c(data)))


def write_tfrecord(path: str | Path, records: Iterable[bytes]) -> int:
    """Write framed records to `path`; returns how many were written."""
    count = 0
    with open(path, "wb") as f:
        for data in records:
            f.write(frame_record(data))
            count += 1
    return count


@dataclass
class ShardIndex:
    """Where each good record's payload lies in one shard, and its label."""

    path: str
    offsets: np.ndarray  # int64, byte offset of each payload (after the 12-byte header)
    lengths: np.ndarray  # int64, payload bytes
    labels: np.ndarray  # int64
    domains: np.ndarray | None  # str, from `image/domain` when every record has one
    num_bad: int  # records skipped for a data CRC mismatch

    def __len__(self) -> int:
        return len(self.offsets)


def index_cache_dir() -> Path:
    """`$GUIE_CACHE_DIR/tfrecord-index`, default `~/.cache/guie/tfrecord-index`."""
    base = os.environ.get("GUIE_CACHE_DIR") or Path.home() / ".cache" / "guie"
    return Path(base) / "tfrecord-index"


def _cache_file(cache_dir: Path, path: str, st: os.stat_result, verify: bool) -> Path:
    key = f"v1|{path}|{st.st_size}|{st.st_mtime_ns}|{int(verify)}"
    return cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")


def _load_cached(file: Path, path: str) -> ShardIndex | None:
    try:
        with np.load(file) as z:
            domains = z["domains"] if z["has_domains"] else None
            return ShardIndex(path, z["offsets"], z["lengths"], z["labels"], domains,
                              int(z["num_bad"]))
    except (OSError, KeyError, ValueError):
        return None  # missing or unreadable sidecar: index again


def _save_cached(file: Path, index: ShardIndex) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npz")
        has = index.domains is not None
        np.savez(tmp, offsets=index.offsets, lengths=index.lengths, labels=index.labels,
                 domains=index.domains if has else np.array([], dtype=str),
                 has_domains=np.array(has), num_bad=np.array(index.num_bad))
        os.replace(tmp, file)  # atomic: concurrent indexers never see half a sidecar
    except OSError as e:
        warnings.warn(f"could not cache the index of {index.path} in {file.parent}: {e}",
                      DataWarning, stacklevel=3)


def _scan_shard(path: str, verify_crc: bool) -> ShardIndex:
    size = os.path.getsize(path)
    offsets: list[int] = []
    lengths: list[int] = []
    labels: list[int] = []
    domains: list[str] = []
    num_bad = 0
    pos = 0
    wanted = (LABEL_KEY, DOMAIN_KEY)
    with open(path, "rb", buffering=_READ_BUFFER_BYTES) as f:
        while pos < size:
            header = f.read(_HEADER_BYTES)
            if len(header) < _HEADER_BYTES:
                raise DataError(f"{path}: truncated shard: record header at byte offset {pos} "
                                f"has {len(header)} of {_HEADER_BYTES} bytes")
            (length,) = struct.unpack_from("<Q", header)
            if verify_crc and struct.unpack_from("<I", header, 8)[0] != masked_crc32c(header[:8]):
                raise DataError(f"{path}: corrupt record header at byte offset {pos} (length "
                                "CRC mismatch); the records after it cannot be located")
            data_at = pos + _HEADER_BYTES
            if data_at + length + _FOOTER_BYTES > size:
                raise DataError(f"{path}: truncated shard: record at byte offset {pos} needs "
                                f"{length + _FOOTER_BYTES} bytes after its header but "
                                f"{size - data_at} remain (re-download the shard)")
            data = f.read(length)
            footer = f.read(_FOOTER_BYTES)
            pos = data_at + length + _FOOTER_BYTES
            if verify_crc and struct.unpack("<I", footer)[0] != masked_crc32c(data):
                num_bad += 1
                warnings.warn(f"{path}: record at byte offset {data_at - _HEADER_BYTES} fails "
                              "its data CRC; skipped", DataWarning, stacklevel=3)
                continue
            try:
                feats = parse_example(data, wanted)
            except DataError as e:
                raise DataError(f"{path}: record at byte offset {data_at - _HEADER_BYTES}: "
                                f"{e}") from None
            if not feats.get(LABEL_KEY):
                raise DataError(f"{path}: record at byte offset {data_at - _HEADER_BYTES} has "
                                f"no {LABEL_KEY!r}")
            offsets.append(data_at)
            lengths.append(length)
            labels.append(feats[LABEL_KEY][0])
            if feats.get(DOMAIN_KEY):
                domains.append(feats[DOMAIN_KEY][0].decode("utf-8", "replace"))
    return ShardIndex(
        path, np.asarray(offsets, np.int64), np.asarray(lengths, np.int64),
        np.asarray(labels, np.int64),
        np.asarray(domains, dtype=str) if domains and len(domains) == len(offsets) else None,
        num_bad,
    )


def index_shard(path: str | Path, verify_crc: bool = True, cache_dir: str | Path | None = None,
                use_cache: bool = True) -> ShardIndex:
    """Index one shard by streaming it (never held in memory), with a cached sidecar.

    The sidecar is keyed by (absolute path, size, mtime_ns, verify_crc), so a re-downloaded
    shard is indexed again. A verified index also serves verify_crc=False."""
    path = os.path.abspath(path)
    if not use_cache:
        return _scan_shard(path, verify_crc)
    st = os.stat(path)
    cache = Path(cache_dir) if cache_dir is not None else index_cache_dir()
    for verify in sorted({True, verify_crc}, reverse=True):
        cached = _load_cached(_cache_file(cache, path, st, verify), path)
        if cached is not None:
            return cached
    index = _scan_shard(path, verify_crc)
    _save_cached(_cache_file(cache, path, st, verify_crc), index)
    return index


# --- random access -----------------------------------------------------------------------

_open_files: OrderedDict[str, int] = OrderedDict()
_open_files_pid = os.getpid()


def _fd(path: str) -> int:
    """A lazily opened descriptor per file and process (DataLoader workers fork)."""
    global _open_files_pid
    if _open_files_pid != os.getpid():
        for fd in _open_files.values():
            os.close(fd)
        _open_files.clear()
        _open_files_pid = os.getpid()
    fd = _open_files.get(path)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        _open_files[path] = fd
        if len(_open_files) > _MAX_OPEN_FILES:
            os.close(_open_files.popitem(last=False)[1])
    else:
        _open_files.move_to_end(path)
    return fd


def read_record(path: str, offset: int, length: int, verify_crc: bool = True) -> bytes:
    """The payload at `offset` (from a ShardIndex); with verify_crc, its framing and CRCs
    are checked too. Raises DataError naming the file and offset."""
    fd = _fd(str(path))
    if not verify_crc:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise DataError(f"{path}: truncated record at byte offset {offset}")
        return data
    start = offset - _HEADER_BYTES
    raw = os.pread(fd, length + _HEADER_BYTES + _FOOTER_BYTES, start)
    if len(raw) != length + _HEADER_BYTES + _FOOTER_BYTES:
        raise DataError(f"{path}: truncated record at byte offset {start}")
    header = raw[:8]
    if (struct.unpack_from("<Q", raw)[0] != length
            or struct.unpack_from("<I", raw, 8)[0] != masked_crc32c(header)):
        raise DataError(f"{path}: no record header at byte offset {start} (stale index?)")
    data = raw[_HEADER_BYTES:-_FOOTER_BYTES]
    if struct.unpack_from("<I", raw, len(raw) - _FOOTER_BYTES)[0] != masked_crc32c(data):
        raise DataError(f"{path}: record at byte offset {start} fails its data CRC")
    return data
