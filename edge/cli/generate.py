"""`edgejit generate`: one prompt in, the reply streamed to stdout, timings to stderr."""

from __future__ import annotations

import argparse
import sys

from edge.errors import EdgeJitError


def add_sampling_arguments(p) -> None:
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this much probability")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this fraction of the most likely one")
    s.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for tokens already in the text (1 = off)")
    s.add_argument("--seed", type=int, help="random seed: the same seed gives the same reply")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when the reply contains TEXT (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-reply token")


def sampling_from(args) -> dict:
    """The sampling options, checked (one-line error for a bad value)."""
    from edge.generate import SamplingParams

    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed, stop=tuple(args.stop),
                ignore_eos=args.ignore_eos)
    SamplingParams(**params).check()
    return params


def add_model_arguments(p, *, jit_default: bool) -> None:
    p.add_argument("artifact", help="decoder artifact directory (edgejit compile MODEL.gguf ...)")
    p.add_argument("--context", type=int, help="context length in tokens (default: the artifact's, at most 4096)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=jit_default,
                   help="specialize decode steps in the background and reuse cached variants (docs/jit.md; "
                        f"default: {'on' if jit_default else 'off'})")
    p.add_argument("--jit-policy", metavar="FILE", help="JIT policy file (default: jit-policy.toml, see docs/jit.md)")


def open_generator(args):
    from edge.runtime.tvm_library import load_tvm, needs_compiler

    jit = None
    if args.jit:
        from edge.jit.policy import JitPolicy

        jit = JitPolicy.load(args.jit_policy)
    load_tvm(compiler=needs_compiler(jit))
    from edge.generate import Generator

    return Generator(args.artifact, context=args.context, threads=args.threads, jit=jit)


def add_arguments(p) -> None:
    add_model_arguments(p, jit_default=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a user message, sent through the model's chat template")
    src.add_argument("--raw-prompt", help="text given to the model as it is (no chat template)")
    p.add_argument("--system", help="system message (with --prompt)")
    add_sampling_arguments(p)


def main(args) -> int:
    from edge.generate.generator import check_text

    sampling = sampling_from(args)  # bad options fail before the model loads
    text = args.prompt if args.prompt is not None else args.raw_prompt
    check_text(text, "prompt")
    if not text:
        raise EdgeJitError("empty prompt")
    with open_generator(args) as gen:
        _generate(gen, args, sampling)
    return 0


def _generate(gen, args, sampling) -> None:
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        pieces = gen.chat(messages, **sampling)
    else:
        pieces = gen.complete(args.raw_prompt, **sampling)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(format_stats(gen.stats, gen), file=sys.stderr)


def format_stats(st, gen) -> str:
    from edge.runtime.memory import peak_rss_bytes

    return (f"prompt {st.prompt_tokens} tokens, generated {st.completion_tokens} tokens ({st.finish_reason}); "
            f"time to first token {st.ttft_s * 1000:.0f} ms; prompt {st.prefill_tok_s:.1f} tok/s; decode {st.decode_tok_s:.1f} tok/s; "
            f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB (weights {gen.model.artifact.manifest.decoder.weight_bytes / 2**20:.0f} MiB, "
            f"KV cache {gen.model.decoder.kv_bytes / 2**20:.0f} MiB)")
