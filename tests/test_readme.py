"""The README's commands are the contract: CI runs its set-up and test commands, and the slow tier
runs its main job verbatim."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def commands_after(marker: str) -> list[str]:
    """The command lines of the first ```bash block after the line containing `marker`."""
    rest = README[README.index(marker):]
    block = re.search(r"```bash\n(.*?)```", rest, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_setup_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    setup, tests = commands_after("Set up ("), commands_after("Test (")
    assert setup == ['pip install "torch==2.13.0" -e ".[test,demo,kernels]"'] and tests == ["python -m pytest"]
    for command in setup + tests:
        assert command in ci


@pytest.mark.slow
def test_the_main_job_runs_verbatim_and_learns(tmp_path):
    (command,) = commands_after("Run the main job")
    bin_dir = str(Path(sys.executable).parent)  # the checkout's environment, where `peftlab` is installed
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "evalora" / "run.json").read_text())
    assert record["adapter"] == "evalora" and record["result"]["eval_accuracy"] >= 0.95, record["result"]
