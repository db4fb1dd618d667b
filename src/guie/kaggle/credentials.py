"""The user's Kaggle credentials, read locally, and the client class, imported quietly."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Credentials:
    username: str | None
    secrets: tuple[str, ...]  # key and tokens: nothing uploaded may contain these
    source: str  # where they were found, for error messages


def kaggle_config_dir() -> Path:
    """Where the client looks for kaggle.json (its own rule, re-evaluated now, not at import)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home_dir = Path(os.path.expanduser("~")) / ".kaggle"
    if sys.platform.startswith("linux") and not home_dir.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(xdg) / "kaggle"
    return home_dir


def where_credentials_are_read() -> str:
    """Where the client looks for credentials, in its order, with this machine's paths: said
    the same way by `push --dry-run`, the client's auth error and the README."""
    home_dir = Path(os.path.expanduser("~")) / ".kaggle"
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    places = ["KAGGLE_USERNAME + KAGGLE_KEY in the environment",
              f"KAGGLE_CONFIG_DIR/kaggle.json (KAGGLE_CONFIG_DIR is "
              f"{os.environ.get('KAGGLE_CONFIG_DIR') or 'not set'})",
              f"{home_dir}/kaggle.json when {home_dir} exists, "
              f"else {Path(xdg) / 'kaggle'}/kaggle.json",
              "KAGGLE_API_TOKEN (a token or a file holding one)"]
    return "; ".join(places)


CREATE_TOKEN = ("Create an API token at https://www.kaggle.com/settings/api and save the "
                "downloaded kaggle.json there (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY.")


def find_credentials() -> Credentials:
    """Read the user's Kaggle credentials locally, without any network call."""
    secrets: list[str] = []
    username = os.environ.get("KAGGLE_USERNAME")
    source = "KAGGLE_USERNAME/KAGGLE_KEY" if username else "an access token"
    if os.environ.get("KAGGLE_KEY"):
        secrets.append(os.environ["KAGGLE_KEY"])
    config = kaggle_config_dir() / "kaggle.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text() or "{}")
        except json.JSONDecodeError:
            data = {}
        if data.get("key"):
            secrets.append(str(data["key"]))
        if not username and data.get("username"):
            username, source = str(data["username"]), str(config)
    for token_file in (Path(os.path.expanduser("~/.kaggle/access_token")),
                       Path(os.path.expanduser("~/.kaggle/access_token.txt"))):
        if token_file.is_file() and token_file.read_text().strip():
            secrets.append(token_file.read_text().strip())
    if os.environ.get("KAGGLE_API_TOKEN"):
        token = os.environ["KAGGLE_API_TOKEN"]
        secrets.append(Path(token).read_text().strip() if Path(token).is_file() else token)
    return Credentials(username, tuple(s for s in secrets if s), source)


def import_kaggle_api() -> type:
    # `import kaggle` authenticates at import and prints a help text when credentials are missing;
    # that text would interleave with our own output, so it is swallowed here and we raise
    # our own clear error from `KaggleClient.connect` instead.
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi
