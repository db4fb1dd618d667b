"""Fixtures and helpers the Kaggle kit's tests share: an isolated home, fake credentials, the
fake server and a client on it, and stand-in wheels.

The real `kaggle` client is used throughout; the only thing changed is where it connects
(kagglesdk's PROD endpoint entry, the way the field guide describes). tests/kaggle/conftest.py
registers these fixtures for the Kaggle tests; other test modules (tests/data/test_fetch.py)
import them by name.
"""
from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import pytest
from kagglesdk import kaggle_env

from support.fake_server import FakeKaggle

USERNAME = "fake-user"
KEY = "fake-key-5f1d0c3a9b7e4d21"  # distinctive, so a leak check cannot match by chance


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, TMPDIR and KAGGLE_CONFIG_DIR under tmp_path; fake credentials; no proxies."""
    home, tmp, config = tmp_path / "home", tmp_path / "tmp", tmp_path / "home" / ".kaggle"
    for d in (home, tmp, config):
        d.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR (resumable upload state)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    monkeypatch.setenv("KAGGLE_USERNAME", USERNAME)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_API_ENVIRONMENT", "XDG_CONFIG_HOME", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path


@pytest.fixture
def fake_kaggle(isolated_env: Path, monkeypatch: pytest.MonkeyPatch):
    server = FakeKaggle(USERNAME, KEY).start()
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, server.url)
    yield server
    server.stop()


@pytest.fixture
def client(fake_kaggle: FakeKaggle):
    from guie.kaggle.client import KaggleClient
    from guie.kaggle.results import RetryPolicy

    return KaggleClient.connect(retry=RetryPolicy(initial_delay_s=0.01, max_delay_s=0.05))


def make_wheel(folder: Path, dist: str, version: str, tag: str = "py3-none-any") -> Path:
    """A minimal wheel file (name and dist-info), enough for packing and name checks."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return path


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    """Local wheels for the pinned requirements, standing in for `pip download`."""
    from guie.kaggle.packaging import WHEEL_REQUIREMENTS

    folder = tmp_path / "wheelhouse"
    for requirement in WHEEL_REQUIREMENTS:
        make_wheel(folder, *requirement.split("=="))
    return folder
