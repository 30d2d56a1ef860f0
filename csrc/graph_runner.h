// The CUDA graph replay runner (csrc/cuda/graph_runner.cu); declared here so the one bindings file registers it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ivl {

// Replays n_steps decode steps from instantiated cudaGraphExec_t handles; see graph_runner.cu.
int64_t replay_graphs(const std::vector<int64_t>& execs, const std::vector<int64_t>& streams, int64_t n_steps,
                      const at::Tensor& done, const at::Tensor& host, int64_t check_every);

}  // namespace ivl
