"""The benchmark harness and its JSON, run in-process at a tiny scale (no timing assertions)."""
import json

import pytest
import torch

from bench import common, gpu_bench
from bench.__main__ import main, parse_args
from bench.common import Figure, Paired, interleaved
from bench.report import goals_summary, markdown_table, text_table
from bench.suite import CPU_BENCHMARKS, Sizes
from guie.kaggle.build import PACKAGE_DIR
from guie.kaggle.packaging import package_tree
from guie.plan.estimates import kaggle_estimates

TINY = Sizes(decode_images=4, loader_epochs=1, stage1_images=8, reference_rows=512,
             reference_steps=1, knn_queries=20, knn_index=2_000, repeats=1, knn_repeats=1,
             export_repeats=1, export_cases=(("b1", (1, 3, 40, 30), 1), ("b2", (2, 3, 32, 32), 1)))

FIGURE_NAMES = {
    "decode": {"decode_speedup", "decode_psnr_db", "dataloader_0_workers",
               "dataloader_1_workers", "dataloader_2_workers"},
    "stage1": {"stage1_cache_speedup", "stage1_cache_speedup_backbone_only",
               "stage1_reference_schedule_cpu_s"},
    "knn": {"knn_time_ratio_vs_faiss", "knn_identical_neighbours"},
    "export": {"export_latency_ratio_vs_eager_b1", "export_latency_ratio_vs_eager_b2",
               "export_compat_latency_ratio_vs_eager_b1",
               "export_compat_latency_ratio_vs_eager_b2"},
}


def test_interleaved_alternates_and_pairs():
    calls = []
    paired = interleaved(lambda: calls.append("A"), lambda: calls.append("B"), repeats=4,
                         warmup=1)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert len(paired.ours_s) == len(paired.baseline_s) == 4
    p = Paired(ours_s=[1.0, 2.0, 1.0], baseline_s=[4.0, 4.0, 3.0])
    assert p.ours_median_s == 1.0 and p.baseline_median_s == 4.0
    assert p.speedup == 3.0 and p.time_ratio == pytest.approx(1 / 3)


def test_figure_goals_and_table():
    speed = Figure("speed", 10.0, 2.0, 5.0, "img/s", ">= 2.5")
    slow = Figure("ratio", 1.0, 1.0, 1.2, "s", "<= 1.05")
    psnr = Figure("psnr", 31.0, goal=">= 30")  # no ratio: the goal applies to ours
    info = Figure("info", 3.0, note="reported only")
    assert (speed.passed, slow.passed, psnr.passed, info.passed) == (True, False, True, None)
    figures = [speed, slow, psnr, info]
    assert goals_summary(figures) == {"evaluated": 3, "passed": 2, "failed": ["ratio"],
                                      "all_passed": False}
    table = text_table(figures)
    assert "figure" in table.splitlines()[0] and "NO" in table and "info: reported only" in table
    assert markdown_table(figures).count("\n") == len(figures) + 1


def test_cli_rejects_unknown_benchmarks():
    with pytest.raises(SystemExit):
        parse_args(["--only", "decode,nope"])
    assert parse_args(["--gpu"])[1] == CPU_BENCHMARKS + ("gpu",)
    assert parse_args(["--only", "knn"])[1] == ("knn",)


def test_gpu_skips_cleanly_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = gpu_bench.run(tmp_path, quick=True)
    assert [f.name for f in result.figures] == ["gpu"]
    assert result.figures[0].passed is None and "no CUDA" in result.figures[0].note


def test_kaggle_estimates_follow_the_anchor():
    est = kaggle_estimates()
    assert est["T4"]["test_pass_205k_h"] == pytest.approx(1.4)
    assert est["P100"]["test_pass_205k_h"] > est["T4"]["test_pass_205k_h"]
    assert est["2xT4"]["stage2_one_epoch_885k_h"] < est["T4"]["stage2_one_epoch_885k_h"]
    assert "ESTIMATES" in est["note"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_whole_suite_in_process_writes_the_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    status = main(["--quick", "--gpu", "--json", str(out)], sizes=TINY)
    assert status in (0, 1)  # timings at this scale mean nothing; the shape does
    assert torch.get_num_threads() == threads  # per-core figures restore the thread count
    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick" and doc["sizes"]["knn_index"] == 2_000
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch", "torch_threads",
                "load_average_1m"):
        assert key in doc["machine"]
    assert set(doc["benchmarks"]) == set(FIGURE_NAMES) | {"gpu"}
    for name, expected in FIGURE_NAMES.items():
        bench = doc["benchmarks"][name]
        assert {f["name"] for f in bench["figures"]} == expected
        assert bench["elapsed_s"] >= 0 and isinstance(bench["details"], dict)
    for f in doc["figures"]:
        assert set(f) == {"name", "ours", "baseline", "ratio", "unit", "goal", "passed", "note"}
    assert doc["benchmarks"]["knn"]["details"]["identical_neighbour_rows"] == 20
    judged = [f for f in doc["figures"] if f["passed"] is not None]
    assert doc["goals"]["evaluated"] == len(judged)
    assert status == (0 if doc["goals"]["all_passed"] else 1)
    assert "T4" in doc["kaggle_estimates"]
    printed = capsys.readouterr().out
    assert "decode_speedup" in printed and "goals:" in printed


def test_the_packed_kaggle_source_carries_no_benchmark_suite():
    """The kernels never run the suite: the source dataset they receive leaves it out."""
    packed = sorted(rel for rel in package_tree(PACKAGE_DIR) if rel.startswith("bench/"))
    assert packed in ([], ["bench/__init__.py"])  # at most the estimates re-export


def test_common_has_no_global_side_effects():
    before = torch.get_num_threads()
    with common.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_knn_fast_path_matches_faiss_and_brute_force():
    """The premise of figure 3 at a size that takes every branch of the CPU path (groups,
    super-groups, two worker threads), plus leave-one-out against a float64 brute force."""
    import faiss

    from bench.knn_bench import make_data
    from guie.metrics import knn

    queries, _, index, _ = make_data(num_queries=300, num_index=40_000)
    flat = faiss.IndexFlatL2(index.shape[1])
    flat.add(index)
    dist, idx = knn(torch.from_numpy(queries), torch.from_numpy(index), 5)
    ref_d, ref_i = flat.search(queries, 5)
    assert (idx.numpy() == ref_i).all()
    assert torch.allclose(dist, torch.from_numpy(ref_d).sqrt(), atol=1e-4)

    x = torch.from_numpy(index[:3_000]).double()
    _, idx = knn(x.float(), x.float(), 4, exclude_self=True)
    d2 = torch.cdist(x, x)
    d2.fill_diagonal_(float("inf"))
    assert torch.equal(idx, d2.topk(4, largest=False).indices)
