"""The fake Kaggle's kernels, run for real: each pushed notebook executed with papermill.

`NotebookRunner` is the fake server's `kernel_runner`: on SaveKernel it mounts the version's
attached datasets (the files the server received, byte for byte; `owner/slug/N` mounts version
N) and attached notebooks' outputs (the working folders of their latest runs) under an input
root in today's layout, and runs the notebook in a thread: that version's session QUEUED, then
RUNNING, then COMPLETE with the working folder's files as its output, or ERROR with the failing
cell's message, a log, and what the working folder held (Kaggle keeps a failed session's output
too: unconfirmed, and either way the kit reads it only for the push nonce).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from guie.kaggle.emulate import mount_notebook_output, mount_uploaded
from guie.kaggle.notebooks import injected_parameters


# papermill as Kaggle runs a notebook, its parameters from JSON (papermill's own -f reads YAML,
# which takes 1e-06 for a string).
PAPERMILL = """
import json, sys
import papermill
notebook, executed, cwd, parameters = sys.argv[1:]
papermill.execute_notebook(notebook, executed, parameters=json.load(open(parameters)),
                           kernel_name="python3", cwd=cwd, progress_bar=False)
"""


class NotebookRunner:
    def __init__(self, fake, root: Path, python: str = sys.executable, layout: str = "current"):
        self.fake, self.root, self.python, self.layout = fake, Path(root), python, layout
        self.working: dict[str, Path] = {}  # kernel ref -> working folder of its latest run
        self.threads: list[threading.Thread] = []

    def __call__(self, kernel, raw: dict) -> None:
        version = len(kernel.versions)
        thread = threading.Thread(target=self._run, args=(kernel, raw, version), daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout_s: float = 600) -> None:
        for thread in self.threads:
            thread.join(timeout_s)

    def _run(self, kernel, raw: dict, version: int) -> None:
        session = kernel.sessions[version - 1]  # this push's, whatever is pushed meanwhile
        base = self.root / kernel.ref.replace("/", "__") / f"v{version}"
        inputs, working = base / "input", base / "working"
        working.mkdir(parents=True)
        for source in raw.get("datasetDataSources") or []:
            owner, slug, *pinned = source.split("/")
            dataset = self.fake.datasets.get(f"{owner}/{slug}")
            if dataset is not None and dataset.versions:
                files = dataset.versions[int(pinned[0]) - 1 if pinned else -1]
                mount_uploaded(files, f"{owner}/{slug}", inputs, self.layout, "unpacked")
        for ref in raw.get("kernelDataSources") or []:
            if ref in self.working:
                mount_notebook_output(self.working[ref], ref, inputs, self.layout)
        notebook = base / "kernel.ipynb"
        notebook.write_text(raw["text"])
        parameters = {**injected_parameters(notebook), "input_root": str(inputs),
                      "out_dir": str(working)}
        (base / "parameters.json").write_text(json.dumps(parameters))
        session.statuses = [("RUNNING", "")]
        env = {**os.environ, "GUIE_NPROC": "1"}
        env.pop("HTTP_PROXY", None), env.pop("http_proxy", None)
        done = subprocess.run([self.python, "-c", PAPERMILL, str(notebook),
                               str(base / "executed.ipynb"), str(base),
                               str(base / "parameters.json")],
                              capture_output=True, text=True, env=env, timeout=1500)
        log = [{"stream_name": "stdout", "time": 1.0, "data": done.stdout},
               {"stream_name": "stderr", "time": 2.0, "data": done.stderr}]
        session.log = json.dumps(log)
        self.working[kernel.ref] = working
        session.outputs = {path.relative_to(working).as_posix(): path.read_bytes()
                           for path in sorted(working.rglob("*")) if path.is_file()}
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            session.statuses = [("ERROR", lines[-1] if lines else "Notebook failed")]
            return
        session.statuses = [("COMPLETE", "")]
