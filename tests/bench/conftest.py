"""The benchmark suite is the repository's top-level `bench` package, never installed: make it
importable from the repository root also under a bare `pytest`, whose sys.path lacks the
working directory (`python -m pytest` has it)."""
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)
