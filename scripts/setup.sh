#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the main job on the bundled example
# model (compile it for this machine and for aarch64, run it, then the whole-system demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

mkdir -p .work/example
echo "== bundled example model (MiniLM-L6, real weights)"
edgejit example -o .work/example
echo "== compile for this machine and for a Raspberry Pi 5 (aarch64)"
edgejit compile .work/example/minilm-l6.onnx --target host -o .work/example/minilm-host --force
edgejit compile .work/example/minilm-l6.onnx --target rpi5 -o .work/example/minilm-rpi5 --force
echo "== run on this machine"
edgejit run .work/example/minilm-host --input 'input_ids=[[101,7592,2088,102]]'
echo "== the whole system: broker, coordinator, daemon with JIT, a stream of real-text requests"
edgejit demo
