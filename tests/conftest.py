"""Shared pytest fixtures. Keep each fixture small and say what it is for."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_guie_cache(tmp_path_factory):
    """Point GUIE_CACHE_DIR at a temporary folder so tests never write to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GUIE_CACHE_DIR", str(tmp_path_factory.mktemp("guie-cache")))
        yield


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """(root, (tfrecord DataSource, csv DataSource)): a small build of the sample data set."""
    from guie.data.sample import build_sample_data

    root = tmp_path_factory.mktemp("sample-data")
    return root, build_sample_data(root, num_instances=160, views_per_instance=5, seed=0)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The output folder of one `submit.py local --config smoke` through the command line's own
    entry, the notebooks executed by papermill: minutes, so run once per session and shared by
    tests/test_pipeline.py (the reports and files) and tests/kaggle/test_local_run.py (the
    notebooks and the mounted inputs). Only slow tests should ask for it."""
    from guie_cli.main import main

    work = tmp_path_factory.mktemp("smoke-run")
    out = work / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # the smoke config builds its sample data under build/
        assert main(["local", "--config", "smoke", "--out", str(out)]) == 0
    return out
