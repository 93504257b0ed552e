"""G→V→R tree expansion over one chat transcript per path.

The transcript is: system, user question, generator turn g, verifier-instruction user turn,
verifier turn v, refiner-instruction user turn, refiner turn r. A verifier's context is its
generator's context + g + the instruction turn, so when one engine (one set of weights) serves
every role, a critique request extends g's sequence in the cache and only the instruction turn is
prefilled; the same holds for refinements. Levels are pipelined: a question's critiques start as
soon as its generations finish, so decode batches stay full.

Roles with other weights on the same engine (a multi-adapter engine: each role's requests name
its adapter) run interleaved in the same way, but a child cannot extend a sequence computed with
its parent role's weights: it starts from whatever its own weights have cached (the engine's
prefix index: the question, and a sibling's generation or critique). Roles on different engines
run level by level, each engine reusing its own cached prefixes.

Context token ids are built from the sampled tokens, never from re-encoded text, so the cache is
reused exactly; the text between two turns comes from the tokenizer's chat template.

With a layout's `verdict` (e.g. "Verdict:") every critique ends with a verdict line: a critique
that wrote none gets the line appended, and its word is sampled by the verifier (its weights,
temperature and probe) as a short continuation of the critique's own sequence. The node then
holds the critique, the line and the word as one reply, and the refiner reads them all. A small
model seldom closes its critique with the line it was asked for, but always has a judgement to
give at that point, and its probability there is the verifier's score.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from malt_fast.errors import MaltError
from malt_fast.rollout.engine import Completion, Engine, Request
from malt_fast.rollout.sampling import SamplingParams

ROLES = ("generator", "verifier", "refiner")
_SENTINEL = "\x00TURN\x00"
VERDICT_LEVEL = 3  # the request level (first path entry) of an appended verdict line
VERDICT_TOKENS = 4  # the verdict word and what closes its line


@dataclass
class RoleLayout:
    """The messages around the three turns; `{question}` in any of them is the question text."""

    question: str = "{question}"  # the user turn the generator answers
    verifier: str = ""  # the user turn asking for a critique of the generator's answer
    refiner: str = ""  # the user turn asking for a corrected answer
    system: str | None = None
    verdict: str | None = None  # the line every critique ends with (module docstring)
    # whether a critique already holds a verdict its reader accepts (malt/verdict.py); None:
    # any letter after the last `verdict` marker counts
    has_verdict: Callable[[str], bool] | None = None

    def render(self, field: str, question: str) -> str:
        # str.replace, not format: prompts may hold braces (\boxed{}, JSON)
        return getattr(self, field).replace("{question}", question)


@dataclass
class LevelSampling:
    max_new_tokens: int = 256
    temperature: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    stop_line: tuple[str, ...] = ()  # the reply ends with the first line holding one of these
    # token ids whose probabilities each sampled token records (`Request.probe`); the nodes
    # then carry "probes" (e.g. the verifier's `flag_ids + pass_ids`, malt/verdict.py)
    probe: tuple[int, ...] = ()
    first_token_ids: tuple[int, ...] = ()  # the first token drawn among these (Request)

    def params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k)


class Transcript:
    """Token ids of each role's context, built by appending turns to the previous context."""

    def __init__(self, tokenizer, layout: RoleLayout):
        if tokenizer is None:
            raise MaltError("tree expansion needs the engine to have a tokenizer")
        self.tok, self.layout = tokenizer, layout
        self.eos = set(tokenizer.eos_token_ids)

    def _messages(self, question: str) -> list[dict]:
        msgs = [] if self.layout.system is None else [{"role": "system",
                                                       "content": self.layout.system}]
        return msgs + [{"role": "user", "content": self.layout.render("question", question)}]

    def generator_context(self, question: str) -> list[int]:
        return self.tok.apply_chat_template(self._messages(question), add_generation_prompt=True)

    def next_context(self, context: list[int], reply: list[int], question: str,
                     instruction_field: str) -> list[int]:
        """context + reply (trailing EOS dropped) + the template's text that closes the reply,
        opens the instruction turn and the next assistant turn."""
        msgs = self._messages(question)
        before = self.tok.chat_text(msgs, add_generation_prompt=True)
        msgs = msgs + [{"role": "assistant", "content": _SENTINEL},
                       {"role": "user", "content": self.layout.render(instruction_field, question)}]
        full = self.tok.chat_text(msgs, add_generation_prompt=True)
        at = full.find(_SENTINEL)
        if at < 0 or full[:at] != before:
            raise MaltError("the tokenizer's chat template does not render an assistant turn as "
                            "a continuation of the generation prompt; shared-prefix expansion "
                            "needs one transcript")
        if reply and reply[-1] in self.eos:
            reply = reply[:-1]
        # every turn's prefix (system, question, ...) is the same text, so only this suffix
        # differs between levels; `before` only checks that assumption
        between = full[at + len(_SENTINEL):]
        return list(context) + list(reply) + self.tok.encode(between)

    def needs_verdict(self, critique: str | None) -> bool:
        """With a layout's verdict: whether the critique lacks a verdict its reader accepts
        (`layout.has_verdict`; without one, a word after the last marker). A reply may end
        right after "Verdict:", or write a word the reader does not take ("Verdict: maybe")."""
        lead = self.layout.verdict
        if lead is None:
            return False
        if self.layout.has_verdict is not None:
            return not self.layout.has_verdict(critique or "")
        text = (critique or "").lower()
        at = text.rfind(lead.lower())
        return at < 0 or not any(ch.isalpha() for ch in text[at + len(lead):])

    def verdict_lead(self) -> list[int]:
        return self.tok.encode("\n" + self.layout.verdict)

    def kept_reply(self, reply: list[int]) -> list[int]:
        """A reply as the next turn's context holds it: its trailing EOS dropped."""
        return list(reply[:-1]) if reply and reply[-1] in self.eos else list(reply)


def verdict_sampling(sampling: dict) -> LevelSampling:
    """The appended verdict word's sampling: `sampling["verdict"]` if given (e.g. its first
    token restricted to the verdict words), else the critique's; for a few tokens, ending with
    the line."""
    s = sampling.get("verdict") or sampling["verifier"]
    return replace(s, max_new_tokens=VERDICT_TOKENS, stop=("\n",), stop_line=())


def with_verdict(critique: Completion, kept: list[int], lead_ids: list[int],
                 verdict: Completion, lead: str) -> Completion:
    """A critique (its `kept` tokens: the trailing EOS dropped) and its appended verdict line
    (`lead_ids`, then the sampled word) as one reply. It is cut (`length`) only if the critique
    was: the verdict line is complete once its word is there."""
    probes = None
    if critique.probes is not None:
        probes = critique.probes[:len(kept)] + [None] * len(lead_ids) + \
            (verdict.probes or [None] * len(verdict.tokens))
    finish = "length" if critique.finish == "length" else \
        "eos" if verdict.finish == "eos" else "stop"
    return Completion(kept + lead_ids + list(verdict.tokens), finish,
                      text=f"{critique.text}\n{lead}{verdict.text}", seq=verdict.seq,
                      probes=probes)


def expand_tree(engines, questions: list[str], layout: RoleLayout, n: int = 3,
                sampling: LevelSampling | dict[str, LevelSampling] | None = None,
                seed: int | list[tuple[int, int]] = 0,
                refine_if: Callable[[str], bool] | None = None) -> tuple[list[dict], dict]:
    """n generations per question, n critiques per generation, n refinements per critique
    (with `refine_if`, only under the critiques whose text it accepts; the others get none).

    `engines` is one Engine for every role, or a dict role → Engine or (Engine, adapter name)
    (an adapter of the engine's MultiAdapterView). Question i's requests draw from seed `seed`
    with paths starting at i, or, with a list, from seed[i] = (seed, index) with paths starting
    at index: several calls' questions then run in one call with the samples of each.

    Returns (trees, stats): trees[i] = {"question", "generations": [{"text", "tokens",
    "finish", "verifications": [{..., "refinements": [{"text", "tokens", "finish"}]}]}]}.
    `sampling` may also hold "verdict": how a layout's appended verdict word is sampled
    (plus "probes" on the nodes of a level sampled with a `probe`); stats sums the engines'
    runs.
    """
    roles = role_bindings(engines)
    if not isinstance(sampling, dict):
        sampling = {r: sampling or LevelSampling() for r in ROLES}
    transcript = Transcript(roles["generator"][0].tokenizer, layout)
    trees = [{"question": q, "generations": []} for q in questions]
    one_engine = len({id(e) for e, _ in roles.values()}) == 1
    expand = _expand_one_engine if one_engine else _expand_per_role
    stats = expand(roles, transcript, questions, trees, n, sampling, _keys(seed, questions),
                   refine_if or (lambda critique: True))
    return trees, stats


def _keys(seed, questions) -> list[tuple[int, int]]:
    """(request seed, path index) of each question."""
    if isinstance(seed, int):
        return [(seed, i) for i in range(len(questions))]
    if len(seed) != len(questions):
        raise MaltError(f"{len(seed)} (seed, index) keys for {len(questions)} questions")
    return [tuple(k) for k in seed]


def role_bindings(engines) -> dict[str, tuple[Engine, str | None]]:
    """role -> (Engine, adapter) from an Engine or a dict role -> Engine or (Engine, adapter)."""
    if not isinstance(engines, dict):
        engines = {r: engines for r in ROLES}
    missing = [r for r in ROLES if r not in engines]
    if missing:
        raise MaltError(f"expand_tree: no engine for role(s) {missing}")
    return {r: bind(engines[r]) for r in ROLES}


def bind(engine) -> tuple[Engine, str | None]:
    """(Engine, adapter) from an Engine (its only weights) or an (Engine, adapter) pair."""
    return engine if isinstance(engine, tuple) else (engine, None)


def expand_generations(engine, questions: list[str], layout: RoleLayout, n: int = 1,
                       sampling: LevelSampling | None = None,
                       seed: int | list[tuple[int, int]] = 0) -> tuple[list, dict]:
    """The first level alone (a single agent): n generations per question, sampled with the
    same request seeds as expand_tree's generator level, so equal weights give equal texts.
    `engine` is an Engine or (Engine, adapter). Returns (generations per question, stats)."""
    engine, adapter = bind(engine)
    transcript = Transcript(engine.tokenizer, layout)
    out: list[list[dict]] = [[] for _ in questions]

    def done(req, comps):
        out[req.tag] = [_node(c) for c in comps]

    keys = _keys(seed, questions)
    stats = engine.run([_request(0, transcript.generator_context(q), n,
                                 sampling or LevelSampling(), s, (index,), on_done=done, tag=i,
                                 adapter=adapter)
                        for i, (q, (s, index)) in enumerate(zip(questions, keys))])
    return out, stats


def _node(c: Completion) -> dict:
    node = {"text": c.text, "tokens": c.tokens, "finish": c.finish}
    if c.probes is not None:  # only levels sampled with a probe: other trees stay as they were
        node["probes"] = c.probes
    return node


def _request(level: int, ctx: list[int], n: int, s: LevelSampling, seed: int, path: tuple,
             **kw) -> Request:
    return Request(ctx, n, s.max_new_tokens, s.params(), tuple(s.stop), seed, (level,) + path,
                   stop_line=tuple(s.stop_line), probe=tuple(s.probe),
                   first_token_ids=tuple(s.first_token_ids), **kw)


def _expand_one_engine(roles, transcript, questions, trees, n, sampling, keys,
                       refine_if) -> dict:
    """One engine: levels run interleaved; a child of a role with the same weights extends its
    parent's cache sequence."""
    engine = roles["generator"][0]
    adapter = {r: a for r, (_, a) in roles.items()}
    extends = {"verifier": adapter["verifier"] == adapter["generator"],
               "refiner": adapter["refiner"] == adapter["verifier"]}
    reuse = engine.prefix_reuse

    verdicts = transcript.layout.verdict is not None
    if verdicts:
        lead_ids, v_sampling = transcript.verdict_lead(), verdict_sampling(sampling)

    def on_refinements(req, comps):
        req.tag["refinements"] = [_node(c) for c in comps]

    def refine(nodes, k, context, c, question, seed, path):
        """Critique k of a generation is final: its node, then its refinements."""
        nodes[k] = child_node = _node(c)
        refined = refine_if(c.text)
        if c.seq is not None and not (extends["refiner"] and refined):
            engine.release(c.seq)
        if not refined:
            child_node["refinements"] = []
            return
        ctx = transcript.next_context(context, c.tokens, question, "refiner")
        engine.submit(_request(2, ctx, n, sampling["refiner"], seed, path,
                               parent=c.seq if extends["refiner"] else None,
                               on_done=on_refinements, tag=child_node,
                               adapter=adapter["refiner"]))

    def on_verdict(req, comps):
        nodes, k, context, c, kept, question, path = req.tag
        full = with_verdict(c, kept, lead_ids, comps[0], transcript.layout.verdict)
        refine(nodes, k, context, full, question, req.seed, path)

    def on_verifications(req, comps):
        node, question = req.tag
        nodes = node["verifications"] = [None] * len(comps)
        for k, c in enumerate(comps):
            path = req.path[1:] + (k,)
            if not transcript.needs_verdict(c.text):
                refine(nodes, k, req.context, c, question, req.seed, path)
                continue
            kept = transcript.kept_reply(c.tokens)
            engine.submit(_request(VERDICT_LEVEL, req.context + kept + lead_ids, 1, v_sampling,
                                   req.seed, path, parent=c.seq, keep=extends["refiner"],
                                   on_done=on_verdict, adapter=adapter["verifier"],
                                   tag=(nodes, k, req.context, c, kept, question, path)))

    def on_generations(req, comps):
        tree = trees[req.tag]
        for j, c in enumerate(comps):
            node = _node(c)
            tree["generations"].append(node)
            ctx = transcript.next_context(req.context, c.tokens, tree["question"], "verifier")
            child = _request(1, ctx, n, sampling["verifier"], req.seed, req.path[1:] + (j,),
                             parent=c.seq if extends["verifier"] else None,
                             keep=extends["refiner"] or verdicts, on_done=on_verifications,
                             tag=(node, tree["question"]), adapter=adapter["verifier"])
            engine.submit(child)

    roots = [_request(0, transcript.generator_context(q), n, sampling["generator"], s, (index,),
                      keep=extends["verifier"], on_done=on_generations, tag=i,
                      adapter=adapter["generator"])
             for i, (q, (s, index)) in enumerate(zip(questions, keys))]
    stats = engine.run(roots)
    stats["prefix_reuse"] = reuse
    return stats


def _expand_per_role(roles, transcript, questions, trees, n, sampling, keys,
                     refine_if) -> dict:
    """Roles on their own engines: each level on its role's engine."""
    totals: dict = {}

    def run(role, level, items, n=n, level_sampling=None):
        """items: (context, path, question, seed); returns completions per item."""
        out = [None] * len(items)

        def done(req, comps):
            out[req.tag] = comps

        engine, adapter = roles[role]
        s = level_sampling or sampling[role]
        reqs = [_request(level, ctx, n, s, seed, path, on_done=done, tag=i,
                         adapter=adapter) for i, (ctx, path, _, seed) in enumerate(items)]
        stats = engine.run(reqs)
        for k, v in stats.items():
            totals[k] = max(totals.get(k, 0), v) if k == "peak_cache_blocks" else \
                totals.get(k, 0) + v
        return out

    def close_verdicts(items, results):
        """Each critique without a verdict line, with the line appended and its word sampled
        (one engine run on the verifier's engine)."""
        todo = [(i, k) for i, comps in enumerate(results) for k, c in enumerate(comps)
                if transcript.needs_verdict(c.text)]
        if not todo:
            return results
        lead_ids = transcript.verdict_lead()
        kept = {ik: transcript.kept_reply(results[ik[0]][ik[1]].tokens) for ik in todo}
        verdicts = run("verifier", VERDICT_LEVEL,
                       [(items[i][0] + kept[i, k] + lead_ids, items[i][1] + (k,), items[i][2],
                         items[i][3]) for i, k in todo],
                       n=1, level_sampling=verdict_sampling(sampling))
        results = [list(comps) for comps in results]
        for (i, k), (v,) in zip(todo, verdicts):
            results[i][k] = with_verdict(results[i][k], kept[i, k], lead_ids, v,
                                         transcript.layout.verdict)
        return results

    items = [(transcript.generator_context(q), (index,), q, s)
             for q, (s, index) in zip(questions, keys)]
    level_nodes = [t["generations"] for t in trees]
    for level, (role, nxt) in enumerate([("generator", "verifier"), ("verifier", "refiner"),
                                         ("refiner", None)]):
        results = run(role, level, items)
        if role == "verifier" and transcript.layout.verdict is not None:
            results = close_verdicts(items, results)
        next_items, next_nodes = [], []
        for (ctx, path, q, s), comps, nodes in zip(items, results, level_nodes):
            for j, c in enumerate(comps):
                node = _node(c)
                nodes.append(node)
                if nxt is not None:
                    node["verifications" if nxt == "verifier" else "refinements"] = []
                    if nxt == "refiner" and not refine_if(c.text):
                        continue
                    next_items.append((transcript.next_context(ctx, c.tokens, q, nxt),
                                       path + (j,), q, s))
                    next_nodes.append(node["verifications" if nxt == "verifier"
                                           else "refinements"])
        items, level_nodes = next_items, next_nodes
    totals["tokens_per_s"] = totals.get("generated_tokens", 0) / max(totals.get("wall_s", 0), 1e-9)
    totals["prefix_reuse"] = all(e.prefix_reuse for e, _ in roles.values())
    return totals
