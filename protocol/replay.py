"""Replay guard: a timestamp window plus a bounded cache of the nonces seen in it.

An envelope is fresh when its timestamp lies within ``window_ms`` of the
receiver's clock and its (sender, nonce) pair has not been seen. Memory is
bounded by ``max_entries``: when full, the oldest entry is forgotten and its
timestamp becomes a floor below which everything is refused, so forgetting
never opens a door to a replay.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

from protocol.errors import ClockSkewError, ReplayError


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ReplayGuard:
    def __init__(
        self,
        *,
        window_ms: int = 120_000,
        max_entries: int = 1_000_000,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if window_ms <= 0 or max_entries <= 0:
            raise ValueError("window_ms and max_entries must be positive")
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._clock = clock
        self._seen: dict[bytes, int] = {}
        self._by_time: list[tuple[int, bytes]] = []  # min-heap of (timestamp, key)
        self._floor = -1  # everything at or below this timestamp is refused
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_time(self, timestamp_ms: int) -> None:
        """Raise ClockSkewError if ``timestamp_ms`` is outside the window around now."""
        now = self._clock()
        skew = timestamp_ms - now
        if abs(skew) > self.window_ms:
            side = "ahead of" if skew > 0 else "behind"
            raise ClockSkewError(
                f"envelope timestamp is {abs(skew) / 1000:.1f} s {side} the receiver's clock, "
                f"outside the {self.window_ms / 1000:.0f} s window; check the sender's clock (NTP)"
            )

    def check_and_record(self, sender: bytes, nonce: bytes, timestamp_ms: int) -> None:
        """Check the window and that (sender, nonce) is new, then remember it."""
        self.check_time(timestamp_ms)
        key = sender + nonce
        with self._lock:
            self._expire(self._clock() - self.window_ms)
            if timestamp_ms <= self._floor:
                raise ReplayError(
                    "envelope is older than the oldest one the replay cache still remembers; "
                    "resend it with a fresh timestamp and nonce"
                )
            if key in self._seen:
                raise ReplayError("envelope was already received (same sender and nonce)")
            self._seen[key] = timestamp_ms
            heapq.heappush(self._by_time, (timestamp_ms, key))
            while len(self._seen) > self.max_entries:
                ts, old = heapq.heappop(self._by_time)
                del self._seen[old]
                self._floor = max(self._floor, ts)

    def _expire(self, cutoff_ms: int) -> None:
        # Entries older than the window are refused by check_time anyway.
        while self._by_time and self._by_time[0][0] < cutoff_ms:
            _, old = heapq.heappop(self._by_time)
            del self._seen[old]
