"""Conversation KV caches kept between chat turns, so a follow-up prefills only its new tokens.

Each entry is the language model's cache for one conversation about one image (and its references)
together with the token ids it covers. A follow-up whose prompt starts with those ids — the same image,
the earlier turns, the earlier answers — reuses the cache up to the longest common prefix; everything
after it (the new question) is prefilled. Entries are taken out while a turn generates, so two requests
never share one cache; the store is bounded in bytes and entries, least recently used first out, and an
evicted conversation is simply prefilled again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


def cache_nbytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D id tensors."""
    n = min(a.shape[-1], b.shape[-1])
    if n == 0:
        return 0
    diff = (a[..., :n] != b[..., :n]).flatten().nonzero()
    return int(diff[0]) if diff.numel() else n


@dataclass
class CachedConversation:
    ids: torch.Tensor  # [L] token ids whose keys/values the cache holds
    cache: object  # a transformers Cache
    nbytes: int


class KVCacheStore:
    def __init__(self, max_bytes: int = 1 << 30, max_entries: int = 64):
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("cache limits must be ≥ 0")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedConversation] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def take(self, key: str, ids: torch.Tensor, min_prefix: int):
        """Remove and return (cache, reused length) for a prompt `ids` [L], or (None, 0).

        The cache is reused only when it covers at least `min_prefix` tokens of the prompt (e.g. through
        the last image placeholder) and leaves at least one token to prefill; it is cropped to the
        common prefix.
        """
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            self.misses += 1
            return None, 0
        keep = min(common_prefix_length(entry.ids, ids), ids.shape[-1] - 1)
        if keep < min_prefix:
            self.misses += 1
            return None, 0
        surplus = entry.cache.get_seq_length() - keep
        if surplus > 0:
            entry.cache.crop(-surplus)  # transformers 5 crops by a negative count
        self.hits += 1
        return entry.cache, keep

    def put(self, key: str, ids: torch.Tensor, cache) -> None:
        length = cache.get_seq_length()
        entry = CachedConversation(ids=ids[:length].detach().cpu(), cache=cache, nbytes=cache_nbytes(cache))
        if entry.nbytes > self.max_bytes or self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while (
                len(self._entries) > self.max_entries or sum(e.nbytes for e in self._entries.values()) > self.max_bytes
            ):
                self._entries.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
