"""Host-side KV page bookkeeping: reference counts, the prefix cache and its LRU.

Page 0 is the null page: empty slots and padding tokens write there, and no
sequence ever owns it. A page is in exactly one of three states:
- free: on the free list, no content worth keeping;
- in use: reference count > 0 (owned by one sequence, or shared through the prefix cache);
- cached: reference count 0 but holding a full page of a known prefix, kept in
  least-recently-used order and evicted only when a fresh page is needed.
A full page is named by a chained hash of every token up to its end, so two
sequences with the same first N pages of tokens share those N pages. Pages that
were computed twice (two requests decoding the same tokens) both keep the name,
as vLLM's block pool keeps them: a hit takes a held copy first, and the name
lasts while any copy is cached. With the
prefix cache off, names still let sequences share pages while some sequence holds
them (the n > 1 siblings of one request, whose names the scheduler salts with the
request), but an unreferenced page forgets its name and is free.
Host code only; no JAX.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np

NULL_PAGE = 0


def pages_for(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


def chain_hashes(tokens, page_size: int, parent: bytes = b"") -> list[bytes]:
    """Hash of each full page of `tokens`, each one chained to the pages before it."""
    hashes = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        block = np.asarray(tokens[start:start + page_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PageAllocator:
    """Reference-counted pages, shared by name; `enable_prefix_caching` keeps named pages nobody holds."""

    def __init__(self, num_pages: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.caching = enable_prefix_caching
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._hash_of: dict[int, bytes] = {}  # page -> hash, for pages holding a registered full page
        self._pages_of: dict[bytes, dict[int, None]] = {}  # hash -> the pages holding it, first registered first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages with no owner, oldest first

    @property
    def num_free(self) -> int:
        """Pages a caller could get now: free ones plus cached ones that may be evicted."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached_idle(self) -> int:
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - self.num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n fresh pages (reference count 1), evicting least recently used cached pages if needed."""
        if not self.can_allocate(n):
            raise MemoryError(f"asked for {n} KV pages, {self.num_free} free")
        pages = []
        for _ in range(n):
            page = self._free.pop() if self._free else self._evict()
            self._refs[page] = 1
            pages.append(page)
        return pages

    def _evict(self) -> int:
        page, _ = self._lru.popitem(last=False)
        self._forget(page)
        return page

    def _forget(self, page: int) -> None:
        page_hash = self._hash_of.pop(page)
        copies = self._pages_of[page_hash]
        del copies[page]
        if not copies:
            del self._pages_of[page_hash]

    def _copy(self, page_hash: bytes) -> int:
        """The page a hit on `page_hash` takes: a copy someone holds (taking it frees nothing), else the first."""
        copies = self._pages_of[page_hash]
        return next((page for page in copies if self._refs[page]), next(iter(copies)))

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; unreferenced pages become cached (if hashed) or free."""
        for page in reversed(pages):  # the tail of a sequence is evicted before its head
            self._refs[page] -= 1
            if self._refs[page] < 0:
                raise AssertionError(f"page {page} freed more often than it was taken")
            if self._refs[page] == 0:
                if page in self._hash_of and not self.caching:
                    self._forget(page)
                if page in self._hash_of:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The named pages of the longest prefix of `hashes`, each now referenced once more."""
        pages = [self._copy(h) for h in hashes[:self.cached_prefix(hashes)]]
        for page in pages:
            if self._refs[page] == 0:
                del self._lru[page]
            self._refs[page] += 1
        return pages

    def cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading pages of `hashes` are cached, without taking them (placement decisions)."""
        count = 0
        while count < len(hashes) and hashes[count] in self._pages_of:
            count += 1
        return count

    def is_cached(self, page_hash: bytes) -> bool:
        """Whether some page holds the full page named `page_hash` (held or idle)."""
        return page_hash in self._pages_of

    def num_idle(self, hashes: list[bytes]) -> int:
        """How many of the cached pages named by `hashes` nobody holds: taking them shrinks `num_free`."""
        return sum(self._refs[self._copy(h)] == 0 for h in hashes)

    def register(self, page: int, page_hash: bytes) -> None:
        """Record that `page` (in use) holds the full page named `page_hash`, beside any other copy."""
        if page in self._hash_of:
            return
        self._hash_of[page] = page_hash
        self._pages_of.setdefault(page_hash, {})[page] = None

    def reset_cache(self) -> None:
        """Forget every cached prefix; pages nobody holds become free. For when the pool's contents changed
        behind the allocator's back (hand-built steps that wrote KV into arbitrary pages)."""
        self._free.extend(self._lru)
        self._lru.clear()
        self._hash_of.clear()
        self._pages_of.clear()

    def check(self) -> None:
        """Invariants (tests): every page is exactly one of null, free, cached-idle or in use."""
        free, idle = set(self._free), set(self._lru)
        assert len(free) == len(self._free) and not free & idle and NULL_PAGE not in free | idle
        for page in range(1, self.num_pages):
            in_use = self._refs[page] > 0
            assert in_use + (page in free) + (page in idle) == 1, f"page {page} is in two states or none"
            assert (page in idle) <= (page in self._hash_of)
        assert all(p in self._pages_of[h] for p, h in self._hash_of.items())
        assert sum(map(len, self._pages_of.values())) == len(self._hash_of)
