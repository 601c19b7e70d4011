"""Sample-quality evaluation of generation configurations (``mvar-engine evaluate``).

- :mod:`.classifier`: a small CNN trained (and cached) on the real data's train split; its
  penultimate activations are the feature space of the metrics;
- :mod:`.metrics`: Fréchet distance, k-NN precision/recall and accuracy (numpy / torch only);
- :mod:`.evaluate`: generate every class with each configuration and score it, plus a ``real``
  reference row; JSON report and table;
- :mod:`.cli`: the ``mvar-engine evaluate`` command.
"""

from __future__ import annotations

from .classifier import DigitClassifier, load_or_train, train_classifier
from .evaluate import REAL_ROW, evaluate
from .metrics import class_accuracy, frechet_distance, frechet_distance_from_moments, precision_recall

__all__ = [
    "DigitClassifier",
    "REAL_ROW",
    "class_accuracy",
    "evaluate",
    "frechet_distance",
    "frechet_distance_from_moments",
    "load_or_train",
    "precision_recall",
    "train_classifier",
]
