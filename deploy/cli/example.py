"""`edgejit example`: write a bundled example model: all-MiniLM-L6-v2 (encoder), SmolLM2-135M-Instruct (chat), or a
GPT-2-style decoder with past key values (ONNX, optimum's layout)."""

from __future__ import annotations

from pathlib import Path

from deploy.tools import examples


def add_arguments(p) -> None:
    p.add_argument("-o", "--output", required=True, help="directory to write the model into")
    p.add_argument("--model", choices=["minilm", "smollm2", "gpt2"], default="minilm",
                   help="minilm: all-MiniLM-L6-v2 with its real weights -> minilm-l6.onnx + tokenizer.json (default); "
                        "smollm2: SmolLM2-135M-Instruct chat model -> SmolLM2-135M-Instruct.Q4_1.gguf; "
                        "gpt2: GPT-2-style decoder with past key values, 6 layers x 384, random seeded weights, SmolLM2's "
                        "tokenizer -> gpt2-l6/ (model.onnx, config.json, tokenizer.json: compile it, then generate --raw-prompt)")
    p.add_argument("--random-weights", action="store_true", help="minilm: skip the download, use random weights")
    p.add_argument("--force", action="store_true", help="rebuild a model that is already there")


def main(args) -> int:
    out = Path(args.output)
    if args.model == "minilm":
        examples.write_minilm(out, random_weights=args.random_weights, force=args.force)
    elif args.model == "smollm2":
        examples.write_smollm2(out, force=args.force)
    else:
        examples.write_gpt2_decoder(out, force=args.force)
    return 0
