#!/usr/bin/env bash
# Installs what edgejit needs on a fresh Debian/Ubuntu machine (idempotent, quick when done):
# system packages (Mosquitto broker, aarch64 cross linker, qemu-user, real text for the demo,
# tmux for the terminal chat test)
# and the Python package with its host and test extras into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
[ -d /usr/share/games/fortunes ] || need+=(fortunes-min)
command -v tmux >/dev/null || need+=(tmux)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! python3 -c "import edge, deploy, tvm, onnx, onnxruntime, torch, transformers, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .work/installed ]; then
  echo "installing edgejit and its Python dependencies"
  python3 -m pip install -q -e '.[dev]'
  mkdir -p .work && touch .work/installed
fi
