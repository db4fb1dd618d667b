"""What the Kaggle commands share: the workdir's state, credentials, listings, arguments, what a
dry run shows (weights, platform, output size, plan), and the preflight gate of `push` and
`run`."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from guie.errors import UserValueError
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
        raise UserValueError(f"{path}: nothing pushed from this workdir yet (run `submit.py push`)")
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


def machine_args(p: argparse.ArgumentParser, gate: bool = False) -> None:
    p.add_argument("--machine-shape", default=DEFAULT_MACHINE_SHAPE,
                   help="Kaggle machine_shape (NvidiaTeslaT4 is 2xT4; a name the kit does not "
                        "know is sent as given and Kaggle's answer shown)")
    # Kept so that scripts written when unknown names were refused still run; it does nothing.
    p.add_argument("--allow-unknown-machine-shape", action="store_true", help=argparse.SUPPRESS)
    if gate:
        p.add_argument("--skip-preflight", action="store_true",
                       help="send it even when the plan does not fit the machine's GPU memory or "
                            "the GPU quota left cannot finish the session")
        p.add_argument("--stale-grace-s", type=float, default=600.0,
                       help="how long a finished session without this push's nonce counts as a "
                            "stale read of the previous one")


# ----------------------------------------------------------------------------- the gate


def read_quota(client, args: argparse.Namespace):
    """Kaggle's GPU quota (None where it reports none). A dry run reads it only where credentials
    exist, and says so when it cannot."""
    from guie.kaggle.credentials import find_credentials
    from guie.kaggle.results import KaggleError

    if client is None:
        if not find_credentials().username:
            return None
        try:
            client = connect()
        except KaggleError as e:
            print(f"GPU quota: not read ({e})")
            return None
    return client.quota()


def preflight_gate(args: argparse.Namespace, cfg, client, bound_h: float,
                   trains: bool = True) -> None:
    """`push` and `run`: PreflightRefused (exit 2) before anything is sent, unless
    --skip-preflight; a dry run prints the verdict instead. The memory half (judged only where
    training is pushed: `trains`) comes first, so that a plan that cannot fit is refused before
    any request (the quota read included)."""
    from guie.kaggle import preflight

    if args.skip_preflight:
        for line in preflight.quota_lines(read_quota(client, args)):
            print(line)
        print(f"preflight: skipped ({preflight.SKIP_FLAG})")
        return
    refusals = preflight.memory_refusals(cfg, args.machine_shape, args.workdir) if trains else []
    if refusals and not args.dry_run:
        preflight.refuse(args.machine_shape, refusals)
    quota = read_quota(client, args)
    for line in preflight.quota_lines(quota):
        print(line)
    refusals += list(filter(None, [preflight.quota_refusal(quota, bound_h)]))
    if refusals and not args.dry_run:
        preflight.refuse(args.machine_shape, refusals)
    if refusals:
        print(f"preflight: would refuse: {'; '.join(refusals)}")
    else:
        plan = f"the plan fits {args.machine_shape} and " if trains else ""
        print(f"preflight: {plan}the quota left can finish a session of up to {bound_h:.2f} h "
              "(from push to end)")


# ----------------------------------------------------------------------------- dry-run notes


def weights_notes(cfg) -> list[str]:
    """What the dry run says about the weights the kernels will load."""
    from guie.config import TINY_BACKBONE
    from guie.kaggle.inputs import is_kaggle_ref

    path = cfg.model.pretrained_path
    if path:
        how = "attached from Kaggle" if is_kaggle_ref(path) else "a path that must exist on Kaggle"
        return [f"weights: {path} ({how})"]
    if cfg.model.backbone != TINY_BACKBONE:
        return [f"warning: model.pretrained_path is empty: {cfg.model.backbone} starts from RANDOM "
                "weights. Upload them with `submit.py push-weights FILE` and set the "
                "model.pretrained_path it prints."]
    return ["weights: none (the kit's tiny test backbone trains from random weights)"]


def platform_notes(facts) -> list[str]:
    """What a probe record says about the wheels' needs on Kaggle (nothing without a probe)."""
    if not facts.packages:
        return []
    import importlib.metadata

    notes = [f"platform: Python {facts.python_version}, {facts.layout} mount layout "
             f"(from {facts.source})"]
    for dist in packaging.CHECKED_DISTRIBUTIONS:
        needs = importlib.metadata.requires(dist) or []
        wheels = {r.split("==")[0].lower().replace("_", "-") for r in packaging.WHEEL_REQUIREMENTS}
        seen = {k.lower().replace("_", "-"): v for k, v in facts.packages.items() if v}
        problems = [p for p in packaging.unmet_requirements(needs, seen.get)
                    if p.split()[0].lower().replace("_", "-") not in wheels]
        notes += [f"warning: on Kaggle {dist} will lack what it needs: {p}" for p in problems]
    return notes


def print_output_size(cfg) -> None:
    """The training kernel's predicted output against Kaggle's 20 GB cap."""
    from guie.kaggle.platform import OUTPUT_CAP_BYTES
    from guie.train.checkpoint import predict_output_bytes

    # Sample-data configs infer their classes from data built in the kernel: at most one per
    # instance, an upper bound that keeps the prediction on the safe side.
    classes = cfg.num_classes or cfg.data.sample_instances
    if not classes:
        print("training output: not predicted: the config infers num_classes from its data; "
              "pass num_classes=N to see it against Kaggle's 20 GB cap")
        return
    predicted = predict_output_bytes(cfg, num_classes=classes)
    verdict = "fits" if predicted.fits(OUTPUT_CAP_BYTES) else "OVER THE CAP"
    print(f"training output (predicted from parameter counts, {classes} classes): "
          f"{predicted.end_bytes / 1e9:.2f} GB at the end, {predicted.peak_bytes / 1e9:.2f} GB at "
          f"its peak, against Kaggle's {OUTPUT_CAP_BYTES / 1e9:.0f} GB cap: {verdict}")


def print_plan(cfg, machine_shape: str, max_hours: float) -> None:
    """`submit.py plan`'s table for what is pushed: fits, hours, sessions, quota (issue 15)."""
    from guie.kaggle.platform import MACHINE_SHAPES
    from guie.plan import format_plan, plan_run

    shape = MACHINE_SHAPES.get(machine_shape)
    if shape is None or not shape.gpus:
        print(f"plan: not shown: the planner knows no GPU for machine shape {machine_shape}")
        return
    try:  # no 10-minute CPU measurement inside a dry run: cached or shipped ones only
        plan = plan_run(cfg, machine_shape, max_hours=max_hours, measure_missing=False)
    except ValueError as e:
        print(f"plan: not shown ({e}); `submit.py plan --config {cfg.name}` measures and shows it")
        return
    print(format_plan(plan))


def common_args(p: argparse.ArgumentParser, dry_run: bool = True, poll: bool = False) -> None:
    p.add_argument("--workdir", default="build/kaggle", help="where built folders and state go")
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help="build and list; send nothing")
    if poll:
        p.add_argument("--poll-s", type=float, default=15.0, help="first polling interval")


# A Kaggle session ends at 12 h: where the config sets no max_hours, push and run give it this,
# so that the last checkpoint is written before Kaggle stops the session.
KAGGLE_MAX_HOURS = 11.0


def max_hours_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-hours", type=float, default=None,
                   help="sets max_hours, the training budget per session (default: the "
                        f"config's max_hours, or {KAGGLE_MAX_HOURS:g} where it has none)")


def owned_config(args: argparse.Namespace, owner: str):
    """(config, overrides) of what is pushed, resolved once: --config, the user's overrides and
    the flags' (`guie_cli.local.config_from_args`), the Kaggle session budget where the config
    has none, and the overrides that put the pushing user's name into the config's
    `kaggle:KAGGLE_USERNAME/...` references (still references: the kernels resolve them)."""
    from guie.kaggle.run_config import owner_overrides
    from guie_cli.local import config_from_args, flag_overrides

    cfg = config_from_args(args)
    extra = [] if cfg.max_hours else [f"max_hours={KAGGLE_MAX_HOURS:g}"]
    extra += owner_overrides(cfg, owner)
    return config_from_args(args, extra), [*args.overrides, *flag_overrides(args), *extra]


def standalone_main(prog: str, register: Callable, argv: list[str] | None) -> int:
    """`python -m guie_cli.<module> COMMAND ...`: one module's commands alone, with main's
    error handling."""
    from guie_cli.main import CliParser, run_parsed

    parser = CliParser(prog=prog)
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_parsed(parser, sys.argv[1:] if argv is None else argv)
