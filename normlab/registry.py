r"""The one list of normalizations: each norm declared once, as a :class:`NormSpec`.

Everything that iterates over norms reads this registry: :func:`normlab.patch` (which torch
class has which normlab twin), :func:`normlab.tools.swap_norms` (what a module's constructor
takes), the benchmarks, the lab's axes figures, :mod:`normlab.lab.explain` and the tests'
conformance checks. A name is found under any of its spellings (:func:`get`: ``"layer_norm"``,
``"LayerNorm"``, ``"layernorm"``, ``"LN"``).

A norm is its :class:`~normlab._engine.Reduction` (which elements share a statistic) plus its
parameters. Declaring one (:func:`declare`) gives its function, its ``torch.nn.Module``, the ``reference``
backend (the engine computes any reduction; the fused backends fall back to it), the axes
figure, ``normlab explain`` and the conformance tests (``tests/test_registry.py``).
The walkthrough (``tests/test_registry.py::test_a_new_norm_through_the_registry``) does it for a
toy norm; :mod:`normlab.nn.zoo.scalenorm` does it for ScaleNorm (Nguyen & Salazar, 2019),
:math:`y = g\,x/\max(\lVert x\rVert, \epsilon)`, in one file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import _checks
from . import _engine as E
from ._dispatch import get_backend, wrapped

__all__ = ["NormSpec", "declare", "register", "unregister", "get", "norms", "names",
           "functional", "module"]

INPUTS = ("channels", "rows")  # (N, C, *) inputs / trailing ``normalized_shape`` axes
PARAMS = ("channel", "normalized", "scalar")  # (C,) / normalized_shape / (1,)


@dataclass(frozen=True)
class NormSpec:
    """One normalization, declared once.

    Attributes:
        name: the functional's name and the registry key (``"layer_norm"``).
        title: the usual name (``"LayerNorm"``), in figures and reports.
        engine: the :mod:`normlab._engine` function that builds the norm's
            :class:`~normlab._engine.Reduction` for an input shape (``row_reduction``).
        engine_args: ``engine_args(shape, arg) -> dict``, the engine function's other
            arguments, where ``arg`` is the norm's one argument (``normalized_shape``,
            ``num_groups`` or None): :meth:`reduction` is ``engine(shape, **engine_args(...))``.
        input: ``"channels"`` (``(N, C, *)`` input) or ``"rows"`` (``(*, *normalized_shape)``).
        arg: the name of that argument (``"normalized_shape"``, ``"num_groups"``) or None.
        params: the affine parameters' shape: ``"channel"`` (C,), ``"normalized"``
            (``normalized_shape``) or ``"scalar"`` (1,).
        bias: whether the norm has a bias (:math:`\beta`).
        eps: the default eps (None: the compute dtype's machine epsilon, as RMSNorm's).
        fn: normlab's function; ``call(fn, ...)`` calls it.
        call: ``call(fn, x, arg, weight, bias, eps[, running_mean, running_var])`` calls a
            function of the norm's signature in training mode (``fn`` normlab's or torch's;
            the running statistics, for the norms that keep them, are updated).
        torch_fn: torch's function of the same signature, or None.
        oracle: a float64 formula in plain torch ops, ``oracle(x, arg, weight, bias, eps)``,
            the conformance tests' reference when there is no ``torch_fn``.
        modules: ``(torch class or None, normlab class)`` pairs: ``patch`` switches the first
            to the second.
        aliases: other spellings (abbreviations: ``"LN"``).
        residual_fn: normlab's residual-add variant (``add_layer_norm``), or None.
        running_stats: whether the modules keep running statistics (BatchNorm, InstanceNorm).
        bytes: minimal memory traffic, in element sizes, per input element of the forward and
            of the backward, and per parameter element of the forward: the benchmarks'
            roofline.
        summary: one line of what it computes.
    """

    name: str
    title: str
    engine: Callable[..., E.Reduction]
    engine_args: Callable[[tuple[int, ...], Any], dict]
    input: str
    arg: str | None
    params: str
    bias: bool
    eps: float | None
    fn: Callable
    call: Callable
    torch_fn: Callable | None = None
    oracle: Callable | None = None
    modules: tuple[tuple[type | None, type], ...] = ()
    aliases: tuple[str, ...] = ()
    residual_fn: Callable | None = None
    running_stats: bool = False
    bytes: tuple[int, int, int] = (2, 3, 2)
    summary: str = ""
    keys: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.input not in INPUTS or self.params not in PARAMS:
            raise ValueError(f"{self.name}: input must be one of {INPUTS} and params one of "
                             f"{PARAMS}, got {self.input!r}, {self.params!r}")
        spellings = (self.name, self.title, *self.aliases)
        object.__setattr__(self, "keys", tuple(dict.fromkeys(_key(s) for s in spellings)))

    def reduction(self, shape: tuple[int, ...], arg) -> E.Reduction:
        """The reduction of a call on an input of ``shape`` with argument ``arg``."""
        return self.engine(tuple(shape), **self.engine_args(tuple(shape), arg))

    def engine_call(self, shape: tuple[int, ...], arg) -> str:
        """That call as code: ``"group_reduction((4, 6, 2, 3), groups=2)"``."""
        kw = self.engine_args(tuple(shape), arg)
        args = [repr(tuple(shape))] + [f"{k}={v!r}" for k, v in kw.items()]
        return f"{self.engine.__name__}({', '.join(args)})"

    def example_arg(self, shape: tuple[int, ...], groups: int = 2):
        """The argument for an input of ``shape`` in figures and tests: every trailing axis
        for row norms, ``groups`` groups, or None."""
        if self.input == "rows":
            return tuple(shape[1:])
        return groups if self.arg == "num_groups" else None

    def param_shape(self, shape: tuple[int, ...], arg) -> tuple[int, ...]:
        """The shape of ``weight`` and ``bias`` for an input of ``shape``."""
        if self.params == "channel":
            return (shape[1],) if len(shape) > 1 else ()
        return tuple(arg) if self.params == "normalized" else (1,)

    @property
    def classes(self) -> tuple[type, ...]:
        """normlab's module classes of this norm."""
        return tuple(ours for _, ours in self.modules)


_NORMS: dict[str, NormSpec] = {}  # name -> spec, in registration order
_BY_KEY: dict[str, NormSpec] = {}  # every spelling's key -> spec


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def register(spec: NormSpec) -> NormSpec:
    """Add ``spec``; refuses a name or spelling that another norm has. Returns ``spec``."""
    taken = [k for k in spec.keys if k in _BY_KEY and _BY_KEY[k].name != spec.name]
    if taken or spec.name in _NORMS:
        raise ValueError(f"norm {spec.name!r}: the name or spelling {taken or [spec.name]} is "
                         "taken; unregister the other norm first")
    _NORMS[spec.name] = spec
    _BY_KEY.update((k, spec) for k in spec.keys)
    return spec


def unregister(name: str) -> None:
    """Remove the norm ``name`` (any spelling)."""
    spec = get(name)
    del _NORMS[spec.name]
    for k in spec.keys:
        _BY_KEY.pop(k, None)


def get(name: str) -> NormSpec:
    """The norm called ``name`` in any spelling: ``"group_norm"``, ``"GroupNorm"``, ``"GN"``.

    >>> get("LN").name, get("batchnorm").title
    ('layer_norm', 'BatchNorm')
    """
    spec = _BY_KEY.get(_key(name)) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown norm {name!r}; known: {', '.join(names())}")
    return spec


def norms(*, torch_only: bool = False) -> Iterator[NormSpec]:
    """Every registered norm: torch's five first (BatchNorm, LayerNorm, InstanceNorm,
    GroupNorm, RMSNorm: the GroupNorm paper's figure, then RMSNorm), then the others in
    registration order (``torch_only``: torch's alone)."""
    specs = sorted(_NORMS.values(), key=lambda s: s.torch_fn is None)  # (a stable sort)
    return iter([s for s in specs if s.torch_fn is not None or not torch_only])


def names(*, torch_only: bool = False) -> tuple[str, ...]:
    return tuple(s.name for s in norms(torch_only=torch_only))


# --- a norm's function and module from its reduction


def functional(name: str, engine: Callable[..., E.Reduction],
               engine_args: Callable[[tuple[int, ...], Any], dict], *, input: str = "rows", params: str = "normalized", bias: bool = True,
               eps: float = 1e-5, oracle: Callable | None = None, doc: str = "") -> Callable:
    r"""A norm's function computed by the engine on the current backend:
    ``fn(input, normalized_shape, weight=None, bias=None, eps=eps)`` for row norms,
    ``fn(input, weight=None, bias=None, eps=eps)`` for channel norms (no ``bias`` argument when
    ``bias=False``). Statistics in float32 (float64 for float64 inputs), torch's output layout,
    the engine's backward (:func:`normlab._engine.normalize`). Inside ``torch.func`` transforms,
    forward AD and ``jit.trace`` it computes ``oracle(input, arg, weight, bias, eps)`` (plain
    torch ops carry those rules) when one is given."""
    rows = input == "rows"

    def compute(input, arg, weight, bias_, eps_):
        if wrapped() and oracle is not None:
            return oracle(input, arg, weight, bias_, eps_)
        if rows:
            _checks.floating_input(name, input, 1, "(*, *normalized_shape)")
            arg = _checks.normalized_shape(name, input, arg)
        else:
            _checks.floating_input(name, input, 2, "(N, C, *)")
        shape = (1,) if params == "scalar" else arg if params == "normalized" else \
            (input.shape[1],)
        _checks.same_shape(name, shape, weight=weight, bias=bias_)
        _checks.devices(name, input, weight=weight, bias=bias_)
        shape = tuple(input.shape)
        red = engine(shape, **engine_args(shape, arg))
        return get_backend(input).normalize(input, red, weight, bias_, float(eps_))

    if rows and bias:
        def norm(input, normalized_shape, weight=None, bias=None, eps=eps):
            return compute(input, normalized_shape, weight, bias, eps)
    elif rows:
        def norm(input, normalized_shape, weight=None, eps=eps):
            return compute(input, normalized_shape, weight, None, eps)
    elif bias:
        def norm(input, weight=None, bias=None, eps=eps):
            return compute(input, None, weight, bias, eps)
    else:
        def norm(input, weight=None, eps=eps):
            return compute(input, None, weight, None, eps)
    norm.__name__ = norm.__qualname__ = name
    norm.__doc__ = doc
    return norm


def module(title: str, fn: Callable, *, input: str = "rows", params: str = "normalized",
           bias: bool = True, eps: float = 1e-5, weight_init: Callable | None = None,
           where: str = __name__, doc: str = "") -> type:
    """A ``torch.nn.Module`` class named ``title`` for a norm function made by
    :func:`functional`, defined as if in module ``where`` (for pickling).

    Row norms: ``Cls(normalized_shape, eps=eps, elementwise_affine=True, bias=bias,
    device=None, dtype=None)``; channel norms: ``Cls(num_channels, eps=eps, affine=True,
    bias=bias, device=None, dtype=None)``. The weight starts at ones (or at
    ``weight_init(size)``), the bias at zeros, as torch's norms; ``state_dict`` keys are
    ``weight`` and ``bias``."""
    rows = input == "rows"
    has_bias = bias

    def setup(self, size, eps, affine, bias, device, dtype):
        torch.nn.Module.__init__(self)
        self.eps = eps
        if rows:
            size = (size,) if isinstance(size, int) else tuple(size)
            self.normalized_shape, self.elementwise_affine = size, affine
        else:
            self.num_channels, self.affine = size, affine
        shape = (1,) if params == "scalar" else size if rows else (size,)
        kw = dict(device=device, dtype=dtype)
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(shape, **kw))
            if weight_init is not None:
                with torch.no_grad():
                    self.weight.fill_(weight_init(size))
        else:
            self.register_parameter("weight", None)
        if affine and bias and has_bias:
            self.bias = torch.nn.Parameter(torch.zeros(shape, **kw))
        elif has_bias:
            self.register_parameter("bias", None)

    if rows:
        def __init__(self, normalized_shape, eps: float = eps, elementwise_affine: bool = True,
                     bias: bool = bias, device=None, dtype=None):
            setup(self, normalized_shape, eps, elementwise_affine, bias, device, dtype)

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            kw = {"bias": self.bias} if has_bias else {}
            return fn(input, self.normalized_shape, weight=self.weight, eps=self.eps, **kw)

        def extra_repr(self) -> str:
            return (f"{self.normalized_shape}, eps={self.eps}, "
                    f"elementwise_affine={self.elementwise_affine}")
    else:
        def __init__(self, num_channels: int, eps: float = eps, affine: bool = True,
                     bias: bool = bias, device=None, dtype=None):
            setup(self, int(num_channels), eps, affine, bias, device, dtype)

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            kw = {"bias": self.bias} if has_bias else {}
            return fn(input, weight=self.weight, eps=self.eps, **kw)

        def extra_repr(self) -> str:
            return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"

    return type(title, (torch.nn.Module,), {
        "__init__": __init__, "forward": forward, "extra_repr": extra_repr,
        "__module__": where, "__qualname__": title,
        "__doc__": doc or f"The {title} module (:func:`{fn.__name__}`)."})


def declare(name: str, title: str, engine: Callable[..., E.Reduction],
            engine_args: Callable[[tuple[int, ...], Any], dict], *, input: str = "rows",
            params: str = "normalized", bias: bool = True, eps: float = 1e-5,
            oracle: Callable | None = None, weight_init: Callable | None = None,
            aliases: tuple[str, ...] = (), summary: str = "", where: str = __name__,
            fn_doc: str = "", module_doc: str = "") -> NormSpec:
    """Declare and :func:`register` a norm beyond torch's five: its function
    (:func:`functional`) and its module class (:func:`module`), both defined as if in module
    ``where``, are ``spec.fn`` and ``spec.classes[0]``. ``oracle(x, arg, weight, bias, eps)``
    is the norm in plain torch ops (the tests' float64 reference, and what ``torch.func``
    transforms compute). Returns the :class:`NormSpec`.

    >>> import torch
    >>> from normlab import _engine as E
    >>> def pixel_reduction(shape):  # ProGAN's PixelNorm: a mean square over the channels
    ...     return E.Reduction(tuple(shape), (1,), E.per_channel(shape), centered=False)
    >>> spec = declare("pixel_norm", "PixelNorm", pixel_reduction, lambda shape, arg: {},
    ...                input="channels", params="channel", bias=False, eps=1e-8)
    >>> spec.fn(torch.tensor([[3.0, 4.0]]))  # x / sqrt((3^2 + 4^2) / 2)
    tensor([[0.8485, 1.1314]])
    >>> unregister("pixel_norm")
    """
    fn = functional(name, engine, engine_args, input=input, params=params, bias=bias, eps=eps,
                    oracle=oracle, doc=fn_doc)
    fn.__module__ = where
    cls = module(title, fn, input=input, params=params, bias=bias, eps=eps,
                 weight_init=weight_init, where=where, doc=module_doc)
    rows = input == "rows"

    def call(f, x, arg, weight, bias_, eps_, *running):
        kw = {"bias": bias_} if bias else {}
        return f(x, *((arg,) if rows else ()), weight=weight, eps=eps_, **kw)

    return register(NormSpec(
        name, title, engine, engine_args, input, "normalized_shape" if rows else None, params,
        bias, eps, fn, call, oracle=oracle, modules=((None, cls),), aliases=aliases,
        summary=summary))
