"""The fleet report as a picture: per model, fleet p50/p95/p99 per length bucket on a log scale,
with each device's p50 beside it. Plain SVG (no plotting dependency)."""

from __future__ import annotations

import math
from html import escape

W, PANEL_H, LEFT, RIGHT, TOP, BOTTOM = 760, 260, 70, 150, 34, 40
COLORS = {"p50_ms": "#1f77b4", "p95_ms": "#ff7f0e", "p99_ms": "#d62728"}


def _ticks(lo: float, hi: float) -> list[float]:
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                out.append(v)
    return out or [lo, hi]


def svg(rep: dict) -> str:
    models = [(name, m) for name, m in sorted(rep["models"].items()) if m["buckets"]]
    height = max(1, len(models)) * PANEL_H + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{W}" height="{height}" fill="white"/>']
    if not models:
        parts.append('<text x="20" y="30">no latency data</text>')
    devices = sorted({d for _, m in models for b in m["buckets"] for d in b["devices"]})
    for i, (name, m) in enumerate(models):
        y0 = i * PANEL_H
        values = [b[k] for b in m["buckets"] for k in COLORS if b[k]] + [
            s["p50_ms"] for b in m["buckets"] for s in b["devices"].values() if s["p50_ms"]]
        lo, hi = min(values) / 1.3, max(values) * 1.3
        plot_w, plot_h = W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM

        def y(v, y0=y0, lo=lo, hi=hi, plot_h=plot_h):
            return y0 + TOP + plot_h * (1 - (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)))

        parts.append(f'<text x="{LEFT}" y="{y0 + 20}" font-size="13" font-weight="bold">{escape(name)}: latency by sequence length (ms, log scale)</text>')
        parts.append(f'<rect x="{LEFT}" y="{y0 + TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
        for t in _ticks(lo, hi):
            parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        step = plot_w / len(m["buckets"])
        for j, b in enumerate(m["buckets"]):
            cx = LEFT + step * (j + 0.5)
            parts.append(f'<text x="{cx:.1f}" y="{y0 + TOP + plot_h + 15}" text-anchor="middle">{escape(b["bucket"])}</text>')
            parts.append(f'<text x="{cx:.1f}" y="{y0 + TOP + plot_h + 28}" text-anchor="middle" fill="#777">n={b["count"]}</text>')
            if b["p50_ms"] and b["p99_ms"]:
                parts.append(f'<line x1="{cx - 8:.1f}" x2="{cx - 8:.1f}" y1="{y(b["p50_ms"]):.1f}" y2="{y(b["p99_ms"]):.1f}" stroke="#bbb" stroke-width="3"/>')
            for k, color in COLORS.items():
                if b[k]:
                    parts.append(f'<circle cx="{cx - 8:.1f}" cy="{y(b[k]):.1f}" r="4" fill="{color}"><title>{k[:3]} {b[k]:.3g} ms</title></circle>')
            for dev, s in b["devices"].items():
                if s["p50_ms"]:
                    dx = 6 + 4 * devices.index(dev) % 24
                    parts.append(f'<circle cx="{cx + dx:.1f}" cy="{y(s["p50_ms"]):.1f}" r="2.5" fill="#555" opacity="0.7">'
                                 f'<title>{escape(dev)} p50 {s["p50_ms"]:.3g} ms (n={s["count"]})</title></circle>')
        lx = LEFT + plot_w + 15
        for k, (label, color) in enumerate([("fleet p50", COLORS["p50_ms"]), ("fleet p95", COLORS["p95_ms"]),
                                            ("fleet p99", COLORS["p99_ms"]), ("device p50", "#555")]):
            ly = y0 + TOP + 10 + 16 * k
            parts.append(f'<circle cx="{lx}" cy="{ly}" r="4" fill="{color}"/><text x="{lx + 10}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
