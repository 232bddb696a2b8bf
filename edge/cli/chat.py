"""`edgejit chat`: an interactive terminal chat. Replies stream; Ctrl-C stops a reply, /reset
starts over, Ctrl-D (or /quit) quits."""

from __future__ import annotations

import sys

from edge.errors import EdgeJitError

from edge.cli.generate import add_model_arguments, add_sampling_arguments, format_stats, open_generator, sampling_from


def add_arguments(p) -> None:
    add_model_arguments(p, jit_default=True)
    p.add_argument("--system", help="system message at the start of every conversation")
    p.add_argument("--stats", action="store_true", help="print token counts and speed after each reply")
    add_sampling_arguments(p)
    p.set_defaults(max_tokens=512)


HELP = "commands: /reset (new conversation), /quit or Ctrl-D (leave); Ctrl-C stops a reply"


def main(args) -> int:
    sampling = sampling_from(args)
    with open_generator(args) as gen:
        return _session(gen, args, sampling)


def _session(gen, args, sampling) -> int:
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"edgejit chat: {gen.model.name} (context {gen.context} tokens, weights {gen.model.artifact.manifest.decoder.weight_bytes / 2**20:.0f} MiB, "
          f"KV cache {gen.model.decoder.kv_bytes / 2**20:.0f} MiB). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("^C (Ctrl-D or /quit to leave)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/bye"):
            return 0
        if text == "/reset":
            history = []
            print("(new conversation)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in _reply(gen, system + history, sampling):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
        except KeyboardInterrupt:
            print(" [stopped]")
            if not reply:  # stopped before the first word (e.g. during a long prompt): forget the message
                history.pop()
                continue
        except EdgeJitError as e:
            print(f"\nedgejit chat: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": "".join(reply)})
        if args.stats:
            print(format_stats(gen.stats, gen), file=sys.stderr)


def _reply(gen, messages, sampling):
    """Generate, dropping the oldest turns when the conversation outgrows the context."""
    msgs = list(messages)
    while True:
        try:
            return gen.chat(msgs, **sampling)
        except EdgeJitError as e:
            turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
            if "context" not in str(e) or len(turns) < 3:
                raise
            del msgs[turns[0]:turns[2]]  # the oldest user + assistant turn
