#include "dtw.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <stdexcept>
#include <thread>

namespace ivl {

int edit_distance(const std::string& a, const std::string& b) {
  const size_t n = a.size(), m = b.size();
  if (n == 0) return static_cast<int>(m);
  if (m == 0) return static_cast<int>(n);
  if (a == b) return 0;
  // NOTE: one row buffer per thread, reused: allocating per call dominated the DTW time (measured 62x vs
  // Python with per-call vectors on 256-char pieces).
  thread_local std::vector<int> row;
  if (row.size() < m + 1) row.resize(m + 1);
  for (size_t j = 0; j <= m; ++j) row[j] = static_cast<int>(j);
  for (size_t i = 1; i <= n; ++i) {
    int diag = row[0];  // row[i-1][0]
    row[0] = static_cast<int>(i);
    const char ai = a[i - 1];
    for (size_t j = 1; j <= m; ++j) {
      const int up = row[j];  // row[i-1][j]
      const int sub = diag + (ai == b[j - 1] ? 0 : 1);
      row[j] = std::min(std::min(up + 1, row[j - 1] + 1), sub);
      diag = up;
    }
  }
  return row[m];
}

std::vector<std::pair<int32_t, int32_t>> dtw_align(const std::vector<std::string>& a,
                                                   const std::vector<std::string>& b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::pair<int32_t, int32_t>> path;
  if (n == 0 || m == 0) return path;
  // acc[i][j]: cheapest path cost ending at (i, j); row-major (n x m) int64 to avoid overflow.
  const int64_t inf = std::numeric_limits<int64_t>::max() / 4;
  thread_local std::vector<int64_t> acc;
  acc.assign(n * m, inf);
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < m; ++j) {
      const int64_t c = edit_distance(a[i], b[j]);
      int64_t best;
      if (i == 0 && j == 0) {
        best = 0;
      } else {
        best = inf;
        if (i > 0 && j > 0) best = acc[(i - 1) * m + (j - 1)];
        if (i > 0) best = std::min(best, acc[(i - 1) * m + j]);
        if (j > 0) best = std::min(best, acc[i * m + (j - 1)]);
      }
      acc[i * m + j] = best + c;
    }
  }
  // backtrack from (n-1, m-1); prefer diagonal, then up (advance a), then left (advance b)
  size_t i = n - 1, j = m - 1;
  path.emplace_back(static_cast<int32_t>(i), static_cast<int32_t>(j));
  while (i > 0 || j > 0) {
    if (i > 0 && j > 0) {
      const int64_t d = acc[(i - 1) * m + (j - 1)], u = acc[(i - 1) * m + j], l = acc[i * m + (j - 1)];
      if (d <= u && d <= l) {
        --i;
        --j;
      } else if (u <= l) {
        --i;
      } else {
        --j;
      }
    } else if (i > 0) {
      --i;
    } else {
      --j;
    }
    path.emplace_back(static_cast<int32_t>(i), static_cast<int32_t>(j));
  }
  std::reverse(path.begin(), path.end());
  return path;
}

std::unordered_map<uint64_t, int64_t> align_counts(const std::vector<std::string>& base_vocab,
                                                   const std::vector<std::string>& value_vocab,
                                                   const int64_t* base_ids, const int64_t* base_offsets,
                                                   const int64_t* value_ids, const int64_t* value_offsets,
                                                   int64_t n_texts, int threads) {
  threads = std::max(1, std::min<int>(threads, static_cast<int>(std::max<int64_t>(1, n_texts))));
  std::vector<std::unordered_map<uint64_t, int64_t>> partial(threads);
  std::vector<std::exception_ptr> errors(threads);
  auto work = [&](int t) {
    try {
      std::vector<std::string> a, b;
      for (int64_t k = t; k < n_texts; k += threads) {
        a.clear();
        b.clear();
        for (int64_t p = base_offsets[k]; p < base_offsets[k + 1]; ++p) {
          const int64_t id = base_ids[p];
          if (id < 0 || id >= static_cast<int64_t>(base_vocab.size()))
            throw std::out_of_range("base token id " + std::to_string(id) + " is outside the base vocabulary");
          a.push_back(base_vocab[id]);
        }
        for (int64_t p = value_offsets[k]; p < value_offsets[k + 1]; ++p) {
          const int64_t id = value_ids[p];
          if (id < 0 || id >= static_cast<int64_t>(value_vocab.size()))
            throw std::out_of_range("value token id " + std::to_string(id) + " is outside the value vocabulary");
          b.push_back(value_vocab[id]);
        }
        for (const auto& ij : dtw_align(a, b)) {
          const uint64_t bid = static_cast<uint64_t>(base_ids[base_offsets[k] + ij.first]);
          const uint64_t vid = static_cast<uint64_t>(value_ids[value_offsets[k] + ij.second]);
          partial[t][(bid << 32) | vid] += 1;
        }
      }
    } catch (...) {
      errors[t] = std::current_exception();  // rethrown on the calling thread, type and message kept
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  } catch (...) {  // e.g. a thread limit: join what started, then report
    for (auto& th : pool) th.join();
    throw;
  }
  work(0);
  for (auto& th : pool) th.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  auto& out = partial[0];
  for (int t = 1; t < threads; ++t)
    for (const auto& kv : partial[t]) out[kv.first] += kv.second;
  return std::move(out);
}

}  // namespace ivl
