"""Loss-landscape measurements along the gradient and internal covariate shift, as defined by
Santurkar, Tsipras, Ilyas & Madry (2018, "How Does Batch Normalization Help Optimization?"):
the measurements of the lab's ``smoothness`` experiment (:mod:`.experiments.smoothness`).

Each takes a loss as a function of a list of parameter tensors (:data:`LossOf`;
:func:`model_loss` makes one of a model and a batch), so the tests check them on quadratics
with known answers.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as TF
from torch import nn

LossOf = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def loss_and_grad(loss_of: LossOf, params: Sequence[torch.Tensor]
                  ) -> tuple[float, list[torch.Tensor]]:
    """The loss at ``params`` and its gradient with respect to each of them."""
    leaves = [p.detach().requires_grad_() for p in params]
    loss = loss_of(leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.item(), [g.detach() for g in grads]


def along_gradient(loss_of: LossOf, params: Sequence[torch.Tensor], etas: Sequence[float], *,
                   loss0: float | None = None, grads: Sequence[torch.Tensor] | None = None
                   ) -> dict:
    """Santurkar et al.'s Fig. 4 measurements at ``params``: move along the gradient ``g`` to
    ``w - eta * g`` for each step size ``eta`` and record the loss and the gradient there.

    Returns ``losses`` and ``grad_dists`` (``||grad(w') - grad(w)||``) per eta, and the
    summaries ``loss_range`` (max - min of ``losses``: the landscape's variation, Fig. 4a),
    ``grad_pred`` (the largest ``grad_dists``: gradient predictiveness, Fig. 4b) and ``beta``
    (the largest ``||grad(w') - grad(w)|| / ||w' - w||``: effective beta-smoothness, Fig. 4c).
    On ``0.5 w^T A w``, ``beta`` is ``||A g|| / ||g||``: A's eigenvalue when g is an eigenvector.
    """
    if grads is None or loss0 is None:
        loss0, grads = loss_and_grad(loss_of, params)
    g = _flat(grads)
    g_norm = g.norm().item()
    losses, dists, betas = [], [], []
    for eta in etas:
        moved = [p.detach() - eta * gi for p, gi in zip(params, grads)]
        loss, grads_there = loss_and_grad(loss_of, moved)
        dist = (_flat(grads_there) - g).norm().item()
        losses.append(loss)
        dists.append(dist)
        betas.append(dist / (eta * g_norm) if g_norm > 0 else 0.0)
    return {"loss": loss0, "grad_norm": g_norm, "etas": list(etas), "losses": losses,
            "grad_dists": dists, "betas": betas, "loss_range": max(losses) - min(losses),
            "grad_pred": max(dists), "beta": max(betas)}


def ics(loss_of: LossOf, params: Sequence[torch.Tensor], updated: Sequence[torch.Tensor],
        index: int, grad: torch.Tensor | None = None) -> dict:
    """Internal covariate shift of parameter ``index`` (Santurkar et al., Sec. 2.2): G, the
    gradient of ``params[index]`` at ``params``, against G', the same gradient after the
    parameters before it took their update (``updated[:index] + params[index:]``).

    Returns ``l2`` (``||G - G'||``), ``rel_l2`` (that over ``||G||``) and ``cosine``.
    """
    if grad is None:
        grad = loss_and_grad(loss_of, params)[1][index]
    mixed = [p.detach() for p in updated[:index]] + [p.detach() for p in params[index:]]
    leaf = mixed[index].requires_grad_()
    (g2,) = torch.autograd.grad(loss_of(mixed), [leaf])
    g1, g2 = grad.reshape(-1), g2.detach().reshape(-1)
    l2 = (g1 - g2).norm().item()
    n1, n2 = g1.norm().item(), g2.norm().item()
    return {"l2": l2, "rel_l2": l2 / n1 if n1 > 0 else 0.0,
            "cosine": (g1 @ g2).item() / (n1 * n2) if n1 > 0 and n2 > 0 else 1.0}


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LossOf:
    """The cross-entropy of ``model`` on ``(x, y)`` as a function of its parameters (in
    ``model.parameters()`` order), in the model's current mode. BatchNorm normalizes with the
    batch's statistics; its running statistics are updated on copies, never the model's."""
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss_of(params):
        out = torch.func.functional_call(model, {**dict(zip(names, params)), **buffers}, (x,))
        return TF.cross_entropy(out, y)
    return loss_of
