"""Kaggle commands that drive kernels to an end: `run` (a config to a scored submission, across
as many training sessions as it takes) and `probe` (record Kaggle's platform once)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guie.kaggle import packaging
from guie.kaggle.chain import UNTIL, Chain, ChainSettings, ChainStopped, describe
from guie.kaggle.notebooks import kernel_config, plan_probe, write_kernel
from guie.kaggle.platform import PLATFORM_RECORD, check_machine_shape, platform_facts
from guie.kaggle.probe import PROBE_OUTPUT
from guie_cli.kaggle_cmds import print_plan
from guie_cli.kaggle_common import (common_args, list_folder, machine_args, owned_config,
                                    save_state, secrets_and_owner, standalone_main, state_path,
                                    wheel_download)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = kernel_config(args.config, args.overrides)
    for line in check_machine_shape(args.machine_shape, args.allow_unknown_machine_shape):
        print(line)
    client, owner, secrets = secrets_and_owner(args)
    cfg, overrides = owned_config(args, owner)
    settings = ChainSettings(
        config_name=args.config, overrides=tuple(overrides), owner=owner,
        workdir=Path(args.workdir), secrets=tuple(secrets),
        python_version=platform_facts(args.workdir).python_version, until=args.until,
        max_hours=args.max_hours, max_quota_hours=args.max_quota_hours,
        machine_shape=args.machine_shape, daily_cap=args.daily_cap, poll_s=args.poll_s,
        plan_options={"compat": args.compat})
    if args.dry_run:
        print(f"[dry run] the chain for config {args.config}, until {args.until}; nothing is sent:")
        for line in describe(settings, len([s for s in cfg.stages if s.enabled])):
            print(f"  {line}")
        print_plan(cfg, args.machine_shape, args.max_hours)  # the sessions and hours it expects
        return 0
    chain = Chain(client, cfg, settings, download=wheel_download(args),
                  log=lambda line: print(line, flush=True))
    try:
        result = chain.run()
    except ChainStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"chain {result['status']}: state in {chain.state.path}")
    if result["status"] == "quota":
        return 3
    if result["status"] == "submitted":
        print("next: `submit.py leaderboard` shows it beside the others")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    warnings = check_machine_shape(args.machine_shape, args.allow_unknown_machine_shape)
    client, owner, secrets = secrets_and_owner(args)
    plan = plan_probe(owner, args.machine_shape)
    folder = write_kernel(plan, Path(args.workdir) / "kernels")
    packaging.scan_for_secrets(sorted(p for p in folder.iterdir() if p.is_file()), secrets)
    for line in warnings:
        print(line)
    if args.dry_run:
        print("[dry run] nothing is sent to Kaggle.")
        list_folder(f"kernel {plan.ref}", folder, {"kernel-metadata.json": plan.metadata})
        return 0
    result = client.push_kernel(folder)
    state = json.loads(state_path(args).read_text()) if state_path(args).exists() else {}
    state.setdefault("kernels", {})
    state["probe"] = {"ref": result.ref, "url": result.url, "version": result.version}
    save_state(args, state)
    print(f"kernel {result.ref} version {result.version}: {result.url}\n"
          f"next: `submit.py status --wait` brings back {PROBE_OUTPUT} as "
          f"{Path(args.workdir) / PLATFORM_RECORD}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="train across Kaggle sessions, export and submit: one "
                                          "command from a config to a score (restartable)")
    p.add_argument("--config", default="smoke", help="shipped config name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--until", choices=UNTIL, default="submitted", help="where the chain stops")
    p.add_argument("--max-hours", type=float, default=11.0, help="training budget per session")
    p.add_argument("--max-quota-hours", type=float, default=30.0,
                   help="GPU hours the chain may spend (Kaggle's weekly quota is about 30)")
    p.add_argument("--daily-cap", type=int, default=5, help="submissions allowed per UTC day")
    p.add_argument("--compat", choices=("none", "torch1.11"), default="none")
    p.add_argument("--wheels-from", default=None, metavar="DIR",
                   help="take the wheels from this folder instead of `pip download`")
    machine_args(p)
    common_args(p, poll=True)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("probe", help="run a tiny kernel that records Kaggle's platform "
                                            "(layout, versions, GPU) for the kit to use")
    machine_args(p)
    common_args(p)
    p.set_defaults(func=cmd_probe)


def main(argv: list[str] | None = None) -> int:
    """`python -m guie_cli.kaggle_run COMMAND ...`: these commands alone."""
    return standalone_main("kaggle_run", register, argv)


if __name__ == "__main__":
    sys.exit(main())
