"""Models by Hugging Face Hub id for ``Pipeline.from_pretrained``: the released files of each family,
downloaded with ``huggingface_hub`` (the ``hub`` extra) into the user's cache (``HF_HOME``,
``HF_HUB_CACHE``), ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` honoured.

Known ids and variants (:data:`HUB_MODELS`):

- ``FoundationVision/var``: ``d16`` (default), ``d20``, ``d24``, ``d30``, ``d36`` (512 px): ``var_<v>.pth``
  with ``vae_ch160v4096z32.pth``, on ``full``;
- ``CVLUESTC/MVAR``: ``finetune-d16`` (default), ``finetune-d20``, ``finetune-d24``, ``d16`` (from scratch),
  with VAR's VQVAE from ``FoundationVision/var``, on ``markov``;
- ``FoundationVision/LlamaGen``: ``B-256`` (default), ``B-384``, ``L-256``, ``L-384``, ``XL-384``, ``XXL-384``,
  ``3B-384``: ``c2i_<size>_<res>.pt`` with ``vq_ds16_c2i.pt``, on ``raster`` (16x16 or 24x24 tokens);
- ``deepseek-community/Janus-Pro-1B`` and ``-7B``: the whole folder in transformers' layout, on ``raster``
  (``deepseek-ai/Janus-Pro-*`` is DeepSeek's own format, refused with that hint).

Every downloaded file whose Hub entry is a large (LFS) file is checked against the SHA-256 the Hub
states for it (its cache blob's name); a mismatch deletes the file and is an error. Failures are
one-line :class:`~mvar_engine.core.errors.UsageError` s (an unknown id or variant with the known
ones, offline and not cached, a missing ``huggingface_hub``) and leave no partial file in the cache.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageError, setting

VAR_REPO, VQVAE = "FoundationVision/var", "vae_ch160v4096z32.pth"
LLAMAGEN_REPO, VQ16 = "FoundationVision/LlamaGen", "vq_ds16_c2i.pt"


@dataclass(frozen=True)
class HubModel:
    """A known repository: the model family that runs it, the trajectory it runs on, per variant the
    weights file, the tokenizer ``(repo, file)`` and the model options; ``folder``: the whole
    repository is the model (transformers)."""

    family: str
    trajectory: str
    default: str
    variants: dict[str, tuple[str, tuple[str, str] | None, dict[str, Any]]] = field(default_factory=dict)
    folder: bool = False


def _llamagen(size: str, resolution: int) -> tuple[str, tuple[str, str], dict[str, Any]]:
    return f"c2i_{size}_{resolution}.pt", (LLAMAGEN_REPO, VQ16), {"patch_nums": (resolution // 16,)}


HUB_MODELS: dict[str, HubModel] = {
    VAR_REPO: HubModel("var", "full", "d16", {f"d{d}": (f"var_d{d}.pth", (VAR_REPO, VQVAE), {}) for d in (16, 20, 24, 30, 36)}),
    "CVLUESTC/MVAR": HubModel("var", "markov", "finetune-d16", {
        "d16": ("mvar-d16.pth", (VAR_REPO, VQVAE), {}),
        **{f"finetune-d{d}": (f"mvar-finetune-d{d}.pth", (VAR_REPO, VQVAE), {}) for d in (16, 20, 24)}}),
    LLAMAGEN_REPO: HubModel("raster-gpt", "raster", "B-256", {
        f"{size}-{res}": _llamagen(size, res)
        for size, res in (("B", 256), ("B", 384), ("L", 256), ("L", 384), ("XL", 384), ("XXL", 384), ("3B", 384))}),
    "deepseek-community/Janus-Pro-1B": HubModel("janus", "raster", "", folder=True),
    "deepseek-community/Janus-Pro-7B": HubModel("janus", "raster", "", folder=True),
}

FOLDER_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")
"""What a transformers model folder needs (config, weights, tokenizer), without other formats."""

HEX64 = re.compile(r"[0-9a-f]{64}")


def looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not Path(text).exists()


def known_ids() -> str:
    return ", ".join(sorted(HUB_MODELS))


def hub_model(repo_id: str, variant: str | None) -> tuple[HubModel, str]:
    """The known repository and variant (one-line errors listing the known ones)."""
    if repo_id.startswith("deepseek-ai/Janus"):
        raise UsageError(f"{repo_id} is DeepSeek's own format, which transformers' Janus classes do not read; use "
                         f"{repo_id.replace('deepseek-ai', 'deepseek-community')} (transformers' layout)")
    model = HUB_MODELS.get(repo_id)
    if model is None:
        raise UsageError(f"{repo_id}: not a Hub id this engine knows (known: {known_ids()}); download the files and "
                         f"give their local paths")
    chosen = variant if variant is not None else model.default
    if model.folder:
        if variant is not None:
            raise UsageError(f"{repo_id} has no variants (drop {setting('variant')})")
        return model, ""
    if chosen not in model.variants:
        raise UsageError(f"{repo_id} has no variant {chosen!r} (known: {', '.join(model.variants)})")
    return model, chosen


def pretrained_from_hub(repo_id: str, variant: str | None) -> tuple[HubModel, dict[str, Any]]:
    """Download what ``repo_id`` / ``variant`` needs; returns (the known repository: its family and
    trajectory, its model options with the local paths)."""
    model, chosen = hub_model(repo_id, variant)
    if model.folder:
        return model, {"model_dir": str(download_folder(repo_id))}
    weights, tokenizer, options = model.variants[chosen]
    paths = {"checkpoint": str(download_file(repo_id, weights))}
    if tokenizer is not None:
        paths["tokenizer"] = str(download_file(*tokenizer))
    return model, {**options, **paths}


def hub_client():
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError("loading by Hub id needs huggingface_hub: pip install 'mvar-engine[hub]' (or give local "
                         "paths)") from None
    return huggingface_hub


def _explain(repo_id: str, what: str, error: Exception) -> UsageError:
    hub = hub_client()
    errors = hub.errors
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or offline:
        return UsageError(f"{repo_id}/{what} is not in the Hugging Face cache and the Hub cannot be reached"
                          f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: run once online, or give a local path")
    if isinstance(error, (errors.RepositoryNotFoundError, errors.EntryNotFoundError, errors.RevisionNotFoundError)):
        return UsageError(f"{repo_id}/{what}: not found on the Hub ({type(error).__name__})")
    return UsageError(f"{repo_id}/{what}: download failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})")


def download_file(repo_id: str, filename: str) -> Path:
    """``repo_id/filename`` in the cache (downloaded if needed), its SHA-256 checked (module docstring)."""
    hub = hub_client()
    try:
        path = Path(hub.hf_hub_download(repo_id, filename))
    except Exception as error:  # noqa: BLE001 - every failure becomes one line
        remove_partial_downloads(repo_id)
        raise _explain(repo_id, filename, error) from None
    verify_blob(path, f"{repo_id}/{filename}")
    return path


def download_folder(repo_id: str) -> Path:
    """The whole model folder of ``repo_id`` (config, safetensors, tokenizer files), each file checked."""
    hub = hub_client()
    try:
        folder = Path(hub.snapshot_download(repo_id, allow_patterns=list(FOLDER_FILES)))
    except Exception as error:  # noqa: BLE001
        remove_partial_downloads(repo_id)
        raise _explain(repo_id, "*", error) from None
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            verify_blob(path, f"{repo_id}/{path.relative_to(folder)}")
    return folder


def verify_blob(path: Path, what: str) -> None:
    """A cache file whose blob is named by a SHA-256 (the Hub's LFS hash) must have that hash; on a
    mismatch the blob and its link are deleted."""
    blob = path.resolve()
    if not HEX64.fullmatch(blob.name):
        return  # a small (git) file: its blob is named by its git hash, not a SHA-256
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != blob.name:
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise UsageError(f"{what}: the downloaded file's SHA-256 {h.hexdigest()[:12]}... differs from the Hub's "
                         f"{blob.name[:12]}...; it was deleted (try again)")


def remove_partial_downloads(repo_id: str) -> None:
    """Delete ``*.incomplete`` blobs an interrupted or failed download left for ``repo_id``."""
    hub = hub_client()
    folder = Path(hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    if folder.is_dir():
        for partial in folder.glob("*.incomplete"):
            partial.unlink(missing_ok=True)
