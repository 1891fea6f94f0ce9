"""Small models and the training loop shared by the lab's image experiments.

* :func:`make_cnn`: a three-stage CNN for small images (the 8x8 digits), with any of the five
  normalizations after each convolution, all from :mod:`normlab.nn` (:func:`make_norm`), and
  optionally a normalized hidden fully connected layer before the classifier.
* :func:`train_classifier`: SGD with momentum and a cosine learning rate over a fixed number of
  epochs, seeded; returns each member's loss history and validation error.
* :func:`error_rates`: each member's classification error on a set, in eval mode;
  :func:`mean_se`: the mean of several runs' errors and its standard error.
* :func:`threads`: the block runs with :data:`THREADS` intra-op threads (restored after).

**Members.** On a CPU, training a small CNN at batch 2 costs a fixed overhead per step (the
Python and operator calls), not arithmetic. ``make_cnn(norm, ..., members=K)`` therefore builds
K independent copies of the CNN side by side in one model: member ``k`` owns channels
``[k*C, (k+1)*C)`` of every layer, each convolution has ``groups=K``, and every norm computes
exactly the per-member statistics (BatchNorm per channel; GroupNorm(G) of a member is
GroupNorm(K*G) of the whole, whose groups are consecutive channels; LayerNorm is
GroupNorm(K, K*C); InstanceNorm per channel). ``make_cnn([norm_0, norm_1, ...])`` gives each
member its own norm (:class:`MemberNorms`: each run of equal names normalizes its own slice of
the channels). :func:`train_classifier` feeds each member its own shuffling of the data and sums
the members' losses, and SGD, momentum and weight decay act elementwise, so the members train
exactly as separate runs with their own initializations and data orders would (checked in
``tests/test_lab_images.py``), for a fraction of the price. The lab uses them as seeds, and in
the batch-size experiment for the five norms too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from typing import Iterator, Sequence

import torch
from torch import nn

import normlab.nn as nlnn

NORMS = ("BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm", "None")

#: Intra-op threads for the lab's training runs. One: every operation here is tiny (a batch of
#: 2 to 32 8x8 images), too small to split, and on a shared machine a second thread turns each
#: operation into a wait for a descheduled thread (measured on the 2-core VM under load: 16
#: BatchNorm CNN steps in 0.11-0.14 s with one thread, 3.3-7.1 s with two).
THREADS = 1


@contextlib.contextmanager
def threads(n: int | None = None) -> Iterator[int]:
    """Run the block with ``n`` torch (and so normlab/Numba) intra-op threads, restoring the
    previous count afterwards; ``None`` means :data:`THREADS`. Yields the count."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS if n is None else max(1, n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def make_norm(norm: str, channels: int, groups: int = 8, members: int = 1) -> nn.Module:
    """One normalization layer over ``members`` side-by-side sets of ``channels`` feature maps,
    from :mod:`normlab.nn`.

    Each has a learned per-channel scale and shift (as in the GroupNorm paper, Figure 2):

    * ``"BatchNorm"``: ``BatchNorm2d(C)``, statistics per channel over the batch and the pixels;
      running statistics in eval mode.
    * ``"GroupNorm"``: ``GroupNorm(groups, C)``.
    * ``"LayerNorm"``: ``GroupNorm(1, C)``, i.e. LayerNorm over ``(C, H, W)`` with a per-channel
      affine: the GroupNorm paper's LN. (``normlab.nn.LayerNorm((C, H, W))`` normalizes
      identically but learns one scale per *element*, tied to the image size.)
    * ``"InstanceNorm"``: ``InstanceNorm2d(C, affine=True)``: statistics per (sample, channel)
      in training and eval alike (no running statistics).
    * ``"None"``: the identity (the convolutions then keep their bias).
    """
    k = members
    if norm == "BatchNorm":
        return nlnn.BatchNorm2d(k * channels)
    if norm == "GroupNorm":
        return nlnn.GroupNorm(k * groups, k * channels)
    if norm == "LayerNorm":
        return nlnn.GroupNorm(k, k * channels)
    if norm == "InstanceNorm":
        return nlnn.InstanceNorm2d(k * channels, affine=True)
    if norm == "None":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class MemberNorms(nn.Module):
    """Different norms side by side: ``parts[i]`` normalizes the next ``sizes[i]`` channels."""

    def __init__(self, parts: list[nn.Module], sizes: list[int]):
        super().__init__()
        self.parts, self.sizes = nn.ModuleList(parts), sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(chunk) for part, chunk in zip(self.parts,
                                                               x.split(self.sizes, dim=1))], 1)


def member_norms(norms: Sequence[str], channels: int, groups: int = 8) -> nn.Module:
    """The norm layer of a model whose member ``k`` uses ``norms[k]``: one module per run of
    equal names (see :func:`make_norm`), side by side when there are several."""
    runs = [(name, len(list(run))) for name, run in itertools.groupby(norms)]
    parts = [make_norm(name, channels, groups, members=count) for name, count in runs]
    if len(parts) == 1:
        return parts[0]
    return MemberNorms(parts, [count * channels for _, count in runs])


def make_cnn(norm: str | Sequence[str], classes: int, in_channels: int = 1, width: int = 32,
             groups: int = 8, members: int = 1, hidden: int | None = None,
             stages: int = 3) -> nn.Sequential:
    """A CNN for small images: three (``stages``) ``conv3x3 -> norm -> ReLU`` stages of ``width``
    channels, a 2x2 max-pool after the first two, and a linear classifier on the last 2x2
    feature maps (a 2x2 convolution, so that members stay separate).

    On the 8x8 digits the three stages see 8x8, 4x4 and 2x2 feature maps: like the 7x7 last
    stage of a ResNet on ImageNet, the last stage gives BatchNorm few values per channel at a
    small batch (2 x 2 x 2 = 8 at batch 2). The classifier sees the 2x2 maps themselves, not
    their average: after InstanceNorm a channel's spatial average carries almost nothing (the
    norm removes it). Other image sizes are average-pooled to 2x2 first.
    ``norm`` is one of :data:`NORMS` (see :func:`make_norm`); ``groups`` is GroupNorm's G and
    must divide ``width``.

    ``stages`` (3 by default) sets the number of conv stages; with 2, the second stage's 4x4
    maps are max-pooled to 2x2 as before the third.

    With ``hidden=H`` the classifier is instead a small fully connected head: the 2x2 maps go
    to ``H`` hidden units (a 2x2 convolution), then the norm, a ReLU and a linear layer to the
    classes. A hidden unit has one value per image, so there BatchNorm estimates each unit's
    statistics from the batch alone (2 values at batch 2; BatchNorm1d in an MLP), GroupNorm
    from ``H / groups`` units of one image, LayerNorm from all ``H``; InstanceNorm, which would
    normalize a single value (and output its constant shift), leaves the head unnormalized.

    With ``members=K`` the model is K independent CNNs side by side (see the module
    docstring): input ``(N, K * in_channels, H, W)`` (see :func:`stack_members`), output
    ``(N, K * classes)``, member ``k``'s logits at ``[k * classes, (k+1) * classes)``. A list
    ``norm`` gives one member per entry, each with its own norm. The convolutions have a bias
    only when some member has no norm (in front of a norm a bias has no effect: the norm
    subtracts it again).

    >>> make_cnn("GroupNorm", 10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> make_cnn(["BatchNorm", "None", "None"], 10)(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 30])
    """
    norms = [norm] * members if isinstance(norm, str) else list(norm)
    if not isinstance(norm, str) and members not in (1, len(norms)):
        raise ValueError(f"members={members} but {len(norms)} norms given: give one of them")
    k, bias = len(norms), "None" in norms
    layers: list[nn.Module] = []
    c = in_channels
    for stage in range(stages):
        layers += [nn.Conv2d(k * c, k * width, 3, padding=1, groups=k, bias=bias),
                   member_norms(norms, width, groups), nn.ReLU(inplace=True)]
        if stage < 2:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        c = width
    layers.append(nn.AdaptiveAvgPool2d(2))
    if hidden:
        head = ["None" if n == "InstanceNorm" else n for n in norms]
        layers += [nn.Conv2d(k * width, k * hidden, 2, groups=k, bias="None" in head),
                   member_norms(head, hidden, groups), nn.ReLU(inplace=True),
                   nn.Conv2d(k * hidden, k * classes, 1, groups=k)]
    else:
        layers.append(nn.Conv2d(k * width, k * classes, 2, groups=k))
    layers.append(nn.Flatten())
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # He et al. 2015
    return model


def first(data, n: int | None):
    """``data`` with only its first ``n`` training images (all with None): the split is already
    shuffled, so they are a random subset. For the lab's tiny (test) mode."""
    if n is None or n >= len(data.x_train):
        return data
    return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])


def stack_members(xs: list[torch.Tensor]) -> torch.Tensor:
    """One input for a ``members=len(xs)`` model: member k's images ``xs[k]`` as channels."""
    return torch.cat(xs, dim=1)


@torch.no_grad()
def error_rates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, members: int = 1,
                batch_size: int = 500) -> list[float]:
    """Each member's fraction of ``(x, y)`` misclassified, in eval mode (BatchNorm uses its
    running statistics); the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros(members, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        logits = model(xb.repeat(1, members, 1, 1)).view(len(xb), members, -1)
        wrong += (logits.argmax(2) != yb[:, None]).sum(0)
    model.train(was_training)
    return (wrong.double() / len(x)).tolist()


def mean_se(errors: list[float], n: int) -> tuple[float, float]:
    """The mean of ``errors`` (error rates of independent runs, each measured on ``n`` images)
    and its standard error: the spread between the runs, or where that is smaller (a single run,
    or runs that happen to agree) the binomial error of counting mistakes among ``k * n``
    images, ``sqrt(p (1 - p) / (k n))``."""
    k = len(errors)
    p = sum(errors) / k
    seeds = (sum((e - p) ** 2 for e in errors) / (k - 1) / k) ** 0.5 if k > 1 else 0.0
    return p, max(seeds, (max(p * (1 - p), 1 / n) / (k * n)) ** 0.5)


def train_classifier(model: nn.Module, data, *, batch_size: int, lr: float, epochs: int,
                     seed: int, members: int = 1, momentum: float = 0.9,
                     weight_decay: float = 5e-4, warmup: float = 0.0) -> dict:
    """Train ``model`` (of ``members`` members) on ``data`` (a
    :class:`~normlab.lab.datasets.ImageData`) with SGD and momentum, the learning rate following
    a cosine from ``lr`` to 0 over ``epochs`` epochs, after a linear warmup from 0 over the
    first ``warmup`` epochs (Goyal et al. 2017) if asked.

    Deterministic for ``seed``: each member's shuffling comes from one ``torch.Generator``;
    seed the initialization yourself (``torch.manual_seed``) before building the model. An
    epoch is ``len(train) // batch_size`` steps (the incomplete last batch is dropped: a batch
    of 1 cannot train BatchNorm).

    Returns ``{"history", "val_errors", "train_errors", "diverged"}``, lists with one entry per
    member: ``history[k]`` holds member k's mean training loss of each epoch, ``val_errors`` and
    ``train_errors`` its final classification errors (eval mode), and ``diverged[k]`` whether
    its loss turned non-finite (its errors are then set to 1.0; the other members train on,
    unaffected).
    """
    k = members
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay, foreach=True)
    n = len(data.x_train)
    steps = n // batch_size
    total, ramp = steps * epochs, max(1, round(warmup * steps))
    history = torch.zeros(epochs, k, dtype=torch.float64)
    step = 0
    model.train()
    for epoch in range(epochs):
        orders = [torch.randperm(n, generator=gen) for _ in range(k)]
        x_epoch = stack_members([data.x_train[o] for o in orders])  # batches are views of it
        y_epoch = torch.stack([data.y_train[o] for o in orders], 1)  # (n, members)
        for b in range(steps):
            x = x_epoch[b * batch_size:(b + 1) * batch_size]
            y = y_epoch[b * batch_size:(b + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total)) * (
                    min(1.0, (step + 1) / ramp))
            logits = model(x).view(-1, data.classes)
            losses = nn.functional.cross_entropy(logits, y.reshape(-1), reduction="none")
            losses = losses.view(-1, k).mean(0)  # each member's mean loss
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # the members are disjoint: each gets its own gradient
            opt.step()
            history[epoch] += losses.detach()
            step += 1
    history /= steps
    diverged = (~history.isfinite()).any(0).tolist()
    val = error_rates(model, data.x_val, data.y_val, k)
    train = error_rates(model, data.x_train, data.y_train, k)
    return {"history": [[v if math.isfinite(v) else None for v in h] for h in history.T.tolist()],
            "val_errors": [1.0 if d else e for e, d in zip(val, diverged)],
            "train_errors": [1.0 if d else e for e, d in zip(train, diverged)],
            "diverged": diverged}
