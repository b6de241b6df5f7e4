"""Every limit on what capsedge reads, defined once (README, "Reliability").

Inputs are checked against these before they are read or decoded, so that a
hostile or broken file costs a one-line error, never the machine's memory.
"""

from __future__ import annotations

#: Images with more pixels than this are refused (decompression bombs), DICOM included.
MAX_PIXELS = 64_000_000

#: Image files (and bytes or file-like inputs) larger than this are refused before reading.
#: A 64-megapixel 16-bit DICOM (128 MiB of pixel data) fits with room for its header.
MAX_IMAGE_BYTES = 256 * 1024 * 1024

#: A deflated DICOM data set (transfer syntax 1.2.840.10008.1.2.1.99) is inflated step by
#: step and refused once it grows past this: as much as an uncompressed file may hold.
MAX_INFLATED_DICOM_BYTES = MAX_IMAGE_BYTES

#: Model files larger than this are refused before reading (the bundled one is 3.3 MiB).
MAX_MODEL_BYTES = 256 * 1024 * 1024

#: Model metadata (sidecar JSON, or embedded, once inflated) larger than this is refused.
MAX_METADATA_BYTES = 1024 * 1024

#: Deepest nesting of arrays and objects accepted in metadata JSON.
MAX_METADATA_DEPTH = 32

#: Most class labels a model may have, and the longest label, in characters.
MAX_LABELS = 1000
MAX_LABEL_LENGTH = 64

#: Longest model name or version string, in characters.
MAX_NAME_LENGTH = 128

#: CPU threads a model may be given (``--threads``, ``Classifier.load(threads=...)``).
MAX_THREADS = 64

#: Squares per side of an occlusion map (``capsedge explain --grid``, ``?grid=``): each one
#: inference; 8 x 8 unless asked.
MIN_GRID, MAX_GRID = 2, 32
DEFAULT_GRID = 8
#: The service's bound on ``?grid=``: a request's work is ``grid**2`` inferences, so a client
#: of ``capsedge serve`` gets at most 256 of them per upload (a local ``explain`` up to 1024).
MAX_SERVED_GRID = 16
