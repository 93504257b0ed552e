// bf16 x bf16 -> fp32 GEMM on vdpbf16ps; layouts in bf16_gemm.h. Compiled for the x86-64 baseline
// like the rest of the extension: only the micro-kernel carries the AVX512-BF16 target, and it
// runs only where malt_isa::avx512_bf16() said yes.
#include "bf16_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "cpu_isa.h"

namespace malt_bf16 {
namespace {

inline uint32_t bits(const at::BFloat16& x) { return x.x; }

// Register tile: kRows rows x 32 columns = 2 kRows zmm accumulators, + 2 for the B panel row
// and one broadcast: 12 rows fill 27 of the 32 zmm registers and give 24 independent dot-product
// chains, enough to cover vdpbf16ps's latency at two issues a cycle.
constexpr int kRows = kRowGroup;
// Rows of A per task (a multiple of kRows, so tiles start on row groups): its [kMc x kc] words
// stay in L2 while the task's B panel slice is in L1
constexpr int64_t kMc = 192;
// Pairs of k per pass over a B panel: 256 x 32 words = 32 KiB, within a 48 KiB L1 with the A
// lines streaming past. H = 576 (288 pairs) runs in two passes of 144, the tokens of a 512-token
// chunk (grad_weight's reduction) in one, a 4096-vocab chunk (grad_hidden's) in eight; each pass
// after the first reloads the fp32 C tile.
constexpr int64_t kMaxKc = 256;

at::Tensor packed_buffer(int64_t k2, int64_t panels, const at::Tensor& reuse) {
  const int64_t n = panels * k2 * kPanel;
  if (reuse.defined() && reuse.is_contiguous() && reuse.numel() >= n)
    return reuse.view(-1).narrow(0, 0, n).view({panels, k2, kPanel});
  return at::empty({panels, k2, kPanel}, at::TensorOptions().dtype(at::kInt));
}

}  // namespace

at::Tensor pack_row_pairs(const at::BFloat16* src, int64_t ld, int64_t K, int64_t cols,
                          const at::Tensor& reuse) {
  const int64_t k2 = (K + 1) / 2, panels = (cols + kPanel - 1) / kPanel;
  auto out = packed_buffer(k2, panels, reuse);
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, panels * k2, 256, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t j = t / k2, p = t % k2, c0 = j * kPanel, n = std::min(kPanel, cols - c0);
      const at::BFloat16* r0 = src + 2 * p * ld + c0;
      const at::BFloat16* r1 = 2 * p + 1 < K ? r0 + ld : nullptr;
      uint32_t* w = o + t * kPanel;
      int64_t c = 0;
      if (r1 != nullptr)
        for (; c < n; ++c) w[c] = bits(r0[c]) | (bits(r1[c]) << 16);
      else
        for (; c < n; ++c) w[c] = bits(r0[c]);
      for (; c < kPanel; ++c) w[c] = 0;
    }
  });
  return out;
}

at::Tensor pack_col_pairs(const at::BFloat16* src, int64_t ld, int64_t K, int64_t cols,
                          const at::Tensor& reuse) {
  const int64_t k2 = (K + 1) / 2, panels = (cols + kPanel - 1) / kPanel, even = K / 2;
  auto out = packed_buffer(k2, panels, reuse);
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, panels * kPanel, 8, [&](int64_t b, int64_t e) {
    for (int64_t col = b; col < e; ++col) {
      uint32_t* w = o + (col / kPanel) * k2 * kPanel + col % kPanel;
      if (col >= cols) {  // the last panel's padding columns
        for (int64_t p = 0; p < k2; ++p) w[p * kPanel] = 0;
        continue;
      }
      const at::BFloat16* r = src + col * ld;
      for (int64_t p = 0; p < even; ++p) std::memcpy(w + p * kPanel, r + 2 * p, 4);
      if (K % 2) w[even * kPanel] = bits(r[K - 1]);  // its partner: 0
    }
  });
  return out;
}

Panels panels_of(const at::Tensor& packed, int64_t cols) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous());
  return {reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), packed.size(1), cols};
}

#ifdef MALT_X86
namespace {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16")

template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile(
    const uint32_t* a, int64_t a_row, int64_t a_pair, const uint32_t* b, int64_t kp, float* c,
    int64_t ldc, __mmask16 m0, __mmask16 m1, bool accumulate) {
  __m512 lo[R], hi[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    lo[r] = accumulate ? _mm512_maskz_loadu_ps(m0, c + r * ldc) : _mm512_setzero_ps();
    hi[r] = accumulate ? _mm512_maskz_loadu_ps(m1, c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * kPanel + 16);
    const uint32_t* ap = a + p * a_pair;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r * a_row]));
      lo[r] = _mm512_dpbf16_ps(lo[r], x, b0);
      hi[r] = _mm512_dpbf16_ps(hi[r], x, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, lo[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, hi[r]);
  }
}

using TileFn = void (*)(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*,
                        int64_t, __mmask16, __mmask16, bool);

template <int... Rs>
constexpr auto make_tiles(std::integer_sequence<int, Rs...>) {
  return std::array<TileFn, sizeof...(Rs)>{&tile<Rs + 1>...};
}

// tiles[r - 1] handles r rows (the last rows of a task)
const auto tiles = make_tiles(std::make_integer_sequence<int, kRows>{});

__attribute__((target("avx512f,avx512bw,avx512bf16"))) void gemm_avx512bf16(
    PairRows a, int64_t M, Panels b, float* c, int64_t ldc, bool accumulate) {
  const int64_t panels = (b.cols + kPanel - 1) / kPanel, mblocks = (M + kMc - 1) / kMc;
  const int64_t passes = std::max<int64_t>(1, (b.k2 + kMaxKc - 1) / kMaxKc);
  const int64_t kc = std::max<int64_t>(1, (b.k2 + passes - 1) / passes);
  // task = (row block, panel), row block major: a thread's consecutive tasks share A's rows
  at::parallel_for(0, mblocks * panels, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t mb = t / panels, j = t % panels;
      const int64_t m0 = mb * kMc, m1 = std::min(M, m0 + kMc), col0 = j * kPanel;
      const int64_t n = std::min(kPanel, b.cols - col0);
      const __mmask16 mask0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __mmask16 mask1 =
          n >= 32 ? 0xFFFF : n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1);
      const uint32_t* panel = b.data + j * b.k2 * kPanel;
      for (int64_t k0 = 0; k0 == 0 || k0 < b.k2; k0 += kc) {
        const int64_t kp = std::min(kc, b.k2 - k0);
        const bool acc = accumulate || k0 > 0;
        for (int64_t r0 = m0; r0 < m1; r0 += kRows) {
          const int64_t rows = std::min<int64_t>(kRows, m1 - r0);
          tiles[rows - 1](a.data + r0 / kRows * a.group + k0 * a.pair, a.row, a.pair,
                          panel + k0 * kPanel,
                          kp, c + r0 * ldc + col0, ldc, mask0, mask1, acc);
        }
      }
    }
  });
}

#pragma GCC pop_options
}  // namespace
#endif

void gemm(PairRows a, int64_t M, Panels b, float* c, int64_t ldc, bool accumulate) {
#ifdef MALT_X86
  TORCH_CHECK(malt_isa::avx512_bf16(), "bf16 GEMM: this CPU has no AVX512-BF16 (or it is capped)");
  if (M > 0 && b.cols > 0) gemm_avx512bf16(a, M, b, c, ldc, accumulate);
#else
  TORCH_CHECK(false, "bf16 GEMM: x86-64 only");
#endif
}

}  // namespace malt_bf16

namespace {

// a [M, K] @ b [K, N] -> fp32, through the packers and the micro-kernel: lets tests check the GEMM
// on its own against fp64 (odd sizes, both packers), and benchmarks time it.
at::Tensor bf16_gemm_f32(const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(0),
              "bf16_gemm_f32: expected a [M, K] and b [K, N]");
  TORCH_CHECK(a_in.scalar_type() == at::kBFloat16 && b_in.scalar_type() == at::kBFloat16,
              "bf16_gemm_f32: bf16 inputs only");
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(1);
  // A's rows need a zero partner for an odd K; an even K with unit stride is used in place
  auto a = K % 2 ? at::constant_pad_nd(a_in, {0, 1}).contiguous() : a_in.contiguous();
  // b.t() of a contiguous [N, K] (a weight as h @ W^T) goes through the column packer
  const bool transposed = b_in.stride(0) == 1 && b_in.stride(1) == K && K > 1;
  auto b = transposed ? b_in : b_in.contiguous();
  auto packed =
      transposed ? malt_bf16::pack_col_pairs(b.data_ptr<at::BFloat16>(), K, K, N)
                 : malt_bf16::pack_row_pairs(b.data_ptr<at::BFloat16>(), N, K, N);
  auto out = at::empty({M, N}, a_in.options().dtype(at::kFloat));
  const auto* aw = reinterpret_cast<const uint32_t*>(a.data_ptr<at::BFloat16>());
  malt_bf16::gemm(malt_bf16::row_major(aw, a.size(1) / 2), M, malt_bf16::panels_of(packed, N),
                  out.data_ptr<float>(), N, false);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malt_fast, m) {
  m.def("bf16_gemm_f32(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(malt_fast, CPU, m) { m.impl("bf16_gemm_f32", &bf16_gemm_f32); }
