"""`data fetch` through the real kaggle client against the local fake Kaggle server."""
from __future__ import annotations

import ast
import importlib
import io
import json
import stat
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guie.config import DataSource
from guie.configs import get_config
from guie.data import fetch
from guie.data.fetch import MANIFEST, STATE, DatasetRef, FetchOptions, fetch_dataset
from guie.data.errors import DataError
from guie.data.tfrecord import encode_example, frame_record

# The Kaggle kit's fixtures (isolated home, fake credentials, the fake server, a client).
from support import kaggle_fixtures
from support.fake_server import DownloadBreak

isolated_env, fake_kaggle = kaggle_fixtures.isolated_env, kaggle_fixtures.fake_kaggle
client = kaggle_fixtures.client

OWNER = "data-owner"  # public datasets of another user, as motono0223's are
MIB = 1 << 20


def _jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _shard(labels) -> bytes:
    return b"".join(frame_record(encode_example(_jpeg(int(label)), int(label))) for label in labels)


def _options(dest: Path, **kw) -> FetchOptions:
    return FetchOptions(dest=dest, progress=False, **kw)


def _fetch(client, ref: str, dest: Path, sources=(), **kw) -> fetch.FetchResult:
    return fetch_dataset(client, DatasetRef.parse(ref), sources, _options(dest, **kw))


def _one_big_shard(sample_data) -> bytes:
    """The sample set's shards as one (framing is per record): > 1 MiB, labels 0..n-1."""
    root, _ = sample_data
    data = b"".join(p.read_bytes() for p in sorted((root / "tfrecord").glob("*.tfrec")))
    assert len(data) > MIB + 100_000
    return data


@pytest.fixture
def client_sleep(monkeypatch):
    """Replace the sleep of the kaggle client's download retries (2-60 s) with `fn`."""
    extended = importlib.import_module("kaggle.api.kaggle_api_extended")

    class Clock:
        def __init__(self, sleep):
            self.sleep = sleep

        def __getattr__(self, name):
            return getattr(time, name)

    return lambda fn: monkeypatch.setattr(extended, "time", Clock(fn))


def _rpcs(fake, method: str) -> int:
    return len(fake.rpc_calls(method))


# ----------------------------------------------------------------------------- end to end


def test_fetch_verify_stats_and_train(sample_data, fake_kaggle, client, tmp_path):
    """TFRecord shards (served zipped per file) and a CSV image folder (> one listing page, so
    one archive) are fetched, verified, described and trained on; a second fetch downloads
    nothing."""
    from guie.data.stats import write_stats
    from guie.pipeline import train

    root, (tf_src, csv_src) = sample_data
    n_tf = csv_src.label_offset
    tf_slug = f"guie-sample-tfrecords-label-0-{n_tf - 1}"
    fake_kaggle.add_dataset(f"{OWNER}/{tf_slug}", zip_files=True, files={
        p.name: p.read_bytes() for p in (root / "tfrecord").glob("*.tfrec")})
    csv_files = {p.relative_to(root / "csv").as_posix(): p.read_bytes()
                 for p in (root / "csv").rglob("*") if p.is_file()}
    assert len(csv_files) > fetch.PAGE_SIZE
    fake_kaggle.add_dataset(f"{OWNER}/guie-sample-csv", csv_files)
    sources = (replace(tf_src, location=tf_slug, kaggle_slug=f"{OWNER}/{tf_slug}"),
               replace(csv_src, location="guie-sample-csv/labels.csv",
                       kaggle_slug=f"{OWNER}/guie-sample-csv"))
    dest = tmp_path / "data"

    datasets, unfetchable = fetch.plan(sources)
    assert [d.slug for d, _ in datasets] == [tf_slug, "guie-sample-csv"] and not unfetchable
    results = [fetch_dataset(client, d, s, _options(dest)) for d, s in datasets]
    assert _rpcs(fake_kaggle, "DownloadDataset") == 4 + 1  # four shards, one archive

    tf_manifest, csv_manifest = (r.manifest for r in results)
    assert tf_manifest["mode"] == "per-file" and csv_manifest["mode"] == "archive"
    assert tf_manifest["kaggle"] == {**tf_manifest["kaggle"], "ref": f"{OWNER}/{tf_slug}",
                                     "version": 1}
    shard_record = tf_manifest["files"]["sample-train-00.tfrec"]
    assert shard_record["download"] == "sample-train-00.tfrec.zip"  # unpacked, then deleted
    assert list(shard_record["members"]) == ["sample-train-00.tfrec"]
    assert not list((dest / tf_slug).glob("*.zip"))
    tf_report, csv_report = tf_manifest["sources"][0], csv_manifest["sources"][0]
    assert (tf_report["label_min"], tf_report["label_max"]) == (0, n_tf - 1)
    assert tf_report["expected_label_range"] == [0, n_tf - 1]
    assert tf_report["images_checked"] == tf_report["records"] == sum(
        s["records"] for s in tf_report["shards"])
    assert csv_report["records"] == len(csv_files) - 1 == csv_report["images_checked"]
    assert csv_report["label_min"] == n_tf and csv_report["corrupt_records"] == 0
    assert (dest / "guie-sample-csv" / MANIFEST).is_file()

    # the manifests describe the sources; stats and training read them
    fetched = fetch.manifest_sources(dest)
    assert set(fetched) == set(sources)
    smoke = get_config("smoke")
    cfg = replace(smoke, data=replace(smoke.data, sources=fetched, root=str(dest),
                                      sample_instances=0, max_per_class=2),
                  stages=(replace(smoke.stages[0], epochs=1, cache_views=1),))
    report = write_stats(fetched, dest, cfg.data, tmp_path / "stats", grid_images=4)
    assert report["merged"]["images"] == tf_report["records"] + csv_report["records"]
    assert report["sources"]["sample_csv"]["manifest"]["version"] == 1
    assert train(cfg, str(tmp_path / "train"))["status"] == "done"
    assert (tmp_path / "train" / "stage1" / "final.pt").is_file()

    # a second fetch of the unchanged datasets lists them and downloads nothing
    fake_kaggle.calls.clear()
    fake_kaggle.downloads.clear()
    again = [fetch_dataset(client, d, s, _options(dest)) for d, s in datasets]
    assert [r.downloaded for r in again] == [[], []] and not any(r.verified for r in again)
    assert _rpcs(fake_kaggle, "DownloadDataset") == 0 and fake_kaggle.downloads == []
    assert [r.manifest for r in again] == [r.manifest for r in results]


def _add_reference_datasets(fake) -> None:
    """Tiny stand-ins for motono0223's datasets: a shard with each end of its label range."""
    for src in get_config("third_place").data.sources:
        lo, hi = fetch.expected_label_range(src.kaggle_slug)
        fake.add_dataset(src.kaggle_slug, {f"{src.name}-train-00.tfrec": _shard([lo, hi]),
                                           f"{src.name}-train-01.tfrec": _shard([hi]),
                                           f"{src.name}-val-00.tfrec": _shard([lo])})


def test_command_line_fetches_the_reference_sources_then_stats(fake_kaggle, tmp_path, capsys):
    from guie_cli.main import main

    _add_reference_datasets(fake_kaggle)
    dest, out = tmp_path / "data", tmp_path / "stats"
    # default: the third_place sources; two shards each, verified by two processes
    assert main(["data", "fetch", "--dest", str(dest), "--quiet", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "3 images" in printed and f"data.root={dest}" in printed
    slugs = [s.location for s in get_config("third_place").data.sources]
    assert sorted(p.parent.name for p in dest.glob(f"*/{MANIFEST}")) == sorted(slugs)

    assert main(["data", "stats", "--root", str(dest), "--out", str(out), "--grid", "2"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "glr2021-mini" in printed and "10691..17690" in printed and "0..17690" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["merged"]["images"] == 9 and stats["merged"]["classes"] == 6
    assert len(list(out.glob("samples-*.png"))) == 3

    # a dataset named on the command line: its sources are detected (only the train shards)
    assert main(["data", "fetch", "--dest", str(tmp_path / "one"), "--quiet",
                 "motono0223/guie-products10k-tfrecords-label-1000-10690"]) == 0
    (detected,) = fetch.manifest_sources(tmp_path / "one")
    assert detected.pattern == "*-train-*.tfrec" and detected.kind == "tfrecord"
    assert main(["data", "fetch", "--config", "smoke", "--dest", str(dest), "--quiet"]) == 2
    assert "names no Kaggle datasets" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resuming


def test_a_broken_download_resumes_without_resending(sample_data, fake_kaggle, client,
                                                     client_sleep, tmp_path):
    data = _one_big_shard(sample_data)
    fake_kaggle.add_dataset(f"{OWNER}/big-shard", {"all-train-00.tfrec": data})
    fake_kaggle.download_breaks.append(DownloadBreak("all-train-00.tfrec", at_byte=MIB))
    client_sleep(lambda seconds: None)

    result = _fetch(client, f"{OWNER}/big-shard", tmp_path)
    gets = fake_kaggle.download_requests("all-train-00.tfrec")
    assert [(g["status"], g["range"], g["sent"]) for g in gets] == [
        (200, None, MIB), (206, f"bytes={MIB}-", len(data) - MIB)]
    assert sum(g["sent"] for g in gets) == len(data)  # nothing sent twice
    assert (tmp_path / "big-shard" / "all-train-00.tfrec").read_bytes() == data
    assert result.manifest["records"] == result.manifest["sources"][0]["images_checked"] > 0


def test_an_interrupted_fetch_resumes_on_the_next_run(sample_data, fake_kaggle, client,
                                                      client_sleep, tmp_path):
    data = _one_big_shard(sample_data)
    fake_kaggle.add_dataset(f"{OWNER}/big-shard", {"all-train-00.tfrec": data})
    fake_kaggle.download_breaks.append(DownloadBreak("all-train-00.tfrec", at_byte=MIB))

    def interrupt(seconds):  # the user presses Ctrl-C while the client waits to retry
        raise KeyboardInterrupt

    client_sleep(interrupt)
    with pytest.raises(KeyboardInterrupt):
        _fetch(client, f"{OWNER}/big-shard", tmp_path)
    folder = tmp_path / "big-shard"
    assert (folder / "all-train-00.tfrec").stat().st_size == MIB
    assert (folder / "all-train-00.tfrec.kaggle-partial").is_file()  # the client's resume marker
    assert not (folder / MANIFEST).exists()

    fake_kaggle.downloads.clear()
    result = _fetch(client, f"{OWNER}/big-shard", tmp_path)
    # The client reads the headers of a first request, then asks only for the missing bytes.
    ranged = [g for g in fake_kaggle.downloads if g["range"]]
    assert [(g["status"], g["range"], g["sent"]) for g in ranged] == [
        (206, f"bytes={MIB}-", len(data) - MIB)]
    assert (folder / "all-train-00.tfrec").read_bytes() == data
    assert result.downloaded == ["all-train-00.tfrec"] and (folder / MANIFEST).is_file()


# ----------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_corrupt_shard_is_never_recorded_as_complete(damage, fake_kaggle, client, tmp_path):
    good = _shard(range(6))
    bad = (good[:20] + bytes([good[20] ^ 0xFF]) + good[21:] if damage == "flipped byte"
           else good[:-7])
    ref = f"{OWNER}/shards-label-0-9"
    fake_kaggle.add_dataset(ref, {"a-train-00.tfrec": _shard([7, 8]), "a-train-01.tfrec": bad})
    folder = tmp_path / "shards-label-0-9"

    with pytest.raises(DataError) as error:
        _fetch(client, ref, tmp_path)
    expected = "1 corrupt record(s)" if damage == "flipped byte" else "truncated shard"
    assert expected in str(error.value) and "a-train-01.tfrec" in str(error.value)
    assert not (folder / MANIFEST).exists()
    assert not (folder / "a-train-01.tfrec").exists()  # deleted: the next fetch downloads it again
    assert list(json.loads((folder / STATE).read_text())["files"]) == ["a-train-00.tfrec"]

    if damage == "flipped byte":  # accepted when asked for, and listed
        accepted = _fetch(client, ref, tmp_path, max_corrupt_records=1).manifest
        assert accepted["corrupt_records"] == 1
        assert "byte offset 0" in accepted["sources"][0]["corrupt"][0]

    fake_kaggle.add_dataset(ref, {"a-train-00.tfrec": _shard([7, 8]), "a-train-01.tfrec": good})
    fake_kaggle.calls.clear()
    result = _fetch(client, ref, tmp_path)
    assert result.manifest["kaggle"]["version"] == 2 and result.manifest["corrupt_records"] == 0
    assert sorted(result.downloaded) == ["a-train-00.tfrec", "a-train-01.tfrec"]  # a new version
    assert result.manifest["records"] == 8


def _zip(members: dict[str, bytes], damage_at: int | None = None, link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    data = bytearray(buffer.getvalue())
    if damage_at is not None:
        data[damage_at] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("archive, message", [
    (_zip({"labels.csv": b"path,label\n" * 50}, damage_at=30 + len("labels.csv") + 5),
     "corrupt archive.*CRC"),
    (_zip({"ok.csv": b"path,label\n", "../../evil.csv": b"x"}), "unsafe path '../../evil.csv'"),
    (_zip({"ok.csv": b"path,label\n"}, link="images"), "member 'images' is a link"),
], ids=["bad-crc", "path-traversal", "link"])
def test_a_bad_archive_gives_a_clear_error_and_leaves_nothing(archive, message, fake_kaggle,
                                                              client, tmp_path):
    fake_kaggle.add_dataset(f"{OWNER}/zipped-images", {"images.zip": archive})
    with pytest.raises(DataError, match=message):
        _fetch(client, f"{OWNER}/zipped-images", tmp_path / "data")
    folder = tmp_path / "data" / "zipped-images"
    assert sorted(p.name for p in folder.iterdir()) == []  # no members, no zip, no manifest
    assert not list(tmp_path.rglob("evil.csv"))


def test_a_download_that_fails_its_checksum_is_deleted(fake_kaggle, client, tmp_path):
    fake_kaggle.add_dataset(f"{OWNER}/shards", {"a-train-00.tfrec": _shard([1, 2])})
    fake_kaggle.corrupt_transfer.add("a-train-00.tfrec")
    with pytest.raises(DataError, match="does not match the server's crc32c"):
        _fetch(client, f"{OWNER}/shards", tmp_path)
    assert not (tmp_path / "shards" / "a-train-00.tfrec").exists()
    fake_kaggle.corrupt_transfer.clear()
    assert _fetch(client, f"{OWNER}/shards", tmp_path).manifest["records"] == 2
    again = _fetch(client, f"{OWNER}/shards", tmp_path, reverify=True)
    assert again.verified and again.downloaded == []


def test_labels_outside_the_named_range_or_num_classes_are_errors(fake_kaggle, client, tmp_path):
    fake_kaggle.add_dataset(f"{OWNER}/set-label-0-9", {"s-train-00.tfrec": _shard([3, 12])})
    with pytest.raises(DataError, match=r"1 record\(s\) have labels outside 0..9"):
        _fetch(client, f"{OWNER}/set-label-0-9", tmp_path)
    fake_kaggle.add_dataset(f"{OWNER}/set", {"s-train-00.tfrec": _shard([3, 12])})
    with pytest.raises(DataError, match="not below the config's num_classes 10"):
        _fetch(client, f"{OWNER}/set", tmp_path, num_classes=10)
    assert not list(tmp_path.glob(f"*/{MANIFEST}"))


def test_plan_checks_locations_and_default_config_names_the_reference_sets():
    datasets, _ = fetch.plan(get_config("third_place").data.sources)
    assert [d.ref for d, _ in datasets] == [
        "motono0223/guie-imagenet1k-mini1-tfrecords-label-0-999",
        "motono0223/guie-products10k-tfrecords-label-1000-10690",
        "motono0223/guie-glr2021mini-tfrecords-label-10691-17690"]
    outside = DataSource("x", "csv", "elsewhere/labels.csv", kaggle_slug="o/my-set")
    with pytest.raises(DataError, match="set location to 'my-set'"):
        fetch.plan([outside])
    with pytest.raises(ValueError, match="owner/slug"):
        DatasetRef.parse("just-a-slug")
    assert DatasetRef.parse("o/s/3") == DatasetRef("o", "s", 3)


def test_the_data_layer_imports_nothing_of_the_kaggle_layer():
    """`fetch` reaches Kaggle only through the host it is given (guie.data.remote.DatasetHost)."""
    offenders = []
    for path in sorted(Path(fetch.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in (
                "kaggle", "kagglesdk") or n.startswith("guie.kaggle")]
    assert offenders == []
