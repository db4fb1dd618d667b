"""ruff over the whole repository, with the `[tool.ruff]` settings in pyproject.toml (100 columns;
pycodestyle, pyflakes, bugbear, blind except): part of the test command, so CI runs it too
(`requirements.txt` pins ruff)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, f"ruff findings:\n{done.stdout}{done.stderr}"
