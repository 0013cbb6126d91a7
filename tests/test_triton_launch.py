"""``Launched``'s table of Triton variants, on CPU with a stand-in for Triton."""

import importlib.util
from pathlib import Path

import pytest
import torch

SOURCE = Path(__file__).resolve().parents[1] / "coda_titan/kernels/cutedsl/triton_launch.py"


@pytest.fixture
def triton_launch(monkeypatch):
    # Loaded from its file: the cutedsl package itself imports quack (GPU installs only).
    spec = importlib.util.spec_from_file_location("triton_launch", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.torch.cuda, "current_device", lambda: 0)
    stream = type("Driver", (), {"get_current_stream": staticmethod(lambda device: 7)})
    monkeypatch.setattr(module, "driver", type("Active", (), {"active": stream}))
    return module


class FakeJit:
    """A ``triton.jit`` kernel's stand-in: each launch through it compiles a variant."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.compiled, self.runs = [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kernel = type("Compiled", (), {"function": "f", "packed_metadata": "p"})()
            kernel.run = lambda *a: self.runs.append((kernel, a))
            self.compiled.append((grid, args, kwargs))
            return kernel
        return launch


def test_a_seen_key_runs_its_variant_with_every_parameter_in_order(triton_launch):
    fn = FakeJit()
    kernel = triton_launch.Launched(fn)
    x = torch.zeros(8)
    kernel[(4, 2)](x, 64, 2.0, BLOCK=128, FLAG=True, num_warps=8)
    assert len(fn.compiled) == 1 and not fn.runs
    y = torch.ones(8)  # another tensor, same dtype and alignment class
    kernel[(5,)](y, 64, 2.0, BLOCK=128, FLAG=True, num_warps=8)
    assert len(fn.compiled) == 1
    (compiled, launched), = fn.runs
    assert launched[:9] == (5, 1, 1, 7, "f", "p", None, None, None)
    assert launched[9] is y and launched[10:] == (64, 2.0, 128, True)


@pytest.mark.parametrize("change", [
    lambda x: ((x.double(), 64, 2.0), {}),  # dtype
    lambda x: ((x[1:], 64, 2.0), {}),  # address modulo 16
    lambda x: ((x, 65, 2.0), {}),  # an integer's value
    lambda x: ((x, 64.0, 2.0), {}),  # an integer given as a float
    lambda x: ((x, 64, 2.0), {"BLOCK": 64}),  # a constexpr
    lambda x: ((x, 64, 2.0), {"FLAG": 1}),  # a constexpr's type
    lambda x: ((x, 64, 2.0), {"num_warps": 4}),  # an option
])
def test_any_difference_triton_could_specialize_on_goes_through_triton(triton_launch, change):
    fn = FakeJit()
    kernel = triton_launch.Launched(fn)
    x = torch.zeros(8)
    base = dict(BLOCK=128, FLAG=True, num_warps=8)
    kernel[(1,)](x, 64, 2.0, **base)
    args, kwargs = change(x)
    kernel[(1,)](*args, **{**base, **kwargs})
    assert len(fn.compiled) == 2 and not fn.runs
