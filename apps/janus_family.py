"""The ``janus`` model family: Janus-Pro through transformers (the ``builtin-janus`` entry point),
registered through the ``mvar_engine_model_adapters`` hook exactly as a plugin registers its own.

Its options (:class:`JanusOptions`): ``model_dir``, a local Hugging Face directory (config.json,
*.safetensors, the tokenizer files), e.g. a download of ``deepseek-community/Janus-Pro-1B``;
``prompt``, the text to draw, put into Janus' chat format (:func:`encode_prompt`) unless
``chat_format`` is false (still BOS ... begin-of-image). The adapter is built for one prompt:
``--labels`` / ``--samples-per-label`` only give the number of images (the family has one "class",
0). The weights load in the run's dtype (``bfloat16`` / ``float16`` on CUDA, where it is also the
autocast dtype).

Needs transformers (``pip install 'mvar-engine[hf]'``); without it the component is listed as
unavailable with that line, and building it is the same one-line error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field, field_validator

from ..core.adapter import ModelAdapter, ModelFacts, ModelFamily
from ..core.errors import UsageError, setting
from ..core.hookspecs import hookimpl
from ..core.layout import SequenceLayout
from ..core.records import Availability, ModelAdapterRecord
from ..models.janus import (TRANSFORMERS_MISSING, JanusPromptedModel, encode_prompt, janus_weights_id, load_janus,
                            load_janus_config, load_tokenizer)
from .config import SettingsModel, not_empty_path


class JanusOptions(SettingsModel):
    """Janus-Pro's model settings."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path = Field(description="a local Hugging Face Janus-Pro directory (config.json, *.safetensors, "
                                        "tokenizer files); never the network")
    prompt: str | None = Field(None, description="what the model draws")
    chat_format: bool = Field(True, description="put the prompt into the model's chat format (false: feed it as written)")

    @field_validator("model_dir", mode="before")
    @classmethod
    def _no_empty_dir(cls, value: Any) -> Any:
        return not_empty_path(value, setting("model_dir"))


def _prompt_of(options: JanusOptions) -> str:
    if options.prompt is None or not options.prompt.strip():
        raise UsageError(f"model 'janus' needs {setting('prompt', 'TEXT')} (the image to draw)")
    return options.prompt


def _prompt_ids(model_dir: str, tokenizer, prompt: str, chat_format: bool) -> torch.Tensor:
    """``prompt`` encoded by the directory's tokenizer (None: a one-line error naming the files)."""
    if tokenizer is None:
        raise UsageError(f"Janus model directory {model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json) "
                         f"to encode {setting('prompt')}")
    return encode_prompt(tokenizer, prompt, chat_format=chat_format)


class JanusFamily(ModelFamily):
    """Janus-Pro (transformers' ``JanusForConditionalGeneration``) generating one prompt's images."""

    name, family = "janus", "next-token"
    sampling_defaults = {"cfg": 5.0, "top_k": 0, "top_p": 1.0}  # DeepSeek's and transformers' generation defaults

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[JanusPromptedModel, None]:
        """``(JanusPromptedModel, None)``: the weights (on the CPU, in ``dtype``) and the encoded prompt;
        the VQ decoder lives inside the model, so there is no separate tokenizer."""
        model_dir, prompt = str(self.options.model_dir), _prompt_of(self.options)
        hf_model, tokenizer = load_janus(model_dir, dtype=dtype, device="cpu")
        return JanusPromptedModel(hf_model, _prompt_ids(model_dir, tokenizer, prompt, self.options.chat_format)), None

    def inspect(self) -> ModelFacts:
        """From config.json and the tokenizer only (no weights read)."""
        model_dir, prompt = str(self.options.model_dir), _prompt_of(self.options)
        config = load_janus_config(model_dir)
        text, vision = config.text_config, config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        if int(vision.num_image_tokens) != side * side:
            raise UsageError(f"{model_dir}/config.json: vision_config.num_image_tokens {vision.num_image_tokens} is not "
                             f"the VQ grid {side} x {side}")
        prefix = int(_prompt_ids(model_dir, load_tokenizer(model_dir), prompt, self.options.chat_format).numel())
        context = getattr(text, "max_position_embeddings", None)
        if context is not None and prefix + side * side > int(context):
            raise UsageError(f"{setting('prompt')} is {prefix} tokens: with the {side * side} image tokens that is more "
                             f"than the {context} positions of {model_dir}'s language model (shorten the prompt to at "
                             f"most {int(context) - side * side} tokens)")
        return ModelFacts(layout=SequenceLayout(((1, prefix), (side, side))), num_layers=int(text.num_hidden_layers),
                          num_heads=int(text.num_attention_heads), num_classes=1,
                          weights_id=janus_weights_id(model_dir), pixels_per_token=int(vision.patch_size))

    def adapter(self, model: JanusPromptedModel, tokenizer: Any = None) -> ModelAdapter:
        return model.adapter()


def _available() -> Availability:
    return Availability.yes() if importlib.util.find_spec("transformers") is not None else Availability.no(TRANSFORMERS_MISSING)


@hookimpl
def mvar_engine_model_adapters():
    return [
        ModelAdapterRecord(name="janus", factory=JanusFamily, family="next-token", availability=_available,
                           options=JanusOptions,
                           description="Janus-Pro text-to-image through transformers (next-token; --model-dir, --prompt)"),
    ]
