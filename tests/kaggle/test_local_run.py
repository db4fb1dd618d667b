"""`submit.py local` executes the same notebooks `push` builds, with papermill, end to end (the
run is the session's `smoke_run` fixture, shared with tests/test_pipeline.py)."""
import json
import zipfile

import nbformat
import pytest

from guie.kaggle.notebooks import injected_parameters


@pytest.mark.slow
def test_local_runs_the_kernels_notebooks(smoke_run):
    out = smoke_run
    report = json.loads((out / "report.json").read_text())
    for key in ("map5_untrained", "map5_stage1", "map5_stage2", "map5_export"):
        assert 0.0 <= report[key] <= 1.0
    assert abs(report["map5_export"] - report["map5_stage2"]) <= 0.02
    for kind in ("train", "infer"):
        built = out / "kaggle" / "kernels" / f"guie-{kind}-smoke" / f"{kind}.ipynb"
        executed = nbformat.read(out / "notebooks" / f"{kind}.ipynb", as_version=4)
        # the executed notebook is the built one: same cells, parameters re-pointed locally
        assert [c.source for c in executed.cells if "injected-parameters" not in
                c.metadata.get("tags", [])] == \
               [c.source for c in nbformat.read(built, as_version=4).cells
                if "injected-parameters" not in c.metadata.get("tags", [])]
        assert injected_parameters(built)["out_dir"] == "/kaggle/working"
        assert executed.metadata.papermill.parameters["out_dir"] == str(out)
    # the kernels found the packed copy of the source where Kaggle mounts it today, not this
    # checkout, and the inference kernel checked it read this training run
    params = executed.metadata.papermill.parameters
    assert params["input_root"] == str(out / "kaggle" / "input")
    mounted = out / "kaggle" / "input" / "datasets" / "local" / "guie-kit-src"
    assert (mounted / "src" / "guie" / "__init__.py").is_file()
    run = json.loads((out / "guie-run.json").read_text())
    assert run["status"] == "done" and params["expected_run"]["run_id"] == run["run_id"]
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.namelist() == ["saved_model.pt"]
