"""One decode step of the rollout engine against the memory-bandwidth floor.

B sequences in groups of n branches that share a P-token prefix (forked, as in the G->V->R tree),
each with S tokens of its own, random weights in a model's shape (speed does not depend on the
values). Per batch size, in one process:

- eager: plan + forward launched from Python each step (Engine(cuda_graphs=False));
- graph: the step's buffers refilled and its CUDA graph replayed (the engine's default on CUDA);
- replay: the graph alone, timed with CUDA events (device time, no host work);
- attention: decode attention with the shared-prefix (cascade) plan vs a flat plan (every
  branch reads its whole context), once per layer, replayed from a graph.

Floor: the bytes a step must read (every weight once; the KV cache of the batch, a shared prefix
once) over the bandwidth: the issue's nominal 3 TB/s and a device-to-device copy measured here.

    python benchmarks/decode_step.py --shape smollm2-135m --batch 64 128 256 --prefix 512 --own 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from rollout import _version  # benchmarks/rollout.py

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}
NOMINAL_BW = 3.0e12


def random_model(shape: str, dtype, device):
    from malt_fast.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])
    with torch.device(device):
        model = Llama(cfg).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model.eval()


def forked_batch(cache, batch, n, prefix, own):
    """batch sequences: batch/n groups, each n branches forked after a `prefix`-token parent."""
    seqs = []
    for _ in range(batch // n):
        parent = cache.new_sequence()
        cache.reserve(parent, prefix)
        cache.seqs[parent].length = prefix
        group = [parent] + cache.fork(parent, n - 1)
        for s in group:
            cache.reserve(s, own)
            cache.seqs[s].length += own
        seqs += group
    return seqs


def copy_bandwidth(device, gib=2) -> float:
    x = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * x.numel() / statistics.median(times[2:])


def event_ms(fn, reps=20) -> float:
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graphed(fn, times: int):
    """A CUDA graph of `times` calls of fn (device time without launch gaps)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(times):
            fn()
    return graph.replay


def host_ms_per_step(step, steps) -> float:
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def measure(model, args, batch, bw) -> dict:
    from malt_fast.kernels.decode_attention import build_plan, decode_with_plan, upload_plan
    from malt_fast.rollout.cuda_graphs import DecodeGraphs
    from malt_fast.rollout.paged_cache import PagedKVCache

    cfg, dev = model.config, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    bs = args.block_size
    per_seq = args.prefix + args.own + 3 * args.steps + 64
    blocks = batch * (-(-per_seq // bs) + 1) + 16
    cache = PagedKVCache(cfg, blocks, bs, dtype=dtype, device=dev, decode_backend="triton")
    cache.k.normal_()
    cache.v.normal_()
    seqs = forked_batch(cache, batch, args.n, args.prefix, args.own)
    ids = torch.randint(cfg.vocab_size, (batch, 1), device=dev)
    sampled = ids[:, 0].clone()
    row_ints = torch.stack([torch.arange(batch, device=dev), torch.zeros_like(sampled)])

    def eager():
        pos = cache.begin(seqs, [1] * batch)
        return model.lm_head(model.hidden_states(ids, pos, cache=cache)[:, -1])

    graphs = DecodeGraphs(model, cache, batch, True, sampled, row_ints)
    r = dict(batch=batch)
    r["eager_ms"] = host_ms_per_step(eager, args.steps)
    r["graph_ms"] = host_ms_per_step(lambda: graphs.logits(seqs), args.steps)
    graph, _ = graphs.graphs[batch]
    r["replay_ms"] = event_ms(graph.replay)

    # attention alone at the current lengths, one layer, times the layers
    lens = torch.tensor([cache.length(s) for s in seqs])
    tables = cache._tables(seqs, max(len(cache.seqs[s].blocks) for s in seqs))
    q = torch.randn(batch, cfg.num_attention_heads, cfg.head_dim, device=dev, dtype=dtype)
    t32 = torch.from_numpy(tables).to(dev, torch.int32)
    for name, cascade in (("attn_cascade_ms", True), ("attn_flat_ms", False)):
        plan = upload_plan(*build_plan(tables, lens.numpy(), bs, cfg.num_key_value_heads,
                                       cfg.num_attention_heads // cfg.num_key_value_heads,
                                       cascade), dev)
        r[name] = event_ms(graphed(
            lambda: decode_with_plan(q, cache.k[0], cache.v[0], t32, plan, cache.scale),
            cfg.num_hidden_layers))

    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim \
        * dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not cfg.tie_word_embeddings:  # the embedding table is read only at the batch's rows
        weights -= model.embed_tokens.weight.numel() * dtype.itemsize
    ctx = lens.float().mean().item()
    unique_tokens = (batch // args.n) * args.prefix + batch * (ctx - args.prefix)
    r.update(weight_mib=weights / 2**20, kv_unique_mib=unique_tokens * per_token / 2**20,
             kv_flat_mib=batch * ctx * per_token / 2**20, context=ctx)
    step_bytes = weights + unique_tokens * per_token
    r["floor_nominal_ms"] = step_bytes / NOMINAL_BW * 1e3
    r["floor_measured_ms"] = step_bytes / bw * 1e3
    r["replay_over_floor"] = r["replay_ms"] / r["floor_measured_ms"]
    r["tokens_per_s_graph"] = batch / r["graph_ms"] * 1e3
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--n", type=int, default=3, help="branches per shared prefix")
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--own", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_step.py measures CUDA steps; no GPU here", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    model = random_model(args.shape, torch.bfloat16, dev)
    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            batch -= batch % args.n
            rows.append(measure(model, args, batch, bw))
    report = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__,
                  triton=_version("triton"), copy_bandwidth_tb_s=bw / 1e12,
                  config=vars(args), rows=rows)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; {args.shape} bf16, prefix {args.prefix} "
          f"shared by {args.n}, {args.own} own tokens")
    cols = ["batch", "context", "eager_ms", "graph_ms", "replay_ms", "floor_measured_ms",
            "floor_nominal_ms", "replay_over_floor", "attn_cascade_ms", "attn_flat_ms",
            "weight_mib", "kv_unique_mib", "kv_flat_mib", "tokens_per_s_graph"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
