// bf16 x bf16 -> fp32 GEMM on AVX512-BF16 (vdpbf16ps), for the fused log-prob head.
//
// torch's CPU build has no bf16 GEMM with an fp32 result (and oneDNN's symbols are hidden), and a
// bf16-rounded logit moves the log-sum-exp too far; MKL's bf16 GEMM with fp32 output ignores
// AVX512-BF16 on AMD CPUs (docs/logprob.md). Hence this one.
//
// vdpbf16ps multiplies 16 pairs of bf16 and adds each pair's two products into an fp32 lane, so
// both operands come in 32-bit words holding two consecutive elements along the reduction (k):
//   A: word (m, p) = (A[m, 2p], A[m, 2p+1]), read in place through strides (PairRows), so row-major
//      bf16 rows serve without a copy, and a producer can write the micro-kernel's own order;
//   B: packed once into panels of 32 columns; panel j is [K2][32] words, word (p, c) =
//      (B[2p, 32j+c], B[2p+1, 32j+c]), zero past K or past the last column.
// An odd K needs a zero partner on both sides: B's packers write it, A's owner must provide it
// (a zero pad element), since 0 * (a NaN read past the row) would still be NaN.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace malt_bf16 {

constexpr int64_t kPanel = 32;  // columns per B panel: two zmm accumulators per row
constexpr int64_t kRowGroup = 12;  // rows of the micro-kernel's register tile

// The A operand: word (m, p) at data[(m / kRowGroup) * group + (m % kRowGroup) * row + p * pair].
// Row-major rows of `w` words: {data, w, 1, kRowGroup * w} (row_major). The micro-kernel's order,
// each group's [K2][kRowGroup] words contiguous: {data, 1, kRowGroup, K2 * kRowGroup}; one stream
// per register tile, for an A that would otherwise be read down its columns.
struct PairRows {
  const uint32_t* data;
  int64_t row;    // words between rows m and m+1 within a group
  int64_t pair;   // words between pairs p and p+1
  int64_t group;  // words between row groups
};

inline PairRows row_major(const uint32_t* data, int64_t row_words) {
  return {data, row_words, 1, kRowGroup * row_words};
}

struct Panels {  // the B operand (int32 tensor of shape [panels, K2, 32])
  const uint32_t* data;
  int64_t k2;    // pairs along the reduction
  int64_t cols;  // real columns (the last panel may be partly padding)
};

// The packers return int32 [panels, K2, 32]. `reuse`, when given and big enough, lends its memory
// (a chunk loop packs into one buffer instead of mapping fresh pages for every chunk).
// B[k, c] = src[k * ld + c] (k < K, c < cols): pairs along src's rows
at::Tensor pack_row_pairs(const at::BFloat16* src, int64_t ld, int64_t K, int64_t cols,
                          const at::Tensor& reuse = {});
// B[k, c] = src[c * ld + k]: B is src transposed, pairs along src's columns (a weight chunk [V, H]
// as the right-hand side of h . W^T)
at::Tensor pack_col_pairs(const at::BFloat16* src, int64_t ld, int64_t K, int64_t cols,
                          const at::Tensor& reuse = {});

Panels panels_of(const at::Tensor& packed, int64_t cols);

// C[M, cols] (fp32, row stride ldc) = A . B, or += when accumulate. Parallel over C's tiles.
void gemm(PairRows a, int64_t M, Panels b, float* c, int64_t ldc, bool accumulate);

}  // namespace malt_bf16
