"""Data commands: `data fetch` (download + verify Kaggle datasets) and `data stats`.

    submit.py data fetch [--config NAME | OWNER/SLUG[/VERSION] ...] [--dest DIR]
    submit.py data stats [--config NAME | --manifests] [--root DIR] [--out DIR]

Without `--config` or datasets, `fetch` takes the reference recipe's sources (third_place).
A wrong config, dataset reference or missing data ends in one `error:` line (exit 2, printed by
guie_cli.main); `fetch` exits 1 when some datasets did not download.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from guie.configs import get_config, list_configs
from guie.errors import UserError

DEFAULT_CONFIG = "third_place"  # the reference recipe


def cmd_fetch(args: argparse.Namespace) -> int:
    from guie.data import fetch
    from guie.data.errors import DataError
    from guie.kaggle.client import KaggleClient
    from guie.kaggle.results import KaggleError

    # Mistakes before any download (config, refs, options, credentials) reach main as one
    # `error:` line; a dataset failing below is reported and the others still download.
    if args.refs and args.config:
        raise UserError("data fetch: give either --config or datasets, not both")
    if args.refs:
        datasets = [(fetch.DatasetRef.parse(r), ()) for r in args.refs]
        num_classes, config = 0, None
    else:
        config = args.config or DEFAULT_CONFIG
        cfg = get_config(config)
        datasets, unfetchable = fetch.plan(cfg.data.sources)
        num_classes = cfg.num_classes
        for name in unfetchable:
            print(f"note: source {name!r} names no Kaggle dataset; not fetched", file=sys.stderr)
        if not datasets:
            raise DataError(f"config {config!r} names no Kaggle datasets (kaggle_slug)")
    if not 0.0 <= args.image_sample <= 1.0:
        raise UserError(f"data fetch: --image-sample is a share between 0 and 1, got "
                        f"{args.image_sample}")
    options = fetch.FetchOptions(
        dest=Path(args.dest), image_fraction=0.0 if args.no_verify_images else args.image_sample,
        workers=args.workers, max_corrupt_records=args.max_corrupt, reverify=args.reverify,
        num_classes=num_classes, progress=not args.quiet)
    client = KaggleClient.connect()
    rows, failures = [], 0
    for dref, sources in datasets:
        try:
            result = fetch.fetch_dataset(client, dref, sources, options)
        except (DataError, KaggleError) as e:
            print(f"error: {dref.ref}: {e}", file=sys.stderr)
            failures += 1
            continue
        m = result.manifest
        rows.append(f"{dref.ref} v{m['kaggle']['version']}: {len(result.downloaded)} downloaded, "
                    f"{len(result.skipped)} already complete; {fetch.format_bytes(m['bytes'])}, "
                    f"{m['records']} images, {m['corrupt_records']} corrupt; "
                    + ("verified now" if result.verified else f"verified {m['verified_at']}")
                    + f" -> {result.folder / fetch.MANIFEST}")
    print("\n".join(rows))
    if failures:
        print(f"{failures} of {len(datasets)} dataset(s) failed; run the same command again to "
              "resume or re-download them", file=sys.stderr)
        return 1
    if config:
        print(f"train on it: python submit.py train --config {config} data.root={args.dest}")
    else:
        print(f"its sources are recorded in {args.dest}/*/{fetch.MANIFEST}: "
              f"python submit.py data stats --manifests --root {args.dest}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from guie.data import fetch, stats

    cfg = get_config(args.config)
    root = args.root or (cfg.data.root if cfg.data.sample_instances > 0 else "data")
    fetch_command = f"python submit.py data fetch --config {args.config} --dest {root}"
    if args.manifests:
        sources = fetch.manifest_sources(root)
        if not sources:
            raise UserError(f"data stats: no {fetch.MANIFEST} under {root}/*/, so nothing was "
                            f"fetched there; download with `{fetch_command}`")
    elif cfg.data.sample_instances > 0:
        from guie.data.sample import build_sample_data

        sources = build_sample_data(root, cfg.data.sample_instances, cfg.data.sample_views)
    else:
        sources = cfg.data.sources
    stats.require_sources(sources, root, f"`{fetch_command}`, or give --root where they are")
    report = stats.write_stats(sources, root, cfg.data, args.out, grid_images=args.grid)
    print(stats.format_stats(report))
    print(f"\nwritten: {args.out}/stats.json, stats.txt"
          + (f", {len(report['grids'])} sample grid(s)" if report["grids"] else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="download, verify and describe training data")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    f = sub.add_parser("fetch", help="download a config's Kaggle datasets (default: the "
                       f"{DEFAULT_CONFIG} recipe's), verify them and write manifests")
    f.add_argument("refs", nargs="*", metavar="OWNER/SLUG[/VERSION]",
                   help="Kaggle datasets to fetch instead of a config's sources")
    f.add_argument("--config", default=None,
                   help=f"shipped config whose sources to fetch (default {DEFAULT_CONFIG}; "
                        f"{', '.join(list_configs())})")
    f.add_argument("--dest", default="data", help="where datasets go: DEST/<slug>/ (default data)")
    f.add_argument("--no-verify-images", action="store_true",
                   help="check record CRCs and labels but decode no images")
    f.add_argument("--image-sample", type=float, default=1.0, metavar="SHARE",
                   help="share of images to decode, seeded (default 1: all)")
    f.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="verification processes")
    f.add_argument("--max-corrupt", type=int, default=0, metavar="N",
                   help="corrupt records/images accepted per source (listed in the manifest)")
    f.add_argument("--reverify", action="store_true",
                   help="verify complete datasets again (default: trust their manifest)")
    f.add_argument("--quiet", action="store_true", help="no progress output")
    f.set_defaults(func=cmd_fetch)

    s = sub.add_parser("stats", help="tables and sample grids of a config's sources")
    s.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"shipped config (default {DEFAULT_CONFIG}): its sources, offsets and "
                        "per-class filtering")
    s.add_argument("--manifests", action="store_true",
                   help="use the sources recorded by `data fetch` under --root instead of the "
                        "config's (the config still gives the filtering)")
    s.add_argument("--root", default=None,
                   help="where the sources live (default data; a sample-data config: its own root)")
    s.add_argument("--out", default="build/data-stats", help="stats.json, stats.txt, PNG grids")
    s.add_argument("--grid", type=int, default=16, metavar="N", help="images per sample grid")
    s.set_defaults(func=cmd_stats)
