"""`edgejit chat` in a real terminal (tmux), driven the way a new user drives it: wait for the
prompt, type a question, read the streamed reply, ask a follow-up that needs the history, stop a
long reply with Ctrl-C (during decode and during a long prompt's prefill), /reset, leave with
Ctrl-D; Ctrl-C while the model loads. SmolLM2-135M-Instruct, greedy (the default)."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (scripts/install-deps.sh installs it)"),
]

ROOT = Path(__file__).resolve().parents[3]
WAIT = 120  # seconds: the longest any step may take (a reply, a prefill, loading the model)
_sessions = itertools.count()
STATS = re.compile(r"prompt (\d+) tokens, generated (\d+) tokens \((\w*)\)")  # chat --stats, after each reply


class Terminal:
    """One `edgejit chat` in a detached 200x50 tmux session on a private tmux server (-L), so
    nothing here touches the user's tmux. A shell runs it and writes `EXIT=<status>` when it ends
    (the shell reaps the chat: tmux's own pane_dead_status was seen to stay empty under load, the
    chat left a zombie); its `trap : INT` lets Ctrl-C reach the chat without ending the shell,
    and `remain-on-exit` keeps the screen."""

    def __init__(self, artifact, *args: str, tmp_path: Path):
        self.socket = f"edgejit-test-{os.getpid()}-{next(_sessions)}"
        env = {
            "EDGEJIT_CACHE_DIR": tmp_path / "jit-cache",  # the JIT (on by default in chat) writes here
            "EDGEJIT_STATE_DIR": tmp_path / "state",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "TERM": "xterm-256color",
        }
        cmd = ("trap : INT; " + shlex.join([sys.executable, "-m", "edge.cli", "chat", str(artifact), *args])
               + '; echo "EXIT=$?"')
        self.tmux("new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", "-c", str(ROOT),
                  *itertools.chain.from_iterable(("-e", f"{k}={v}") for k, v in env.items()), cmd,
                  ";", "set-option", "-t", "chat", "remain-on-exit", "on",
                  ";", "set-option", "-t", "chat", "history-limit", "10000")

    def tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-f", "/dev/null", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args[:2])}: {r.stderr.strip()}")
        return r.stdout

    def close(self) -> None:
        subprocess.run(["tmux", "-f", "/dev/null", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)
        (Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}" / self.socket).unlink(missing_ok=True)

    # what is on the screen ------------------------------------------------------------------
    def lines(self) -> list[str]:
        """The whole pane (scrollback too), wrapped lines joined, trailing blanks dropped."""
        out = [l.rstrip() for l in self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat").splitlines()]
        while out and not out[-1]:
            out.pop()
        return out

    def screen(self) -> str:
        return "\n".join(self.lines())

    def prompts(self) -> int:
        return sum(1 for l in self.lines() if l == ">>>" or l.startswith(">>> "))

    def idle(self) -> bool:
        """The last line is an empty prompt: the chat waits for input."""
        lines = self.lines()
        return bool(lines) and lines[-1] == ">>>"

    def exit_status(self) -> int | None:
        found = [int(m.group(1)) for l in self.lines() if (m := re.fullmatch(r"EXIT=(\d+)", l))]
        return found[-1] if found else None

    def alive(self) -> bool:
        """The chat process runs (not gone, not a zombie) and has not ended."""
        try:
            state = Path(f"/proc/{self.pid()}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, RuntimeError):
            return False
        return state != "Z" and self.exit_status() is None

    def process(self) -> str:
        """The chat process's state and its threads' (for a timeout's message)."""
        try:
            pid = self.pid()
        except RuntimeError as e:
            return str(e)
        try:
            status = dict(l.split(":\t", 1) for l in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in l)
            threads = sorted(f"{(t / 'comm').read_text().strip()}@{(t / 'wchan').read_text().strip()}"
                             for t in Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return f"process {pid} is gone"
        ppid = status.get("PPid", "?").strip()
        try:
            pst = dict(l.split(":\t", 1) for l in Path(f"/proc/{ppid}/status").read_text().splitlines() if ":\t" in l)
            parent = {k: pst.get(k, "").strip() for k in ("Name", "State", "SigBlk", "SigIgn", "SigCgt")}
        except OSError:
            parent = {}
        return f"process {pid}: {status.get('State', '?').strip()}, threads {threads}, parent {ppid} {parent}"

    def pid(self) -> int:
        """The chat's process id (the child of the pane's shell)."""
        if getattr(self, "_pid", None) is None:
            shell = int(self.tmux("display-message", "-p", "-t", "chat", "#{pane_pid}").strip())
            children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
            if not children:
                raise RuntimeError("the chat has not started yet")
            self._pid = int(children[0])
        return self._pid

    def wait(self, condition, what: str, timeout: float = WAIT) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; {self.process()}; the screen:\n{self.screen()}")
            time.sleep(0.2)

    # typing ---------------------------------------------------------------------------------
    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "chat", "-l", text)
        self.tmux("send-keys", "-t", "chat", "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", "chat", key)

    def start(self) -> None:
        self.wait(self.idle, "the first '>>> ' prompt")

    def ask(self, text: str) -> str:
        """Type a message and wait for the reply to end (a new empty prompt after it); the reply."""
        n = self.prompts()
        self.type(text)
        self.wait(lambda: self.prompts() == n + 1 and self.idle(), f"the reply to {text!r}")
        return self.reply_to(text)

    def reply_to(self, text: str) -> str:
        """The lines between the last '>>> text' and the next prompt (--stats lines left out)."""
        lines = self.lines()
        start = max(i for i, l in enumerate(lines) if l == f">>> {text}")
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(">>>"))
        return "\n".join(l for l in lines[start + 1:end] if not STATS.match(l)).strip()

    def stats(self) -> list[str]:
        return [l for l in self.lines() if STATS.match(l)]

    def exits(self) -> int | str:
        """Wait for the chat to end: its exit status (or 'signal N')."""
        self.wait(lambda: self.exit_status() is not None, "the chat to exit")
        return self.exit_status()


@pytest.fixture
def terminal(smollm2_artifact, tmp_path):
    made = []

    def start(*args: str) -> Terminal:
        t = Terminal(smollm2_artifact, *args, tmp_path=tmp_path)
        made.append(t)
        return t

    try:
        yield start
    finally:
        for t in made:
            t.close()


def test_chat_answers_follows_up_resets_and_quits(terminal):
    t = terminal("--max-tokens", "24")
    t.start()
    assert "edgejit chat: SmolLM2-135M-Instruct" in t.screen() and "Ctrl-C stops a reply" in t.screen()
    assert t.ask("What is the capital of France?") == "The capital of France is Paris."  # greedy SmolLM2
    assert t.ask("And of Italy?") == "The capital of Italy is Rome."  # needs the first turn
    t.type("/reset")
    t.wait(lambda: "(new conversation)" in t.screen() and t.idle(), "(new conversation)")
    without_history = t.ask("And of Italy?")
    assert without_history and "Rome" not in without_history  # the conversation is really gone
    assert t.alive()
    t.key("C-d")
    assert t.exits() == 0, t.screen()
    assert "Traceback" not in t.screen()


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(terminal):
    t = terminal("--max-tokens", "400", "--stats")
    t.start()
    story = "Write a long story about a dragon."
    n = t.prompts()
    t.type(story)
    # a few words of the story are on the screen, then Ctrl-C
    t.wait(lambda: len(re.findall(r"\w+", _after(t.lines(), f">>> {story}"))) >= 5, "the story to start")
    t.key("C-c")
    t.wait(lambda: t.prompts() == n + 1 and t.idle(), "a new prompt after Ctrl-C")
    stopped = t.reply_to(story)
    assert stopped.endswith("^C [stopped]") and len(stopped) > len("^C [stopped]") + 10, stopped
    assert STATS.match(t.stats()[-1]).group(3) == "cancelled", t.stats()
    assert t.alive(), "Ctrl-C during a reply ended the chat"

    # Ctrl-C at an idle prompt says how to leave and keeps going
    t.key("C-c")
    t.wait(lambda: "(Ctrl-D or /quit to leave)" in t.screen() and t.idle(), "the Ctrl-C hint")
    assert t.alive()

    # Ctrl-C during a long prompt's prefill (~850 tokens: seconds on a small CPU): stopped, and
    # the message that got no reply is forgotten (the next prompt is short)
    long = "Summarize this: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 90)
    n = t.prompts()
    t.type(long)
    time.sleep(1.0)
    t.key("C-c")
    t.wait(lambda: t.prompts() == n + 1 and t.idle(), "a new prompt after Ctrl-C in the prefill")
    assert t.reply_to(long).endswith("[stopped]")

    answer = t.ask("What is the capital of France?")
    assert "Paris" in answer, answer
    last = t.stats()[-1]
    assert STATS.match(last).group(3) == "stop" and int(STATS.match(last).group(1)) < 400, \
        f"the stopped long message is still in the conversation: {last}"

    t.type("/reset")
    t.wait(lambda: "(new conversation)" in t.screen() and t.idle(), "(new conversation)")
    t.key("C-d")
    assert t.exits() == 0, t.screen()
    assert "Traceback" not in t.screen()


def test_ctrl_c_while_the_model_loads(terminal):
    """Interrupted while loading (TVM imported, weights being read): one line, exit status 130."""
    t = terminal("--max-tokens", "24")
    t.wait(lambda: _started(t), "the chat to start", timeout=30)
    pid = t.pid()

    def loading():
        try:
            return "libtvm" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return True  # gone already: let exits() report it

    t.wait(loading, "TVM to be loaded")
    t.key("C-c")
    status = t.exits()
    screen = t.screen()
    if ">>>" in screen:
        pytest.skip("the model loaded before Ctrl-C arrived (a very fast machine)")
    assert status == 130, screen
    assert "edgejit chat: interrupted" in screen and "Traceback" not in screen, screen


def _started(t: Terminal) -> bool:
    try:
        t.pid()
        return True
    except RuntimeError:
        return False


def _after(lines: list[str], marker: str) -> str:
    idx = [i for i, l in enumerate(lines) if l == marker]
    return "\n".join(lines[idx[-1] + 1:]) if idx else ""
