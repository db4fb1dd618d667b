#!/usr/bin/env bash
# Create the PyTorch 1.11 interpreter the compat-export test loads submissions with.
#
# The competition's host promised PyTorch 1.11; the only honest check that an export loads there
# is to load it there. Torch 1.11 has no wheel for Python > 3.10, so the venv is built from a
# Python 3.10 (pyenv's, by default). PyPI only carries the CUDA 10.2 build of 1.11.0 (~750 MB
# wheel, ~1.9 GB installed); it runs on CPU without a GPU. numpy<2: 1.11 was built against the
# numpy 1.x ABI.
#
# Idempotent: does nothing when the venv already imports torch 1.11.0.
# Environment: GUIE_TORCH111_VENV (default <repo>/.venv-torch111),
#              GUIE_PYTHON310 (default: pyenv's 3.10, else python3.10 on PATH).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${GUIE_TORCH111_VENV:-$repo_root/.venv-torch111}

check() {
    "$venv/bin/python" -c \
        'import numpy, torch; assert torch.__version__.split("+")[0] == "1.11.0", torch.__version__; torch.zeros(1).numpy()' \
        >/dev/null 2>&1
}

ignore_venv() {
    # Keep the 1.7 GB venv out of git even where .gitignore does not name it (venv does this
    # itself only from Python 3.13).
    printf '# created by scripts/setup_torch111.sh\n*\n' > "$venv/.gitignore"
}

if [[ -x "$venv/bin/python" ]] && check; then
    ignore_venv
    echo "setup_torch111: $venv already has torch 1.11.0"
    exit 0
fi

find_python310() {
    if [[ -n "${GUIE_PYTHON310:-}" ]]; then
        echo "$GUIE_PYTHON310"
        return
    fi
    local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
    local candidate
    for candidate in "$pyenv_root"/versions/3.10.*/bin/python; do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
    done
    command -v python3.10 || true
}

python310=$(find_python310)
if [[ -z "$python310" ]] || ! "$python310" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
    echo "setup_torch111: no Python 3.10 found (set GUIE_PYTHON310); torch 1.11 needs one" >&2
    exit 1
fi

echo "setup_torch111: building $venv from $python310"
rm -rf "$venv"
"$python310" -m venv "$venv"
ignore_venv
# The registries' index carries only the CUDA 10.2 build of 1.11.0; it imports and runs on CPU.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==1.11.0" "numpy<2" "typing_extensions"

if ! check; then
    echo "setup_torch111: $venv was built but does not import torch 1.11.0 with numpy" >&2
    exit 1
fi
echo "setup_torch111: ready: $("$venv/bin/python" -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)')"
