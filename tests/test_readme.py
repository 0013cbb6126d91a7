"""The README's commands and its custom-model example are the real ones."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()


def test_custom_model_example_runs():
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", README, re.S)
                  if "CodaTransformerBlock" in block]
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"loss \d+\.\d+", result.stdout)


def bash_blocks() -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_ci_runs_the_readme_cpu_install_then_its_test_command():
    (install,) = [b for b in bash_blocks() if any("download.pytorch.org/whl/cpu" in c for c in b)]
    (test,) = [b for b in bash_blocks() if any("pytest" in c for c in b) and len(b) == 1]
    ci = (REPO / ".ci/run").read_text().strip().splitlines()
    start = ci.index(install[0])
    assert ci[start:] == install + test


def test_readme_installs_torch_from_the_pytorch_index_of_its_machine():
    """A plain ``pip install torch`` takes PyPI's CUDA build on Linux, CPU-only or not."""
    torch_lines = [c for b in bash_blocks() for c in b if c.startswith("pip install torch")]
    assert len(torch_lines) == 2  # CPU-only, CUDA 13
    assert all(" --index-url https://download.pytorch.org/whl/" in line for line in torch_lines)
