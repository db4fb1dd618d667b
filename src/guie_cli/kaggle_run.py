"""Kaggle commands that drive kernels to an end: `run` (a config to a scored submission, across
as many training sessions as it takes), `status` (wait on what `push` and `probe` sent, bring
back outputs and logs) and `probe` (record Kaggle's platform once)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guie.kaggle import packaging, preflight
from guie.kaggle.chain import UNTIL, Chain, ChainSettings, ChainStopped, describe
from guie.kaggle.notebooks import plan_probe, write_kernel
from guie.kaggle.platform import PLATFORM_RECORD, check_machine_shape, platform_facts
from guie.kaggle.probe import PROBE_OUTPUT
from guie_cli.kaggle_common import (common_args, connect, list_folder, load_state, machine_args,
                                    max_hours_arg, owned_config, preflight_gate, print_plan,
                                    save_state, secrets_and_owner, standalone_main, state_path,
                                    wheel_download)
from guie_cli.local import compat_arg, config_from_args


def cmd_run(args: argparse.Namespace) -> int:
    config_from_args(args)  # a bad config fails before any credentials are read
    for line in check_machine_shape(args.machine_shape):
        print(line)
    client, owner, secrets = secrets_and_owner(args)
    cfg, overrides = owned_config(args, owner)
    facts = platform_facts(args.workdir)
    if client is not None:
        client.label_format = facts.version_label
    settings = ChainSettings(
        config_name=args.config, overrides=tuple(overrides), owner=owner,
        workdir=Path(args.workdir), secrets=tuple(secrets),
        python_version=facts.python_version, until=args.until,
        max_quota_hours=args.max_quota_hours,
        machine_shape=args.machine_shape, daily_cap=args.daily_cap, poll_s=args.poll_s,
        stale_grace_s=args.stale_grace_s)
    # The first session, before anything is sent; the chain reads the quota again before each.
    preflight_gate(args, cfg, client, preflight.session_bound_h(cfg.max_hours))
    if args.dry_run:
        print(f"[dry run] the chain for config {args.config}, until {args.until}; nothing is sent:")
        for line in describe(settings, cfg):
            print(f"  {line}")
        print_plan(cfg, args.machine_shape, cfg.max_hours)  # the sessions and hours it expects
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
    from guie.kaggle.probe_record import account_facts, pinned_source

    warnings = check_machine_shape(args.machine_shape)
    client, owner, secrets = secrets_and_owner(args)
    state = json.loads(state_path(args).read_text()) if state_path(args).exists() else {}
    # A CPU session first (no GPU quota), to be an older version whose record the real probe's
    # status reads back by label, with the source dataset attached at its previous version
    # (owner/slug/N) to see which version Kaggle mounts (guie.kaggle.probe_record).
    pinned = pinned_source(state)
    attach = [f"{pinned['ref']}/{pinned['version']}"] if pinned else []
    plans = {"probe_label": plan_probe(owner, None, attach),
             "probe": plan_probe(owner, args.machine_shape)}
    for line in warnings:
        print(line)
    folders = {}
    for key, plan in plans.items():
        folders[key] = write_kernel(plan, Path(args.workdir) / "kernels" / key)
        packaging.scan_for_secrets(sorted(p for p in folders[key].iterdir() if p.is_file()),
                                   secrets)
    if args.dry_run:
        print("[dry run] nothing is sent to Kaggle. Two versions of the probe kernel: a CPU one, "
              "then one on the machine shape (the first settles how versions are named).")
        for key, plan in plans.items():
            list_folder(f"kernel {plan.ref} ({key})", folders[key],
                        {"kernel-metadata.json": plan.metadata})
        return 0
    state.setdefault("kernels", {})
    for key, plan in plans.items():
        result = client.push_kernel(folders[key])
        state[key] = {"ref": result.ref, "url": result.url, "version": result.version,
                      "nonce": plan.parameters["push_nonce"]}
        print(f"kernel {result.ref} version {result.version}: {result.url}")
    state["probe"].update(machine_shape=args.machine_shape, account=account_facts(client))
    state["probe_label"]["pinned"] = pinned
    if pinned is None:
        print("probe: pinned inputs not checked (the source dataset needs two versions: push "
              "twice first)")
    save_state(args, state)
    print(f"next: `submit.py status --wait` brings back {PROBE_OUTPUT} as "
          f"{Path(args.workdir) / PLATFORM_RECORD}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from guie.kaggle.probe_record import (check_pinned_input, settle_version_label,
                                          write_platform_record)
    from guie.kaggle.sessions import wait_for_push

    state = load_state(args)
    client = connect()
    client.label_format = platform_facts(args.workdir).version_label
    failed = False
    watched = {**state.get("kernels", {}),
               **({"probe": state["probe"]} if "probe" in state else {})}
    for kind, info in watched.items():
        ref, version = info["ref"], info.get("version")
        if not args.wait:
            status = client.kernel_status(ref, version)
            print(f"{kind:6s} {ref} version {version}: {status.state}")
        else:
            last: list[str] = []

            def show(status, kind=kind, last=last) -> None:
                if status.state not in last:
                    last.append(status.state)
                    print(f"{kind:6s} {status.ref}: {status.state}", flush=True)
            dest = Path(args.workdir) / "outputs" / ref.split("/")[1]
            session = wait_for_push(client, ref, version, info.get("nonce"), dest,
                                    poll_s=args.poll_s, on_poll=show)
            status, output = session.status, session.output
            print(f"{kind:6s} {ref}: {len(output.files)} output files and the log in {dest}"
                  + ("" if session.ours else " (NOT this push's output: a stale read)"))
            if status.state == "ERROR":
                tail = "\n".join(output.log_text.splitlines()[-args.log_lines:])
                print(f"--- last {args.log_lines} log lines of {ref} ---\n{tail}")
            record = next((f for f in output.files if f.name == PROBE_OUTPUT), None)
            if kind == "probe" and record is not None and session.ours:
                label = pinned = None
                if "probe_label" in state:
                    older = state["probe_label"]
                    client.wait_kernel(older["ref"], poll_s=args.poll_s,
                                       version=older.get("version"))
                    label = settle_version_label(client, ref, older)
                    print(f"probe: kernel versions are read with label format {label['format']}"
                          if label["format"] else "probe: Kaggle honours no version label "
                          f"format ({label['tried']}); the push nonce tells sessions apart")
                    if older.get("pinned"):
                        pinned = check_pinned_input(client, ref, older)
                        print(f"probe: {pinned['attached']} attached: Kaggle mounted "
                              + ("that version" if pinned["honoured"] else
                                 f"another ({pinned['mounted']})"))
                target = write_platform_record(record, Path(args.workdir), info, label, pinned)
                print(f"probe: Kaggle's platform recorded in {target}; push uses it from now on")
        if status.failure_message:
            print(f"{kind:6s} failure: {status.failure_message}")
        failed |= status.state == "ERROR"
    if not failed and state.get("kernels", {}).get("infer"):
        print("next: `submit.py submit` once the inference kernel is COMPLETE")
    elif not failed and state.get("kernels", {}).get("train"):
        print(f"next: once training is COMPLETE, `submit.py push --config {state['config']} "
              "--kernels infer`")
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="train across Kaggle sessions, export and submit: one "
                                          "command from a config to a score (restartable)")
    p.add_argument("--config", default="smoke", help="shipped config name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--until", choices=UNTIL, default="submitted", help="where the chain stops")
    max_hours_arg(p)
    p.add_argument("--max-quota-hours", type=float, default=None,
                   help="GPU hours this chain may spend, on top of the quota Kaggle reports "
                        "(default: no cap of its own)")
    p.add_argument("--daily-cap", type=int, default=5, help="submissions allowed per UTC day")
    compat_arg(p)
    p.add_argument("--wheels-from", default=None, metavar="DIR",
                   help="take the wheels from this folder instead of `pip download`")
    machine_args(p, gate=True)
    common_args(p, poll=True)
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("status",
                              help="state of the pushed kernels; --wait downloads outputs")
    p.add_argument("--wait", action="store_true",
                   help="poll until done, then download output + log")
    p.add_argument("--log-lines", type=int, default=40, help="log lines shown for a failed kernel")
    common_args(p, dry_run=False, poll=True)
    p.set_defaults(func=cmd_status)

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
