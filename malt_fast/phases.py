"""Named phases of a run, marked where they happen.

    with phase("decode", model) as p:
        ...
        p.count(tokens, "forward")

opens a `malt/decode` range for torch.profiler (it shows in Perfetto or chrome://tracing under
any profiler, ours or the user's). While `malt-fast profile` collects (`collecting(profiler)`,
malt_fast/profile.py), the same call also times the phase and adds its tokens and model FLOPs
(`kind`: prefill, forward, train, train_full) to the phase's row. Outside a profile it costs
one record_function per call.

The phases: load, prefill, decode, credit, sft, dpo, reference, evaluate (profile.PHASES);
`span(name)` is a trace range that is not a phase (a stage containing phases).
"""

from __future__ import annotations

import contextlib

from torch.profiler import record_function

_collector = None  # the active profile.Profiler, or None


class _Uncounted:
    @staticmethod
    def count(tokens: int = 0, kind: str | None = None, calls: int = 1) -> None:
        pass


@contextlib.contextmanager
def phase(name: str, model=None, absorb: bool = False):
    """A `malt/<name>` range around the block; under a profile, a timed phase (exclusive of
    nested phases; absorb=True keeps nested phases' time and tokens in this one). Yields an
    object whose count(tokens, kind, calls) adds the block's work to the phase."""
    collector = _collector
    if collector is None:
        with record_function(f"malt/{name}"):
            yield _Uncounted
        return
    with collector.phase(name, model=model, absorb=absorb) as counter:
        yield counter


@contextlib.contextmanager
def span(name: str):
    """A `malt/<name>` range that holds phases but is not one (a pipeline stage)."""
    collector = _collector
    if collector is None:
        with record_function(f"malt/{name}"):
            yield
        return
    with collector.range(name, limited=False):
        yield


@contextlib.contextmanager
def collecting(collector):
    """Send every phase opened inside the block to `collector` (a profile.Profiler)."""
    global _collector
    before, _collector = _collector, collector
    try:
        yield collector
    finally:
        _collector = before
