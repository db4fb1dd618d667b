"""`submit.py search`: show what a TorchScript model retrieves from a folder of images.

Writes into --out: report.html (self-contained), contact_sheet.png, neighbours.csv, and the
saved embeddings index.npz / queries.npz that later runs reuse. `--model` takes the exported
saved_model.pt or the submission.zip holding it; mistakes in the arguments, a model file of the
wrong kind (a training checkpoint) or a model breaking the contract end in one `error:` line
(exit 2, printed by guie_cli.main).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from guie.errors import UserError
from guie.metrics import knn
from guie.retrieval.index import Embedder, update_index
from guie.retrieval.labels import leave_one_out, labels_from_csv, labels_from_folders
from guie.retrieval.report import Match, QueryResult, SkippedFile, write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search", help="show a model's top-k retrievals from a folder (HTML report)",
        description="Embed --index once (reused while unchanged), find the k nearest index "
                    "images of each --query image and write a self-contained HTML report, a "
                    "contact sheet and, where the index has labels, leave-one-out mP@k.")
    parser.add_argument("--model", type=Path, required=True,
                        help="the exported model: saved_model.pt (TorchScript following the "
                             "competition contract) or the submission.zip holding it")
    parser.add_argument("--index", type=Path, required=True,
                        help="folder of images to search (labels: one sub-folder per class)")
    parser.add_argument("--query", type=Path, required=True, help="an image or a folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report and cache")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query")
    parser.add_argument("--max-side", type=int, default=None,
                        help="downscale images whose longest side exceeds this (default: "
                             "original size, as the Kaggle host feeds them)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images of identical size share a forward call, up to N (default "
                             "1: each image alone); embeddings match up to float noise")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--labels", type=Path, default=None,
                        help="CSV of path,label (paths relative to --index) instead of "
                             "sub-folder labels")
    parser.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        raise UserError(f"search: {problem}")
    out = args.out.resolve()
    index_root = args.index.resolve()
    query_path = args.query.resolve()
    exclude = [out] + ([args.labels.resolve()] if args.labels else [])
    try:  # read before any embedding, so a bad file fails fast
        csv_labels = labels_from_csv(args.labels, index_root) if args.labels else None
    except (ValueError, OSError) as exc:
        raise UserError(f"search: bad --labels file: {exc}") from exc
    # A checkpoint or a zip without saved_model.pt is a ModelFileError, and a model breaking
    # the contract a ModelContractError: both reach main as one `error:` line.
    embedder = Embedder(args.model, device=args.device, max_side=args.max_side,
                        batch_size=args.batch_size)
    index, index_stats = update_index(index_root, embedder, out / "index.npz",
                                      exclude=exclude, desc="index")
    print(f"index {index_root}: {len(index.entries)} images, {len(index.skipped)} skipped "
          f"({index_stats.describe()})")
    if not index.entries:
        raise UserError(f"search: no image in {index_root} could be embedded ("
                        f"{len(index.skipped)} file(s) skipped"
                        + (f", e.g. {index.skipped[0].path}: {index.skipped[0].reason}"
                           if index.skipped else "") + ")")
    query_root = query_path.parent if query_path.is_file() else query_path
    only = [query_path.name] if query_path.is_file() else None
    queries, query_stats = update_index(query_root, embedder, out / "queries.npz",
                                        exclude=exclude, only=only, donor=index,
                                        desc="queries")
    print(f"queries {query_path}: {len(queries.entries)} images, {len(queries.skipped)} skipped "
          f"({query_stats.describe()})")

    labels = csv_labels if csv_labels is not None else labels_from_folders(index.paths)
    results = _neighbours(index, queries, args.k, labels)
    loo = leave_one_out(index.embeddings, index.paths, labels, args.k) if labels else None
    skipped = ([SkippedFile("index", s.path, s.reason) for s in index.skipped]
               + [SkippedFile("query", s.path, s.reason) for s in queries.skipped])
    summary = _summary(args, embedder.model_sha256, index, index_stats, queries, query_path)
    if loo is not None and loo.map_at_k is not None:
        summary.append(f"leave-one-out mP@{args.k} = {loo.map_at_k:.4f} over "
                       f"{len(loo.queries)} labelled queries")
        print(summary[-1])
    html_path, sheet_path = write_report(out, results, skipped, summary, loo, index_root)
    _write_neighbours_csv(out / "neighbours.csv", results)
    print(f"report {html_path}\ncontact sheet {sheet_path}")
    return 0


def _summary(args, model_sha256: str, index, index_stats, queries, query_path: Path
             ) -> list[str]:
    return [
        f"model {args.model.resolve()} (sha256 {model_sha256[:16]}…), device {args.device}, "
        f"k = {args.k}, max side {args.max_side or 'none (original size)'}, "
        f"batch size {args.batch_size}",
        f"index {index.root}: {len(index.entries)} images embedded, {len(index.skipped)} "
        f"skipped; this run: {index_stats.describe()}",
        f"queries {query_path}: {len(queries.entries)} images, {len(queries.skipped)} skipped",
    ]


def _check_args(args: argparse.Namespace) -> str | None:
    if not args.model.exists():
        return f"--model {args.model} does not exist"
    if not args.index.is_dir():
        return f"--index {args.index} is not a folder"
    if not args.query.exists():
        return f"--query {args.query} does not exist"
    if args.labels is not None and not args.labels.is_file():
        return f"--labels {args.labels} is not a file"
    if args.k < 1:
        return f"--k must be >= 1, got {args.k}"
    if args.max_side is not None and args.max_side < 1:
        return f"--max-side must be >= 1, got {args.max_side}"
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no CUDA device"
    return None


def _neighbours(index, queries, k: int, labels: dict[str, str] | None) -> list[QueryResult]:
    """Top-k index images per query; a query that is itself an index file never finds itself."""
    index_row = {(index.root / p): i for i, p in enumerate(index.paths)}
    query_files = [queries.root / p for p in queries.paths]
    self_rows = [index_row.get(f) for f in query_files]
    if not query_files:
        return []
    extra = int(any(row is not None for row in self_rows))
    dist, idx = knn(queries.embeddings, index.embeddings, k + extra)
    results = []
    for q, (file, entry) in enumerate(zip(query_files, queries.entries, strict=True)):
        query_label = _label_of(file, index.root, labels)
        matches = []
        for d, j in zip(dist[q].tolist(), idx[q].tolist(), strict=True):
            if j == self_rows[q] or len(matches) == k:
                continue
            name = index.paths[j]
            match_label = labels.get(name) if labels else None
            correct = (None if query_label is None or match_label is None
                       else match_label == query_label)
            matches.append(Match(name, index.root / name, d, correct))
        results.append(QueryResult(_display_name(file, index.root, queries.root), file,
                                   (entry.width, entry.height), matches))
    return results


def _label_of(file: Path, index_root: Path, labels: dict[str, str] | None) -> str | None:
    if not labels or not file.is_relative_to(index_root):
        return None
    return labels.get(file.relative_to(index_root).as_posix())


def _display_name(file: Path, index_root: Path, query_root: Path) -> str:
    base = index_root if file.is_relative_to(index_root) else query_root
    return file.relative_to(base).as_posix()


def _write_neighbours_csv(path: Path, results: list[QueryResult]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="replace") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "rank", "neighbour", "distance"])
        for result in results:
            for rank, match in enumerate(result.matches, start=1):
                writer.writerow([result.name, rank, match.name, f"{match.distance:.6f}"])
