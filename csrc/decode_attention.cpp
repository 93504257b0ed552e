// Paged decode attention on CPU: one new query token per sequence attends to that sequence's
// keys/values read in place from the block pool through its block table. Nothing is gathered.
//
// Layout: q [B, Hq, D]; k_pool, v_pool [num_blocks, block_size, Hkv, D];
// block_tables [B, max_blocks] int32; context_lens [B] int32 (tokens to attend, incl. the new one).
// Softmax is online per block in fp32 (max, sum, rescaled accumulator), whatever the input dtype.
//
// The workload is a decode step of a G->V->R tree: many rows (branches) fork from one sequence,
// and a fork shares its parent's full blocks, i.e. the same block id at the same table position.
// With `shared` (the default) such a block is read once for all the rows that hold it: per kv
// head, its scores are a small [rows * group, D] x [D, tokens] product whose K rows stay in L1
// while every query row of the run uses them, and each (row, query head) keeps its own
// online-softmax state (max, sum, accumulator), updated block by block. The order in which a
// row's blocks are summed changes, the result does not (up to rounding). A block read by one
// row is the same computation with that row's `group` query heads. Which rows share is found
// from the tables on every call (rows sorted by their tables, then runs of neighbours with the
// same block id and token count at a position), so any tables are correct, whatever they share;
// `shared=false` treats every row on its own (each row reads its whole context, row after row),
// kept to measure the difference (benchmarks/cpu_decode_attention.py).
//
// Arithmetic: K rows are dotted with query rows in register tiles (3 query rows x 4 tokens,
// vectorised along D), exp is a vectorised polynomial (Cephes expf, ~1 ulp), and P.V runs in
// tiles of 3 query rows x 32 dims; AVX2+FMA when the CPU has them and D % 8 == 0 (chosen at
// run time, cpu_isa.h), plain loops otherwise. The FLOPs are those of the per-row kernel (every (row, head) still
// scores every token it attends); what sharing saves is memory traffic and per-block overhead,
// what the tiles save is instructions per FMA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// rows [i0, i1) of a chunk attend the n tokens of `block`
struct BlockRun {
  int64_t i0, i1, block, n;
};

// Software prefetch of the K/V rows of the runs to come. The blocks are scattered in the pool
// and most of a tree's bytes are in blocks read by one row (little compute per byte), while a
// shared block is much compute per byte; so the next runs' lines are requested a few at a time
// from inside the compute loops (a burst would fill the miss queue and stall the core), up to
// `limit` bytes ahead of the run being computed.
struct Prefetcher {
  const char* k = nullptr;  // pool bytes at the item's first head
  const char* v = nullptr;
  int64_t block_bytes = 0, token_bytes = 0;
  int64_t row_lines = 0;  // cache lines of K (or V) per token of the item's heads
  const BlockRun* runs = nullptr;
  const int64_t* start = nullptr;  // start[x]: cursor position (lines) where run x begins
  int64_t nruns = 0, limit = 0, per_call = 0;
  // cursor: line w (K lines, then V lines) of token t of run x; pos counts lines from the
  // item's first run; lines below stop are issued
  int64_t x = 0, t = 0, w = 0, pos = 0, stop = 0;

  void reset() { x = t = w = pos = 0; }
  // run `cur` is about to be computed: prefetch from the run after it, up to limit lines ahead
  void begin(int64_t cur) {
    if (pos < start[cur + 1]) {
      x = cur + 1;
      t = w = 0;
      pos = start[cur + 1];
    }
    stop = start[cur + 1] + limit;
  }
  void issue() {
    const int64_t end = std::min(stop, pos + per_call);
    for (; pos < end && x < nruns; ++pos) {
      const BlockRun& r = runs[x];
      const char* base = (w < row_lines ? k + w * 64 : v + (w - row_lines) * 64);
      __builtin_prefetch(base + r.block * block_bytes + t * token_bytes);
      if (++w == 2 * row_lines) {
        w = 0;
        if (++t == r.n) {
          t = 0;
          ++x;
        }
      }
    }
  }
};

// One run: M query rows (q, acc: M x D, row stride D; m, l, corr, bmax: M; s: M x sp scores)
// attend n tokens of one block (k, v: n rows of D, row strides ks, vs).
struct Run {
  const float* q;
  float* acc;
  float* m;
  float* l;
  float* corr;
  float* bmax;
  float* s;
  int64_t M, D, sp;
  const float* k;
  int64_t ks;
  const float* v;
  int64_t vs;
  int64_t n;
  Prefetcher* pf;
};

// ---------------------------------------------------------------- plain loops (any D, any CPU)
void run_scalar(const Run& r) {
  const int64_t D = r.D;
  for (int64_t i = 0; i < r.M; ++i) {
    r.pf->issue();
    const float* qi = r.q + i * D;
    float* si = r.s + i * r.sp;
    float bmax = r.m[i];
    for (int64_t t = 0; t < r.n; ++t) {
      const float* kt = r.k + t * r.ks;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qi[d] * kt[d];
      si[t] = dot;
      bmax = std::max(bmax, dot);
    }
    const float corr = std::exp(r.m[i] - bmax);  // exp(-inf) = 0 on a row's first block
    r.m[i] = bmax;
    float sum = 0.f;
    for (int64_t t = 0; t < r.n; ++t) sum += (si[t] = std::exp(si[t] - bmax));
    r.l[i] = r.l[i] * corr + sum;
    float* ai = r.acc + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ai[d] *= corr;
    for (int64_t t = 0; t < r.n; ++t) {
      const float p = si[t];
      const float* vt = r.v + t * r.vs;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ai[d] += p * vt[d];
    }
  }
}

#ifdef MALT_X86
// ---------------------------------------------------------------- AVX2 + FMA, D % 8 == 0
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// the tiles' constant-bound loops, unrolled so that their __m256 arrays live in registers (without
// it GCC keeps them on the stack and stores every accumulator on every token)
#define UNROLL _Pragma("GCC unroll 8")

// Loads that feed several FMAs: without this, GCC folds the load into each FMA (a memory
// operand), which reloads it once per query row and makes the tiles load-port bound.
inline void keep_in_register(__m256& x) { asm("" : "+x"(x)); }

inline float hsum(__m256 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline float hmax(__m256 a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// the four sums of a, b, c, d in one vector
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// s[i][t] = q_i . k_t for R query rows x T tokens (T = 4 or 1): each K load feeds R rows,
// each Q load T tokens
template <int R, int T>
inline void qk_tile(const float* q, int64_t D, const float* k, int64_t ks, float* s, int64_t sp) {
  __m256 a[R][T];
  UNROLL for (int i = 0; i < R; ++i)
    UNROLL for (int t = 0; t < T; ++t) a[i][t] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 kv[T];
    UNROLL for (int t = 0; t < T; ++t) {
      kv[t] = _mm256_loadu_ps(k + t * ks + d);
      keep_in_register(kv[t]);
    }
    UNROLL for (int i = 0; i < R; ++i) {
      __m256 qv = _mm256_loadu_ps(q + i * D + d);
      // (with T = 4 there is no register left for qv: GCC reads it in each FMA)
      UNROLL for (int t = 0; t < T; ++t) a[i][t] = _mm256_fmadd_ps(qv, kv[t], a[i][t]);
    }
  }
  UNROLL for (int i = 0; i < R; ++i) {
    if constexpr (T == 4) {
      _mm_storeu_ps(s + i * sp, hsum4(a[i][0], a[i][1], a[i][2], a[i][3]));
    } else {
      UNROLL for (int t = 0; t < T; ++t) s[i * sp + t] = hsum(a[i][t]);
    }
  }
}

template <int R>
inline void qk_rows(const float* q, int64_t D, const float* k, int64_t ks, int64_t n, float* s,
                    int64_t sp) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) qk_tile<R, 4>(q, D, k + t * ks, ks, s + t, sp);
  for (; t < n; ++t) qk_tile<R, 1>(q, D, k + t * ks, ks, s + t, sp);
}

// acc_i = acc_i * corr_i + sum_t p_i[t] v_t for R query rows, C vectors of 8 dims at a time:
// the accumulators stay in registers over the block's tokens
template <int R, int C>
inline void pv_tile(const float* p, int64_t sp, int64_t n, const float* v, int64_t vs,
                    float* acc, int64_t D, const float* corr) {
  __m256 a[R][C];
  UNROLL for (int i = 0; i < R; ++i) {
    const __m256 c = _mm256_set1_ps(corr[i]);
    UNROLL for (int j = 0; j < C; ++j) {
      a[i][j] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + 8 * j), c);
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    __m256 pb[R];
    UNROLL for (int i = 0; i < R; ++i) pb[i] = _mm256_broadcast_ss(p + i * sp + t);
    UNROLL for (int j = 0; j < C; ++j) {
      __m256 vv = _mm256_loadu_ps(v + t * vs + 8 * j);
      keep_in_register(vv);
      UNROLL for (int i = 0; i < R; ++i) a[i][j] = _mm256_fmadd_ps(pb[i], vv, a[i][j]);
    }
  }
  UNROLL for (int i = 0; i < R; ++i)
    UNROLL for (int j = 0; j < C; ++j) _mm256_storeu_ps(acc + i * D + 8 * j, a[i][j]);
}

template <int R>
inline void pv_rows(const float* p, int64_t sp, int64_t n, const float* v, int64_t vs,
                    float* acc, int64_t D, const float* corr) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) pv_tile<R, 4>(p, sp, n, v + d, vs, acc + d, D, corr);
  switch ((D - d) / 8) {
    case 3: pv_tile<R, 3>(p, sp, n, v + d, vs, acc + d, D, corr); break;
    case 2: pv_tile<R, 2>(p, sp, n, v + d, vs, acc + d, D, corr); break;
    case 1: pv_tile<R, 1>(p, sp, n, v + d, vs, acc + d, D, corr); break;
    default: break;
  }
}

void run_avx2(const Run& r) {
  const int64_t M = r.M, D = r.D, sp = r.sp, n = r.n;
  // scores, 3 query rows at a time (a GQA group of 3 is one tile)
  int64_t i = 0;
  for (; i + 3 <= M; i += 3) {
    qk_rows<3>(r.q + i * D, D, r.k, r.ks, n, r.s + i * sp, sp);
    r.pf->issue();
  }
  for (; i + 2 <= M; i += 2) qk_rows<2>(r.q + i * D, D, r.k, r.ks, n, r.s + i * sp, sp);
  for (; i < M; ++i) qk_rows<1>(r.q + i * D, D, r.k, r.ks, n, r.s + i * sp, sp);
  // pad each row's scores to sp (a multiple of 8) with -inf: they come out of exp as 0
  if (n < sp)
    for (int64_t i = 0; i < M; ++i) std::fill(r.s + i * sp + n, r.s + (i + 1) * sp, kNegInf);
  for (int64_t i = 0; i < M; ++i) {
    __m256 mx = _mm256_loadu_ps(r.s + i * sp);
    for (int64_t t = 8; t < sp; t += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(r.s + i * sp + t));
    r.bmax[i] = std::max(r.m[i], hmax(mx));  // the row's new running max
  }
  // corr = exp(old max - new max), 8 rows at a time
  int64_t j = 0;
  for (; j + 8 <= M; j += 8) {
    const __m256 nm = _mm256_loadu_ps(r.bmax + j);
    _mm256_storeu_ps(r.corr + j, malt_isa::exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(r.m + j), nm)));
    _mm256_storeu_ps(r.m + j, nm);
  }
  if (j < M) {  // the last M % 8 rows, through a mask
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(M - j)), lanes);
    const __m256 nm = _mm256_maskload_ps(r.bmax + j, mask);
    const __m256 old = _mm256_maskload_ps(r.m + j, mask);
    _mm256_maskstore_ps(r.corr + j, mask, malt_isa::exp_nonpos8(_mm256_sub_ps(old, nm)));
    _mm256_maskstore_ps(r.m + j, mask, nm);
  }
  for (int64_t i = 0; i < M; ++i) {
    const __m256 mx = _mm256_set1_ps(r.m[i]);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < sp; t += 8) {
      const __m256 p = malt_isa::exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(r.s + i * sp + t), mx));
      _mm256_storeu_ps(r.s + i * sp + t, p);
      sum = _mm256_add_ps(sum, p);
    }
    r.l[i] = r.l[i] * r.corr[i] + hsum(sum);
  }
  i = 0;
  for (; i + 3 <= M; i += 3) {
    pv_rows<3>(r.s + i * sp, sp, n, r.v, r.vs, r.acc + i * D, D, r.corr + i);
    r.pf->issue();
  }
  for (; i + 2 <= M; i += 2)
    pv_rows<2>(r.s + i * sp, sp, n, r.v, r.vs, r.acc + i * D, D, r.corr + i);
  for (; i < M; ++i) pv_rows<1>(r.s + i * sp, sp, n, r.v, r.vs, r.acc + i * D, D, r.corr + i);
}
#pragma GCC pop_options
#endif

inline void run_block(const Run& r) {
#ifdef MALT_X86
  if (r.D % 8 == 0 && malt_isa::avx2_fma()) return run_avx2(r);
#endif
  run_scalar(r);
}

template <typename scalar_t>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           double scale, bool shared, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_pool.size(1), Hkv = k_pool.size(2);
  const int64_t group = Hq / Hkv, width = block_tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_pool.data_ptr<scalar_t>();
  const scalar_t* vp = v_pool.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t token_stride = Hkv * D;  // between consecutive tokens of one block
  const int64_t sp = (bs + 7) / 8 * 8;    // score row stride

  std::vector<int64_t> nblocks(B);
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = std::max<int32_t>(lens[b], 0);
    nblocks[b] = (len + bs - 1) / bs;
    work += len;
    TORCH_CHECK(nblocks[b] <= width, "paged_decode_attention: context_lens[", b, "] = ", len,
                " needs more blocks than block_tables has columns (", width, ")");
    for (int64_t j = 0; j < nblocks[b]; ++j) {
      const int32_t id = tables[b * width + j];
      TORCH_CHECK(id >= 0 && id < k_pool.size(0), "paged_decode_attention: block id ", id,
                  " out of range");
    }
  }
  // rows in table order: rows that share blocks become neighbours (a fork's rows share a table
  // prefix), so at each position a shared block is a run of consecutive rows
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  if (shared)
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      const int32_t* ta = tables + a * width;
      const int32_t* tb = tables + b * width;
      return std::lexicographical_compare(ta, ta + nblocks[a], tb, tb + nblocks[b]);
    });

  // query rows in fp32, scaled once: scores come out scaled
  std::vector<float> qf(B * Hq * D);
  const float fscale = static_cast<float>(scale);
  for (int64_t i = 0; i < B * Hq; ++i) {
    load_row(qp + i * D, qf.data() + i * D, D);
    for (int64_t d = 0; d < D; ++d) qf[i * D + d] *= fscale;
  }

  // Work items: a chunk of consecutive rows of `order` x a range of kv heads. Normally all the
  // heads (a block holds every head of a token in one contiguous piece of memory, read once)
  // and one chunk per thread, the chunks cutting `order` at equal shares of the tokens attended
  // (only the blocks shared across a cut are read twice). With fewer rows than threads, one item
  // per (row chunk, kv head) instead. Where the rows allow, the number of items is a multiple of
  // the thread count, so at::parallel_for's contiguous split gives every thread the same share.
  // A small step costs less than waking the thread pool: it runs on the calling thread.
  const bool small = work * Hq * D < (1 << 18);
  const int64_t threads = small ? 1 : at::get_num_threads();
  const int64_t hsplit = B >= threads ? 1 : Hkv;  // head ranges per chunk
  const int64_t hper = Hkv / hsplit;
  const int64_t chunks = std::max<int64_t>(1, std::min(B, threads / std::gcd(threads, hsplit)));
  std::vector<int64_t> bounds(chunks + 1, B);
  bounds[0] = 0;
  {
    int64_t c = 1, acc = 0;
    for (int64_t i = 0; i < B && c < chunks; ++i) {
      acc += std::max<int32_t>(lens[order[i]], 0);
      // the row that reaches the chunk's share of the work ends the chunk
      while (c < chunks && acc * chunks >= work * c) bounds[c++] = i + 1;
    }
  }
  // The runs of each chunk, in the order they are done (the same for every kv head): rows
  // [i0, i1) of the chunk (indices into `order`) attend the n tokens of `block`.
  auto tokens = [&](int64_t b, int64_t j) { return std::min<int64_t>(bs, lens[b] - j * bs); };
  std::vector<std::vector<BlockRun>> runs(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = bounds[c], nr = bounds[c + 1] - r0;
    auto& out_runs = runs[c];
    if (shared) {
      // position by position; at each, neighbours with the same block id and token count form
      // one run, which reads the block once
      int64_t max_nb = 0;
      for (int64_t i = 0; i < nr; ++i) max_nb = std::max(max_nb, nblocks[order[r0 + i]]);
      for (int64_t j = 0; j < max_nb; ++j) {
        for (int64_t i = 0; i < nr;) {
          const int64_t b = order[r0 + i];
          if (nblocks[b] <= j) {
            ++i;
            continue;
          }
          const int32_t block = tables[b * width + j];
          const int64_t n = tokens(b, j);
          int64_t e = i + 1;
          while (e < nr) {
            const int64_t be = order[r0 + e];
            if (nblocks[be] <= j || tables[be * width + j] != block || tokens(be, j) != n) break;
            ++e;
          }
          out_runs.push_back({i, e, block, n});
          i = e;
        }
      }
    } else {
      // every row on its own, its whole context block by block
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t b = order[r0 + i];
        for (int64_t j = 0; j < nblocks[b]; ++j)
          out_runs.push_back({i, i + 1, tables[b * width + j], tokens(b, j)});
      }
    }
  }

  const int64_t items = chunks * hsplit;
  const int64_t grain = small ? items : std::max<int64_t>(1, items / threads);
  const int64_t row_bytes = hper * D * static_cast<int64_t>(sizeof(scalar_t));
  // prefetch: 16 lines per call from the compute loops (one call per 3 query rows' scores or
  // P.V of a block), at most 96 KiB ahead (a third of L2; measured on a 2-core EPYC: 16 lines
  // beat 8 and 0, 32 lines and 48-256 KiB were no different)
  constexpr int64_t pf_lines = 16, pf_kb = 96;

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qloc, acc, m, l, corr, bmax, s, kbuf, vbuf;
    std::vector<int64_t> pf_start;
    Prefetcher pf;
    pf.block_bytes = bs * token_stride * static_cast<int64_t>(sizeof(scalar_t));
    pf.token_bytes = token_stride * static_cast<int64_t>(sizeof(scalar_t));
    pf.row_lines = (row_bytes + 63) / 64;
    pf.limit = pf_kb * 1024 / 64;
    pf.per_call = pf_lines;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / hsplit, h0 = item % hsplit * hper;
      const int64_t r0 = bounds[c], nr = bounds[c + 1] - r0;
      if (nr == 0) continue;
      // per-item state, head-major: [head - h0][row][g], so a run's query rows of one head are
      // contiguous
      const int64_t rows_q = hper * nr * group;
      qloc.resize(rows_q * D);
      acc.assign(rows_q * D, 0.f);
      m.assign(rows_q, kNegInf);
      l.assign(rows_q, 0.f);
      corr.resize(rows_q);
      bmax.resize(rows_q);
      s.resize(rows_q * sp);
      if (!std::is_same<scalar_t, float>::value) {
        kbuf.resize(bs * D);
        vbuf.resize(bs * D);
      }
      for (int64_t hh = 0; hh < hper; ++hh)
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t b = order[r0 + i];
          std::copy_n(qf.data() + (b * Hq + (h0 + hh) * group) * D, group * D,
                      qloc.data() + (hh * nr + i) * group * D);
        }
      const auto& item_runs = runs[c];
      pf_start.resize(item_runs.size() + 2);
      pf_start[0] = 0;
      for (size_t x = 0; x < item_runs.size(); ++x)
        pf_start[x + 1] = pf_start[x] + 2 * item_runs[x].n * pf.row_lines;
      pf_start[item_runs.size() + 1] = pf_start[item_runs.size()];
      pf.runs = item_runs.data();
      pf.start = pf_start.data();
      pf.nruns = static_cast<int64_t>(item_runs.size());
      pf.reset();
      pf.k = reinterpret_cast<const char*>(kp + h0 * D);
      pf.v = reinterpret_cast<const char*>(vp + h0 * D);
      for (size_t x = 0; x < item_runs.size(); ++x) {
        const BlockRun& br = item_runs[x];
        pf.begin(static_cast<int64_t>(x));
        pf.issue();
        for (int64_t hh = 0; hh < hper; ++hh) {
          const int64_t h = h0 + hh;
          const scalar_t* kb = kp + br.block * bs * token_stride + h * D;
          const scalar_t* vb = vp + br.block * bs * token_stride + h * D;
          Run r;
          const int64_t o = (hh * nr + br.i0) * group;
          r.q = qloc.data() + o * D;
          r.acc = acc.data() + o * D;
          r.m = m.data() + o;
          r.l = l.data() + o;
          r.corr = corr.data() + o;
          r.bmax = bmax.data() + o;
          r.s = s.data() + o * sp;
          r.M = (br.i1 - br.i0) * group;
          r.D = D;
          r.sp = sp;
          r.n = br.n;
          r.pf = &pf;
          if constexpr (std::is_same<scalar_t, float>::value) {
            r.k = kb;  // fp32: read the pool in place
            r.v = vb;
            r.ks = r.vs = token_stride;
          } else {  // convert the block's rows for this head once for all the run's rows
            for (int64_t t = 0; t < br.n; ++t) {
              load_row(kb + t * token_stride, kbuf.data() + t * D, D);
              load_row(vb + t * token_stride, vbuf.data() + t * D, D);
            }
            r.k = kbuf.data();
            r.v = vbuf.data();
            r.ks = r.vs = D;
          }
          run_block(r);
        }
      }
      for (int64_t hh = 0; hh < hper; ++hh)
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t b = order[r0 + i];
          for (int64_t g = 0; g < group; ++g) {
            const int64_t x = (hh * nr + i) * group + g;
            // a row with nothing to attend (len 0) returns zeros
            const float inv = l[x] > 0.f ? 1.f / l[x] : 0.f;
            scalar_t* o = op + (b * Hq + (h0 + hh) * group + g) * D;
            const float* a = acc.data() + x * D;
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
          }
        }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool,
                                  const at::Tensor& v_pool, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale, bool shared) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4,
              "paged_decode_attention: q [B,Hq,D], pools [blocks,block_size,Hkv,D]");
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes(), "paged_decode_attention: k/v pool shapes differ");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(),
              "paged_decode_attention: q and pools must share a dtype");
  TORCH_CHECK(q.size(2) == k_pool.size(3), "paged_decode_attention: head_dim mismatch");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0,
              "paged_decode_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && context_lens.dim() == 1,
              "paged_decode_attention: block_tables [B, max_blocks], context_lens [B]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode_attention: block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "paged_decode_attention: batch mismatch");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(),
              "paged_decode_attention: pools must be contiguous (they are read in place)");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "paged_decode_attention", [&] {
    decode_attention_impl<scalar_t>(qc, k_pool, v_pool, tables, lens, scale, shared, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malt_fast, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor context_lens, float scale, bool shared=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(malt_fast, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
