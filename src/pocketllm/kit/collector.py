"""Garbage collector settings for server processes.

CPython starts a young-generation collection after every 700 net allocations of container objects, and
a collection of an older generation after ten of the one below (the oldest also waits until enough new
long-lived objects have piled up). A process with 1,000 open reply streams keeps
hundreds of thousands of objects alive, and every collection of an older generation walks all of them.
Collecting the young generation less often, and freezing what start-up created, so that no collection
walks it again, took the time to first token at 1,000 open streams from about 630 to 375 ms at p99
(docs/benchmarks.md, "Sixth round").
"""

from __future__ import annotations

import gc

# Net container allocations between young-generation collections; CPython's default is 700. Garbage in
# reference cycles lives until the next collection, which this bounds to about this many objects.
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Freeze the objects created so far and collect the young generation less often.

    Call it once per server process, after the app is built and before it serves requests. Frozen objects
    are never collected, so call it where start-up leaves little garbage, not in long-lived test processes.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)
