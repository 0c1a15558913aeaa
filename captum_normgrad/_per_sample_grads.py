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
  caller can use an exact fallback (a functional ``vmap`` or a per-sample loop).

With ``create_graph=True`` the gradients are built from differentiable operations (unfold, einsum,
products), so a function of them can be differentiated again, e.g. with respect to the input.
"""

from __future__ import annotations

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
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean, var = mod.running_mean, mod.running_var  # not None: checked by coverage_problem
        assert mean is not None and var is not None
        xhat = (a - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + mod.eps)
        return (g3 * xhat.reshape(n, a.shape[1], -1)).sum(-1)
    return g3.sum(-1)  # a conv bias, a BatchNorm bias


# --------------------------------------------------------------------------- use watcher


class _UseWatcher(TorchFunctionMode):
    """Records uses of the served parameters outside their own module's forward (or repeated calls)."""

    def __init__(self, owner_of: Dict[int, int]) -> None:
        super().__init__()
        self.owner_of = owner_of  # id(param) -> id(module)
        self.stack: List[int] = []
        self.problem: Optional[str] = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.problem is None:
            for v in list(args) + list(kwargs.values()):
                for t in v if isinstance(v, (list, tuple)) else (v,):
                    if isinstance(t, Tensor) and id(t) in self.owner_of:
                        if not self.stack or self.stack[-1] != self.owner_of[id(t)]:
                            self.problem = f"a profiled parameter is used outside its module's forward ({func})"
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- the engine


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
    owners = _owners(model, names)
    by_module: Dict[int, Tuple[nn.Module, List[Tuple[str, str]]]] = {}
    for name, (_, mod, attr) in owners.items():
        by_module.setdefault(id(mod), (mod, []))[1].append((name, attr))
    owner_of = {id(getattr(mod, attr)): id(mod) for (_, mod, attr) in owners.values()}
    watcher = _UseWatcher(owner_of)
    calls: Dict[int, int] = {}
    served_calls: List[int] = []
    fired: set = set()

    def pre_hook(mod: nn.Module, args: Tuple[Any, ...]) -> None:
        watcher.stack.append(id(mod))
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        if calls[id(mod)] > 1 and watcher.problem is None:
            watcher.problem = f"module {type(mod).__name__} is called more than once per pass"

    recorded: List[Tuple[Tensor, int]] = []

    def fwd_hook(mod: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        watcher.stack.pop()
        a = args[0] if args else None
        if not isinstance(a, Tensor) or not isinstance(out, Tensor):
            if watcher.problem is None:
                watcher.problem = f"module {type(mod).__name__} did not take and return one tensor"
            return
        served = by_module[id(mod)][1]
        a_saved = a if create_graph else a.detach()
        if not out.requires_grad:
            if watcher.problem is None:
                watcher.problem = f"the output of {type(mod).__name__} does not depend on the inputs"
            return

        def grad_hook(g: Tensor) -> None:
            fired.add(id(mod))
            gg = g if create_graph else g.detach()
            n = gg.shape[0]
            for name, attr in served:
                if attr == "weight" and not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    for sl, rows, grads in _weight_blocks(mod, a_saved, gg, chunk_size, block_numel, chunk_bytes):
                        consume(name, grads, sl, rows)
                else:
                    rows = slice(0, getattr(mod, attr).shape[0])
                    for start in range(0, n, chunk_size or n):
                        sl = slice(start, min(start + (chunk_size or n), n))
                        consume(name, _small_grads(mod, attr, a_saved[sl], gg[sl]), sl, rows)

        # A tensor hook registered now receives the gradient of this value even if a later
        # in-place operation (ReLU(inplace=True)) overwrites the tensor.
        out.register_hook(grad_hook)
        served_calls.append(id(mod))
        recorded.append((out, out._version))

    with ExitStack() as stack:
        for mod, _ in by_module.values():
            stack.callback(mod.register_forward_pre_hook(pre_hook).remove)
            stack.callback(mod.register_forward_hook(fwd_hook).remove)
        if not inputs.is_floating_point():
            raise NotCovered(f"inputs of dtype {inputs.dtype} cannot carry the backward pass")
        leaf = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            x = leaf.clone()  # not a leaf: a model may modify its input in place
            with watcher:
                out = model(x)
            if watcher.problem is not None:
                raise NotCovered(watcher.problem)
            losses = per_sample_losses(out)
            if losses.shape != (x.shape[0],):
                raise ValueError(f"per-sample losses must have shape ({x.shape[0]},), got {tuple(losses.shape)}")
            if served_calls:
                # Every hooked output must receive its gradient. Asking for the gradients of the hooked
                # outputs themselves stops the pass there (no input gradient of the first layer); an
                # output modified in place since (ReLU(inplace=True) after a BatchNorm) would be asked
                # for its new value, so then the pass goes down to the input.
                unchanged = all(o._version == v for o, v in recorded)
                targets = [o for o, _ in recorded] if unchanged and not create_graph else [leaf]
                torch.autograd.grad(losses.sum(), targets, create_graph=create_graph, allow_unused=True)
                del targets
        # a module never called, or whose output does not reach the loss, has zero gradients
        n = x.shape[0]
        for mod, served in by_module.values():
            if id(mod) not in fired:
                for name, attr in served:
                    p = getattr(mod, attr)
                    zeros = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
                    consume(name, zeros, slice(0, n), slice(0, p.shape[0]))
    return losses if create_graph else losses.detach()
