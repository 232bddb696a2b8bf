"""Progress of long host jobs (`compile --tune`, the demo): a tqdm bar on a terminal, and a plain
line per update when stderr is not one (CI logs, tests and pipes read those lines)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """`update(n, status, line)`: on a terminal the bar advances by n and shows `status` beside it;
    elsewhere `line` (if any) is printed to `plain_file` as it is. `write` prints a message
    without breaking the bar."""

    def __init__(self, total: int, desc: str, *, unit: str, initial: int = 0, plain_file=None):
        self.tty = sys.stderr.isatty()
        self.plain_file = plain_file or sys.stderr
        self.bar = tqdm(total=total, initial=min(initial, total), desc=desc, unit=unit, file=sys.stderr,
                        disable=not self.tty, dynamic_ncols=True, leave=True)

    def update(self, n: int, status: str = "", line: str | None = None) -> None:
        if self.tty:
            if status:
                self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(min(n, self.bar.total - self.bar.n))
        elif line is not None:
            print(line, file=self.plain_file, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write(msg: str, file=None) -> None:
    """print(msg) that leaves any progress bar on the terminal intact."""
    file = file or sys.stdout
    tqdm.write(msg, file=file)
    file.flush()
