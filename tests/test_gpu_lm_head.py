"""The fused LM head's kernels at real vocab sizes, odd ones included (pytest -m gpu).

A vocab that is not a multiple of 8 (GPT-2's 50257) runs the kernels on
padded logits rows; the reference must not be called. Loss and every gradient
against float64, as the other kernel tests.
"""

import importlib

import pytest
import torch

from coda_titan.kernels import REFERENCE

pytest.importorskip("quack")  # CPU installs leave the gpu extra out
from coda_titan.kernels.cutedsl import OPS  # noqa: E402

from .test_gpu_kernels import check, gpu_only  # noqa: E402, F401  (gpu_only: autouse fixture)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("vocab", [50257, 32000, 151936, 128256, 1001])
def test_lm_head_kernel_runs_at_any_vocab(vocab, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the LM head fell back to the PyTorch reference")

    # The package exports the op function under the module's own name.
    lm_head = importlib.import_module("coda_titan.kernels.cutedsl.rmsnorm_linear_cross_entropy")
    monkeypatch.setattr(lm_head, "reference", no_reference)
    torch.manual_seed(vocab)
    dev, bf, m, d = "cuda", torch.bfloat16, 1531, 256
    h = torch.randn(m, d, device=dev, dtype=bf)
    g = (torch.rand(d, device=dev) + 0.5).to(bf)
    w = torch.randn(vocab, d, device=dev, dtype=bf) * d**-0.5
    labels = torch.randint(0, vocab, (m,), device=dev)
    labels[::7] = -100
    labels[1] = vocab - 1  # the last real column sits next to the padding

    def kernel(h, g, w):
        return OPS.rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, 512)

    def reference(h, g, w):
        return REFERENCE.rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, 512)

    errors = check(kernel, reference, [h, g, w], [torch.tensor(1.0 / m, device=dev)])
    print(f"vocab {vocab}: {errors}")


def test_lm_head_kernel_under_no_grad_matches_training_loss():
    torch.manual_seed(13)
    for vocab in (1024, 1001):
        h = torch.randn(517, 256, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(256, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(vocab, 256, device="cuda", dtype=torch.bfloat16) * 0.06
        labels = torch.randint(0, vocab, (517,), device="cuda")
        trained = OPS.rmsnorm_linear_cross_entropy(h, g, w.requires_grad_(), labels, 1e-5, 128)
        with torch.no_grad():
            validated = OPS.rmsnorm_linear_cross_entropy(h, g, w, labels, 1e-5, 128)
        assert torch.allclose(trained, validated)
