"""Which requests start when, and what becomes of their cache sequences; no model here.

Work arrives as `Request`s: a context (token ids), n branches to sample after it, a budget, stop
strings, and optionally a sequence already in the cache that holds a prefix of the context. The
scheduler admits waiting requests while decode slots and cache blocks allow, in one prefill call
as long as its token budget allows; it picks the rows that call computes (once per request,
from the longest prefix already cached, or per branch without prefix reuse), forks the n
branches after it, and retires branches that ended: their sequences are released, or cut to
their valid tokens and kept for the request's children.

Blocks are counted for the worst case: a request is admitted only if the available blocks cover
every running branch's remaining budget plus its own, so a decode step never finds the cache full.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from malt_fast.errors import MaltError
from malt_fast.rollout.paged_cache import CacheFull, PagedKVCache
from malt_fast.rollout.sampling import BranchRandom, SamplingParams, branch_generator


@dataclass
class Request:
    context: list[int]
    n: int
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    seed: int = 0
    path: tuple[int, ...] = ()  # branch j draws from branch_generator(seed, *path, j)
    parent: int | None = None  # cache sequence holding a prefix of `context`; the request owns it
    keep: bool = False  # leave each finished branch's sequence in the cache (for children)
    on_done: Callable[["Request", list["Completion"]], None] | None = None
    tag: Any = None  # the caller's data, handed back untouched through on_done
    stop_line: tuple[str, ...] = ()  # the reply ends with the first line holding one of these
    adapter: str | None = None  # the weights: an adapter of the engine's MultiAdapterView
    probe: tuple[int, ...] = ()  # token ids whose temperature-1 probabilities each token records
    # the first token is drawn among these ids only (the model's distribution renormalized over
    # them, e.g. a verdict word after "Verdict:"); probes still see the whole distribution
    first_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    tokens: list[int]
    finish: str  # "eos" | "stop" | "length"
    text: str | None = None  # exact text (cut at the stop string) when a tokenizer is present
    seq: int | None = None  # cache sequence (context + tokens, or a prefix of it) when kept
    # with a probe: per token, the probe ids' probabilities where it was sampled (a tuple), or
    # None for a token that was not sampled (re-encoded by a stop cut); None without a probe
    probes: list | None = None


@dataclass
class Branch:
    request: Request
    index: int
    seq: int
    random: BranchRandom
    tokens: list[int] = field(default_factory=list)
    probes: list[tuple[float, ...]] = field(default_factory=list)  # per token, with a probe
    result: Completion | None = None
    unchanged: int | None = None  # leading sampled tokens a stop-string cut left as they were
    row: int | None = None  # its row in the last launched decode step (None: not in one yet)


@dataclass
class PrefillRow:
    """One row of a prefill forward: `tokens` extend cache sequence `seq`, and the logits at
    its last token start `branches` (indices) of `request`."""
    request: Request
    seq: int
    tokens: list[int]
    branches: list[int]


class Scheduler:
    """One run's requests: `waiting` ones, `running` branches, and requests part done."""

    def __init__(self, cache: PagedKVCache, requests: list[Request], *, max_batch: int,
                 max_prefill_tokens: int, prefix_reuse: bool):
        self.cache = cache
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.prefix_reuse = prefix_reuse
        self.waiting = deque(requests)
        self.running: list[Branch] = []
        self._groups: dict[int, list[Branch | None]] = {}  # id(request) -> its branches

    def submit(self, request: Request) -> None:
        """Queue a request ahead of those not yet started: finishing started work first bounds
        the blocks held by kept sequences waiting for their children."""
        self.waiting.appendleft(request)

    # ------------------------------------------------------------ admission

    def admit(self) -> list[Request]:
        """Take the waiting requests that fit now: in the free decode slots, in the blocks left
        after every running branch's worst case, and in one prefill call's token budget."""
        c = self.cache
        budget = c.available() - sum(self._blocks_left(b) for b in self.running)
        slots = self.max_batch - len(self.running)
        chosen, tokens, deferred, prefixes = [], 0, [], set()
        while self.waiting:
            req = self.waiting[0]
            if self._defer(req, prefixes):
                deferred.append(self.waiting.popleft())
                continue
            need = self.worst_blocks(req)
            if need > c.num_blocks:
                raise CacheFull(f"KV cache too small: one request of {len(req.context)} context "
                                f"tokens, n={req.n}, {req.max_new_tokens} new tokens needs up to "
                                f"{need} blocks of {c.block_size}, the cache has {c.num_blocks}")
            if req.n > self.max_batch:
                raise MaltError(f"a request has n={req.n} branches, more than the engine's "
                                f"max_batch={self.max_batch}")
            new_tokens = self._prefill_len(req) * (1 if self.prefix_reuse else req.n)
            fits = (req.n <= slots and need <= budget
                    and (not chosen or tokens + new_tokens <= self.max_prefill_tokens))
            if not fits:
                break
            self.waiting.popleft()
            chosen.append(req)
            slots -= req.n
            budget -= need
            tokens += new_tokens
            if self.prefix_reuse and req.parent is None:
                bs = c.block_size
                prefixes.update((req.adapter, tuple(req.context[:k]))
                                for k in range(bs, len(req.context), bs))
        self.waiting.extendleft(reversed(deferred))
        if not chosen and not self.running and self.waiting:
            raise CacheFull(f"KV cache full: {c.held_blocks} of {c.num_blocks} blocks are held "
                            f"by kept sequences, the next request needs up to "
                            f"{self.worst_blocks(self.waiting[0])}")
        return chosen

    def worst_blocks(self, req: Request) -> int:
        """Blocks a request may still take: its prefill, then every branch's full budget
        (+1 each for a copied shared tail block)."""
        c = self.cache
        prefill_rows = 1 if self.prefix_reuse else req.n
        prefill = prefill_rows * (c.blocks_for(len(req.context)) + 1)
        return prefill + req.n * (c.blocks_for(req.max_new_tokens) + 1)

    def _blocks_left(self, b: Branch) -> int:
        return self.cache.blocks_for(b.request.max_new_tokens - len(b.tokens)) + 1

    def _defer(self, req: Request, prefixes: set) -> bool:
        """Whether `req` shares at least one more block with a request prefilled in this call
        than the index holds: it waits a step and then finds that prefix cached."""
        if not prefixes or req.parent is not None:
            return False
        c = self.cache
        cached = c.index.match(req.context, req.adapter)[1]
        k = (cached // c.block_size + 1) * c.block_size
        return k < len(req.context) and (req.adapter, tuple(req.context[:k])) in prefixes

    def _prefill_len(self, req: Request) -> int:
        if not self.prefix_reuse:
            return len(req.context)
        if req.parent is not None:
            return len(req.context) - self.cache.length(req.parent)
        return len(req.context) - self.cache.index.match(req.context, req.adapter,
                                                         len(req.context) - 1)[1]

    # ------------------------------------------------------------ prefill and branches

    def prefill_rows(self, reqs: list[Request]) -> list[PrefillRow]:
        """The rows a prefill of `reqs` computes. With prefix reuse one per request, extending
        its parent or the longest cached prefix of its context (at least the last token is
        computed: its logits start the reply); without, one per branch, from scratch."""
        c = self.cache
        rows = []
        for req in reqs:
            if not self.prefix_reuse:
                if req.parent is not None:
                    c.release(req.parent)
                    req.parent = None
                rows += [PrefillRow(req, c.new_sequence(), req.context, [j])
                         for j in range(req.n)]
                continue
            if req.parent is not None:
                seq, start = req.parent, c.length(req.parent)
                if start >= len(req.context):
                    raise ValueError("a request's context must extend its parent's cache")
            else:
                seq, start = c.adopt(req.context, req.adapter, len(req.context) - 1)
            rows.append(PrefillRow(req, seq, req.context[start:], list(range(req.n))))
        return rows

    def start(self, rows: list[PrefillRow]) -> list[Branch]:
        """After the prefill forward: index the rows' contexts and fork each row's branches;
        they run from now on. Returns them in row order."""
        c = self.cache
        if self.prefix_reuse:
            for row in rows:
                c.remember(row.seq, row.request.context, row.request.adapter)
        branches = []
        for row in rows:
            req = row.request
            group = self._groups.setdefault(id(req), [None] * req.n)
            for j, seq in zip(row.branches, [row.seq] + c.fork(row.seq, len(row.branches) - 1)):
                group[j] = Branch(req, j, seq, branch_generator(req.seed, *req.path, j))
                branches.append(group[j])
        self.running += branches
        return branches

    # ------------------------------------------------------------ retirement

    def retire(self) -> list[Branch]:
        """Take the branches that ended out of the running ones, settle their cache sequences,
        and report each request whose branches have all ended; returns those branches."""
        done = [b for b in self.running if b.result is not None]
        if not done:
            return done
        self.running = [b for b in self.running if b.result is None]
        for b in done:
            self._settle(b)
        for b in done:
            group = self._groups.get(id(b.request))
            if group is None or any(x is None or x.result is None for x in group):
                continue
            del self._groups[id(b.request)]
            if b.request.on_done is not None:
                b.request.on_done(b.request, [x.result for x in group])
        return done

    def _settle(self, b: Branch) -> None:
        res, req, c = b.result, b.request, self.cache
        if not req.keep and not self.prefix_reuse:
            c.release(b.seq)
            return
        # the cache holds the context and every sampled token but the last (fed next step);
        # keep only what is still valid for the returned tokens
        kept = len(res.tokens) if b.unchanged is None else b.unchanged
        valid = len(req.context) + min(kept, len(b.tokens) - 1)
        c.truncate(b.seq, min(valid, c.length(b.seq)))
        if self.prefix_reuse:
            c.remember(b.seq, req.context + b.tokens, req.adapter)
        if req.keep:
            res.seq = b.seq
        else:
            c.release(b.seq)
