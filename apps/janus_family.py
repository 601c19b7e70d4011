"""The ``janus`` model family: Janus-Pro through transformers (the ``builtin-janus`` entry point),
registered through the ``mvar_engine_model_adapters`` hook exactly as a plugin registers its own.

Settings it reads (``settings`` is the CLI's ``EngineConfig``):

- ``settings.model.model_dir``: a local Hugging Face directory (config.json, *.safetensors, the
  tokenizer files), e.g. a download of ``deepseek-community/Janus-Pro-1B``; required;
- ``settings.model.prompt``: the text to draw, put into Janus' chat format (:func:`encode_prompt`);
  required (the adapter is built for one prompt; ``--labels`` / ``--samples-per-label`` only give
  the number of images: the family has one "class", 0);
- ``settings.model.chat_format`` (optional, default True): False feeds ``prompt`` as it is
  (still BOS ... begin-of-image);
- ``settings.dtype``: the dtype the weights are loaded in (``float32``; ``bfloat16`` /
  ``float16`` on CUDA, where it is also the autocast dtype).

Needs transformers (``pip install 'mvar-engine[hf]'``); without it the component is listed as
unavailable with that line, and building it is the same one-line error.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..core.adapter import ModelAdapter, ModelFacts, ModelFamily
from ..core.errors import UsageError
from ..core.hookspecs import hookimpl
from ..core.layout import SequenceLayout
from ..core.records import Availability, ModelAdapterRecord
from ..models.janus import (TRANSFORMERS_MISSING, JanusPromptedModel, encode_prompt, janus_weights_id, load_janus,
                            load_janus_config, load_tokenizer)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _settings(settings: Any) -> tuple[str, str, bool, torch.dtype]:
    model = getattr(settings, "model", None)
    model_dir = getattr(model, "model_dir", None)
    prompt = getattr(model, "prompt", None)
    if not model_dir:
        raise UsageError("model 'janus' needs --model-dir DIR (a local Hugging Face Janus-Pro directory: config.json, "
                         "*.safetensors, tokenizer files)")
    if prompt is None or not str(prompt).strip():
        raise UsageError("model 'janus' needs --prompt TEXT (the image to draw)")
    chat_format = getattr(model, "chat_format", None) is not False  # unset (None): the chat format
    dtype = DTYPES[getattr(settings, "dtype", "float32") or "float32"]
    return str(model_dir), str(prompt), chat_format, dtype


def _prompt_ids(model_dir: str, tokenizer, prompt: str, chat_format: bool) -> torch.Tensor:
    """``prompt`` encoded by the directory's tokenizer (None: a one-line error naming the files)."""
    if tokenizer is None:
        raise UsageError(f"Janus model directory {model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json) "
                         f"to encode --prompt")
    return encode_prompt(tokenizer, prompt, chat_format=chat_format)


class JanusFamily(ModelFamily):
    """Janus-Pro (transformers' ``JanusForConditionalGeneration``) generating one prompt's images."""

    name, family = "janus", "next-token"
    sampling_defaults = {"cfg": 5.0, "top_k": 0, "top_p": 1.0}  # DeepSeek's and transformers' generation defaults

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def build(self, settings) -> tuple[JanusPromptedModel, None]:
        """``(JanusPromptedModel, None)``: the weights (CPU, ``settings.dtype``) and the encoded prompt;
        the VQ decoder lives inside the model, so there is no separate tokenizer."""
        model_dir, prompt, chat_format, dtype = _settings(settings)
        hf_model, tokenizer = load_janus(model_dir, dtype=dtype, device="cpu")
        return JanusPromptedModel(hf_model, _prompt_ids(model_dir, tokenizer, prompt, chat_format)), None

    def inspect(self, settings) -> ModelFacts:
        """From config.json and the tokenizer only (no weights read)."""
        model_dir, prompt, chat_format, _ = _settings(settings)
        config = load_janus_config(model_dir)
        text, vision = config.text_config, config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        if int(vision.num_image_tokens) != side * side:
            raise UsageError(f"{model_dir}/config.json: vision_config.num_image_tokens {vision.num_image_tokens} is not "
                             f"the VQ grid {side} x {side}")
        prefix = int(_prompt_ids(model_dir, load_tokenizer(model_dir), prompt, chat_format).numel())
        context = getattr(text, "max_position_embeddings", None)
        if context is not None and prefix + side * side > int(context):
            raise UsageError(f"--prompt is {prefix} tokens: with the {side * side} image tokens that is more than the "
                             f"{context} positions of {model_dir}'s language model (shorten the prompt to at most "
                             f"{int(context) - side * side} tokens)")
        return ModelFacts(layout=SequenceLayout(((1, prefix), (side, side))), num_layers=int(text.num_hidden_layers),
                          num_heads=int(text.num_attention_heads), num_classes=1,
                          weights_id=janus_weights_id(model_dir))

    def adapter(self, model: JanusPromptedModel, tokenizer: Any = None) -> ModelAdapter:
        return model.adapter()


def _available() -> Availability:
    return Availability.yes() if importlib.util.find_spec("transformers") is not None else Availability.no(TRANSFORMERS_MISSING)


@hookimpl
def mvar_engine_model_adapters():
    return [
        ModelAdapterRecord(name="janus", factory=JanusFamily, family="next-token", availability=_available,
                           claims=("model_dir", "prompt"),
                           description="Janus-Pro text-to-image through transformers (next-token; --model-dir, --prompt)"),
    ]
