"""Local runs: `local` (the whole path on this machine), `train` and `export`.

Every command resolves its experiment once (`config_from_args`): the shipped config, the KEY=VALUE
overrides, then the flags that are sugar for config fields (`FLAG_FIELDS`). What runs, in this
process, in the notebooks or in torchrun's workers, is that resolved config, carried as data.
"""
from __future__ import annotations

import argparse
import json
import logging

from guie.config import ExperimentConfig
from guie.configs import list_configs, resolve_config

# Flags that stand for a config field: given, each is the override `field=value`; left out, the
# config's own value holds (so `--compat none` undoes a config's `torch1.11`).
FLAG_FIELDS = {"max_hours": "max_hours", "compat": "export.compat", "data_root": "data.root"}


def _add_config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--config", default=default,
                   help=f"shipped config ({', '.join(list_configs())})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. stage1.epochs=10 model.dropout=0.1")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides the sugar flags given on this command line stand for."""
    return [f"{field}={getattr(args, flag)}" for flag, field in FLAG_FIELDS.items()
            if getattr(args, flag, None) is not None]


def config_from_args(args: argparse.Namespace, extra: list[str] = ()) -> ExperimentConfig:
    """The experiment a command runs: --config, its overrides, then the flags' (a flag wins over
    the same field given as KEY=VALUE), then `extra`."""
    return resolve_config(args.config, [*args.overrides, *flag_overrides(args), *extra])


def compat_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compat", default=None, choices=("none", "torch1.11"),
                   help="sets export.compat (torch1.11: an export a PyTorch 1.11 host loads; "
                        "default: the config's export.compat)")


def cmd_local(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.in_process:
        from guie.pipeline import run_local

        report = run_local(cfg, args.out, resume=args.resume)
    else:
        from guie.kaggle.local_run import run_local_notebooks

        if args.verbose:  # papermill streams the kernels' own output through its logger
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        from guie.kaggle.platform import platform_facts

        recorded = platform_facts("build/kaggle").layout
        layout = args.layout or (recorded if recorded in ("current", "legacy") else "current")
        report = run_local_notebooks(cfg, args.config, args.out, layout=layout,
                                     archives=args.source_archive, verbose=args.verbose)
    keys = [k for k in report if k.startswith("map5_") and not k.endswith("per_domain")]
    print(json.dumps({k: round(report[k], 4) for k in keys}, indent=2))
    print(f"report: {args.out}/report.json  submission: {report.get('submission_zip', '-')}")
    print(f"look at: {args.out}/curves.png (loss and mP@5 per stage), {args.out}/notebooks/ "
          "(the executed kernels)")
    print(f"next: `python submit.py push --config {args.config} --dry-run` shows what Kaggle gets")
    return 0 if report["status"] == "done" else 3


def cmd_train(args: argparse.Namespace) -> int:
    from guie.pipeline import train

    cfg = config_from_args(args)
    report = train(cfg, args.out, resume=not args.restart)
    print(json.dumps({k: v for k, v in report.items() if "per_domain" not in k}, indent=2))
    return 0 if report["status"] == "done" else 3


def cmd_export(args: argparse.Namespace) -> int:
    from guie.export.build import export_submission

    print(export_submission(config_from_args(args), args.checkpoint, args.out))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("local", help="run data -> stages -> export -> mP@5 on this machine")
    _add_config_args(p, "tiny")
    p.add_argument("--out", default="build/local", help="output folder (reports, checkpoints, "
                   "submission.zip, the executed notebooks)")
    p.add_argument("--in-process", action="store_true",
                   help="run the pipeline in this process instead of executing the Kaggle "
                        "notebooks with papermill")
    p.add_argument("--resume", action="store_true",
                   help="with --in-process: continue the stages found in --out (the notebooks "
                        "always resume)")
    compat_arg(p)
    p.add_argument("--layout", default=None, choices=("current", "legacy"),
                   help="how the notebooks' inputs are mounted: Kaggle's current "
                        "input/datasets/<owner>/<slug>/ or the legacy input/<slug>/ (default: "
                        "what `submit.py probe` recorded in build/kaggle, else current)")
    p.add_argument("--source-archive", default="unpacked", choices=("unpacked", "zip"),
                   help="the uploaded src.zip as Kaggle unpacks it, or kept as a zip")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="stream the notebooks' own output (progress bars, logs)")
    p.set_defaults(func=cmd_local)

    p = subparsers.add_parser("train", help="train a config's stages (resumes by default)")
    _add_config_args(p, "tiny")
    p.add_argument("--out", default="build/train")
    p.add_argument("--restart", action="store_true", help="ignore checkpoints in --out")
    p.add_argument("--max-hours", type=float, default=None,
                   help="sets max_hours: checkpoint and stop cleanly after this long (default: "
                        "the config's max_hours; 0 = no limit)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("export", help="export a trained model as submission.zip")
    _add_config_args(p, "tiny")
    p.add_argument("--checkpoint", required=True, help="training output folder or a final.pt")
    p.add_argument("--out", default="build/export", help="where saved_model.pt and "
                   "submission.zip go")
    compat_arg(p)
    p.set_defaults(func=cmd_export)
