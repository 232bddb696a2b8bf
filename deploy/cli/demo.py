"""`edgejit demo`: compile, broker, coordinator, daemon, traffic and fleet report on this machine
(deploy/tools/demo.py): a chat demo on SmolLM2 by default, `--model minilm` the encoder demo."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="short run for CI: fewer users, turns and tokens (encoder: fewer, shorter requests)")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default: the chat demo), minilm (the encoder demo), or an ONNX encoder file (with --tokenizer)")
    p.add_argument("--artifact", help="chat demo: an already compiled SmolLM2 artifact (skips the compile)")
    p.add_argument("--users", type=int, help="chat demo: simulated users chatting at once (default 6; --quick 3)")
    p.add_argument("--turns", type=int, help="chat demo: messages each user sends (default 3; --quick 2)")
    p.add_argument("--max-tokens", type=int, help="chat demo: longest reply in tokens (default 80; --quick 24)")
    p.add_argument("--requests", type=int, help="encoder demo: requests to send (default 400; --quick 100)")
    p.add_argument("--max-len", type=int, help="encoder demo: longest request in tokens (default 128; --quick 32)")
    p.add_argument("--rate", type=float, help="encoder demo: requests per second at most (default 10; --quick 5)")
    p.add_argument("--tokenizer", help="encoder demo: tokenizer.json for an ONNX --model (without one, lengths come from word counts)")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed at the end)")
    p.add_argument("--report-json", metavar="FILE", help="also write the fleet report as JSON")


def main(args) -> int:
    from deploy.tools.demo import run

    return run(args)
