"""Choosing the backend that computes a spec: ``auto`` or a forced one.

``auto`` ranks every available backend by ``backend.preference(spec, device)`` (falling back to its
record's ``priority``) and takes the first whose ``supports`` says yes; a forced backend either
supports the spec or fails with its reason. The built-in order (documented in the README and
informed by ``mvar-engine bench attention``) lives in each backend's ``preference``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .attention import AttentionBackend, AttentionSpec, check_inputs
from .errors import BackendUnsupportedError, UsageError, setting
from .registry import get_registry


@dataclass(frozen=True)
class Candidate:
    """A backend instance with its registered name and record priority."""

    name: str
    backend: AttentionBackend
    priority: int = 0

    def rank(self, spec: AttentionSpec, device: torch.device) -> int:
        preferred = self.backend.preference(spec, device)
        return self.priority if preferred is None else preferred


def _spec_key(spec: AttentionSpec):
    try:
        hash(spec)
        return spec
    except TypeError:
        return id(spec)


class BackendSelector:
    """Picks the backend for each spec: the forced one (or an error with its reason), or under
    ``auto`` the best-ranked available backend that supports the spec here. Choices are memoised
    per (spec, device, dtype, head_dim, needs_grad); ``used`` maps spec kinds to backend names."""

    def __init__(self, candidates: Sequence[Candidate | tuple[str, AttentionBackend]], forced: bool,
                 *, keep_order: bool = False) -> None:
        self.candidates = [c if isinstance(c, Candidate) else Candidate(c[0], c[1]) for c in candidates]
        self.forced = forced
        self.keep_order = keep_order  # try candidates as given instead of by rank
        self.used: dict[str, str] = {}
        self._memo: dict[tuple, Candidate] = {}

    @property
    def choice(self) -> str:
        """What the run chose: ``"auto"``, or the name of the forced backend."""
        return self.candidates[0].name if self.forced and self.candidates else "auto"

    def ranked(self, spec: AttentionSpec, device: torch.device) -> list[Candidate]:
        """Candidates in the order ``auto`` tries them for ``spec`` on ``device`` (stable on ties)."""
        if self.keep_order:
            return list(self.candidates)
        return sorted(self.candidates, key=lambda c: -c.rank(spec, device))

    def pick(self, spec: AttentionSpec, q: torch.Tensor, *, needs_grad: bool | None = None) -> AttentionBackend:
        """The backend for ``spec`` with queries like ``q`` (``needs_grad`` defaults to whether autograd
        will need gradients through this call)."""
        if needs_grad is None:
            needs_grad = torch.is_grad_enabled() and q.requires_grad
        key = (_spec_key(spec), q.device, q.dtype, q.shape[-1], needs_grad)
        chosen = self._memo.get(key)
        if chosen is None:
            chosen = self._choose(spec, q.device, q.dtype, q.shape[-1], needs_grad)
            self._memo[key] = chosen
        self.used[spec.kind] = chosen.name
        return chosen.backend

    def _choose(self, spec, device, dtype, head_dim, needs_grad) -> Candidate:
        reasons = []
        for candidate in self.ranked(spec, device):
            reason = candidate.backend.supports(spec, device=device, dtype=dtype, head_dim=head_dim, needs_grad=needs_grad)
            if reason is None:
                return candidate
            reasons.append(f"{candidate.name}: {reason}")
        if self.forced:
            raise BackendUnsupportedError(f"backend '{self.candidates[0].name}' cannot compute {spec.describe()} "
                                          f"attention here: {reasons[0].split(': ', 1)[1]}")
        raise BackendUnsupportedError(f"no available backend computes {spec.describe()} attention here "
                                      f"({'; '.join(reasons)})")

    def checked_pick(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> AttentionBackend:
        """Validate the inputs (a one-line :class:`UsageError`) and pick the backend for this call."""
        problem = check_inputs(q, k, v, spec)
        if problem is not None:
            raise UsageError(problem)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return self.pick(spec, q, needs_grad=needs_grad)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, scale: float) -> torch.Tensor:
        """Validate the inputs, pick a backend and run it."""
        return self.checked_pick(q, k, v, spec).attend(q, k, v, spec, scale=scale)

    def attend_and_score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`attend`, with the attention each key receives (``float32 [B, H, Lk]``, summed
        over the queries) where the picked backend materialises it for this call, else None
        (:meth:`AttentionBackend.attend_and_score`)."""
        backend = self.checked_pick(q, k, v, spec)
        scored = backend.attend_and_score(q, k, v, spec, scale=scale)
        return scored if scored is not None else (backend.attend(q, k, v, spec, scale=scale), None)


def selector_for(name: str = "auto", options=None, registry=None) -> BackendSelector:
    """A selector over the registry's available backends (``auto``) or one forced backend by name;
    unavailable or unknown names are a one-line :class:`UsageError`."""

    registry = registry or get_registry()
    if name == "auto":
        if options:
            raise UsageError(f"backend 'auto' takes no options (force a backend with {setting('backend', 'NAME')} to set "
                             f"its options)")
        entries = [e for e in registry.components("backend") if e.availability.ok]
        return BackendSelector([Candidate(e.name, registry.create("backend", e.name), getattr(e.record, "priority", 0))
                                for e in entries], forced=False)
    entry = registry.get("backend", name)
    if not entry.availability.ok:
        raise UsageError(f"backend '{entry.name}' is unavailable: {entry.availability.reason} "
                         f"(use {setting('backend', 'auto')})")
    return BackendSelector([Candidate(entry.name, registry.create("backend", name, options),
                                      getattr(entry.record, "priority", 0))], forced=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, backend: str = "auto",
              scale: float | None = None) -> torch.Tensor:
    """Functional entry point: ``softmax(scale * q k^T | spec) v`` with ``q [B, H, Lq, D]``,
    ``k [B, H, Lk, D]``, ``v [B, H, Lk, Dv]`` -> ``[B, H, Lq, Dv]``; ``scale`` defaults to D^-0.5.
    ``backend``: ``auto`` or a registered name (selectors are cached per name)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _cached_selector(backend, get_registry()).attend(q, k, v, spec, scale=scale)


_SELECTORS: "weakref.WeakKeyDictionary[Any, dict[str, BackendSelector]]" = weakref.WeakKeyDictionary()
"""Selectors of :func:`attention` per registry, by backend name: a new registry gets new ones."""


def _cached_selector(name: str, registry) -> BackendSelector:
    table = _SELECTORS.setdefault(registry, {})
    if name not in table:
        table[name] = selector_for(name, registry=registry)
    return table[name]
