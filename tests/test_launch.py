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
    function = packed_metadata = None

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))

    def run(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata,
            enter_hook, exit_hook, *args):
        """The launcher a LayerReplay calls (what compiled[grid](*args) calls)."""
        self.log.append(("replay", (grid_x, grid_y, grid_z), args))


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


# ---------------------------------------------------------------- LayerReplay
def pointer_args(kernel):
    """Each launch of `kernel` as (grid, arguments), tensors as their addresses (a replay
    passes addresses)."""
    launches = []
    for path, grid, args in kernel.log:
        if path == "triton":
            args = [args[name] for name in kernel.arg_names]
        launches.append(((*grid, 1, 1)[:3], [a.data_ptr() if isinstance(a, torch.Tensor) else a
                                       for a in args]))
    return launches


class Layers:
    """Layers of one step: each has its own input and output buffers; the step shares
    `scratch`. `layer(i)` runs layer i's two launches through `replay` and counts how
    often the launches were made by running the stage code."""

    def __init__(self, replay, count=6, interpreted=False, temporary=False):
        self.first, self.second = StandInKernel(interpreted), StandInKernel(interpreted)
        self.replay = replay
        self.step = object()
        self.scratch = torch.zeros(32)
        self.inputs = [(torch.randn(64), torch.zeros(48)) for _ in range(count)]
        self.temporary = temporary
        self.ran = 0

    def launches(self, x, out, n):
        self.ran += 1
        launch(self.first, (2,), x_ptr=x, out_ptr=self.scratch, n=n, BLOCK=16)
        target = torch.zeros(48) if self.temporary else out
        launch(self.second, (3, 1), x_ptr=self.scratch[4:], out_ptr=target[8:], n=5,
               BLOCK=16)

    def layer(self, i, n=64, constants=()):
        x, out = self.inputs[i]
        self.replay.run(self.step, (x, out), lambda: self.launches(x, out, n), constants)

    def expected(self, i, n=64):
        x, out = self.inputs[i]
        return [((2, 1, 1), [x.data_ptr(), self.scratch.data_ptr(), n, 16]),
                ((3, 1, 1), [self.scratch.data_ptr() + 16, out.data_ptr() + 32, 5, 16])]


def test_layers_after_the_second_replay_the_first_with_their_own_pointers():
    layers = Layers(launch_module.LayerReplay())
    for i in range(6):
        layers.layer(i)
    assert layers.ran == 2
    first, second = pointer_args(layers.first), pointer_args(layers.second)
    assert first == [layers.expected(i)[0] for i in range(6)]
    assert second == [layers.expected(i)[1] for i in range(6)]
    # Layers 3-6 went straight to the launcher, with addresses, not tensors.
    assert paths(layers.first)[2:] == ["replay"] * 4
    assert all(type(arg) is int for arg in layers.first.log[-1][2][:2])


@pytest.mark.parametrize("case", ["temporary", "interpreted", "switched_off"])
def test_layers_that_cannot_be_replayed_always_run(case, monkeypatch):
    if case == "switched_off":
        monkeypatch.setattr(launch_module, "DIRECT", False)
    layers = Layers(launch_module.LayerReplay(), temporary=case == "temporary",
                    interpreted=case == "interpreted")
    for i in range(4):
        layers.layer(i)
    assert layers.ran == 4
    if case != "temporary":
        assert pointer_args(layers.first) == [layers.expected(i)[0] for i in range(4)]


def test_other_constants_layout_or_step_run_the_stage_code():
    replay = launch_module.LayerReplay()
    layers = Layers(replay, count=8)
    for i in range(3):
        layers.layer(i, constants=(1.0,))
    assert layers.ran == 2
    layers.layer(3, n=7, constants=(2.0,))          # another layer's parameters
    assert layers.ran == 3
    x, out = layers.inputs[4]
    layers.inputs[4] = (x[:32], out)                   # another shape
    layers.layer(4, constants=(1.0,))
    assert layers.ran == 4
    layers.layer(5, constants=(1.0,))                  # back to the replayed layout
    assert layers.ran == 4
    layers.step = object()                             # the next step starts over
    layers.layer(6, constants=(1.0,))
    assert layers.ran == 5
    first = pointer_args(layers.first)
    assert first[3] == layers.expected(3, n=7)[0]
    assert first[4][1][0] == layers.inputs[4][0].data_ptr()
    assert first[5] == layers.expected(5)[0] and first[6] == layers.expected(6)[0]


def test_forget_releases_the_step_and_its_shared_tensors():
    import weakref

    class Step:
        pass
    replay = launch_module.LayerReplay()
    layers = Layers(replay, count=4)
    layers.step = Step()
    for i in range(3):
        layers.layer(i)
    layers.first.log.clear()
    layers.second.log.clear()
    scratch, step = weakref.ref(layers.scratch), weakref.ref(layers.step)
    layers.scratch, layers.step = torch.zeros(32), Step()      # the next step's
    assert scratch() is not None and step() is not None        # held by the replay
    replay.forget()
    assert scratch() is None and step() is None
    layers.layer(3)
    assert layers.ran == 3                                       # recorded again


def test_replay_with_launch_hooks_goes_through_the_compiled_kernel(monkeypatch):
    monkeypatch.setattr(launch_module, "_hooked", lambda hook: True)   # a profiler's hook
    layers = Layers(launch_module.LayerReplay(), count=4)
    for i in range(4):
        layers.layer(i)
    assert layers.ran == 2
    assert paths(layers.first) == ["triton", "direct", "direct", "direct"]
    assert pointer_args(layers.first) == [layers.expected(i)[0] for i in range(4)]
