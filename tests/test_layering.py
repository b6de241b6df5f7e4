"""The device path never imports TensorFlow, Keras or other training libraries, nor the web server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import synthetic_xray

HEAVY = ("tensorflow", "keras", "tf2onnx", "ncps", "onnx")
#: The serve extra: only `capsedge serve` imports it.
SERVER = ("starlette", "uvicorn", "python_multipart", "anyio", "httpx")


def test_classify_runs_without_importing_training_libraries(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(synthetic_xray()).save(image)
    script = f"""
import sys
from click.testing import CliRunner
import capsedge
from capsedge.cli import main
result = CliRunner().invoke(main, ["classify", "--json", {str(image)!r}])
assert result.exit_code == 0, result.output
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print("HEAVY", heavy)
server = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER!r})
print("SERVER", server)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout
    assert "SERVER []" in done.stdout, done.stdout
