"""The client's side of `submit.py probe`: what to push, and turning what came back into
`<workdir>/platform.json`.

The probe pushes its kernel twice: first a CPU session (no GPU quota spent) whose only purpose
is to be an older version, then the real probe on the chosen machine shape. Once both have ended,
the older version's record is read back by label in each format Kaggle might take (`v<N>`, what
kaggle-cli PR 1201 sends, then `N`): the format whose answer carries the older push's nonce is the
one Kaggle honours, and the kit uses it from then on. Neither: labels are not honoured, and the
nonce guard (`guie.kaggle.sessions`) is what tells sessions apart. The record also keeps what
the client saw at push time: the account's GPU quota and the competition's deadline (GUIE's
has passed: late submissions are scored, not ranked), daily cap and today's limits.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from guie.kaggle.inputs import SOURCE_MARKER
from guie.kaggle.platform import PLATFORM_RECORD
from guie.kaggle.probe import PROBE_OUTPUT
from guie.kaggle.results import KaggleError

LABEL_FORMATS = ("v{}", "{}")


def account_facts(client) -> dict:
    """The quota and competition facts the probe records (each None where Kaggle gives none)."""
    quota = client.quota()
    facts: dict = {"quota": None if quota is None else {
        **{k: v for k, v in asdict(quota).items() if k != "refresh_at"},
        "refresh_at": quota.refresh_at.isoformat() if quota.refresh_at else None,
        "remaining_h": quota.remaining_h}}
    try:
        facts["competition"] = client.competition_facts()
    except KaggleError as e:  # e.g. the rules not accepted: recorded, not fatal
        facts["competition"] = {"error": str(e)}
    return facts


def settle_version_label(client, ref: str, older: dict) -> dict:
    """Which label format reads the older probe version back (its nonce in its record)."""
    tried = {}
    client.label_fallback = False
    for fmt in LABEL_FORMATS:
        client.label_format = fmt
        with tempfile.TemporaryDirectory() as folder:
            try:
                client.download_kernel_output(ref, Path(folder), only=[PROBE_OUTPUT],
                                              version=older["version"])
                record = json.loads((Path(folder) / PROBE_OUTPUT).read_text())
                tried[fmt] = record.get("push_nonce") == older["nonce"]
            except (KaggleError, OSError, ValueError) as e:
                tried[fmt] = f"{type(e).__name__}: {e}"
        if tried[fmt] is True:
            break
    client.label_fallback = True
    honoured = next((fmt for fmt, ok in tried.items() if ok is True), None)
    client.label_format = honoured or "v{}"
    return {"format": honoured, "tried": tried, "version": older["version"],
            "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def pinned_source(state: dict) -> dict | None:
    """{"ref", "version"}: the source dataset's version before the current one, for the CPU
    probe to attach pinned (None when there is only one version: push twice first)."""
    source = state.get("source") or {}
    if not source.get("ref") or int(source.get("version") or 0) < 2:
        return None
    return {"ref": source["ref"], "version": int(source["version"]) - 1}


def check_pinned_input(client, ref: str, older: dict) -> dict:
    """Did Kaggle mount the pinned (older) source version the CPU probe attached? Its record
    lists the kit's markers it found; the older version's own marker says which hash to expect."""
    pinned = older["pinned"]
    with tempfile.TemporaryDirectory() as folder:
        client.download_kernel_output(ref, Path(folder), only=[PROBE_OUTPUT],
                                      version=older["version"])
        record = json.loads((Path(folder) / PROBE_OUTPUT).read_text())
        expected_dir = Path(folder) / "expected"
        expected_dir.mkdir()
        marker, _ = client.download_dataset_file(pinned["ref"], pinned["version"], SOURCE_MARKER,
                                                 expected_dir)
        expected = json.loads(Path(marker).read_text()).get("hash")
    seen = [m for m in record.get("input_markers", []) if m["path"].endswith(SOURCE_MARKER)]
    hashes = [(m.get("content") or {}).get("hash") for m in seen]
    return {"attached": f"{pinned['ref']}/{pinned['version']}", "expected_hash": expected,
            "mounted": seen, "honoured": bool(hashes) and all(h == expected for h in hashes)}


def write_platform_record(record_file: Path, workdir: Path, probe: dict,
                          label: dict | None, pinned: dict | None = None) -> Path:
    """<workdir>/platform.json: the kernel's record, the machine shape it ran on, the account
    facts from push time and the version-label finding."""
    record = json.loads(Path(record_file).read_text())
    record.update(machine_shape=probe.get("machine_shape"), **probe.get("account", {}))
    if label is not None:
        record["version_label"] = label
    if pinned is not None:
        record["pinned_inputs"] = pinned
    target = Path(workdir) / PLATFORM_RECORD
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    shutil.move(tmp, target)
    return target
