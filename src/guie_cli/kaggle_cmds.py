"""Kaggle commands: `push`, `status`, `submit`, `leaderboard`, `push-weights` (`run` and
`probe` live in `guie_cli.kaggle_run`).

A mistake (a refused call, a bad config, a missing file) raises the kit's own error types, which
`guie_cli.main` prints as one `error:` line (exit 2). Everything that would write to Kaggle
takes `--dry-run`: it builds the same folders, lists what
would be sent (files, sizes, metadata) and sends nothing. No command prompts when stdin is not a
terminal. What `push` built and sent is recorded in <workdir>/state.json for the other commands.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from guie.kaggle import packaging
from guie.kaggle.build import build_kernels, upload_datasets
from guie.kaggle.inputs import is_kaggle_ref
from guie.kaggle.notebooks import kernel_config, slugify_title
from guie.kaggle.platform import (OUTPUT_CAP_BYTES, PLATFORM_RECORD, check_machine_shape,
                                  platform_facts)
from guie.kaggle.probe import PROBE_OUTPUT
from guie_cli.kaggle_common import (common_args, confirm, connect, git_commit, list_folder,
                                    load_state, machine_args, owned_config, read_json, save_state,
                                    secrets_and_owner, standalone_main, state_path,
                                    wheel_download)


# ----------------------------------------------------------------------------- push


def _weights_notes(cfg) -> list[str]:
    """What the dry run says about the weights the kernels will load."""
    from guie.config import TINY_BACKBONE

    path = cfg.model.pretrained_path
    if path:
        how = "attached from Kaggle" if is_kaggle_ref(path) else "a path that must exist on Kaggle"
        return [f"weights: {path} ({how})"]
    if cfg.model.backbone != TINY_BACKBONE:
        return [f"warning: model.pretrained_path is empty: {cfg.model.backbone} starts from RANDOM "
                "weights. Upload them with `submit.py push-weights FILE` and set the "
                "model.pretrained_path it prints."]
    return ["weights: none (the kit's tiny test backbone trains from random weights)"]


def _platform_notes(facts) -> list[str]:
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


def cmd_push(args: argparse.Namespace) -> int:
    cfg = kernel_config(args.config, args.overrides)  # a bad config fails before any upload
    warnings = check_machine_shape(args.machine_shape, args.allow_unknown_machine_shape)
    client, owner, secrets = secrets_and_owner(args)
    cfg, overrides = owned_config(args, owner)
    facts = platform_facts(args.workdir)
    state = json.loads(state_path(args).read_text()) if state_path(args).exists() else {}
    chosen = ["train", "infer"] if args.kernels == "both" else [args.kernels]
    # Pushed together, the inference kernel would run at once on the training kernel's
    # previous output: it is pushed after training has finished (--wait), or later by hand.
    expected_run = None
    previous_train = state.get("kernels", {}).get("train", {})
    if chosen == ["infer"] and state.get("config") == args.config and previous_train.get("run"):
        expected_run = previous_train["run"]  # the run that kernel trains, not today's source
    build = build_kernels(cfg, args.config, overrides, owner, args.workdir, secrets,
                          kinds=chosen, max_hours=args.max_hours, compat=args.compat,
                          data_root=args.data_root, resume_kernel=args.resume_kernel,
                          extra_datasets=args.dataset, machine_shape=args.machine_shape,
                          private=not args.public, train_internet=args.train_internet,
                          expected_run=expected_run)
    source, plans, folders = build.source, build.plans, build.folders
    print(f"config {args.config}{' ' + ' '.join(overrides) if overrides else ''}: "
          f"kernels {', '.join(plans[k].ref for k in chosen)}")
    for line in [*warnings, *_weights_notes(cfg), *_platform_notes(facts)]:
        print(line)
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
        for kind, folder in folders.items():
            list_folder(f"kernel {plans[kind].ref}", folder,
                         {"kernel-metadata.json": plans[kind].metadata,
                          "parameters": plans[kind].parameters})
        _print_output_size(cfg)
        print_plan(cfg, args.machine_shape, args.max_hours)
        return 0

    commit = git_commit()
    datasets = upload_datasets(client, build, owner, secrets, facts.python_version, state,
                               f"{args.config} {commit}", args.poll_s, wheel_download(args))
    kernels = dict(state.get("kernels", {})) if state.get("config") == args.config else {}
    new_state = {"config": args.config, "overrides": args.overrides, "commit": commit,
                 **datasets, "kernels": kernels,
                 "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "submissions": state.get("submissions", []),
                 **({"probe": state["probe"]} if "probe" in state else {})}

    def push(kind: str) -> None:
        result = client.push_kernel(folders[kind])
        run = plans[kind].parameters.get("run") or plans[kind].parameters.get("expected_run")
        kernels[kind] = {"ref": result.ref, "url": result.url, "version": result.version,
                         "run": run}
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
        status = client.wait_kernel(kernels["train"]["ref"], poll_s=args.poll_s)
        if status.state != "COMPLETE":
            raise ValueError(f"training kernel {kernels['train']['ref']} ended {status.state} "
                             f"{status.failure_message}; the inference kernel was not pushed "
                             "(`submit.py status --wait` shows its log)".rstrip())
    if "infer" in chosen:
        push("infer")
        print("next: `submit.py status --wait`, then `submit.py submit`")
    else:
        print("next: `submit.py status --wait`")
    return 0


def _print_output_size(cfg) -> None:
    """The training kernel's predicted output against Kaggle's 20 GB cap."""
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
    from guie.plan import format_plan, plan_run

    try:  # no 10-minute CPU measurement inside a dry run: cached or shipped ones only
        plan = plan_run(cfg, machine_shape, max_hours=max_hours, measure_missing=False)
    except ValueError as e:
        print(f"plan: not shown ({e}); `submit.py plan --config {cfg.name}` measures and shows it")
        return
    print(format_plan(plan))


# ----------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    state = load_state(args)
    client = connect()
    failed = False
    watched = {**state.get("kernels", {}),
               **({"probe": state["probe"]} if "probe" in state else {})}
    for kind, info in watched.items():
        ref = info["ref"]
        if args.wait:
            last: list[str] = []

            def show(status, kind=kind, last=last) -> None:
                if status.state not in last:
                    last.append(status.state)
                    print(f"{kind:6s} {status.ref}: {status.state}", flush=True)
            status = client.wait_kernel(ref, poll_s=args.poll_s, on_poll=show)
            output = client.download_kernel_output(
                ref, Path(args.workdir) / "outputs" / ref.split("/")[1])
            print(f"{kind:6s} {ref}: {len(output.files)} output files and the log in "
                  f"{Path(args.workdir) / 'outputs' / ref.split('/')[1]}")
            if status.state == "ERROR":
                tail = "\n".join(output.log_text.splitlines()[-args.log_lines:])
                print(f"--- last {args.log_lines} log lines of {ref} ---\n{tail}")
            record = next((f for f in output.files if f.name == PROBE_OUTPUT), None)
            if kind == "probe" and record is not None:
                shutil.copy2(record, Path(args.workdir) / PLATFORM_RECORD)
                print("probe: Kaggle's platform recorded in "
                      f"{Path(args.workdir) / PLATFORM_RECORD}; "
                      "push uses it from now on")
        else:
            status = client.kernel_status(ref)
            print(f"{kind:6s} {ref}: {status.state}")
        if status.failure_message:
            print(f"{kind:6s} failure: {status.failure_message}")
        failed |= status.state == "ERROR"
    if not failed and state.get("kernels", {}).get("infer"):
        print("next: `submit.py submit` once the inference kernel is COMPLETE")
    elif not failed and state.get("kernels", {}).get("train"):
        print(f"next: once training is COMPLETE, `submit.py push --config {state['config']} "
              "--kernels infer`")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    from guie.kaggle.client import COMPETITION
    from guie.kaggle.results import DailyCapReached, SubmissionRejected
    from guie.kaggle.history import submission_message

    state = load_state(args)
    if "infer" not in state["kernels"]:
        raise ValueError("no inference kernel pushed yet (run `submit.py push`)")
    kernel = state["kernels"]["infer"]
    version = args.version if args.version is not None else kernel.get("version")
    if not version:
        raise ValueError(f"the version of kernel {kernel['ref']} is unknown (the push answered "
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
    status = client.kernel_status(kernel["ref"])
    outputs = client.kernel_output_names(kernel["ref"]) if status.state == "COMPLETE" else []
    print(f"kernel {kernel['ref']} version {version}: {status.state}; output "
          f"{args.file} {'present' if args.file in outputs else 'MISSING'}")
    if status.state != "COMPLETE":
        raise ValueError(f"kernel {kernel['ref']} is {status.state} "
                         f"{status.failure_message}; submit once it is COMPLETE".rstrip())
    if args.file not in outputs:
        raise ValueError(f"kernel {kernel['ref']}: its output has no {args.file} (it has "
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
    print("next: `submit.py leaderboard` shows the score once Kaggle has scored it")
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
    p.add_argument("--max-hours", type=float, default=11.0, help="training budget per session")
    p.add_argument("--compat", choices=("none", "torch1.11"), default="none")
    p.add_argument("--data-root", default="",
                   help="data root on Kaggle for the config's relative locations ('' keeps the "
                        "config's; sources with a kaggle_slug are found wherever Kaggle mounts "
                        "them)")
    p.add_argument("--dataset", action="append", default=[], metavar="OWNER/SLUG",
                   help="extra dataset to attach to both kernels (weights; repeatable)")
    p.add_argument("--resume-kernel", default=None, metavar="OWNER/SLUG",
                   help="a previous training kernel whose output the training run resumes from")
    machine_args(p)
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

    p = subparsers.add_parser("status",
                              help="state of the pushed kernels; --wait downloads outputs")
    p.add_argument("--wait", action="store_true",
                   help="poll until done, then download output + log")
    p.add_argument("--log-lines", type=int, default=40, help="log lines shown for a failed kernel")
    common(p, dry_run=False, poll=True)
    p.set_defaults(func=cmd_status)

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
