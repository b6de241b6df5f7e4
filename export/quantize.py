"""``python export/quantize.py --help``: the export command, the same as ``capsedge export``.

The work is done in :mod:`capsedge.export.writer`; the options in :mod:`capsedge.export.cli`.
"""

from capsedge.export.cli import command

if __name__ == "__main__":
    command()
