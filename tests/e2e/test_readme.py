"""The README's Python examples run as they are written, against a real node (its port swapped in)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.node_processes import NodeProcesses

README = Path(__file__).parents[2] / "README.md"
#: The direct gRPC port of the README's default node.
README_TARGET = "localhost:8010"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_a_python_example_runs_as_written(node_process: NodeProcesses, tmp_path: Path, index: int) -> None:
    node = node_process("readme")
    code = python_blocks()[index]
    assert README_TARGET in code
    script = tmp_path / f"example{index}.py"
    script.write_text(code.replace(README_TARGET, node.grpc_target))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example printed nothing"
