"""A stand-in quality measure for generated 8x8 digits, until the project's metric covers them.

A scikit-learn MLP classifier trained on the real digits (sklearn.datasets.load_digits, values
0..16) scores generated images mapped to the same scale:
  - mean max-confidence: how clearly each sample looks like *some* digit (real digits: ~0.99);
  - class entropy: entropy (nats) of the predicted-class histogram, ln 10 = 2.303 for perfectly
    balanced classes; low values mean the model collapsed onto few digits;
  - conditional accuracy: for class-conditional samples, how often the classifier agrees with the
    requested label.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

DIGITS_MAX = 16.0


class DigitJudge:
    """The classifier, trained once on 80% of the real digits (its held-out accuracy is reported)."""

    def __init__(self, seed: int = 0) -> None:
        digits = load_digits()
        x_train, x_test, y_train, y_test = train_test_split(
            digits.data / DIGITS_MAX, digits.target, test_size=0.2, random_state=seed)
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed)
        self.clf.fit(x_train, y_train)
        self.heldout_accuracy = float(self.clf.score(x_test, y_test))
        self.real = digits.data / DIGITS_MAX

    def score(self, images01: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        """images01: (N, 1, 8, 8) in [0, 1] (0 = background, as in load_digits)."""
        probs = self.clf.predict_proba(np.asarray(images01, dtype=np.float64).reshape(len(images01), -1))
        predicted = probs.argmax(axis=1)
        hist = np.bincount(predicted, minlength=10) / len(predicted)
        entropy = -sum(p * math.log(p) for p in hist if p > 0)
        out = {"mean_max_confidence": float(probs.max(axis=1).mean()), "class_entropy": float(entropy),
               "class_entropy_max": math.log(10), "class_histogram": hist.round(3).tolist()}
        if labels is not None:
            out["conditional_accuracy"] = float((predicted == np.asarray(labels)).mean())
        return out

    def real_reference(self, n: int = 1000, seed: int = 0) -> dict[str, float]:
        rows = np.random.default_rng(seed).choice(len(self.real), size=n, replace=False)
        return self.score(self.real[rows].reshape(n, 1, 8, 8))
