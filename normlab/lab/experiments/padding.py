"""Padded variable-length sequences poison BatchNorm's statistics: naive BatchNorm1d against
MaskedBatchNorm1d and the per-token LayerNorm and RMSNorm, at growing padded fractions."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ... import functional as NF
from ... import nn as nlnn
from ...nn.masked import MaskedBatchNorm1d
from ..api import Context, claim, figure

NAME = "padding"
TITLE = "Padding poisons BatchNorm's statistics: masked BatchNorm and per-token norms"
DESCRIPTION = (
    "<p>Does zero padding in a batch of variable-length sequences hurt BatchNorm (Ioffe &amp; "
    "Szegedy, 2015), and does taking its statistics over the real tokens only fix it? Sequence "
    "models mostly use per-token norms instead, LayerNorm (Ba, Kiros &amp; Hinton, 2016) or "
    "RMSNorm (Zhang &amp; Sennrich, 2019); Shen et al. (<i>PowerNorm: Rethinking Batch "
    "Normalization in Transformers</i>, 2020) trace BatchNorm's trouble in NLP to its batch "
    "statistics. The task (synthetic, generated on the fly): each token holds 8 intensities "
    "around a common level far from zero, <i>x<sub>t</sub> = o + A s + noise</i> with "
    "<i>o</i> = 5 in every feature (as energies or counts have; the padding after a sequence's "
    "end is the zero vector) and a per-sequence latent <i>s</i> along two fixed positive "
    "profiles <i>u<sub>1</sub>, u<sub>2</sub></i>; the label (4 classes) says whether the mean "
    "of the sequence's real tokens lies above or below the common level along each profile, a "
    "calibrated-threshold decision. The model: conv1d(k=5) &rarr; norm &rarr; ReLU &rarr; "
    "conv1d(k=5) &rarr; norm &rarr; ReLU &rarr; mean over the real tokens &rarr; linear, the "
    "positions after the end zeroed after each block whatever the norm, trained with Adam. "
    "Batches are bucketed by length (one length per batch, drawn from 8 to 24 tokens) and "
    "zero-padded to a static length &ell;/(1&minus;p), so the padded fraction of every batch "
    "is p (up to rounding) while the real data, the batches, their order and the "
    "initialization are the same for every p: only the padding changes. Naive BatchNorm1d "
    "takes its statistics over every position, <code>normlab.nn.MaskedBatchNorm1d</code> over "
    "the real ones. The mechanism: naive BatchNorm normalizes with the statistics of a "
    "real/padding mixture, its mean pulled towards the padding's value by p times the gap "
    "and its variance changed to (1&minus;p)&sigma;&sup2; + p(1&minus;p)gap&sup2;, so the real "
    "tokens leave the norm off-centre (by up to &radic;(p/(1&minus;p)) standard units) and "
    "mis-scaled, and the ReLU after it sees them mostly on one side; the channels that carry "
    "the label are the ones far from the padding. In eval mode BatchNorm normalizes every "
    "position with its running statistics, so the padding of the <i>test</i> batches cannot "
    "matter, and the running statistics match the batch statistics the model was trained with "
    "(the measured batch-to-running distance stays small): the harm is done in training, "
    "where the shift has to be unlearned by the affine parameters and the convolutions (with "
    "longer training they partly do: the gap narrows). We report test accuracy per norm and "
    "p, and for naive BatchNorm the distance of its batch "
    "statistics from the real tokens' statistics (mean gap in real-token standard deviations "
    "plus |log| of the standard-deviation ratio, averaged over channels and both layers), from "
    "its running statistics, and how far off-centre the real tokens come out. LayerNorm and "
    "RMSNorm are exactly padding-independent here, but they also remove each token's overall "
    "level, which this task's label depends on: their accuracy is lower at every p.</p>"
)

NORMS = ("BatchNorm", "MaskedBatchNorm", "LayerNorm", "RMSNorm")
PAD_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
FEATURES, CLASSES, KERNEL = 8, 4, 5
LENGTHS = (8, 24)  # real lengths per batch, inclusive
OFFSET, LATENT = 5.0, 0.5  # token offset scale (the pad/real gap), latent scale A
MARGIN, FLAT = 0.05, 0.02  # accuracy margins of the claims


@dataclass(frozen=True)
class Setting:
    steps: int
    batch: int
    width: int
    test_batches: int
    seeds: int
    lr: float = 3e-3


def _setting(ctx: Context) -> Setting:
    return ctx.pick(
        tiny=Setting(steps=12, batch=16, width=8, test_batches=4, seeds=1),
        quick=Setting(steps=150, batch=32, width=32, test_batches=16, seeds=1),
        full=Setting(steps=300, batch=32, width=32, test_batches=64, seeds=3),
    )


# --- data


def _task(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens' common level ``o`` (D, 1) and the two label profiles ``u`` (2, D): unit
    vectors with positive entries, so the label-bearing features sit far from the padding."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.full((FEATURES, 1), OFFSET)
    u = torch.rand(2, FEATURES, generator=g) + 0.1
    return offset, u / u.norm(dim=1, keepdim=True)


def _batches(task, count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` unpadded batches ``(x (B, D, l), y (B,))``, one length l per batch."""
    offset, u = task
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(LENGTHS[0], LENGTHS[1] + 1, (), generator=g))
        s = torch.randn(batch, 2, generator=g) * LATENT
        x = torch.randn(batch, FEATURES, length, generator=g) + offset + (s @ u)[:, :, None]
        mean = torch.einsum("kd,bd->bk", u, (x - offset).mean(2))  # of the real tokens
        y = (mean[:, 0] > 0).long() * 2 + (mean[:, 1] > 0).long()
        out.append((x, y))
    return out


def _pad(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (B, D, l) to length round(l / (1 - p)); the mask marks the l real tokens."""
    length = x.shape[2]
    total = max(length, round(length / (1 - p)))
    mask = torch.zeros(x.shape[0], total, dtype=torch.bool)
    mask[:, :length] = True
    return torch.nn.functional.pad(x, (0, total - length)), mask


# --- model


class SequenceNet(torch.nn.Module):
    """conv -> norm -> ReLU -> conv -> norm -> ReLU -> masked mean -> linear, over (N, D, L)."""

    def __init__(self, norm: str, width: int):
        super().__init__()
        self.norm = norm
        self.conv1 = torch.nn.Conv1d(FEATURES, width, KERNEL, padding=KERNEL // 2, bias=False)
        self.conv2 = torch.nn.Conv1d(width, width, KERNEL, padding=KERNEL // 2, bias=False)
        self.norm1, self.norm2 = _make_norm(norm, width), _make_norm(norm, width)
        self.head = torch.nn.Linear(width, CLASSES)

    def _normalize(self, layer, h, mask):
        if self.norm == "MaskedBatchNorm":
            return layer(h, mask)
        if self.norm in ("LayerNorm", "RMSNorm"):  # each token over its channels
            return layer(h.transpose(1, 2)).transpose(1, 2)
        return layer(h)  # naive BatchNorm1d: every position, padding included

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None].to(x.dtype)
        h = torch.relu(self._normalize(self.norm1, self.conv1(x), mask)) * m
        h = torch.relu(self._normalize(self.norm2, self.conv2(h), mask)) * m
        return self.head(h.sum(2) / m.sum(2))


def _make_norm(norm: str, width: int) -> torch.nn.Module:
    if norm == "BatchNorm":
        return nlnn.BatchNorm1d(width)
    if norm == "MaskedBatchNorm":
        return MaskedBatchNorm1d(width)
    if norm == "LayerNorm":
        return nlnn.LayerNorm(width)
    if norm == "RMSNorm":
        return nlnn.RMSNorm(width)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


@contextlib.contextmanager
def one_thread():
    """One intra-op thread for the lab's tiny tensors (a second thread costs more than it
    saves, and far more on a shared machine); torch's count is restored afterwards. normlab's
    CPU kernels are called once first, because starting their thread pool resets torch's
    thread count."""
    NF.layer_norm(torch.zeros(1, 2), (2,))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- one run


def _train(norm: str, p: float, s: Setting, seed: int, data_seed: int) -> dict:
    task = _task(data_seed)
    train = _batches(task, s.steps, s.batch, data_seed + 1)
    test = _batches(task, s.test_batches, 64, data_seed + 2)
    torch.manual_seed(seed)
    model = SequenceNet(norm, s.width)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.lr, total_steps=s.steps)
    padded = total = 0
    model.train()
    for x, y in train:
        xp, mask = _pad(x, p)
        padded, total = padded + int((~mask).sum()), total + mask.numel()
        loss = torch.nn.functional.cross_entropy(model(xp, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for x, y in test:
            xp, mask = _pad(x, p)
            correct += int((model(xp, mask).argmax(1) == y).sum())
            count += len(y)
    result = {"accuracy": correct / count, "pad_fraction": padded / total,
              "final_loss": float(loss.detach())}
    if norm in ("BatchNorm", "MaskedBatchNorm"):
        result["stats"] = _statistics(model, train[-8:], p)
    return result


def _statistics(model: SequenceNet, batches, p: float) -> dict:
    """For each BatchNorm layer, on padded training batches in training mode (a copy of the
    model: its running statistics stay as trained): the distance of the statistics of all
    positions (what naive BatchNorm uses) from those of the real tokens, and of the batch
    statistics the layer uses from its running statistics."""
    model = copy.deepcopy(model).train()
    seen: dict[str, list] = {"norm1": [], "norm2": []}
    hooks = [getattr(model, name).register_forward_pre_hook(
        lambda mod, args, name=name: seen[name].append(args[0].detach())) for name in seen]
    masks = []
    with torch.no_grad():
        for x, _ in batches:
            xp, mask = _pad(x, p)
            masks.append(mask)
            model(xp, mask)
    for h in hooks:
        h.remove()
    out = {}
    for name, inputs in seen.items():
        layer = getattr(model, name)
        real_gap, running_gap, offcentre, squeeze = [], [], [], []
        for h, mask in zip(inputs, masks):
            h = h.double()
            everything = h.mean((0, 2)), h.var((0, 2), unbiased=False)
            real = h.transpose(1, 2)[mask]
            real = real.mean(0), real.var(0, unbiased=False)
            used = real if model.norm == "MaskedBatchNorm" else everything
            running = layer.running_mean.double(), layer.running_var.double()
            real_gap.append(_distance(everything, real))
            running_gap.append(_distance(used, running))
            # the real tokens after naive BatchNorm (before the affine): their mean and std
            offcentre.append(float(((real[0] - everything[0]).abs()
                                    / (everything[1] + layer.eps).sqrt()).mean()))
            squeeze.append(float(((real[1] + layer.eps) / (everything[1] + layer.eps)).sqrt()
                                 .mean()))
        mean = lambda v: sum(v) / len(v)
        out[name] = {"padded_vs_real": mean(real_gap), "batch_vs_running": mean(running_gap),
                     "real_offcentre": mean(offcentre), "real_std": mean(squeeze)}
    return out


def _distance(a, b) -> float:
    """Per-channel distance of statistics a = (mean, var) from b, averaged over channels:
    |mean gap| in b's standard deviations plus |log| of the standard-deviation ratio."""
    (ma, va), (mb, vb) = a, b
    sb = vb.clamp_min(1e-12).sqrt()
    return float(((ma - mb).abs() / sb + 0.5 * (va.clamp_min(1e-12) / vb.clamp_min(1e-12))
                  .log().abs()).mean())


# --- the experiment


def _key(p: float) -> str:
    return f"{p:g}"


def run(ctx: Context) -> dict:
    s = _setting(ctx)
    data_seed = ctx.seed_for("data")
    runs = [(norm, p, k) for p in PAD_FRACTIONS for norm in NORMS for k in range(s.seeds)]
    results = {}
    with one_thread(), ctx.bar(len(runs), "training") as bar:
        for norm, p, k in runs:
            key = f"{norm}-pad{_key(p)}-seed{k}"
            bar.describe(f"{norm}, padded fraction {p:g}, seed {k}")
            # One initialization seed per seed index, shared by every norm and p (common
            # random numbers: the curves differ by the padding and the norm, not by luck).
            results[norm, p, k] = ctx.cached(
                key, lambda norm=norm, p=p, k=k: _train(norm, p, s, ctx.seed_for(f"init{k}"),
                                                        data_seed))
            bar.advance()

    def avg(norm, p, get):
        return sum(get(results[norm, p, k]) for k in range(s.seeds)) / s.seeds

    accuracy = {n: {_key(p): avg(n, p, lambda r: r["accuracy"]) for p in PAD_FRACTIONS}
                for n in NORMS}
    measured = {_key(p): avg("BatchNorm", p, lambda r: r["pad_fraction"]) for p in PAD_FRACTIONS}
    stats = {}
    for n in ("BatchNorm", "MaskedBatchNorm"):
        stats[n] = {}
        for what in ("padded_vs_real", "batch_vs_running", "real_offcentre", "real_std"):
            stats[n][what] = {_key(p): avg(n, p, lambda r: sum(
                r["stats"][layer][what] for layer in ("norm1", "norm2")) / 2)
                for p in PAD_FRACTIONS}
    metrics = {
        "accuracy": accuracy,
        "pad_fraction_measured": measured,
        "statistics": stats,
        "bn_stat_distance": stats["BatchNorm"]["padded_vs_real"],
        "bn_batch_vs_running": stats["BatchNorm"]["batch_vs_running"],
        "setting": {"steps": s.steps, "batch": s.batch, "width": s.width, "seeds": s.seeds,
                    "test_sequences": s.test_batches * 64, "lengths": list(LENGTHS)},
    }
    return {"title": TITLE, "claims": _claims(accuracy, stats), "metrics": metrics,
            "figures": [_figure(ctx, accuracy, stats)]}


def _claims(accuracy, stats) -> list[dict]:
    keys = [_key(p) for p in PAD_FRACTIONS]
    first, last = keys[0], keys[-1]
    bn, mbn = accuracy["BatchNorm"], accuracy["MaskedBatchNorm"]
    fmt = lambda row: ", ".join(f"p={k}: {row[k]:.3f}" for k in keys)
    drop = bn[first] - bn[last]
    monotone = all(bn[b] <= bn[a] + FLAT for a, b in zip(keys, keys[1:]))
    masked_flat = min(mbn[k] for k in keys) >= mbn[first] - FLAT
    gap = mbn[last] - bn[last]
    claims = [claim(
        f"Naive BatchNorm's accuracy falls as padding grows (by at least {MARGIN:.2f} at "
        f"p={last}, never rising by more than {FLAT}), while MaskedBatchNorm's does not (within "
        f"{FLAT}) and beats it by at least {MARGIN:.2f} at p={last}",
        drop >= MARGIN and monotone and masked_flat and gap >= MARGIN,
        f"BatchNorm: {fmt(bn)} (drop {drop:+.3f}); MaskedBatchNorm: {fmt(mbn)}; gap at "
        f"p={last}: {gap:+.3f}")]
    dist = stats["BatchNorm"]["padded_vs_real"]
    running = stats["BatchNorm"]["batch_vs_running"]
    rising = all(dist[b] > dist[a] for a, b in zip(keys, keys[1:]))
    off = stats["BatchNorm"]["real_offcentre"]
    claims.append(claim(
        "Naive BatchNorm's batch statistics drift from the real tokens' statistics as the "
        "padded fraction grows",
        rising and dist[first] < 0.01,
        "distance of the padded-batch statistics from the real tokens' (mean gap in real "
        f"standard deviations + |log std ratio|, both layers): {fmt(dist)}; the real tokens "
        f"after naive BatchNorm sit off-centre by {fmt(off)} standard units; batch-to-running "
        f"distance (what eval mode changes): {fmt(running)}"))
    spread = {n: max(abs(accuracy[n][k] - accuracy[n][first]) for k in keys)
              for n in ("LayerNorm", "RMSNorm")}
    claims.append(claim(
        f"Per-token norms (LayerNorm, RMSNorm) are unaffected by padding (accuracy within "
        f"{FLAT} of p=0 at every p)",
        all(v <= FLAT for v in spread.values()),
        f"LayerNorm: {fmt(accuracy['LayerNorm'])}; RMSNorm: {fmt(accuracy['RMSNorm'])}; "
        f"largest change {max(spread.values()):.3f}"))
    return claims


def _figure(ctx: Context, accuracy, stats) -> str:
    keys = [_key(p) for p in PAD_FRACTIONS]
    fig, (left, right) = figure(1, 2, figsize=(11, 4))
    for norm, marker, ls in zip(NORMS, "osD^", ("-", "-", "-", "--")):  # RMS may hide LN
        left.plot(PAD_FRACTIONS, [accuracy[norm][k] for k in keys], marker=marker, ls=ls,
                  label=norm)
    left.set_xlabel("padded fraction of each training batch")
    left.set_ylabel("test accuracy")
    left.set_title("Accuracy vs padding")
    left.set_xticks(PAD_FRACTIONS)
    left.grid(alpha=0.3)
    left.legend()
    bn = stats["BatchNorm"]
    right.plot(PAD_FRACTIONS, [bn["padded_vs_real"][k] for k in keys], marker="o",
               label="naive BN: padded batch vs real tokens")
    right.plot(PAD_FRACTIONS, [bn["real_offcentre"][k] for k in keys], marker="^",
               label="naive BN: real tokens' off-centre (std units)")
    right.plot(PAD_FRACTIONS, [bn["batch_vs_running"][k] for k in keys], marker="s",
               label="naive BN: batch vs running")
    right.plot(PAD_FRACTIONS, [stats["MaskedBatchNorm"]["batch_vs_running"][k] for k in keys],
               marker="x", ls="--", label="MaskedBN: batch vs running")
    right.set_xlabel("padded fraction")
    right.set_ylabel("distance (mean gap / std + |log std ratio|)")
    right.set_title("BatchNorm statistics vs padding")
    right.set_xticks(PAD_FRACTIONS)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return ctx.save_figure(fig, "accuracy-statistics")
