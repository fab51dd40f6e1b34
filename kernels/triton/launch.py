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

`LayerReplay` goes further for the layers of one step: it records the launches of one
layer and, once a second layer has launched exactly the same (the same kernels, grids and
values, each tensor at the same offset into that layer's own inputs), replays them for the
next layers with only those pointers moved: no stage wrapper, argument binding or key.

VLLM_NSA_DIRECT_LAUNCH=0 sends every launch through Triton's own path and turns the replay
off (the baseline of `benchmarks/bench_kernels.py host`). Under TRITON_INTERPRET=1 launches
return nothing compiled, so every launch takes Triton's path and nothing is replayed.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from triton import knobs
from triton.compiler import CompiledKernel

DIRECT = os.environ.get("VLLM_NSA_DIRECT_LAUNCH", "1") != "0"
# Keys per kernel before the memo starts over: a step adds one key per launch site whose
# integers changed, so this holds a few hundred steps of a steady load.
MAX_KEYS = 256

_memo: dict[object, dict[tuple, CompiledKernel]] = {}
# While a LayerReplay records: (compiled kernel, grid, arguments) of every launch, None for
# one it could not replay (Triton's path returned nothing compiled).
_recorded: list | None = None


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
        if _recorded is not None:
            _recorded.append(None)
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
    grid = (*grid, 1, 1)[:3]
    if compiled is not None:
        compiled[grid](*args)
    else:
        compiled = kernel[grid](**kwargs)
        if not isinstance(compiled, CompiledKernel):
            compiled = None
        elif len(compiled_of) >= MAX_KEYS:
            compiled_of.clear()
        if compiled is not None:
            compiled_of[key] = compiled
    if _recorded is not None:
        _recorded.append(None if compiled is None else (compiled, grid, args))


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor view can reach."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), tensor.data_ptr()
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (span + 1) * tensor.element_size()


class _Template:
    """The launches of one layer with every pointer into the layer's inputs written as
    (input, byte offset): `signature` compares two layers, `run` launches for new inputs."""

    def __init__(self, recorded: list, inputs: tuple[torch.Tensor, ...], layout: tuple
                 ) -> None:
        self.layout = layout
        extents = [_extent(tensor) for tensor in inputs]
        self.launches = []       # (runner, arguments with constants in place, slots)
        self.keep = []           # tensors outside the inputs: alive while replayed
        signature = []
        for compiled, grid, args in recorded:
            values, slots = [], []
            for position, arg in enumerate(args):
                if type(arg) in _PLAIN:
                    values.append(arg)
                    continue
                pointer = arg.data_ptr()
                owner = next((i for i, (first, last) in enumerate(extents)
                              if first <= pointer < last), None)
                if owner is None:
                    values.append(pointer)
                    self.keep.append(arg)
                else:
                    values.append(None)
                    slots.append((position, owner, pointer - extents[owner][0]))
            runner = compiled[grid]      # also loads the kernel (compiled.function)
            self.launches.append((runner, compiled.run, grid, compiled.function,
                                  compiled.packed_metadata, values, tuple(slots)))
            signature.append((id(compiled), grid, tuple(values), tuple(slots)))
        self.signature = tuple(signature)
        device = inputs[0].device
        self.stream_device = device.index if device.type == "cuda" else None

    def run(self, inputs: tuple[torch.Tensor, ...]) -> None:
        bases = [tensor.data_ptr() for tensor in inputs]
        # What CompiledKernel[grid](*args) does, less its device, stream and metadata
        # lookups per launch: the launcher with this layer's stream, no launch hooks.
        hooked = _hooked(knobs.runtime.launch_enter_hook) or _hooked(
            knobs.runtime.launch_exit_hook)
        stream = (torch._C._cuda_getCurrentRawStream(self.stream_device)
                  if self.stream_device is not None else 0)
        for runner, launcher, grid, function, metadata, values, slots in self.launches:
            args = values.copy()
            for position, owner, offset in slots:
                args[position] = bases[owner] + offset
            if hooked:
                runner(*args)
            else:
                launcher(grid[0], grid[1], grid[2], stream, function, metadata, None, None,
                         None, *args)


def _hooked(hook) -> bool:
    """Whether a launch hook does anything (Triton 3.4+ always holds a HookChain, empty
    unless a profiler added a call)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _layout(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
                 for tensor in inputs)


class LayerReplay:
    """Replays one layer's launches for the other layers of a step (module docstring).

    `run(step, inputs, launches)`: `launches()` makes a layer's launches, every GPU op of it
    through `launch` (the stage functions allocate nothing: scratch lives in the step's
    plan), reading only `inputs` (this layer's own tensors) and tensors shared by the whole
    step. A new `step` (any object, held until the next) starts over. The first two layers
    of a step run `launches()` and are recorded; when the second repeats the first (same
    kernels, grids, constants and offsets into its inputs), the later layers with inputs
    of the same shapes, strides and dtypes and the same `constants` are replayed. Anything
    else (a launch Triton's path could not hand back, no launches at all, other layouts)
    runs `launches()`."""

    def __init__(self) -> None:
        self._step = None
        self._first: _Template | None = None      # the last recorded layer
        self._verified: _Template | None = None   # one that a second layer repeated

    def forget(self) -> None:
        """Drop the recorded layers and the step (and the step-shared tensors they hold):
        call before allocating the next step's scratch, so two steps' never live at once."""
        self._step, self._first, self._verified = None, None, None

    def run(self, step: object, inputs: tuple[torch.Tensor, ...],
            launches: Callable[[], object], constants: tuple = ()) -> None:
        """constants: everything else `launches()` reads that may differ between layers
        (a layer's scale, parameters): a layer replays only with the recorded ones."""
        global _recorded
        if step is not self._step:
            self.forget()
            self._step = step
        if _recorded is not None or not DIRECT:   # nested, or replay off
            launches()
            return
        layout = (_layout(inputs), constants)
        if self._verified is not None and layout == self._verified.layout:
            self._verified.run(inputs)
            return
        _recorded = []
        try:
            launches()
            recorded = _recorded
        finally:
            _recorded = None
        if not recorded or None in recorded:
            self._first = None
            return
        template = _Template(recorded, inputs, layout)
        if (self._first is not None and layout == self._first.layout
                and template.signature == self._first.signature):
            self._verified = template
        self._first = template
