"""The verification report: what was measured per artifact, the goals, the checks, and
``report.json`` / ``report.md``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Untimed runs before an artifact's latency is measured.
WARM_UP_RUNS = 5


@dataclass(frozen=True)
class Goals:
    """What an export must achieve.

    Attributes:
        onnx_max_abs_diff: float ONNX vs Keras, largest probability difference.
        float_agreement: top-1 agreement of the float32 TFLite model with Keras.
        reduced_agreement: top-1 agreement of float16, dynamic-range and int8 models.
        int8_accuracy_points: how far int8 accuracy may move from Keras', in points of 1.
        int8_size_ratio: an int8 file's constant bytes over its float32 counterpart's, at most.
    """

    onnx_max_abs_diff: float = 1e-4
    float_agreement: float = 1.0
    reduced_agreement: float = 0.99
    int8_accuracy_points: float = 0.01
    int8_size_ratio: float = 1 / 3


@dataclass(frozen=True)
class ArtifactReport:
    """What was measured for one exported file."""

    format: str
    path: str
    bytes: int
    constant_bytes: int
    ops: dict[str, int]
    input_shape: list[int]
    forbidden_ops: list[str]
    metadata_ok: bool
    accuracy: float | None
    agreement: float | None
    max_abs_diff: float | None
    latency_ms_median: float | None
    edgetpu: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Check:
    """One goal applied to one artifact."""

    name: str
    artifact: str
    passed: bool
    value: Any
    goal: str


@dataclass(frozen=True)
class VerificationReport:
    """The whole verification: reference figures, artifacts, checks."""

    model: dict[str, Any]
    evaluation: dict[str, Any]
    artifacts: list[ArtifactReport]
    checks: list[Check]
    goals: Goals = field(default_factory=Goals)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``report.json``."""
        return {
            "passed": self.passed,
            "model": self.model,
            "evaluation": self.evaluation,
            "goals": asdict(self.goals),
            "artifacts": [asdict(a) for a in self.artifacts],
            "checks": [asdict(c) for c in self.checks],
        }

    def to_markdown(self) -> str:
        """A readable table of the artifacts and the checks."""
        model, evaluation = self.model, self.evaluation
        keras_acc = _percent(model.get("keras_accuracy"))
        lines = [
            f"# Export report: {model['name']}",
            "",
            f"Evaluation: {evaluation['images']} images from `{evaluation['folder']}` "
            f"({evaluation['labelled']} labelled); Keras float accuracy {keras_acc}. "
            f"Latency: median of {evaluation['timed_runs']} single-threaded runs after "
            f"{WARM_UP_RUNS} warm-up runs, inference only.",
            "",
            "| format | file | size (KiB) | constants (KiB) | ops | accuracy | agreement | max abs diff "
            "| latency (ms) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for a in self.artifacts:
            diff = "n/a" if a.max_abs_diff is None else f"{a.max_abs_diff:.2e}"
            latency = "n/a" if a.latency_ms_median is None else f"{a.latency_ms_median:.3f}"
            lines.append(
                f"| {a.format} | `{Path(a.path).name}` | {a.bytes / 1024:.1f} "
                f"| {a.constant_bytes / 1024:.1f} | {sum(a.ops.values())} "
                f"| {_percent(a.accuracy)} | {_percent(a.agreement)} | {diff} | {latency} |"
            )
        lines += ["", f"## Checks: {'all passed' if self.passed else f'{len(self.failed)} FAILED'}", "",
                  "| check | artifact | value | goal | result |", "| --- | --- | --- | --- | --- |"]
        for c in self.checks:
            lines.append(f"| {c.name} | {c.artifact} | {_value(c.value)} | {c.goal} | "
                         f"{'pass' if c.passed else '**FAIL**'} |")
        lines += ["", "## Operations", ""]
        for a in self.artifacts:
            ops = ", ".join(f"{name} {n}" for name, n in sorted(a.ops.items(), key=lambda kv: -kv[1]))
            lines.append(f"- **{a.format}** (input {a.input_shape}): {ops}")
        for a in self.artifacts:
            if a.edgetpu:
                lines += ["", f"## Edge TPU ({a.format}, from the {a.edgetpu['source']})", "",
                          f"{a.edgetpu['on_tpu']} of {a.edgetpu['total_ops']} operations on the Edge TPU, "
                          f"{a.edgetpu['on_cpu']} on the CPU."]
                first = a.edgetpu.get("first_unsupported")
                if first:
                    lines.append(f"The first operation it cannot run is #{first['index']} "
                                 f"({first['op']}); the compiler maps one part of the graph, so "
                                 "every operation after it runs on the CPU.")
                for name, info in a.edgetpu.get("unsupported", {}).items():
                    lines.append(f"- {name} x{info['count']}: {info['reason']}")
        return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(report: VerificationReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report.to_markdown(), encoding="utf-8")
    return json_path, md_path
