"""The fleet report as a picture: per model, fleet p50/p95/p99 per length bucket on a log scale,
with each device's p50 beside it; for text-generation models a second panel with time to first
token, inter-token latency and decode tokens/s. Plain SVG (no plotting dependency)."""

from __future__ import annotations

import math
from html import escape

W, PANEL_H, LEFT, RIGHT, TOP, BOTTOM = 760, 260, 70, 150, 34, 40
COLORS = {"p50": "#1f77b4", "p95": "#ff7f0e", "p99": "#d62728"}
GEN_GROUPS = (("ttft_ms", "time to first token (ms)", " ms"), ("itl_ms", "inter-token latency (ms)", " ms"),
              ("tok_s", "decode tokens/s", " tok/s"))


def _ticks(lo: float, hi: float) -> list[float]:
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                out.append(v)
    return out or [lo, hi]


def _latency_groups(m: dict) -> list[dict]:
    return [{"label": b["bucket"], "unit": " ms", "note": f"n={b['count']}", "p50": b["p50_ms"], "p95": b["p95_ms"], "p99": b["p99_ms"],
             "devices": {d: (s["p50_ms"], s["count"]) for d, s in b["devices"].items()}} for b in m["buckets"]]


def _generation_groups(g: dict) -> list[dict]:
    out = []
    for key, label, unit in GEN_GROUPS:
        d = g.get(key)
        if d:
            out.append({"label": label, "unit": unit, "note": f"n={d['count']}", "p50": d["p50"], "p95": d["p95"], "p99": d["p99"],
                        "devices": {dev: (s[key]["p50"], s[key]["count"]) for dev, s in g["devices"].items() if s.get(key)}})
    return out


def _panel(parts: list, y0: float, title: str, groups: list[dict], devices: list[str]) -> None:
    values = [v for b in groups for v in (b["p50"], b["p95"], b["p99"]) if v] + [
        p for b in groups for p, _ in b["devices"].values() if p]
    lo, hi = min(values) / 1.3, max(values) * 1.3
    plot_w, plot_h = W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM

    def y(v):
        return y0 + TOP + plot_h * (1 - (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)))

    parts.append(f'<text x="{LEFT}" y="{y0 + 20}" font-size="13" font-weight="bold">{escape(title)}</text>')
    parts.append(f'<rect x="{LEFT}" y="{y0 + TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for t in _ticks(lo, hi):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    step = plot_w / len(groups)
    for j, b in enumerate(groups):
        cx = LEFT + step * (j + 0.5)
        parts.append(f'<text x="{cx:.1f}" y="{y0 + TOP + plot_h + 15}" text-anchor="middle">{escape(b["label"])}</text>')
        parts.append(f'<text x="{cx:.1f}" y="{y0 + TOP + plot_h + 28}" text-anchor="middle" fill="#777">{escape(b["note"])}</text>')
        if b["p50"] and b["p99"]:
            parts.append(f'<line x1="{cx - 8:.1f}" x2="{cx - 8:.1f}" y1="{y(b["p50"]):.1f}" y2="{y(b["p99"]):.1f}" stroke="#bbb" stroke-width="3"/>')
        for k, color in COLORS.items():
            if b[k]:
                parts.append(f'<circle cx="{cx - 8:.1f}" cy="{y(b[k]):.1f}" r="4" fill="{color}"><title>{k} {b[k]:.3g}{b["unit"]}</title></circle>')
        for dev, (p50, count) in b["devices"].items():
            if p50:
                dx = 6 + 4 * devices.index(dev) % 24
                parts.append(f'<circle cx="{cx + dx:.1f}" cy="{y(p50):.1f}" r="2.5" fill="#555" opacity="0.7">'
                             f'<title>{escape(dev)} p50 {p50:.3g}{b["unit"]} (n={count})</title></circle>')
    lx = LEFT + plot_w + 15
    for k, (label, color) in enumerate([("fleet p50", COLORS["p50"]), ("fleet p95", COLORS["p95"]),
                                        ("fleet p99", COLORS["p99"]), ("device p50", "#555")]):
        ly = y0 + TOP + 10 + 16 * k
        parts.append(f'<circle cx="{lx}" cy="{ly}" r="4" fill="{color}"/><text x="{lx + 10}" y="{ly + 4}">{label}</text>')


def svg(rep: dict) -> str:
    panels = []  # (title, groups)
    for name, m in sorted(rep["models"].items()):
        if m["buckets"]:
            panels.append((f"{name}: latency by sequence length (ms, log scale)", _latency_groups(m)))
        groups = _generation_groups(m["generation"]) if m.get("generation") else []
        if groups:
            panels.append((f"{name}: text generation per request (log scale)", groups))
    height = max(1, len(panels)) * PANEL_H + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{W}" height="{height}" fill="white"/>']
    if not panels:
        parts.append('<text x="20" y="30">no latency data</text>')
    devices = sorted({d for _, groups in panels for b in groups for d in b["devices"]})
    for i, (title, groups) in enumerate(panels):
        _panel(parts, i * PANEL_H, title, groups, devices)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
