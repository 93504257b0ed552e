"""Batched sampling over the paged cache with continuous batching: the model's side.

A `Scheduler` (scheduler.py) decides which requests start and when; the engine runs what it
decides. Each loop turn: one prefill forward for the requests just admitted (every branch's first
token sampled from its row's logits), then one decode step of every live branch. A branch that
ends frees its slot at once and the next waiting request takes it.

With prefix reuse (the default) the cache keeps, for the length of a `run`, every prefilled
context and finished reply in its prefix index, keyed by the request's `adapter` (its weights)
and its tokens, and a request starts from the longest cached prefix computed with the same
weights: only the rest is prefilled. A request sharing a longer prefix with one prefilled in the
same call waits for the next call, so it finds that prefix cached. An engine on a
`MultiAdapterView` decodes rows of different adapters in one batch (`model.route` before every
forward).

Completions include the EOS token when the model emitted one (as `transformers.generate` does);
a completion cut by a stop string excludes the stop string and has no EOS. A request's
`stop_line` markers end a reply at the end of the first line holding one of them (e.g. "Final
Answer:": the answer line is the reply's last), the line break excluded; both finish as "stop".

A request's `first_token_ids` restrict its first token to those ids (the model's distribution
renormalized over them). A request's `probe` token ids are scored at every sampled token: their
probabilities under the model's distribution at temperature 1, from the very logits row the
token was drawn from (e.g. the verifier's probability of " incorrect" where it wrote its
verdict). Only rows of requests with a probe compute them, and sampling does not change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from malt_fast.errors import MaltError
from malt_fast.phases import phase
from malt_fast.rollout.cuda_graphs import DecodeGraphs, step_token_ids
from malt_fast.rollout.paged_cache import PagedKVCache
from malt_fast.rollout.sampling import SamplingParams, row_inputs, sample, sample_rows
from malt_fast.rollout.scheduler import Branch, Completion, Request, Scheduler


class _Staging:
    """Host side of one decode step's inputs and sampled tokens; pinned on CUDA, so copies
    are truly asynchronous (a pageable copy may wait for the GPU to drain)."""

    def __init__(self, max_batch: int, pin: bool):
        self.ints = torch.zeros(3, max_batch, dtype=torch.int64)  # source row, token, top_k
        self.floats = torch.zeros(3, max_batch, dtype=torch.float32)  # temperature, uniform, top_p
        self.tokens = torch.zeros(max_batch, dtype=torch.int64)
        if pin:
            self.ints, self.floats = self.ints.pin_memory(), self.floats.pin_memory()
            self.tokens = self.tokens.pin_memory()
        self.done = torch.cuda.Event() if pin else None


@dataclass
class _Step:
    """A launched decode step whose sampled tokens have not been read yet."""
    branches: list[Branch]
    staging: _Staging
    probes: torch.Tensor | None = None  # [rows with a probe, longest probe] on the host


class Engine:
    """Generates from one model with a paged KV cache.

    prefix_reuse=False prefills every branch's whole context itself and keeps no prefix index
    (the baseline the shared prefix is measured against); everything else is the same. A model
    with a `route` method (`MultiAdapterView`) serves requests of several adapters at once.
    cuda_graphs=False decodes every step eagerly (only the Triton backend, the default on CUDA,
    has fixed-shape steps).
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 64, cache_tokens: int = 65536,
                 block_size: int = 16, max_prefill_tokens: int = 4096,
                 decode_backend: str = "auto", prefix_reuse: bool = True,
                 eos_token_ids: list[int] | None = None, progress: bool = True,
                 cuda_graphs: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.prefix_reuse, self.progress = prefix_reuse, progress
        p = next(model.parameters())
        self.cache = PagedKVCache(model.config, -(-cache_tokens // block_size), block_size,
                                  dtype=p.dtype, device=p.device, decode_backend=decode_backend)
        # decode-step inputs on the device: a row's token is the previous step's sample at its
        # source row, or one the host gives (a branch's first token, sampled at prefill)
        self._row_ints = torch.zeros(3, max_batch, dtype=torch.int64, device=p.device)
        self._row_floats = torch.zeros(3, max_batch, dtype=torch.float32, device=p.device)
        self._sampled = torch.zeros(max_batch, dtype=torch.int64, device=p.device)
        # two stagings: one step's is filled while the other's step is still in flight
        self._staging = [_Staging(max_batch, p.is_cuda) for _ in range(2)]
        self._launches = 0
        # fixed-shape decode steps go with the Triton kernel's plan; captured only on CUDA
        self.graphs = None
        if cuda_graphs and self.cache.backend == "triton":
            self.graphs = DecodeGraphs(model, self.cache, max_batch, p.is_cuda, self._sampled,
                                       self._row_ints)
        if eos_token_ids is None:
            eos_token_ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
            eos_token_ids += [e for e in model.config.eos_token_ids if e not in eos_token_ids]
        self.eos = set(eos_token_ids)
        self._route = getattr(model, "route", None)
        self.scheduler: Scheduler | None = None  # the running call's
        self.stats = self._zero_stats()
        self.last_stats: dict = {}

    # ------------------------------------------------------------ public API

    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, stop=None, seed: int = 0,
                 top_k: int = 0) -> list[list[list[int]]]:
        """Per prompt, n completions (token ids, prompt excluded). Same seed, same samples."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise MaltError("generate: every prompt needs at least one token")
        if n < 1 or max_new_tokens < 1:
            raise MaltError(f"generate: n={n} and max_new_tokens={max_new_tokens} must be >= 1")
        stop = _stop_tuple(stop)
        if stop and self.tokenizer is None:
            raise MaltError("generate: stop strings need the engine to have a tokenizer")
        params = SamplingParams(temperature, top_p, top_k)
        results: list[list[list[int]] | None] = [None] * len(prompts)

        def done(req, comps):
            results[req.path[0]] = [c.tokens for c in comps]

        reqs = [Request(list(p), n, max_new_tokens, params, stop, seed, (i,), on_done=done)
                for i, p in enumerate(prompts)]
        self.run(reqs)
        return results

    def run(self, requests: list[Request]) -> dict:
        """Serve the requests (and any a callback submits) to completion; returns the stats."""
        if self.tokenizer is None and any(r.stop or r.stop_line for r in requests):
            raise MaltError("stop strings and stop lines need the engine to have a tokenizer")
        self._check_adapters(requests)
        # a run's outputs depend on its own requests only, not on what earlier runs cached
        # (a resumed or sharded expansion then equals an uninterrupted one bit for bit)
        self.cache.index.clear()
        self.scheduler = sched = Scheduler(self.cache, requests, max_batch=self.max_batch,
                                           max_prefill_tokens=self.max_prefill_tokens,
                                           prefix_reuse=self.prefix_reuse)
        self.stats = self._zero_stats()
        t0 = time.perf_counter()
        total = sum(r.n * r.max_new_tokens for r in requests)
        with torch.inference_mode(), tqdm(total=total, unit="tok", disable=not self.progress,
                                          desc="rollout", dynamic_ncols=True) as bar:
            self._bar = bar
            inflight: _Step | None = None
            # step t is launched before step t-1's tokens are read, so the host's bookkeeping
            # overlaps the device's work; a branch that step t-1 ends runs one wasted row in t
            while sched.waiting or sched.running or inflight is not None:
                if sched.waiting and (reqs := sched.admit()):
                    t, before = time.perf_counter(), self.stats["prefill_tokens"]
                    with phase("prefill", self.model) as p:
                        self._prefill(reqs)
                        p.count(self.stats["prefill_tokens"] - before, "prefill")
                    self.stats["prefill_calls"] += 1
                    self.stats["prefill_s"] += time.perf_counter() - t
                    self._retire()  # a branch's first token (sampled at prefill) may end it
                before = self.stats["generated_tokens"]
                with phase("decode", self.model) as p:
                    inflight = self._decode_step(sched.running, inflight)
                    p.count(self.stats["generated_tokens"] - before, "forward")
                self._retire()
        self.stats["wall_s"] = time.perf_counter() - t0
        self.stats["tokens_per_s"] = \
            self.stats["generated_tokens"] / max(self.stats["wall_s"], 1e-9)
        self.stats["peak_cache_blocks"] = self.cache.peak_used
        self.last_stats = dict(self.stats)
        return self.last_stats

    def submit(self, request: Request) -> None:
        """Queue more work from inside an `on_done` callback of the running loop (ahead of
        requests not yet started: `Scheduler.submit`)."""
        self._check_adapters([request])
        self.scheduler.submit(request)
        self._bar.total += request.n * request.max_new_tokens
        self._bar.refresh()

    def release(self, seq: int) -> None:
        self.cache.release(seq)

    def _check_adapters(self, requests: list[Request]) -> None:
        names = getattr(self.model, "names", [None])
        for r in requests:
            if r.adapter is not None and self._route is None:
                raise MaltError(f"a request for adapter {r.adapter!r}: this engine's model serves "
                                "one set of weights (build it on a MultiAdapterView)")
            if r.adapter not in names:
                raise MaltError(f"a request for adapter {r.adapter!r}: the engine has {names}")

    def _route_rows(self, requests: list[Request]) -> None:
        """Tell a multi-adapter model which adapter each row of the next forward uses."""
        if self._route is not None:
            self._route([self.model.index(r.adapter) for r in requests])

    @staticmethod
    def _zero_stats() -> dict:
        return dict(prefill_tokens=0, context_tokens=0, generated_tokens=0, decode_steps=0,
                    prefill_calls=0, prefill_s=0.0, wall_s=0.0, tokens_per_s=0.0,
                    peak_cache_blocks=0)

    def _retire(self) -> None:
        done = self.scheduler.retire()
        if done:  # the bar counts budgets; a branch that ended early frees the rest of its own
            self._bar.total -= sum(b.request.max_new_tokens - len(b.tokens) for b in done)
            self._bar.refresh()

    # ------------------------------------------------------------ the model's steps

    def _prefill(self, reqs: list[Request]) -> list[Branch]:
        """One forward over every row the requests need, then their branches' first tokens."""
        rows = self.scheduler.prefill_rows(reqs)
        self.stats["context_tokens"] += sum(len(req.context) for req in reqs)
        self._route_rows([row.request for row in rows])
        last_logits = self._forward([row.seq for row in rows], [row.tokens for row in rows])
        self.stats["prefill_tokens"] += sum(len(row.tokens) for row in rows)
        branches = self.scheduler.start(rows)
        source_row = [i for i, row in enumerate(rows) for _ in row.branches]
        # every branch's first token in one draw (each from its own stream): one device sync
        # per prefill call, not one per request
        logits = last_logits[torch.tensor(source_row, device=last_logits.device)]
        first = sample(_restrict_first(logits, [b.request for b in branches]),
                       [b.request.params for b in branches], [b.random for b in branches])
        probes = _probe_probs(logits, [b.request for b in branches])
        probes = iter(probes.tolist() if probes is not None else ())
        for b, tok in zip(branches, first.tolist()):
            self._append(b, tok, next(probes) if b.request.probe else None)
        self._bar.update(len(branches))
        return branches

    def _forward(self, seqs: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Extend each sequence by its tokens; logits [B, V] at each row's last new token.

        On the CPU the rows are packed into one (no padding: with cached prefixes the rows'
        new tokens differ by hundreds); a multi-adapter model routes by row, so it, and CUDA
        (one padded kernel beats a launch per sequence), take padded rows."""
        n_new = [len(t) for t in tokens]
        T = max(n_new)
        device = self.cache.k.device
        if len(seqs) > 1 and self._route is None and device.type == "cpu":
            ids = torch.tensor([t for row in tokens for t in row], dtype=torch.int64)[None]
            positions = self.cache.begin_packed(seqs, n_new)
            h = self.model.hidden_states(ids, positions, cache=self.cache)[0]
            last = torch.tensor(n_new).cumsum(0) - 1
            return self.model.lm_head(h[last])
        ids = torch.zeros(len(seqs), T, dtype=torch.int64)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
        positions = self.cache.begin(seqs, n_new)
        h = self.model.hidden_states(ids.to(device), positions, cache=self.cache)
        last = torch.tensor(n_new, device=device) - 1
        h_last = h[torch.arange(len(seqs), device=device), last]
        return self.model.lm_head(h_last)

    def _decode_step(self, active: list[Branch], inflight: _Step | None) -> _Step | None:
        """Launch a step of the active branches, then read the tokens of the step in flight;
        returns the step now in flight."""
        launched = self._launch(active) if active else None
        if inflight is not None:
            self._collect(inflight)
        return launched

    def _launch(self, active: list[Branch]) -> _Step:
        """Queue one decode step of every active branch and the copy of its samples to the host."""
        B = len(active)
        stage = self._staging[self._launches % 2]
        self._launches += 1
        ints, floats = stage.ints.numpy(), stage.floats.numpy()
        ints[0] = -1  # padding rows past B read token 0
        ints[1] = 0
        ints[0, :B] = [-1 if b.row is None else b.row for b in active]
        ints[1, :B] = [b.tokens[-1] if b.row is None else 0 for b in active]
        mode = row_inputs([b.request.params for b in active], [b.random for b in active],
                          floats, ints[2])
        self._row_ints.copy_(stage.ints, non_blocking=True)
        self._row_floats.copy_(stage.floats, non_blocking=True)
        seqs = [b.seq for b in active]
        self._route_rows([b.request for b in active])
        if self.graphs is not None and self.graphs.usable(seqs):
            logits = self.graphs.logits(seqs)
        else:
            positions = self.cache.begin(seqs, [1] * B)
            ids = step_token_ids(self._sampled, self._row_ints, B)
            logits = self.model.lm_head(self.model.hidden_states(ids, positions,
                                                                 cache=self.cache)[:, -1])
        toks = sample_rows(logits, self._row_floats, self._row_ints[2], mode)
        self._sampled[:B].copy_(toks)
        stage.tokens[:B].copy_(toks, non_blocking=True)
        probes = _probe_probs(logits, [b.request for b in active])
        if probes is not None:  # from CUDA: into pinned memory, ready with the step's event
            probes = probes.to("cpu", non_blocking=True)
        if stage.done is not None:
            stage.done.record()
        for i, b in enumerate(active):
            b.row = i
        self.stats["decode_steps"] += 1
        return _Step(list(active), stage, probes)

    def _collect(self, step: _Step) -> None:
        """Append a launched step's tokens to its branches (not to those already ended)."""
        if step.staging.done is not None:
            step.staging.done.synchronize()
        live = 0
        # rows with a probe, in step order: a branch ended meanwhile drops its row's values
        # along with its token, so probes stay aligned with tokens
        probes = iter(step.probes.tolist() if step.probes is not None else ())
        for b, tok in zip(step.branches, step.staging.tokens[:len(step.branches)].tolist()):
            probe = next(probes) if b.request.probe else None
            if b.result is None:
                self._append(b, tok, probe)
                live += 1
        self._bar.update(live)

    def _append(self, b: Branch, tok: int, probe: list[float] | None = None) -> None:
        """Add a sampled token and, with a probe, its row's values (cut to this request's
        probe: a batch with a longer probe padded the row); end the branch if the token ends
        its reply."""
        b.tokens.append(tok)
        self.stats["generated_tokens"] += 1
        req = b.request
        if req.probe:
            b.probes.append(tuple(probe[:len(req.probe)]))
        if tok in self.eos:
            b.result = Completion(list(b.tokens), "eos")
        elif req.stop and (cut := self._stop_cut(b.tokens, req.stop)) is not None:
            b.result = Completion(cut[0], "stop", text=cut[1])
            b.unchanged = cut[2]
        elif req.stop_line and tok in self.tokenizer.newline_ids \
                and (cut := self._line_cut(b.tokens, req.stop_line)) is not None:
            b.result = Completion(cut[0], "stop", text=cut[1])
            b.unchanged = cut[2]
        elif len(b.tokens) >= req.max_new_tokens:
            b.result = Completion(list(b.tokens), "length")
        else:
            return
        res = b.result
        if res.text is None and self.tokenizer is not None:
            res.text = self.tokenizer.decode(res.tokens)
        if req.probe:
            # tokens a stop cut re-encoded were never sampled: no distribution to report
            kept = len(res.tokens) if b.unchanged is None else b.unchanged
            res.probes = b.probes[:kept] + [None] * (len(res.tokens) - kept)

    def _stop_cut(self, tokens: list[int], stop: tuple[str, ...]):
        """(token ids, text, count of unchanged sampled tokens) if the text now holds a stop
        string; the ids decode to exactly the text before the first stop string."""
        tok = self.tokenizer
        window = max(len(s) for s in stop) + 8
        if not any(s in tok.decode(tokens[-window:]) for s in stop):
            return None
        text = tok.decode(tokens)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if not hits:
            return None
        return self._cut_at(tokens, text[: min(hits)])

    def _line_cut(self, tokens: list[int], markers: tuple[str, ...]):
        """As _stop_cut, if the text now holds a line break after one of `markers`: the ids
        decode to exactly the text up to that line break."""
        text = self.tokenizer.decode(tokens)
        ends = []
        for marker in markers:
            at = text.find(marker)
            if at < 0:
                continue
            nl = text.find("\n", at + len(marker))
            while nl >= 0 and not text[at + len(marker):nl].strip():  # "Final Answer:\n5"
                nl = text.find("\n", nl + 1)
            if nl >= 0:
                ends.append(nl)
        return self._cut_at(tokens, text[:min(ends)]) if ends else None

    def _cut_at(self, tokens: list[int], cut: str):
        """(token ids, `cut`, count of unchanged sampled tokens): ids that decode to exactly
        `cut`, a prefix of the tokens' text."""
        tok = self.tokenizer
        m = len(tokens)
        while m and not cut.startswith(tok.decode(tokens[:m])):
            m -= 1
        # a token that straddles the stop string's start is replaced by its text before it
        rest = cut[len(tok.decode(tokens[:m])):]
        return tokens[:m] + (tok.encode(rest) if rest else []), cut, m


def _restrict_first(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The prefill rows' logits with every id outside a request's `first_token_ids` at -inf."""
    rows = [i for i, r in enumerate(requests) if r.first_token_ids]
    if not rows:
        return logits
    mask = torch.zeros(len(rows), logits.shape[-1], dtype=torch.bool)
    for k, i in enumerate(rows):
        mask[k, list(requests[i].first_token_ids)] = True
    rows_t = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[rows_t] = logits[rows_t].masked_fill(~mask.to(logits.device), float("-inf"))
    return out


def _probe_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor | None:
    """Temperature-1 probabilities, in fp32, of each probing row's probe ids: [rows whose
    request has a probe, longest probe] (shorter probes padded with id 0), or None if no row
    has one. Only those rows' log-sum-exp is computed; nothing here waits for the device."""
    rows = [i for i, r in enumerate(requests) if r.probe]
    if not rows:
        return None
    width = max(len(requests[i].probe) for i in rows)
    ids = torch.tensor([list(requests[i].probe) + [0] * (width - len(requests[i].probe))
                        for i in rows], dtype=torch.int64)
    rows_t = torch.tensor(rows, dtype=torch.int64)
    if logits.is_cuda:  # a pageable host->device copy may wait for the stream to drain
        ids, rows_t = ids.pin_memory(), rows_t.pin_memory()
    ids = ids.to(logits.device, non_blocking=True)
    x = logits.index_select(0, rows_t.to(logits.device, non_blocking=True)).float()
    return (x.gather(1, ids) - torch.logsumexp(x, dim=-1, keepdim=True)).exp()


def _stop_tuple(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if any(not s for s in stop):
        raise MaltError("generate: stop strings must be non-empty")
    return tuple(stop)
