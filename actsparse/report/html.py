"""The static HTML page of a report: one self-contained file (PNG plots inlined), no server, no scripts needed."""
from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Callable

import pandas as pd

e = html.escape

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;
     background:#fafbfc}
main{max-width:1180px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:24px;margin:8px 0 4px} h2{font-size:19px;margin:34px 0 8px;border-bottom:1px solid #dde1e6;
   padding-bottom:4px} h3{font-size:15px;margin:22px 0 6px}
.meta{color:#5b6472;font-size:13px} nav{font-size:13px;margin:12px 0 0} nav a{margin-right:14px}
table.paper,table.kv,table.runs{border-collapse:collapse;margin:10px 0 4px;background:#fff;
   font-variant-numeric:tabular-nums}
table.paper caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0;font-size:13px}
table.paper th,table.paper td{padding:3px 12px;text-align:right;border:0}
table.paper th[scope=row],table.paper thead th:first-child{text-align:left}
table.paper thead tr{border-top:2px solid #222;border-bottom:1px solid #222}
table.paper tbody tr:last-child{border-bottom:2px solid #222}
table.paper tr.rule{border-top:1px solid #888} table.paper tr.ref{color:#444;font-style:italic}
td.missing{color:#999} p.note{font-size:12px;color:#5b6472;margin:2px 0 14px}
table.kv td,table.kv th,table.runs td,table.runs th{border:1px solid #e1e4e8;padding:3px 8px;text-align:left;
   font-size:12.5px;vertical-align:top} table.runs td.num{text-align:right}
table.runs tr.FAILED td{background:#fff4f4}
figure{margin:14px 0;background:#fff;border:1px solid #e1e4e8;padding:8px;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;display:block} figcaption{font-size:12px;color:#5b6472;margin-top:4px}
pre{background:#f3f4f6;padding:10px;overflow:auto;font-size:12px;max-height:420px}
.headline{background:#eef6ff;border-left:4px solid #2f6fdd;padding:8px 14px;margin:10px 0}
.warn{background:#fff8e6;border-left:4px solid #e0a100;padding:8px 14px}
details{margin:8px 0} summary{cursor:pointer;color:#2f5fb3}
.tables{display:flex;flex-wrap:wrap;gap:8px 36px;align-items:flex-start}
.tblock{max-width:100%} .tblock pre{max-width:560px} .ttitle{font-weight:600;font-size:13px;margin-top:10px}
.tblock p.note{max-width:520px}
"""


def _img_src(png: Path, base: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    return e(os.path.relpath(png, base).replace(os.sep, "/"))


def figure(png: Path, base: Path, caption: str, embed: bool = True) -> str:
    """An <figure> with the PNG (inlined, or linked relative to base) and links to the PNG and SVG files."""
    svg = png.with_suffix(".svg")
    rel = lambda p: e(os.path.relpath(p, base).replace(os.sep, "/"))  # noqa: E731
    links = f'<a href="{rel(png)}">PNG</a>' + (f' · <a href="{rel(svg)}">SVG</a>' if svg.exists() else "")
    return (f'<figure><img src="{_img_src(png, base, embed)}" alt="{e(caption)}">'
            f"<figcaption>{e(caption)} — {links}</figcaption></figure>")


def kv_table(d: dict) -> str:
    """A two-column table of key: value."""
    rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in d.items())
    return f'<table class="kv">{rows}</table>'


def pre(text: str) -> str:
    """A <pre> block of escaped text."""
    return f"<pre>{e(text)}</pre>"


def details(summary: str, body: str) -> str:
    """A folded <details> block."""
    return f"<details><summary>{e(summary)}</summary>{body}</details>"


def runs_table(df: "pd.DataFrame", columns: list[tuple[str, str]], link: Callable[[pd.Series], str],
               artifacts: Callable[[pd.Series], str | None]) -> str:
    """The table of runs: one row per run, its id linked to the MLflow UI (link(row)) and to its artifacts."""
    head = "".join(f"<th>{e(h)}</th>" for h, _ in columns)
    body = []
    for _, r in df.iterrows():
        tds = []
        for _, c in columns:
            if c == "run_id":
                a = artifacts(r)
                extra = f' <a href="{e(a)}">artifacts</a>' if a else ""
                tds.append(f'<td><a href="{e(link(r))}">{e(str(r["run_id"])[:12])}</a>{extra}</td>')
                continue
            v = r.get(c)
            if hasattr(v, "strftime") and v == v:   # a timestamp: to the second, in UTC as MLflow stores it
                v = v.strftime("%Y-%m-%d %H:%M:%S")
            if isinstance(v, float):
                tds.append('<td class="num">' + ("–" if math.isnan(v) else f"{v:.4g}") + "</td>")
            else:
                tds.append(f"<td>{e('' if v is None else str(v).splitlines()[0][:160] if str(v) else '')}</td>")
        body.append(f'<tr class="{e(str(r.get("status", "")))}">{"".join(tds)}</tr>')
    return f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: title, a table of contents, then (anchor, heading, html) sections."""
    nav = "".join(f'<a href="#{e(a)}">{e(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{e(a)}"><h2>{e(h)}</h2>{b}</section>' for a, h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{e(title)}</h1><div class=\"meta\">{subtitle}</div><nav>{nav}</nav>{body}"
            "</main></body></html>\n")
