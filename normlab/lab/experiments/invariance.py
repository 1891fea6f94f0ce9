"""Invariance of normalized layers under weight and data transformations, measured: Table 1 of
the Layer Normalization paper, plus RMSNorm."""
from __future__ import annotations

import math

import torch

from ... import functional as F
from ..api import Context, claim, figure
from .padding import one_thread

NAME = "invariance"
TITLE = "Invariance under weight and data re-scaling and re-centering (LayerNorm paper, Table 1)"
DESCRIPTION = (
    "<p>Which transformations of the weights and of the data leave a normalized layer's output "
    "unchanged? Ba, Kiros &amp; Hinton (<i>Layer Normalization</i>, 2016, Table 1) list them for "
    "BatchNorm, WeightNorm and LayerNorm, and Zhang &amp; Sennrich (<i>Root Mean Square Layer "
    "Normalization</i>, 2019, Table 1) add RMSNorm. We compute the table instead of deriving it. "
    "A batch of cases <i>x</i> (rows) goes through a linear layer <i>a = W x</i>, one row "
    "<i>w<sub>i</sub></i> of <i>W</i> per hidden unit, and the norm, "
    "<i>h = g &#8857; N(a) + b</i>; as in the paper, the bias <i>b</i> is added after the "
    "normalization, so no transformation touches it. N is BatchNorm (each unit over the batch, "
    "training mode), LayerNorm and RMSNorm (each case over its units), through "
    "<code>normlab.functional</code>, and WeightNorm "
    "(<i>h<sub>i</sub> = g<sub>i</sub> w<sub>i</sub><sup>T</sup>x / ||w<sub>i</sub>|| + "
    "b<sub>i</sub></i>, <code>torch.nn.utils.parametrizations.weight_norm</code>, whose "
    "perturbed matrix is the direction <i>v = W</i>). The six transformations, with a random "
    "&delta; &gt; 0 and a random vector &gamma;: weight matrix re-scaling "
    "<i>W &rarr; &delta;W</i>; weight matrix re-centering "
    "<i>W &rarr; W + 1&gamma;<sup>T</sup></i> (the same vector added to every row, so every "
    "unit's input shifts by the same &gamma;<sup>T</sup>x); weight "
    "vector re-scaling (one row <i>w<sub>i</sub> &rarr; &delta;w<sub>i</sub></i>); dataset "
    "re-scaling <i>x &rarr; &delta;x</i> for every case; dataset re-centering "
    "<i>x &rarr; x + &gamma;</i> for every case; single training case re-scaling (one case "
    "<i>x<sub>j</sub> &rarr; &delta;x<sub>j</sub></i>). A cell says <i>invariant</i> when the "
    "relative change of the output, ||h' &minus; h|| / ||h||, stays below 1e-4 in float64 on "
    "every random draw (layer sizes, batch size, weights, data, &delta;, &gamma;; eps = 1e-10 "
    "so it cannot blur the verdict). We also measure the table with a bias <i>c</i> inside the "
    "normalized input, <i>a = W x + c</i> (metrics <code>table_inner_bias</code>): there "
    "LayerNorm and RMSNorm lose their re-scaling invariances, which is why the paper's "
    "definition keeps the bias outside.</p>"
)

NORMS = ("BatchNorm", "WeightNorm", "LayerNorm", "RMSNorm")
PERTURBATIONS = ("weight_rescale", "weight_recenter", "single_weight_rescale", "data_rescale",
                 "data_recenter", "single_example_rescale")
LABELS = {
    "weight_rescale": "weight matrix\nre-scaling",
    "weight_recenter": "weight matrix\nre-centering",
    "single_weight_rescale": "weight vector\nre-scaling",
    "data_rescale": "dataset\nre-scaling",
    "data_recenter": "dataset\nre-centering",
    "single_example_rescale": "single case\nre-scaling",
}
_row = lambda *v: dict(zip(PERTURBATIONS, v))
# Ba et al. 2016, Table 1 (BatchNorm, WeightNorm, LayerNorm); Zhang & Sennrich 2019, Table 1.
PAPER = {
    "BatchNorm": _row(True, False, True, True, True, False),
    "WeightNorm": _row(True, False, True, False, False, False),
    "LayerNorm": _row(True, True, False, True, False, True),
    "RMSNorm": _row(True, False, False, True, False, True),
}
TOLERANCE = 1e-4
EPS = 1e-10


def _output(norm: str, x, w, g, b, c=None) -> torch.Tensor:
    """The normalized layer's output h for cases ``x`` (B, D) and weights ``w`` (H, D)."""
    if norm == "WeightNorm":
        lin = torch.nn.Linear(w.shape[1], w.shape[0], dtype=x.dtype)
        lin = torch.nn.utils.parametrizations.weight_norm(lin, dim=0)
        with torch.no_grad():
            lin.parametrizations.weight.original0.copy_(g[:, None])  # magnitude g_i
            lin.parametrizations.weight.original1.copy_(w)           # direction v = W
            lin.bias.copy_(b)
            return lin(x) if c is None else lin(x) + c * g / w.norm(dim=1)
    a = x @ w.T if c is None else x @ w.T + c
    if norm == "BatchNorm":
        return F.batch_norm(a, None, None, g, b, training=True, eps=EPS)
    if norm == "LayerNorm":
        return F.layer_norm(a, (a.shape[1],), g, b, eps=EPS)
    if norm == "RMSNorm":
        return F.rms_norm(a, (a.shape[1],), g, eps=EPS) + b
    raise ValueError(norm)


def _perturb(name: str, x, w, gen) -> tuple[torch.Tensor, torch.Tensor]:
    delta = float(torch.empty((), dtype=x.dtype).uniform_(1.5, 6.0, generator=gen))
    x, w = x.clone(), w.clone()
    if name == "weight_rescale":
        w *= delta
    elif name == "weight_recenter":  # W + 1 gamma^T: one vector added to every row
        w += torch.randn(w.shape[1], dtype=w.dtype, generator=gen)
    elif name == "single_weight_rescale":
        w[int(torch.randint(w.shape[0], (), generator=gen))] *= delta
    elif name == "data_rescale":
        x *= delta
    elif name == "data_recenter":  # x + gamma for every case
        x += torch.randn(x.shape[1], dtype=x.dtype, generator=gen)
    elif name == "single_example_rescale":
        x[int(torch.randint(x.shape[0], (), generator=gen))] *= delta
    else:
        raise ValueError(name)
    return x, w


def _measure(seed: int) -> dict:
    """Relative output change of every norm under every perturbation, on one random draw, with
    the bias outside ("outside") and inside ("inside") the normalized input."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    batch, d_in, hidden = (int(torch.randint(lo, hi, (), generator=gen))
                           for lo, hi in ((4, 65), (3, 33), (3, 33)))
    x = torch.randn(batch, d_in, **f64) * 2 + torch.randn(d_in, **f64)  # not zero-mean
    w = torch.randn(hidden, d_in, **f64) / math.sqrt(d_in)
    g = torch.rand(hidden, **f64) + 0.5
    b = torch.randn(hidden, **f64)
    c = torch.randn(hidden, **f64)
    result = {"shape": [batch, d_in, hidden]}
    for where, inner in (("outside", None), ("inside", c)):
        table = {}
        for norm in NORMS:
            h = _output(norm, x, w, g, b, inner)
            table[norm] = {}
            for p in PERTURBATIONS:
                pgen = torch.Generator().manual_seed(seed * 7919 + PERTURBATIONS.index(p))
                xp, wp = _perturb(p, x, w, pgen)
                hp = _output(norm, xp, wp, g, b, inner)
                table[norm][p] = float((hp - h).norm() / h.norm())
        result[where] = table
    return result


def run(ctx: Context) -> dict:
    trials = ctx.pick(tiny=3, quick=12, full=64)
    draws = []
    with one_thread(), ctx.bar(trials, "random draws") as bar:
        for t in range(trials):
            bar.describe(f"draw {t + 1}/{trials}")
            draws.append(ctx.cached(f"draw{t}", lambda t=t: _measure(ctx.seed_for(f"draw{t}"))))
            bar.advance()

    def worst(where):  # largest relative change over the draws, per cell
        return {n: {p: max(d[where][n][p] for d in draws) for p in PERTURBATIONS} for n in NORMS}

    def least(where):
        return {n: {p: min(d[where][n][p] for d in draws) for p in PERTURBATIONS} for n in NORMS}

    rel_max, rel_min = worst("outside"), least("outside")
    table = {n: {p: rel_max[n][p] < TOLERANCE for p in PERTURBATIONS} for n in NORMS}
    inner = worst("inside")
    table_inner = {n: {p: inner[n][p] < TOLERANCE for p in PERTURBATIONS} for n in NORMS}
    # An unambiguous verdict: every draw on the same side of the tolerance, far from it.
    invariant_cells = [rel_max[n][p] for n in NORMS for p in PERTURBATIONS if table[n][p]]
    other_cells = [rel_min[n][p] for n in NORMS for p in PERTURBATIONS if not table[n][p]]

    claims = []
    for norm in NORMS:
        bad = [p for p in PERTURBATIONS if table[norm][p] != PAPER[norm][p]]
        inv = [p for p in PERTURBATIONS if table[norm][p]]
        if bad:
            evidence = "; ".join(
                f"{p}: measured {'invariant' if table[norm][p] else 'not invariant'} (largest "
                f"relative change {rel_max[norm][p]:.1e}), paper "
                f"{'invariant' if PAPER[norm][p] else 'not invariant'}" for p in bad)
        else:
            evidence = (f"all six agree: invariant to {', '.join(inv)} (largest relative change "
                        f"{max(rel_max[norm][p] for p in inv):.1e}); the others change the "
                        f"output by at least "
                        f"{min(rel_min[norm][p] for p in PERTURBATIONS if p not in inv):.2g} "
                        f"over {trials} random draws")
        source = "Zhang & Sennrich 2019" if norm == "RMSNorm" else "Ba et al. 2016"
        claims.append(claim(f"{norm}: our measured invariance row matches the paper's "
                            f"({source}, Table 1)", not bad, evidence))

    fig = _figure(table, rel_max, rel_min)
    figures = [ctx.save_figure(fig, "table")]
    metrics = {
        "table": table,
        "paper": PAPER,
        "relative_change_max": rel_max,
        "relative_change_min": rel_min,
        "table_inner_bias": table_inner,
        "relative_change_max_inner_bias": inner,
        "tolerance": TOLERANCE,
        "eps": EPS,
        "draws": trials,
        "largest_invariant_change": max(invariant_cells) if invariant_cells else None,
        "smallest_non_invariant_change": min(other_cells) if other_cells else None,
        "mismatches": [f"{n}/{p}" for n in NORMS for p in PERTURBATIONS
                       if table[n][p] != PAPER[n][p]],
    }
    return {"title": TITLE, "claims": claims, "metrics": metrics, "figures": figures}


def _figure(table, rel_max, rel_min):
    import numpy as np
    from matplotlib.patches import Rectangle

    fig, ax = figure(figsize=(10, 3.6))
    grid = np.array([[1.0 if table[n][p] else 0.0 for p in PERTURBATIONS] for n in NORMS])
    ax.imshow(grid, cmap="RdYlGn", vmin=-0.6, vmax=1.3, aspect="auto")
    for i, n in enumerate(NORMS):
        for j, p in enumerate(PERTURBATIONS):
            mismatch = table[n][p] != PAPER[n][p]
            text = (f"invariant\n{rel_max[n][p]:.0e}" if table[n][p]
                    else f"no\n\u2265 {rel_min[n][p]:.1g}")
            if mismatch:
                text += f"\npaper: {'invariant' if PAPER[n][p] else 'no'}"
                ax.add_patch(Rectangle(
                    (j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor="red", lw=3))
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="darkred" if mismatch else "black")
    ax.set_xticks(range(len(PERTURBATIONS)), [LABELS[p] for p in PERTURBATIONS], fontsize=8)
    ax.set_yticks(range(len(NORMS)), NORMS)
    ax.tick_params(length=0)
    ax.set_title("Measured invariance: relative output change, largest over the draws where "
                 "invariant, smallest where not; red frame = differs from the paper", fontsize=9)
    return fig
