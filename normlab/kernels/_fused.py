r"""What the fused-kernel backends (``cpu``, ``triton``) share: autograd for their operators, an
eager path that skips the dispatcher, second derivatives, and the backend object.

A fused backend registers three :mod:`torch.library` custom operators of one signature family,
a norm given as ``normalized_ndim, groups, centered`` (:mod:`._plan`):

``norm(x, weight, bias, mean, var, normalized_ndim, groups, centered, eps) -> (y, stats)``
    With ``mean``/``var`` given (per channel), x is normalized by them (BatchNorm and
    InstanceNorm in eval). ``stats`` is whatever the backend saves for its backward, one column
    per statistics set.
``norm_backward(dy, dh, x, weight, stats, normalized_ndim, groups, centered, input_stats,``
``need_dx) -> (dx, dweight, dbias)``, with ``dh`` an extra gradient reaching x (the residual
    output of the add variant) or None.
``add_norm(x, residual, weight, bias, normalized_ndim, centered, eps) -> (y, h, stats)``
    ``h = x + residual`` and ``y = norm(h)`` for the row norms, one pass.

:class:`Ops` registers their autograd (a first derivative through ``norm_backward``; a second,
under ``create_graph=True``, through the reference engine's differentiable formulas) and builds
eager :class:`torch.autograd.Function` twins that call the operators' Python bodies directly:
``torch.compile`` sees the registered operators, eager calls skip the dispatcher round trip.
:class:`FusedBackend` maps the backend interface (:class:`normlab._dispatch.Backend`) onto the
operators and falls back to the reference engine for what the kernels do not take.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _engine as E
from . import _plan
from .reference import BACKEND as _REFERENCE
from .reference import normalize_given


def reference_forward(x, weight, bias, mean, var, normalized_ndim, groups, centered, eps):
    """The reference engine's (differentiable) forward of one fused operator call; ``mean``/
    ``var`` are the given statistics (flat, per channel) or None for batch statistics."""
    red = _plan.reduction(x.shape, normalized_ndim, groups, centered)
    if mean is None:
        return E.normalize(x, red, weight, bias, eps=eps)[0]
    return normalize_given(x, red, weight, bias, eps, mean, var)


class Ops:
    """Autograd and eager entry points for one backend's three operators.

    ``given(stats) -> (mean, var)`` reads, from a forward's ``stats``, the statistics the
    forward normalized by (used to recompute it differentiably for second derivatives when they
    were given)."""

    def __init__(self, norm, norm_backward, add_norm,
                 given: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.fwd, self.bwd, self.add, self.given = norm, norm_backward, add_norm, given
        norm.register_autograd(self._backward, setup_context=self._setup)
        add_norm.register_autograd(self._backward_add, setup_context=self._setup_add)
        self._eager_norm = _eager("EagerNorm", norm, self._setup, self._backward)
        self._eager_add = _eager("EagerAddNorm", add_norm, self._setup_add, self._backward_add)

    def norm(self, *args):
        """The forward operator: registered under ``torch.compile``; in eager mode its body,
        through the autograd Function only when a gradient can be needed."""
        if torch.compiler.is_compiling():
            return self.fwd(*args)
        if not _tracks_grad(args[:3]):
            return self.fwd._init_fn(*args)
        return self._eager_norm.apply(*args)

    def add_norm(self, *args):
        if torch.compiler.is_compiling():
            return self.add(*args)
        if not _tracks_grad(args[:4]):
            return self.add._init_fn(*args)
        return self._eager_add.apply(*args)

    def _bwd(self, ctx):
        return self.bwd._init_fn if getattr(ctx, "eager", False) else self.bwd

    # --- norm

    @staticmethod
    def _setup(ctx, inputs, output):
        x, weight, bias, mean, var, nd, groups, centered, eps = inputs
        _, stats = output
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.norm, ctx.eps, ctx.input_stats = (nd, groups, centered), eps, var is None
        ctx.mark_non_differentiable(stats)

    def _backward(self, ctx, dy, _dstats):
        x, weight, bias, stats = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference formulas
            mean, var = (None, None) if ctx.input_stats else self.given(stats)
            inputs = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3]) if need]
            with torch.enable_grad():
                y = reference_forward(x, weight, bias, mean, var, *ctx.norm, ctx.eps)
                grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True,
                                                 allow_unused=True))
            return tuple(next(grads) if n else None for n in ctx.needs_input_grad[:3]) \
                + (None,) * 6
        dx, dw, db = self._bwd(ctx)(dy, None, x, weight, stats, *ctx.norm, ctx.input_stats,
                                    need_x)
        return (dx if need_x else None,
                dw.reshape(weight.shape).to(weight.dtype) if need_w else None,
                db.reshape(bias.shape).to(bias.dtype) if need_b else None,
                None, None, None, None, None, None)

    # --- residual add + norm

    @staticmethod
    def _setup_add(ctx, inputs, output):
        x, residual, weight, bias, nd, centered, eps = inputs
        _, h, stats = output
        ctx.save_for_backward(x, residual, h, weight, bias, stats)
        ctx.norm, ctx.eps = (nd, 0, centered), eps
        if x.requires_grad or residual.requires_grad:
            ctx.mark_non_differentiable(stats)
        else:  # h = x + residual does not depend on the parameters
            ctx.mark_non_differentiable(stats, h)

    def _backward_add(self, ctx, dy, dh, _dstats):
        x, residual, h, weight, bias, stats = ctx.saved_tensors
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference formulas
            inputs = [t for t, n in zip((x, residual, weight, bias), ctx.needs_input_grad[:4])
                      if n]
            with torch.enable_grad():
                hh = x + residual
                y = reference_forward(hh, weight, bias, None, None, *ctx.norm, ctx.eps)
                grads = iter(torch.autograd.grad((y, hh), inputs, (dy, dh), create_graph=True,
                                                 allow_unused=True))
            return tuple(next(grads) if n else None for n in ctx.needs_input_grad[:4]) \
                + (None,) * 3
        dx, dw, db = self._bwd(ctx)(dy, dh, h, weight, stats, *ctx.norm, True, need_x or need_r)
        return (dx if need_x else None, dx if need_r else None,
                dw.reshape(weight.shape).to(weight.dtype) if need_w else None,
                db.reshape(bias.shape).to(bias.dtype) if need_b else None, None, None, None)


def _tracks_grad(tensors) -> bool:
    """Whether autograd records a call on these inputs: grad mode on and one of them needs a
    gradient (an autograd.Function costs about 20 us a call even when nothing does)."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def _eager(name, op, setup_context, backward):
    """An autograd.Function running ``op``'s Python body with the same setup and backward as its
    registration, for eager calls: it skips the dispatcher round trip of the registered
    operator (which ``torch.compile`` sees and ``opcheck`` tests)."""

    def forward(ctx, *inputs):
        out = op._init_fn(*inputs)
        setup_context(ctx, inputs, out)
        ctx.eager = True
        return out

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


class FusedBackend:
    """The backend interface on one set of fused operators.

    ``runs(x)``: whether the kernels take x (else the reference engine computes the call).
    ``fuses_add(x, residual)``: whether the one-pass add + norm operator takes the pair (else
    the add, then the norm). ``batch_stats(stats) -> (mean, biased var)`` of a batch-statistics
    forward, flat, in the order of its statistics sets. ``update_running(stats, running_mean,
    running_var, count, momentum) -> bool``: an optional fast BatchNorm running-statistics
    update (False: not taken, the engine's :func:`~normlab._engine.update_running_stats` runs)."""

    def __init__(self, name: str, ops: Ops, runs: Callable[[torch.Tensor], bool],
                 fuses_add: Callable[[torch.Tensor, torch.Tensor], bool],
                 batch_stats: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 update_running: Callable[..., bool] | None = None):
        self.name, self.ops, self.runs, self.fuses_add = name, ops, runs, fuses_add
        self.batch_stats, self.update_running = batch_stats, update_running

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        if not self.runs(x):
            return _REFERENCE.layer_norm(x, normalized_shape, weight, bias, eps)
        return self.ops.norm(x, weight, bias, None, None, len(normalized_shape), 0, True, eps)[0]

    def rms_norm(self, x, normalized_shape, weight, eps):
        if not self.runs(x):
            return _REFERENCE.rms_norm(x, normalized_shape, weight, eps)
        return self.ops.norm(x, weight, None, None, None, len(normalized_shape), 0, False, eps)[0]

    def group_norm(self, x, num_groups, weight, bias, eps):
        if not self.runs(x):
            return _REFERENCE.group_norm(x, num_groups, weight, bias, eps)
        return self.ops.norm(x, weight, bias, None, None, 0, num_groups, True, eps)[0]

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        if not self.runs(x):
            return _REFERENCE.batch_norm(
                x, running_mean, running_var, weight, bias, training, momentum, eps
            )
        if not training:
            return self.ops.norm(x, weight, bias, running_mean, running_var, 0, 0, True, eps)[0]
        y, stats = self.ops.norm(x, weight, bias, None, None, 0, 0, True, eps)
        if running_mean is None and running_var is None:
            return y
        count = x.numel() // x.shape[1]
        if self.update_running is None or not self.update_running(
                stats, running_mean, running_var, count, momentum):
            mean, var = self.batch_stats(stats)
            E.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return y

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats,
                      momentum, eps):
        if not self.runs(x):
            return _REFERENCE.instance_norm(
                x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
            )
        if not x.is_contiguous():  # torch's InstanceNorm output is contiguous (E.output_like)
            x = x.contiguous()
        if not use_input_stats:  # the given statistics are per channel, as BatchNorm's
            return self.ops.norm(x, weight, bias, running_mean, running_var, 0, 0, True, eps)[0]
        n, c = x.shape[:2]
        y, stats = self.ops.norm(x, weight, bias, None, None, 0, c, True, eps)
        if running_mean is not None or running_var is not None:
            mean, var = self.batch_stats(stats)
            E.update_running_stats(running_mean, running_var, mean.view(n, c).mean(0),
                                   var.view(n, c).mean(0), x.numel() // (n * c), momentum)
        return y

    def _add(self, x, residual, ndim, centered, weight, bias, eps):
        if self.runs(x) and self.fuses_add(x, residual):
            y, h, _ = self.ops.add_norm(x, residual, weight, bias, ndim, centered, eps)
            return y, h
        # otherwise: h is rounded to its dtype before it is normalized, as unfused
        h = x + residual
        shape = tuple(h.shape[h.dim() - ndim:])
        if centered:
            return self.layer_norm(h, shape, weight, bias, eps), h
        return self.rms_norm(h, shape, weight, eps), h

    def add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        return self._add(x, residual, len(normalized_shape), True, weight, bias, eps)

    def add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        return self._add(x, residual, len(normalized_shape), False, weight, None, eps)

    def normalize(self, x, red, weight, bias, eps):
        """A norm beyond torch's five (:mod:`normlab.registry`): the reference engine."""
        return _REFERENCE.normalize(x, red, weight, bias, eps)
