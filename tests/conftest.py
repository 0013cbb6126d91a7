import pytest
import torch
import torchtitan.models.llama3.model.model as titan_model
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import Attention

import coda_titan.layers.block as coda_block


def titan_attention(n_heads: int, n_kv_heads: int, head_dim: int) -> Attention:
    """TorchTitan's llama3 attention for these heads, on the meta device: only its
    attention core runs, which holds no weights."""
    with torch.device("meta"):
        return Attention(TransformerModelArgs(dim=n_heads * head_dim, n_heads=n_heads,
                                              n_kv_heads=n_kv_heads))


def block_step(block, x, freqs, grad_out):
    """(output, input gradient) of a block's forward and backward on a copy of x."""
    x = x.detach().clone().requires_grad_()
    out = block(x, freqs, None)
    out.backward(grad_out)
    return out, x.grad


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def _apply_rotary_emb_exact(xq, xk, freqs_cis, positions=None):
    """TorchTitan's apply_rotary_emb without its float32 round trip."""
    cdtype = torch.complex128 if xq.dtype == torch.float64 else torch.complex64
    xq_ = torch.view_as_complex(xq.to(cdtype.to_real()).reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.to(cdtype.to_real()).reshape(*xk.shape[:-1], -1, 2))
    freqs = titan_model.reshape_for_broadcast(freqs_cis.to(cdtype), xq_, positions)
    return (
        torch.view_as_real(xq_ * freqs).flatten(3).type_as(xq),
        torch.view_as_real(xk_ * freqs).flatten(3).type_as(xk),
    )


@pytest.fixture
def exact_rope(monkeypatch):
    """TorchTitan computes RoPE in complex64 whatever the input dtype, which caps
    a float64 comparison at ~1e-7. This runs the same formula in complex128 for
    float64 inputs, so both sides of a float64 test are float64 throughout."""
    monkeypatch.setattr(titan_model, "apply_rotary_emb", _apply_rotary_emb_exact)
    monkeypatch.setattr(coda_block, "apply_rotary_emb", _apply_rotary_emb_exact)

