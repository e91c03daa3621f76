"""How every merge_engine op is declared: once, with torch.library, as bitsandbytes and torchao do.

    @op("trim_by_magnitude", fake="x")
    def trim_by_magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
        '''docstring'''
        ...                                   # the pure-PyTorch reference: the default kernel everywhere

    @trim_by_magnitude.register_kernel("cpu")  # a device kernel, registered when its module loads
    def _(x, density, rescale=False): ...

`op` declares merge_engine::<name> (visible as torch.ops.merge_engine.<name>) with the reference as its
default implementation and a fake (meta) implementation, so it traces under torch.compile and
torch.export. It returns a plain function with the reference's own signature and docstring (torch's
op object shows only `(*args, **kwargs)` to help() and inspect.signature), which carries
register_kernel, register_fake and register_autograd, and the op objects (functional, out_overload).

With `out=True` the op also gets an out overload, merge_engine::<name>.out, that writes its result
into a caller's tensor (mutated, returns nothing; its first argument, since torch.library takes no
keyword-only tensors), as ATen's out= variants do: the function then takes `out=None` and returns `out`
when given. The reference and every device kernel of
such an op take `out` themselves and may return either `out` (written in place) or a fresh result
(copied into `out`), so each backend chooses how it fills a caller's buffer under one contract.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

NAMESPACE = "merge_engine"


def op(name: str, *, mutates_args=(), fake: str | Callable | None = None, out: bool = False) -> Callable:
    """Declare the decorated reference as the op merge_engine::<name> (see the module docstring). `fake`
    names the argument whose shape and dtype the result has (the first tensor of a list), or is a fake
    implementation; ops that return nothing need none."""
    def declare(reference: Callable) -> Callable:
        declared = _Declared(name, reference, mutates_args, fake, out)

        @functools.wraps(reference)
        def call(*args, **kwargs):
            return declared(*args, **kwargs)
        call.__signature__ = inspect.signature(reference)  # out=None included where the op has one
        call.register_kernel = declared.register_kernel
        call.register_fake = declared.functional.register_fake
        call.register_autograd = declared.functional.register_autograd
        call.functional, call.out_overload = declared.functional, declared.out_overload
        return call
    return declare


class _Declared:
    """The torch.library ops of one merge_engine op: the functional one and, optionally, its out overload."""

    def __init__(self, name: str, reference: Callable, mutates_args, fake, out: bool):
        signature = inspect.signature(reference)
        self.signature = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "out"])
        self.functional = torch.library.custom_op(f"{NAMESPACE}::{name}", self._without_out(reference),
                                                  mutates_args=mutates_args)
        if isinstance(fake, str):
            fake = self._empty_like(fake)
        if fake is not None:
            self.functional.register_fake(fake)
        self.out_overload = None
        if out:
            arguments = str(self.functional._opoverload._schema).split("(", 1)[1].rsplit(") ->", 1)[0]
            self.out_overload = torch.library.custom_op(
                f"{NAMESPACE}::{name}.out", _into_out(reference), mutates_args=("out",),
                schema=f"(Tensor(a!) out{', ' if arguments else ''}{arguments}) -> ()")  # torch.library: no keyword-only tensors
            self.out_overload.register_fake(lambda out, *args, **kwargs: None)

    def __call__(self, *args, out: Optional[torch.Tensor] = None, **kwargs):
        if out is None:
            return self.functional(*args, **kwargs)
        if self.out_overload is None:
            raise TypeError(f"{self.functional._name}() got an unexpected keyword argument 'out'")
        self.out_overload(out, *args, **kwargs)
        return out

    def register_kernel(self, device_type: str) -> Callable:
        """Register fn as the kernel for a device type, of the out overload too when there is one (fn
        then takes `out` and returns `out` or a fresh result)."""
        def register(fn: Callable) -> Callable:
            self.functional.register_kernel(device_type)(self._without_out(fn))
            if self.out_overload is not None:
                self.out_overload.register_kernel(device_type)(_into_out(fn))
            return fn
        return register

    def _without_out(self, fn: Callable) -> Callable:
        """fn under the signature without out (the functional schema comes from it), called with
        out=None when it takes one."""
        takes_out = "out" in inspect.signature(fn).parameters

        @functools.wraps(fn)
        def functional(*args, **kwargs):
            return fn(*args, **kwargs, out=None) if takes_out else fn(*args, **kwargs)
        functional.__signature__ = self.signature
        return functional

    def _empty_like(self, argument: str) -> Callable:
        def fake(*args, **kwargs):
            bound = self.signature.bind(*args, **kwargs)
            value = bound.arguments[argument]
            return torch.empty_like(value[0] if isinstance(value, (list, tuple)) else value)
        return fake


def _into_out(fn: Callable) -> Callable:
    """The out overload's implementation: fn's result lands in out (written there, or copied)."""
    def into_out(out: torch.Tensor, *args, **kwargs) -> None:
        result = fn(*args, **kwargs, out=out)
        if result is not out:
            out.copy_(result)
    return into_out
