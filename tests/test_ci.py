""".ci/run's chromium step, run against a stand-in apt-get: it updates empty package lists
when the install fails, and stops CI when chromium still cannot be had."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"

#: apt-get as on a fresh machine: "install" fails until "update" has filled the package lists;
#: with NO_CHROMIUM set, chromium is not in them at all.
FAKE_APT_GET = """#!/bin/sh
echo "$1" >> "$APT_LOG"
case "$1" in
    update) touch "$APT_STATE/lists" ;;
    install)
        [ -e "$APT_STATE/lists" ] && [ -z "${NO_CHROMIUM:-}" ] || exit 100
        printf '#!/bin/sh\\n' > "$CAPSEDGE_CI_CHROMIUM" && chmod +x "$CAPSEDGE_CI_CHROMIUM" ;;
esac
"""


def chromium_step() -> str:
    """The lines of .ci/run from the chromium path to the export that requires the browser test."""
    lines = CI_RUN.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CHROMIUM="))
    end = next(i for i, line in enumerate(lines) if line.startswith("export CAPSEDGE_REQUIRE_BROWSER="))
    return "\n".join(lines[start:end + 1])


def run_step(tmp_path: Path, *, lists: bool,
             chromium_exists: bool = True) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the step on ``tmp_path``'s stand-ins; its result and the apt-get commands it ran."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT_GET)
    (bin_dir / "apt-get").chmod(0o755)
    if lists:
        (state / "lists").touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "APT_LOG": str(tmp_path / "log"),
           "APT_STATE": str(state), "CAPSEDGE_CI_CHROMIUM": str(tmp_path / "chromium")}
    if not chromium_exists:
        env["NO_CHROMIUM"] = "1"
    script = f"set -euo pipefail\n{chromium_step()}\necho \"required=$CAPSEDGE_REQUIRE_BROWSER\""
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    log = tmp_path / "log"
    return result, log.read_text().split() if log.exists() else []


def test_empty_package_lists_are_updated_and_chromium_installed(tmp_path: Path) -> None:
    result, calls = run_step(tmp_path, lists=False)
    assert result.returncode == 0, result.stderr
    assert calls == ["install", "update", "install"] and (tmp_path / "chromium").exists()
    assert result.stdout.strip() == "required=1"


def test_fresh_lists_install_at_once(tmp_path: Path) -> None:
    result, calls = run_step(tmp_path, lists=True)
    assert result.returncode == 0 and calls == ["install"], result.stderr


def test_without_chromium_ci_fails_loudly(tmp_path: Path) -> None:
    result, calls = run_step(tmp_path, lists=False, chromium_exists=False)
    assert result.returncode == 1 and calls == ["install", "update", "install"]
    assert result.stderr.strip() == "ci: chromium could not be installed, so the browser test cannot run"
    assert "required=" not in result.stdout


def test_ci_runs_the_whole_suite_with_the_browser_test_required() -> None:
    text = CI_RUN.read_text()
    assert text.index("export CAPSEDGE_REQUIRE_BROWSER=1") < text.index("\npytest")
