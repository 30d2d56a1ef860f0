// The one bindings file of ivl_fast._C: thin adapters that check inputs, and TORCH_LIBRARY registrations.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <algorithm>
#include <string>
#include <vector>

#include "dtw.h"
#ifdef IVL_WITH_CUDA
#include "graph_runner.h"
#endif

namespace {

void check_ids(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be 1-D contiguous, got shape ", t.sizes());
}

// -> (pairs [M, 2] int64 (base id, value id), counts [M] int64), sorted by (base id, value id)
std::tuple<at::Tensor, at::Tensor> align_counts(const std::vector<std::string>& base_vocab,
                                                const std::vector<std::string>& value_vocab,
                                                const at::Tensor& base_ids, const at::Tensor& base_offsets,
                                                const at::Tensor& value_ids, const at::Tensor& value_offsets,
                                                int64_t threads) {
  check_ids(base_ids, "base_ids");
  check_ids(base_offsets, "base_offsets");
  check_ids(value_ids, "value_ids");
  check_ids(value_offsets, "value_offsets");
  const int64_t n = base_offsets.numel() - 1;
  TORCH_CHECK(n >= 0 && value_offsets.numel() - 1 == n, "base_offsets and value_offsets must describe the same ",
              "number of texts, got ", base_offsets.numel() - 1, " and ", value_offsets.numel() - 1);
  TORCH_CHECK(threads >= 1, "threads must be >= 1, got ", threads);
  // offsets must be 0, non-decreasing, and end at the number of ids (the C++ core indexes with them)
  auto check_offsets = [](const at::Tensor& off, const at::Tensor& ids, const char* name) {
    const int64_t* o = off.data_ptr<int64_t>();
    const int64_t k = off.numel();
    TORCH_CHECK_VALUE(k >= 1 && o[0] == 0, name, " must start at 0");
    for (int64_t i = 1; i < k; ++i) TORCH_CHECK_VALUE(o[i] >= o[i - 1], name, " must be non-decreasing");
    TORCH_CHECK_VALUE(o[k - 1] == ids.numel(), name, " must end at the number of ids (", ids.numel(), "), got ",
                      o[k - 1]);
  };
  check_offsets(base_offsets, base_ids, "base_offsets");
  check_offsets(value_offsets, value_ids, "value_offsets");
  // the worker threads are plain C++ (no Python objects touched)
  std::unordered_map<uint64_t, int64_t> counts;
  try {
    counts = ivl::align_counts(base_vocab, value_vocab, base_ids.data_ptr<int64_t>(),
                               base_offsets.data_ptr<int64_t>(), value_ids.data_ptr<int64_t>(),
                               value_offsets.data_ptr<int64_t>(), n, static_cast<int>(threads));
  } catch (const std::out_of_range& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::vector<std::pair<uint64_t, int64_t>> items(counts.begin(), counts.end());
  std::sort(items.begin(), items.end());
  const int64_t m = static_cast<int64_t>(items.size());
  at::Tensor pairs = at::empty({m, 2}, at::kLong);
  at::Tensor cnt = at::empty({m}, at::kLong);
  auto* p = pairs.data_ptr<int64_t>();
  auto* c = cnt.data_ptr<int64_t>();
  for (int64_t k = 0; k < m; ++k) {
    p[2 * k] = static_cast<int64_t>(items[k].first >> 32);
    p[2 * k + 1] = static_cast<int64_t>(items[k].first & 0xffffffffu);
    c[k] = items[k].second;
  }
  return {pairs, cnt};
}

int64_t edit_distance(const std::string& a, const std::string& b) { return ivl::edit_distance(a, b); }

#ifdef IVL_WITH_CUDA
// The runner waits on CUDA events between launches: let other Python threads run meanwhile (when called from
// Python with the GIL held; from C++ / TorchScript there is nothing to release).
int64_t replay_graphs_op(const std::vector<int64_t>& execs, const std::vector<int64_t>& streams, int64_t n_steps,
                         const at::Tensor& done, const at::Tensor& host, int64_t check_every) {
  PyThreadState* saved = (Py_IsInitialized() && PyGILState_Check()) ? PyEval_SaveThread() : nullptr;
  int64_t ran = 0;
  try {
    ran = ivl::replay_graphs(execs, streams, n_steps, done, host, check_every);
  } catch (...) {
    if (saved != nullptr) PyEval_RestoreThread(saved);
    throw;
  }
  if (saved != nullptr) PyEval_RestoreThread(saved);
  return ran;
}
#endif

std::string build_info() {
#ifdef IVL_WITH_CUDA
  return std::string("cuda:") + IVL_CUDA_ARCHS;
#else
  return "cpu";
#endif
}

}  // namespace

TORCH_LIBRARY(ivl_fast, m) {
  m.def("align_counts(str[] base_vocab, str[] value_vocab, Tensor base_ids, Tensor base_offsets, "
        "Tensor value_ids, Tensor value_offsets, int threads) -> (Tensor, Tensor)",
        &align_counts);
  m.def("edit_distance(str a, str b) -> int", &edit_distance);
  m.def("build_info() -> str", &build_info);
#ifdef IVL_WITH_CUDA
  // NOT YET VALIDATED ON GPU: see csrc/cuda/graph_runner.cu and ivl_fast/graphs.py (run_cpp)
  // host: the runner writes its flag slots
  m.def("replay_graphs(int[] execs, int[] streams, int n_steps, Tensor done, Tensor(a!) host, "
        "int check_every) -> int",
        &replay_graphs_op);
#endif
}

// Importing ivl_fast._C loads this library, which registers the ops above with the dispatcher.
static struct PyModuleDef ivl_module = {PyModuleDef_HEAD_INIT, "_C", "ivl-fast C++ extension", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ivl_module); }
