// Fused linear log-prob on CPU: log p(y) = h.W[y] - logsumexp(h.W^T) without the [N x V] logits.
//
// Tokens whose target is ignore_index are dropped first (prompt tokens are most of a DPO batch).
// The work is tiled [chunk_n tokens x chunk_v vocab]; the vocab loop is outer so each weight chunk is
// prepared once and its grad_weight rows are finished (fp32) before moving on. Logit tiles are
// always fp32 (a bf16-rounded logit moves the LSE by up to ~0.05), and so is the softmax work.
//
// Two GEMM paths:
// * bf16 inputs on a CPU with AVX512-BF16 (malt_isa::avx512_bf16): bf16 x bf16 -> fp32 on our own
//   vdpbf16ps micro-kernel (bf16_gemm.h); its GEMMs are ~4.5x the fp32 ones on a Zen 5 EPYC, the
//   whole op ~3x (docs/logprob.md). Each weight
//   chunk is packed twice (pairs along H for the logits, pairs along V for grad_hidden), the hidden
//   rows once per token chunk for grad_weight. dlogits is rounded to bf16 before its two GEMMs,
//   as eager bf16 autograd rounds it; grad_hidden and the chunk's grad_weight accumulate in fp32.
// * otherwise (fp32 or fp16 inputs, no AVX512-BF16, MALT_FAST_ISA capped): tiles converted to fp32
//   and at::mm / addmm_ (MKL).
// Extra memory: one fp32 tile, the weight chunk in fp32 or packed bf16 twice (+ its fp32 grad), the
// hidden rows (fp32 only when they fit `kHiddenBudgetBytes`, else converted per token chunk; bf16
// always, with one packed copy) and an fp32 grad_hidden.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "bf16_gemm.h"
#include "cpu_isa.h"

namespace {

// The per-tile softmax work is ~100M exp() calls per forward at benchmark sizes; scalar expf would
// cost as much as the GEMMs, and libmvec cannot be linked from here, hence vector exps: AVX-512
// or AVX2 (whichever the CPU has, chosen once at run time), plain loops otherwise.
struct RowOps {
  float (*max)(const float* r, int64_t n);
  float (*sum_exp)(const float* r, int64_t n, float shift);          // sum_j exp(r[j] - shift)
  void (*scaled_exp)(float* r, int64_t n, float shift, float scale);  // r[j] <- scale e^(r-shift)
};

float max_plain(const float* r, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = r[j] > m ? r[j] : m;
  return m;
}
float sum_exp_plain(const float* r, int64_t n, float shift) {
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += std::exp(r[j] - shift);
  return s;
}
void scaled_exp_plain(float* r, int64_t n, float shift, float scale) {
  for (int64_t j = 0; j < n; ++j) r[j] = scale * std::exp(r[j] - shift);
}

#ifdef MALT_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
inline __m512 exp16(__m512 x) {
  // e^x = 2^n * e^r, n = round(x / ln2), |r| <= ln2/2; degree-7 Taylor for e^r (rel. err ~5e-9
  // before fp32 rounding). Clamping at -104 sends -inf (masked columns) to an exact 0 via scalef.
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

float max_avx512(const float* r, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(n - j), r + j));
  return _mm512_reduce_max_ps(m);
}

float sum_exp_avx512(const float* r, int64_t n, float shift) {
  __m512 s = _mm512_setzero_ps();
  const __m512 c = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    s = _mm512_mask_add_ps(s, k, s, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, r + j), c)));
  }
  return _mm512_reduce_add_ps(s);
}

void scaled_exp_avx512(float* r, int64_t n, float shift, float scale) {
  const __m512 c = _mm512_set1_ps(shift), a = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(k, r + j);
    _mm512_mask_storeu_ps(r + j, k, _mm512_mul_ps(a, exp16(_mm512_sub_ps(v, c))));
  }
}
#pragma GCC pop_options

// AVX2: the arguments of exp are never positive here (a row minus its max, or minus its LSE)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
float max_avx2(const float* r, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(r + j));
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  float out = _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  for (; j < n; ++j) out = r[j] > out ? r[j] : out;
  return out;
}

float sum_exp_avx2(const float* r, int64_t n, float shift) {
  __m256 s = _mm256_setzero_ps();
  const __m256 c = _mm256_set1_ps(shift);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    s = _mm256_add_ps(s, malt_isa::exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(r + j), c)));
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  float out = _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  for (; j < n; ++j) out += std::exp(r[j] - shift);
  return out;
}

void scaled_exp_avx2(float* r, int64_t n, float shift, float scale) {
  const __m256 c = _mm256_set1_ps(shift), a = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(r + j, _mm256_mul_ps(a, malt_isa::exp_nonpos8(
                                                 _mm256_sub_ps(_mm256_loadu_ps(r + j), c))));
  for (; j < n; ++j) r[j] = scale * std::exp(r[j] - shift);
}
#pragma GCC pop_options
#endif

const RowOps& row_ops() {
  static const RowOps ops = [] {
#ifdef MALT_X86
    if (malt_isa::avx512f()) return RowOps{max_avx512, sum_exp_avx512, scaled_exp_avx512};
    if (malt_isa::avx2_fma()) return RowOps{max_avx2, sum_exp_avx2, scaled_exp_avx2};
#endif
    return RowOps{max_plain, sum_exp_plain, scaled_exp_plain};
  }();
  return ops;
}

constexpr int64_t kHiddenBudgetBytes = 64ll << 20;

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && targets.dim() == 1,
              "linear_logprob: expected hidden [N, H], weight [V, H], targets [N]");
  TORCH_CHECK(hidden.size(1) == weight.size(1) && hidden.size(0) == targets.size(0),
              "linear_logprob: shapes do not match");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(),
              "linear_logprob: hidden and weight dtypes differ");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "linear_logprob: targets must be int64");
}

// fp32 copy of the valid token rows [n0, n0 + n) (a view when already fp32 and nothing is dropped)
at::Tensor rows_f32(const at::Tensor& hidden, const at::Tensor& idx, bool all_valid, int64_t n0,
                    int64_t n) {
  if (all_valid) return hidden.narrow(0, n0, n).to(at::kFloat).contiguous();
  return hidden.index_select(0, idx.narrow(0, n0, n)).to(at::kFloat);
}

struct Valid {
  at::Tensor idx;  // positions of valid tokens
  at::Tensor y;    // their targets
  bool all;
};

Valid valid_tokens(const at::Tensor& targets, int64_t ignore_index, int64_t V) {
  auto mask = targets.ne(ignore_index);
  auto idx = mask.nonzero().squeeze(1);
  auto y = targets.index_select(0, idx);
  if (y.numel() > 0) {
    auto lo = y.min().item<int64_t>(), hi = y.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "linear_logprob: target ", lo < 0 ? lo : hi,
                " outside the vocabulary [0, ", V, ") and not ignore_index ", ignore_index);
  }
  return {idx, y.contiguous(), idx.size(0) == targets.size(0)};
}

// lse_c = logaddexp(lse_c, logsumexp(z, 1)) and tgt_c += z[i, y_i - v0] for targets in the chunk,
// in one pass over each row.
void absorb_tile(const at::Tensor& z, float* lse, float* tgt, const int64_t* y, int64_t v0) {
  const int64_t rows = z.size(0), cols = z.size(1), ld = z.stride(0);
  const float* zp = z.data_ptr<float>();
  const RowOps& ops = row_ops();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* r = zp + i * ld;
      const float m = ops.max(r, cols);
      const float tile = m + std::log(ops.sum_exp(r, cols, m));
      const float hi = std::max(lse[i], tile), lo = std::min(lse[i], tile);
      lse[i] = hi + std::log1p(std::exp(lo - hi));  // lo = -inf on the first tile: exp -> 0
      const int64_t local = y[i] - v0;
      if (local >= 0 && local < cols) tgt[i] += r[local];
    }
  });
}

// one row of logits r[0, cols) (vocab v0...) <- g * (onehot(y) - exp(r - lse)) in place
inline void dlogits_row(const RowOps& ops, float* r, int64_t cols, float lse, float g, int64_t y,
                        int64_t v0) {
  ops.scaled_exp(r, cols, lse, -g);
  const int64_t local = y - v0;
  if (local >= 0 && local < cols) r[local] += g;
}

void dlogits_tile(at::Tensor& z, const float* lse, const float* g, const int64_t* y, int64_t v0) {
  const int64_t rows = z.size(0), cols = z.size(1), ld = z.stride(0);
  float* zp = z.data_ptr<float>();
  const RowOps& ops = row_ops();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dlogits_row(ops, zp + i * ld, cols, lse[i], g[i], y[i], v0);
  });
}

// ---- bf16 GEMM path ----

bool bf16_gemms(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kBFloat16 && malt_isa::avx512_bf16();
}

const uint32_t* words(const at::Tensor& t) {
  return reinterpret_cast<const uint32_t*>(t.data_ptr());
}

// Room for fp32 [rows, cols] tiles whose row stride is not a power of two: with 4096 columns every
// row of the GEMM's register tile would fall into the same L1 set (measured: 20% slower GEMMs).
// One buffer per call, not one per tile: a fresh 8 MiB tile is 2048 page faults whenever the
// allocator hands big blocks back to the OS (glibc with a fixed mmap threshold).
at::Tensor tile_buffer(int64_t rows, int64_t cols) {
  const int64_t ld = (cols + 255) / 256 * 256 + 16;
  return at::empty({rows, ld}, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor tile(at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows).narrow(1, 0, cols);
}

// The valid hidden rows in bf16, padded with a zero column to an even width (the GEMM reads A in
// pairs along H); the input itself when nothing is dropped and H is even.
at::Tensor rows_bf16_even(const at::Tensor& hidden, const Valid& vt) {
  auto rows = vt.all ? hidden : hidden.index_select(0, vt.idx);
  if (hidden.size(1) % 2) rows = at::constant_pad_nd(rows, {0, 1});
  return rows.contiguous();
}

// Logits z (fp32 [nc, vc]) -> dlogits, rounded to bf16 twice: as rows [nc, ld_rows] (A of
// grad_h = dz . W, pairs along V; a zero in column vc when vc is odd), and as A of
// grad_w = dz^T . h (rows = vocab, pairs = tokens 2q and 2q+1, a zero partner for an odd last
// token) in the micro-kernel's own order: read in place, that A would be walked down its columns,
// a cache line per pair. Two rows at a time, so the fp32 dlogits are rounded while still in L1.
#ifdef MALT_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dlogits_bf16(
    at::Tensor& z, const float* lse, const float* g, const int64_t* y, int64_t v0,
    at::BFloat16* rows, int64_t ld_rows, uint32_t* grouped) {
  constexpr int64_t G = malt_bf16::kRowGroup;
  const int64_t nc = z.size(0), vc = z.size(1), ld = z.stride(0), k2 = (nc + 1) / 2;
  float* zp = z.data_ptr<float>();
  const RowOps& ops = row_ops();
  at::parallel_for(0, k2, 8, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      float* z0 = zp + 2 * q * ld;
      const bool has_odd = 2 * q + 1 < nc;
      dlogits_row(ops, z0, vc, lse[2 * q], g[2 * q], y[2 * q], v0);
      if (has_odd) dlogits_row(ops, z0 + ld, vc, lse[2 * q + 1], g[2 * q + 1], y[2 * q + 1], v0);
      at::BFloat16* o0 = rows + 2 * q * ld_rows;
      at::BFloat16* o1 = o0 + ld_rows;
      for (int64_t v = 0; v < vc; v += G) {
        const __mmask16 k = static_cast<__mmask16>((1u << std::min(G, vc - v)) - 1);
        // away from the row's end, whole 16-wide loads and stores (the 4 extra columns are
        // rewritten by the next step) instead of masked ones
        const __mmask16 k16 = v + 16 <= vc ? __mmask16(0xFFFF) : k;
        const __m256i b0 = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k16, z0 + v));
        const __m256i b1 = has_odd
            ? (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k16, z0 + ld + v))
            : _mm256_setzero_si256();
        _mm256_mask_storeu_epi16(o0 + v, k16, b0);
        if (has_odd) _mm256_mask_storeu_epi16(o1 + v, k16, b1);
        const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(b0),
                                          _mm512_slli_epi32(_mm512_cvtepu16_epi32(b1), 16));
        _mm512_mask_storeu_epi32(grouped + (v / G) * k2 * G + q * G, k, w);
      }
      if (vc % 2) {
        o0[vc] = at::BFloat16(0.f);
        if (has_odd) o1[vc] = at::BFloat16(0.f);
      }
    }
  });
}
#pragma GCC pop_options
#endif

void forward_bf16(const at::Tensor& hidden, const at::Tensor& weight, const Valid& vt,
                  int64_t chunk_n, int64_t chunk_v, float* lse, float* tgt) {
#ifdef MALT_X86
  const int64_t Nv = vt.idx.size(0), V = weight.size(0), H = hidden.size(1);
  auto h = rows_bf16_even(hidden, vt);
  const int64_t h_words = h.size(1) / 2;
  const auto* w = weight.data_ptr<at::BFloat16>();
  const int64_t* y = vt.y.data_ptr<int64_t>();
  auto z_buffer = tile_buffer(std::min(chunk_n, Nv), std::min(chunk_v, V));
  at::Tensor w_buffer;  // the first chunk's, the largest
  for (int64_t v0 = 0; v0 < V; v0 += chunk_v) {
    const int64_t vc = std::min(chunk_v, V - v0);
    auto w_packed = malt_bf16::pack_col_pairs(w + v0 * H, H, H, vc, w_buffer);
    if (!w_buffer.defined()) w_buffer = w_packed;
    const auto panels = malt_bf16::panels_of(w_packed, vc);
    for (int64_t n0 = 0; n0 < Nv; n0 += chunk_n) {
      const int64_t nc = std::min(chunk_n, Nv - n0);
      auto z = tile(z_buffer, nc, vc);
      malt_bf16::gemm(malt_bf16::row_major(words(h) + n0 * h_words, h_words), nc, panels,
                      z.data_ptr<float>(), z.stride(0), false);
      absorb_tile(z, lse + n0, tgt + n0, y + n0, v0);
    }
  }
#endif
}

// gh: fp32 [Nv, H] zeros (or undefined: not needed); grad_w: [V, H] output (or undefined)
void backward_bf16(const at::Tensor& hidden, const at::Tensor& weight, const Valid& vt,
                   const float* lse, const float* g, at::Tensor& gh, at::Tensor& grad_w,
                   int64_t chunk_n, int64_t chunk_v) {
#ifdef MALT_X86
  const int64_t Nv = vt.idx.size(0), V = weight.size(0), H = hidden.size(1);
  const bool need_h = gh.defined(), need_w = grad_w.defined();
  auto fopt = hidden.options().dtype(at::kFloat);
  auto h = rows_bf16_even(hidden, vt);
  const int64_t h_words = h.size(1) / 2;
  const auto* w = weight.data_ptr<at::BFloat16>();
  const int64_t* y = vt.y.data_ptr<int64_t>();
  // grad_w's right-hand side, pairs of tokens within each token chunk, packed once for all chunks
  std::vector<at::Tensor> h_packed;
  if (need_w)
    for (int64_t n0 = 0; n0 < Nv; n0 += chunk_n)
      h_packed.push_back(malt_bf16::pack_row_pairs(h.data_ptr<at::BFloat16>() + n0 * 2 * h_words,
                                                   2 * h_words, std::min(chunk_n, Nv - n0), H));
  const int64_t cn = std::min(chunk_n, Nv), cv = std::min(chunk_v, V);
  constexpr int64_t G = malt_bf16::kRowGroup;
  const int64_t ld_rows = cv + cv % 2 + 32;  // not a power of two: see tile_buffer
  auto dz_rows = at::empty({cn, ld_rows}, hidden.options());
  auto dz_grouped =
      at::empty({(cv + G - 1) / G * G, (cn + 1) / 2}, hidden.options().dtype(at::kInt));
  auto* dz_words = reinterpret_cast<uint32_t*>(dz_grouped.data_ptr<int32_t>());
  auto z_buffer = tile_buffer(cn, cv);
  at::Tensor w_buffer, wv_buffer;  // the first chunk's, the largest
  at::Tensor gw_buffer = need_w ? at::empty({cv, H}, fopt) : at::Tensor();
  for (int64_t v0 = 0; v0 < V; v0 += chunk_v) {
    const int64_t vc = std::min(chunk_v, V - v0);
    auto w_packed = malt_bf16::pack_col_pairs(w + v0 * H, H, H, vc, w_buffer);
    if (!w_buffer.defined()) w_buffer = w_packed;
    const auto z_panels = malt_bf16::panels_of(w_packed, vc);
    at::Tensor wv_packed;
    if (need_h) {
      wv_packed = malt_bf16::pack_row_pairs(w + v0 * H, H, vc, H, wv_buffer);
      if (!wv_buffer.defined()) wv_buffer = wv_packed;
    }
    at::Tensor gw = need_w ? gw_buffer.narrow(0, 0, vc) : at::Tensor();
    for (int64_t n0 = 0, chunk = 0; n0 < Nv; n0 += chunk_n, ++chunk) {
      const int64_t nc = std::min(chunk_n, Nv - n0);
      auto z = tile(z_buffer, nc, vc);
      malt_bf16::gemm(malt_bf16::row_major(words(h) + n0 * h_words, h_words), nc, z_panels,
                      z.data_ptr<float>(), z.stride(0), false);
      dlogits_bf16(z, lse + n0, g + n0, y + n0, v0, dz_rows.data_ptr<at::BFloat16>(), ld_rows,
                   dz_words);
      if (need_h)
        malt_bf16::gemm(malt_bf16::row_major(words(dz_rows), ld_rows / 2), nc,
                        malt_bf16::panels_of(wv_packed, H), gh.data_ptr<float>() + n0 * H, H, true);
      if (need_w)
        malt_bf16::gemm({dz_words, 1, G, (nc + 1) / 2 * G}, vc,
                        malt_bf16::panels_of(h_packed[chunk], H), gw.data_ptr<float>(), H, n0 > 0);
    }
    if (need_w) grad_w.narrow(0, v0, vc).copy_(gw);
  }
#endif
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                           const at::Tensor& targets, int64_t ignore_index,
                                           int64_t chunk_n, int64_t chunk_v) {
  check_inputs(hidden_in, weight_in, targets);
  TORCH_CHECK(chunk_n > 0 && chunk_v > 0, "linear_logprob: chunk sizes must be positive");
  auto hidden = hidden_in.contiguous();
  auto weight = weight_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  auto fopt = hidden.options().dtype(at::kFloat);
  auto logp = at::zeros({N}, fopt);
  auto lse_all = at::zeros({N}, fopt);
  if (N == 0) return {logp, lse_all};
  auto vt = valid_tokens(targets, ignore_index, V);
  const int64_t Nv = vt.idx.size(0);
  if (Nv == 0) return {logp, lse_all};
  auto lse = at::full({Nv}, -std::numeric_limits<float>::infinity(), fopt);
  auto tgt = at::zeros({Nv}, fopt);
  if (bf16_gemms(hidden)) {
    forward_bf16(hidden, weight, vt, chunk_n, chunk_v, lse.data_ptr<float>(),
                 tgt.data_ptr<float>());
    logp.index_copy_(0, vt.idx, tgt - lse);
    lse_all.index_copy_(0, vt.idx, lse);
    return {logp, lse_all};
  }
  const bool keep_h = Nv * H * 4 <= kHiddenBudgetBytes;
  at::Tensor h_all = keep_h ? rows_f32(hidden, vt.idx, vt.all, 0, Nv) : at::Tensor();
  const int64_t* y = vt.y.data_ptr<int64_t>();
  for (int64_t v0 = 0; v0 < V; v0 += chunk_v) {
    const int64_t vc = std::min(chunk_v, V - v0);
    auto w = weight.narrow(0, v0, vc).to(at::kFloat);
    auto wt = w.t();
    for (int64_t n0 = 0; n0 < Nv; n0 += chunk_n) {
      const int64_t nc = std::min(chunk_n, Nv - n0);
      auto h = keep_h ? h_all.narrow(0, n0, nc) : rows_f32(hidden, vt.idx, vt.all, n0, nc);
      auto z = at::mm(h, wt);
      absorb_tile(z, lse.data_ptr<float>() + n0, tgt.data_ptr<float>() + n0, y + n0, v0);
    }
  }
  logp.index_copy_(0, vt.idx, tgt - lse);
  lse_all.index_copy_(0, vt.idx, lse);
  return {logp, lse_all};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& hidden_in,
                                            const at::Tensor& weight_in,
                                            const at::Tensor& targets, const at::Tensor& lse_all,
                                            const at::Tensor& grad_in, int64_t ignore_index,
                                            bool need_h, bool need_w, int64_t chunk_n,
                                            int64_t chunk_v) {
  check_inputs(hidden_in, weight_in, targets);
  auto hidden = hidden_in.contiguous();
  auto weight = weight_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  auto fopt = hidden.options().dtype(at::kFloat);
  auto grad_h = need_h ? at::zeros({N, H}, hidden.options()) : at::Tensor();
  auto grad_w = need_w ? at::zeros({V, H}, weight.options()) : at::Tensor();
  auto vt = valid_tokens(targets, ignore_index, V);
  const int64_t Nv = vt.idx.size(0);
  if (Nv == 0 || !(need_h || need_w)) return {grad_h, grad_w};
  auto lse = lse_all.index_select(0, vt.idx).contiguous();
  auto g = grad_in.to(at::kFloat).index_select(0, vt.idx).contiguous();
  auto gh = need_h ? at::zeros({Nv, H}, fopt) : at::Tensor();
  if (bf16_gemms(hidden)) {
    backward_bf16(hidden, weight, vt, lse.data_ptr<float>(), g.data_ptr<float>(), gh, grad_w,
                  chunk_n, chunk_v);
    if (need_h) grad_h.index_copy_(0, vt.idx, gh.to(hidden.scalar_type()));
    return {grad_h, grad_w};
  }
  const bool keep_h = Nv * H * 4 <= kHiddenBudgetBytes;
  at::Tensor h_all = keep_h ? rows_f32(hidden, vt.idx, vt.all, 0, Nv) : at::Tensor();
  const bool w_is_f32 = weight.scalar_type() == at::kFloat;
  const int64_t* y = vt.y.data_ptr<int64_t>();
  for (int64_t v0 = 0; v0 < V; v0 += chunk_v) {
    const int64_t vc = std::min(chunk_v, V - v0);
    auto w = weight.narrow(0, v0, vc).to(at::kFloat);
    // fp32 weights: accumulate straight into the output rows
    auto gw = !need_w ? at::Tensor() : w_is_f32 ? grad_w.narrow(0, v0, vc) : at::zeros({vc, H}, fopt);
    for (int64_t n0 = 0; n0 < Nv; n0 += chunk_n) {
      const int64_t nc = std::min(chunk_n, Nv - n0);
      auto h = keep_h ? h_all.narrow(0, n0, nc) : rows_f32(hidden, vt.idx, vt.all, n0, nc);
      auto z = at::mm(h, w.t());
      dlogits_tile(z, lse.data_ptr<float>() + n0, g.data_ptr<float>() + n0, y + n0, v0);
      if (need_h) gh.narrow(0, n0, nc).addmm_(z, w);
      if (need_w) gw.addmm_(z.t(), h);
    }
    if (need_w && !w_is_f32) grad_w.narrow(0, v0, vc).copy_(gw);
  }
  if (need_h) grad_h.index_copy_(0, vt.idx, gh.to(hidden.scalar_type()));
  return {grad_h, grad_w};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malt_fast, m) {
  m.def("linear_logprob_forward(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, "
        "int chunk_n, int chunk_v) -> (Tensor, Tensor)");
  m.def("linear_logprob_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, "
        "Tensor grad, int ignore_index, bool need_h, bool need_w, int chunk_n, int chunk_v) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(malt_fast, CPU, m) {
  m.impl("linear_logprob_forward", &forward);
  m.impl("linear_logprob_backward", &backward);
}
