"""Triton kernels launched with less host work: the FP8 casts and the weight
gradients' unfold run hundreds of times a step, in steps the host limits.

On the H200's host, Triton 3.6's ``JITFunction.run`` spent 36.9 us per launch
of the cast kernel, this path 18.0 us (one process, GPU held busy; the
compiled kernel's launcher alone takes 14-20 us). The rest (its binder's
specialization of every argument, option parsing, a cache-key string, checks
of global values, hooks) is the same for every launch of one variant.

``Launched`` keeps a table of the variants Triton compiled, keyed finer than
Triton specializes: Triton 3.6 specializes a tensor argument on its dtype and
on whether its address is a multiple of 16, an integer on being 1 or a
multiple of 16, and compiles each constexpr value apart; the key holds each
tensor argument's dtype and address modulo 16, and the type and value of every
other argument and option. Equal keys therefore mean equal argument
specializations, and a variant is never run on arguments it was not compiled
for. A key seen first goes through Triton's own launch, which compiles or
finds the variant; later ones go straight to its launcher. So Triton's debug
and instrumentation knobs are read at a key's first launch only, and its
launch hooks (``knobs.runtime.launch_enter_hook``, for its own profiler) are
not called on the direct path.
"""

import functools

import torch
from triton.runtime import driver


class Launched:
    """A ``triton.jit`` kernel (decorated: ``@Launched`` above ``@triton.jit``),
    launched as Triton launches it, ``kernel[grid](*args, **kw)``, with its
    tensor and scalar arguments positional and its constexprs and options
    (``num_warps``) by name."""

    def __init__(self, fn):
        self.fn, self.variants = fn, {}

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        device = torch.cuda.current_device()
        # Types beside values: 1, 1.0 and True are equal keys, not equal arguments.
        key = (device, *((name, type(v), v) for name, v in kwargs.items()),
               *((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else (type(a), a)
                 for a in args))
        variant = self.variants.get(key)
        if variant is None:
            kernel = self.fn[grid](*args, **kwargs)
            if kernel is not None:  # None: Triton did not compile one (its interpreter, a hook)
                # The launcher takes every parameter in order, the constexprs too.
                self.variants[key] = (kernel, self.fn.arg_names[len(args):])
            return
        kernel, named = variant
        x, y, z = (*grid, 1, 1)[:3]
        kernel.run(x, y, z, driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args,
                   *(kwargs[name] for name in named))
