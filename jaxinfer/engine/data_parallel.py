"""Data parallelism on the host: one scheduler per data shard, each request placed on one shard.

With a mesh of `data` > 1 the slots and the KV pages are split evenly between the
data shards; a shard's slots only ever use its own pages (ids local to the shard,
each shard with its own null page 0). `DataParallelScheduler` keeps one `Scheduler`
per shard behind the same interface the engine uses, and plans a step as a list of
per-shard plans (None for an idle shard); the runner stacks them on the `data` axis.

Placement: a request goes to the shard that already caches the longest prefix of its
prompt; otherwise to the one with the fewest outstanding tokens (uncomputed prompt
plus tokens still to sample). `n > 1` siblings share a shard (and so the prompt's pages).

Host code only; no JAX.
"""

from __future__ import annotations

from jaxinfer.config import EngineConfig
from jaxinfer.engine.pages import chain_hashes
from jaxinfer.engine.request import Sequence
from jaxinfer.engine.scheduler import Counters, Scheduler, StepPlan, StepResult


class DataParallelScheduler:
    def __init__(self, engine: EngineConfig):
        self.cfg = engine
        self.counters = Counters()
        self.shards = [Scheduler(engine.shard(), self.counters) for _ in range(engine.mesh_shape[0])]
        self._last_placed: tuple[str, int] | None = None  # (request id, shard): its n > 1 siblings follow it

    def shard_of(self, seq: Sequence) -> Scheduler:
        return self.shards[seq.shard]

    def place(self, seq: Sequence) -> int:
        """The shard for a new request: longest cached prefix first, then fewest outstanding tokens."""
        if self._last_placed is not None and self._last_placed[0] == seq.request_id:
            return self._last_placed[1]
        hashes = chain_hashes(seq.prompt_ids[:-1], self.cfg.page_size)
        hits = [shard.pages.cached_prefix(hashes) for shard in self.shards]
        loads = [shard.outstanding_tokens() for shard in self.shards]
        best = min(range(len(self.shards)), key=lambda d: (-hits[d], loads[d], d))
        self._last_placed = (seq.request_id, best)
        return best

    # --- the Scheduler interface the engine uses -----------------------------------------

    def check_fits(self, prompt_len: int, max_new: int) -> None:
        self.shards[0].check_fits(prompt_len, max_new)  # every shard has the same pool size

    def add(self, seq: Sequence) -> None:
        seq.shard = self.place(seq)
        self.shard_of(seq).add(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        self.shard_of(seq).finish(seq, reason, stop_reason)

    def schedule(self) -> list[StepPlan | None] | None:
        plans = [shard.schedule() for shard in self.shards]
        return plans if any(plan is not None for plan in plans) else None

    def update(self, plans: list[StepPlan | None], results: list[StepResult | None]) -> list[Sequence]:
        return [seq for shard, plan, result in zip(self.shards, plans, results) if plan is not None
                for seq in shard.update(plan, result)]

    def has_work(self) -> bool:
        return any(shard.has_work() for shard in self.shards)

    @property
    def running(self) -> list[Sequence]:
        return [seq for shard in self.shards for seq in shard.running]

    @property
    def waiting(self) -> list[Sequence]:
        return [seq for shard in self.shards for seq in shard.waiting]

    def kv_pages(self) -> tuple[int, int]:
        used, usable = zip(*(shard.kv_pages() for shard in self.shards))
        return sum(used), sum(usable)

    def reset_prefix_cache(self) -> None:
        for shard in self.shards:
            shard.reset_prefix_cache()

    def check_idle(self) -> None:
        for shard in self.shards:
            shard.check_idle()
