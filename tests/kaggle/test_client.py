"""The client wrapper against the fake Kaggle server, through the real kaggle client."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from support.kaggle_fixtures import KEY, USERNAME
from support.fake_server import default_leaderboard
from guie.kaggle.client import KaggleClient
from guie.kaggle.results import (AuthError, ConflictError, DailyCapReached, KaggleError,
                                 NotFoundError, RetryPolicy, SubmissionRejected, render_log)
from guie.kaggle.notebooks import kernel_metadata


def make_dataset(tmp_path: Path, slug: str = "guie-kit-src",
                 payload: bytes = b"x = 1\n" * 500) -> Path:
    folder = tmp_path / slug
    (folder / "src" / "guie").mkdir(parents=True)
    (folder / "src" / "guie" / "__init__.py").write_bytes(payload)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (folder / "dataset-metadata.json").write_text(json.dumps({
        "id": f"{USERNAME}/{slug}", "title": "GUIE kit source", "licenses": [{"name": "CC0-1.0"}]}))
    return folder


def make_kernel(tmp_path: Path, slug: str = "guie-infer-smoke") -> Path:
    folder = tmp_path / slug
    folder.mkdir()
    (folder / "infer.ipynb").write_text(json.dumps({
        "cells": [{"cell_type": "code", "source": ["print(1)\n", "print(2)"], "metadata": {},
                   "outputs": [{"output_type": "stream", "name": "stdout", "text": "old"}],
                   "execution_count": 3}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        "nbformat": 4, "nbformat_minor": 5}))
    meta = kernel_metadata(f"{USERNAME}/{slug}", "GUIE infer smoke", "infer.ipynb", enable_gpu=True,
                           enable_internet=False, dataset_sources=[f"{USERNAME}/guie-kit-src"],
                           competition_sources=["google-universal-image-embedding"])
    (folder / "kernel-metadata.json").write_text(json.dumps(meta))
    return folder


# ----------------------------------------------------------------------------- credentials


def test_missing_credentials_give_a_clear_error(isolated_env, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    with pytest.raises(AuthError, match="No Kaggle credentials.*kaggle.json.*KAGGLE_USERNAME"):
        KaggleClient.connect()


def test_credentials_from_kaggle_json(isolated_env, fake_kaggle, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    config = isolated_env / "home" / ".kaggle" / "kaggle.json"
    config.write_text(json.dumps({"username": USERNAME, "key": KEY}))
    config.chmod(0o600)
    client = KaggleClient.connect()
    assert client.username == USERNAME and KEY in client.credentials.secrets
    assert client.dataset_status(f"{USERNAME}/nothing-here") is None


def test_wrong_key_is_a_clear_401(fake_kaggle, monkeypatch):
    monkeypatch.setenv("KAGGLE_KEY", "not-the-right-key")
    client = KaggleClient.connect(retry=RetryPolicy(initial_delay_s=0.01))
    with pytest.raises(AuthError, match="refused the credentials of user 'fake-user' .*HTTP 401"):
        client.dataset_status(f"{USERNAME}/guie-kit-src")
    # kernels_status itself calls a 401 a wrong slug; the wrapper still says credentials.
    with pytest.raises(AuthError, match="refused the credentials"):
        client.kernel_status(f"{USERNAME}/guie-infer-smoke")
    assert len(fake_kaggle.rpc_calls("GetDatasetStatus")) == 1  # a 401 is not retried


# ----------------------------------------------------------------------------- datasets


def test_first_push_creates_then_versions(client, fake_kaggle, tmp_path):
    folder = make_dataset(tmp_path)
    first = client.push_dataset(folder, "first", dir_mode="zip")
    assert first.created and first.ref == f"{USERNAME}/guie-kit-src"
    client.wait_dataset_ready(first.ref, poll_s=0)
    created = fake_kaggle.rpc_calls("CreateDataset")[0]
    assert created["title"] == "GUIE kit source" and created["licenseName"] == "CC0-1.0"
    assert created["isPrivate"] is True
    files = fake_kaggle.received_files()
    assert files["src.zip/guie/__init__.py"] == (folder / "src/guie/__init__.py").read_bytes()
    assert files["weights.bin"] == (folder / "weights.bin").read_bytes()

    second = client.push_dataset(folder, "second", dir_mode="zip")
    assert not second.created
    assert fake_kaggle.rpc_calls("CreateDatasetVersion")[0]["body"]["versionNotes"] == "second"
    assert len(fake_kaggle.datasets[first.ref].versions) == 2


def test_404_just_after_creating_is_tolerated(client, fake_kaggle, tmp_path):
    ref = client.push_dataset(make_dataset(tmp_path), "first").ref
    fake_kaggle.fail("GetDatasetStatus", 404, times=2, message="Dataset not found")
    client.wait_dataset_ready(ref, poll_s=0)
    with pytest.raises(NotFoundError, match="still not found"):
        client.wait_dataset_ready(f"{USERNAME}/never-created", poll_s=0, missing_grace_polls=2)


def test_slug_conflict_409_is_reported_not_retried(client, fake_kaggle, tmp_path):
    fake_kaggle.fail("CreateDataset", 409,
                     message="The dataset slug 'guie-kit-src' is already in use")
    with pytest.raises(ConflictError, match="already in use"):
        client.push_dataset(make_dataset(tmp_path), "first")
    assert len(fake_kaggle.rpc_calls("CreateDataset")) == 1


def test_error_field_in_a_200_answer_is_an_error(client, fake_kaggle, tmp_path):
    fake_kaggle.fail("CreateDataset", 200, body={"status": "Error", "error": "Invalid license"})
    with pytest.raises(KaggleError, match="Invalid license"):
        client.push_dataset(make_dataset(tmp_path), "first")


def test_429_on_create_is_retried_by_the_client_itself(client, fake_kaggle, tmp_path):
    fake_kaggle.fail("CreateDataset", 429, retry_after_s=0)
    assert client.push_dataset(make_dataset(tmp_path), "first").created
    assert len(fake_kaggle.rpc_calls("CreateDataset")) == 2


def test_500_on_create_is_not_retried(client, fake_kaggle, tmp_path):
    fake_kaggle.fail("CreateDataset", 500, message="backend error")
    with pytest.raises(KaggleError, match="HTTP 500"):
        client.push_dataset(make_dataset(tmp_path), "first")
    assert len(fake_kaggle.rpc_calls("CreateDataset")) == 1


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_on_reads_are_retried_with_backoff(client, fake_kaggle, status):
    fake_kaggle.fail("GetDatasetStatus", status, times=2)
    delays: list[float] = []
    client._sleep = delays.append
    assert client.dataset_status(f"{USERNAME}/nothing-here") is None
    assert len(fake_kaggle.rpc_calls("GetDatasetStatus")) == 3
    assert len(delays) == 2 and all(d <= 0.05 for d in delays)


def test_reads_give_up_after_max_attempts(client, fake_kaggle):
    fake_kaggle.fail("ListSubmissions", 500, times=10)
    with pytest.raises(KaggleError, match="list submissions: HTTP 500"):
        client.list_submissions()
    assert len(fake_kaggle.rpc_calls("ListSubmissions")) == client.retry.max_attempts


def test_backoff_grows_and_has_jitter():
    policy = RetryPolicy(initial_delay_s=1, multiplier=2, max_delay_s=10)
    delays = [policy.delay_s(a, None) for a in range(6) for _ in range(20)]
    assert all(0.5 <= d <= 10 for d in delays) and len(set(delays)) > 20
    assert (max(policy.delay_s(0, None) for _ in range(50)) <= 1
            < min(policy.delay_s(3, None) for _ in range(50)))
    assert policy.delay_s(0, retry_after_s=3) == 3


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_upload_that_breaks_midway_is_resumed(client, fake_kaggle, tmp_path, mode):
    folder = make_dataset(tmp_path, payload=bytes(range(256)) * 400)  # incompressible-ish
    fake_kaggle.upload_break = mode
    client.push_dataset(folder, "first", dir_mode="zip")
    puts = [c for name, c in fake_kaggle.calls if name == "PUT"]
    if mode == "503":  # the client asks how much arrived, then sends the rest
        assert any(p["content_range"].startswith("bytes */") for p in puts[1:2])
        assert puts[2]["content_range"].startswith("bytes ") and "-" in puts[2]["content_range"]
        assert not puts[2]["content_range"].startswith("bytes 0-")
    else:  # urllib3 re-sends the whole body on the broken connection
        assert puts[0]["token"] == puts[1]["token"]
    files = fake_kaggle.received_files()
    assert files["src.zip/guie/__init__.py"] == (folder / "src/guie/__init__.py").read_bytes()
    assert all(blob.complete for blob in fake_kaggle.blobs.values())


def test_malformed_calls_are_rejected_by_the_fake(fake_kaggle):
    auth = (USERNAME, KEY)
    url = f"{fake_kaggle.url}/v1/datasets.DatasetApiService/GetDatasetStatus"
    answer = requests.post(url, json={"ownerSlug": USERNAME, "datasetSlug": "x", "bogus": 1},
                           auth=auth)
    assert answer.status_code == 400 and "bogus" in answer.json()["message"]
    answer = requests.post(url, json={"ownerSlug": 3, "datasetSlug": "x"}, auth=auth)
    assert answer.status_code == 400 and "ownerSlug" in answer.json()["message"]
    url = f"{fake_kaggle.url}/v1/datasets.DatasetApiService/CreateDatasetVersion"
    answer = requests.post(url, json={"ownerSlug": USERNAME, "datasetSlug": "x",
                                      "body": {"files": [{"token": "t", "extra": 1}]}}, auth=auth)
    assert answer.status_code == 400 and "extra" in answer.json()["message"]


# ----------------------------------------------------------------------------- kernels


def test_kernel_push_status_and_output(client, fake_kaggle, tmp_path):
    pushed = client.push_kernel(make_kernel(tmp_path))
    assert pushed.version == 1 and pushed.url.endswith("guie-infer-smoke")
    saved = fake_kaggle.rpc_calls("SaveKernel")[0]
    assert saved["enableInternet"] is False and saved["enableGpu"] is True
    assert saved["competitionDataSources"] == ["google-universal-image-embedding"]
    assert saved["machineShape"] == "NvidiaTeslaT4" and saved["isPrivate"] is True
    notebook = json.loads(saved["text"])
    assert (notebook["cells"][0]["outputs"] == []
            and notebook["cells"][0]["source"] == "print(1)\nprint(2)")

    log = json.dumps([{"stream_name": "stdout", "time": 1.0, "data": "epoch 1\n"}])
    fake_kaggle.add_kernel_run(pushed.ref, [("RUNNING", ""), ("COMPLETE", "")],
                               {"submission.zip": b"PK-zip", "report.json": b"{}"}, log)
    seen = []
    final = client.wait_kernel(pushed.ref, poll_s=0, on_poll=lambda s: seen.append(s.state))
    assert seen == ["RUNNING", "COMPLETE"] and final.done
    output = client.download_kernel_output(pushed.ref, tmp_path / "out")
    assert (tmp_path / "out" / "submission.zip").read_bytes() == b"PK-zip"
    assert output.log_text == "epoch 1\n" and output.log_path.name == "guie-infer-smoke.log"


def test_kernel_ending_in_error_reports_message_and_log(client, fake_kaggle, tmp_path):
    ref = client.push_kernel(make_kernel(tmp_path)).ref
    log = json.dumps([{"stream_name": "stderr", "time": 2.0, "data": "CUDA out of memory\n"}])
    fake_kaggle.add_kernel_run(ref, [("ERROR", "Your notebook hit an error")], {}, log)
    status = client.wait_kernel(ref, poll_s=0)
    assert status.state == "ERROR" and status.failure_message == "Your notebook hit an error"
    assert "CUDA out of memory" in client.download_kernel_output(ref, tmp_path / "out").log_text


def test_output_download_retries_5xx_and_never_keeps_an_error_page(client, fake_kaggle, tmp_path):
    ref = client.push_kernel(make_kernel(tmp_path)).ref
    fake_kaggle.add_kernel_run(ref, [("COMPLETE", "")], {"a.txt": b"A"}, "")
    fake_kaggle.fail("GET", 500)
    client.download_kernel_output(ref, tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"A"
    fake_kaggle.fail("GET", 404)
    with pytest.raises(NotFoundError):
        client.download_kernel_output(ref, tmp_path / "out2")
    assert not (tmp_path / "out2" / "a.txt").exists()


def test_kernel_push_with_unknown_sources_fails(client, fake_kaggle, tmp_path):
    fake_kaggle.missing_datasets.add(f"{USERNAME}/guie-kit-src")
    with pytest.raises(KaggleError, match="unknown dataset sources"):
        client.push_kernel(make_kernel(tmp_path))


def test_pushing_as_another_owner_is_a_clear_403(client, fake_kaggle, tmp_path):
    folder = make_kernel(tmp_path)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    (folder / "kernel-metadata.json").write_text(
        json.dumps({**meta, "id": "someone-else/guie-infer-smoke"}))
    with pytest.raises(AuthError, match="may not do this .*HTTP 403.*owner in the id"):
        client.push_kernel(folder)


def test_render_log_handles_json_and_plain_text():
    assert render_log('[{"data": "a\\n"}, {"data": "b"}]') == "a\nb"
    assert render_log("plain") == "plain" and render_log("") == ""


# ----------------------------------------------------------------------------- competition


def pushed_infer_kernel(client, tmp_path) -> str:
    return client.push_kernel(make_kernel(tmp_path)).ref


def test_submit_code_sends_owner_slug_version_and_file(client, fake_kaggle, tmp_path):
    ref = pushed_infer_kernel(client, tmp_path)
    receipt = client.submit_code(ref, 1, "exp=smoke commit=abc", daily_cap=5)
    sent = fake_kaggle.rpc_calls("CreateCodeSubmission")[0]
    assert sent == {"competitionName": "google-universal-image-embedding", "kernelOwner": USERNAME,
                    "kernelSlug": "guie-infer-smoke", "kernelVersion": 1,
                    "fileName": "submission.zip", "submissionDescription": "exp=smoke commit=abc"}
    assert receipt.ref > 0 and receipt.remaining_today == 4


def test_rejected_submission_is_reported_and_sent_once(client, fake_kaggle, tmp_path):
    ref = pushed_infer_kernel(client, tmp_path)
    fake_kaggle.reject_submission = "submission.zip not found in kernel output"
    with pytest.raises(SubmissionRejected, match="submission.zip not found"):
        client.submit_code(ref, 1, "exp=smoke")
    assert len(fake_kaggle.rpc_calls("CreateCodeSubmission")) == 1


@pytest.mark.parametrize("status", [500, 429])
def test_submission_is_never_retried(client, fake_kaggle, tmp_path, status):
    ref = pushed_infer_kernel(client, tmp_path)
    fake_kaggle.fail("CreateCodeSubmission", status, retry_after_s=0)
    with pytest.raises(KaggleError, match="may or may not have been recorded"):
        client.submit_code(ref, 1, "exp=smoke")
    assert len(fake_kaggle.rpc_calls("CreateCodeSubmission")) == 1


@pytest.mark.parametrize("limits_endpoint", [True, False])
def test_daily_cap_reached_sends_nothing(client, fake_kaggle, tmp_path, limits_endpoint):
    ref = pushed_infer_kernel(client, tmp_path)
    fake_kaggle.limits_endpoint = limits_endpoint
    fake_kaggle.add_submission("yesterday", date=datetime.now(timezone.utc) - timedelta(days=1))
    for i in range(5):
        fake_kaggle.add_submission(f"exp=smoke #{i}")
    with pytest.raises(DailyCapReached, match="nothing was sent"):
        client.submit_code(ref, 1, "exp=smoke", daily_cap=5)
    assert fake_kaggle.rpc_calls("CreateCodeSubmission") == []


def test_all_zero_limits_mean_no_team_yet_not_no_submissions(client, fake_kaggle, tmp_path):
    ref = pushed_infer_kernel(client, tmp_path)
    fake_kaggle.fail("GetSubmissionLimits", 200, body={})  # numAllowedNow 0, numTotal 0
    assert client.submit_code(ref, 1, "exp=smoke").ref > 0


def test_submissions_and_leaderboard(client, fake_kaggle, tmp_path):
    now = datetime.now(timezone.utc)
    for i in range(3):
        fake_kaggle.add_submission(f"exp=smoke #{i}", public=f"0.{50 + i}",
                                   date=now - timedelta(minutes=3 - i))
    fake_kaggle.leaderboard = default_leaderboard(5)
    submissions = client.list_submissions()
    assert [s.public_score for s in submissions] == [0.52, 0.51, 0.50]  # newest first
    board = client.leaderboard(top=3)
    assert [e.rank for e in board] == [1, 2, 3] and board[0].score == 0.73
    path = client.download_leaderboard(tmp_path)
    assert path.name == "google-universal-image-embedding.zip" and path.stat().st_size > 0
