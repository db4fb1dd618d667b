"""What the Kaggle commands share: the workdir's state, credentials, listings, arguments."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from guie.kaggle import packaging
from guie.kaggle.notebooks import TEMPLATES_DIR
from guie.kaggle.platform import DEFAULT_MACHINE_SHAPE

REPO = TEMPLATES_DIR.parent
DRY_OWNER = "your-kaggle-username"  # shown by --dry-run when no credentials are set up


def connect():
    from guie.kaggle.client import KaggleClient

    return KaggleClient.connect()


def state_path(args: argparse.Namespace) -> Path:
    return Path(args.workdir) / "state.json"


def load_state(args: argparse.Namespace) -> dict:
    path = state_path(args)
    if not path.exists():
        raise ValueError(f"{path}: nothing pushed from this workdir yet (run `submit.py push`)")
    return json.loads(path.read_text())


def save_state(args: argparse.Namespace, state: dict) -> None:
    state_path(args).parent.mkdir(parents=True, exist_ok=True)
    state_path(args).write_text(json.dumps(state, indent=2) + "\n")


def git_commit(repo: Path = REPO) -> str:
    """Short commit of the working tree, '-dirty' when tracked files changed; 'unknown' without
    git."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def confirm(question: str, assume_yes: bool) -> bool:
    if assume_yes or not sys.stdin.isatty():
        return True
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def list_folder(title: str, folder: Path, extra: dict[str, Any] | None = None) -> None:
    print(title)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        print(f"  {p.relative_to(folder).as_posix():60s} {human_size(p.stat().st_size):>10s}")
    print(f"  {len(files)} files, {human_size(sum(p.stat().st_size for p in files))}")
    for name, value in (extra or {}).items():
        print(f"  {name}: {json.dumps(value, indent=2)}".replace("\n", "\n  "))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def secrets_and_owner(args: argparse.Namespace):
    """(client or None, owner, secrets): --dry-run reads credentials locally, never connects."""
    from guie.kaggle.credentials import CREATE_TOKEN, find_credentials, where_credentials_are_read

    if args.dry_run:
        credentials = find_credentials()
        if not credentials.username:
            print(f"warning: no Kaggle credentials found; the dry run names the owner "
                  f"{DRY_OWNER!r}. Looked at: {where_credentials_are_read()}. {CREATE_TOKEN}")
        return None, credentials.username or DRY_OWNER, credentials.secrets
    client = connect()
    return client, client.username, client.credentials.secrets


def wheel_download(args: argparse.Namespace) -> Callable[[Sequence[str], Path, str], None]:
    if not args.wheels_from:
        return packaging.pip_download

    def copy_from(requirements: Sequence[str], dest: Path, python_version: str) -> None:
        for wheel in Path(args.wheels_from).glob("*.whl"):
            shutil.copy2(wheel, dest / wheel.name)
    return copy_from


def machine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--machine-shape", default=DEFAULT_MACHINE_SHAPE,
                   help="Kaggle machine_shape (NvidiaTeslaT4 is 2xT4)")
    p.add_argument("--allow-unknown-machine-shape", action="store_true",
                   help="send a machine shape the kit does not know (Kaggle may give a P100)")


def common_args(p: argparse.ArgumentParser, dry_run: bool = True, poll: bool = False) -> None:
    p.add_argument("--workdir", default="build/kaggle", help="where built folders and state go")
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help="build and list; send nothing")
    if poll:
        p.add_argument("--poll-s", type=float, default=15.0, help="first polling interval")


def owned_config(args: argparse.Namespace, owner: str):
    """(config, overrides) of what is pushed: the user's overrides plus those that put the
    pushing user's name into the config's `kaggle:KAGGLE_USERNAME/...` references."""
    from guie.kaggle.notebooks import kernel_config, owner_overrides

    overrides = [*args.overrides,
                 *owner_overrides(kernel_config(args.config, args.overrides), owner)]
    return kernel_config(args.config, overrides), overrides


def standalone_main(prog: str, register: Callable, argv: list[str] | None) -> int:
    """`python -m guie_cli.<module> COMMAND ...`: one module's commands alone, with main's
    error handling."""
    from guie_cli.main import CliParser, run_parsed

    parser = CliParser(prog=prog)
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_parsed(parser, sys.argv[1:] if argv is None else argv)
