"""The registry entries of torch's five norms (:mod:`normlab.registry`): their reductions, the
signatures of their functions and the torch classes normlab's modules stand in for."""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from . import _engine as E
from . import functional as F
from . import nn
from . import registry
from .registry import NormSpec, register


def _none(shape, arg) -> dict:
    return {}


def _rows(centered: bool):
    return lambda shape, normalized_shape: {"normalized_ndim": len(normalized_shape),
                                            "centered": centered}


def _bn_call(f, x, arg, weight, bias, eps, running_mean=None, running_var=None):
    return f(x, running_mean, running_var, weight, bias, True, 0.1, eps)


register(NormSpec(
    "batch_norm", "BatchNorm", E.batch_reduction, _none, "channels", None,
    "channel", True, 1e-5, F.batch_norm, _bn_call, TF.batch_norm,
    modules=((torch.nn.BatchNorm1d, nn.BatchNorm1d), (torch.nn.BatchNorm2d, nn.BatchNorm2d),
             (torch.nn.BatchNorm3d, nn.BatchNorm3d)),
    aliases=("BN", "batch"), running_stats=True, bytes=(3, 5, 6),
    summary="one statistic per channel, over the batch and every spatial position"))
register(NormSpec(
    "layer_norm", "LayerNorm", E.row_reduction, _rows(True), "rows",
    "normalized_shape", "normalized", True, 1e-5, F.layer_norm,
    lambda f, x, arg, weight, bias, eps, *running: f(x, arg, weight, bias, eps), TF.layer_norm,
    modules=((torch.nn.LayerNorm, nn.LayerNorm),), aliases=("LN", "layer"),
    residual_fn=F.add_layer_norm,
    summary="one statistic per leading index, over the trailing normalized_shape axes"))
register(NormSpec(
    "instance_norm", "InstanceNorm", E.instance_reduction, _none, "channels",
    None, "channel", True, 1e-5, F.instance_norm, _bn_call, TF.instance_norm,
    modules=((torch.nn.InstanceNorm1d, nn.InstanceNorm1d),
             (torch.nn.InstanceNorm2d, nn.InstanceNorm2d),
             (torch.nn.InstanceNorm3d, nn.InstanceNorm3d)),
    aliases=("IN", "instance"), running_stats=True,
    summary="one statistic per (sample, channel), over the spatial positions"))
register(NormSpec(
    "group_norm", "GroupNorm", E.group_reduction, lambda shape, groups: {"groups": groups},
    "channels", "num_groups", "channel", True,
    1e-5, F.group_norm, lambda f, x, arg, weight, bias, eps, *running: f(x, arg, weight, bias, eps),
    TF.group_norm, modules=((torch.nn.GroupNorm, nn.GroupNorm),), aliases=("GN", "group"),
    summary="one statistic per (sample, group of channels), over the group and every position"))
register(NormSpec(
    "rms_norm", "RMSNorm", E.row_reduction, _rows(False), "rows",
    "normalized_shape", "normalized", False, None, F.rms_norm,
    lambda f, x, arg, weight, bias, eps, *running: f(x, arg, weight, eps), TF.rms_norm,
    modules=((torch.nn.RMSNorm, nn.RMSNorm),), aliases=("RMS", "rms"),
    residual_fn=F.add_rms_norm, bytes=(2, 3, 1),
    summary="one mean square per leading index (no centering), over the trailing axes"))

# the drop-ins that torch.jit.script compiles with torch's functions (normlab.nn._script)
nn._script.DROPINS.update(ours for spec in registry.norms()
                          for theirs, ours in spec.modules if theirs is not None)
