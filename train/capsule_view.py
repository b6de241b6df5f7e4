"""``capsedge capsules``: what each dimension of the winning class capsule encodes.

The Efficient-CapsNet / CapsNet "dimension perturbation" figure: the image's winning class
capsule is decoded with one dimension shifted by -0.25 .. +0.25 at a time (the other
capsules masked), one row per dimension. Needs the run's ``decoder.keras`` (written by
``capsedge train`` for models with a reconstruction decoder) and TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from capsedge.backends import first_line
from capsedge.boundary import error_boundary, import_tensorflow_quietly, printable
from capsedge.errors import ModelError
from capsedge.fonts import figure_font
from capsedge.outputs import refuse_overwrite
from capsedge.preprocess import Preprocessing, preprocess
from capsedge.workshop.run import RunDir

#: Shifts added to a dimension, as in Sabour et al. 2017, Fig. 4.
DELTAS = tuple(float(d) for d in np.round(np.arange(-0.25, 0.26, 0.05), 2))
#: Side of each reconstruction tile in the grid, in pixels.
TILE = 64
#: Height of the grid's head (input, reconstruction and two lines of text) above the rows.
HEAD_H = TILE + 48


@dataclass(frozen=True)
class CapsuleGrid:
    """Reconstructions of one image's winning capsule, one row per dimension.

    Attributes:
        label: the winning class.
        length: its capsule's length.
        images: ``(D, len(DELTAS), H, W)`` reconstructions in [0, 1].
        reconstruction: ``(H, W)`` the unperturbed reconstruction.
        target: ``(H, W)`` the input, pooled to the reconstruction's size.
    """

    label: str
    length: float
    images: np.ndarray
    reconstruction: np.ndarray
    target: np.ndarray


def load_run_decoder(run_dir: str | Path) -> tuple[Any, Any, tuple[str, ...], Preprocessing]:
    """``(classifier, decoder, labels, preprocessing)`` of a training run.

    Raises:
        ModelError: the run is incomplete or has no decoder.
    """
    import keras

    import capsedge.models  # noqa: F401 - registers the custom layers

    run = RunDir(Path(run_dir))
    missing = run.missing()
    if missing:
        raise ModelError(f"{run.path} is not a training run (no {', '.join(missing)})")
    if not run.decoder.is_file():
        raise ModelError(f"{run.path} has no {run.DECODER}: train the run again with this capsedge "
                         "(runs of models with a reconstruction decoder save it)")
    try:
        config = run.read_config()
        classifier = keras.models.load_model(run.classifier, compile=False)
        decoder = keras.models.load_model(run.decoder, compile=False)
        labels = tuple(str(c) for c in config["classes"])
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
    except Exception as exc:  # noqa: BLE001 - Keras and json raise many kinds for a bad file
        raise ModelError(f"cannot load the run in {run.path} ({first_line(exc)})") from None
    return classifier, decoder, labels, preprocessing


def capsule_grid(classifier: Any, decoder: Any, labels: tuple[str, ...], tensor: np.ndarray) -> CapsuleGrid:
    """Perturb every dimension of the winning class capsule of one ``(H, W, 1)`` input."""
    import keras

    from capsedge.models.decoder import perturb_capsule

    encoder = keras.Model(classifier.input, classifier.get_layer("class_caps").output)
    caps = np.asarray(encoder.predict(tensor[np.newaxis], verbose=0))[0]
    lengths = np.linalg.norm(caps, axis=-1)
    winner = int(np.argmax(lengths))
    rows = [perturb_capsule(decoder, caps, winner, d, DELTAS)[..., 0] for d in range(caps.shape[1])]
    middle = DELTAS.index(0.0)
    images = np.clip(np.stack(rows), 0.0, 1.0)
    size = images.shape[-1]
    target = np.asarray(Image.fromarray(tensor[..., 0]).resize((size, size), Image.Resampling.BOX))
    return CapsuleGrid(labels[winner], float(lengths[winner]), images, images[0, middle], target)


def render_grid(grid: CapsuleGrid) -> Image.Image:
    """The grid as a PNG-ready picture: input and reconstruction on top, then one row per dimension."""
    dims, steps = grid.images.shape[:2]
    label_w, head_h, gap = 44, HEAD_H, 2
    width = label_w + steps * (TILE + gap)
    canvas = Image.new("L", (width, head_h + dims * (TILE + gap) + 4), 255)
    draw = ImageDraw.Draw(canvas)
    font = figure_font()

    def tile(array: np.ndarray) -> Image.Image:
        return Image.fromarray(np.round(255 * np.clip(array, 0, 1)).astype(np.uint8)).resize(
            (TILE, TILE), Image.Resampling.BILINEAR)

    canvas.paste(tile(grid.target), (label_w, 22))
    canvas.paste(tile(grid.reconstruction), (label_w + TILE + 8, 22))
    draw.text((label_w, 2), "input", fill=0, font=font)
    draw.text((label_w + TILE + 8, 2), "decoded", fill=0, font=font)
    text_x = label_w + 2 * TILE + 20
    draw.text((text_x, 26), f"winning capsule: {grid.label} (length {grid.length:.2f})", fill=0, font=font)
    draw.text((text_x, 46), f"rows: dimensions 0-{dims - 1}; columns: shift "
              f"{DELTAS[0]:+.2f} .. {DELTAS[-1]:+.2f}", fill=0, font=font)
    for d in range(dims):
        top = head_h + d * (TILE + gap)
        draw.text((4, top + TILE // 2 - 8), f"d{d}", fill=0, font=font)
        for s in range(steps):
            canvas.paste(tile(grid.images[d, s]), (label_w + s * (TILE + gap), top))
    return canvas


def _cli() -> Any:
    import click

    @click.command(name="capsules", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("image", type=click.Path(path_type=str, readable=False))
    @click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
                  help="A 'capsedge train' run folder of a model with a decoder.")
    @click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
                  help="The grid PNG to write.")
    def command(image: str, run_dir: Path, out_path: Path) -> None:
        """Decode the winning class capsule with each dimension perturbed, as a grid PNG."""
        with error_boundary(extra="train"):
            run_files = list(run_dir.iterdir()) if run_dir.is_dir() else [run_dir]
            refuse_overwrite(out_path, [image, *run_files], "--out")
            import_tensorflow_quietly()
            classifier, decoder, labels, preprocessing = load_run_decoder(run_dir)
            grid = capsule_grid(classifier, decoder, labels, preprocess(image, preprocessing))
            render_grid(grid).save(out_path, format="PNG")
        click.echo(f"{printable(image)}: {grid.label} capsule, {grid.images.shape[0]} dimensions x "
                   f"{len(DELTAS)} shifts; grid {out_path}")

    return command


command = _cli()
