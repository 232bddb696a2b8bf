"""`edgejit demo`: compile, broker, coordinator, daemon, traffic and fleet report on this machine
(deploy/tools/demo.py)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="short run for CI: fewer, shorter requests (about a minute)")
    p.add_argument("--requests", type=int, help="requests to send (default 400; --quick 100)")
    p.add_argument("--max-len", type=int, help="longest request in tokens (default 128; --quick 32)")
    p.add_argument("--rate", type=float, help="requests per second at most (default 10; --quick 5)")
    p.add_argument("--model", help="ONNX model to use instead of the bundled example (with --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json for --model (without one, lengths come from word counts)")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed at the end)")
    p.add_argument("--report-json", metavar="FILE", help="also write the fleet report as JSON")


def main(args) -> int:
    from deploy.tools.demo import run

    return run(args)
