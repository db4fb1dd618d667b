"""`python -m bench [--quick] [--gpu] [--json PATH] [--only NAMES]`.

Prints the table (figure, ours, baseline, unit, ratio, goal, pass) and writes the figures with a
description of the machine as JSON. Exit status 0 when every evaluated goal passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys

from bench.report import text_table, write_json
from bench.suite import ALL_BENCHMARKS, CPU_BENCHMARKS, FULL, QUICK, Sizes, run_suite


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the kit's fast paths against their baselines, side by side.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer images and repeats: under a minute on 2 CPU cores")
    parser.add_argument("--gpu", action="store_true",
                        help="add the CUDA benchmarks (ViT-H-14); skipped without a GPU")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--only", metavar="NAMES",
                        help=f"comma-separated subset of {','.join(ALL_BENCHMARKS)}")
    args = parser.parse_args(argv)
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = sorted(set(names) - set(ALL_BENCHMARKS))
        if unknown:
            parser.error(f"--only: unknown benchmarks {unknown} "
                         f"(known: {', '.join(ALL_BENCHMARKS)})")
    else:
        names = CPU_BENCHMARKS + (("gpu",) if args.gpu else ())
    return args, names


def main(argv=None, sizes: Sizes | None = None) -> int:
    """`sizes` overrides the scale (tests run the whole suite at a tiny one)."""
    args, names = parse_args(argv)
    sizes = sizes or (QUICK if args.quick else FULL)
    document, figures = run_suite(names, sizes, args.quick,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    print(text_table(figures))
    goals = document["goals"]
    print(f"\ngoals: {goals['passed']}/{goals['evaluated']} passed"
          + (f"; failed: {', '.join(goals['failed'])}" if goals["failed"] else "")
          + f"; {document['elapsed_s']:.0f} s")
    if args.json:
        write_json(args.json, document)
    return 0 if goals["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
