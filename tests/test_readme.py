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


def test_ci_runs_the_readme_test_command():
    test_command = re.search(r"Test:\n\n```bash\n(.*?)\n```", README).group(1)
    ci = (REPO / ".ci/run").read_text().strip().splitlines()
    assert ci[-1] == test_command
    assert "pip install -q torch==2.13.0" in ci
