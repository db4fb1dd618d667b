"""Packing the source and wheels datasets; the hash check the kernels run on Kaggle."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from support.kaggle_fixtures import KEY, make_wheel
from guie.kaggle import packaging
from guie.kaggle.packaging import (PackagingError, SecretLeakError, SourceMismatchError,
                                   build_wheels_dataset, dataset_metadata, install_wheels,
                                   pack_file_dataset, pack_source, scan_for_secrets, source_hash,
                                   verify_source_hash)

REPO = Path(__file__).resolve().parents[2]


def write_template(path: Path, slug: str = "guie-kit-src", title: str = "GUIE kit source",
                   licenses: list | None = None) -> Path:
    path.write_text(json.dumps({"id": f"KAGGLE_USERNAME/{slug}", "title": title,
                                "licenses": (licenses if licenses is not None
                                             else [{"name": "CC0-1.0"}])}))
    return path


@pytest.fixture
def package(tmp_path: Path) -> Path:
    root = tmp_path / "pkg" / "guie"
    files = {"__init__.py": "", "config.py": "A = 1\n", "data/reader.py": "B = 2\n",
             "model_configs/tiny.json": "{}", "__pycache__/config.cpython-311.pyc": "junk",
             "tests/test_x.py": "", "notes.txt": "not package data", ".env": "SECRET=1",
             "guie.egg-info/PKG-INFO": "x", "data/.ipynb_checkpoints/reader.py": ""}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_pack_source_takes_only_code_and_package_data(package, tmp_path):
    packed = pack_source(package, tmp_path / "out", write_template(tmp_path / "meta.json"), "me",
                         [KEY])
    assert [rel for rel, _ in packed.files] == [
        "src/guie/__init__.py", "src/guie/config.py", "src/guie/data/reader.py",
        "src/guie/model_configs/tiny.json", "guie-source.json"]
    # the marker by which the kernels find the dataset in any mount layout
    marker = json.loads((packed.folder / "guie-source.json").read_text())
    assert marker["hash"] == packed.content_hash
    on_disk = sorted(p.relative_to(packed.folder).as_posix() for p in packed.folder.rglob("*")
                     if p.is_file())
    assert on_disk == sorted(["dataset-metadata.json", *[rel for rel, _ in packed.files]])
    assert packed.ref == "me/guie-kit-src"
    meta = json.loads((packed.folder / "dataset-metadata.json").read_text())
    assert meta["id"] == "me/guie-kit-src"
    assert (packed.content_hash == source_hash(package)
            == source_hash(packed.folder / "src" / "guie"))


def test_hash_changes_with_content_and_names(package):
    before = source_hash(package)
    (package / "config.py").write_text("A = 2\n")
    changed = source_hash(package)
    (package / "config.py").rename(package / "config2.py")
    assert len({before, changed, source_hash(package)}) == 3
    (package / "__pycache__" / "new.pyc").write_text("ignored")
    assert source_hash(package) == source_hash(package)


def test_pack_refuses_the_key_and_kaggle_json(package, tmp_path):
    template = write_template(tmp_path / "meta.json")
    (package / "leak.py").write_text(f'KEY = "{KEY}"\n')
    with pytest.raises(SecretLeakError, match="leak.py: contains your Kaggle key"):
        pack_source(package, tmp_path / "out", template, "me", [KEY])
    (package / "leak.py").unlink()
    (package / "model_configs" / "kaggle.json").write_text('{"username": "me"}')
    with pytest.raises(SecretLeakError, match="kaggle.json: refusing"):
        pack_source(package, tmp_path / "out", template, "me", [KEY])


def test_secret_scan_finds_a_key_across_chunk_borders(tmp_path, monkeypatch):
    monkeypatch.setattr(packaging, "_CHUNK_BYTES", 7)
    big = tmp_path / "weights.bin"
    big.write_bytes(b"\0" * 30 + KEY.encode() + b"\0" * 30)
    with pytest.raises(SecretLeakError):
        scan_for_secrets([big], [KEY])
    big.write_bytes(b"\0" * 100)
    scan_for_secrets([big], [KEY])


@pytest.mark.parametrize("layout", ["src", "root", "zip"])
def test_verify_source_hash_in_every_layout_kaggle_may_mount(package, tmp_path, layout):
    packed = pack_source(package, tmp_path / "out", write_template(tmp_path / "meta.json"), "me",
                         [])
    mounted = tmp_path / "mounted"
    if layout == "src":
        shutil.copytree(packed.folder / "src", mounted / "src")
        package_dir = mounted / "src" / "guie"
    elif layout == "root":
        shutil.copytree(packed.folder / "src", mounted)
        package_dir = mounted / "guie"
    else:
        mounted.mkdir()
        with zipfile.ZipFile(mounted / "src.zip", "w") as z:
            for p in (packed.folder / "src").rglob("*"):
                z.write(p, p.relative_to(packed.folder / "src").as_posix())
        package_dir = mounted / "src.zip" / "guie"
    verify_source_hash(package_dir, packed.content_hash)
    with pytest.raises(SourceMismatchError, match="Kaggle attached another version"):
        verify_source_hash(package_dir, "0" * 64)


def test_dataset_metadata_fills_owner_and_validates(tmp_path):
    meta = dataset_metadata(write_template(tmp_path / "a.json"), "alice")
    assert meta["id"] == "alice/guie-kit-src"
    for kwargs, match in [({"slug": "short"}, "slug"), ({"title": "tiny"}, "title"),
                          ({"licenses": []}, "license"),
                          ({"licenses": [{"name": "CC0-1.0"}, {"name": "other"}]}, "license"),
                          ({"slug": "Bad_Slug_Name"}, "slug")]:
        with pytest.raises(PackagingError, match=match):
            dataset_metadata(write_template(tmp_path / "b.json", **kwargs), "alice")
    with pytest.raises(PackagingError, match="owner/slug"):
        dataset_metadata(write_template(tmp_path / "c.json"), "KAGGLE_USERNAME")


def test_repository_dataset_metadata_is_valid():
    for name in ("guie-src", "guie-wheels"):
        meta = dataset_metadata(REPO / "datasets-metadata" / name / "dataset-metadata.json",
                                "alice")
        assert meta["id"].startswith("alice/") and 20 <= len(meta["subtitle"]) <= 80


def test_wheels_description_names_exactly_the_wheels_it_holds():
    """The wheels dataset's page says what it holds: each pinned wheel, and nothing it does not
    hold among the wheels (wcwidth comes with Kaggle's image)."""
    import re

    meta = json.loads((REPO / "datasets-metadata" / "guie-wheels" / "dataset-metadata.json")
                      .read_text())
    held = re.search(r"Pure-Python wheels \(([^)]*)\)", meta["description"]).group(1)
    assert held.split(", ") == [r.replace("==", " ") for r in packaging.WHEEL_REQUIREMENTS]
    licensed = re.search(r"upstream license \(([^)]*)\)", meta["description"]).group(1)
    assert [part.split(":")[0] for part in licensed.split("; ")] == [
        r.split("==")[0] for r in packaging.WHEEL_REQUIREMENTS]


def local_download(source: Path):
    def download(requirements, dest: Path, python_version: str) -> None:
        for wheel in source.glob("*.whl"):
            shutil.copy2(wheel, dest / wheel.name)
    return download


def test_build_wheels_dataset_with_an_injected_download(tmp_path):
    source = tmp_path / "wheelhouse"
    for dist, version in [("open_clip_torch", "3.3.0"), ("ftfy", "6.3.1"), ("wcwidth", "0.9.4"),
                          ("unrelated", "1.0")]:
        make_wheel(source, dist, version)
    template = write_template(tmp_path / "meta.json", slug="guie-kit-wheels",
                              title="GUIE kit wheels", licenses=[{"name": "other"}])
    packed = build_wheels_dataset(tmp_path / "out", template, "me", [KEY], "3.12",
                                  download=local_download(source))
    assert sorted(name for name, _ in packed.files) == [
        "ftfy-6.3.1-py3-none-any.whl", "open_clip_torch-3.3.0-py3-none-any.whl"]
    marker = json.loads((packed.folder / "guie-wheels.json").read_text())
    assert marker["requirements"] == list(packaging.WHEEL_REQUIREMENTS)
    assert marker["python_version"] == "3.12"
    assert not (packed.folder / "unrelated-1.0-py3-none-any.whl").exists()
    assert packed.ref == "me/guie-kit-wheels"


def test_wheels_dataset_refuses_missing_or_platform_wheels(tmp_path):
    template = write_template(tmp_path / "meta.json", slug="guie-kit-wheels",
                              title="GUIE kit wheels")
    source = tmp_path / "wheelhouse"
    make_wheel(source, "open_clip_torch", "3.3.0")
    with pytest.raises(PackagingError, match="no wheel for ftfy==6.3.1"):
        build_wheels_dataset(tmp_path / "out", template, "me", [], "3.11",
                             download=local_download(source))
    make_wheel(source, "ftfy", "6.3.1", tag="cp311-cp311-linux_x86_64")
    with pytest.raises(PackagingError, match="not a pure-Python wheel"):
        build_wheels_dataset(tmp_path / "out", template, "me", [], "3.11",
                             download=local_download(source))


def test_install_wheels_skips_what_is_installed(tmp_path):
    wheels = tmp_path / "wheels"
    for requirement in packaging.WHEEL_REQUIREMENTS:  # this environment has these pins
        make_wheel(wheels, *requirement.split("=="))
    assert install_wheels(wheels) == []
    assert install_wheels(tmp_path / "not-attached") == []


def test_pack_file_dataset_links_the_file(tmp_path):
    weights = tmp_path / "ViT-H-14.bin"
    weights.write_bytes(b"\1" * 1000)
    meta = {"id": "me/guie-weights-vit-h-14", "title": "GUIE weights ViT-H-14",
            "licenses": [{"name": "other"}]}
    packed = pack_file_dataset(weights, tmp_path / "out", meta, [KEY])
    assert packed.files == (("ViT-H-14.bin", 1000),)
    assert (packed.folder / "ViT-H-14.bin").read_bytes() == weights.read_bytes()
    weights.write_bytes(KEY.encode())
    with pytest.raises(SecretLeakError):
        pack_file_dataset(weights, tmp_path / "out", meta, [KEY])


def test_unmet_requirements_names_what_is_missing_or_too_old():
    versions = {"timm": "1.0.15", "regex": "2024.1.1", "torch": "2.4.0+cu121"}
    problems = packaging.unmet_requirements(
        ["torch>=2.0", "timm>=1.0.17", "regex", "safetensors",
         "webdataset<=0.2.86; extra == 'training'", "huggingface-hub[cli]>=0.20,<3"],
        installed=versions.get)
    assert problems == ["timm 1.0.15 is installed, but timm>=1.0.17 is needed",
                        "safetensors is missing (needed: safetensors)",
                        "huggingface-hub is missing (needed: huggingface-hub[cli]>=0.20,<3)"]
    assert packaging.unmet_requirements(["a~=1.4", "b!=2.0", "c<3"], {"a": "1.9", "b": "2.0.1",
                                                                      "c": "3.0"}.get) == [
        "c 3.0 is installed, but c<3 is needed"]


def test_check_requirements_passes_here_and_names_a_missing_need(monkeypatch):
    packaging.check_requirements(packaging.CHECKED_DISTRIBUTIONS)  # this venv has open_clip's needs
    real = packaging._installed
    monkeypatch.setattr(packaging, "_installed",
                        lambda name: None if name == "timm" else real(name))
    with pytest.raises(PackagingError, match="open_clip_torch needs it: timm is missing"):
        packaging.check_requirements(packaging.CHECKED_DISTRIBUTIONS)


def test_pip_download_asks_for_pure_wheels_for_kaggles_python(tmp_path):
    command = packaging.pip_download_command(["ftfy==6.3.1"], tmp_path, "3.11")
    for flag, value in (("--platform", "any"), ("--implementation", "py"), ("--abi", "none"),
                        ("--python-version", "3.11")):
        assert command[command.index(flag) + 1] == value
    assert "--only-binary=:all:" in command and "--no-deps" in command


@pytest.mark.slow
def test_real_pip_download_installs_offline_and_imports_open_clip(tmp_path):
    """The registry as it is today: pure wheels for Kaggle's Python, installed with --no-index
    into a scratch target, and open_clip imported from there (not from this venv)."""
    import subprocess
    import sys

    from guie.kaggle.platform import KAGGLE_PYTHON_FALLBACK

    template = write_template(tmp_path / "meta.json", slug="guie-kit-wheels",
                              title="GUIE kit wheels", licenses=[{"name": "other"}])
    packed = build_wheels_dataset(tmp_path / "wheels", template, "me", [KEY],
                                  KAGGLE_PYTHON_FALLBACK)
    names = sorted(name for name, _ in packed.files)
    assert len(names) == len(packaging.WHEEL_REQUIREMENTS)
    assert all(name.endswith("-none-any.whl") for name in names), names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                    "--target", str(target), *(str(packed.folder / n) for n in names)], check=True)
    probe = ("import open_clip, ftfy; print(open_clip.__file__); print(ftfy.__file__); "
             "print(sorted(open_clip.list_models())[:1])")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                          check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target)), lines
