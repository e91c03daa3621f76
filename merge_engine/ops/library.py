"""How every merge_engine op is declared: once, with torch.library, as bitsandbytes and torchao do.

    @op("trim_by_magnitude", fake="x", floating=("x",))
    def trim_by_magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
        '''docstring'''
        ...                                   # the pure-PyTorch reference: the default kernel everywhere

    @trim_by_magnitude.register_kernel("cpu")  # a device kernel, registered when its module loads
    def _(x, density, rescale=False): ...

`op` declares merge_engine::<name> (visible as torch.ops.merge_engine.<name>) with the reference as its
default implementation and a fake (meta) implementation, so it traces under torch.compile and
torch.export. It returns a plain function with the reference's own signature and docstring (torch's
op object shows only `(*args, **kwargs)` to help() and inspect.signature), which carries
register_kernel, register_fake and register_autograd, and the op overloads (functional, out_overload).

The ops are declared with torch.library's define/impl (as bitsandbytes does), not custom_op: custom_op
wraps every kernel in torch._disable_dynamo, whose first call imports torch._dynamo, 1.8 s of every
process's first merge on this machine, though nothing compiles. Here a kernel turns dynamo off only
once torch._dynamo is loaded (torch.compile and torch.export load it before they can run anything).
Mutating ops bump the versions of what they mutate, as custom_op's do.

With `out=True` the op also gets an out overload, merge_engine::<name>.out, that writes its result
into a caller's tensor (mutated, returns nothing; its first argument, since torch.library takes no
keyword-only tensors), as ATen's out= variants do: the function then takes `out=None`, by keyword only, and
returns `out` when given. The reference and every device kernel of such an op take `out` themselves and may
return either `out` (written in place) or a fresh result (copied into `out`), so each backend chooses how it
fills a caller's buffer under one contract.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, Optional

import torch

NAMESPACE = "merge_engine"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


class promoted:
    """fake=promoted("base", "experts", at_least=torch.float32): the result has the first named argument's
    shape (the first tensor of a list) and the dtype torch promotes every named tensor (and at_least) to;
    contiguous=True: it is contiguous whatever the inputs' strides (else it has the first one's)."""

    def __init__(self, *arguments: str, at_least: torch.dtype | None = None, contiguous: bool = False):
        self.arguments, self.at_least = arguments, at_least
        self.memory_format = torch.contiguous_format if contiguous else torch.preserve_format


class contiguous:
    """fake=contiguous("a"): the named argument's shape and dtype (the first tensor of a list), contiguous
    whatever its strides (fake="a" keeps them), for ops that always return a fresh contiguous result."""

    def __init__(self, argument: str):
        self.argument = argument


def op(name: str, *, mutates_args=(), fake: str | promoted | contiguous | Callable | None = None, out: bool = False,
       differentiable: bool = False, floating: tuple[str, ...] = ()) -> Callable:
    """Declare the decorated reference as the op merge_engine::<name> (see the module docstring). `fake`
    names the argument whose shape and dtype the result has (the first tensor of a list), says how the
    result's dtype is promoted (`promoted`), or is a fake implementation; ops that return nothing need none.
    An op that is not `differentiable` (one that registers its own autograd formula is) gets a backward that
    raises: an output computed from tensors that require grad then says so when a gradient reaches it, on
    every backend alike and under torch.compile (without one, torch's fallback gives None gradients, or the
    reference's own).
    `floating` names the arguments whose tensors every backend refuses unless they are floating point."""
    def declare(reference: Callable) -> Callable:
        declared = _Declared(name, reference, mutates_args, fake, out, floating)
        if not differentiable and declared.functional._schema.returns and not mutates_args:
            declared.register_autograd(_no_derivative(name), setup_context=_save_input_likes)

        @functools.wraps(reference)
        def call(*args, **kwargs):
            return declared(*args, **kwargs)
        call.__signature__ = _out_keyword_only(inspect.signature(reference))
        call.register_kernel = declared.register_kernel
        call.register_fake = declared.register_fake
        call.register_autograd = declared.register_autograd
        call.functional, call.out_overload = declared.functional, declared.out_overload
        call.floating = floating
        return call
    return declare


def _out_keyword_only(signature: inspect.Signature) -> inspect.Signature:
    """The reference's signature as the function takes it: out (where the op has one) only by keyword, as ATen's."""
    return signature.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.name == "out" else p
                                         for p in signature.parameters.values()])


class _Declared:
    """The torch.library ops of one merge_engine op: the functional one and, optionally, its out overload."""

    def __init__(self, name: str, reference: Callable, mutates_args, fake, out: bool, floating: tuple[str, ...]):
        signature = inspect.signature(reference)
        self.name, self.floating = name, floating
        self.signature = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "out"])
        reference = self._floating_only(reference, signature)
        functional = self._without_out(reference)
        _LIBRARY.define(name + torch.library.infer_schema(functional, mutates_args=mutates_args))
        self.functional = getattr(torch.ops.merge_engine, name).default
        _declare_implementation(self.functional, functional)
        if isinstance(fake, str):
            fake = self._empty_like(fake, torch.preserve_format)
        if isinstance(fake, contiguous):
            fake = self._empty_like(fake.argument, torch.contiguous_format)
        if isinstance(fake, promoted):
            fake = self._empty_promoted(fake)
        if fake is None and not self.functional._schema.returns:  # mutates only: nothing to make
            fake = _returns_nothing
        if fake is not None:
            self.register_fake(fake)
        self.out_overload = None
        if out:
            arguments = str(self.functional._schema).split("(", 1)[1].rsplit(") ->", 1)[0]
            # torch.library takes no keyword-only tensors: out comes first
            _LIBRARY.define(f"{name}.out(Tensor(a!) out{', ' if arguments else ''}{arguments}) -> ()")
            self.out_overload = getattr(torch.ops.merge_engine, name).out
            _declare_implementation(self.out_overload, _into_out(reference, name))
            torch.library.register_fake(self.out_overload, _real_devices_only(name, self._out_checked), lib=_LIBRARY)

    def __call__(self, *args, out: Optional[torch.Tensor] = None, **kwargs):
        if out is None:
            return self.functional(*args, **kwargs)
        if self.out_overload is None:
            raise TypeError(f"{NAMESPACE}::{self.name}() got an unexpected keyword argument 'out'")
        self.out_overload(out, *args, **kwargs)
        return out

    def _out_checked(self, out: torch.Tensor, *args, **kwargs) -> None:
        """The out overload's fake: out must be like the functional op's (fake) result, as every real kernel checks."""
        check_out(self.name, out, self.functional(*args, **kwargs))

    def register_kernel(self, device_type: str) -> Callable:
        """Register fn as the kernel for a device type, of the out overload too when there is one (fn
        then takes `out` and returns `out` or a fresh result)."""
        def register(fn: Callable) -> Callable:
            kernel = self._floating_only(fn, inspect.signature(fn))
            _impl(self.functional, self._without_out(kernel), _DISPATCH_KEYS[device_type])
            if self.out_overload is not None:
                _impl(self.out_overload, _into_out(kernel, self.name), _DISPATCH_KEYS[device_type])
            return fn
        return register

    def register_fake(self, fn: Callable) -> Callable:
        fake = _real_devices_only(self.name, self._floating_only(fn, self.signature))
        torch.library.register_fake(self.functional, fake, lib=_LIBRARY)
        return fn

    def _floating_only(self, fn: Callable, signature: inspect.Signature) -> Callable:
        """fn (a reference, kernel or fake, whose arguments bind to signature), refusing tensors of the op's floating
        arguments that are not floating point: a complex one would lose its imaginary part, an integer one give a
        truncated result."""
        if not self.floating:
            return fn

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            for argument in self.floating:
                for t in _tensors_in(bound.arguments.get(argument)):
                    if not t.dtype.is_floating_point:
                        raise ValueError(f"{NAMESPACE}::{self.name}: {argument} must be floating-point, got {t.dtype}")
            return fn(*args, **kwargs)
        return checked

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        torch.library.register_autograd(self.functional, backward, setup_context=setup_context, lib=_LIBRARY)

    def _without_out(self, fn: Callable) -> Callable:
        """fn under the signature without out (the functional schema comes from it), called with
        out=None when it takes one."""
        takes_out = "out" in inspect.signature(fn).parameters

        @functools.wraps(fn)
        def functional(*args, **kwargs):
            return fn(*args, **kwargs, out=None) if takes_out else fn(*args, **kwargs)
        functional.__signature__ = self.signature
        return functional

    def _empty_like(self, argument: str, memory_format: torch.memory_format) -> Callable:
        def fake(*args, **kwargs):
            bound = self.signature.bind(*args, **kwargs)
            value = bound.arguments[argument]
            return torch.empty_like(value[0] if isinstance(value, (list, tuple)) else value, memory_format=memory_format)
        return fake

    def _empty_promoted(self, rule: promoted) -> Callable:
        def fake(*args, **kwargs):
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            tensors = []
            for name in rule.arguments:
                value = bound.arguments[name]
                tensors += list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
            dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors[1:]], tensors[0].dtype)
            return torch.empty_like(tensors[0], dtype=dtype if rule.at_least is None
                                    else torch.promote_types(dtype, rule.at_least), memory_format=rule.memory_format)
        return fake


def _returns_nothing(*args, **kwargs) -> None:
    return None


def _real_devices_only(name: str, fake: Callable) -> Callable:
    """fake, refusing meta tensors mixed with real ones: the dispatcher then picks the meta kernel (the fake),
    which would return an uninitialised result (or do nothing) for the real tensors, where torch's own ops
    raise. Under a FakeTensorMode every tensor reports its real device, so tracing is unaffected."""
    def checked(*args, **kwargs):
        devices = {t.device.type for t in _tensors_in((args, kwargs))}
        if "meta" in devices and len(devices) > 1:
            raise RuntimeError(f"{NAMESPACE}::{name}: meta tensors mixed with tensors on "
                               f"{', '.join(sorted(devices - {'meta'}))}")
        return fake(*args, **kwargs)
    return checked


def _tensors_in(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors_in(v)] if isinstance(value, (list, tuple)) else []


def _no_derivative(name: str) -> Callable:
    """The backward of an op without a derivative: one gradient per floating input from the refusing op below,
    which raises when it runs (in eager, at once) and not while AOTAutograd traces the backward of a compiled
    forward (raising there would fail the whole compile, though no backward may ever run)."""
    def backward(ctx, *grads):
        grad = next(g for g in grads if g is not None)
        passed = ctx.input_likes[:len(ctx.needs_input_grad)]  # setup_context also saw the defaults not passed
        return tuple(_refused_gradient(grad, name, like) for like in passed)
    return backward


def _save_input_likes(ctx, inputs, output) -> None:
    ctx.input_likes = [_like(value) for value in inputs]


def _like(value):
    """(shape, dtype) of a floating tensor, a list of _like for a list of tensors, else None (no gradient)."""
    if isinstance(value, (list, tuple)) and all(torch.is_tensor(v) for v in value):
        return [_like(v) for v in value]
    return (value.shape, value.dtype) if torch.is_tensor(value) and value.is_floating_point() else None


def _refused_gradient(grad: torch.Tensor, name: str, like):
    if isinstance(like, list):
        return [_refused_gradient(grad, name, v) for v in like]
    return None if like is None else torch.ops.merge_engine._no_derivative(grad, name, like[0], like[1])


def _raise_no_derivative(grad: torch.Tensor, name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    raise RuntimeError(f"{NAMESPACE}::{name} has no derivative: its output cannot be backpropagated through "
                       "(compute it from detached tensors, or under torch.no_grad())")


def _no_derivative_shape(grad: torch.Tensor, name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return grad.new_empty(shape, dtype=dtype)


_LIBRARY.define("_no_derivative(Tensor grad, str name, SymInt[] shape, ScalarType dtype) -> Tensor")
_LIBRARY.impl("_no_derivative", _raise_no_derivative, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::_no_derivative", _no_derivative_shape, lib=_LIBRARY)


def _dynamo_off_when_compiling(fn: Callable) -> Callable:
    """fn, run with dynamo turned off once torch._dynamo is loaded (as torch.library's own kernels are):
    before that nothing can be compiling, and loading it would cost every process 1.8 s."""
    disabled = None

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch._dynamo.disable(fn, recursive=True)
        return disabled(*args, **kwargs)
    return kernel


def _declare_implementation(overload: torch._ops.OpOverload, fn: Callable) -> None:
    """fn as the overload's default kernel on every device; mutated arguments get their version bumped
    (autograd then knows that tensors it saved have changed)."""
    _impl(overload, fn, "CompositeExplicitAutograd")
    if _argument_names(overload)[1]:  # it mutates some
        _LIBRARY.impl(_qualified_name(overload), _bump_versions(overload), "ADInplaceOrView", with_keyset=True)


def _impl(overload: torch._ops.OpOverload, fn: Callable, dispatch_key: str) -> None:
    """fn as the overload's kernel for dispatch_key."""
    _LIBRARY.impl(_qualified_name(overload), _dynamo_off_when_compiling(_refusing_inference_writes(overload, fn)),
                  dispatch_key)


def _refusing_inference_writes(overload: torch._ops.OpOverload, fn: Callable) -> Callable:
    """fn, refusing to write into an inference tensor outside torch.inference_mode(), as torch's in-place ops do:
    a compiled kernel writes through a data pointer, where torch's own check never runs."""
    names, written = _argument_names(overload)
    if not written:
        return fn

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            values = dict(zip(names, args)) | kwargs
            for name in written:
                if any(t.is_inference() for t in _tensors_in(values[name])):
                    raise RuntimeError(f"{overload._schema.name}: {name} is an inference tensor, which cannot be "
                                       "written outside torch.inference_mode() (clone it first, or call this op "
                                       "under torch.inference_mode())")
        return fn(*args, **kwargs)
    return kernel


def _argument_names(overload: torch._ops.OpOverload) -> tuple[list[str], list[str]]:
    """The names of the overload's arguments, and of those it writes into."""
    arguments = overload._schema.arguments
    return [a.name for a in arguments], [a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write]


def _qualified_name(overload: torch._ops.OpOverload) -> str:
    """'name' or 'name.overload', as Library.impl takes it."""
    name = overload._schema.name.split("::", 1)[1]
    return name if overload._overloadname == "default" else f"{name}.{overload._overloadname}"


def _bump_versions(overload: torch._ops.OpOverload) -> Callable:
    names, written = _argument_names(overload)

    def kernel(keyset, *args, **kwargs):
        values = dict(zip(names, args)) | kwargs
        if torch.is_grad_enabled():
            _refuse_grad(overload._schema.name, written, values)
        for name in written:
            for t in _tensors_in(values[name]):
                torch.autograd.graph.increment_version(t)
        return overload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)
    return kernel


def _refuse_grad(op_name: str, written: list[str], values: dict) -> None:
    """RuntimeError where autograd could not follow a write: into a tensor that requires grad, or (as ATen's out=
    variants refuse) from an input that does, whose derivative what is written would silently lack (the references'
    arithmetic would record one nobody computed, the compiled kernels none)."""
    for name in written:
        if any(t.requires_grad for t in _tensors_in(values[name])):
            raise RuntimeError(f"{op_name}: {name} requires grad, and this op writes into it without a derivative "
                               "(pass a tensor that does not require grad, or call it under torch.no_grad())")
    for name, value in values.items():
        if any(t.requires_grad for t in _tensors_in(value)):
            raise RuntimeError(f"{op_name}: {name} requires grad, and this op has no derivative for what it writes into "
                               f"{', '.join(written)} (pass tensors that do not require grad, or call it under "
                               "torch.no_grad())")


def _into_out(fn: Callable, name: str) -> Callable:
    """The out overload's implementation: fn's result lands in out (written there, or copied). A copy
    checks first that out is what the result is (copy_ would broadcast and cast silently)."""
    def into_out(out: torch.Tensor, *args, **kwargs) -> None:
        result = fn(*args, **kwargs, out=out)
        if result is not out:
            check_out(name, out, result)
            out.copy_(result)
    return into_out


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of memory that t's elements lie in (strides are never negative in torch)."""
    if not t.numel():
        return 0, 0
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory a and b lie in may overlap (their byte spans do: interleaved views count too)."""
    (a0, a1), (b0, b1) = byte_span(a), byte_span(b)
    return a.device == b.device and a0 < b1 and b0 < a1


def kernel_out(name: str, out: Optional[torch.Tensor], like: torch.Tensor,
               inputs: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """out as a compiled kernel may take it: checked to be like `like` (the result: ValueError, as the
    references say), and None where the kernel could not write it in place (not contiguous, or sharing memory
    with an input it reads while writing): the kernel then makes a fresh result, which the out overload copies
    into out, so that out= means the same on every backend."""
    if out is None:
        return None
    check_out(name, out, like)
    return out if writable_in_place(out, inputs) else None


def writable_in_place(out: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """Whether a result can be written into out element by element (or chunk by chunk) while the inputs are
    read: out is contiguous and shares no memory with them (a later element would read what an earlier wrote)."""
    return out.is_contiguous() and not any(spans_overlap(out, t) for t in inputs)


def check_out(name: str, out: torch.Tensor, like: torch.Tensor) -> None:
    """ValueError unless out has like's shape, dtype and device (ATen's out= rule, without resizing)."""
    if (out.shape, out.dtype, out.device) != (like.shape, like.dtype, like.device):
        raise ValueError(f"{NAMESPACE}::{name}: out must be a {like.dtype} tensor of shape {list(like.shape)} on "
                         f"{like.device} (the result's), got a {out.dtype} tensor of shape {list(out.shape)} on "
                         f"{out.device}")
