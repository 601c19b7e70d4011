"""A small CNN classifier whose penultimate activations serve as evaluation features.

Input contract: images ``[N, C, R, R]`` float in ``[-1, 1]`` (the :class:`~mvar_engine.apps.data.ImageSet`
range), any ``R >= 8``. The network resizes them to its ``input_size`` first (bilinear, antialiased
when shrinking): the training resolution clamped to ``[MIN_INPUT, MAX_INPUT]`` (16..32), so up to
32 px the classifier sees every pixel of the images it scores, and one network accepts any ``R``.

- :func:`train_classifier`: deterministic for a given (data, seed, hyper-parameters) and torch build:
  seeded initialisation, shuffling and augmentation, trained on one thread (so the weights do not
  depend on the thread count; a network this small gains little from more, and a busy machine
  slows multi-threaded small ops badly); the global RNG state and thread count are restored.
- :meth:`DigitClassifier.features`: ``[N, FEATURE_DIM]`` penultimate activations (float32, CPU);
  :meth:`DigitClassifier.predict`: ``[N]`` class indices.
- :func:`load_or_train`: the cached classifier for a training set, trained and written atomically
  (``.safetensors`` with metadata) on a miss. Cache folder: ``$MVAR_ENGINE_CACHE``, else
  ``$XDG_CACHE_HOME/mvar-engine``, else ``~/.cache/mvar-engine``; file
  ``classifier-<key>.safetensors`` where the key hashes the architecture version, the training
  hyper-parameters, the seed, the resolution and the training images and labels.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import UsageError
from ...models.checkpoint import save_state_dict
from ..data import ImageSet

ARCH_VERSION = "digit-cnn-v1"
"""Changes whenever the architecture or the training recipe changes (invalidates cached weights)."""

MIN_INPUT, MAX_INPUT = 16, 32
FEATURE_DIM = 128
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
MAX_SHIFT = 2
"""Training augmentation: random translations of up to this many pixels (at the network's input size)."""

CACHE_ENV = "MVAR_ENGINE_CACHE"


class DigitClassifier(nn.Module):
    """Three conv/ReLU/max-pool stages (16, 32, 64 channels) on ``input_size``-pixel inputs, a
    ``FEATURE_DIM`` ReLU layer (the features) and a linear head with ``num_classes`` outputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = MAX_INPUT) -> None:
        super().__init__()
        if input_size < 8:
            raise ValueError(f"input_size must be at least 8, got {input_size}")
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (self.input_size // 8) ** 2, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, R, R]`` in [-1, 1] -> ``[N, C, input_size, input_size]`` float32."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2] or images.shape[1] != self.in_channels:
            raise ValueError(f"expected square images [N, {self.in_channels}, R, R], got shape {tuple(images.shape)}")
        x = images.float()
        size = self.input_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of prepared inputs (differentiable)."""
        return self.body(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of raw images (see the module docstring)."""
        return self.head(self.embed(self.prepare(images)))

    def _batched(self, images: torch.Tensor, fn, batch_size: int) -> torch.Tensor:
        self.eval()
        device = next(self.parameters()).device
        with torch.no_grad():
            return torch.cat([fn(self.prepare(images[i:i + batch_size].to(device))).cpu()
                              for i in range(0, images.shape[0], batch_size)])

    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """``[N, FEATURE_DIM]`` float32 penultimate activations of ``images [N, C, R, R]`` in [-1, 1]."""
        return self._batched(images, self.embed, batch_size)

    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """``[N]`` int64 predicted classes of ``images [N, C, R, R]`` in [-1, 1]."""
        return self._batched(images, lambda x: self.head(self.embed(x)).argmax(dim=1), batch_size)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random ``(dy, dx)`` in ``[-MAX_SHIFT, MAX_SHIFT]`` (edges replicated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def input_size_for(resolution: int) -> int:
    """The network input size for data at ``resolution``: clamped to ``[MIN_INPUT, MAX_INPUT]``."""
    return max(MIN_INPUT, min(MAX_INPUT, resolution))


def train_classifier(train: ImageSet, seed: int = 0, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
                     lr: float = LEARNING_RATE, log: TextIO | None = None) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``train`` (CPU, Adam, cross-entropy, random shifts).

    Deterministic: the same data, seed and hyper-parameters give the same weights (see the module
    docstring); the global torch RNG and thread count are restored. Returns the model in eval mode.
    """
    if len(train) == 0:
        raise UsageError("the classifier's training split is empty (give a dataset with images in every class)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(train, seed, epochs, batch_size, lr, log)
    finally:
        torch.set_num_threads(threads)


def _train(train: ImageSet, seed: int, epochs: int, batch_size: int, lr: float, log: TextIO | None) -> DigitClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(train.num_classes, train.images.shape[1], input_size_for(train.resolution))
    generator = torch.Generator().manual_seed(seed)
    inputs = model.prepare(train.images)
    labels = train.labels.long()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(train) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for start in range(0, len(train), batch_size):
            index = order[start:start + batch_size]
            x = _shift(inputs[index], generator)
            loss = F.cross_entropy(model.head(model.embed(x)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        if log is not None:
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {total / len(train):.4f}", file=log, flush=True)
    return model.eval()


# -- cache ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$MVAR_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/mvar-engine``, else ``~/.cache/mvar-engine``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mvar-engine"


def training_key(train: ImageSet, seed: int, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
                 lr: float = LEARNING_RATE) -> str:
    """Hex digest identifying the classifier ``train_classifier(train, seed, ...)`` would produce."""
    digest = hashlib.sha256()
    recipe = f"{ARCH_VERSION}|{input_size_for(train.resolution)}|{FEATURE_DIM}|{MAX_SHIFT}|{epochs}|{batch_size}|{lr!r}|{seed}"
    digest.update(f"{recipe}|{train.resolution}|{'/'.join(train.class_names)}".encode())
    digest.update(train.images.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(train.labels.detach().cpu().long().contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_path(key: str) -> Path:
    """Where the classifier with training key ``key`` is cached."""
    return cache_dir() / f"classifier-{key[:16]}.safetensors"


def save_classifier(model: DigitClassifier, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write weights and metadata (``format``, ``num_classes``, ``in_channels``, ``input_size`` and
    ``metadata``) as ``.safetensors``, atomically."""
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(format=ARCH_VERSION, num_classes=str(model.num_classes), in_channels=str(model.in_channels),
                input_size=str(model.input_size))
    return save_state_dict(model.state_dict(), path, metadata=meta)


def load_classifier(path: str | os.PathLike) -> tuple[DigitClassifier, dict[str, str]]:
    """Weights written by :func:`save_classifier`; anything else raises a one-line ``UsageError``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        state = load_file(str(path))
    except Exception as error:
        raise UsageError(f"--classifier {path}: not a readable classifier file ({type(error).__name__}); "
                         f"delete it or give another path to train a new one") from None
    if meta.get("format") != ARCH_VERSION:
        raise UsageError(f"--classifier {path}: written for format {meta.get('format')!r}, this version needs "
                         f"{ARCH_VERSION!r} (delete it or give another path to retrain)")
    try:
        model = DigitClassifier(int(meta["num_classes"]), int(meta["in_channels"]), int(meta["input_size"]))
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError):
        raise UsageError(f"--classifier {path}: weights do not match the classifier architecture "
                         f"(delete it or give another path to retrain)") from None
    return model.eval(), meta


@dataclass
class ClassifierInfo:
    """How the classifier of an evaluation was obtained."""

    path: str
    key: str
    trained: bool
    """True: trained in this run (and written to ``path`` unless ``write_error`` is set)."""
    train_seconds: float | None
    matches_data: bool
    """False: a ``--classifier`` file trained on other data (or with another seed) was used as given."""
    write_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def load_or_train(train: ImageSet, seed: int = 0, path: str | os.PathLike | None = None,
                  log: TextIO | None = None) -> tuple[DigitClassifier, ClassifierInfo]:
    """The classifier for ``train`` and ``seed``.

    ``path`` None: the cache file :func:`default_path` (a corrupt or outdated cache entry is retrained
    and replaced). ``path`` given: loaded when it exists (even when trained on other data: then
    ``matches_data`` is False); otherwise trained and written there. Its class count must equal the
    data's. A cache that cannot be written is reported in ``write_error``, not raised.
    """
    key = training_key(train, seed)
    explicit = path is not None
    target = Path(path) if explicit else default_path(key)
    if target.is_file():
        try:
            model, meta = load_classifier(target)
        except UsageError:
            if explicit:
                raise
        else:
            if model.num_classes != train.num_classes or model.in_channels != train.images.shape[1]:
                raise UsageError(f"--classifier {target}: trained for {model.num_classes} classes and "
                                 f"{model.in_channels} channels, the data has {train.num_classes} and "
                                 f"{train.images.shape[1]} (give another --classifier path)")
            return model, ClassifierInfo(str(target), meta.get("key", ""), False, None, meta.get("key") == key)
    if log is not None:
        print(f"training the evaluation classifier on {len(train)} images ({train.source}, {train.resolution}px)",
              file=log, flush=True)
    start = time.perf_counter()
    model = train_classifier(train, seed)
    seconds = time.perf_counter() - start
    info = ClassifierInfo(str(target), key, True, seconds, True)
    try:
        save_classifier(model, target, {"key": key, "seed": seed, "resolution": train.resolution,
                                        "source": train.source, "train_images": len(train)})
    except OSError as error:
        if explicit:
            raise UsageError(f"--classifier {target}: cannot write it ({error.strerror or error}); "
                             f"give a writable path") from None
        info.write_error = f"{type(error).__name__}: {error.strerror or error}"
        if log is not None:
            print(f"warning: could not cache the classifier at {target} ({info.write_error}); "
                  f"set {CACHE_ENV} to a writable folder", file=log, flush=True)
    return model, info
