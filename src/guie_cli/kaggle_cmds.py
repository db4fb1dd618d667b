"""Kaggle commands: `push`, `status`, `submit`, `leaderboard`, `push-weights`.

Everything that would write to Kaggle takes `--dry-run`: it builds the same folders, lists what
would be sent (files, sizes, metadata) and sends nothing. No command prompts when stdin is not a
terminal. What `push` built and sent is recorded in <workdir>/state.json for the other commands.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from guie.kaggle import packaging
from guie.kaggle.notebooks import (DEFAULT_MACHINE_SHAPE, KAGGLE_INPUT, TEMPLATES_DIR,
                                   NotebookError, kernel_config, plan_kernels, slugify_title,
                                   write_kernel)

REPO = TEMPLATES_DIR.parent
PACKAGE_DIR = Path(packaging.__file__).resolve().parents[1]  # src/guie
METADATA_DIR = REPO / "datasets-metadata"
DRY_OWNER = "your-kaggle-username"  # shown by --dry-run when no credentials are set up


def _reports_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from guie.kaggle.client import KaggleError

        try:
            return fn(args)
        except (KaggleError, packaging.PackagingError, NotebookError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return run


def _connect():
    from guie.kaggle.client import KaggleClient

    return KaggleClient.connect()


def _state_path(args: argparse.Namespace) -> Path:
    return Path(args.workdir) / "state.json"


def _load_state(args: argparse.Namespace) -> dict:
    path = _state_path(args)
    if not path.exists():
        raise ValueError(f"{path}: nothing pushed from this workdir yet (run `submit.py push`)")
    return json.loads(path.read_text())


def _save_state(args: argparse.Namespace, state: dict) -> None:
    _state_path(args).parent.mkdir(parents=True, exist_ok=True)
    _state_path(args).write_text(json.dumps(state, indent=2) + "\n")


def git_commit(repo: Path = REPO) -> str:
    """Short commit of the working tree, '-dirty' when tracked files changed; 'unknown' without git."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _confirm(question: str, assume_yes: bool) -> bool:
    if assume_yes or not sys.stdin.isatty():
        return True
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _list_folder(title: str, folder: Path, extra: dict[str, Any] | None = None) -> None:
    print(title)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        print(f"  {p.relative_to(folder).as_posix():60s} {_size(p.stat().st_size):>10s}")
    print(f"  {len(files)} files, {_size(sum(p.stat().st_size for p in files))}")
    for name, value in (extra or {}).items():
        print(f"  {name}: {json.dumps(value, indent=2)}".replace("\n", "\n  "))


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _secrets_and_owner(args: argparse.Namespace):
    """(client or None, owner, secrets): --dry-run reads credentials locally, never connects."""
    from guie.kaggle.client import find_credentials

    if args.dry_run:
        credentials = find_credentials()
        return None, credentials.username or DRY_OWNER, credentials.secrets
    client = _connect()
    return client, client.username, client.credentials.secrets


def _wheel_download(args: argparse.Namespace) -> Callable[[Sequence[str], Path], None]:
    if not args.wheels_from:
        return packaging.pip_download

    def copy_from(requirements: Sequence[str], dest: Path) -> None:
        for wheel in Path(args.wheels_from).glob("*.whl"):
            shutil.copy2(wheel, dest / wheel.name)
    return copy_from


# ----------------------------------------------------------------------------- push


@_reports_errors
def cmd_push(args: argparse.Namespace) -> int:
    cfg = kernel_config(args.config, args.overrides)  # a bad config fails before any upload
    client, owner, secrets = _secrets_and_owner(args)
    # Built datasets live in <workdir>/datasets/<slug>, the layout of /kaggle/input, so that
    # `map_kaggle_paths(parameters, <workdir>/datasets, ...)` runs the same notebook locally.
    datasets = Path(args.workdir) / "datasets"
    source_template = METADATA_DIR / "guie-src" / "dataset-metadata.json"
    source_slug = packaging.dataset_metadata(source_template, owner)["id"].split("/")[1]
    source = packaging.pack_source(PACKAGE_DIR, datasets / source_slug, source_template, owner, secrets)
    wheels_template = METADATA_DIR / "guie-wheels" / "dataset-metadata.json"
    wheels_ref = packaging.dataset_metadata(wheels_template, owner)["id"]
    plans = plan_kernels(cfg, args.config, args.overrides, owner, source_ref=source.ref,
                         wheels_ref=wheels_ref, source_hash=source.content_hash,
                         max_hours=args.max_hours, compat=args.compat, data_root=args.data_root,
                         resume_kernel=args.resume_kernel, extra_datasets=args.dataset,
                         machine_shape=args.machine_shape, private=not args.public,
                         train_internet=args.train_internet)
    chosen = ["train", "infer"] if args.kernels == "both" else [args.kernels]
    folders = {kind: write_kernel(plans[kind], Path(args.workdir) / "kernels") for kind in chosen}
    for folder in folders.values():
        packaging.scan_for_secrets(sorted(p for p in folder.iterdir() if p.is_file()), secrets)

    if args.dry_run:
        print("[dry run] built everything; nothing is sent to Kaggle.")
        _list_folder(f"dataset {source.ref} (src/ uploads as one zip; hash {source.content_hash[:12]})",
                     source.folder, {"dataset-metadata.json": _json(source.folder / "dataset-metadata.json")})
        print(f"dataset {wheels_ref}: sent only if missing or its pins changed, from "
              f"{args.wheels_from or 'pip download --no-deps'} {' '.join(packaging.WHEEL_REQUIREMENTS)}")
        for kind, folder in folders.items():
            _list_folder(f"kernel {plans[kind].ref}", folder,
                         {"kernel-metadata.json": plans[kind].metadata,
                          "parameters": plans[kind].parameters})
        return 0

    commit = git_commit()
    state = json.loads(_state_path(args).read_text()) if _state_path(args).exists() else {}
    pushed = state.get("source", {})
    if pushed.get("ref") == source.ref and pushed.get("hash") == source.content_hash \
            and client.dataset_status(source.ref) == "ready":
        print(f"dataset {source.ref}: unchanged (hash {source.content_hash[:12]}), not re-uploaded")
    else:
        result = client.push_dataset(source.folder, f"{args.config} {source.content_hash[:12]} {commit}",
                                     dir_mode="zip")
        print(f"dataset {source.ref}: {'created' if result.created else 'new version'}; waiting until ready")
        client.wait_dataset_ready(source.ref, poll_s=args.poll_s)
    requirements = list(packaging.WHEEL_REQUIREMENTS)
    if state.get("wheels", {}).get("requirements") != requirements \
            or client.dataset_status(wheels_ref) is None:
        wheels = packaging.build_wheels_dataset(datasets / wheels_ref.split("/")[1], wheels_template,
                                                owner, secrets, download=_wheel_download(args))
        result = client.push_dataset(wheels.folder, " ".join(requirements), dir_mode="skip")
        print(f"dataset {wheels_ref}: {'created' if result.created else 'new version'}; waiting until ready")
        client.wait_dataset_ready(wheels_ref, poll_s=args.poll_s)
    kernels = dict(state.get("kernels", {})) if state.get("config") == args.config else {}
    for kind, folder in folders.items():
        result = client.push_kernel(folder)
        kernels[kind] = {"ref": result.ref, "url": result.url, "version": result.version}
        print(f"kernel {result.ref} version {result.version}: {result.url}")
    if "train" in folders and "infer" in folders:
        print("note: the inference kernel reads the training kernel's latest finished output; after "
              "this training run completes, `submit.py push --kernels infer` rebuilds it on it.")
    _save_state(args, {"config": args.config, "overrides": args.overrides, "commit": commit,
                       "source": {"ref": source.ref, "hash": source.content_hash},
                       "wheels": {"ref": wheels_ref, "requirements": requirements}, "kernels": kernels,
                       "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "submissions": state.get("submissions", [])})
    return 0


# ----------------------------------------------------------------------------- status


@_reports_errors
def cmd_status(args: argparse.Namespace) -> int:
    state = _load_state(args)
    client = _connect()
    failed = False
    for kind, info in state["kernels"].items():
        ref = info["ref"]
        if args.wait:
            last: list[str] = []

            def show(status, kind=kind, last=last) -> None:
                if status.state not in last:
                    last.append(status.state)
                    print(f"{kind:6s} {status.ref}: {status.state}", flush=True)
            status = client.wait_kernel(ref, poll_s=args.poll_s, on_poll=show)
            output = client.download_kernel_output(ref, Path(args.workdir) / "outputs" / ref.split("/")[1])
            print(f"{kind:6s} {ref}: {len(output.files)} output files and the log in "
                  f"{Path(args.workdir) / 'outputs' / ref.split('/')[1]}")
            if status.state == "ERROR":
                tail = "\n".join(output.log_text.splitlines()[-args.log_lines:])
                print(f"--- last {args.log_lines} log lines of {ref} ---\n{tail}")
        else:
            status = client.kernel_status(ref)
            print(f"{kind:6s} {ref}: {status.state}")
        if status.failure_message:
            print(f"{kind:6s} failure: {status.failure_message}")
        failed |= status.state == "ERROR"
    return 1 if failed else 0


# ----------------------------------------------------------------------------- submit


@_reports_errors
def cmd_submit(args: argparse.Namespace) -> int:
    from guie.kaggle.client import COMPETITION, DailyCapReached, SubmissionRejected
    from guie.kaggle.history import submission_message

    state = _load_state(args)
    if "infer" not in state["kernels"]:
        raise ValueError("no inference kernel pushed yet (run `submit.py push`)")
    kernel = state["kernels"]["infer"]
    version = args.version if args.version is not None else kernel.get("version")
    # The commit the kernel was built from, not whatever is checked out now.
    message = submission_message(state["config"], state.get("commit") or git_commit(),
                                 kernel["ref"], version)
    if args.dry_run:
        print(f"[dry run] would submit {kernel['ref']} version {version or 'latest'} "
              f"(file {args.file}) to {COMPETITION} with message {message!r}; nothing is sent.")
        return 0
    client = _connect()
    if args.version is None:
        status = client.kernel_status(kernel["ref"])
        if status.state != "COMPLETE":
            raise ValueError(f"kernel {kernel['ref']} is {status.state} "
                             f"{status.failure_message}; submit once it is COMPLETE".rstrip())
    if not _confirm(f"Submit {kernel['ref']} v{version} to {COMPETITION}?", args.yes):
        print("not submitted")
        return 1
    try:
        receipt = client.submit_code(kernel["ref"], version, message, file_name=args.file,
                                     daily_cap=args.daily_cap)
    except (SubmissionRejected, DailyCapReached) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted: ref {receipt.ref}: {receipt.message} ({receipt.remaining_today} left today)")
    state.setdefault("submissions", []).append(
        {"ref": receipt.ref, "kernel": kernel["ref"], "version": version, "message": message})
    _save_state(args, state)
    return 0


# ----------------------------------------------------------------------------- leaderboard


@_reports_errors
def cmd_leaderboard(args: argparse.Namespace) -> int:
    from guie.kaggle.history import append_history, format_tables, plot_history, snapshot

    client = _connect()
    submissions, board = client.list_submissions(), client.leaderboard(top=args.top)
    work = Path(args.workdir)
    history = append_history(work / "history.csv", snapshot(submissions, board))
    png = plot_history(history, work / "history.png")
    print(format_tables(submissions, board))
    print(f"history: {work / 'history.csv'} ({len(history)} rows), plot: {png}")
    if args.download:
        print(f"full leaderboard: {client.download_leaderboard(work)}")
    return 0


# ----------------------------------------------------------------------------- push-weights


@_reports_errors
def cmd_push_weights(args: argparse.Namespace) -> int:
    path = Path(args.path)
    client, owner, secrets = _secrets_and_owner(args)
    slug = args.slug or slugify_title(f"guie weights {path.stem}")[:50].rstrip("-")
    title = args.title or f"GUIE weights {path.stem}"[:50]
    meta = {"id": f"{owner}/{slug}", "title": title, "licenses": [{"name": args.license}],
            "description": f"{path.name}, uploaded by the GUIE kit's `submit.py push-weights`."}
    packed = packaging.pack_file_dataset(path, Path(args.workdir) / "datasets" / slug, meta, secrets)
    mount = f"{KAGGLE_INPUT}/{slug}/{path.name}"
    if args.dry_run:
        print("[dry run] nothing is sent to Kaggle.")
        _list_folder(f"dataset {packed.ref}", packed.folder,
                     {"dataset-metadata.json": _json(packed.folder / "dataset-metadata.json")})
        print(f"on Kaggle: {mount}")
        return 0
    result = client.push_dataset(packed.folder, f"{path.name} sha256 {packed.content_hash[:12]}",
                                 progress=True)
    print(f"dataset {result.ref}: {'created' if result.created else 'new version'}; waiting until ready")
    client.wait_dataset_ready(result.ref, poll_s=args.poll_s)
    print(f"ready: {result.url}\non Kaggle: {mount} (attach it with `push --dataset {result.ref}`)")
    return 0


# ----------------------------------------------------------------------------- parser


def register(subparsers) -> None:
    def common(p: argparse.ArgumentParser, dry_run: bool = True, poll: bool = False) -> None:
        p.add_argument("--workdir", default="build/kaggle", help="where built folders and state go")
        if dry_run:
            p.add_argument("--dry-run", action="store_true", help="build and list; send nothing")
        if poll:
            p.add_argument("--poll-s", type=float, default=15.0, help="first polling interval")

    p = subparsers.add_parser("push", help="pack the source, build both kernels, push them to Kaggle")
    p.add_argument("--config", default="smoke", help="shipped config name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--kernels", choices=("both", "train", "infer"), default="both")
    p.add_argument("--max-hours", type=float, default=11.0, help="training budget per session")
    p.add_argument("--compat", choices=("none", "torch1.11"), default="none")
    p.add_argument("--data-root", default=None,
                   help=f"data root on Kaggle (default {KAGGLE_INPUT} when the config names "
                        "Kaggle datasets; '' keeps the config's)")
    p.add_argument("--dataset", action="append", default=[], metavar="OWNER/SLUG",
                   help="extra dataset to attach to both kernels (weights; repeatable)")
    p.add_argument("--resume-kernel", default=None, metavar="OWNER/SLUG",
                   help="a previous training kernel whose output the training run resumes from")
    p.add_argument("--machine-shape", default=DEFAULT_MACHINE_SHAPE)
    p.add_argument("--public", action="store_true", help="make the kernels public (default private)")
    p.add_argument("--train-internet", action="store_true",
                   help="internet on for the training kernel (inference is always offline)")
    p.add_argument("--wheels-from", default=None, metavar="DIR",
                   help="take the wheels from this folder instead of `pip download`")
    common(p, poll=True)
    p.set_defaults(func=cmd_push)

    p = subparsers.add_parser("status", help="state of the pushed kernels; --wait downloads outputs")
    p.add_argument("--wait", action="store_true", help="poll until done, then download output + log")
    p.add_argument("--log-lines", type=int, default=40, help="log lines shown for a failed kernel")
    common(p, dry_run=False, poll=True)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("submit", help="submit the inference kernel's submission.zip")
    p.add_argument("--version", type=int, default=None, help="kernel version (default: last pushed)")
    p.add_argument("--file", default="submission.zip", help="the kernel output file to submit")
    p.add_argument("--daily-cap", type=int, default=5, help="submissions allowed per UTC day")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("leaderboard", help="own submissions and the leaderboard, with history")
    p.add_argument("--top", type=int, default=20, help="leaderboard rows to fetch")
    p.add_argument("--download", action="store_true", help="also download the full leaderboard zip")
    common(p, dry_run=False)
    p.set_defaults(func=cmd_leaderboard)

    p = subparsers.add_parser("push-weights", help="upload a weights/checkpoint file as a dataset")
    p.add_argument("path", help="the local file")
    p.add_argument("--slug", default=None, help="dataset slug (default guie-weights-<file stem>)")
    p.add_argument("--title", default=None)
    p.add_argument("--license", default="other", help="Kaggle license name (upstream's terms)")
    common(p, poll=True)
    p.set_defaults(func=cmd_push_weights)


def main(argv: list[str] | None = None) -> int:
    """`python -m guie_cli.kaggle_cmds COMMAND ...`: these commands alone."""
    parser = argparse.ArgumentParser(prog="kaggle_cmds")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
