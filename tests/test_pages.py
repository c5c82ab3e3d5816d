"""The KV page allocator on its own: reference counts, prefix-cache hits, LRU eviction, invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.engine.pages import NULL_PAGE, PageAllocator, chain_hashes, pages_for


def _cached_pages(allocator, num_pages, tokens, page_size=2):
    """Allocate pages for `tokens`, name each full page, and return (pages, hashes)."""
    hashes = chain_hashes(tokens, page_size)
    pages = allocator.allocate(num_pages)
    for page, page_hash in zip(pages, hashes):
        allocator.register(page, page_hash)
    return pages, hashes


def test_chain_hashes_name_prefixes():
    """A page's hash depends on every token before it: equal prefixes share hashes, a change later does not
    disturb earlier pages, and a partial last page has no hash."""
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = chain_hashes([1, 2, 3, 9, 5, 6], 2)
    assert len(a) == 3 and len(b) == 3
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
    assert chain_hashes([5, 6], 2) != [a[2]]  # the same tokens after another prefix name another page
    assert pages_for(0, 4) == 0 and pages_for(4, 4) == 1 and pages_for(5, 4) == 2


def test_null_page_is_never_handed_out():
    """Page 0 is reserved: a pool of N pages hands out exactly pages 1..N-1, then refuses with MemoryError."""
    allocator = PageAllocator(5)
    pages = allocator.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE not in pages
    with pytest.raises(MemoryError, match="asked for 1 KV pages, 0 free"):
        allocator.allocate(1)
    with pytest.raises(ValueError, match="num_pages must be at least 2"):
        PageAllocator(1)


def test_shared_page_reference_counts():
    """A prefix hit takes one more reference; the page becomes idle-cached only when the last holder frees it,
    and freeing more often than taking is an error."""
    allocator = PageAllocator(6)
    pages, hashes = _cached_pages(allocator, 2, [1, 2, 3, 4])
    assert allocator.match(hashes) == pages  # a second holder
    allocator.free(pages)
    assert allocator.num_cached_idle == 0 and allocator.num_used == 2
    allocator.free(pages)
    assert allocator.num_cached_idle == 2 and allocator.num_used == 0 and allocator.num_free == 5
    allocator.check()
    with pytest.raises(AssertionError, match="freed more often"):
        allocator.free(pages[:1])


def test_match_stops_at_first_miss_and_respects_caching_flag():
    """Only the longest cached prefix matches; with caching off a named page is shared only while someone
    holds it, and forgets its name when freed."""
    allocator = PageAllocator(8)
    pages, hashes = _cached_pages(allocator, 3, [1, 2, 3, 4, 5, 6])
    other = chain_hashes([1, 2, 9, 9, 5, 6], 2)
    assert allocator.match(other) == pages[:1]
    allocator.check()

    off = PageAllocator(8, enable_prefix_caching=False)
    pages, hashes = _cached_pages(off, 2, [1, 2, 3, 4])
    assert off.match(hashes) == pages  # held: shared (n > 1 siblings)
    off.free(pages)
    assert off.match(hashes) == pages  # still held once
    off.free(pages)
    off.free(pages)
    assert off.num_cached_idle == 0 and off.num_free == 7 and off.match(hashes) == []
    off.check()


def test_every_copy_of_a_page_serves_hits():
    """Two requests that decode the same tokens compute the same full page twice. Both copies keep its name
    (as in vLLM's block pool): a hit takes a copy someone holds before an idle one, and when the first copy
    is evicted the second, still held, keeps serving hits; the name goes with the last copy."""
    allocator = PageAllocator(5)  # 4 usable pages
    (first,), (h,) = _cached_pages(allocator, 1, [1, 2])
    second = allocator.allocate(1)[0]
    allocator.register(second, h)
    allocator.free([first])  # idle in the LRU; the second copy is still held
    assert allocator.cached_prefix([h]) == 1 and allocator.num_idle([h]) == 0
    assert allocator.match([h]) == [second]  # the held copy: taking it leaves the idle one free
    allocator.free([second])
    assert allocator.allocate(3)[-1] == first  # the free pages, then the idle first copy is evicted
    assert allocator.match([h]) == [second]  # still found
    allocator.check()
    allocator.free([second, second])
    assert allocator.num_idle([h]) == 1 and allocator.allocate(1) == [second]  # evicted: the name is gone
    assert allocator.cached_prefix([h]) == 0
    allocator.check()


def test_lru_evicts_oldest_idle_pages_only_when_free_pages_run_out():
    """Idle cached pages survive while plain free pages remain; then the least recently used goes first
    (a sequence's tail before its head), and a prefix hit makes a page recent again."""
    allocator = PageAllocator(7)  # 6 usable pages
    x, hx = _cached_pages(allocator, 2, [1, 2, 3, 4])
    y, hy = _cached_pages(allocator, 2, [5, 6, 7, 8])
    allocator.free(x)
    allocator.free(y)  # idle, oldest first: x[1], x[0], y[1], y[0]
    fresh = allocator.allocate(2)
    assert set(fresh) == {5, 6} and allocator.num_cached_idle == 4  # no eviction while free pages remain

    assert allocator.allocate(1) == [x[1]]  # the oldest idle page: the tail of the first sequence freed
    assert allocator.match(hx) == [x[0]]  # its head is still cached; the hit makes it the most recent
    allocator.free([x[0]])
    assert allocator.allocate(1) == [y[1]]
    assert allocator.allocate(1) == [y[0]]
    assert allocator.allocate(1) == [x[0]]
    assert allocator.match(hx) == [] and allocator.match(hy) == []
    assert allocator.num_free == 0
    allocator.check()


def test_reset_cache_frees_idle_pages_and_forgets_every_prefix():
    allocator = PageAllocator(7)
    x, hx = _cached_pages(allocator, 2, [1, 2, 3, 4])
    allocator.free(x)
    assert allocator.num_cached_idle == 2 and allocator.cached_prefix(hx) == 2
    allocator.reset_cache()
    assert allocator.num_cached_idle == 0 and allocator.num_free == 6
    assert allocator.cached_prefix(hx) == 0 and allocator.match(hx) == []
    allocator.check()


@settings(max_examples=150, deadline=None, database=None)
@given(st.integers(2, 10), st.lists(st.tuples(st.sampled_from("amf"), st.integers(0, 40)), max_size=60))
def test_random_operations_keep_invariants(num_pages, ops):
    """Random allocate / match / free sequences against a model of who holds which page: `check()` holds
    after every operation, reference counts equal holders, and the pool never loses or invents a page."""
    allocator = PageAllocator(num_pages)
    holders = []  # (pages, hashes) of each live "sequence"
    for kind, arg in ops:
        if kind == "a":  # a sequence of 1..3 full pages; prompts drawn from a few shared prefixes
            tokens = [arg % 3, arg % 2] + [arg % 5, 1] * (arg % 3)
            hashes = chain_hashes(tokens, 2)
            hit = allocator.match(hashes)
            need = len(hashes) - len(hit)
            if not allocator.can_allocate(need):
                allocator.free(hit)
                continue
            pages = hit + allocator.allocate(need)
            for page, page_hash in zip(pages, hashes):
                allocator.register(page, page_hash)
            holders.append(pages)
        elif kind == "f" and holders:
            allocator.free(holders.pop(arg % len(holders)))
        elif kind == "m":
            hashes = chain_hashes([arg % 3, arg % 2, arg % 5, 1], 2)
            allocator.free(allocator.match(hashes))
        allocator.check()
        counts = {}
        for pages in holders:
            for page in pages:
                counts[page] = counts.get(page, 0) + 1
        assert all(allocator._refs[page] == counts.get(page, 0) for page in range(1, num_pages))
        assert allocator.num_used == len(counts)
    for pages in holders:
        allocator.free(pages)
    assert allocator.num_free == num_pages - 1
    allocator.check()
