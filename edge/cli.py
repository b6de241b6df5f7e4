"""The ``capsedge`` command. Thin: it parses options, calls the library, prints.

The commands live one module each (:mod:`.cli_classify`, :mod:`.cli_serve`, :mod:`.cli_bench`),
with the options they share in :mod:`.cli_options`; ``train``, ``export`` and ``capsules`` need
TensorFlow and are imported only when they run.
"""

from __future__ import annotations

import click

from . import __version__
from .boundary import fail_and_exit
from .cli_bench import bench
from .cli_classify import classify, expand_inputs, explain
from .cli_serve import host_names, is_loopback, serve
from .errors import CapsedgeError
from .extras import require
from .report import NOT_AN_XRAY, confidence_note, format_text, write_csv

__all__ = ["NOT_AN_XRAY", "confidence_note", "expand_inputs", "format_text", "host_names", "is_loopback",
           "main", "write_csv"]


class LazyGroup(click.Group):
    """Subcommands that need TensorFlow are imported only when they are run."""

    lazy = {
        "train": ("capsedge.train.cli", "command", "Train a model on labelled X-rays [train extra]."),
        "export": ("capsedge.export.cli", "command", "Export a trained model [export extra]."),
        "capsules": ("capsedge.train.capsule_view", "command",
                     "Perturb the winning capsule's dimensions through the decoder [train extra]."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(60)) for name, cmd in self.commands.items()]
        rows += [(name, summary) for name, (_, _, summary) in self.lazy.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, attribute, _ = self.lazy[name]
        extra = "export" if name == "export" else "train"
        try:
            return getattr(require(module, extra=extra, needed_by=f"'capsedge {name}'"), attribute)
        except CapsedgeError as exc:
            fail_and_exit(str(exc))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="capsedge")
def main() -> None:
    """Identify a shoulder implant's manufacturer from an X-ray.

    A research tool, not a medical device: confirm every result by other means.
    """


for _command in (bench, classify, explain, serve):
    main.add_command(_command)


if __name__ == "__main__":
    main()
