"""kernels.triton.launch: a compiled kernel is reused only for arguments it was compiled for
(a stand-in kernel records which path each launch took; no GPU)."""
import pytest
import torch
from triton.compiler import CompiledKernel

from vllm_nsa.kernels.triton import launch as launch_module
from vllm_nsa.kernels.triton.launch import launch


class StandInCompiled(CompiledKernel):
    """What Triton's path returns: a compiled kernel launched as compiled[grid](*args)."""

    module = None        # nothing loaded on a device: CompiledKernel.__del__ unloads nothing

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class StandInKernel:
    """A @triton.jit kernel: arg_names, and kernel[grid](**kwargs) compiles (logged) and
    returns the compiled kernel, or None as the interpreter does."""

    arg_names = ["x_ptr", "out_ptr", "n", "BLOCK"]

    def __init__(self, interpreted=False):
        self.log = []
        self.interpreted = interpreted

    def __getitem__(self, grid):
        def run(**kwargs):
            self.log.append(("triton", grid, kwargs))
            return None if self.interpreted else StandInCompiled(self.log)
        return run


@pytest.fixture(autouse=True)
def direct_on(monkeypatch):
    monkeypatch.setattr(launch_module, "DIRECT", True)


def paths(kernel):
    return [entry[0] for entry in kernel.log]


def test_repeat_with_other_tensors_is_direct_and_passes_them_in_order():
    kernel = StandInKernel()
    x, out = torch.zeros(64), torch.zeros(64)
    launch(kernel, (4,), x_ptr=x, out_ptr=out, n=64, BLOCK=16)
    x2, out2 = torch.ones(64), torch.ones(64)
    launch(kernel, (4, 2), out_ptr=out2, x_ptr=x2, n=64, BLOCK=16)
    assert paths(kernel) == ["triton", "direct"]
    _, grid, args = kernel.log[1]
    assert grid == (4, 2, 1)
    assert args[0] is x2 and args[1] is out2 and args[2:] == (64, 16)


@pytest.mark.parametrize("change", ["int", "constexpr", "dtype", "alignment", "option"])
def test_other_specialisation_takes_triton_path(change):
    kernel = StandInKernel()
    x = torch.zeros(64, dtype=torch.float16)
    base = dict(x_ptr=x, out_ptr=torch.zeros(64), n=64, BLOCK=16)
    launch(kernel, (1,), **base)
    changed = dict(base)
    if change == "int":
        changed["n"] = 1             # Triton folds n == 1 into the code
    elif change == "constexpr":
        changed["BLOCK"] = 32
    elif change == "dtype":
        changed["x_ptr"] = x.to(torch.bfloat16)
    elif change == "alignment":
        changed["x_ptr"] = x[1:]     # 2 bytes past a 16-byte boundary
    else:
        changed["num_warps"] = 8
    launch(kernel, (1,), **changed)
    launch(kernel, (1,), **changed)
    assert paths(kernel) == ["triton", "triton", "direct"]


def test_interpreter_and_switch_off_always_take_triton_path(monkeypatch):
    interpreted = StandInKernel(interpreted=True)
    args = dict(x_ptr=torch.zeros(8), out_ptr=torch.zeros(8), n=8, BLOCK=8)
    launch(interpreted, (1,), **args)
    launch(interpreted, (1,), **args)
    assert paths(interpreted) == ["triton", "triton"]
    monkeypatch.setattr(launch_module, "DIRECT", False)
    kernel = StandInKernel()
    launch(kernel, (1,), **args)
    launch(kernel, (1,), **args)
    assert paths(kernel) == ["triton", "triton"]


def test_memo_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(launch_module, "MAX_KEYS", 2)
    kernel = StandInKernel()
    args = dict(x_ptr=torch.zeros(8), out_ptr=torch.zeros(8), BLOCK=8)
    for n in (8, 9, 10, 8):
        launch(kernel, (1,), n=n, **args)
    # The third key cleared the memo, so n=8 compiles again.
    assert paths(kernel) == ["triton"] * 4
    assert len(launch_module._memo[kernel]) == 2
