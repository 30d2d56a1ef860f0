// The decode-loop runner: replays captured decode-step graphs back to back with Python off the per-step path.
// NOT YET VALIDATED ON GPU (compiled against torch's CUDA headers; never run on a device so far).
//
// Each step is either one graph (layouts "fused" and "one_stream": the graph itself forks/joins streams if it
// captured a fork) or three graphs (layout "two_stream": base on the main stream, value on the side stream,
// joined by events, then the sampler on the main stream). The step graphs advance every piece of decode state
// on device themselves (positions, RNG offset, step counter, output column, EOS/NaN flags), so the runner only
// launches. Every `check_every` steps it copies the device's done flag (int32: every row stopped, or a row went
// non-finite) into pinned host memory without waiting, and reads the flag of the previous check (already
// landed unless the device is far behind), so the device always has queued work and the host is at most
// 2 * check_every steps ahead. Returns the number of steps issued.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "../graph_runner.h"

namespace ivl {
namespace {

struct Event {
  cudaEvent_t e = nullptr;
  explicit Event(unsigned flags = cudaEventDisableTiming) { C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, flags)); }
  ~Event() {
    if (e != nullptr) cudaEventDestroy(e);  // released once pending work completes
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

}  // namespace

int64_t replay_graphs(const std::vector<int64_t>& execs, const std::vector<int64_t>& streams, int64_t n_steps,
                      const at::Tensor& done, const at::Tensor& host, int64_t check_every) {
  TORCH_CHECK(execs.size() == 1 || execs.size() == 3,
              "replay_graphs: expected 1 graph per step (fused / one_stream) or 3 (two_stream: base, value, "
              "sample), got ", execs.size());
  TORCH_CHECK(streams.size() == (execs.size() == 1 ? 1u : 2u), "replay_graphs: ", execs.size(),
              " graph(s) per step need ", (execs.size() == 1 ? 1 : 2), " stream(s), got ", streams.size());
  for (auto g : execs) TORCH_CHECK(g != 0, "replay_graphs: a graph handle is null (graph not instantiated?)");
  TORCH_CHECK(done.is_cuda() && done.scalar_type() == at::kInt && done.numel() == 1,
              "replay_graphs: done must be an int32 CUDA tensor of one element");
  TORCH_CHECK(host.device().is_cpu() && host.scalar_type() == at::kInt && host.numel() >= 2 && host.is_contiguous(),
              "replay_graphs: host must be a contiguous int32 CPU tensor of >= 2 elements");
  TORCH_CHECK(host.is_pinned(), "replay_graphs: host must be in pinned memory (an asynchronous copy target)");
  TORCH_CHECK(n_steps >= 0 && check_every >= 1, "replay_graphs: n_steps must be >= 0 and check_every >= 1, got ",
              n_steps, " and ", check_every);

  c10::cuda::CUDAGuard guard(done.device());
  auto main = reinterpret_cast<cudaStream_t>(streams[0]);
  auto side = streams.size() > 1 ? reinterpret_cast<cudaStream_t>(streams[1]) : nullptr;
  auto exec = [&](size_t i) { return reinterpret_cast<cudaGraphExec_t>(execs[i]); };
  int32_t* flags = host.data_ptr<int32_t>();
  const int32_t* done_dev = done.data_ptr<int32_t>();
  flags[0] = flags[1] = 0;

  // the host waits on these (up to check_every steps of device work): block, don't spin a core
  Event checks[2] = {Event(cudaEventDisableTiming | cudaEventBlockingSync),
                     Event(cudaEventDisableTiming | cudaEventBlockingSync)};
  bool pending[2] = {false, false};
  Event fork, join;
  int slot = 0;
  for (int64_t i = 1; i <= n_steps; ++i) {
    if (execs.size() == 1) {
      C10_CUDA_CHECK(cudaGraphLaunch(exec(0), main));
    } else {
      C10_CUDA_CHECK(cudaEventRecord(fork.e, main));
      C10_CUDA_CHECK(cudaStreamWaitEvent(side, fork.e, 0));
      C10_CUDA_CHECK(cudaGraphLaunch(exec(1), side));  // value model
      C10_CUDA_CHECK(cudaGraphLaunch(exec(0), main));  // base model
      C10_CUDA_CHECK(cudaEventRecord(join.e, side));
      C10_CUDA_CHECK(cudaStreamWaitEvent(main, join.e, 0));
      C10_CUDA_CHECK(cudaGraphLaunch(exec(2), main));  // combine + sample + bookkeeping
    }
    if (i % check_every == 0 && i < n_steps) {
      C10_CUDA_CHECK(cudaMemcpyAsync(flags + slot, done_dev, sizeof(int32_t), cudaMemcpyDeviceToHost, main));
      C10_CUDA_CHECK(cudaEventRecord(checks[slot].e, main));
      pending[slot] = true;
      const int prev = slot ^ 1;
      if (pending[prev]) {
        C10_CUDA_CHECK(cudaEventSynchronize(checks[prev].e));
        pending[prev] = false;
        if (flags[prev] != 0) return i;
      }
      slot = prev;
    }
  }
  return n_steps;
}

}  // namespace ivl
