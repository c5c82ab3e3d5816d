"""Data parallelism on the host: one scheduler per data shard, each request placed on one shard.

With a mesh of `data` > 1 the slots and the KV pages are split evenly between the
data shards; a shard's slots only ever use its own pages (ids local to the shard,
each shard with its own null page 0). `DataParallelScheduler` keeps one `Scheduler`
per shard behind the same interface the engine uses, and plans a step as a list of
per-shard plans (None for an idle shard); the runner stacks them on the `data` axis.

Placement: a request goes to the shard with the least work once it is queued there: the
shard's outstanding tokens (uncomputed prompt plus tokens still to sample) plus the
request's prompt tokens that shard's prefix cache would not serve. A cached prefix thus
draws its requests until its shard is busier than another by more than the prefix saves;
then it spills over (and is cached there too), so a prefix every request shares (a system
prompt) cannot pin all traffic to one shard. `n > 1` siblings share a shard (and so the
prompt's pages).

Host code only; no JAX.
"""

from __future__ import annotations

from jaxinfer.config import EngineConfig
from jaxinfer.engine.request import Sequence
from jaxinfer.engine.scheduler import Counters, Scheduler, StepPlan, StepResult


class DataParallelScheduler:
    def __init__(self, engine: EngineConfig):
        self.cfg = engine
        self.counters = Counters()
        self.shards = [Scheduler(engine.shard(), self.counters) for _ in range(engine.mesh_shape[0])]
        self._last_placed: tuple[str, int] | None = None  # (request id, shard) of the last sequence 0 placed
        self._loads: list[int] | None = None  # each shard's outstanding tokens, kept from one step to the next

    def shard_of(self, seq: Sequence) -> Scheduler:
        return self.shards[seq.shard]

    def place(self, seq: Sequence) -> int:
        """The shard for a new request: the least outstanding work plus uncached prompt, then the longest hit."""
        if seq.index > 0 and self._last_placed is not None and self._last_placed[0] == seq.request_id:
            return self._last_placed[1]  # the engine adds a request's sequences one after the other
        names, costs = self.shards[0].cache_names(seq), []  # every shard names pages alike
        for d, shard in enumerate(self.shards):
            hit = shard.cache_hit(names) * self.cfg.page_size
            costs.append((self._outstanding()[d] + len(seq.prompt_ids) - hit, -hit, d))
        best = min(costs)[2]
        self._last_placed = (seq.request_id, best)
        return best

    def _outstanding(self) -> list[int]:
        """Each shard's outstanding tokens: summed over its sequences once after a step, then kept up to date
        by `add`, so that placing a burst of requests takes time linear in its size, not quadratic."""
        if self._loads is None:
            self._loads = [shard.outstanding_tokens() for shard in self.shards]
        return self._loads

    # --- the Scheduler interface the engine uses -----------------------------------------

    def check_fits(self, prompt_len: int, max_new: int) -> None:
        try:
            self.shards[0].check_fits(prompt_len, max_new)  # every shard has the same pool size
        except MemoryError as error:  # its numbers are one shard's, not the configured num_pages
            raise MemoryError(f"{error} per data shard ({len(self.shards)} shards, and a request's pages all "
                              "come from one)") from None

    def add(self, seq: Sequence) -> None:
        loads = self._outstanding()  # before the sequence joins its shard
        seq.shard = self.place(seq)
        self.shard_of(seq).add(seq)
        loads[seq.shard] += seq.num_known - seq.num_computed + seq.remaining

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        self._loads = None
        self.shard_of(seq).finish(seq, reason, stop_reason)

    def schedule(self) -> list[StepPlan | None] | None:
        self._loads = None  # admission, preemption and computed tokens change them
        plans = [shard.schedule() for shard in self.shards]
        return plans if any(plan is not None for plan in plans) else None

    def update(self, plans: list[StepPlan | None], results: list[StepResult | None]) -> list[Sequence]:
        self._loads = None
        return [seq for shard, plan, result in zip(self.shards, plans, results) if plan is not None
                for seq in shard.update(plan, result)]

    def has_work(self) -> bool:
        return any(shard.has_work() for shard in self.shards)

    def awaits_tokens(self) -> bool:
        return any(shard.awaits_tokens() for shard in self.shards)

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
