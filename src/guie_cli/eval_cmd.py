"""`submit.py eval`: score an export (or a training run, exported first) on evaluation sources.

The model runs as the Kaggle host runs it: the TorchScript file alone, one image per call at its
original size. Sources come from a config's `data.eval_sources` and from `--source`; with a
config, images that also appear in its training data are dropped first. Writes `report.json`
(mP@5 per source and per domain) and, per source, the retrieval rig's page of the worst queries.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from guie.benchmark import SourceScore, score_source
from guie.config import EvalSource, ExperimentConfig
from guie.configs import resolve_config
from guie.data.eval_sources import drop_training_duplicates, load_eval_source
from guie.errors import UserError
from guie.retrieval.index import Embedder
from guie.retrieval.report import Match, QueryResult, write_report


def parse_source(text: str) -> EvalSource:
    """KIND:PATH[:DOMAIN], e.g. gpr1200:data/GPR1200 or folders:photos/mine:memes."""
    kind, _, rest = text.partition(":")
    location, _, domain = rest.partition(":")
    if kind not in ("folders", "csv", "gpr1200") or not location:
        raise UserError(f"--source {text!r}: expected KIND:PATH[:DOMAIN] with KIND folders, csv "
                        "or gpr1200 (e.g. gpr1200:data/GPR1200)")
    return EvalSource(Path(location).name or location, kind, location, domain)


def _model_file(model: Path, cfg: ExperimentConfig | None, out: Path) -> Path:
    if model.is_dir():  # a training output: export it first, so what is scored is what ships
        from guie.config import load_config
        from guie.export.build import export_submission

        saved = model / "config.json"
        if not saved.is_file() and cfg is None:
            raise UserError(f"--model {model}: a folder without config.json; pass --config NAME")
        return export_submission(cfg if cfg is not None else load_config(saved), str(model),
                                 str(out / "export"))
    return model


def _page(score: SourceScore, out: Path) -> Path:
    results = [QueryResult(Path(q.path).name, Path(q.path), (0, 0),
                           [Match(Path(n).name, Path(n), d, None) for n, d in
                            zip(q.neighbours, q.distances, strict=True)])
               for q in score.worst]
    summary = [f"{score.name}: mP@5 {score.map5:.4f} over {score.num_queries} queries",
               *(f"{domain}: {value:.4f}" for domain, value in score.map5_per_domain.items()),
               f"worst {len(score.worst)} queries below (precision: "
               + ", ".join(f"{q.precision:.2f}" for q in score.worst) + ")"]
    html, _ = write_report(out, results, [], summary)
    return html


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.config, args.overrides) if args.config else None
    sources = [*(cfg.data.eval_sources if cfg else ()), *map(parse_source, args.source)]
    if not sources:
        raise UserError("eval: no evaluation source: name one with --source KIND:PATH or a "
                        "config with data.eval_sources")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    embedder = Embedder(_model_file(Path(args.model), cfg, out))
    train = None
    if cfg is not None:
        from guie.experiment import load_experiment_split

        train = load_experiment_split(cfg.data)[0].train
    report = {}
    root = cfg.data.root if cfg else "."
    for src in sources:
        frame = load_eval_source(src, root)
        frame, dropped = drop_training_duplicates(frame, train) if train is not None else (frame, 0)
        base = Path(os.path.commonpath(list(frame["path"])))
        base = base if base.is_dir() else base.parent
        rel = [Path(p).relative_to(base).as_posix() for p in frame["path"]]
        done, skipped = embedder.embed_files(base, rel, desc=f"eval {src.name}")
        keep = [r in done for r in rel]
        frame = frame[keep].reset_index(drop=True)
        embeddings = torch.stack([done[r][0] for r, k in zip(rel, keep, strict=True) if k])
        score = score_source(src.name, frame, embeddings, worst=args.worst,
                             dropped_duplicates=dropped)
        report[src.name] = {**score.report(), "skipped": len(skipped)}
        page = _page(score, out / src.name)
        per_domain = ", ".join(f"{d} {v:.4f}" for d, v in score.map5_per_domain.items())
        print(f"{src.name}: mP@5 {score.map5:.4f} ({score.num_queries} queries; {per_domain}); "
              f"{dropped} training duplicates dropped; page {page}")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out / 'report.json'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score an export or a training run on evaluation "
                                           "sources (GPR1200, your folders), per domain")
    p.add_argument("--model", required=True,
                   help="saved_model.pt, submission.zip, or a training output folder")
    p.add_argument("--config", default=None,
                   help="a config: its data.eval_sources, and its training data for the "
                        "duplicate check")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--source", action="append", default=[], metavar="KIND:PATH[:DOMAIN]",
                   help="an evaluation source (folders, csv or gpr1200); repeatable")
    p.add_argument("--worst", type=int, default=20, help="worst queries shown per source")
    p.add_argument("--out", default="build/eval", help="report.json and one page per source")
    p.set_defaults(func=cmd_eval)
