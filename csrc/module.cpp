// The Python module malt_fast._C. Ops live in the other csrc/*.cpp files and register
// themselves with TORCH_LIBRARY_FRAGMENT(malt_fast, m); call them as torch.ops.malt_fast.<name>.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "malt-fast CPU kernels (registered as torch.ops.malt_fast.*)";
  m.def("num_threads", []() { return at::get_num_threads(); });
}
