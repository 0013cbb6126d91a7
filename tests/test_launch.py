"""scripts/train.sh as a new user meets it: --help, and every bad input ending
in one line, ``error: ...``, that names the key and the fix.

Config errors are checked before TorchTitan builds anything: their whole
output is that one line. A missing config file fails in bash, before Python
starts. Other failures print their traceback, then the error line last, also
after torchrun's report when several processes run. The launches run two at a
time (each is mostly single-threaded Python imports).
"""

import importlib.util
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coda_titan import backend
from coda_titan.train import ConfigError, check

REPO = Path(__file__).parent.parent
TRAIN_SH = REPO / "scripts/train.sh"
DEBUG_CODA = REPO / "configs/llama3_debug_coda.toml"


def launch(*args: str, **env: str) -> dict:
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(TRAIN_SH), *map(str, args)], capture_output=True, text=True, timeout=600,
        cwd="/", env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                          f"{os.environ['PATH']}", **env),
    )
    return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr,
            "lines": (result.stdout + result.stderr).splitlines(),
            "seconds": time.monotonic() - start}


def without_config_module(tmp_path: Path) -> Path:
    text = DEBUG_CODA.read_text()
    assert 'custom_config_module = "coda_titan.config"\n' in text
    path = tmp_path / "no_module.toml"
    path.write_text(text.replace('custom_config_module = "coda_titan.config"\n', ""))
    return path


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    cases = {
        "help": ("--help",),
        "config_help": (DEBUG_CODA, "--help", f"--job.dump_folder={tmp / 'f'}"),
        "no_args": (),
        "missing_config": ("configs/llama3_debug_coda_typo.toml",),
        "no_config_module": (without_config_module(tmp), f"--job.dump_folder={tmp / 'a'}"),
        "seq_len": (DEBUG_CODA, "--training.seq_len=131073", f"--job.dump_folder={tmp / 'b'}"),
        "unknown_option": (DEBUG_CODA, "--training.stepz=3", f"--job.dump_folder={tmp / 'c'}"),
        "runtime": (DEBUG_CODA, "--coda.backend=cutedsl", f"--job.dump_folder={tmp / 'd'}"),
        "bad_import": (DEBUG_CODA, "--experimental.custom_import=coda_titann",
                       f"--job.dump_folder={tmp / 'g'}"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(launch, *args) for name, args in cases.items()}
        futures["torchrun"] = pool.submit(
            launch, DEBUG_CODA, "--training.seq_len=131073", f"--job.dump_folder={tmp / 'e'}",
            NGPU="2")
        results = {name: future.result() for name, future in futures.items()}
    results["tmp"] = tmp
    return results


def one_error_line(run: dict) -> str:
    assert run["returncode"] == 2, run["lines"][-20:]
    (line,) = run["lines"]
    assert line.startswith("error: ")
    return line


def test_help_prints_usage_and_the_coda_options(launches):
    run = launches["help"]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    assert run["lines"][0] == "usage: scripts/train.sh CONFIG.toml [--section.key=value ...]"
    for option in ("--coda.backend", "--coda.attention", "--coda.loss-chunk-tokens",
                   "--coda.no-fuse-wo-residual"):
        assert option in run["stdout"]
    assert "scripts/train.sh CONFIG.toml --help" in run["stdout"]


def test_help_after_a_config_lists_every_option_and_keeps_the_last_log(launches):
    run = launches["config_help"]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    assert run["lines"][0] == "usage: scripts/train.sh CONFIG.toml [-h] [OPTIONS]"
    for option in ("--training.seq-len", "--job.dump-folder", "--coda.backend"):
        assert option in run["stdout"]
    assert not (launches["tmp"] / "f/train.log").exists()


def test_a_custom_import_that_fails_ends_in_its_error_line(launches):
    run = launches["bad_import"]
    assert run["returncode"] == 2
    assert run["lines"][-1] == "error: ModuleNotFoundError: No module named 'coda_titann'"


def test_no_arguments_print_the_usage_at_once(launches):
    run = launches["no_args"]
    assert run["returncode"] == 2
    (line,) = run["lines"]
    assert line.startswith("usage: scripts/train.sh CONFIG.toml")
    assert run["seconds"] < 5


def test_missing_config_fails_at_once_in_one_line(launches):
    line = one_error_line(launches["missing_config"])
    assert line == (f"error: config file not found: configs/llama3_debug_coda_typo.toml "
                    f"(the configs are in {REPO}/configs)")
    assert launches["missing_config"]["seconds"] < 5  # bash only: no Python, no imports


def test_config_without_custom_config_module_says_what_to_add(launches):
    line = one_error_line(launches["no_config_module"])
    assert "without its config module" in line
    assert line.endswith('add custom_config_module = "coda_titan.config" under [job]')


def test_seq_len_above_the_flavor_maximum_fails_at_start_up_with_the_numbers(launches):
    line = one_error_line(launches["seq_len"])
    assert line == ("error: [training] seq_len = 131073 is above the maximum of coda_llama3 "
                    "'debugmodel' (max_seq_len = 131072); use seq_len <= 131072")


def test_unknown_command_line_option_is_one_line_naming_it(launches):
    line = one_error_line(launches["unknown_option"])
    assert "Unrecognized options: --training.stepz=3" in line
    assert "scripts/train.sh CONFIG.toml --help lists the options" in line


def test_failure_after_start_up_ends_with_the_root_error_line(launches):
    run = launches["runtime"]
    assert run["returncode"] == 1
    expected = "error: RuntimeError: [coda] backend = 'cutedsl' cannot run here: no CUDA device"
    assert run["lines"][-1] == expected
    assert "Traceback (most recent call last):" in run["stdout"]
    log = (launches["tmp"] / "d/train.log").read_text().splitlines()
    assert log[-1] == expected


def test_torchrun_failure_repeats_the_root_error_last(launches):
    run = launches["torchrun"]
    assert run["returncode"] != 0
    assert "ChildFailedError" in run["stdout"]  # torchrun's report, then the root error
    assert run["lines"][-1] == (
        "error: [training] seq_len = 131073 is above the maximum of coda_llama3 'debugmodel' "
        "(max_seq_len = 131072); use seq_len <= 131072")


@pytest.mark.parametrize("args, message", [
    (["--coda.backend=gpu"], "[coda] backend = 'gpu' is not valid; allowed values: auto, "
                             "cutedsl, reference"),
    (["--training.steps=ten"], "Error parsing --training.steps: invalid literal for int()"),
    (["--model.flavor=9B"], "[model] flavor = '9B' is not a flavor of 'coda_llama3'; flavors:"),
])
def test_bad_command_line_values_are_one_line(args, message):
    with pytest.raises(ConfigError) as error:
        check([f"--job.config_file={DEBUG_CODA}", *args])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_toml_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[job\n")
    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML: Expected ']'"):
        check([f"--job.config_file={path}"])


def test_missing_gpu_packages_name_the_extra(monkeypatch):
    monkeypatch.setattr(backend.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend.torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    cutedsl = backend.cutedsl_unavailable_reason()
    # CuTe DSL and quack present, flash-attn-4 not:
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name.startswith("flash_attn") else object())
    flash4 = backend.flash4_unavailable_reason()
    for reason, package in ((cutedsl, "'cutlass'"), (flash4, "'flash-attn-4'")):
        assert f"{package} is not installed" in reason
        assert 'pip install -e ".[gpu]"' in reason
