"""Confirmation: every latency a front shows is measured twice, in independent sessions.

A trial's first latency comes from one paired session (candidate and base timed interleaved). On a
shared machine one session can be lucky, and a front built from single sessions collects the
lucky ones. So before a trial is shown on a front, each target measures it again in a fresh
paired session (new inference sessions for both models, at the end of the search: time apart from
the first). When the two sessions' intervals do not overlap, a third session decides.

The stored figure is the conservative one: the slower of the two sessions, or with three the
slower of the second and third (the first session is the one that put the trial on the front, so
it is the one a lucky draw biases).
The reported interval spans every session's interval, widened by the spread between sessions (at
least ``MIN_SESSION_SPREAD`` of the ratio): one session's interval describes that session only,
while a re-measurement tomorrow also sees the drift between sessions.

Confirmations are stored with the Optuna study (finished trials cannot be changed), keyed by
target and architecture signature, so a trial that reused a cached architecture shares its
confirmation (``search.storage.record``).
"""

from __future__ import annotations

from collections.abc import Sequence

from search.storage.record import Confirmation, Session

__all__ = ["Confirmation", "Session", "conclude", "needs_another", "overlap"]

# Paired ratios of one model moved by 0.4-1.5% (CV) between sessions on this kind of machine
# (docs/benchmarks.md); two sessions can agree by chance more closely than that.
MIN_SESSION_SPREAD = 0.02


def overlap(a: Session, b: Session) -> bool:
    """The two sessions' intervals share a point."""
    return a.ratio_ci[0] <= b.ratio_ci[1] and b.ratio_ci[0] <= a.ratio_ci[1]


def needs_another(sessions: Sequence[Session]) -> bool:
    """A second session always; a third when the first two disagree beyond their intervals."""
    if len(sessions) < 2:
        return True
    return len(sessions) == 2 and not overlap(sessions[0], sessions[1])


def conclude(sessions: Sequence[Session], *, elapsed_s: float = 0.0) -> Confirmation:
    """The conservative figure and an interval meant to cover a re-measurement, over two or three
    sessions."""
    if len(sessions) < 2:
        raise ValueError("a confirmation needs at least two sessions")
    # With three sessions the first is left out of the figure: it is the session that made the
    # trial a front candidate, biased towards luck; its interval still widens the range.
    ratio = max(s.ratio for s in (sessions if len(sessions) == 2 else sessions[1:]))
    ratios = [s.ratio for s in sessions]
    spread = max(max(ratios) - min(ratios), MIN_SESSION_SPREAD * ratio)
    low = max(0.0, min(s.ratio_ci[0] for s in sessions) - spread)
    high = max(s.ratio_ci[1] for s in sessions) + spread
    return Confirmation(tuple(sessions), ratio, (low, high), elapsed_s)
