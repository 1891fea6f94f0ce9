"""Ioffe & Szegedy (2015), Figure 1: an MLP of sigmoids with and without BatchNorm; accuracy
against training steps, and the drift of one last-layer sigmoid's input distribution."""
from __future__ import annotations

import math

import torch
from torch import nn

import normlab.nn as nlnn

from .. import api, datasets, models

NAME = "sigmoid"
TITLE = "BatchNorm keeps a sigmoid's input distribution still"
DESCRIPTION = (
    "<p>Does BatchNorm make a sigmoid network train faster by keeping the distribution of each "
    "layer's inputs stable? Ioffe &amp; Szegedy (<i>Batch Normalization: Accelerating Deep "
    "Network Training by Reducing Internal Covariate Shift</i>, ICML 2015, Figure 1) trained a "
    "fully connected network with three hidden layers of 100 sigmoid units on MNIST (28x28), "
    "60 images per step, with and without BatchNorm before each sigmoid, and tracked the test "
    "accuracy and the 15th, 50th and 85th percentiles of one last-hidden-layer sigmoid's input. "
    "We train the same network (<code>normlab.nn.BatchNorm1d</code> before each sigmoid, "
    "plain SGD, small Gaussian initial weights, the same learning rate for both) on the 8x8 "
    "digits (64 inputs) and measure the same curves on the validation set (accuracy in eval "
    "mode; the sigmoid's input as training computes it, BatchNorm normalizing with the "
    "statistics of the batch, here the validation set).</p>")

PAPER = {
    "source": "Ioffe & Szegedy 2015, Figure 1 (MNIST, 3 x 100 sigmoid units, 60 per batch, "
              "50,000 steps)",
    "figure_1a": "test accuracy vs steps: 'the batch-normalized network enjoys the higher "
                 "test accuracy', ahead early and at the end",
    "figure_1bc": "15/50/85th percentiles of a sigmoid's input: drift in mean and spread over "
                  "training without BatchNorm, much steadier with it",
}

HIDDEN, LAYERS, BATCH = 100, 3, 60
INIT_STD = 0.1      # "small random Gaussian values" (the paper gives no number)
LR = 0.5            # plain SGD, the same for both networks
PERCENTILES = (15, 50, 85)
EARLY = 0.1         # "early in training": the first 10% of the steps
UNIT = 0            # the unit plotted; the claims use all units of the last hidden layer


def make_mlp(batch_norm: bool, inputs: int, classes: int) -> nn.Sequential:
    """``inputs -> 3 x [Linear(100) -> (BatchNorm1d) -> Sigmoid] -> Linear(classes)``, weights
    drawn from N(0, INIT_STD^2) and biases zero (no bias before a BatchNorm: its shift plays
    that part)."""
    layers: list[nn.Module] = []
    n = inputs
    for _ in range(LAYERS):
        layers.append(nn.Linear(n, HIDDEN, bias=not batch_norm))
        if batch_norm:
            layers.append(nlnn.BatchNorm1d(HIDDEN))
        layers.append(nn.Sigmoid())
        n = HIDDEN
    layers.append(nn.Linear(n, classes))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def _last_sigmoid_input(model: nn.Sequential) -> nn.Sequential:
    """The layers that compute the last hidden sigmoid's input (a view sharing parameters)."""
    last = max(i for i, m in enumerate(model) if isinstance(m, nn.Sigmoid))
    return model[:last]


@torch.no_grad()
def _measure(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Validation accuracy (eval mode: BatchNorm with its running statistics), and the 15/50/85th
    percentiles of every last-layer sigmoid's input over the validation set (a ``(3, HIDDEN)``
    tensor) as training computes it: BatchNorm normalizes with the statistics of the batch (here
    the validation set), not with running averages that lag behind."""
    model.eval()
    accuracy = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    bns = [m for m in model if isinstance(m, nn.BatchNorm1d)]
    saved = [{k: b.clone() for k, b in m.named_buffers()} for m in bns]
    z = _last_sigmoid_input(model)(x)
    for m, buffers in zip(bns, saved):  # this forward must not update the running statistics
        for k, b in buffers.items():
            getattr(m, k).copy_(b)
    q = torch.quantile(z, torch.tensor([p / 100 for p in PERCENTILES]), dim=0)
    return accuracy, q


def _train(data, batch_norm: bool, steps: int, points: int, seed: int) -> dict:
    """One training run: accuracy and the unit's percentiles at ``points + 1`` evenly spaced
    steps (0 included), and how far each unit's input distribution moved (:func:`_drift`)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, x_val = data.x_train.flatten(1), data.x_val.flatten(1)
    model = make_mlp(batch_norm, x_train.shape[1], data.classes)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    at = sorted({round(steps * i / points) for i in range(points + 1)})
    record_steps, accuracy, quantiles = [], [], []
    order, pos = torch.randperm(len(x_train), generator=gen), 0
    for step in range(steps + 1):
        if step in at:
            acc, q = _measure(model, x_val, data.y_val)
            record_steps.append(step)
            accuracy.append(acc)
            quantiles.append(q)
        if step == steps:
            break
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(x_train), generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        loss = loss_fn(model(x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    q = torch.stack(quantiles)  # (points + 1, 3, HIDDEN)
    return {"steps": record_steps, "val_accuracy": accuracy,
            "unit_percentiles": {str(p): q[:, i, UNIT].tolist() for i, p in enumerate(PERCENTILES)},
            **_drift(q)}


def _drift(q: torch.Tensor) -> dict:
    """Per unit, over the whole run (``q``: measurements x (15, 50, 85th percentile) x units):
    how far the median wandered (its range, max - min, in units of the unit's mean 15-85th
    percentile spread) and how much the spread changed (``|log(last / first spread)|``): the
    shift "both in its mean and the variance" of the paper's Fig. 1b-c."""
    median, spread = q[:, 1], (q[:, 2] - q[:, 0]).clamp_min(1e-12)
    return {"median_range": ((median.amax(0) - median.amin(0)) / spread.mean(0)).tolist(),
            "spread_change": (spread[-1] / spread[0]).log().abs().tolist()}


def _median(values: list[float]) -> float:
    return float(torch.tensor(values).median())


def _steps_to(accuracy: list[float], steps: list[int], level: float) -> int | None:
    return next((s for s, a in zip(steps, accuracy) if a >= level), None)


def run(ctx: api.Context) -> dict:
    data = datasets.images(ctx.data, seed=ctx.seed)
    steps = ctx.pick(tiny=60, quick=1500, full=5000)
    points = ctx.pick(tiny=6, quick=50, full=100)
    seeds = ctx.pick(tiny=1, quick=1, full=3)
    variants = {"without BatchNorm": False, "with BatchNorm": True}
    runs: dict[str, list[dict]] = {}
    with models.threads(), ctx.bar(len(variants) * seeds, "MLP of sigmoids") as bar:
        for label, bn in variants.items():
            runs[label] = []
            for s in range(seeds):
                key = f"{'bn' if bn else 'plain'}-steps{steps}-seed{s}"
                bar.describe(f"{label}, seed {s}")
                runs[label].append(ctx.cached(key, lambda: _train(data, bn, steps, points,
                                                                  ctx.seed_for(key))))
                bar.advance()

    record_steps = runs["without BatchNorm"][0]["steps"]
    metrics: dict = {"steps": record_steps, "seeds": seeds, "val_images": len(data.x_val),
                     "batch": BATCH, "lr": LR,
                     "init_std": INIT_STD, "unit": UNIT, "paper": PAPER}
    for label, rs in runs.items():
        acc = torch.tensor([r["val_accuracy"] for r in rs]).mean(0)
        metrics[label] = {
            "val_accuracy": acc.tolist(),
            "final_val_accuracy": acc[-1].item(),
            # per unit, averaged over seeds, then the median unit
            "median_range": _median(torch.tensor([r["median_range"] for r in rs]).mean(0)
                                    .tolist()),
            "spread_change": _median(torch.tensor([r["spread_change"] for r in rs]).mean(0)
                                     .tolist()),
            "unit_percentiles": rs[0]["unit_percentiles"],
        }
    claims = _claims(metrics, record_steps, steps)
    figures = [_plot_accuracy(ctx, metrics, record_steps), _plot_percentiles(ctx, metrics,
                                                                            record_steps)]
    return {"title": TITLE, "claims": claims, "metrics": metrics, "figures": figures}


def _claims(m: dict, record_steps: list[int], steps: int) -> list[dict]:
    plain, bn = m["without BatchNorm"], m["with BatchNorm"]
    early = next(i for i, s in enumerate(record_steps) if s >= EARLY * steps)
    a0, a1 = plain["val_accuracy"][early], bn["val_accuracy"][early]
    level = 0.9
    t0 = _steps_to(plain["val_accuracy"], record_steps, level)
    t1 = _steps_to(bn["val_accuracy"], record_steps, level)
    fmt = lambda t: "never" if t is None else f"step {t}"
    n = m["val_images"] * m["seeds"]  # standard error of a difference: counting mistakes
    se = lambda p0, p1: math.sqrt((p0 * (1 - p0) + p1 * (1 - p1)) / n)
    faster = a1 - a0 > 2 * se(a0, a1) and t1 is not None and (t0 is None or t1 < t0)
    f0, f1 = plain["final_val_accuracy"], bn["final_val_accuracy"]
    s_end = se(f0, f1)
    d0, d1 = plain["median_range"], bn["median_range"]
    c0, c1 = plain["spread_change"], bn["spread_change"]
    return [
        api.claim(
            "BatchNorm trains faster: higher accuracy early in training (paper, Fig. 1a).",
            faster,
            f"validation accuracy at step {record_steps[early]} ({EARLY:.0%} of training): "
            f"{a1:.3f} with BatchNorm vs {a0:.3f} without ({100 * (a1 - a0):+.1f} ± "
            f"{100 * se(a0, a1):.1f} points); {level:.0%} first reached at {fmt(t1)} with vs "
            f"{fmt(t0)} without (mean of {m['seeds']} seed(s); holds if ahead by more than two "
            f"standard errors and first to {level:.0%})."),
        api.claim(
            "BatchNorm ends at a higher accuracy (paper: 'the batch-normalized network "
            "enjoys the higher test accuracy').",
            f1 - f0 > 2 * s_end,
            f"final validation accuracy after {steps} steps: {f1:.3f} with BatchNorm vs "
            f"{f0:.3f} without ({100 * (f1 - f0):+.1f} ± {100 * s_end:.1f} points, "
            f"{'significant' if f1 - f0 > 2 * s_end else 'not significant'}: more than two "
            f"standard errors needed).",
            why=f"The digits are an easier task than MNIST at this size: both networks end "
                f"near {min(f0, f1):.0%}, and the gap the paper shows at the end (about a "
                f"point, read off its figure) is as large as the counting error of "
                f"{m['val_images']} validation images x {m['seeds']} seed(s) "
                f"(± {100 * s_end:.1f} points). BatchNorm's early lead, the claim above, is "
                f"the large effect; the full mode averages more seeds over longer runs."),
        api.claim(
            "A sigmoid's input distribution is more stable with BatchNorm (less internal "
            "covariate shift; paper, Fig. 1b-c).",
            d1 < 0.5 * d0 and c1 < 0.5 * c0,
            f"median over the {HIDDEN} last-layer units (each the mean of the seeds) of how far "
            f"a unit's input distribution moved over training: the range of its median, in "
            f"units of its 15-85th percentile spread, {d1:.2f} with BatchNorm vs {d0:.2f} "
            f"without; the change of the spread, |log(last / first)|, {c1:.2f} vs {c0:.2f} (a "
            f"factor {math.exp(c1):.1f} vs {math.exp(c0):.1f}). Holds if both are less than "
            f"half without BatchNorm's."),
    ]


def _plot_accuracy(ctx: api.Context, m: dict, record_steps: list[int]) -> str:
    fig, ax = api.figure(figsize=(6, 4))
    for label, color in (("without BatchNorm", "tab:gray"), ("with BatchNorm", "tab:blue")):
        ax.plot(record_steps, m[label]["val_accuracy"], label=label, color=color)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(max(0.0, min(min(m[k]["val_accuracy"][1:]) for k in ("without BatchNorm",
                                                                     "with BatchNorm")) - 0.02),
                1.0)
    ax.set_title("Accuracy vs steps (cf. Ioffe & Szegedy 2015, Fig. 1a)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ctx.save_figure(fig, "accuracy")


def _plot_percentiles(ctx: api.Context, m: dict, record_steps: list[int]) -> str:
    fig, axes = api.figure(1, 2, figsize=(10, 4), sharey=True)
    for ax, label in zip(axes, ("without BatchNorm", "with BatchNorm")):
        q = m[label]["unit_percentiles"]
        for p, style in zip(PERCENTILES, (":", "-", ":")):
            ax.plot(record_steps, q[str(p)], style, color="tab:blue", label=f"{p}th percentile")
        ax.set_title(f"{label}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"input to last-layer sigmoid {UNIT}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("One sigmoid's input over training (cf. Fig. 1b, c)")
    return ctx.save_figure(fig, "percentiles")
