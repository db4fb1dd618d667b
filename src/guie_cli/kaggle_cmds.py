"""Kaggle commands: `push`, `submit`, `leaderboard`, `push-weights` (`run`, `probe` and
`status` live in `guie_cli.kaggle_run`).

A mistake (a refused call, a bad config, a missing file) raises the kit's own error types, which
`guie_cli.main` prints as one `error:` line (exit 2). Everything that would write to Kaggle
takes `--dry-run`: it builds the same folders, lists what
would be sent (files, sizes, metadata) and sends nothing. No command prompts when stdin is not a
terminal. What `push` built and sent is recorded in <workdir>/state.json for the other commands.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from guie.errors import UserValueError
from guie.kaggle import packaging
from guie.kaggle.build import (build_kernels, pin_dataset_sources, pinned_versions,
                               upload_datasets)
from guie.kaggle.notebooks import slugify_title
from guie.kaggle.platform import check_machine_shape, platform_facts
from guie.kaggle.results import LATE_NOTE
from guie_cli.kaggle_common import (common_args, confirm, connect, git_commit, list_folder,
                                    load_state, machine_args, max_hours_arg, owned_config,
                                    platform_notes, preflight_gate, print_output_size, print_plan,
                                    read_json, save_state, secrets_and_owner, standalone_main,
                                    state_path, weights_notes, wheel_download)
from guie_cli.local import compat_arg, config_from_args


# ----------------------------------------------------------------------------- push


def cmd_push(args: argparse.Namespace) -> int:
    from guie.kaggle import preflight
    from guie.kaggle.sessions import wait_for_push

    config_from_args(args)  # a bad config fails before any credentials are read
    warnings = check_machine_shape(args.machine_shape)
    client, owner, secrets = secrets_and_owner(args)
    cfg, overrides = owned_config(args, owner)
    facts = platform_facts(args.workdir)
    if client is not None:
        client.label_format = facts.version_label
    state = json.loads(state_path(args).read_text()) if state_path(args).exists() else {}
    chosen = ["train", "infer"] if args.kernels == "both" else [args.kernels]
    # Pushed together, the inference kernel would run at once on the training kernel's
    # previous output: it is pushed after training has finished (--wait), or later by hand.
    expected_run = None
    previous_train = state.get("kernels", {}).get("train", {})
    if chosen == ["infer"] and state.get("config") == args.config and previous_train.get("run"):
        expected_run = previous_train["run"]  # the run that kernel trains, not today's source
    build = build_kernels(cfg, args.config, owner, args.workdir, secrets,
                          kinds=chosen, resume_kernel=args.resume_kernel,
                          extra_datasets=args.dataset, machine_shape=args.machine_shape,
                          private=not args.public, train_internet=args.train_internet,
                          expected_run=expected_run)
    source, plans, folders = build.source, build.plans, build.folders
    print(f"config {args.config}{' ' + ' '.join(overrides) if overrides else ''}: "
          f"kernels {', '.join(plans[k].ref for k in chosen)}")
    for line in [*warnings, *weights_notes(cfg), *platform_notes(facts)]:
        print(line)
    bound = (preflight.session_bound_h(cfg.max_hours) if "train" in chosen
             else preflight.INFER_SESSION_H + preflight.SETUP_ALLOWANCE_H)
    preflight_gate(args, cfg, client, bound, "train" in chosen)  # before anything is sent
    requirements = list(packaging.WHEEL_REQUIREMENTS)

    if args.dry_run:
        print("[dry run] built everything; nothing is sent to Kaggle.")
        list_folder(f"dataset {source.ref} (src/ uploads as one zip; "
                    f"hash {source.content_hash[:12]})",
                    source.folder,
                    {"dataset-metadata.json": read_json(source.folder / "dataset-metadata.json")})
        print(f"dataset {build.wheels_ref}: sent only if missing or its pins changed, from "
              f"{args.wheels_from or 'pip download'} {' '.join(requirements)} (pure-Python wheels "
              f"for Python {facts.python_version}, from {facts.source})")
        print("the kernels attach the source and wheels datasets at the versions this push "
              "leaves current (owner/slug/N)")
        for kind, folder in folders.items():
            list_folder(f"kernel {plans[kind].ref}", folder,
                        {"kernel-metadata.json": plans[kind].metadata,
                         "parameters": plans[kind].parameters})
        print_output_size(cfg)
        print_plan(cfg, args.machine_shape, cfg.max_hours)
        return 0

    commit = git_commit()
    datasets = upload_datasets(client, build, owner, secrets, facts.python_version, state,
                               f"{args.config} {commit}", args.poll_s, wheel_download(args))
    kernels = dict(state.get("kernels", {})) if state.get("config") == args.config else {}
    new_state = {"config": args.config, "overrides": args.overrides, "commit": commit,
                 **datasets, "kernels": kernels,
                 "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "submissions": state.get("submissions", []),
                 **{k: state[k] for k in ("probe", "probe_label") if k in state}}

    def push(kind: str) -> None:
        pin_dataset_sources(folders[kind], pinned_versions(datasets))
        result = client.push_kernel(folders[kind])
        parameters = plans[kind].parameters
        kernels[kind] = {"ref": result.ref, "url": result.url, "version": result.version,
                         "run": parameters.get("run") or parameters.get("expected_run"),
                         "nonce": parameters["push_nonce"]}
        print(f"kernel {result.ref} version {result.version}: {result.url}")
        save_state(args, new_state)

    if "train" in chosen:
        push("train")
    if "infer" in chosen and "train" in chosen and not args.wait:
        print(f"next: the inference kernel needs this training run's output. Run `submit.py status "
              f"--wait`, then `submit.py push --config {args.config} --kernels infer` (or push "
              "with --wait to do both).")
        return 0
    if "infer" in chosen and "train" in chosen:
        train = kernels["train"]
        session = wait_for_push(client, train["ref"], train["version"], train["nonce"],
                                Path(args.workdir) / "outputs" / train["ref"].split("/")[1],
                                [], args.poll_s, args.stale_grace_s)
        status = session.status
        if status.state != "COMPLETE" or not session.ours:
            what = status.state if session.ours else "COMPLETE, but not with this push's output"
            raise UserValueError(f"training kernel {train['ref']} version {train['version']} ended "
                             f"{what} {status.failure_message}; the inference kernel was not "
                             "pushed (`submit.py status --wait` shows its log)".rstrip())
    if "infer" in chosen:
        push("infer")
        print("next: `submit.py status --wait`, then `submit.py submit`")
    else:
        print("next: `submit.py status --wait`")
    return 0


# ----------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    from guie.kaggle.client import COMPETITION
    from guie.kaggle.results import DailyCapReached, SubmissionRejected
    from guie.kaggle.history import submission_message

    state = load_state(args)
    if "infer" not in state["kernels"]:
        raise UserValueError("no inference kernel pushed yet (run `submit.py push`)")
    kernel = state["kernels"]["infer"]
    version = args.version if args.version is not None else kernel.get("version")
    if not version:
        raise UserValueError(f"the version of kernel {kernel['ref']} is unknown (the push answered "
                         "none); Kaggle would take its latest run, which may be an older or failed "
                         "one. Look it up on the kernel's page and pass --version N.")
    # The commit the kernel was built from, not whatever is checked out now.
    message = submission_message(state["config"], state.get("commit") or git_commit(),
                                 kernel["ref"], version)
    if args.dry_run:
        print(f"[dry run] would submit {kernel['ref']} version {version} "
              f"(file {args.file}) to {COMPETITION} with message {message!r}; nothing is sent.")
        return 0
    client = connect()
    client.label_format = platform_facts(args.workdir).version_label
    # Version N's own state and output, not whichever session Kaggle calls latest.
    status = client.kernel_status(kernel["ref"], version)
    outputs = (client.kernel_output_names(kernel["ref"], version)
               if status.state == "COMPLETE" else [])
    print(f"kernel {kernel['ref']} version {version}: {status.state}; output "
          f"{args.file} {'present' if args.file in outputs else 'MISSING'}")
    if status.state != "COMPLETE":
        raise UserValueError(f"kernel {kernel['ref']} is {status.state} "
                         f"{status.failure_message}; submit once it is COMPLETE".rstrip())
    if args.file not in outputs:
        raise UserValueError(f"kernel {kernel['ref']}: its output has no {args.file} (it has "
                         f"{', '.join(outputs) or 'nothing'}); see `submit.py status --wait`")
    if not confirm(f"Submit {kernel['ref']} v{version} to {COMPETITION}?", args.yes):
        print("not submitted")
        return 1
    try:
        receipt = client.submit_code(kernel["ref"], version, message, file_name=args.file,
                                     daily_cap=args.daily_cap)
    except (SubmissionRejected, DailyCapReached) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted: ref {receipt.ref}: {receipt.message} ({receipt.remaining_today} left today)")
    print(f"next: `submit.py leaderboard` shows the score once Kaggle has scored it. {LATE_NOTE}")
    state.setdefault("submissions", []).append(
        {"ref": receipt.ref, "kernel": kernel["ref"], "version": version, "message": message})
    save_state(args, state)
    return 0


# ----------------------------------------------------------------------------- leaderboard


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from guie.kaggle.history import append_history, format_tables, plot_history, snapshot

    client = connect()
    submissions, board = client.list_submissions(), client.leaderboard(top=args.top)
    work = Path(args.workdir)
    history = append_history(work / "history.csv", snapshot(submissions, board))
    png = plot_history(history, work / "history.png")
    print(format_tables(submissions, board))
    print(LATE_NOTE)
    print(f"history: {work / 'history.csv'} ({len(history)} rows), plot: {png}")
    if args.download:
        print(f"full leaderboard: {client.download_leaderboard(work)}")
    return 0


# ----------------------------------------------------------------------------- push-weights


def cmd_push_weights(args: argparse.Namespace) -> int:
    path = Path(args.path)
    client, owner, secrets = secrets_and_owner(args)
    slug = args.slug or slugify_title(f"guie weights {path.stem}")[:50].rstrip("-")
    title = args.title or f"GUIE weights {path.stem}"[:50]
    meta = {"id": f"{owner}/{slug}", "title": title, "licenses": [{"name": args.license}],
            "description": f"{path.name}, uploaded by the GUIE kit's `submit.py push-weights`."}
    packed = packaging.pack_file_dataset(path, Path(args.workdir) / "datasets" / slug, meta,
                                         secrets)
    value = f"kaggle:{packed.ref}/{path.name}"  # resolved by the kernels in any mount layout
    if args.dry_run:
        print("[dry run] nothing is sent to Kaggle.")
        list_folder(f"dataset {packed.ref}", packed.folder,
                     {"dataset-metadata.json": read_json(packed.folder / "dataset-metadata.json")})
        print(f"in a config: model.pretrained_path={value}")
        return 0
    result = client.push_dataset(packed.folder, f"{path.name} sha256 {packed.content_hash[:12]}",
                                 progress=True)
    print(f"dataset {result.ref}: {'created' if result.created else 'new version'}; "
          "waiting until ready")
    client.wait_dataset_ready(result.ref, poll_s=args.poll_s)
    print(f"ready: {result.url}\nin a config or as an override: model.pretrained_path={value}\n"
          "(`push` then attaches the dataset to both kernels itself)")
    return 0


# ----------------------------------------------------------------------------- parser


def register(subparsers) -> None:
    common = common_args

    p = subparsers.add_parser("push",
                              help="pack the source, build both kernels, push them to Kaggle")
    p.add_argument("--config", default="smoke", help="shipped config name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--kernels", choices=("both", "train", "infer"), default="both")
    max_hours_arg(p)
    compat_arg(p)
    p.add_argument("--data-root", default=None,
                   help="sets data.root, the data root on Kaggle for the config's relative "
                        "locations (default: the config's; sources with a kaggle_slug are found "
                        "wherever Kaggle mounts them)")
    p.add_argument("--dataset", action="append", default=[], metavar="OWNER/SLUG",
                   help="extra dataset to attach to both kernels (weights; repeatable)")
    p.add_argument("--resume-kernel", default=None, metavar="OWNER/SLUG",
                   help="a previous training kernel whose output the training run resumes from")
    machine_args(p, gate=True)
    p.add_argument("--wait", action="store_true",
                   help="push training, wait until it has finished, then push inference on it")
    p.add_argument("--public", action="store_true",
                   help="make the kernels public (default private)")
    p.add_argument("--train-internet", action="store_true",
                   help="internet on for the training kernel (inference is always offline)")
    p.add_argument("--wheels-from", default=None, metavar="DIR",
                   help="take the wheels from this folder instead of `pip download`")
    common(p, poll=True)
    p.set_defaults(func=cmd_push)

    p = subparsers.add_parser("submit", help="submit the inference kernel's submission.zip")
    p.add_argument("--version", type=int, default=None,
                   help="kernel version to submit (default: the one the last push reported)")
    p.add_argument("--file", default="submission.zip", help="the kernel output file to submit")
    p.add_argument("--daily-cap", type=int, default=5, help="submissions allowed per UTC day")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("leaderboard",
                              help="own submissions and the leaderboard, with history")
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
    return standalone_main("kaggle_cmds", register, argv)


if __name__ == "__main__":
    sys.exit(main())
