"""Mergeable latency sketches: DDSketch (relative error 1%) in its standard protobuf form.

Sketches are merged by adding bins, so merging is exact, commutative and associative: the fleet's
p99 is computed from the merged sketch, never by averaging per-device percentiles. Values are
milliseconds. On the wire a sketch is base64 of the DDSketch protobuf (sketches-proto, readable by
the Go/Java/Python DDSketch libraries), positive values only, bins dense (trimmed) or sparse,
whichever is smaller.
"""

from __future__ import annotations

import base64
import binascii
import math

from ddsketch import DDSketch
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.pb import ddsketch_pb2 as pb
from ddsketch.pb.proto import KeyMappingProto
from ddsketch.store import DenseStore
from google.protobuf.message import DecodeError

RELATIVE_ACCURACY = 0.01
# Bin keys of a sketch from the network must lie in this range (1e-9 ms .. 1e13 ms), so merging
# two sketches can never allocate more than ~2500 dense bins.
MAX_KEY = 1500


class SketchError(ValueError):
    """Bytes that are not a sketch of protocol version 1."""


def new() -> BaseDDSketch:
    return DDSketch(relative_accuracy=RELATIVE_ACCURACY)


def _store_proto(store) -> pb.Store:
    """The smaller of the dense (trimmed) and sparse encodings of a store's bins."""
    nonzero = [(i, c) for i, c in enumerate(store.bins) if c]
    if not nonzero:
        return pb.Store()
    first, last = nonzero[0][0], nonzero[-1][0]
    if (last - first + 1) * 8 <= len(nonzero) * 13:
        return pb.Store(contiguousBinCounts=store.bins[first:last + 1], contiguousBinIndexOffset=store.offset + first)
    return pb.Store(binCounts={store.offset + i: c for i, c in nonzero})


def encode(sketch: BaseDDSketch) -> str:
    proto = pb.DDSketch(
        mapping=KeyMappingProto.to_proto(sketch._mapping),
        positiveValues=_store_proto(sketch._store),
        negativeValues=_store_proto(sketch._negative_store),
        zeroCount=sketch._zero_count,
    )
    return base64.b64encode(proto.SerializeToString()).decode("ascii")


_REFERENCE_GAMMA = new()._mapping.gamma


def decode(text: str) -> BaseDDSketch:
    """Parse a sketch from the wire; raises SketchError unless it is a well-formed sketch with the
    protocol's accuracy (sketches of other accuracies cannot be merged)."""
    try:
        raw = base64.b64decode(text, validate=True)
        proto = pb.DDSketch()
        proto.ParseFromString(raw)
    except (binascii.Error, DecodeError, TypeError, ValueError) as e:
        raise SketchError(f"not a DDSketch protobuf: {e}") from None
    if proto.mapping.interpolation != pb.IndexMapping.NONE or abs(proto.mapping.gamma - _REFERENCE_GAMMA) > 1e-12:
        raise SketchError(f"sketch gamma {proto.mapping.gamma} is not the protocol's ({_REFERENCE_GAMMA})")
    pos, neg = proto.positiveValues, proto.negativeValues
    if len(neg.binCounts) or len(neg.contiguousBinCounts):
        raise SketchError("sketch has negative values")
    # dense bins [lo, hi] (both encodings may be present; they add up)
    keys = list(pos.binCounts)
    if len(pos.contiguousBinCounts):
        keys += [pos.contiguousBinIndexOffset, pos.contiguousBinIndexOffset + len(pos.contiguousBinCounts) - 1]
    store = DenseStore()
    if keys:
        lo, hi = min(keys), max(keys)
        if lo < -MAX_KEY or hi > MAX_KEY:
            raise SketchError("sketch bins outside the latency range")
        bins = [0.0] * (hi - lo + 1)
        start = pos.contiguousBinIndexOffset - lo
        bins[start:start + len(pos.contiguousBinCounts)] = pos.contiguousBinCounts
        for k, c in pos.binCounts.items():
            bins[k - lo] += c
        total = math.fsum(bins)
        if min(bins) < 0 or not math.isfinite(total) or total >= 1e15:
            raise SketchError("sketch has negative or non-finite counts")
        store.bins, store.offset, store.min_key, store.max_key, store.count = bins, lo, lo, hi, total
    if not (0 <= proto.zeroCount < 1e15):
        raise SketchError("sketch has negative or non-finite counts")
    mapping = KeyMappingProto.from_proto(proto.mapping)
    return BaseDDSketch(mapping=mapping, store=store, negative_store=DenseStore(), zero_count=proto.zeroCount)


def merged(sketches) -> BaseDDSketch:
    out = new()
    for s in sketches:
        out.merge(s)
    return out


def quantiles(sketch: BaseDDSketch, qs=(0.5, 0.95, 0.99)) -> list[float | None]:
    if sketch.count == 0:
        return [None for _ in qs]
    return [sketch.get_quantile_value(q) for q in qs]


__all__ = ["RELATIVE_ACCURACY", "SketchError", "new", "encode", "decode", "merged", "quantiles"]
