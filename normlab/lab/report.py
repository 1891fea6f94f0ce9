"""The lab's ``index.html``: one self-contained page (CSS inline, figures as base64 data URIs)
built from ``results.json``'s dict and the PNGs under the output folder; plain string building
with :func:`html.escape`.

Experiment descriptions are trusted HTML (written with the experiments); everything else that
comes from a result (titles, claims, evidence, metric names and values, errors) is escaped.
"""
from __future__ import annotations

import base64
import math
from html import escape
from pathlib import Path
from typing import Any

from . import axes

AXES_FIGURE = "figures/axes.png"

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa;
        --ok: #1a7f37; --no: #bc4c00; --err: #cf222e; }
* { box-sizing: border-box; }
body { font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); max-width: 1000px; margin: 2rem auto 4rem; padding: 0 1.25rem; }
h1 { font-size: 2rem; margin: 0 0 .25rem; }
h2 { margin-top: 2.75rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); }
h3 { margin: 1.5rem 0 .5rem; font-size: 1.05rem; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
code, pre { font: .86em/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--soft); padding: .75rem; overflow-x: auto; border-radius: 6px; }
.meta, .muted { color: var(--muted); font-size: .9rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1rem; font-size: .92rem; }
th, td { text-align: left; vertical-align: top; padding: .4rem .6rem;
         border-bottom: 1px solid var(--line); }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table table { margin: 0; font-size: .95em; } table table th { background: none; }
.badge { display: inline-block; padding: .1rem .55rem; border-radius: 999px; color: #fff;
         font-size: .78rem; font-weight: 600; white-space: nowrap; }
.badge.ok { background: var(--ok); } .badge.no { background: var(--no); }
.badge.err { background: var(--err); } .badge.pending { background: var(--muted); }
.score { font-size: 1.05rem; }
nav ol { columns: 2; padding-left: 1.25rem; } nav li { margin: .15rem 0; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; justify-content: center; }
figure { margin: .5rem 0; text-align: center; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: .8rem; }
ul.claims { list-style: none; padding: 0; }
ul.claims li { margin: .6rem 0; padding: .5rem .75rem; background: var(--soft);
               border-radius: 6px; }
.evidence { color: var(--muted); font-size: .9rem; margin-top: .2rem; }
.error { border-left: 4px solid var(--err); background: #fff5f5; padding: .6rem 1rem;
         border-radius: 0 6px 6px 0; }
.description { max-width: 52rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: .85rem; }
"""


def render(results: dict, out: str | Path) -> str:
    """The report of ``results`` (the ``results.json`` dict); figures are read from ``out``."""
    out = Path(out)
    experiments = results.get("experiments", {})
    parts = [
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>normlab lab report</title><style>{CSS}</style></head><body>",
        _header(results),
        _toc(experiments, results.get("pending", [])),
        _summary(experiments, results.get("pending", [])),
        _norms(out),
        *(_experiment(name, r, out) for name, r in experiments.items()),
        "<footer>Written by <code>normlab lab</code>. The numbers are in <code>results.json"
        "</code> and the figures in <code>figures/</code> next to this file; finished runs are "
        "kept in <code>runs/</code>, so running the same command again resumes.</footer>",
        "</body></html>\n",
    ]
    return "\n".join(parts)


# --- pieces


def _header(results: dict) -> str:
    s = results.get("settings", {})
    m = results.get("machine", {})
    bits = [f"{s.get('mode', '?')} mode", f"seed {s.get('seed', '?')}",
            f"normlab {results.get('normlab_version', '?')}",
            f"torch {results.get('torch_version', '?')}"]
    if m:
        bits.append(f"{m.get('cpus', '?')} CPUs ({m.get('torch_threads', '?')} torch threads), "
                    f"{m.get('platform', '')}")
    data = s.get("data") or {}
    own = "".join(f"<li><code>{escape(k)}</code>: {escape(str(v))}</li>" for k, v in data.items())
    return ("<header><h1>normlab lab</h1><p class='meta'>The classic normalization experiments, "
            "rerun on data that ships with normlab. " + escape(" · ".join(bits)) + "</p>"
            + (f"<p class='meta'>Own data:</p><ul class='meta'>{own}</ul>" if own else "")
            + "</header>")


def _verdict(claim: dict) -> str:
    return ("<span class='badge ok'>supported</span>" if claim.get("holds")
            else "<span class='badge no'>not supported</span>")


def _score(r: dict) -> str:
    if "error" in r:
        return "<span class='badge err'>error</span>"
    claims = r.get("claims", [])
    return f"{sum(bool(c.get('holds')) for c in claims)}/{len(claims)} supported"


def _toc(experiments: dict, pending: list) -> str:
    items = ["<li><a href='#summary'>Summary of the claims</a></li>",
             "<li><a href='#norms'>What each norm normalizes</a></li>"]
    items += [f"<li><a href='#exp-{escape(n)}'>{escape(r.get('title', n))}</a> "
              f"<span class='muted'>({_score(r)})</span></li>" for n, r in experiments.items()]
    items += [f"<li>{escape(n)} <span class='badge pending'>not run yet</span></li>"
              for n in pending if n not in experiments]
    return f"<nav><h2>Contents</h2><ol>{''.join(items)}</ol></nav>"


def _summary(experiments: dict, pending: list) -> str:
    claims = [c for r in experiments.values() for c in r.get("claims", [])]
    errors = [n for n, r in experiments.items() if "error" in r]
    held = sum(bool(c.get("holds")) for c in claims)
    ran = len(experiments) - len(errors)
    head = (f"<p class='score'><strong>{held} of {len(claims)}</strong> claims supported across "
            f"{ran} experiment{'s' * (ran != 1)}"
            + (f"; <strong>{len(errors)} failed</strong>" if errors else "") + ".</p>")
    waiting = [n for n in pending if n not in experiments]
    if waiting:
        head += ("<p class='muted'>Not finished yet: " + escape(", ".join(waiting))
                 + ". This page is rewritten as each experiment finishes.</p>")
    rows = []
    for name, r in experiments.items():
        link = (f"<a href='#exp-{escape(name)}'>{escape(r.get('title', name))}</a>")
        if "error" in r:
            rows.append(f"<tr><td>{link}</td><td class='muted'>(the experiment failed)</td>"
                        f"<td><span class='badge err'>error</span></td>"
                        f"<td class='muted'>{escape(str(r['error']))}</td></tr>")
            continue
        cs = r.get("claims", [])
        for i, c in enumerate(cs):
            first = f"<td rowspan='{len(cs)}'>{link}</td>" if i == 0 else ""
            rows.append(f"<tr>{first}<td>{escape(c.get('claim', ''))}</td><td>{_verdict(c)}</td>"
                        f"<td class='muted'>{escape(str(c.get('evidence', '')))}</td></tr>")
    table = ("<table><thead><tr><th>Experiment</th><th>Claim</th><th>Verdict</th>"
             f"<th>Evidence</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
             if rows else "")
    return f"<section id='summary'><h2>Summary of the claims</h2>{head}{table}</section>"


def _norms(out: Path) -> str:
    rows = []
    for key in axes.NORMS:
        d = axes.describe(key)
        red = d.reduction
        words = escape(d.words()) + ("" if red.centered else "; mean square, no centering")
        rows.append(
            f"<tr><td><strong>{escape(d.norm.title)}</strong></td>"
            f"<td><code>{escape(d.norm.call(axes.SHAPE))}</code><br>"
            f"<code>view={red.view} dims={red.dims} affine={red.affine}</code></td>"
            f"<td class='num'>{d.statistics} &times; {red.count}</td><td>{words}</td></tr>")
    n, c, h, w = axes.SHAPE
    return (
        "<section id='norms'><h2>What each norm normalizes</h2><div class='description'><p>"
        "Every normalization computes <code>y = (x &minus; &mu;) / &radic;(&sigma;&sup2; + "
        "&epsilon;) &middot; &gamma; + &beta;</code>; the norms differ only in which elements "
        "share one mean &mu; and variance &sigma;&sup2;. In normlab each is a "
        "<code>Reduction</code> (a view of the input and the axes reduced) handed to one "
        "engine, and the figure is drawn from those specs: for an activation of "
        f"(N, C, H, W) = ({n}, {c}, {h}, {w}), the highlighted cells share the statistic of one "
        "element (the GroupNorm paper's Figure 2, Wu &amp; He 2018; GroupNorm with "
        f"G = {axes.GROUPS}). <code>normlab explain NORM</code> works one through on a 3&times;3 "
        "matrix.</p></div>" + _image(out, AXES_FIGURE, "which axes each norm normalizes")
        + "<table><thead><tr><th>Norm</th><th>Engine spec</th><th>Statistics &times; "
        f"elements each</th><th>In words</th></tr></thead><tbody>{''.join(rows)}</tbody>"
        "</table></section>")


def _experiment(name: str, r: dict, out: Path) -> str:
    meta = [f"<code>{escape(name)}</code>", _duration(r.get("seconds"))]
    if r.get("data"):
        meta.append("data: " + escape(str(r["data"])))
    parts = [f"<section id='exp-{escape(name)}'><h2>{escape(r.get('title', name))}</h2>",
             f"<p class='meta'>{' · '.join(m for m in meta if m)}</p>"]
    if r.get("description"):
        parts.append(f"<div class='description'>{r['description']}</div>")
    if "error" in r:
        parts.append("<div class='error'><strong>This experiment failed</strong> (the others "
                     f"ran): <code>{escape(str(r['error']))}</code>"
                     + (f"<details><summary>traceback</summary><pre>{escape(r['traceback'])}"
                        "</pre></details>" if r.get("traceback") else "") + "</div>")
    figures = r.get("figures", [])
    if figures:
        parts.append("<div class='figures'>" + "".join(_image(out, f) for f in figures)
                     + "</div>")
    claims = r.get("claims", [])
    if claims:
        parts.append("<h3>Claims</h3><ul class='claims'>" + "".join(
            f"<li>{_verdict(c)} {escape(c.get('claim', ''))}"
            f"<div class='evidence'>{escape(str(c.get('evidence', '')))}</div>"
            + (f"<div class='evidence'><em>Why this setting may differ:</em> "
               f"{escape(str(c['why']))}</div>" if c.get("why") else "") + "</li>"
            for c in claims) + "</ul>")
    if r.get("metrics"):
        parts.append("<h3>Metrics</h3>" + _value(r["metrics"]))
    parts.append("</section>")
    return "\n".join(parts)


def _image(out: Path, rel: str, alt: str | None = None) -> str:
    path = out / rel
    if not path.is_file():
        return f"<p class='muted'>(figure missing: <code>{escape(rel)}</code>)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = {".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        path.suffix.lower(), "image/png")
    return (f"<figure><img src='data:{mime};base64,{data}' alt='{escape(alt or rel)}'>"
            f"<figcaption>{escape(rel)}</figcaption></figure>")


# --- metrics, readable


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _number(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and not 1e-3 <= abs(v) < 1e5:
            return f"{v:.3e}"
        return f"{v:.4g}"
    return escape(str(v))


def _list(v: list) -> str:
    items = [_number(x) for x in v]
    if len(items) <= 8:
        return f"[{', '.join(items)}]"
    shown = ", ".join(items[:6] + ["&hellip;"] + items[-1:])
    return f"[{shown}] <span class='muted'>({len(v)} values)</span>"


def _is_grid(v: Any) -> bool:
    """A dict of at least two dicts of scalars: rendered as rows x columns."""
    return (isinstance(v, dict) and len(v) >= 2
            and all(isinstance(row, dict) and row for row in v.values())
            and all(_scalar(x) for row in v.values() for x in row.values()))


def _cell(v: Any) -> str:
    numeric = isinstance(v, (int, float)) or v is None
    return f"<td class='num'>{_value(v)}</td>" if numeric else f"<td>{_value(v)}</td>"


def _label(k: Any) -> str:
    return escape(str(k).replace("_", " "))


def _value(v: Any) -> str:
    if _is_grid(v):
        cols = list(dict.fromkeys(k for row in v.values() for k in row))
        head = "".join(f"<th>{_label(c)}</th>" for c in cols)
        body = "".join(
            f"<tr><th>{_label(k)}</th>"
            + "".join(_cell(row.get(c)) for c in cols) + "</tr>"
            for k, row in v.items())
        return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(v, dict):
        body = "".join(
            f"<tr><th>{_label(k)}</th>{_cell(x)}</tr>" for k, x in v.items())
        return f"<table><tbody>{body}</tbody></table>"
    if isinstance(v, list):
        if all(_scalar(x) for x in v):
            return _list(v)
        rows = {i: x for i, x in enumerate(v, 1)}
        return _value(rows) if _is_grid(rows) else "".join(_value(x) for x in v)
    return _number(v)
