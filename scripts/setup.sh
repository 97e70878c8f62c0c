#!/usr/bin/env bash
# Installs what fedbot needs on a fresh Debian machine: system packages, uv, the locked venv.
# Idempotent; `make` runs it whenever pyproject.toml or uv.lock changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd: systemd-analyze, which tests/test_systemd_units.py runs on deploy/systemd/*.service
APT_PACKAGES=(libsystemd-dev pkg-config ffmpeg systemd)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv"
  python3 -m pip install --quiet uv || python3 -m pip install --quiet --break-system-packages uv
fi

# Python 3.12: on PATH, or from pyenv's versions (whose shim may not be active).
find_python() {
  local candidate
  for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}
PYTHON=$(find_python) || { echo "setup: Python 3.12 not found (install python3.12)" >&2; exit 1; }

export UV_PYTHON_DOWNLOADS=never
# Compiled bytecode now, once: where PYTHONDONTWRITEBYTECODE is set (as on this CI machine) every
# process would otherwise compile torch and lerobot from source again (an import of the ClientApp:
# 19.8 s without, 6.2 s with; BENCHMARKS.md).
uv sync --frozen --extra dev --compile-bytecode --python "$PYTHON"
