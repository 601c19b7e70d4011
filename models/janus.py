"""Janus-Pro (transformers' ``JanusForConditionalGeneration``) as a model adapter of the one engine.

The engine drives the language model layer by layer, so every cache policy (``full``, ``window``,
``sink``, ``h2o``, ``ssd``) and every attention backend runs Janus' attention; transformers only
supplies the modules and weights (its own attention functions and KV cache are never called).

What the adapter reproduces from ``JanusForConditionalGeneration.generate(generation_mode="image")``
(transformers 5.x, ``models/janus/modeling_janus.py``), checked token for token by
``tests/test_janus.py``:

- Rows ``[cond; uncond]`` (``input_ids.repeat(2, 1)``): the unconditional prompt is the pad token at
  every position whose token is neither BOS nor the begin-of-image token (kept *by value*, wherever
  they occur). The prompt embeddings are ``language_model.embed_tokens`` of the ids.
- Positions ``0 .. P-1`` for the prompt, then ``P + t - 1`` for image token ``t - 1`` fed at step
  ``t`` (the static cache's running length); rotary embedding from ``language_model.rotary_emb``.
- Each decoder layer: ``input_layernorm``, ``q/k/v_proj``, rotary, attention (here: the engine's
  ``attend(layer, q, k, v, scale)`` with ``scale = self_attn.scaling``), ``o_proj``, residual,
  ``post_attention_layernorm``, MLP, residual; then ``language_model.norm``.
- Logits: ``model.model.generation_head`` of the normed hidden states (not the text ``lm_head``),
  in float32; guidance ``uncond + s * (cond - uncond)`` (``ClassifierFreeGuidanceLogitsProcessor``)
  when ``s > 1``; at ``s <= 1`` only the conditional rows run (transformers refuses ``s <= 1``).
- The next input: ``prepare_embeddings_for_image_generation`` (``generation_embeddings`` then
  ``generation_aligner``) of the sampled token, the same token in both rows.
- ``num_image_tokens`` is ``vision_config.num_image_tokens`` (what ``generate`` loops over); it
  must equal the VQ grid ``quantize.quant_state_dims`` (``image_size // patch_size`` a side: 24 x 24
  at 384px); decoding is ``model.model.vqmodel.decode`` clamped to ``[-1, 1]``.

Conventions and limits:

- The adapter is built for ONE fixed prompt (``prompt_ids: LongTensor[P]`` ending in the
  begin-of-image token, see :func:`encode_prompt`): the layout is a ``1 x P`` prefix then the image
  grid. ``start(labels, guided)`` uses ``labels`` only for the batch size (every row runs the prompt;
  ``num_classes`` is 1, so labels are all 0).
- Grouped-query attention (``num_key_value_heads < num_attention_heads``) is supported by repeating
  the key/value heads before ``attend``: caches store ``num_attention_heads`` heads (Janus-Pro 1B and
  7B use plain multi-head attention, so this costs nothing there).
- dtype: the weights' dtype (``load_janus(dtype=...)``) runs every module; logits and guidance are
  float32. Only the default/linear rotary types that the language model's ``rotary_emb`` computes
  from position ids are supported (Janus-Pro uses the default one).
- transformers is an optional dependency (``pip install 'mvar-engine[hf]'``), imported inside the
  functions that need it; this module imports without it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..core.adapter import AttendFn, AttendFor, GenerationState, ModelAdapter
from ..core.errors import UsageError
from ..core.layout import SequenceLayout, Spans, spans_to_positions
from ..core.sampling import guided_logits_raster, raster_guided
from ..core.trajectory import Step
from .checkpoint import check_finite, weights_fingerprint
from .raster_adapter import RasterGenerationOutput

TRANSFORMERS_MISSING = "transformers is not installed: pip install 'mvar-engine[hf]'"

BOI_TOKEN = "<begin_of_image>"
"""The begin-of-image token of Janus' tokenizer (``tokenizer.boi_token`` in transformers)."""

USER_TAG, ASSISTANT_TAG = "<|User|>", "<|Assistant|>"


class MissingDependencyError(UsageError, ImportError):
    """An optional dependency is missing (one line naming the extra to install)."""


def import_transformers():
    """The ``transformers`` module, or :class:`MissingDependencyError` with the install line."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise MissingDependencyError(TRANSFORMERS_MISSING) from None


# ---------------------------------------------------------------------------------------- loading


def _check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise UsageError(f"Janus model directory {path}: not a directory (give a local Hugging Face directory with "
                         f"config.json, *.safetensors and the tokenizer files)")
    if not (path / "config.json").is_file():
        raise UsageError(f"Janus model directory {path}: no config.json (give a local Hugging Face directory)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{path}/config.json: not readable JSON ({' '.join(str(error).split())}); download the "
                         f"directory again") from None
    code = sorted(p.name for p in path.iterdir() if p.suffix == ".py")
    if not isinstance(config, dict) or "auto_map" in config or code:
        what = code[0] if code else "auto_map in config.json" if isinstance(config, dict) else "config.json"
        raise UsageError(f"Janus model directory {path}: {what} asks to run the directory's own code, which the "
                         f"engine never does (use transformers' Janus format, e.g. deepseek-community/Janus-Pro-1B)")
    return path


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(path: Path) -> None:
    """The directory holds ``*.safetensors`` weights, each whole (its header covers the file); a
    directory of pickles only is refused: loading one could run code."""
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        reason = (f"holds only pickled weights ({pickles[0]}), which the engine never loads (they can run code; "
                  f"convert them to .safetensors)" if pickles else "has no *.safetensors weights")
        raise UsageError(f"Janus model directory {path}: {reason}")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as error:  # truncated or not safetensors
            raise UsageError(f"{file}: not a whole safetensors file ({' '.join(str(error).split())}); download it "
                             f"again") from None


def has_tokenizer_files(model_dir: str | Path) -> bool:
    path = Path(model_dir)
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def load_janus_config(model_dir: str | Path):
    """The directory's ``JanusConfig`` (no weights read, their files checked: :func:`check_weight_files`);
    a non-Janus config is a one-line error."""
    path = _check_model_dir(model_dir)
    transformers = import_transformers()
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if getattr(config, "model_type", None) != "janus":
        raise UsageError(f"{path}/config.json: model_type {getattr(config, 'model_type', None)!r}, not 'janus' "
                         f"(give a JanusForConditionalGeneration directory, e.g. deepseek-community/Janus-Pro-1B)")
    check_weight_files(path)
    return config


def load_tokenizer(model_dir: str | Path):
    """The directory's text tokenizer (``AutoTokenizer``, local files only), or None when it has none.
    Loaded once per directory and state of its files (a run inspects, then builds)."""
    path = _check_model_dir(model_dir)
    if not has_tokenizer_files(path):
        return None
    stamps = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir()
                          if p.is_file() and p.suffix != ".safetensors"))
    return _tokenizer_of(str(path.resolve()), stamps)


@functools.lru_cache(maxsize=4)
def _tokenizer_of(path: str, stamps: tuple) -> Any:
    """``AutoTokenizer`` of ``path``; ``stamps`` (its files but the weights: names, mtimes, sizes) key the cache."""
    return import_transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_janus(model_dir: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(JanusForConditionalGeneration in eval mode on device, tokenizer or None)`` from a local
    Hugging Face directory (config.json, safetensors, tokenizer files); never the network."""
    path = _check_model_dir(model_dir)
    load_janus_config(path)
    transformers = import_transformers()
    hf_logging = transformers.utils.logging
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the engine reports its own progress; a load is one line or none
    try:
        model = transformers.JanusForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                                           use_safetensors=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    check_finite(dict(model.named_parameters()), str(path))
    model = model.to(device).eval()
    return model, load_tokenizer(path)


def janus_weights_id(model_dir: str | Path) -> str | None:
    """A fingerprint of the directory's weights (every ``*.safetensors`` file, by
    :func:`~mvar_engine.models.checkpoint.weights_fingerprint`); None when it has none."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(weights_fingerprint(file).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- prompt


def image_prompt_text(text: str) -> str:
    """Janus' chat format for one user turn asking for an image, as transformers' Janus chat
    template (``add_generation_prompt=True``) writes it: ``"<|User|>: {text}\\n\\n<|Assistant|>:"``
    (DeepSeek's ``sft_format`` with an empty system prompt, as their ``generation_inference.py``)."""
    return f"{USER_TAG}: {text.strip()}\n\n{ASSISTANT_TAG}:"


def encode_prompt(tokenizer, text: str, *, chat_format: bool = True) -> torch.Tensor:
    """The prompt ids ``LongTensor[P]`` for generating an image from ``text``, as
    ``JanusProcessor(text=prompt, generation_mode="image")`` makes them: ``prompt`` is
    :func:`image_prompt_text` (``chat_format=True``) or ``text`` as given, then the processor
    appends the begin-of-image token (``tokenizer.boi_token``, default ``<begin_of_image>``) and the
    tokenizer encodes it with its special tokens (Janus' tokenizer prepends BOS; if a tokenizer does
    not, BOS is prepended here). The last id is the begin-of-image token (a one-line error if the
    tokenizer splits it)."""
    boi = getattr(tokenizer, "boi_token", None) or BOI_TOKEN
    prompt = (image_prompt_text(text) if chat_format else text) + boi
    ids = list(tokenizer(prompt)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    boi_id = tokenizer.convert_tokens_to_ids(boi)
    if not ids or boi_id is None or ids[-1] != boi_id or boi_id == getattr(tokenizer, "unk_token_id", None):
        raise UsageError(f"the tokenizer does not encode {boi!r} as one token: not a Janus tokenizer")
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------- adapter


class JanusState(GenerationState):
    """``prompt: LongTensor[rows, P]`` (unconditional rows padded); ``fed[t]: LongTensor[rows, 1]``."""

    def __init__(self, batch: int, prompt: torch.Tensor) -> None:
        super().__init__(batch, prompt.shape[0])
        self.prompt = prompt
        self.fed: list[torch.Tensor] = []


def _first_not_none(*values):
    return next((v for v in values if v is not None), None)


class JanusAdapter(ModelAdapter):
    """``model``: a ``JanusForConditionalGeneration``; ``prompt_ids: LongTensor[P]`` ending in the
    begin-of-image token. ``bos_token_id``, ``pad_token_id``, ``boi_token_id``: default to the
    model's generation config (``generation_kwargs["boi_token_id"]`` for the last; else the prompt's
    last id), then its text config. Attributes beside the contract's: ``grid`` (VQ token grid),
    ``prefix`` (P), ``num_tokens``, ``prompt_ids``, ``uncond_ids``."""

    name = "janus"
    family = "next-token"

    def __init__(self, model, prompt_ids: torch.Tensor | Sequence[int], *, bos_token_id: int | None = None,
                 pad_token_id: int | None = None, boi_token_id: int | None = None) -> None:
        self.hf = model
        inner = getattr(model, "model", None)
        self.lm = getattr(inner, "language_model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if self.lm is None or any(not hasattr(self.lm, n) for n in needed) or not hasattr(inner, "generation_head"):
            raise TypeError(f"{type(model).__name__} is not a JanusForConditionalGeneration with a LLaMA-style language "
                            f"model (model.model.language_model.{{embed_tokens, layers, norm, rotary_emb}})")
        for layer in self.lm.layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or any(not hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
                raise TypeError(f"language-model layer {type(layer).__name__} is not LLaMA-style "
                                f"(self_attn.q_proj/k_proj/v_proj/o_proj)")
        text = self.lm.config
        self.num_layers = len(self.lm.layers)
        self.num_heads = int(text.num_attention_heads)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // self.num_heads)
        self._rotate = _rotary_function(self.lm)

        vq = inner.vqmodel
        self.grid = tuple(int(x) for x in vq.quantize.quant_state_dims)
        self.num_tokens = self.grid[0] * self.grid[1]
        generated = int(model.config.vision_config.num_image_tokens)
        if generated != self.num_tokens:
            raise ValueError(f"vision_config.num_image_tokens = {generated} (what transformers generates) is not the VQ "
                             f"grid {self.grid[0]} x {self.grid[1]} = {self.num_tokens}")
        self.vocab_size = int(inner.vqmodel.config.num_embeddings)
        self.num_classes = 1

        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().cpu()
        if prompt.numel() == 0:
            raise ValueError("the prompt is empty: give its token ids (encode_prompt)")
        gen = getattr(model, "generation_config", None)
        gen_kwargs = (getattr(gen, "generation_kwargs", None) or {}) if gen is not None else {}
        self.bos_token_id = _first_not_none(bos_token_id, getattr(gen, "bos_token_id", None),
                                            getattr(text, "bos_token_id", None))
        self.pad_token_id = _first_not_none(pad_token_id, getattr(gen, "pad_token_id", None),
                                            getattr(text, "pad_token_id", None))
        self.boi_token_id = _first_not_none(boi_token_id, gen_kwargs.get("boi_token_id"), int(prompt[-1]))
        if int(prompt[-1]) != self.boi_token_id:
            raise ValueError(f"the prompt must end with the begin-of-image token {self.boi_token_id} (got "
                             f"{int(prompt[-1])}): encode it with encode_prompt")
        self.prompt_ids = prompt
        self.prefix = prompt.numel()
        self.layout = SequenceLayout(((1, self.prefix), self.grid))
        self.uncond_ids = None
        if self.pad_token_id is not None:
            keep = prompt == self.boi_token_id
            if self.bos_token_id is not None:
                keep |= prompt == self.bos_token_id
            self.uncond_ids = torch.where(keep, prompt, torch.full_like(prompt, int(self.pad_token_id)))

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.embed_tokens.weight.dtype

    # -- rows -----------------------------------------------------------------------------------
    def guided(self, cfg: float) -> bool:
        """As LlamaGen and transformers (:func:`raster_guided`): guidance only when ``cfg > 1``."""
        return raster_guided(cfg)

    def start(self, labels: torch.Tensor, guided: bool) -> JanusState:
        """``labels: LongTensor[B]`` gives only the batch size: every row runs the adapter's prompt."""
        batch, device = labels.shape[0], labels.device
        rows = [self.prompt_ids[None].expand(batch, -1)]
        if guided:
            if self.uncond_ids is None:
                raise ValueError("guidance needs the pad token id (unconditional prompt): the model's generation config "
                                 "has none; pass pad_token_id")
            rows.append(self.uncond_ids[None].expand(batch, -1))
        return JanusState(batch, torch.cat(rows).to(device))

    # -- backbone -------------------------------------------------------------------------------
    def embed(self, state: JanusState, steps: Sequence[Step]) -> torch.Tensor:
        """Input embeddings ``[rows, n, C]``: the prompt's (with step 0), then the image tokens fed."""
        first, last = steps[0].index, steps[-1].index
        parts = []
        if first == 0:
            parts.append(self.lm.embed_tokens(state.prompt))
        tokens = state.fed[max(first - 1, 0):last]
        if tokens:
            fed = tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)
            parts.append(self.hf.prepare_embeddings_for_image_generation(fed))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def backbone(self, x: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        """Every decoder layer on ``x: [rows, n, C]`` at sequence ``positions: LongTensor[n]``, attention
        through ``attend(layer, q, k, v, scale)`` (q and k rotated; k/v heads repeated to
        ``num_heads`` under grouped-query attention); returns the final-normed hidden states."""
        rows, n, _ = x.shape
        cos, sin = self.lm.rotary_emb(x, positions[None].to(x.device))
        groups = self.num_heads // self.num_kv_heads
        for index, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, n, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, n, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, n, -1, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, k, cos, sin)
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            o = attend(index, q, k, v, float(attn.scaling))
            x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm.norm(x)

    def run(self, state: JanusState, steps: Sequence[Step], spans: Spans, attend: AttendFn) -> torch.Tensor:
        x = self.embed(state, steps)
        positions = spans_to_positions(spans, x.device)
        if positions.numel() != x.shape[1]:
            raise RuntimeError(f"{x.shape[1]} inputs for {positions.numel()} positions")
        return self.backbone(x, positions, attend)

    def logits(self, state: JanusState | None, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits ``[r, l, V]`` of the generation head (the VQ codes) on normed hidden states."""
        return self.hf.model.generation_head(hidden).float()

    def guide(self, logits: torch.Tensor, batch: int, cfg: float, step: Step) -> torch.Tensor:
        return guided_logits_raster(logits.float(), batch, cfg)

    def advance(self, state: JanusState, step: Step, tokens: torch.Tensor) -> None:
        state.fed.append(tokens.repeat(state.rows // state.batch, 1))

    def forced(self, forced_tokens: torch.Tensor, step: Step) -> torch.Tensor:
        """``forced_tokens: LongTensor[B, h * w]``."""
        if forced_tokens.dim() != 2 or forced_tokens.shape[1] <= step.index:
            raise ValueError(f"forced_tokens must be [B, {self.num_tokens}] (a token per step), got "
                             f"{tuple(forced_tokens.shape)}")
        return forced_tokens[:, step.index:step.index + 1]

    # -- output ---------------------------------------------------------------------------------
    def finish(self, state, tokens, logits, cache_peak_bytes) -> RasterGenerationOutput:
        return RasterGenerationOutput(tokens=torch.cat(tokens, dim=1),
                                      logits=torch.cat(logits, dim=1) if logits else None,
                                      cache_peak_bytes=cache_peak_bytes, grid=self.grid)

    def token_maps(self, output: RasterGenerationOutput) -> list[torch.Tensor]:
        return [output.tokens]

    def decode_maps(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`decode` of the one map (``tokens: LongTensor[B, h * w]``)."""
        (tokens,) = maps
        return self.decode(tokens)

    @torch.no_grad()
    def decode(self, output: RasterGenerationOutput | torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` (float32): the generation VQ's ``decode`` of the
        tokens ``[B, h * w]`` (an output's, or given), clamped."""
        tokens = output.tokens if isinstance(output, RasterGenerationOutput) else output
        vq = self.hf.model.vqmodel
        return vq.decode(tokens.to(vq.quantize.embedding.weight.device)).float().clamp(-1, 1)

    def teacher_forced_logits(self, labels: torch.Tensor, tokens: torch.Tensor, attend_for: AttendFor) -> torch.Tensor:
        """Logits ``[B, n, V]`` predicting ``tokens: LongTensor[B, n]`` (``n <= h * w``, row-major from
        the first token) after the prompt, conditional rows only, in one causal pass (``labels``:
        the batch size). Differentiable; training Janus end to end is not provided by this package."""
        n = tokens.shape[1]
        if not 1 <= n <= self.num_tokens:
            raise ValueError(f"need 1 .. {self.num_tokens} tokens, got {n}")
        prompt = self.prompt_ids.to(tokens.device)[None].expand(tokens.shape[0], -1)
        parts = [self.lm.embed_tokens(prompt)]
        if n > 1:
            parts.append(self.hf.prepare_embeddings_for_image_generation(tokens[:, :-1]))
        x = torch.cat(parts, dim=1)
        length = x.shape[1]
        hidden = self.backbone(x, torch.arange(length, device=x.device), attend_for(((0, length),)))
        return self.logits(None, hidden[:, self.prefix - 1:])


def _rotary_function(lm):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` of the language model's own modeling module."""
    attn_type = type(lm.layers[0].self_attn) if len(lm.layers) else None
    module = sys.modules.get(attn_type.__module__) if attn_type is not None else None
    rotate = getattr(module, "apply_rotary_pos_emb", None)
    if rotate is None:
        rotate = import_transformers().models.llama.modeling_llama.apply_rotary_pos_emb
    return rotate


JANUS_PRO_1B_TEXT = dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384,
                         rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, pad_token_id=100002)
"""The language model of Janus-Pro-1B (``deepseek-community/Janus-Pro-1B``'s config.json)."""

JANUS_PRO_BOI = 100016
"""Janus-Pro's begin-of-image token id."""


def language_model_minimum_elements(text_config: dict[str, Any]) -> int:
    """A lower bound on the parameter elements of a Janus model whose language model has
    ``text_config`` (the keys of :data:`JANUS_PRO_1B_TEXT`): the decoder layers' projections
    (q and o ``C x C``, k and v ``C x kv_heads * head_dim``, the MLP's three ``C x F``) and the token
    embedding, counted without building anything; the vision towers, the VQ and the heads only add."""
    width, layers = text_config["hidden_size"], text_config["num_hidden_layers"]
    heads = text_config["num_attention_heads"]
    kv_width = text_config.get("num_key_value_heads", heads) * (width // heads)
    per_layer = 2 * width * width + 2 * width * kv_width + 3 * width * text_config["intermediate_size"]
    return layers * per_layer + text_config["vocab_size"] * width


def janus_pro_1b(*, understanding_layers: int | None = None, seed: int = 0):
    """A ``JanusForConditionalGeneration`` of Janus-Pro-1B's architecture with random weights (timing
    and memory: the 24-layer LLaMA of width 2048 and 16 heads, the generation head, embedding and
    aligner, and the 384px VQ of 16384 codes on a 24 x 24 grid). ``understanding_layers`` shrinks the
    SigLIP understanding tower, which image generation never runs (its weights are memory only)."""
    transformers = import_transformers()
    vision = transformers.JanusVisionConfig() if understanding_layers is None else \
        transformers.JanusVisionConfig(num_hidden_layers=understanding_layers)
    config = transformers.JanusConfig(text_config=transformers.LlamaConfig(**JANUS_PRO_1B_TEXT), vision_config=vision)
    torch.manual_seed(seed)
    model = transformers.JanusForConditionalGeneration(config).eval()
    model.generation_config.generation_kwargs = {"boi_token_id": JANUS_PRO_BOI}
    return model


def janus_tiny(*, seed: int = 0):
    """A tiny random ``JanusForConditionalGeneration`` (2 layers of width 64, 4 heads, a 4 x 4 VQ grid of
    32 codes; BOS 1, pad 0, begin-of-image 5): the benchmark's and the tests' plumbing model."""
    transformers = import_transformers()
    text = transformers.LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                    bos_token_id=1, pad_token_id=0, eos_token_id=2)
    vision = transformers.JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                            patch_size=8, projection_dim=64, num_image_tokens=16, depth=2)
    vq = transformers.JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,
                                       channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=64,
                                       image_token_embed_dim=64, num_hidden_layers=2)
    torch.manual_seed(seed)
    model = transformers.JanusForConditionalGeneration(
        transformers.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=3)).eval()
    model.generation_config.generation_kwargs = {"boi_token_id": 5}
    return model


class JanusPromptedModel(nn.Module):
    """A Janus model with the prompt it generates for, as one module (what the ``janus`` model family
    builds: ``.to(device)`` moves both). ``hf``: the ``JanusForConditionalGeneration``;
    ``prompt_ids``: ``LongTensor[P]``; ``layout``: the generated sequence's layout."""

    def __init__(self, hf_model, prompt_ids: torch.Tensor, **special_ids) -> None:
        super().__init__()
        self.hf = hf_model
        self.register_buffer("prompt_ids", torch.as_tensor(prompt_ids, dtype=torch.long).flatten(), persistent=False)
        self.special_ids = special_ids
        self.layout = self.adapter().layout  # checks the prompt and grid now

    def adapter(self) -> JanusAdapter:
        return JanusAdapter(self.hf, self.prompt_ids, **self.special_ids)


__all__ = ["BOI_TOKEN", "JANUS_PRO_1B_TEXT", "JANUS_PRO_BOI", "JanusAdapter", "JanusPromptedModel", "JanusState", "MissingDependencyError",
           "TRANSFORMERS_MISSING", "encode_prompt", "image_prompt_text", "import_transformers", "janus_weights_id",
           "janus_pro_1b", "janus_tiny", "load_janus", "load_janus_config", "load_tokenizer"]
