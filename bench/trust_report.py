"""How far the bundled model's answers can be trusted: calibration, "uncertain", out of distribution.

    python bench/trust_report.py --cv runs/cv512f5 --data DIR --mnist DIR [--model M] [--out docs]

1. Calibration, from the out-of-fold predictions of the cross-validation the model's
   temperature was fitted on (averaged over the model's test-time views, as the runtime
   averages them; for an int8 model calibrated on the folds' int8 files, theirs): ECE before
   and after, the coverage/accuracy table, and a cross-validated check of the whole rule
   (temperature and threshold fitted on four folds' predictions, scored on the fifth).
   With --out, writes the reliability diagram (OUT/reliability.png) and the figures
   (OUT/trust_report.json).
2. Out of distribution: the share of non-implant images the model flags (photographs and
   scikit-image samples, pydicom's CT/MR test images, MNIST digits, generated blank/noise/
   pattern images) and of the 477 development X-rays (in-sample for the feature statistics;
   the cross-validated rate is in the model's metadata).

Needs the dev extras (scikit-image, pydicom), the development X-rays (--data) and MNIST's
t10k images (--mnist).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import common
import numpy as np

from capsedge import Classifier
from capsedge.export.trust_fit import choose_threshold, coverage_table, fit_temperature
from capsedge.folders import image_files, label_from_name
from capsedge.trust import calibrate, expected_calibration_error, reliability_bins
from capsedge.workshop.run import CrossValidation

PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
          "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
          "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text", "checkerboard")
DICOMS = ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "rtdose_1frame.dcm", "JPEG2000.dcm",
          "examples_palette.dcm")


def generated_images(count: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Blank, noise, gradient, checkerboard, rectangles, disc and colour-noise images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:300, :300]
    images = []
    for i in range(count):
        images.append(np.full((300, 300), 255 * (i % 3) // 2, np.uint8))
        images.append(rng.integers(0, 256, (300, 300), dtype=np.uint8))
        images.append(np.clip(rng.normal(128, 40, (300, 300)), 0, 255).astype(np.uint8))
        ramp = np.tile(np.linspace(0, 255, 300), (300, 1)).astype(np.uint8)
        images.append(ramp if i % 2 else ramp.T.copy())
        side = 10 + 5 * i
        images.append(((((yy // side) + (xx // side)) % 2) * 255).astype(np.uint8))
        shapes = np.zeros((300, 300), np.uint8)
        for _ in range(5):
            y0, x0 = rng.integers(0, 250, 2)
            h, w = rng.integers(10, 80, 2)
            shapes[y0:y0 + h, x0:x0 + w] = rng.integers(50, 256)
        images.append(shapes)
        images.append((255 * (np.hypot(yy - 150, xx - 150) < 40 + 10 * i)).astype(np.uint8))
        images.append(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    return images


def mnist_digits(mnist: Path, every: int = 50) -> list[np.ndarray]:
    """Every ``every``-th MNIST test digit of the folder ``mnist`` (200 by default)."""
    with gzip.open(mnist / "t10k-images-idx3-ubyte.gz") as handle:
        digits = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return [digits[i] for i in range(0, len(digits), every)]


def non_implant_sets(mnist: Path) -> dict[str, list]:
    """The out-of-distribution image sets, by name (the MNIST digits from the folder ``mnist``)."""
    import skimage.data
    from pydicom.data import get_testdata_file

    photos = [np.asarray(getattr(skimage.data, name)()) for name in PHOTOS]
    dicoms = [get_testdata_file(name) for name in DICOMS]
    return {"photographs and scikit-image samples": photos,
            "pydicom CT/MR/dose test images": [d for d in dicoms if d],
            "MNIST digits": mnist_digits(mnist), "generated images": generated_images()}


def flag_rates(classifier: Classifier, images: list) -> dict[str, float]:
    """Share flagged out of distribution, share uncertain, mean confidence."""
    predictions = [classifier.classify(image) for image in images]
    return {"images": len(predictions),
            "out_of_distribution": float(np.mean([p.out_of_distribution for p in predictions])),
            "uncertain": float(np.mean([p.uncertain for p in predictions])),
            "mean_confidence": float(np.mean([p.confidence for p in predictions]))}


def cross_validated_rule(raw: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """Fit T and the threshold on K-1 folds of the out-of-fold predictions, score on the K-th."""
    fold_of = np.arange(len(targets)) % folds
    np.random.default_rng(seed).shuffle(fold_of)
    calibrated = np.zeros_like(raw)
    confident = np.zeros(len(targets), bool)
    for fold in range(folds):
        fit, test = fold_of != fold, fold_of == fold
        temperature = fit_temperature(raw[fit], targets[fit])
        threshold = choose_threshold(calibrate(raw[fit], temperature), targets[fit])
        calibrated[test] = calibrate(raw[test], temperature)
        confident[test] = calibrated[test].max(1) >= threshold
    correct = calibrated.argmax(1) == targets
    return {"ece": expected_calibration_error(calibrated, targets), "coverage": float(confident.mean()),
            "confident_accuracy": float(correct[confident].mean()) if confident.any() else None}


def main() -> None:
    parser = common.parser(__doc__, mnist=True)
    parser.add_argument("--cv", type=Path, required=True, help="the cross-validation folder of the model")
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    args = parser.parse_args()
    data, mnist = common.data_folder(args), common.mnist_folder(args)

    classifier = Classifier.load(args.model, threads=2)
    calibration = classifier.metadata.trust.calibration
    files = sorted(image_files(data))
    labels = classifier.labels
    targets = np.array([labels.index(label_from_name(f)) for f in files])
    calibrated_on = classifier.metadata.trust.provenance.get("calibrated_on", "")
    quantized = "int8" if "int8 files" in calibrated_on else None  # see export's fit_file_trust
    indices, raw = CrossValidation(args.cv).out_of_fold(len(files), classifier.test_time_views, quantized)
    targets = targets[indices]
    calibrated = calibrate(raw, calibration.temperature)
    report = {
        "test_time_views": classifier.test_time_views, "calibrated_on": calibrated_on or "float folds",
        "temperature": calibration.temperature, "uncertain_below": calibration.uncertain_below,
        "ece_before": expected_calibration_error(raw, targets),
        "ece_after": expected_calibration_error(calibrated, targets),
        "coverage": coverage_table(calibrated, targets,
                                   (0.0, 0.5, 0.7, 0.8, 0.85, calibration.uncertain_below)),
        "cross_validated_rule": cross_validated_rule(raw, targets),
        "flags": {"development X-rays (477)": flag_rates(classifier, [str(f) for f in files])},
    }
    for name, images in non_implant_sets(mnist).items():
        report["flags"][name] = flag_rates(classifier, images)
    png = common.out_path(args, "reliability.png")
    if png is not None:
        from capsedge.train.figures import SECOND_COLOUR, TRAIN_COLOUR, save_reliability_png

        save_reliability_png([(f"raw (ECE {report['ece_before']:.3f})", reliability_bins(raw, targets),
                               SECOND_COLOUR),
                              (f"calibrated, T={calibration.temperature:.2f} "
                               f"(ECE {report['ece_after']:.3f})", reliability_bins(calibrated, targets),
                               TRAIN_COLOUR)],
                             png, title="out-of-fold reliability, 477 development X-rays")
    common.save_json(args, "trust_report.json", report)
    print(f"temperature {report['temperature']:.3f}; "
          f"ECE {report['ece_before']:.3f} -> {report['ece_after']:.3f}; "
          f"uncertain below {report['uncertain_below']:.3f}")
    print("\n| answers kept: confidence at least | coverage | accuracy of kept answers |\n"
          "| ---: | ---: | ---: |")
    for row in report["coverage"]:
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f} %"
        print(f"| {row['threshold']:.3f} | {100 * row['coverage']:.1f} % | {accuracy} |")
    rule = report["cross_validated_rule"]
    print(f"\ncross-validated rule: ECE {rule['ece']:.3f}, coverage {100 * rule['coverage']:.1f} %, "
          f"kept answers right {100 * rule['confident_accuracy']:.1f} %")
    print("\n| images | count | flagged out of distribution | uncertain | mean confidence |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, row in report["flags"].items():
        print(f"| {name} | {row['images']} | {100 * row['out_of_distribution']:.1f} % | "
              f"{100 * row['uncertain']:.1f} % | {100 * row['mean_confidence']:.1f} % |")


if __name__ == "__main__":
    main()
