"""Peak memory (VmHWM) of classifying the largest image capsedge accepts, each case in a fresh process.

Usage: python bench/peak_memory.py [--json] [--out DIR]   # with --out, also OUT/peak_memory.json

Cases: the bundled model loaded and warmed up, classifying nothing (the
baseline); a 7999x7999 RGBA PNG (the most pixels under the limit, the most
channels to convert); an 8000x8000 16-bit DICOM (128 MB of pixel data, with a
rescale and a window to apply; needs pydicom). The images are written to a
temporary folder that is removed afterwards. Each case runs in a new Python
process, which reports the ``VmHWM`` line of its ``/proc/self/status`` (Linux).
Name the machine when you quote the figures.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import common

CHILD = """
import sys
from capsedge import Classifier
classifier = Classifier.load()
if sys.argv[1] != "-":
    prediction = classifier.classify(sys.argv[1])
    assert prediction.label in classifier.labels
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def write_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGBA", (7999, 7999)).save(path, compress_level=1)
    return path


def write_dicom(path: Path) -> Path:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 8000
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ramp = (np.arange(8000, dtype=np.uint16) % 4096)[np.newaxis, :]
    ds.PixelData = np.repeat(ramp, 8000, axis=0).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def peak_mib(image: str) -> float:
    """VmHWM of a fresh process that loads the model and classifies ``image`` (``-``: nothing)."""
    output = subprocess.run([sys.executable, "-c", CHILD, image], check=True, capture_output=True, text=True)
    return int(output.stdout.split()[-1]) / 1024


def main() -> None:
    parser = common.parser(__doc__, data=False)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cases = {
            "model loaded, no image (baseline)": "-",
            "PNG 7999x7999 RGBA": str(write_png(Path(folder) / "largest.png")),
            "DICOM 8000x8000 16-bit (128 MB)": str(write_dicom(Path(folder) / "largest.dcm")),
        }
        sizes = {name: Path(path).stat().st_size for name, path in cases.items() if path != "-"}
        results = {name: peak_mib(path) for name, path in cases.items()}
    result = {"machine": platform.processor() or platform.machine(), "peak_mib": results, "file_bytes": sizes}
    common.save_json(args, "peak_memory.json", result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"# {platform.machine()}, Python {platform.python_version()}; VmHWM of a fresh process per case")
    print(f"{'case':36s} {'file MiB':>9s} {'peak MiB':>9s}")
    for name, peak in results.items():
        size = f"{sizes[name] / 2**20:9.1f}" if name in sizes else f"{'':9s}"
        print(f"{name:36s} {size} {peak:9.0f}")


if __name__ == "__main__":
    main()
