"""Kernel launches with less host time: the one place that reaches into Triton's runtime.

`kernel[grid](**kwargs)` spends ~25 us of host time per launch in Triton's Python path
(binding ~30 arguments, specialising each, hashing the cache key, looking up the stream),
and an NSA layer makes 3-6 launches: 32 layers of a mixed batch cost 4-7 ms per step
before the GPU starts. Most launches of a step repeat one seen a layer earlier with the same
integers and only other tensors (the next layer's caches, q and output), so `launch` keeps
the compiled kernel of each (kernel, argument key) and calls it directly (Triton's
`CompiledKernel[grid](*args)`). The key holds every non-tensor argument by value and each
tensor's dtype and 16-byte alignment, which is at least as fine as Triton's own
specialisation (dtype, alignment; integers by ==1, divisibility by 16 and width), so a direct
call never runs a variant compiled for other arguments. A new key (a new step's sizes)
takes Triton's path once and records the kernel it returns.

VLLM_NSA_DIRECT_LAUNCH=0 sends every launch through Triton's own path (the baseline of
`benchmarks/bench_kernels.py host`). Under TRITON_INTERPRET=1 launches return nothing
compiled, so every launch takes Triton's path.
"""
from __future__ import annotations

import os

from triton.compiler import CompiledKernel

DIRECT = os.environ.get("VLLM_NSA_DIRECT_LAUNCH", "1") != "0"
# Keys per kernel before the memo starts over: a step adds one key per launch site whose
# integers changed, so this holds a few hundred steps of a steady load.
MAX_KEYS = 256

_memo: dict[object, dict[tuple, CompiledKernel]] = {}


_PLAIN = frozenset({int, float, bool, str, type(None)})


def argument_key(args) -> tuple:
    """Everything of `args` a compiled Triton kernel is specialised on (and more): plain
    values as they are, tensors by dtype and 16-byte alignment. (`type(a) in _PLAIN`, not
    isinstance on torch.Tensor: the latter costs a few microseconds per launch.)"""
    return tuple([a if type(a) in _PLAIN else (a.dtype, a.data_ptr() % 16 == 0)
                  for a in args])


def launch(kernel, grid: tuple[int, ...], **kwargs) -> None:
    """kernel[grid](**kwargs), reusing the compiled kernel of an earlier launch with the
    same argument key. kwargs: every kernel argument by name, then launch options
    (num_warps, num_stages)."""
    if not DIRECT:
        kernel[grid](**kwargs)
        return
    names = kernel.arg_names
    args = [kwargs[name] for name in names]
    options = tuple(item for item in kwargs.items() if item[0] not in names) \
        if len(kwargs) > len(names) else ()
    # The device too (every NSA kernel's first argument is a tensor): a compiled kernel is
    # loaded on the device it first ran on.
    key = (argument_key(args), options, args[0].get_device())
    compiled_of = _memo.setdefault(kernel, {})
    compiled = compiled_of.get(key)
    if compiled is not None:
        compiled[(*grid, 1, 1)[:3]](*args)
        return
    compiled = kernel[grid](**kwargs)
    if isinstance(compiled, CompiledKernel):
        if len(compiled_of) >= MAX_KEYS:
            compiled_of.clear()
        compiled_of[key] = compiled
