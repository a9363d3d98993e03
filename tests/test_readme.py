"""The README's commands are the contract CI runs; keep the two in step."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_setup_and_test_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    for command in ('pip install "torch==2.13.0" -e ".[test,demo,kernels]"', "python -m pytest"):
        assert command in readme and command in ci
    assert "peftlab train --adapter evalora" in readme  # the main job
