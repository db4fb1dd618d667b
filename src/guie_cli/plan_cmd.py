"""`submit.py plan`: before a Kaggle run, whether each stage fits the machine, how long it takes
and what it costs (`guie.plan`). Exit status 0 when every stage and the output fit, 1 when one
does not (the plan then names the override that makes it fit)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from guie.configs import list_configs, resolve_config
from guie.kaggle.platform import DEFAULT_MACHINE_SHAPE, MACHINE_SHAPES


def cmd_plan(args: argparse.Namespace) -> int:
    from guie.plan import format_plan, plan_json, plan_run

    cfg = resolve_config(args.config, args.overrides)
    plan = plan_run(cfg, args.machine_shape, num_classes=args.num_classes,
                    train_images=args.train_images, max_hours=args.max_hours,
                    measure_missing=not args.no_measure, workdir=args.workdir)
    print(format_plan(plan))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan_json(plan), indent=2) + "\n")
        print(f"plan written to {path}")
    return 0 if plan.fits else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="before a Kaggle run: memory per GPU, hours, sessions, quota, output size",
        description="For each stage of a config on a Kaggle machine: GPU memory per device term "
                    "by term (counted, measured on this CPU with the real model, or estimated) "
                    "against what PyTorch can allocate there, DDP and FSDP side by side on "
                    "several GPUs with the parallelism `auto` picks, the largest batch that "
                    "fits, hours (both readings of a recipe's epochs where it states them), "
                    "sessions of --max-hours and the share "
                    "of the weekly GPU quota, the training output against the 20 GB cap, the "
                    "submission.zip size, and for a stage that does not fit the KEY=VALUE "
                    "override that makes it fit. A backbone measured for the first time takes "
                    "seconds (ViT-H-14: minutes); measurements are cached under "
                    "$GUIE_CACHE_DIR/plan (default ~/.cache/guie).")
    p.add_argument("--config", default="third_place",
                   help=f"shipped config ({', '.join(list_configs())})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. stage2.batch_size=16 stage2.grad_accum=2")
    p.add_argument("--machine-shape", default=DEFAULT_MACHINE_SHAPE,
                   choices=[n for n, s in MACHINE_SHAPES.items() if s.gpus],
                   help="Kaggle machine (NvidiaTeslaT4 = 2xT4)")
    p.add_argument("--num-classes", type=int, default=0,
                   help="classes of the class centres (default: the config's, else the sample "
                        "data's instances)")
    p.add_argument("--train-images", type=int, default=0,
                   help="training images per epoch (default: what the config tells)")
    p.add_argument("--max-hours", type=float, default=11.0,
                   help="training budget per Kaggle session (push --max-hours)")
    p.add_argument("--workdir", default="build/kaggle",
                   help="where `submit.py probe` left platform.json: its record of the machine "
                        "(what PyTorch can allocate per GPU) sets the memory limit")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    p.add_argument("--no-measure", action="store_true",
                   help="use cached measurements only; a missing one is an error")
    p.set_defaults(func=cmd_plan)
