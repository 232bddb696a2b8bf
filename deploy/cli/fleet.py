"""`edgejit fleet`: the fleet report from one or more coordinator databases."""

from __future__ import annotations

from pathlib import Path

from edge.telemetry.mqtt import TelemetryError

from deploy.fleet.coordinator import report
from deploy.fleet.coordinator.store import Store


def add_arguments(p) -> None:
    p.add_argument("--db", action="append", help="coordinator database (repeat to merge several; default fleet.sqlite)")
    p.add_argument("--json", metavar="FILE", help="also write the merged report as JSON")
    p.add_argument("--svg", metavar="FILE", help="also draw latency per length bucket (fleet and per device) as SVG")
    p.add_argument("--regress-threshold", type=float, default=0.25,
                   help="flag a device when its latest p50 exceeds its own history by this fraction (default 0.25)")
    p.add_argument("--min-count", type=int, default=20, help="requests needed on both sides of a regression check")
    p.add_argument("--no-per-device", action="store_true", help="fleet-wide rows only")


def open_merged(paths: list[str]) -> Store:
    for p in paths:
        if not Path(p).is_file():
            raise TelemetryError(f"{p}: no such coordinator database")
    if len(paths) == 1:
        return Store(paths[0])
    first = Store(paths[0])
    merged = Store(":memory:", rollup_s=first.rollup_s)
    first.close()
    for p in paths:
        merged.import_store(p)
    return merged


def main(args) -> int:
    store = open_merged(args.db or ["fleet.sqlite"])
    try:
        rep = report.build(store, regress_threshold=args.regress_threshold, min_count=args.min_count)
    finally:
        store.close()
    print(report.render(rep, per_device=not args.no_per_device), end="")
    if args.json:
        report.write_json(rep, args.json)
        print(f"wrote {args.json}")
    if args.svg:
        from deploy.fleet.coordinator.plot import svg

        report.write_text(args.svg, svg(rep))
        print(f"wrote {args.svg}")
    return 0
