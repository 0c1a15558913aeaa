r"""Per-sample weight gradients from ONE batched forward and backward (activation x backprop).

For a layer ``out = W * a`` (convolution or linear map), the gradient of sample ``i``'s loss with
respect to ``W`` only needs that sample's input activation ``a_i`` and output gradient
``g_i = d loss_i / d out_i``:

.. math::

    \nabla_W \ell_i = \sum_{u} g_{i,u}\, a_{i,u}^\top
    \qquad\text{(conv: } g_i\,(C_{out} \times L) \;@\; \operatorname{unfold}(a_i)^\top\,(L \times C_{in} k^2 / G)\text{)},

a sum over the layer's ``L`` output locations. With the summed loss ``sum_i loss_i`` the batched
backward pass delivers every ``g_i`` at once (the samples do not interact in eval mode), so the
per-sample gradients of every Conv/Linear/BatchNorm parameter come from one forward and one
backward pass, never from a per-sample loop. The gradients of a layer are handed to a consumer
*inside the backward pass*, in chunks of samples, and dropped: the per-sample gradient of the
whole model is never held at once (a consumer typically reduces it to a per-filter mean ``|.|``).

This module is plumbing: it knows nothing of saliency. It gives

* :func:`coverage_problem`: why a set of parameters cannot be served by activation x backprop
  (unsupported module type, subclass with its own ``forward``, parametrisation, shared parameter,
  BatchNorm using batch statistics) or None;
* :func:`training_mode_offenders`: the modules whose training mode would mix samples or make the
  pass random (BatchNorm, Dropout) -- the package's one policy is to refuse them;
* :func:`per_sample_grads`: the engine. It registers temporary hooks on the caller's model (always
  removed), never writes ``.grad``, ``.data`` or buffers, and watches (with a
  :class:`~torch.overrides.TorchFunctionMode`) that every parameter it serves is used by its own
  module's ``forward`` and only once per pass; otherwise it raises :class:`NotCovered` so that the
  caller can use an exact fallback (a functional ``vmap`` or a per-sample loop);
* :func:`batched_pass` and :class:`SampleGrads`: a batched pass in which sample ``i`` runs with its
  own parameters ``theta + c_i D_i`` (``D`` per-sample gradients of an earlier pass, dense, or
  factored ``G_i A_i^T`` where a layer has few locations), applied inside the served modules'
  own operations (grouped convolutions, low-rank corrections, per-sample BatchNorm affine maps),
  and which can collect the per-sample gradients at those parameters: what order-1 NormGrad's
  four per-sample passes need, at the cost of batched passes;
* :func:`check_independent`: the batched engines' check that the samples do not interact (the
  first sample's output in the batch equals its output alone).

The hooks of both engines live in one place (:class:`_PassHooks`).

With ``create_graph=True`` the gradients are built from differentiable operations (unfold, einsum,
products), so a function of them can be differentiated again, e.g. with respect to the input.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "NotCovered",
    "SUPPORTED_MODULES",
    "coverage_problem",
    "training_mode_offenders",
    "per_sample_grads",
    "SampleGrads",
    "batched_pass",
    "same_outputs",
    "check_independent",
]

#: Module types (exact types, not subclasses) whose ``weight``/``bias`` are served.
SUPPORTED_MODULES: Tuple[type, ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)

#: Consumer of per-sample gradients: ``(parameter name, grads (n, r, *shape[1:]), samples, rows)``:
#: rows ``rows`` (slice of dim 0, e.g. output channels) of the gradients of samples ``samples``.
Consumer = Callable[[str, Tensor, slice, slice], None]

_DEFAULT_CHUNK_BYTES = 64 * 2**20
#: numbers in one block of per-sample gradients handed to the consumer (4 MiB in float32: stays in the last-level cache)
_BLOCK_NUMEL = 2**20
#: Conv2d layers with at least this many output locations use a batch-1 weight-gradient kernel per sample
_DIRECT_MIN_LOCATIONS = 512


class NotCovered(RuntimeError):
    """The activation x backprop form does not cover this model/parameter set (use a fallback)."""


def same_outputs(a: Tensor, b: Tensor) -> bool:
    """Two computations of the same outputs agree (to the round-off of their dtype, relative to ``b``'s scale)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    tol = 1e-3 if b.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(scale, 1e-12)))


def check_independent(first: Tensor, alone: Tensor) -> None:
    """Batched engines assume the samples do not interact: the first sample's output in the batch
    (``first``, batch dim 1) must equal its output alone, or :class:`NotCovered` is raised (a model
    that mixes the samples, e.g. normalising over the batch, needs a per-sample loop)."""
    if first.shape != alone.shape or not same_outputs(first.to(alone.dtype), alone):
        raise NotCovered("the model mixes the samples of a batch (its first output differs from that example alone)")


def training_mode_offenders(model: nn.Module) -> List[str]:
    """Names of the BatchNorm/Dropout modules in training mode (batch statistics mix samples and
    update buffers; dropout makes the pass random)."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [name or "<root>" for name, m in model.named_modules() if m.training and isinstance(m, kinds)]


def _owners(model: nn.Module, names: Sequence[str]) -> Dict[str, Tuple[str, nn.Module, str]]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        out[name] = (mod_name, modules[mod_name], attr)
    return out


def coverage_problem(model: nn.Module, names: Sequence[str]) -> Optional[str]:
    """Why the parameters ``names`` of ``model`` cannot be served by :func:`per_sample_grads` (None: they can).

    Checked statically: the owning module's exact type is in :data:`SUPPORTED_MODULES`, the parameter
    is its ``weight`` or ``bias``, it is not parametrised, not shared with another module, and a
    BatchNorm uses running statistics. The use of each parameter during the pass is checked again at
    run time.
    """
    from torch.nn.utils import parametrize

    counts: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    params = dict(model.named_parameters())
    for name, (mod_name, mod, attr) in _owners(model, names).items():
        if parametrize.is_parametrized(mod):
            return f"{name}: the module is parametrised"
        if type(mod) not in SUPPORTED_MODULES:
            return f"{name}: module type {type(mod).__name__} is not one of {[t.__name__ for t in SUPPORTED_MODULES]}"
        if attr not in ("weight", "bias"):
            return f"{name}: not a weight or bias"
        if counts.get(id(params[name]), 0) > 1:
            return f"{name}: the parameter is shared with another module"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.training or mod.running_mean is None or mod.running_var is None:
                return f"{name}: BatchNorm {mod_name!r} uses batch statistics (samples interact)"
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.transposed:
            return f"{name}: transposed convolution"
    return None


# --------------------------------------------------------------------------- per-layer maths


def _conv_unfold(mod: Any, a: Tensor) -> Tensor:
    """``unfold`` of the input of a Conv1d/Conv2d as ``(n, C_in * prod(k), L)`` (1-D as height 1)."""
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(-2)
        kernel, stride, dilation = (1, *mod.kernel_size), (1, *mod.stride), (1, *mod.dilation)
        padding: Any = mod.padding if isinstance(mod.padding, str) else (0, *mod.padding)
        pads = list(mod._reversed_padding_repeated_twice) + [0, 0]
    else:
        kernel, stride, dilation, padding = mod.kernel_size, mod.stride, mod.dilation, mod.padding
        pads = list(mod._reversed_padding_repeated_twice)
    if isinstance(padding, str) or mod.padding_mode != "zeros":
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        a = F.pad(a, pads, mode=mode) if any(pads) else a
        padding = 0
    return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)


def _sample_step(n: int, per_sample: int, budget: int, chunk_size: Optional[int]) -> int:
    step = max(1, min(n, budget // max(per_sample, 1)))
    return step if chunk_size is None else max(1, min(step, chunk_size))


def _weight_blocks(
    mod: Any, a: Tensor, g: Tensor, chunk_size: Optional[int], block: int, budget: int
) -> Iterator[Tuple[slice, slice, Tensor]]:
    """Per-sample weight gradients of a Conv1d/Conv2d/Linear in blocks ``(samples, rows, grads)``.

    ``grads`` has shape ``(len(samples), len(rows), *weight.shape[1:])``: rows (output channels) of
    the weight for a chunk of samples. A block holds at most about ``block`` numbers (so that it is
    still in cache when the consumer reduces it: where a layer has few locations, writing the whole
    per-sample gradient to memory would cost more than computing it), the unfolded input of a chunk
    of samples at most ``budget`` bytes.
    """
    w = mod.weight
    n, rows_total, per_row = a.shape[0], w.shape[0], w[0].numel()
    if isinstance(mod, nn.Linear):
        groups = 1
        gg = g.reshape(n, 1, -1, rows_total).transpose(-1, -2)  # (n, 1, out, T)
        cols_of: Callable[[slice], Tensor] = lambda sl: (
            a[sl].reshape(sl.stop - sl.start, 1, -1, per_row).transpose(-1, -2)
        )
        locations = gg.shape[-1]
    else:
        groups = mod.groups
        gg = g.reshape(n, groups, rows_total // groups, -1)
        locations = gg.shape[-1]
        cols_of = lambda sl: _conv_unfold(mod, a[sl]).reshape(sl.stop - sl.start, groups, per_row, -1)
    rows_g = rows_total // groups
    if (
        isinstance(mod, nn.Conv2d)
        and locations >= _DIRECT_MIN_LOCATIONS
        and not g.requires_grad
        and not isinstance(mod.padding, str)
        and mod.padding_mode == "zeros"
    ):
        # many locations: the weight-gradient kernel of a batch-1 convolution per sample beats
        # unfold + matmul (no unfolded copy of the input); not differentiable, hence not with create_graph
        wd = w.detach()
        for i in range(n):
            _, gw, _ = torch.ops.aten.convolution_backward(
                g[i : i + 1],
                a[i : i + 1],
                wd,
                None,
                mod.stride,
                mod.padding,
                mod.dilation,
                False,
                [0, 0],
                groups,
                [False, True, False],
            )
            yield slice(i, i + 1), slice(0, rows_total), gw.unsqueeze(0)
        return
    cols_bytes = per_row * groups * locations * a.element_size()
    step = min(_sample_step(n, rows_total * per_row, block, chunk_size), _sample_step(n, cols_bytes, budget, None))
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        cols = cols_of(sl)  # (s, G, per_row, L)
        if cols.shape[-1] != locations:
            raise NotCovered(f"{type(mod).__name__}: {locations} output locations but {cols.shape[-1]} input patches")
        gs = gg[sl]
        if step > 1 or rows_total * per_row <= block:
            yield sl, slice(0, rows_total), torch.einsum("ngol,ngcl->ngoc", gs, cols).reshape(-1, *w.shape)
        elif groups == 1:
            rb = max(1, block // per_row)
            ct = cols[:, 0].transpose(1, 2)
            for r0 in range(0, rows_total, rb):
                r = slice(r0, min(r0 + rb, rows_total))
                yield sl, r, torch.bmm(gs[:, 0, r], ct).reshape(-1, r.stop - r.start, *w.shape[1:])
        else:
            gb = max(1, block // (rows_g * per_row))
            for g0 in range(0, groups, gb):
                gsl = slice(g0, min(g0 + gb, groups))
                blk = torch.einsum("ngol,ngcl->ngoc", gs[:, gsl], cols[:, gsl])
                yield sl, slice(g0 * rows_g, gsl.stop * rows_g), blk.reshape(-1, (gsl.stop - g0) * rows_g, *w.shape[1:])


def _small_grads(mod: Any, attr: str, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample gradient ``(n, *shape)`` of a bias or a BatchNorm affine parameter."""
    n = a.shape[0]
    if isinstance(mod, nn.Linear):
        return g.reshape(n, -1, g.shape[-1]).sum(1)
    g3 = g.reshape(n, g.shape[1], -1)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and attr == "weight":
        mean, var = mod.running_mean, mod.running_var  # not None: checked by coverage_problem
        assert mean is not None and var is not None
        # sum_u g (a - mean) / sqrt(var + eps), without writing x-hat out
        ga = torch.linalg.vecdot(g3, a.reshape(n, a.shape[1], -1))  # 2-3x faster than einsum here
        return (ga - g3.sum(-1) * mean) * torch.rsqrt(var + mod.eps)
    return g3.sum(-1)  # a conv bias, a BatchNorm bias


# --------------------------------------------------------------------------- per-sample parameters


class _SliceSum(torch.autograd.Function):
    """``sum_j m[:, p_j, y_j : y_j + h, x_j : x_j + w, y_j : y_j + h, x_j : x_j + w]`` for pixel Gram
    matrices ``m`` ``(n, phases, H, W, H, W)``; the backward pass writes the gradient into one zero
    tensor (autograd's slice rule would allocate a zero tensor of ``m``'s size for every slice)."""

    @staticmethod
    def forward(ctx: Any, m: Tensor, offsets: List[Tuple[int, int, int]], h: int, w: int) -> Tensor:  # type: ignore[override]
        ctx.offsets, ctx.hw, ctx.shape = offsets, (h, w), m.shape
        total: Optional[Tensor] = None
        for p, y, x in offsets:
            part = m[:, p, y : y + h, x : x + w, y : y + h, x : x + w]
            total = part.clone() if total is None else total.add_(part)
        assert total is not None
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None]:  # type: ignore[override]
        h, w = ctx.hw
        gm = grad.new_zeros(ctx.shape)
        for p, y, x in ctx.offsets:
            gm[:, p, y : y + h, x : x + w, y : y + h, x : x + w] += grad
        return gm, None, None, None


class _Patches:
    r"""The input patches ``A_i^T`` ``(n, L, cols)`` of one Conv1d/Conv2d/Linear layer (one patch of
    ``cols`` numbers per output location), **kept as the layer's input** ``a`` and never unfolded.

    A convolution's correction needs ``K_i = A_i^T unfold(x_i)`` ``(L, L_x)``: the dot products of
    every patch of ``a_i`` with every patch of a new input ``x_i``. A patch dot product is the sum,
    over the ``k`` kernel offsets, of the channel dot products of two pixels, so ``K`` is a sum of
    ``k`` shifted slices of the pixel Gram matrix ``M_i = a_i^T x_i`` (over the padded images; with
    stride ``s`` only pixels of the same phase modulo ``s`` meet, so ``M`` is built per phase, all
    phases in one batched product): about ``k`` times fewer operations than correlating the patches,
    and ``a`` takes up to ``k`` times less memory than its unfolded patches. For a Linear layer the
    patches are the tokens themselves.
    """

    def __init__(self, mod: Any, a: Tensor, locations: int) -> None:
        self.mod = mod
        self.a = a
        self.linear = isinstance(mod, nn.Linear)
        self._a_phased: Optional[Tensor] = None
        self._filters: Optional[Tensor] = None
        if self.linear:
            self.rows_of_a = a.reshape(a.shape[0], -1, mod.weight.shape[1])
            found = self.rows_of_a.shape[1]
        else:
            self.conv1d = isinstance(mod, nn.Conv1d)
            two = (lambda t: (1, *t)) if self.conv1d else (lambda t: tuple(t))
            self.kernel, self.stride, self.dilation = two(mod.kernel_size), two(mod.stride), two(mod.dilation)
            self.pads = list(mod._reversed_padding_repeated_twice) + ([0, 0] if self.conv1d else [])
            self.mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            self.padded_shape = self._padded(a).shape[1:]
            hp, wp = self.padded_shape[-2:]
            (kh, kw), (sy, sx), (dy, dx) = self.kernel, self.stride, self.dilation
            self.out_hw = ((hp - dy * (kh - 1) - 1) // sy + 1, (wp - dx * (kw - 1) - 1) // sx + 1)
            found = self.out_hw[0] * self.out_hw[1]
            # each kernel offset lies in one phase (modulo the stride) at an offset within its grid
            offsets = []
            for ky in range(kh):
                for kx in range(kw):
                    (oy, cy), (ox, cx) = divmod(ky * dy, sy), divmod(kx * dx, sx)
                    offsets.append((cy * sx + cx, oy, ox))
            self.phases = sorted({p for p, _, _ in offsets})
            self.offsets = [(self.phases.index(p), oy, ox) for p, oy, ox in offsets]
            self.grid = (-(-hp // sy), -(-wp // sx))
        if found != locations:
            raise NotCovered(f"{type(mod).__name__}: {locations} output locations but {found} input patches")

    def _padded(self, t: Tensor, op_input: bool = False) -> Tensor:
        t = t.unsqueeze(-2) if self.conv1d else t
        if op_input and self.mode != "constant":
            return t  # the module padded its input itself (reflect, circular...) before the operation
        return F.pad(t, self.pads, mode=self.mode) if any(self.pads) else t

    def _phased(self, t: Tensor, op_input: bool = False) -> Tensor:
        """The padded input split by phase modulo the stride, ``(n, phases, C, H_c W_c)`` (one copy:
        the padding; pixels past the padded image are zeros that no patch reaches)."""
        (sy, sx), (hc, wc) = self.stride, self.grid
        hp, wp = self.padded_shape[-2:]
        extra = [0, wc * sx - wp, 0, hc * sy - hp]
        if self.mode == "constant" and not op_input:
            t = t.unsqueeze(-2) if self.conv1d else t
            tp = F.pad(t, [p + e for p, e in zip(self.pads, extra)]) if any(self.pads) or any(extra) else t
        else:
            tp = self._padded(t, op_input)
            tp = F.pad(tp, extra) if any(extra) else tp
        n, c = tp.shape[:2]
        if tp.shape[2:] != (hc * sy, wc * sx):
            raise NotCovered(f"{type(self.mod).__name__}: the layer input changed shape between passes")
        if sy * sx == 1:
            return tp.reshape(n, 1, c, hc * wc)
        tp = tp.reshape(n, c, hc, sy, wc, sx).permute(0, 3, 5, 1, 2, 4)
        if len(self.phases) < sy * sx:
            tp = tp.reshape(n, sy * sx, c, hc, wc)[:, self.phases]
        return tp.reshape(n, len(self.phases), c, hc * wc)

    def gram(self, x: Optional[Tensor] = None, op_input: bool = False) -> Tensor:
        """``A_i^T unfold(x_i)`` per sample, ``(n, L, L_x)``, for an input ``x`` of the same layer
        (None: ``a`` itself; ``op_input``: ``x`` is the input of the convolution operation, after the
        module's own padding where its padding mode is not zeros)."""
        n = self.a.shape[0]
        if self.linear:
            rows_of_x = self.rows_of_a if x is None else x.reshape(n, -1, x.shape[-1])
            return torch.bmm(self.rows_of_a, rows_of_x.transpose(1, 2))
        if x is not None and op_input and max(self.stride) > 1:
            return self._filter_products(x)
        (hc, wc), (ho, wo), ph = self.grid, self.out_hw, len(self.phases)
        if self._a_phased is None:
            self._a_phased = self._phased(self.a).transpose(-1, -2).reshape(n * ph, hc * wc, -1)
        if x is None:
            xs = self._a_phased.transpose(1, 2)
        else:
            xs = self._phased(x, op_input).reshape(n * ph, -1, hc * wc)
        m = torch.bmm(self._a_phased, xs)  # (n phases, P, P)
        k = _SliceSum.apply(m.view(n, ph, hc, wc, hc, wc), self.offsets, ho, wo)
        return k.reshape(n, ho * wo, ho * wo)

    def _filter_products(self, x: Tensor) -> Tensor:
        """``A_i^T unfold(x_i)`` as one grouped convolution of the operation's input with the
        ``L`` patches of each sample as filters: fewer operations than the phase-split Gram
        matrices for strided layers (resnet18's stride-2 convolutions: up to 2x faster)."""
        n, ho, wo = self.a.shape[0], *self.out_hw
        if self._filters is None:
            self._filters = self.matrix().reshape(n * ho * wo, *self.mod.weight.shape[1:]).contiguous()
        mod = self.mod
        padding = 0 if self.mode != "constant" else mod.padding  # other modes: x is padded already
        conv = F.conv1d if self.conv1d else F.conv2d
        flat = x.reshape(1, n * x.shape[1], *x.shape[2:])
        k = conv(flat, self._filters, None, mod.stride, padding, mod.dilation, n)
        return k.reshape(n, ho * wo, -1)

    def matrix(self) -> Tensor:
        """The patches themselves, ``(n, L, cols)`` (unfolded: for a dense expansion only)."""
        return self.rows_of_a if self.linear else _conv_unfold(self.mod, self.a).transpose(1, 2)


class SampleGrads:
    r"""Per-sample gradients of a set of parameters from one batched pass (activation x backprop).

    The weight of a Conv/Linear layer with few output locations is kept **factored**:
    ``grad_i = G_i A_i^T`` with ``G_i`` ``(rows, L)`` the output gradient and ``A_i`` ``(cols, L)``
    the (unfolded) input over the layer's ``L`` locations, stored as ``(G, patches)`` where the
    patches (:class:`_Patches`) are the layer's input itself. That is far smaller than the dense
    gradient where ``L`` is small (resnet18's ``layer4`` at 112 px: 16 locations, 41x smaller), and
    it applies to a new input ``x`` as ``G_i (A_i^T unfold(x_i))``, a low-rank product whose middle
    factor comes from pixel Gram matrices. Every other gradient
    is dense, ``(n, *shape)``. A parameter whose module was not reached has no entry: its gradient is
    zero.

    Args:
        n (int): the number of samples.
        like (Tensor, optional): a tensor with the device and dtype of the gradients (for zeros).
    """

    def __init__(self, n: int, like: Optional[Tensor] = None) -> None:
        self.n = n
        self.factory: Dict[str, Any] = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.dense: Dict[str, Tensor] = {}
        self.factors: Dict[str, Tuple[Tensor, _Patches]] = {}

    def sq_norms(self) -> Tensor:
        """``||grad_i||^2`` summed over all parameters, ``(n,)``; a factored weight uses
        ``||G A^T||_F^2 = sum((G^T G) * (A^T A))`` and is never expanded."""
        flat = [d.reshape(self.n, -1) for d in self.dense.values()]
        # the many small gradients (biases, BatchNorm) in one reduction
        small = [f for f in flat if f.shape[1] <= 4096]
        parts = [f.square().sum(1) for f in flat if f.shape[1] > 4096]
        if small:
            parts.append(torch.cat(small, 1).square().sum(1))
        parts += [
            (torch.bmm(g.transpose(1, 2), g) * patches.gram()).sum((1, 2)) for g, patches in self.factors.values()
        ]
        if not parts:
            return torch.zeros(self.n, **self.factory)
        return torch.stack(parts).sum(0)

    def expanded(self, name: str, shape: Sequence[int]) -> Tensor:
        """The dense per-sample gradient ``(n, *shape)`` of one parameter (zeros if absent)."""
        if name in self.dense:
            return self.dense[name]
        if name in self.factors:
            g, patches = self.factors[name]
            return torch.bmm(g, patches.matrix()).reshape(self.n, *shape)
        return torch.zeros((self.n, *shape), **self.factory)


def _factor_pays(rows: int, cols: int, locations: int, groups: int = 1, padding: Any = 0) -> bool:
    """Keep a weight gradient factored where that takes at most a quarter of its dense size (not for
    grouped convolutions or string padding)."""
    if groups != 1 or isinstance(padding, str):
        return False
    return locations * (rows + cols) * 4 <= rows * cols


def _collect(mod: Any, attr: str, a: Tensor, g: Tensor, out: SampleGrads, name: str) -> None:
    """Store one parameter's per-sample gradients (factored where it pays, else dense)."""
    n = a.shape[0]
    if attr != "weight" or isinstance(mod, nn.modules.batchnorm._BatchNorm):
        out.dense[name] = _small_grads(mod, attr, a, g)
        return
    w = mod.weight
    rows, cols = w.shape[0], w[0].numel()
    linear = isinstance(mod, nn.Linear)
    gf = g.reshape(n, -1, rows).transpose(1, 2) if linear else g.reshape(n, rows, -1)
    if _factor_pays(rows, cols, gf.shape[-1], getattr(mod, "groups", 1), getattr(mod, "padding", 0)):
        out.factors[name] = (gf.contiguous(), _Patches(mod, a, gf.shape[-1]))
        return
    dense = torch.empty((n, *w.shape), dtype=g.dtype, device=g.device)
    for sl, rws, blk in _weight_blocks(mod, a, g, None, _BLOCK_NUMEL, _DEFAULT_CHUNK_BYTES):
        dense[sl, rws] = blk
    out.dense[name] = dense


#: conv layers with at least this many input channels per group and output locations run
#: per-sample weights as one grouped convolution (else a loop of batch-1 convolutions, e.g. the
#: 3-channel stem): chosen from per-layer timings of resnet18 on a 2-core CPU, where grouped
#: convolutions matched the shared convolution on layer1/layer2 and lost by 8x on layer4 (which
#: is factored instead)
_GROUPED_MIN_CHANNELS = 16
_GROUPED_MIN_LOCATIONS = 64


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], i: int, key: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


class _Offsets:
    r"""Per-sample parameters ``theta_i = theta + c_i D_i`` applied inside the served modules' own
    operations (conv, linear, batch norm): the whole batch runs in one pass, each sample with its
    parameters. A dense offset of a conv runs as one grouped convolution (or batch-1 convolutions);
    a factored one as the shared operation plus the low-rank correction ``c_i G_i (A_i^T x_i)``."""

    def __init__(
        self, direction: SampleGrads, coef: Tensor, name_of: Dict[int, str], leaves: Optional[Dict[str, Tensor]] = None
    ) -> None:
        self.d = direction
        self.coef = coef
        self.name_of = name_of  # id(parameter tensor) -> name
        # collecting: the per-sample weights of grouped convolutions are made leaves, and autograd's
        # weight gradient of the grouped convolution is the per-sample gradient (one kernel)
        self.leaves = leaves
        self._coefs: Dict[Tuple[int, torch.dtype], Tensor] = {}

    def _shift(self, name: Optional[str], p: Optional[Tensor]) -> Optional[Tensor]:
        """``p + c_i D_i`` per sample ``(n, *p.shape)``, or None where the offset is zero."""
        if p is None or name is None or name not in self.d.dense:
            return None
        dd = self.d.dense[name]
        key = (p.dim(), dd.dtype)
        if key not in self._coefs:  # the coefficients as a column, once per shape and dtype
            self._coefs[key] = self.coef.reshape(-1, *([1] * p.dim())).to(dd.dtype)
        return torch.addcmul(p.unsqueeze(0), self._coefs[key], dd)

    def _bias(self, out: Tensor, bias: Optional[Tensor], channel_last: bool) -> Tensor:
        name = self.name_of.get(id(bias)) if bias is not None else None
        shifted = self._shift(name, bias)
        if shifted is None:
            return out if bias is None else out + (bias if channel_last else bias.reshape(-1, *[1] * (out.dim() - 2)))
        if channel_last:
            return out + shifted.reshape(out.shape[0], *([1] * (out.dim() - 2)), -1)
        return out + shifted.reshape(*shifted.shape, *([1] * (out.dim() - 2)))

    def conv(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tensor:
        x, w, bias = args[0], args[1], _arg(args, kwargs, 2, "bias")
        stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
        dilation, groups = _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1)
        name = self.name_of.get(id(w))
        n = x.shape[0]
        if name in self.d.factors:
            out = func(x, w, None, stride, padding, dilation, groups)
            g, patches = self.d.factors[name]
            # c_i G_i K_i with K_i = A_i^T unfold(x_i) from pixel Gram matrices (no unfolded copy of x)
            cg = g * self.coef.reshape(-1, 1, 1).to(g.dtype)
            out = torch.baddbmm(out.reshape(n, w.shape[0], -1), cg, patches.gram(x, op_input=True)).reshape(out.shape)
        else:
            ws = self._shift(name, w)
            strides = (stride,) * (x.dim() - 2) if isinstance(stride, int) else tuple(stride)
            # a 1x1 convolution without padding is a matrix product over the (strided) locations
            pointwise = (
                groups == 1
                and all(k == 1 for k in w.shape[2:])
                and (
                    isinstance(padding, str)  # 'valid' or 'same': no padding for a 1x1 kernel
                    or all(p == 0 for p in ((padding,) if isinstance(padding, int) else padding))
                )
            )
            grouped = x.shape[1] // groups >= _GROUPED_MIN_CHANNELS and x[0, 0].numel() >= _GROUPED_MIN_LOCATIONS * (
                math.prod(strides)
            )
            # where the gradient of a 1x1 convolution is better kept factored, the hooks collect it;
            # elsewhere the per-sample weights are autograd leaves (one weight gradient kernel)
            factored = False
            if pointwise:
                locations = math.prod(-(-size // st) for size, st in zip(x.shape[2:], strides))
                factored = _factor_pays(w.shape[0], w.shape[1], locations, groups, padding)
            if ((pointwise and not factored) or grouped) and self.leaves is not None and name is not None:
                ws = (ws if ws is not None else w.unsqueeze(0).expand(n, *w.shape)).detach().requires_grad_()
                self.leaves[name] = ws
            if ws is None:
                if not any(t is not None and id(t) in self.name_of for t in (w, bias)):
                    return func(*args, **kwargs)
                out = func(x, w, None, stride, padding, dilation, groups)
            elif pointwise:
                xs = x[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)]
                out = torch.bmm(ws.reshape(n, w.shape[0], w.shape[1]), xs.reshape(n, w.shape[1], -1))
                out = out.reshape(n, w.shape[0], *xs.shape[2:])
            elif grouped:
                # one grouped convolution: the samples become groups
                flat = x.reshape(1, n * x.shape[1], *x.shape[2:])
                out = func(flat, ws.reshape(-1, *w.shape[1:]), None, stride, padding, dilation, groups * n)
                out = out.reshape(n, w.shape[0], *out.shape[2:])
            else:
                out = torch.cat([func(x[i : i + 1], ws[i], None, stride, padding, dilation, groups) for i in range(n)])
        return self._bias(out, bias, channel_last=False)

    def linear(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tensor:
        x, w, bias = args[0], args[1], _arg(args, kwargs, 2, "bias")
        name = self.name_of.get(id(w))
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1])
        if name in self.d.factors:
            out = func(x, w, None)
            g, patches = self.d.factors[name]
            cg = g * self.coef.reshape(-1, 1, 1).to(g.dtype)
            k = torch.bmm(x3, patches.matrix().transpose(1, 2))  # (n, T', L)
            out = torch.baddbmm(out.reshape(n, -1, w.shape[0]), k, cg.transpose(1, 2)).reshape(out.shape)
        else:
            ws = self._shift(name, w)
            if ws is None:
                if bias is None or self._shift(self.name_of.get(id(bias)), bias) is None:
                    return func(*args, **kwargs)
                out = func(x, w, None)
            else:
                out = torch.bmm(x3, ws.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[0])
        return self._bias(out, bias, channel_last=True)

    def batch_norm(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tensor:
        x, mean, var = args[0], _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
        w, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        eps = _arg(args, kwargs, 7, "eps", 1e-5)
        # eval-mode batch norm is a per-channel affine map x * s + t; per sample, one fused pass
        # over the activation: s_i = w_i / sqrt(var + eps), t_i = b_i - mean * s_i
        n, c = x.shape[0], x.shape[1]
        ws = self._shift(self.name_of.get(id(w)), w) if w is not None else None
        bs = self._shift(self.name_of.get(id(bias)), bias) if bias is not None else None
        if ws is None and bs is None:
            return func(*args, **kwargs)
        r = torch.rsqrt(var + eps)
        scale = (ws if ws is not None else (w if w is not None else torch.ones_like(r)).expand(n, c)) * r
        base = bs if bs is not None else (bias if bias is not None else torch.zeros_like(r)).expand(n, c)
        shift = torch.addcmul(base, mean, scale, value=-1)
        tail = (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(n, c, *tail), x, scale.reshape(n, c, *tail))

    def __call__(self, func: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if func in (torch.conv1d, torch.conv2d):
            return self.conv(func, args, kwargs)
        if func is F.linear:
            return self.linear(func, args, kwargs)
        if func is F.batch_norm:
            if _arg(args, kwargs, 5, "training", False):
                raise NotCovered("a served BatchNorm uses batch statistics")
            return self.batch_norm(func, args, kwargs)
        raise NotCovered(
            f"a served parameter is used by {getattr(func, '__name__', func)}, which has no per-sample form"
        )


# --------------------------------------------------------------------------- use watcher


class _UseWatcher(TorchFunctionMode):
    """Records uses of the served parameters outside their own module's forward (or repeated calls);
    with ``offsets``, runs the served modules' operations with per-sample parameters."""

    def __init__(self, owner_of: Dict[int, int], offsets: Optional[_Offsets] = None) -> None:
        super().__init__()
        self.owner_of = owner_of  # id(param) -> id(module)
        self.offsets = offsets
        self.stack: List[int] = []
        self.problem: Optional[str] = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        served = False
        for v in list(args) + list(kwargs.values()):
            for t in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(t, Tensor) and id(t) in self.owner_of:
                    served = True
                    if self.problem is None and (not self.stack or self.stack[-1] != self.owner_of[id(t)]):
                        self.problem = f"a profiled parameter is used outside its module's forward ({func})"
        if served and self.offsets is not None and self.problem is None:
            return self.offsets(func, args, kwargs)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- the engine


class _PassHooks:
    """The hooks of one batched pass on the served modules (a context manager, always removed).

    Pre-hooks and the :class:`_UseWatcher` check that each served parameter is used once, by its
    own module; the forward hook hands each module's input and output gradient to ``on_grad``
    inside the backward pass (a tensor hook on the output); with ``offsets`` the modules run with
    per-sample parameters. ``targets()`` are the tensors whose gradients make every hook fire.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        on_grad: Optional[Callable[[nn.Module, List[Tuple[str, str]], Tensor, Tensor], None]],
        create_graph: bool = False,
        tensors: Optional[Dict[str, Tensor]] = None,
        offsets: Optional[Tuple[SampleGrads, Tensor]] = None,
        leaves: Optional[Dict[str, Tensor]] = None,
    ) -> None:
        owners = _owners(model, names)
        self.by_module: Dict[int, Tuple[nn.Module, List[Tuple[str, str]]]] = {}
        for name, (_, mod, attr) in owners.items():
            self.by_module.setdefault(id(mod), (mod, []))[1].append((name, attr))
        # the tensors the modules hold during the pass: theirs, or those given to functional_call
        held = {
            name: (tensors[name] if tensors is not None else getattr(mod, attr))
            for name, (_, mod, attr) in owners.items()
        }
        owner_of = {id(held[name]): id(mod) for name, (_, mod, attr) in owners.items()}
        off = None
        if offsets is not None or leaves is not None:
            # with leaves but no offsets, the served operations are intercepted all the same:
            # grouped convolutions give their per-sample weight gradients
            direction, coef = offsets if offsets is not None else (SampleGrads(0), torch.zeros(0))
            off = _Offsets(direction, coef, {id(t): name for name, t in held.items()}, leaves)
        self.watcher = _UseWatcher(owner_of, off)
        self.on_grad = on_grad
        self.create_graph = create_graph
        self.calls: Dict[int, int] = {}
        self.fired: set = set()
        # (module output, its version, module input, its version) per hooked call
        self.recorded: List[Tuple[Tensor, int, Tensor, int]] = []
        self._stack = ExitStack()

    def _pre_hook(self, mod: nn.Module, args: Tuple[Any, ...]) -> None:
        self.watcher.stack.append(id(mod))
        self.calls[id(mod)] = self.calls.get(id(mod), 0) + 1
        if self.calls[id(mod)] > 1 and self.watcher.problem is None:
            self.watcher.problem = f"module {type(mod).__name__} is called more than once per pass"

    def _fwd_hook(self, mod: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        self.watcher.stack.pop()
        on_grad = self.on_grad
        if on_grad is None:
            return
        a = args[0] if args else None
        if not isinstance(a, Tensor) or not isinstance(out, Tensor):
            if self.watcher.problem is None:
                self.watcher.problem = f"module {type(mod).__name__} did not take and return one tensor"
            return
        if not out.requires_grad:
            if self.watcher.problem is None:
                self.watcher.problem = f"the output of {type(mod).__name__} does not depend on the inputs"
            return
        served = self.by_module[id(mod)][1]
        a_saved = a if self.create_graph else a.detach()
        a_version = a._version

        def grad_hook(g: Tensor) -> None:
            self.fired.add(id(mod))
            if a._version != a_version:
                # the module's input was overwritten after the call: its per-sample gradient is lost
                if self.watcher.problem is None:
                    self.watcher.problem = f"the input of {type(mod).__name__} is modified in place after the call"
                return
            on_grad(mod, served, a_saved, g if self.create_graph else g.detach())

        # A tensor hook registered now receives the gradient of this value even if a later
        # in-place operation (ReLU(inplace=True)) overwrites the tensor.
        out.register_hook(grad_hook)
        self.recorded.append((out, out._version, a, a._version))

    def __enter__(self) -> "_PassHooks":
        for mod, _ in self.by_module.values():
            self._stack.callback(mod.register_forward_pre_hook(self._pre_hook).remove)
            # first among the forward hooks: a caller's hook (order 1's layer tap) sees the module's output
            self._stack.callback(mod.register_forward_hook(self._fwd_hook, prepend=True).remove)
        self._stack.enter_context(self.watcher)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        # break the cycle hooks -> recorded outputs -> their tensor hooks -> hooks, so that the
        # pass's autograd graph is freed now, not at the next garbage collection
        self.recorded.clear()
        self.watcher.offsets = None

    def check(self) -> None:
        """After the forward pass: raise :class:`NotCovered` if a parameter was used unexpectedly."""
        if self.watcher.problem is not None:
            raise NotCovered(self.watcher.problem)

    def targets(self, leaves: Sequence[Tensor]) -> List[Tensor]:
        """What to differentiate for every hook to fire: the hooked outputs themselves (the pass
        stops there); an output modified in place since (ReLU(inplace=True) after a BatchNorm) is
        replaced by its module's input, which lies before it (the pass goes through the module);
        where that input cannot carry a gradient either, the ``leaves`` (the pass goes down to the
        input)."""
        if not self.recorded:
            return []
        if not self.create_graph:
            chosen: List[Tensor] = []
            for o, v, a, va in self.recorded:
                if o._version == v:
                    chosen.append(o)
                elif a.requires_grad and a._version == va:
                    chosen.append(a)
                else:
                    break
            else:
                return chosen
        if not leaves:
            raise NotCovered("a hooked output is modified in place and no input carries the backward pass")
        return list(leaves)

    def unreached(self) -> List[Tuple[nn.Module, List[Tuple[str, str]]]]:
        """Served modules never called, or whose output does not reach the loss (zero gradients)."""
        return [(mod, served) for mod, served in self.by_module.values() if id(mod) not in self.fired]


def per_sample_grads(
    model: nn.Module,
    inputs: Tensor,
    per_sample_losses: Callable[[Tensor], Tensor],
    names: Sequence[str],
    consume: Consumer,
    chunk_size: Optional[int] = None,
    create_graph: bool = False,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
    block_numel: int = _BLOCK_NUMEL,
) -> Optional[Tensor]:
    r"""
    Per-sample gradients of the parameters ``names`` from one batched forward and backward pass.

    The samples must not interact (eval-mode model): check :func:`training_mode_offenders` and
    :func:`coverage_problem` first.

    Args:
        model (nn.Module): the caller's model (hooks are added for the call only; nothing is written).
        inputs (Tensor): batch ``(N, ...)``. With ``create_graph`` it may require grad.
        per_sample_losses (Callable): ``model output -> (N,)`` losses, row ``i`` depending on sample ``i`` only.
        names (sequence of str): parameter names (``model.named_parameters()``) to serve.
        consume (Callable): called, during the backward pass, with ``(name, grads, samples, rows)``:
                    ``grads`` ``(len(samples), len(rows), *shape[1:])`` holds rows ``rows`` (slice of
                    dim 0: output channels) of the gradients of the samples ``samples`` (slice of
                    the batch). Every (sample, row) is delivered once; ``grads`` is not used
                    again after the call (the consumer may overwrite it).
        chunk_size (int, optional): at most this many samples' gradients of one layer at once.
                    Default: None (a memory budget of ``chunk_bytes`` per layer decides)
        create_graph (bool, optional): build the graph of the gradients (for a second derivative).
                    Default: False
        chunk_bytes (int, optional): memory budget of the unfolded input of one chunk of samples.
                    Default: 64 MiB
        block_numel (int, optional): numbers in one block of gradients handed to ``consume``
                    (small blocks are reduced while still in cache). Default: 2**20

    Returns:
        *Tensor* or None: the per-sample losses ``(N,)`` (detached unless ``create_graph``).

    Raises:
        NotCovered: a served parameter was used outside its module's forward, or a module was
                    called more than once. Nothing was consumed for a complete result then.
    """

    def on_grad(mod: nn.Module, served: List[Tuple[str, str]], a: Tensor, g: Tensor) -> None:
        n = g.shape[0]
        for name, attr in served:
            if attr == "weight" and not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                for sl, rows, grads in _weight_blocks(mod, a, g, chunk_size, block_numel, chunk_bytes):
                    consume(name, grads, sl, rows)
            else:
                rows = slice(0, getattr(mod, attr).shape[0])
                for start in range(0, n, chunk_size or n):
                    sl = slice(start, min(start + (chunk_size or n), n))
                    consume(name, _small_grads(mod, attr, a[sl], g[sl]), sl, rows)

    if not inputs.is_floating_point():
        raise NotCovered(f"inputs of dtype {inputs.dtype} cannot carry the backward pass")
    alone = None
    if inputs.shape[0] > 1:
        with torch.no_grad():
            alone = model(inputs[:1].detach().clone())
    with _PassHooks(model, names, on_grad, create_graph) as hooks:
        leaf = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            x = leaf.clone()  # not a leaf: a model may modify its input in place
            out = model(x)
            hooks.check()
            if alone is not None:
                check_independent(out[:1].detach(), alone)
            losses = per_sample_losses(out)
            if losses.shape != (x.shape[0],):
                raise ValueError(f"per-sample losses must have shape ({x.shape[0]},), got {tuple(losses.shape)}")
            targets = hooks.targets([leaf])
            if targets:
                torch.autograd.grad(losses.sum(), targets, create_graph=create_graph, allow_unused=True)
                del targets
            hooks.check()  # an input overwritten in place before its gradient arrived
        # a module never called, or whose output does not reach the loss, has zero gradients
        n = x.shape[0]
        for mod, served in hooks.unreached():
            for name, attr in served:
                p = getattr(mod, attr)
                zeros = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
                consume(name, zeros, slice(0, n), slice(0, p.shape[0]))
    return losses if create_graph else losses.detach()


def batched_pass(
    model: nn.Module,
    tensors: Dict[str, Tensor],
    names: Sequence[str],
    forward: Callable[[], Tensor],
    per_sample_losses: Callable[[Tensor], Tensor],
    wrt: Sequence[Tensor] = (),
    leaves: Sequence[Tensor] = (),
    offsets: Optional[Tuple[SampleGrads, Tensor]] = None,
    collect: bool = False,
) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...], Optional[SampleGrads]]:
    r"""
    One batched forward and backward pass in which sample ``i`` runs with its own parameters
    ``theta + c_i D_i`` (``offsets = (D, c)``), giving the gradients of the per-sample losses with
    respect to ``wrt`` and (``collect``) every served parameter's per-sample gradient at the
    per-sample parameters -- what a loop of batch-1 passes gives, at the cost of batched passes.

    Args:
        model (nn.Module): the caller's model (hooks for this call only; nothing is written).
        tensors (dict): the parameter tensors ``forward`` gives the model (``functional_call``):
                    served parameters are recognised by identity.
        names (sequence of str): the served parameters (all the parameters that differ per sample);
                    :func:`coverage_problem` must be None for them.
        forward (Callable): runs the model on the batch (with ``tensors``), returns its output.
        per_sample_losses (Callable): ``output -> (N,)``.
        wrt (sequence of Tensor): tensors created during ``forward`` (zero perturbations) whose
                    gradients are returned.
        leaves (sequence of Tensor): inputs requiring grad, used when the backward pass must reach
                    the input (an in-place operation on a served module's output).
        offsets (tuple, optional): ``(D, c)``: per-sample gradients and one coefficient per sample.
        collect (bool, optional): return the per-sample gradients of the served parameters.

    Returns:
        (Tensor, Tensor, tuple[Tensor, ...], SampleGrads or None): the output, the losses ``(N,)``,
        the gradients w.r.t. ``wrt``, and the per-sample gradients.

    Raises:
        NotCovered: a served parameter is used outside its module, a module is called twice, or
                    the layout is not batch-first.
    """
    grads: Optional[SampleGrads] = None
    weight_leaves: Dict[str, Tensor] = {}

    def on_grad(mod: nn.Module, served: List[Tuple[str, str]], a: Tensor, g: Tensor) -> None:
        assert grads is not None
        for name, attr in served:
            if name not in weight_leaves:
                _collect(mod, attr, a, g, grads, name)

    with _PassHooks(
        model,
        names,
        on_grad if collect else None,
        tensors=tensors,
        offsets=offsets,
        leaves=weight_leaves if collect else None,
    ) as hooks:
        with torch.enable_grad():
            out = forward()
            hooks.check()
            losses = per_sample_losses(out)
            if collect:
                grads = SampleGrads(losses.shape[0], like=losses)
            extra = hooks.targets(leaves) if collect else []
            lv = list(weight_leaves.items())
            want = list(wrt) + extra + [t for _, t in lv]
            gs = torch.autograd.grad(losses.sum(), want, allow_unused=True) if want else ()
            hooks.check()  # an input overwritten in place before its gradient arrived
    if grads is not None:
        for (name, leaf), g in zip(lv, gs[len(gs) - len(lv) :]):
            grads.dense[name] = torch.zeros_like(leaf) if g is None else g
    result = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wrt, gs[: len(wrt)]))
    return out.detach(), losses.detach(), result, grads
