"""Kaggle as it really answers, through the real client against the fake server: reads of a
named kernel version right after a re-push (when unversioned reads still show the previous
session), the label formats, the push nonce, the GPU quota, the preflight gate, pinned inputs
and the kernel reference Kaggle answers with."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from guie_cli.main import main
from support.kaggle_fixtures import USERNAME

SOURCES = ('data.sources=[{"name": "glr", "kind": "tfrecord", "location": "glr", '
           '"kaggle_slug": "someone/glr-mini-tfrecords"}]')
SRC, WHEELS = f"{USERNAME}/guie-kit-src", f"{USERNAME}/guie-kit-wheels"
TRAIN, INFER = f"{USERNAME}/guie-train-smoke", f"{USERNAME}/guie-infer-smoke"
HUGE_BATCH = "stage2.batch_size=2000000"  # cannot fit any GPU


def cli(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture
def workdir(tmp_path: Path) -> str:
    return str(tmp_path / "work")


def push(workdir: str, wheelhouse: Path, *extra: str) -> int:
    """`push` with options and KEY=VALUE overrides in any order (the overrides go last)."""
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    options = [a for a in extra if a not in overrides]
    return cli("push", "--workdir", workdir, "--wheels-from", str(wheelhouse), "--poll-s", "0",
               "--stale-grace-s", "5", *options, *overrides, SOURCES)


def saved(fake, slug: str) -> list[dict]:
    return [b for b in fake.rpc_calls("SaveKernel") if b["slug"] == slug]


# ----------------------------------------------------------------------------- reads by version


def test_reads_name_the_version_and_a_repush_reads_its_own_session(client, fake_kaggle, tmp_path):
    from test_client import make_kernel

    folder = make_kernel(tmp_path)
    first = client.push_kernel(folder)
    fake_kaggle.add_kernel_run(first.ref, [("COMPLETE", "")], {"a.txt": b"old"}, "", version=1)
    fake_kaggle.stale_reads_after_push = 10  # unversioned reads keep showing version 1
    fake_kaggle.next_statuses = [("RUNNING", ""), ("ERROR", "boom")]
    second = client.push_kernel(folder)
    assert (first.version, second.version) == (1, 2)
    assert client.kernel_status(second.ref, 2).state == "RUNNING"
    assert client.kernel_status(second.ref, 2).state == "ERROR"
    assert client.kernel_output_names(second.ref, 2) == []  # not version 1's a.txt
    assert client.kernel_output_names(second.ref, 1) == ["a.txt"]
    # the raw keys the client sent (from_dict would take a renamed key silently)
    assert [b.get("versionLabel") for b in fake_kaggle.kernel_reads("GetKernelSessionStatus")] \
        == ["v2", "v2"]
    assert fake_kaggle.kernel_reads("ListKernelSessionOutput")[-1]["versionLabel"] == "v1"
    assert client.kernel_status(second.ref).state == "COMPLETE"  # unversioned: the stale one


def test_a_label_format_kaggle_refuses_falls_back_to_the_other(client, fake_kaggle, tmp_path):
    from test_client import make_kernel

    ref = client.push_kernel(make_kernel(tmp_path)).ref
    fake_kaggle.version_labels = "number"
    assert client.kernel_status(ref, 1).state == "RUNNING"
    assert [b["versionLabel"] for b in fake_kaggle.kernel_reads("GetKernelSessionStatus")] \
        == ["v1", "1"]
    assert client.label_format == "{}"  # kept for the next reads
    client.kernel_status(ref, 1)
    assert fake_kaggle.kernel_reads("GetKernelSessionStatus")[-1]["versionLabel"] == "1"


def test_the_kernel_reference_is_the_one_kaggle_answers(client, fake_kaggle, tmp_path):
    from guie.kaggle.kernel_calls import kernel_ref_from_answer
    from test_client import make_kernel

    fake_kaggle.slug_renames[INFER] = f"{INFER}-1"  # Kaggle stored it under another slug
    pushed = client.push_kernel(make_kernel(tmp_path))
    assert pushed.ref == f"{INFER}-1" and pushed.url.endswith(f"{INFER}-1")
    assert client.kernel_status(pushed.ref, pushed.version).state == "RUNNING"
    assert kernel_ref_from_answer("/code/a/b", None, "x/y") == "a/b"
    assert kernel_ref_from_answer("a/b", None, "x/y") == "a/b"
    assert kernel_ref_from_answer("", "https://www.kaggle.com/code/a/b", "x/y") == "a/b"
    assert kernel_ref_from_answer("", "", "x/y") == "x/y"


def test_the_gpu_quota_as_kaggle_reports_it(client, fake_kaggle):
    assert client.quota() is None  # a service without GetAcceleratorQuotaStatistics
    fake_kaggle.set_quota(total_h=31.5, used_h=12.25, reserved_h=1.0, minimum_h=30.0)
    quota = client.quota()
    assert (quota.total_h, quota.used_h, quota.reserved_h, quota.minimum_h) == (
        31.5, 12.25, 1.0, 30.0)
    assert quota.remaining_h == pytest.approx(18.25) and quota.refresh_at is not None
    assert quota.describe().startswith("18.25 h left (31.50 h allowed")


# ----------------------------------------------------------------------------- push --wait


@pytest.mark.parametrize("labels", ["v", "ignore"])
def test_push_wait_acts_on_the_new_version_after_a_repush(fake_kaggle, workdir, wheelhouse,
                                                          labels, capsys):
    """The first reads after the re-push show the previous, COMPLETE session; the new one fails.
    With labels honoured the versioned reads see it at once; with labels ignored the push nonce
    turns the stale COMPLETE into "not yet" until the new session answers."""
    assert push(workdir, wheelhouse, "--wait") == 0
    fake_kaggle.version_labels = labels
    fake_kaggle.stale_reads_after_push = 4
    fake_kaggle.next_statuses = [("RUNNING", ""), ("ERROR", "boom")]
    capsys.readouterr()
    assert push(workdir, wheelhouse, "--wait", "stage1.epochs=2") == 2
    out, err = capsys.readouterr()
    assert "training kernel fake-user/guie-train-smoke version 2 ended ERROR boom" in err
    assert len(saved(fake_kaggle, INFER)) == 1  # no inference kernel on a stale COMPLETE
    if labels == "ignore":
        assert "its output is not this push's" in out


def test_push_wait_gives_up_on_a_session_that_never_shows_this_push(fake_kaggle, workdir,
                                                                     wheelhouse):
    assert push(workdir, wheelhouse, "--wait") == 0
    fake_kaggle.version_labels = "ignore"
    fake_kaggle.stale_reads_after_push = 10**6  # only ever the previous session
    assert push(workdir, wheelhouse, "--wait", "stage1.epochs=2") == 2
    assert len(saved(fake_kaggle, INFER)) == 1


# ----------------------------------------------------------------------------- submit --version


def test_submit_version_shows_that_versions_state_and_output(fake_kaggle, workdir, wheelhouse,
                                                             monkeypatch, capsys):
    assert push(workdir, wheelhouse, "--wait") == 0
    assert push(workdir, wheelhouse, "--kernels", "infer") == 0  # infer version 2
    fake_kaggle.add_kernel_run(INFER, [("COMPLETE", "")], {"submission.zip": b"PK"}, "", version=1)
    fake_kaggle.add_kernel_run(INFER, [("ERROR", "export failed")], {}, "", version=2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    capsys.readouterr()
    assert cli("submit", "--workdir", workdir, "--version", "1") == 0
    out = capsys.readouterr().out
    assert "version 1: COMPLETE; output submission.zip present" in out
    assert "scored" in out and "not ranked" in out  # what a late GUIE submission gets
    (sent,) = fake_kaggle.rpc_calls("CreateCodeSubmission")
    assert sent["kernelVersion"] == 1
    assert cli("submit", "--workdir", workdir, "--yes") == 2  # the latest push: version 2
    assert "is ERROR export failed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the gate


def test_push_whose_plan_cannot_fit_is_refused_before_any_request(fake_kaggle, workdir,
                                                                  wheelhouse, capsys):
    assert push(workdir, wheelhouse, HUGE_BATCH) == 2
    err = capsys.readouterr().err.strip()
    assert fake_kaggle.calls == []  # the server saw no request at all
    assert len(err.splitlines()) == 1 and err.startswith("error: preflight on NvidiaTeslaT4: ")
    assert "stage2 needs" in err and "GiB per GPU" in err and "14.56 GiB limit" in err
    assert "fix: stage2.batch_size=" in err and "--skip-preflight" in err
    assert cli("run", "--workdir", workdir, "--wheels-from", str(wheelhouse), HUGE_BATCH,
               SOURCES) == 2
    assert "error: preflight on NvidiaTeslaT4: stage2 needs" in capsys.readouterr().err
    assert fake_kaggle.calls == []
    # the one override lets it through
    assert push(workdir, wheelhouse, HUGE_BATCH, "--skip-preflight", "--kernels", "train") == 0
    assert "preflight: skipped (--skip-preflight)" in capsys.readouterr().out
    assert len(saved(fake_kaggle, TRAIN)) == 1
    # the memory plan is training's: an inference kernel alone is not judged by it
    fake_kaggle.add_kernel_run(TRAIN, [("COMPLETE", "")], {}, "")
    assert push(workdir, wheelhouse, HUGE_BATCH, "--kernels", "infer") == 0
    assert len(saved(fake_kaggle, INFER)) == 1


def test_push_the_quota_left_cannot_finish_is_refused(fake_kaggle, workdir, wheelhouse, capsys):
    fake_kaggle.set_quota(total_h=30.0, used_h=24.5, reserved_h=0.5)  # 5 h left
    assert push(workdir, wheelhouse, "--kernels", "train") == 2
    err = capsys.readouterr().err
    assert "GPU quota: 5.00 h left" in err and "11.25 h from push to end" in err
    assert [name for name, _ in fake_kaggle.calls] == ["GetAcceleratorQuotaStatistics"]
    assert push(workdir, wheelhouse, "--kernels", "train", "--max-hours", "4") == 0  # fits now
    assert len(saved(fake_kaggle, TRAIN)) == 1


def test_dry_runs_show_the_gate_without_enforcing_it(fake_kaggle, workdir, wheelhouse, capsys):
    fake_kaggle.set_quota(total_h=30.0, used_h=29.0)
    assert push(workdir, wheelhouse, "--dry-run", HUGE_BATCH) == 0
    out = capsys.readouterr().out
    assert "preflight: would refuse: stage2 needs" in out and "GPU quota: 1.00 h left" in out
    assert cli("run", "--workdir", workdir, "--dry-run", SOURCES) == 0
    out = capsys.readouterr().out
    assert "GPU quota: 1.00 h left (30.00 h allowed this week" in out
    assert "preflight: would refuse" in out
    assert {name for name, _ in fake_kaggle.calls} == {"GetAcceleratorQuotaStatistics"}


# ----------------------------------------------------------------------------- pinned inputs


def test_kernels_attach_the_dataset_versions_just_pushed(fake_kaggle, workdir, wheelhouse):
    assert push(workdir, wheelhouse, "--kernels", "train") == 0
    state = json.loads((Path(workdir) / "state.json").read_text())
    state["source"]["hash"] = "changed"  # as if the source had changed since
    (Path(workdir) / "state.json").write_text(json.dumps(state))
    assert push(workdir, wheelhouse, "--kernels", "train") == 0
    first, second = (b["datasetDataSources"] for b in saved(fake_kaggle, TRAIN))
    assert first[:2] == [f"{SRC}/1", f"{WHEELS}/1"]
    assert second[:2] == [f"{SRC}/2", f"{WHEELS}/1"]  # the new source version, exactly
    meta = json.loads((Path(workdir) / "kernels" / "guie-train-smoke"
                       / "kernel-metadata.json").read_text())
    assert meta["dataset_sources"][:2] == [f"{SRC}/2", f"{WHEELS}/1"]
