"""A device process for telemetry tests: a Publisher fed by a loop of small real numpy "inference"
calls, reporting through the runtime listener interface.

    python tests/telemetry_device.py CONFIG.json STATUS.json

Writes STATUS.json (atomically) every 50 ms with the publisher status and the number of requests
made. SIGTERM -> clean shutdown (explicit death); SIGKILL -> the broker delivers the Will.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np

# Run as a script, this file's folder (tests/) would come first on sys.path, and tests/edge/ would
# shadow the edge package as a namespace package: put the repository first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edge.telemetry import Publisher  # noqa: E402


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    status_path = sys.argv[2]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pub = Publisher(config)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 64)).astype(np.float32)
    requests = 0
    last_status = 0.0
    while not stop.is_set():
        seq_len = (8, 16, 32)[requests % 3]
        x = rng.standard_normal((seq_len, 64)).astype(np.float32)
        t = time.perf_counter()
        np.tanh(x @ weights)
        pub.on_request("tiny", seq_len, "generic", time.perf_counter() - t)
        requests += 1
        if time.monotonic() - last_status > 0.05:
            tmp = status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"requests": requests, "pid": os.getpid(), **pub.status()}, f)
            os.replace(tmp, status_path)
            last_status = time.monotonic()
        time.sleep(0.002)
    pub.close()
    with open(status_path + ".tmp", "w") as f:
        json.dump({"requests": requests, "closed": True}, f)
    os.replace(status_path + ".tmp", status_path)


if __name__ == "__main__":
    main()
