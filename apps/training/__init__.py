"""Training: the multi-scale VQ-VAE tokenizer, VAR/MVAR transformers and the raster GPT, single-process or
under torchrun.

Modules, one job each:

- :mod:`.distributed` - torchrun detection, process group (gloo on CPU, nccl on CUDA), rank helpers;
- :mod:`.batches` - deterministic, resumable per-rank batch shards and per-step random streams;
- :mod:`.image_stream`, :mod:`.data_sources`, :mod:`.training_data` - the data of a step: the digits
  in memory, an image folder streamed by DataLoader workers (VAR's augmentation), or a codes folder;
- :mod:`.code_cache` / :mod:`.cache_codes` - the codes folder's format and ``mvar-engine cache-codes``;
- :mod:`.job` - the one training loop every job runs; :mod:`.stepper` - one optimizer step
  (micro-batches, precision, clipping); :mod:`.sharding` - ``--shard`` (FSDP2);
- :mod:`.optim` - AdamW parameter groups, warm-up + cosine/linear LR schedule, gradient clipping;
- :mod:`.checkpointing` - ``checkpoint.pt`` (resume) and ``*.safetensors`` exports with metadata;
- :mod:`.loop` - the step loop under :mod:`.job`: progress bar, metrics JSONL, periodic checkpoints, graceful stop;
- :mod:`.rundir` - run-directory rules (overwrite / resume) and the settings record;
- :mod:`.grouped_forward` - logits of a subset of scales, MVAR's parallel groups, the DDP unit;
- :mod:`.common` / :mod:`.frozen_tokenizer` - what the transformer trainers share: settings helpers, the
  frozen tokenizer and its token targets;
- :mod:`.tokenizer_trainer` / :mod:`.var_trainer` / :mod:`.raster_trainer` - the trainers (Python API);
- :mod:`.cli` - ``mvar-engine train-tokenizer`` and ``mvar-engine train``.

Python API::

    from mvar_engine.apps.training import TokenizerTrainSettings, VarTrainSettings, train_tokenizer, train_var
    train_tokenizer(TokenizerTrainSettings(steps=1500, output="runs/tokenizer"))
    train_var(VarTrainSettings(tokenizer="runs/tokenizer/tokenizer.safetensors", strategy="parallel"))
"""

from ...models.checkpoint import read_weights_metadata
from .raster_trainer import RasterTrainSettings, train_raster
from .tokenizer_trainer import TokenizerTrainSettings, TrainSummary, train_tokenizer
from .var_trainer import VarTrainSettings, train_var

__all__ = ["RasterTrainSettings", "TokenizerTrainSettings", "TrainSummary", "VarTrainSettings", "read_weights_metadata",
           "train_raster", "train_tokenizer", "train_var"]
