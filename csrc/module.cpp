// The Python module malt_fast._C. Ops live in the other csrc/*.cpp files and register
// themselves with TORCH_LIBRARY_FRAGMENT(malt_fast, m); call them as torch.ops.malt_fast.<name>.
#include <torch/extension.h>

#include "cpu_isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "malt-fast CPU kernels (registered as torch.ops.malt_fast.*)";
  m.def("num_threads", []() { return at::get_num_threads(); });
  // the vector path the kernels take on this CPU: "avx512", "avx2" or "plain" (MALT_FAST_ISA caps
  // it); the decode attention kernel's widest is avx2
  m.def("cpu_isa", []() { return std::string(malt_isa::name()); });
  // whether the fused log-prob head runs its bf16 GEMMs natively (AVX512-BF16 and not capped by
  // MALT_FAST_ISA=plain|avx2|avx512); otherwise bf16 tiles are converted to fp32 first
  m.def("cpu_bf16_gemm", []() { return malt_isa::avx512_bf16(); });
}
