"""When a rebuild is due, and when the models it replaced may be dropped (pure: no store, no
Kafka, no clock of its own; the updater passes `now`, a monotonic time in seconds)."""

from __future__ import annotations

from dataclasses import dataclass, field

# a swapped-out model's rows stay this long after a rebuild (another rebuild may start
# meanwhile): query processes answer requests from the view they hold (users pinned to its
# generation) until their next refresh, which can take seconds on a large catalogue
# (bench/bench_follower.py); a restart of the updater drops them at once
OLD_GENERATION_GRACE_S = 60.0


@dataclass
class RebuildScheduler:
    """Rebuild every `every_events` events or `every_seconds` seconds since the last one ended,
    or at once when requested (a control message, or a store marked unfinished); keep each
    replaced generation `grace_s` seconds before it may be dropped."""

    every_events: int | None
    every_seconds: float | None
    events_at_last: int
    time_at_last: float
    grace_s: float = OLD_GENERATION_GRACE_S
    requested: bool = False
    running: bool = False
    # (when, generation): drop the models under that generation from then on
    drops: list[tuple[float, int]] = field(default_factory=list)

    def request(self) -> None:
        """Rebuild at the next chance (`stream-mf rebuild`, or a rebuild left unfinished)."""
        self.requested = True

    def due(self, events_applied: int, n_users: int, n_items: int, now: float) -> bool:
        """Whether to start a rebuild now (never while one runs, nor on an empty model)."""
        if self.running or n_users == 0 or n_items == 0:
            return False
        if self.requested:
            return True
        if self.every_events and events_applied - self.events_at_last >= self.every_events:
            return True
        return bool(self.every_seconds and now - self.time_at_last >= self.every_seconds)

    def events_until_due(self, events_applied: int) -> int | None:
        """Events left before a rebuild is due by count (None: none is), for a driver that cuts
        its batches there (the deterministic mode: the rebuild then starts at exactly that
        count, however the stream arrives)."""
        if not self.every_events or self.running:
            return None
        return max(0, self.events_at_last + self.every_events - events_applied)

    def started(self) -> None:
        self.running = True
        self.requested = False

    def ended(
        self, events_applied: int, now: float, replaced_below: int | None, unfinished: bool
    ) -> None:
        """A rebuild is over. `replaced_below`: the generation it swapped in, whose older
        models readers may still use for `grace_s`; `unfinished`: the store still holds the
        mark of a swap whose after-swap rows were not all applied (start again at once)."""
        self.running = False
        self.events_at_last = events_applied
        self.time_at_last = now
        if replaced_below is not None:
            self.drops.append((now + self.grace_s, replaced_below))
        if unfinished:
            self.request()

    def drops_due(self, now: float) -> list[int]:
        """Generations under which every model may now be dropped, in order (each one only
        under the one that replaced them: never the current, nor one a rebuild is staging)."""
        out: list[int] = []
        while self.drops and self.drops[0][0] <= now:
            out.append(self.drops.pop(0)[1])
        return out
