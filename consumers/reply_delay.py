"""How long a reply takes to land: the query service's admission check against a deadline.

A request checked against its deadline only when it is taken up is answered just before it
expires whenever the service is behind (FIFO under overload), and its reply then queues behind
every other reply on the way to the broker: measured at twice the capacity on the embedded
broker, replies landed 0.3-1.2 s (up to 2.3 s with a second job on the cores) after deadlines
the service had met. A reply that lands after its deadline is work thrown away twice (the
client has given up, and it delayed the replies behind it). So the service drops a request
whose deadline falls before `now + delay`, where `delay` is what replies took to be
acknowledged lately.

The estimate is the larger of two: the `quantile` of the acknowledgements of the last
`window_s` seconds, and the time the replies still waiting in the producer take to drain at
the rate acknowledgements came in that window (the first lags a queue that is growing: alone,
it left replies landing up to 0.5 s late). The second counts only once replies have been
waiting at every estimate for a whole window: only then were the acknowledgements paced by
the broker, not by how many replies there were to acknowledge. A burst after a quiet spell
(one acknowledgement in the window, then 200 replies queued at once) otherwise read as a
200 s drain and dropped every request behind it, whatever its deadline (seen under CI load).
It forgets: with no acknowledgement in the window it is 0, so shedding that empties the reply
queue cannot keep the service shedding.
"""

from __future__ import annotations

import collections
import time

import numpy as np


class ReplyDelay:
    """Recent produce-to-acknowledgement times of replies; one thread notes and estimates
    (the producer's delivery callbacks run inside `poll`, on the service's loop)."""

    def __init__(self, window_s: float = 1.0, quantile: float = 0.9, keep: int = 4096) -> None:
        self.window_s = window_s
        self.quantile = quantile
        self._done: collections.deque[tuple[float, float]] = collections.deque(maxlen=keep)
        self.current = 0.0
        self._busy_since: float | None = None  # replies were waiting at every update since

    def note(self, produced_at: float, now: float | None = None) -> None:
        """A reply produced at `produced_at` (time.monotonic) was acknowledged `now`."""
        now = time.monotonic() if now is None else now
        self._done.append((now, now - produced_at))

    def update(self, waiting: int = 0, now: float | None = None) -> float:
        """Re-estimate (once per fetched batch, not per request) and return the delay;
        `waiting`: replies produced and not yet acknowledged (`len(producer)`)."""
        now = time.monotonic() if now is None else now
        if waiting <= 0:
            self._busy_since = None
        elif self._busy_since is None:
            self._busy_since = now
        done = self._done
        while done and done[0][0] < now - self.window_s:
            done.popleft()
        if not done:
            self.current = 0.0
        else:
            took = np.fromiter((d for _, d in done), np.float64, len(done))
            saturated = self._busy_since is not None and now - self._busy_since >= self.window_s
            drain_s = waiting * self.window_s / len(done) if saturated else 0.0
            self.current = max(float(np.quantile(took, self.quantile)), drain_s)
        return self.current
