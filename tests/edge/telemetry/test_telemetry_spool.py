"""The device spool (real SQLite) and the latency sketches, without a broker."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edge.telemetry import sketch
from edge.telemetry.spool import Spool


def _payload(session, seq):
    return f'{{"session":{session},"seq":{seq}}}'.encode()


def test_spool_keeps_order_acks_and_numbers_across_restart(tmp_path):
    sp = Spool(tmp_path / "s.sqlite")
    assert sp.session() == (0, 0)
    ws = [sp.append("metrics", _payload) for _ in range(5)]
    assert [(w.session, w.seq) for w in ws] == [(0, i) for i in range(5)]
    assert [w.id for w in sp.pending()] == [w.id for w in ws]
    sp.ack(ws[1].id)
    assert [w.seq for w in sp.pending()] == [0, 2, 3, 4]
    assert [w.seq for w in sp.pending(after_id=ws[2].id)] == [3, 4]
    assert sp.new_session() == 1
    assert sp.take_seq() == (1, 0)  # the birth
    sp.close()
    sp = Spool(tmp_path / "s.sqlite")  # a process restart keeps windows, session and seq
    assert sp.session() == (1, 1)
    assert [w.payload for w in sp.pending()] == [_payload(0, i) for i in (0, 2, 3, 4)]
    w = sp.append("jit", _payload)
    assert (w.session, w.seq, w.kind) == (1, 1, "jit")
    sp.close()


def test_spool_over_bound_drops_oldest_and_counts(tmp_path):
    sp = Spool(tmp_path / "s.sqlite", max_windows=3)
    for _ in range(8):
        sp.append("metrics", _payload)
    assert [w.seq for w in sp.pending()] == [5, 6, 7]  # newest survive
    assert sp.stats()["dropped_size"] == 5
    # byte bound: each payload is ~20 bytes, 50 bytes keep two
    sp2 = Spool(tmp_path / "b.sqlite", max_bytes=50)
    for _ in range(4):
        sp2.append("metrics", _payload)
    assert [w.seq for w in sp2.pending()] == [2, 3]
    assert sp2.stats()["dropped_size"] == 2
    sp.close()
    sp2.close()


def test_spool_drops_by_age(tmp_path):
    sp = Spool(tmp_path / "s.sqlite", max_age_s=3600)
    sp.append("metrics", _payload)
    sp._db.execute("UPDATE windows SET created = created - 7200")
    sp.append("metrics", _payload)
    assert [w.seq for w in sp.pending()] == [1]
    assert sp.stats()["dropped_age"] == 1
    sp.close()


def test_sketch_quantiles_within_relative_error_and_merge_exact():
    rng = np.random.default_rng(1)
    a = rng.lognormal(mean=1.0, sigma=0.5, size=3000)
    b = rng.lognormal(mean=2.0, sigma=0.3, size=1000)
    sa, sb = sketch.new(), sketch.new()
    for v in a:
        sa.add(float(v))
    for v in b:
        sb.add(float(v))
    wire_a, wire_b = sketch.decode(sketch.encode(sa)), sketch.decode(sketch.encode(sb))
    merged = sketch.merged([wire_b, wire_a])
    both = np.concatenate([a, b])
    for q, got in zip((0.5, 0.95, 0.99), sketch.quantiles(merged)):
        # DDSketch's rank convention: the element at rank q*(n-1), lower
        exact = np.sort(both)[int(q * (len(both) - 1))]
        assert abs(got - exact) <= 0.0101 * exact
    assert merged.count == 4000
    # merge order does not matter: identical bins either way
    assert sketch.encode(sketch.merged([wire_a, wire_b])) == sketch.encode(merged)
    # averaging the two p99s would be wrong; the merged one is the fleet's
    avg_p99 = (sketch.quantiles(sa)[2] + sketch.quantiles(sb)[2]) / 2
    assert abs(avg_p99 - np.quantile(both, 0.99)) > 0.05 * np.quantile(both, 0.99)


@pytest.mark.parametrize("bad", ["not base64!", "AAAA", sketch.encode(sketch.new())[:-4] + "////"])
def test_sketch_decode_rejects_garbage(bad):
    with pytest.raises(sketch.SketchError):
        sketch.decode(bad)


def test_sketch_decode_rejects_other_accuracy_and_huge_ranges():
    from ddsketch import DDSketch
    from ddsketch.pb import ddsketch_pb2 as pb
    import base64

    other = DDSketch(relative_accuracy=0.05)
    other.add(3.0)
    with pytest.raises(sketch.SketchError, match="gamma"):
        sketch.decode(sketch.encode(other))
    s = sketch.new()
    s.add(1.0)
    proto = pb.DDSketch()
    proto.ParseFromString(base64.b64decode(sketch.encode(s)))
    proto.positiveValues.contiguousBinIndexOffset = 10**9  # would make a merge allocate ~1e9 bins
    with pytest.raises(sketch.SketchError, match="range"):
        sketch.decode(base64.b64encode(proto.SerializeToString()).decode())


def test_edge_telemetry_imports_no_compiler():
    import subprocess

    code = "import edge.telemetry, sys; bad = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'deploy', 'onnxruntime')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
