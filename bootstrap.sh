#!/usr/bin/env bash
# Idempotent set-up: the project venv (.venv, Python 3.11) and the TPU-MLIR toolchain
# environment (Python 3.10, outside the repo, reused across clones). Fast when done.
#   BLIPC_TPU_MLIR=<dir>   use your own TPU-MLIR (a venv or install prefix with bin/model_deploy.py)
#   BLIPC_TOOLCHAIN_DIR=<dir>  where the toolchain environment lives (default ~/.cache/blipc)
#   --no-tpu-mlir          skip the toolchain (SOPHGO targets are then reported as skipped)
set -euo pipefail
cd "$(dirname "$0")"

TPU_MLIR_VERSION=1.30.2
want_tpu=1
for arg in "$@"; do
  case "$arg" in
    --no-tpu-mlir) want_tpu=0 ;;
    *) echo "bootstrap.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

find_python() {  # $1 = major.minor
  local v=$1 p
  for p in "python$v" "$HOME/.pyenv/versions/$v"*/bin/python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$v'.split('.'))))" 2>/dev/null; then
      command -v "$p"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    p=$(pyenv root)/versions/$(pyenv versions --bare | grep -E "^$v(\.|$)" | tail -n1)/bin/python
    [ -x "$p" ] && { echo "$p"; return 0; }
  fi
  return 1
}

stamp_of() { sha256sum | cut -c1-16; }

# pip, minus this machine's "Location ... is ignored" noise; keeps pip's exit status.
pip_run() {
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

# What each environment is made of. The stamps hash these recipes (not this whole script), so
# editing a comment here does not reinstall several GB; changing a pin or a fix does.
TORCH_PIN="torch==2.13.0"
TPU_PACKAGES="tpu_mlir[onnx]==$TPU_MLIR_VERSION psutil torch"
TPU_SETUPTOOLS="setuptools<70"
TPU_DROP_LIBS="libc.so.6 libm.so.6 libpthread.so.0"

# --- project environment -------------------------------------------------------------
main_stamp=$( { echo "$TORCH_PIN"; cat pyproject.toml; } | stamp_of)
if [ "$(cat .venv/.bootstrap-stamp 2>/dev/null)" != "$main_stamp" ]; then
  py=$(find_python 3.11) || { echo "bootstrap: Python 3.11 not found (install it, e.g. 'pyenv install 3.11')" >&2; exit 1; }
  echo "bootstrap: creating .venv with $py"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  # torch first and pinned: 2.13.0 is the CPU build; letting a resolver pick would fetch CUDA.
  pip_run .venv/bin/pip install -q "$TORCH_PIN"
  pip_run .venv/bin/pip install -q -e '.[test]'
  echo "$main_stamp" > .venv/.bootstrap-stamp
fi
# Byte-compile the project's own modules (pip does this for installed packages): with
# PYTHONDONTWRITEBYTECODE set, every `doit` would otherwise recompile them (~30 ms per no-op run).
.venv/bin/python -m compileall -q buildplan export compile dodo.py >/dev/null

# --- TPU-MLIR toolchain environment -------------------------------------------------
if [ "$want_tpu" = 1 ] && [ -z "${BLIPC_TPU_MLIR:-}" ]; then
  cache=${BLIPC_TOOLCHAIN_DIR:-${BLIPC_CACHE:-$HOME/.cache/blipc}}
  env_dir=$cache/tpu-mlir-$TPU_MLIR_VERSION
  tpu_stamp=$(echo "$TPU_PACKAGES; $TPU_SETUPTOOLS; drop $TPU_DROP_LIBS" | stamp_of)
  if [ "$(cat "$env_dir/.bootstrap-stamp" 2>/dev/null)" != "$tpu_stamp" ]; then
    py310=$(find_python 3.10) || { echo "bootstrap: Python 3.10 not found; TPU-MLIR $TPU_MLIR_VERSION needs it ('pyenv install 3.10')" >&2; exit 1; }
    echo "bootstrap: installing TPU-MLIR $TPU_MLIR_VERSION into $env_dir (several GB, a few minutes, once)"
    # No stamp means absent or interrupted: start clean. The stamp is written last.
    rm -rf "$env_dir"
    mkdir -p "$cache"
    "$py310" -m venv "$env_dir"
    # tpu_mlir imports psutil, torch and pkg_resources (gone from setuptools >= 81) at top level.
    # shellcheck disable=SC2086  # word splitting intended: a package list
    pip_run "$env_dir/bin/pip" install -q $TPU_PACKAGES
    # pip warns that some package wants a newer setuptools; tpu_mlir needs pkg_resources.
    pip_run "$env_dir/bin/pip" install -q "$TPU_SETUPTOOLS" | { grep -v "dependency conflicts\|requires setuptools\|dependency resolver" || true; }
    # Its bundled glibc pieces break every tool on newer glibc hosts ("GLIBC_2.36 not found").
    site=$("$env_dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    for lib in $TPU_DROP_LIBS; do rm -f "$site/tpu_mlir/lib/third_party/$lib"; done
    echo "$tpu_stamp" > "$env_dir/.bootstrap-stamp"
  fi
fi
