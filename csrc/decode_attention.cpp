// Paged decode attention on CPU: one new query token per sequence attends to that sequence's
// keys/values read in place from the block pool through its block table. Nothing is gathered:
// a step touches each live block once per (sequence, kv head), so the cost is the KV bytes the
// sequences own, not a copy of the cache. Branches that share prefix blocks read the same memory,
// which stays in cache between neighbouring sequences of a fork.
//
// Layout: q [B, Hq, D]; k_pool, v_pool [num_blocks, block_size, Hkv, D];
// block_tables [B, max_blocks] int32; context_lens [B] int32 (tokens to attend, incl. the new one).
// Softmax is online per block in fp32 (max, sum, rescaled accumulator), whatever the input dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_pool.size(1), Hkv = k_pool.size(2);
  const int64_t group = Hq / Hkv, max_blocks = block_tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_pool.data_ptr<scalar_t>();
  const scalar_t* vp = v_pool.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t token_stride = Hkv * D;  // between consecutive tokens of one block
  const float fscale = static_cast<float>(scale);

  // a small step costs less than waking the thread pool: run it on the calling thread
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += lens[b];
  const int64_t grain = work * Hq * D < (1 << 18) ? B * Hkv : 1;
  // one work item = (sequence, kv head): its `group` query heads share every K/V row loaded
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), acc(group * D), kf(D), vf(D), scores(group * bs);
    std::vector<float> m(group), l(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t len = lens[b];
      for (int64_t g = 0; g < group; ++g) {
        load_row(qp + (b * Hq + h * group + g) * D, qf.data() + g * D, D);
        m[g] = -std::numeric_limits<float>::infinity();
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t start = 0; start < len; start += bs) {
        const int64_t block = tables[b * max_blocks + start / bs];
        const int64_t n = std::min(bs, len - start);
        const scalar_t* kb = kp + block * bs * token_stride + h * D;
        const scalar_t* vb = vp + block * bs * token_stride + h * D;
        for (int64_t t = 0; t < n; ++t) {
          load_row(kb + t * token_stride, kf.data(), D);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
            scores[g * bs + t] = s * fscale;
          }
        }
        // rescale once per block, not once per token
        for (int64_t g = 0; g < group; ++g) {
          float bmax = m[g];
          for (int64_t t = 0; t < n; ++t) bmax = std::max(bmax, scores[g * bs + t]);
          const float corr = std::exp(m[g] - bmax);  // exp(-inf) = 0 on the first block
          l[g] *= corr;
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(scores[g * bs + t] - bmax);
            scores[g * bs + t] = p;
            l[g] += p;
          }
          m[g] = bmax;
        }
        for (int64_t t = 0; t < n; ++t) {
          load_row(vb + t * token_stride, vf.data(), D);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * bs + t];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * vf[d];
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        // len == 0 would divide by zero; such a row has nothing to attend and returns zeros
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        scalar_t* o = op + (b * Hq + h * group + g) * D;
        const float* ag = acc.data() + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(ag[d] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool,
                                  const at::Tensor& v_pool, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4,
              "paged_decode_attention: q [B,Hq,D], pools [blocks,block_size,Hkv,D]");
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes(), "paged_decode_attention: k/v pool shapes differ");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(),
              "paged_decode_attention: q and pools must share a dtype");
  TORCH_CHECK(q.size(2) == k_pool.size(3), "paged_decode_attention: head_dim mismatch");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0,
              "paged_decode_attention: query heads must be a multiple of kv heads");
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
    decode_attention_impl<scalar_t>(qc, k_pool, v_pool, tables, lens, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(malt_fast, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(malt_fast, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
