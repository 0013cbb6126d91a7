"""Every TOML in configs/ resolves to a job config; bad [coda] input fails clearly."""

from pathlib import Path

import pytest
from torchtitan.config import ConfigManager
from torchtitan.protocols.model_converter import _registry_model_converter_cls
from torchtitan.protocols.train_spec import get_train_spec

import coda_titan  # noqa: F401
from coda_titan.config import Coda, check_coda_section
from coda_titan.train import check_toml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_configs_present():
    names = {p.stem for p in CONFIGS}
    for size in ("1b", "8b"):
        for arm in ("baseline", "baseline_fp8", "coda_bf16", "coda_fp8"):
            assert f"llama3_{size}_{arm}" in names
    assert {"llama3_debug_baseline", "llama3_debug_coda"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_resolves(path):
    check_toml(str(path))
    config = ConfigManager().parse_args([f"--job.config_file={path}"])
    spec = get_train_spec(config.model.name)
    assert config.model.flavor in spec.model_args
    for name in config.model.converters:
        assert name in _registry_model_converter_cls, name
    assert isinstance(config.coda, Coda)
    if "coda" in config.model.converters:
        assert ("quantize.linear.float8" in config.model.converters) == (config.coda.fp8 == "torchao")
    assert config.training.dataset == "coda_offline"


def test_1b_flavor_matches_the_coda_paper():
    args = get_train_spec("coda_llama3").model_args["1B"]
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (2048, 16, 32, 8)
    assert (args.vocab_size, args.rope_theta) == (128256, 500000)
    from torchtitan.models.llama3.model.model import FeedForward

    ffn = FeedForward(args.dim, 4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)
    assert ffn.w1.out_features == 8192


@pytest.mark.parametrize(
    "section,message",
    [
        ({"backend": "cuda"}, r"\[coda\] backend = 'cuda' is not valid; allowed values: auto, cutedsl, reference"),
        ({"fp8": "e4m3"}, r"\[coda\] fp8 = 'e4m3' is not valid; allowed values: none, torchao"),
        ({"attention": "flash3"},
         r"\[coda\] attention = 'flash3' is not valid; allowed values: auto, sdpa, flash4"),
        ({"fuse_wo_residual": "yes"}, r"\[coda\] fuse_wo_residual = 'yes' must be a bool"),
        ({"loss_chunk_tokens": 0}, r"\[coda\] loss_chunk_tokens = 0 must be >= 1"),
        ({"bakend": "auto"}, r"unknown key\(s\) in \[coda\]: bakend; allowed keys: fuse_norm_qkv_rope"),
    ],
)
def test_bad_coda_section_names_key_and_allowed(section, message):
    with pytest.raises(ValueError, match=message):
        check_coda_section(section)


def test_bad_value_in_toml_fails_through_torchtitan_parsing(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[job]\ncustom_config_module = "coda_titan.config"\n[coda]\nbackend = "gpu"\n')
    with pytest.raises(ValueError, match="backend = 'gpu'"):
        ConfigManager().parse_args([f"--job.config_file={path}"])
    with pytest.raises(ValueError, match="backend = 'gpu'"):
        check_toml(str(path))


def test_bad_value_on_command_line_fails(capsys):
    with pytest.raises(SystemExit):
        ConfigManager().parse_args(
            ["--job.custom_config_module=coda_titan.config", "--coda.fp8=int4"]
        )
    assert "[coda] fp8 = 'int4' is not valid" in capsys.readouterr().err
