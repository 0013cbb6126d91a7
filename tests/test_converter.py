"""The coda converter on TorchTitan's llama3 Transformer."""

import copy

import logging

import pytest
import torch
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.protocols.model_converter import build_model_converters

import coda_titan  # noqa: F401  (registers the converter and train spec)
from coda_titan.config import Coda
from coda_titan.converter import CodaConverter, convert_model
from coda_titan.layers import CodaTransformerBlock, DeferredRMSNorm, FusedLMHead, LMHeadInput
from coda_titan.train_spec import build_coda_loss

from .conftest import rel_err

ALL_OFF = dict(
    fuse_norm_qkv_rope=False,
    fuse_wo_residual=False,
    fuse_norm_swiglu_mlp=False,
    fuse_norm_output_loss=False,
)


def job_config(*args: str):
    return ConfigManager().parse_args(
        ["--job.custom_config_module=coda_titan.config", "--model.name=coda_llama3",
         "--model.converters=coda", "--coda.backend=reference", *args]
    )


def single_device():
    return ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def make_model(n_kv_heads=4, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    args = TransformerModelArgs(
        dim=64, n_layers=3, n_heads=8, n_kv_heads=n_kv_heads, vocab_size=300,
        multiple_of=32, rope_theta=500000, max_seq_len=32,
    )
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    # Module.to(float64) drops the imaginary part of the complex RoPE table.
    model.freqs_cis = model._precompute_freqs_cis().to(torch.complex128)
    return model


def convert(model, coda: Coda):
    convert_model(model, coda, "reference")
    return model


def float64_loss(pred, labels):
    """The coda train spec's loss, except that for plain logits TorchTitan's
    cross_entropy_loss casts to float32; here they stay float64."""
    if isinstance(pred, LMHeadInput):
        return build_coda_loss(job_config())(pred, labels)
    return torch.nn.functional.cross_entropy(
        pred.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100
    )


def loss_and_grads(model, tokens, labels):
    model.zero_grad()
    loss = float64_loss(model(tokens), labels)
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_converter_registered_and_built_from_config():
    config = job_config()
    container = build_model_converters(config, single_device())
    (converter,) = container.converters
    assert isinstance(converter, CodaConverter)
    assert converter.backend == "reference"
    model = make_model()
    container.convert(model)
    assert all(isinstance(b, CodaTransformerBlock) for b in model.layers.values())
    assert isinstance(model.norm, DeferredRMSNorm) and isinstance(model.output, FusedLMHead)


def test_state_dict_identical_and_checkpoints_move_both_ways():
    baseline = make_model()
    converted = convert(copy.deepcopy(baseline), Coda())
    assert list(converted.state_dict()) == list(baseline.state_dict())
    fresh = convert(make_model(seed=1), Coda())
    fresh.load_state_dict(baseline.state_dict())
    back = make_model(seed=2)
    back.load_state_dict(fresh.state_dict())
    for name, p in baseline.state_dict().items():
        assert torch.equal(back.state_dict()[name], p)


@pytest.mark.parametrize(
    "coda",
    [
        Coda(),
        Coda(fuse_norm_qkv_rope=False),
        Coda(fuse_wo_residual=False),
        Coda(fuse_norm_swiglu_mlp=False),
        Coda(fuse_norm_output_loss=False),
        Coda(**ALL_OFF),
    ],
    ids=["all", "no_qkv", "no_wo", "no_mlp", "no_loss", "none"],
)
@pytest.mark.parametrize("n_kv_heads", [8, 2])
def test_converted_model_matches_baseline_float64(exact_rope, coda, n_kv_heads):
    baseline = make_model(n_kv_heads)
    converted = convert(copy.deepcopy(baseline), coda)
    tokens = torch.randint(0, 300, (2, 11))
    labels = torch.randint(0, 300, (2, 11))
    labels[0, :3] = -100
    loss_b, grads_b = loss_and_grads(baseline, tokens, labels)
    loss_c, grads_c = loss_and_grads(converted, tokens, labels)
    assert abs(loss_c.item() - loss_b.item()) <= 1e-10 * abs(loss_b.item())
    for name in grads_b:
        assert rel_err(grads_c[name], grads_b[name]) < 1e-10, name


def test_fused_head_returns_lm_head_input_with_logits_equivalent(exact_rope):
    baseline = make_model()
    converted = convert(copy.deepcopy(baseline), Coda())
    tokens = torch.randint(0, 300, (1, 7))
    pred = converted(tokens)
    assert isinstance(pred, LMHeadInput)
    assert rel_err(pred.logits(), baseline(tokens)) < 1e-10
    assert rel_err(pred.loss(tokens), float64_loss(baseline(tokens), tokens)) < 1e-10


def test_fused_loss_needs_coda_train_spec():
    with pytest.raises(ValueError, match="coda_llama3"):
        CodaConverter(job_config("--model.name=llama3"), single_device())
    CodaConverter(
        job_config("--model.name=llama3", "--coda.no-fuse-norm-output-loss"), single_device()
    )


def test_missing_coda_section_is_a_clear_error():
    config = ConfigManager().parse_args(["--model.converters=coda"])
    with pytest.raises(ValueError, match="custom_config_module"):
        CodaConverter(config, single_device())


def test_cutedsl_backend_refused_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(RuntimeError, match="cutedsl.*no CUDA device"):
        CodaConverter(job_config("--coda.backend=cutedsl"), single_device())


def test_auto_backend_falls_back_to_reference_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    converter = CodaConverter(job_config("--coda.backend=auto"), single_device())
    assert converter.backend == "reference"


def test_rejects_non_llama3_model():
    converter = CodaConverter(job_config(), single_device())
    with pytest.raises(TypeError, match="llama3"):
        converter.convert(torch.nn.Linear(4, 4))


def test_rejects_tensor_parallel():
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=2, pp=1, ep=1, etp=1, world_size=2)
    with pytest.raises(NotImplementedError, match="tensor"):
        CodaConverter(job_config(), dims)


FP8 = "quantize.linear.float8"
FUSED_FILTER = "--quantize.linear.float8.filter_fqns=attention.wq,attention.wk,attention.wv,feed_forward,output"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--coda.fp8=torchao"], "needs"),
        ([f"--model.converters=coda,{FP8}", FUSED_FILTER, "--coda.no-fuse-wo-residual"], "fp8 = 'none'"),
        ([f"--model.converters={FP8},coda", "--coda.fp8=torchao", FUSED_FILTER,
          "--coda.no-fuse-wo-residual"], "before"),
        (["--coda.fp8=coda", "--coda.fp8_recipe=delayed", "--training.enable_cpu_offload"],
         "enable_cpu_offload builds the model on the CPU"),
    ],
    ids=["fp8_without_converter", "converter_without_fp8", "wrong_order", "delayed_cpu_offload"],
)
def test_fp8_combination_checks(args, message):
    with pytest.raises(ValueError, match=message):
        CodaConverter(job_config(*args), single_device())


@pytest.mark.parametrize("filters", [FUSED_FILTER, "--quantize.linear.float8.filter_fqns=layers,output"])
def test_fp8_filters_accepted_when_they_cover_the_fused_fqns(filters):
    converter = CodaConverter(
        job_config(f"--model.converters=coda,{FP8}", "--coda.fp8=torchao", filters,
                   "--coda.no-fuse-wo-residual"),
        single_device(),
    )
    converter.convert(make_model())


def test_fp8_filters_checked_on_the_real_fqns():
    converter = CodaConverter(
        job_config(f"--model.converters=coda,{FP8}", "--coda.fp8=torchao",
                   "--quantize.linear.float8.filter_fqns=output"),
        single_device(),
    )
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq"):
        converter.convert(make_model())


def test_other_quantizers_rejected():
    with pytest.raises(NotImplementedError, match="quantize.linear.mx"):
        CodaConverter(job_config("--model.converters=coda,quantize.linear.mx"), single_device())


def test_fsdp_reshard_always_rejected_with_fused_loss():
    dims = ParallelDims(dp_shard=2, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=2)
    with pytest.raises(ValueError, match="fsdp_reshard_after_forward"):
        CodaConverter(job_config("--parallelism.fsdp_reshard_after_forward=always"), dims)
    CodaConverter(job_config("--parallelism.fsdp_reshard_after_forward=always",
                             "--coda.no-fuse-norm-output-loss"), dims)


def test_float32_activations_keep_the_kernels_off(monkeypatch):
    """TorchTitan's single-device AMP keeps a float32 residual stream, which the bf16
    kernels cannot take: auto picks the reference and says why; cutedsl refuses."""
    import coda_titan.backend as backend
    from coda_titan.converter import bf16_activations_reason

    fsdp = ParallelDims(dp_shard=2, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=2)
    reason = bf16_activations_reason(job_config(), single_device())
    assert "float32" in reason
    assert bf16_activations_reason(job_config("--training.dtype=bfloat16"), single_device()) is None
    assert bf16_activations_reason(job_config(), fsdp) is None
    monkeypatch.setattr(backend, "cutedsl_unavailable_reason", lambda: None)
    assert backend.resolve_backend("auto", reason) == "reference"
    assert backend.resolve_backend("auto", None) == "cutedsl"
    with pytest.raises(RuntimeError, match="float32"):
        backend.resolve_backend("cutedsl", reason)


def attention_log(caplog):
    return [r for r in caplog.records if r.getMessage().startswith("CODA attention")]


def test_auto_attention_takes_sdpa_on_cpu_with_one_line(caplog):
    """On a machine without a GPU, SDPA is the only path: said, not warned."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    caplog.set_level(logging.INFO)
    model = make_model()
    CodaConverter(job_config("--coda.attention=auto"), single_device()).convert(model)
    (record,) = attention_log(caplog)
    assert record.levelname == "INFO"
    assert record.getMessage() == "CODA attention: sdpa (TorchTitan's) because no CUDA device"
    assert {b.attention_kernel for b in model.layers.values()} == {"sdpa"}


def test_flash4_attention_refused_at_start_up_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    converter = CodaConverter(job_config("--coda.attention=flash4"), single_device())
    with pytest.raises(RuntimeError, match="attention = 'flash4' cannot run here: no CUDA device"):
        converter.convert(make_model())


@pytest.fixture
def flash4_runs_here(monkeypatch):
    """An SM90 GPU with flash-attn-4 installed, as far as resolution can tell."""
    import coda_titan.backend as backend

    monkeypatch.setattr(backend, "flash4_unavailable_reason", lambda: None)
    monkeypatch.setattr(backend, "fallback_level", lambda: logging.WARNING)


def test_unsupported_head_dim_takes_sdpa_or_fails_at_start_up(flash4_runs_here, caplog):
    """head_dim 264 is above flash4's 256: auto takes SDPA with one warning naming
    it; flash4 refuses at start-up with the reason."""
    args = TransformerModelArgs(dim=528, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64)
    model = Transformer(args)
    CodaConverter(job_config("--coda.attention=auto", "--training.dtype=bfloat16"),
                  single_device()).convert(model)
    (record,) = attention_log(caplog)
    assert record.levelname == "WARNING"
    assert "head_dim 264 is outside flash4's SM90 range (8..256" in record.getMessage()
    assert {b.attention_kernel for b in model.layers.values()} == {"sdpa"}
    converter = CodaConverter(job_config("--coda.attention=flash4", "--training.dtype=bfloat16"),
                              single_device())
    with pytest.raises(RuntimeError, match="attention = 'flash4' cannot run here: head_dim 264"):
        converter.convert(Transformer(args))


def test_flash4_resolution_reasons(flash4_runs_here):
    from coda_titan.backend import resolve_attention

    assert resolve_attention("auto", 64, "sdpa") == "flash4"
    assert resolve_attention("flash4", 128, "sdpa") == "flash4"
    assert resolve_attention("sdpa", 64, "sdpa") == "sdpa"
    assert resolve_attention("auto", 64, "flex") == "sdpa"
    assert resolve_attention("auto", 36, "sdpa") == "sdpa"
    assert resolve_attention("auto", 64, "sdpa", "float32 activations") == "sdpa"
    for args, reason in [((256 + 8, "sdpa"), "head_dim 264"), ((60, "sdpa"), "head_dim 60"),
                         ((64, "varlen"), "attn_type = 'varlen'"),
                         ((64, "sdpa", "float32 activations"), "float32 activations")]:
        with pytest.raises(RuntimeError, match=reason):
            resolve_attention("flash4", *args)
    with pytest.raises(ValueError, match="allowed values: auto, sdpa, flash4"):
        resolve_attention("flash3", 64, "sdpa")


def test_flash4_needs_sm90_and_the_pinned_package(monkeypatch):
    import importlib.metadata

    import coda_titan.backend as backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (10, 0))
    assert "SM100" in backend.flash4_unavailable_reason()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    installed = {"cutlass": True, "quack": False, "flash_attn.cute": False}
    monkeypatch.setattr(backend.importlib.util, "find_spec",
                        lambda name: object() if installed[name] else None)
    assert "'quack' is not installed" in backend.flash4_unavailable_reason()
    installed["quack"] = True
    assert "'flash-attn-4' is not installed" in backend.flash4_unavailable_reason()
    installed["flash_attn.cute"] = True
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.0.0b35")
    assert "flash-attn-4 4.0.0b35 is installed" in backend.flash4_unavailable_reason()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: backend.FLASH4_VERSION)
    assert backend.flash4_unavailable_reason() is None


def test_float32_activations_keep_flash4_off(flash4_runs_here):
    model = make_model(dtype=torch.float32)
    converter = CodaConverter(job_config("--coda.attention=flash4"), single_device())
    with pytest.raises(RuntimeError, match="float32"):
        converter.convert(model)


def test_folded_weights_kept_across_passes_without_ac_or_under_full_ac_and_dropped_after_steps():
    from coda_titan.kernels import prepared_weights

    fsdp = ParallelDims(dp_shard=2, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=2)
    full, selective = "--activation_checkpoint.mode=full", "--activation_checkpoint.mode=selective"
    for dims, ac, keep in ((single_device(), full, True), (single_device(), selective, False),
                           (single_device(), "--activation_checkpoint.mode=none", True),
                           (fsdp, full, False)):
        model = make_model()
        converter = CodaConverter(job_config(ac), dims)
        converter.convert(model)
        assert all(block.keep_weights is keep for block in model.layers.values())
    w = torch.randn(4, 4)
    prepared_weights.prepared("fold", [w], lambda: w * 2)
    converter.post_optimizer_hook(model)
    assert prepared_weights.count() == 0


@pytest.mark.parametrize("fp8,backend,keep,hooked", [("coda", "cutedsl", True, True),
                                                     ("coda", "cutedsl", False, False),
                                                     ("coda", "reference", True, False),
                                                     ("none", "cutedsl", True, False)])
def test_fp8_weights_prepared_before_the_forward_only_where_the_kernels_keep_them(
        fp8, backend, keep, hooked, monkeypatch):
    """The model's pre-forward build of every block's FP8 weights is there for the
    FP8 kernels that keep their weights, and lists each block's four fused GEMM
    weights, but those of an op whose weights the kernels would not take, judged
    as the op judges them (the GPU test checks what it builds)."""
    from coda_titan.layers import block as block_module
    from coda_titan.layers.block import prepare_fp8_weights

    model = make_model(dtype=torch.bfloat16)
    convert_model(model, Coda(fp8=fp8, backend=backend), backend, "sdpa", keep_weights=keep)
    assert (prepare_fp8_weights in model._forward_pre_hooks.values()) is hooked
    # as on an SM90 GPU: the kernels take these weights
    monkeypatch.setattr(block_module, "unsupported_reason", lambda weights, fp8: None)
    stacks = [s for block in model.layers.values() for s in block.fp8_weight_stacks()]
    assert len(stacks) == (4 * len(model.layers) if hooked else 0)
    if not hooked:
        return
    block = model.layers["0"]
    (qkv, g, qkv_interleaved), (wo, none, _), (w13, g2, interleaved), (w2, _, _) = stacks[:4]
    assert [w.data_ptr() for w in qkv] == [block.attention.wq.weight.data_ptr(),
                                           block.attention.wk.weight.data_ptr(),
                                           block.attention.wv.weight.data_ptr()]
    assert g.data_ptr() == block.attention_norm.weight.data_ptr() and not qkv_interleaved
    assert [w.data_ptr() for w in wo] == [block.attention.wo.weight.data_ptr()]
    assert none is None and interleaved and g2.data_ptr() == block.ffn_norm.weight.data_ptr()
    # The MLP op checks w1, w3 and w2 together: one it cannot take drops both stacks.
    w2_ptr = w2[0].data_ptr()
    monkeypatch.setattr(block_module, "unsupported_reason", lambda weights, fp8: (
        "w2" if w2_ptr in [w.data_ptr() for w in weights] else None))
    kept = block.fp8_weight_stacks()
    assert [len(ws) for ws, _, _ in kept] == [3, 1]
