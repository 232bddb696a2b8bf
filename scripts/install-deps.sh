#!/usr/bin/env bash
# Installs what edgejit needs on a fresh Debian/Ubuntu machine (idempotent, quick when done):
# system packages (Mosquitto broker, aarch64 cross linker, qemu-user, real text for the demo,
# tmux for the terminal chat test)
# and the Python package with its host and test extras into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."

# A line per step, and a line per package while apt and pip work (minutes on a fresh machine).
start=$SECONDS
say() { printf '== [%4ds] %s\n' "$((SECONDS - start))" "$*"; }
# keep the lines of a tool's output that name a package (`|| true`: none is not a failure; the
# tool's own status still fails the pipeline); its errors go to stderr, unfiltered
packages() { { grep --line-buffered -E "$1" || true; } | sed -u 's/^/     /'; }

need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
[ -d /usr/share/games/fortunes ] || need+=(fortunes-min)
command -v tmux >/dev/null || need+=(tmux)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "system packages: ${need[*]} (apt-get)"
  say "apt-get update: reading the package lists"
  $SUDO apt-get update -qq
  say "apt-get install: downloading, unpacking and setting up each package"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -o Dpkg::Use-Pty=0 "${need[@]}" \
    | packages '^(Get:[0-9]+ |Unpacking |Setting up )'
else
  say "system packages: already installed (mosquitto, aarch64 cross linker, qemu-user, fortunes, tmux)"
fi

if ! python3 -c "import edge, deploy, tvm, onnx, onnxruntime, torch, transformers, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .work/installed ]; then
  say "Python packages: edgejit with its host and test extras (pip; TVM, onnxruntime, torch, transformers: several minutes on a fresh machine)"
  PYTHONUNBUFFERED=1 python3 -m pip install --progress-bar off -e '.[dev]' \
    | packages '^(Collecting |Installing collected packages|Successfully installed)'
  mkdir -p .work && touch .work/installed
else
  say "Python packages: already installed"
fi
say "dependencies ready"
