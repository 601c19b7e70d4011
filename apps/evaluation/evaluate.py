"""Sample quality of generation configurations, measured with a classifier trained on the real data.

For every named :class:`EngineConfig` the model generates ``samples_per_class`` images of every
class; a classifier trained on the data's ``train`` split (:mod:`.classifier`) scores them:

- ``accuracy``: fraction of images classified as the class they were generated for;
- ``fd``: Fréchet distance between the classifier features of the generated images and of the real
  ``heldout`` split (an FID on digit-classifier features; lower is better);
- ``precision`` / ``recall``: k-NN manifold precision and recall in the same feature space;
- ``generate_s`` / ``images_per_s``: wall time of ``Pipeline.generate`` (model loading excluded,
  reported as ``load_s``); ``cache_peak_mib``: the KV cache's peak size during generation (how the
  cache policies of one model compare, e.g. raster ``full`` against ``sink``).

Any configuration ``mvar-engine`` generates with can be scored: next-scale (VAR ``full``, MVAR
``markov``) and next-token (``--trajectory raster`` with any raster cache policy) side by side,
as long as they make images of one size for the data's classes.

The first row, ``real``, scores the real held-out split against the real train split with the same
metrics (its accuracy is the classifier's held-out accuracy): the floor a perfect generator would
reach, up to sample-size effects (FD is biased upwards for small sets).

The JSON report ``{"evaluation", "machine", "config", "results"}`` is rewritten atomically after
every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

import torch

from ...core.errors import UsageError
from ..bench.report import format_table, machine_info, write_json
from ..cli_helpers import one_line
from ..config import EngineConfig
from ..data import ImageSet, load_dataset
from ..pipeline import Pipeline, resolve_components
from .classifier import FEATURE_DIM, DigitClassifier, load_or_train
from .metrics import class_accuracy, frechet_distance, precision_recall

REAL_ROW = "real"
"""Name of the reference row (real held-out images against the real train split); reserved."""

DEFAULT_K = 3

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "config"), ("images", "images"), ("generate_s", "gen s"), ("images_per_s", "img/s"),
    ("accuracy", "accuracy"), ("fd", "FD"), ("precision", "precision"), ("recall", "recall"),
    ("cache_peak_mib", "cache MiB"), ("components", "trajectory/attention/cache"),
)

METRIC_NOTES = {
    "accuracy": "fraction of generated images the classifier assigns to the requested class",
    "fd": "Frechet distance of classifier penultimate features against the real held-out split (lower is better)",
    "precision": "fraction of generated images inside the real held-out k-NN feature manifold",
    "recall": "fraction of real held-out images inside the generated k-NN feature manifold",
    "real row": "real held-out split scored against the real train split: the floor for each metric",
}


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
    """Re-raise a ``UsageError`` as one line prefixed with ``configuration 'name': ``."""
    try:
        yield
    except UsageError as error:
        raise UsageError(f"configuration '{name}': {one_line(error)}") from error


def metric_row(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor,
               reference_features: torch.Tensor, k: int = DEFAULT_K, num_classes: int | None = None) -> dict[str, Any]:
    """Metrics of ``images [N, 3, R, R]`` in [-1, 1] generated (or drawn) for ``labels [N]`` against
    the features of a reference set: accuracy, per-class accuracy, FD, precision, recall."""
    features = classifier.features(images)
    predictions = classifier.predict(images)
    precision, recall = precision_recall(reference_features, features, k=k)
    num_classes = num_classes or classifier.num_classes
    per_class = [class_accuracy(predictions[labels == c], labels[labels == c]) if (labels == c).any() else None
                 for c in range(num_classes)]
    return {"images": int(labels.shape[0]), "accuracy": class_accuracy(predictions, labels),
            "fd": frechet_distance(features, reference_features), "precision": precision, "recall": recall,
            "per_class_accuracy": per_class}


class Evaluation:
    """State of one evaluation run; see :func:`evaluate` for the arguments."""

    def __init__(self, configs: Mapping[str, EngineConfig], samples_per_class: int = 50, data: str | None = "digits",
                 resolution: int | None = None, classifier_seed: int = 0, batch_size: int | None = None, *,
                 output: str | Path | None = None, classifier: str | Path | None = None, k: int = DEFAULT_K,
                 registry=None, log: TextIO | None = None, notes: Mapping[str, Any] | None = None) -> None:
        problems = []
        if samples_per_class < 1:
            problems.append(f"--samples-per-class must be at least 1, got {samples_per_class}")
        if batch_size is not None and batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {batch_size}")
        if resolution is not None and resolution < 8:
            problems.append(f"--resolution must be at least 8, got {resolution}")
        if k < 1:
            problems.append(f"k must be at least 1, got {k}")
        if REAL_ROW in configs:
            problems.append(f"'{REAL_ROW}' names the reference row; give the configuration another name")
        if not configs and resolution is None:
            problems.append("nothing to evaluate: give at least one configuration (--compare NAME=FLAGS) or a --resolution")
        if problems:
            raise UsageError(problems[0])
        self.configs = {name: (config if batch_size is None else config.model_copy(update={"batch_size": batch_size}))
                        for name, config in configs.items()}
        self.samples_per_class, self.data, self.resolution = samples_per_class, data, resolution
        self.classifier_seed, self.batch_size, self.k = classifier_seed, batch_size, k
        self.output = Path(output) if output is not None else None
        self.classifier_path, self.registry, self.log = classifier, registry, log
        self.notes = dict(notes or {})
        self.results: list[dict[str, Any]] = []
        self.train: ImageSet | None = None
        self.heldout: ImageSet | None = None
        self.classifier: DigitClassifier | None = None
        self.classifier_info: dict[str, Any] = {}
        self.heldout_features: torch.Tensor | None = None
        self.machine = machine_info("cpu")
        self.complete = False  # the report says so until every row is in: a stopped run leaves a marked partial report

    def say(self, text: str) -> None:
        if self.log is not None:
            print(text, file=self.log, flush=True)

    # -- report ---------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        evaluation: dict[str, Any] = {"metrics": METRIC_NOTES, "k": self.k, "feature_dim": FEATURE_DIM}
        if self.train is not None and self.heldout is not None:
            evaluation.update(data=self.train.source, classes=list(self.train.class_names), resolution=self.resolution,
                              train_images=len(self.train), heldout_images=len(self.heldout),
                              classifier=self.classifier_info)
        config = {"samples_per_class": self.samples_per_class, "data": self.data or "digits",
                  "resolution": self.resolution, "classifier_seed": self.classifier_seed,
                  "batch_size": self.batch_size, "k": self.k, "output": str(self.output) if self.output else None,
                  "classifier": str(self.classifier_path) if self.classifier_path else None, **self.notes,
                  "configurations": {name: c.model_dump(mode="json") for name, c in self.configs.items()}}
        done = {row["name"] for row in self.results}
        return {"complete": self.complete, "pending": [name for name in self.configs if name not in done],
                "evaluation": evaluation, "machine": self.machine, "config": config, "results": self.results}

    def save(self) -> Path | None:
        return write_json(self.output, self.payload()) if self.output is not None else None

    def add(self, row: dict[str, Any]) -> None:
        self.results.append(row)
        self.save()
        self.say(f"{row['name']}: accuracy {row['accuracy']:.3f}, FD {row['fd']:.3g}, precision {row['precision']:.3f}, "
                 f"recall {row['recall']:.3f}" + (f", {row['generate_s']:.1f} s" if row.get("generate_s") else ""))

    # -- steps ----------------------------------------------------------------------------------
    def check_components(self) -> None:
        """Resolve every configuration's components before any long work (errors name the configuration)."""

        for name, config in self.configs.items():
            with named(name):
                resolve_components(config, self.registry)

    def load_data(self, resolution: int) -> None:
        """The train and held-out splits at ``resolution`` (fixes the evaluation's resolution)."""
        self.resolution = resolution
        self.train = load_dataset(self.data, resolution, "train")
        self.heldout = load_dataset(self.data, resolution, "heldout")
        if len(self.heldout) <= self.k or len(self.train) <= self.k:
            raise UsageError(f"the data has {len(self.heldout)} held-out and {len(self.train)} train images; the "
                             f"metrics need more than {self.k} of each (give a larger dataset)")

    def prepare_reference(self) -> None:
        """Get the classifier (cached or trained) and add the ``real`` row."""
        assert self.train is not None and self.heldout is not None
        self.classifier, info = load_or_train(self.train, self.classifier_seed, self.classifier_path, log=self.log)
        self.classifier_info = info.as_dict()
        self.heldout_features = self.classifier.features(self.heldout.images)
        train_features = self.classifier.features(self.train.images)
        row = metric_row(self.classifier, self.heldout.images, self.heldout.labels, train_features, self.k,
                         self.train.num_classes)
        self.classifier_info["heldout_accuracy"] = row["accuracy"]
        self.add({"name": REAL_ROW, "components": "real held-out vs real train", "reference": "train",
                  "resolution": self.resolution, "generate_s": None, "images_per_s": None, **row})

    def run_config(self, name: str, config: EngineConfig) -> None:
        """Build the configuration's pipeline, check it against the data, generate, score, add its row.
        The first configuration also fixes the resolution (when not given) and triggers the reference."""

        with named(name):
            start = time.perf_counter()
            pipe = Pipeline.from_config(config, self.registry)
            load_s = time.perf_counter() - start
            height, width = pipe.tokenizer.config.image_hw
            if height != width:
                raise UsageError(f"generates {height}x{width} images; the evaluation needs square images")
            if self.resolution is not None and height != self.resolution:
                raise UsageError(f"generates {height}x{width} images but the evaluation resolution is "
                                 f"{self.resolution} (compare configurations of one image size, or set --resolution {height})")
        if self.train is None:  # data errors are not the configuration's own: no name prefix
            self.machine = machine_info(pipe.device)
            self.load_data(height)
        assert self.train is not None
        classes = self.train.num_classes
        with named(name):
            if pipe.model.num_classes != classes:
                raise UsageError(f"the model has {pipe.model.num_classes} classes but the data ({self.train.source}) "
                                 f"has {classes}; evaluate it on the data it was trained on (--data)")
            if classes * self.samples_per_class <= self.k:
                raise UsageError(f"--samples-per-class {self.samples_per_class} gives {classes * self.samples_per_class} "
                                 f"images; precision/recall need more than {self.k} (raise --samples-per-class)")
        if self.classifier is None:
            self.prepare_reference()
        assert self.classifier is not None and self.heldout_features is not None
        with named(name):
            self.say(f"{name}: generating {classes} classes x {self.samples_per_class} images")
            start = time.perf_counter()
            result = pipe.generate(list(range(classes)), self.samples_per_class)
            generate_s = time.perf_counter() - start
            if tuple(result.images.shape[-2:]) != (self.resolution, self.resolution):
                raise UsageError(f"generated {tuple(result.images.shape[-2:])} images, expected "
                                 f"{self.resolution}x{self.resolution} (the tokenizer's decoder does not match its schedule)")
        names = pipe.components.names
        row = {"name": name, "components": f"{names['trajectory']}/{names['attention']}/{names['cache']}",
               "trajectory": names["trajectory"], "attention": names["attention"], "cache": names["cache"],
               "backends": dict(result.backends_used), "device": str(pipe.device), "reference": "heldout",
               "resolution": self.resolution, "load_s": load_s, "generate_s": generate_s,
               "images_per_s": result.labels.shape[0] / generate_s if generate_s > 0 else None,
               "cache_peak_mib": result.cache_peak_bytes / 2 ** 20}
        images, labels = result.images.float() * 2 - 1, result.labels
        del pipe, result  # free the models before the next configuration loads its own
        self.add({**row, **metric_row(self.classifier, images, labels, self.heldout_features, self.k, classes)})

    def run(self) -> dict[str, Any]:
        """Every configuration in order (the ``real`` row first); returns the payload."""
        self.check_components()
        if not self.configs:
            self.load_data(int(self.resolution))  # type: ignore[arg-type]
            self.prepare_reference()
        for name, config in self.configs.items():
            self.run_config(name, config)
        self.complete = True
        self.save()
        return self.payload()


def evaluate(configs: Mapping[str, EngineConfig], samples_per_class: int = 50, data: str | None = "digits",
             resolution: int | None = None, classifier_seed: int = 0, batch_size: int | None = None, *,
             output: str | Path | None = None, classifier: str | Path | None = None, k: int = DEFAULT_K,
             registry=None, log: TextIO | None = None, notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Score every named configuration (see the module docstring); returns the report payload.

    - ``configs``: name -> configuration, run as given (sampling seed, device, checkpoints), except
      ``batch_size`` when that is not None. Names must not be ``"real"``.
    - ``data``: ``"digits"``/None or an image folder (:func:`~mvar_engine.apps.data.load_dataset`);
      its default deterministic train/heldout split is used.
    - ``resolution``: the data resolution; None takes the first configuration's image size. Every
      configuration must generate images of exactly this size, and its model must have as many
      classes as the data (else a one-line ``UsageError`` naming the configuration).
    - ``classifier_seed``: the classifier's training seed (part of its cache key); kept apart from the
      sampling seeds so that changing those does not change the feature space.
    - ``output``: JSON report path (rewritten after every row), None for none; ``classifier``: weights
      file to load, or to train and write when missing (None: the cache, see :mod:`.classifier`).
    - ``log``: progress lines go here (None: silent); ``notes``: extra entries of the report's ``config``
      (e.g. the command line's inputs).
    """
    return Evaluation(configs, samples_per_class, data, resolution, classifier_seed, batch_size, output=output,
                      classifier=classifier, k=k, registry=registry, log=log, notes=notes).run()


def table_text(payload: Mapping[str, Any]) -> str:
    """The readable table of a report's rows."""
    return format_table(payload["results"], TABLE_COLUMNS)


def summary_lines(payload: Mapping[str, Any]) -> list[str]:
    """Short lines under the table: data, classifier origin and held-out accuracy."""
    ev = payload["evaluation"]
    if "classifier" not in ev:
        return []
    clf = ev["classifier"]
    origin = (f"trained in {clf['train_seconds']:.1f} s" if clf["trained"] else "loaded") + f" ({clf['path']})"
    lines = [f"data: {ev['data']} at {ev['resolution']}px, {ev['train_images']} train / {ev['heldout_images']} held-out "
             f"images; classifier {origin}, held-out accuracy {clf['heldout_accuracy']:.3f}"]
    if not clf["matches_data"]:
        lines.append("warning: the --classifier file was trained on other data or with another seed")
    if clf.get("write_error"):
        lines.append(f"warning: the classifier could not be cached ({clf['write_error']})")
    return lines


def print_report(payload: Mapping[str, Any], out: TextIO | None = None, table: bool = True,
                 path: Path | None = None) -> None:
    """Table (optional), summary lines and the report path."""
    out = out or sys.stdout
    if table:
        print(table_text(payload), file=out)
    for line in summary_lines(payload):
        print(line, file=out)
    if path is not None:
        print(f"wrote {path}", file=out)
