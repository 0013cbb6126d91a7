"""``kernel_op``: our custom ops, registered on the dispatcher without
``torch.library.custom_op``'s Python layers.

A ``custom_op`` call runs, in Python, its autograd kernel (which redispatches
even under ``no_grad``, as the compiled graphs call it), its backend wrapper
and an output alias check before the function. On the H200 hosts that cost
27.6 us a call against 14.5 us for the same schema defined here with its
fake and autograd (8.4 us without autograd), and an 8B step calls ours about
450 times, most where the host is the limit. The op keeps ``custom_op``'s
interface: the schema comes from the annotations, ``register_fake`` and
``register_autograd`` take the same functions, and ``torch.ops`` holds it.
Ops that mutate an argument stay ``custom_op``: it also bumps the mutated
tensor's version counter, which autograd's saved-tensor checks read.

What ``custom_op`` checks and this does not: that no output aliases an input
(every kernel here returns fresh tensors), and that an op without a registered
backward is not differentiated (torch's fallback warns in eager and yields no
gradient under compile; ours without one run inside backward formulas or
``autograd.Function`` forwards, or, ``rmsnorm_swiglu``, have their gradient
taken by the op that consumes them).
"""

import functools
from collections.abc import Callable

import torch

# A function's own device names, as the dispatcher keys them; none: every device.
_DISPATCH_KEYS = {"cuda": "CUDA", "cpu": "CPU", None: "CompositeExplicitAutograd"}

# One library per op, as custom_op keeps one, and only here: a redefined op (its
# module reloaded) drops the old one, and its registrations with it. Kept across
# a reload of this module, which would otherwise free every op's registrations
# while their callers still hold them.
_LIBRARIES: dict[str, torch.library.Library] = globals().get("_LIBRARIES", {})


class KernelOp:
    """One op ``namespace::name`` with ``fn`` as its kernel on ``device_type``."""

    def __init__(self, qualname: str, fn: Callable, device_type: str | None):
        namespace, _, name = qualname.partition("::")
        if not namespace or not name or "::" in name:
            raise ValueError(f"kernel_op {qualname!r}: the name must be 'namespace::name'")
        if device_type not in _DISPATCH_KEYS:
            raise ValueError(f"kernel_op {qualname}: device_type must be one of "
                             f"{sorted(_DISPATCH_KEYS, key=str)}, got {device_type!r}")
        # Before the old op is dropped: a function without a schema leaves it working.
        schema = torch.library.infer_schema(fn, mutates_args=())
        _LIBRARIES.pop(qualname, None)
        lib = _LIBRARIES[qualname] = torch.library.Library(namespace, "FRAGMENT")
        lib.define(name + schema)
        # Dynamo must never trace the kernel's Python, should torch.compile run
        # the op eagerly (a graph break at it), as custom_op ensures.
        lib.impl(name, torch.compiler.disable(fn), _DISPATCH_KEYS[device_type])
        self._qualname = qualname
        self._overload = getattr(getattr(torch.ops, namespace), name).default
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self._overload(*args, **kwargs)

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self._qualname, fake, lib=_LIBRARIES[self._qualname])
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self._qualname, backward, setup_context=setup_context,
                                        lib=_LIBRARIES[self._qualname])


def kernel_op(qualname: str, device_type: str | None = "cuda") -> Callable[[Callable], KernelOp]:
    """Decorator: ``fn`` (fully annotated, mutating nothing) as the op ``qualname``."""
    return functools.partial(KernelOp, qualname, device_type=device_type)
