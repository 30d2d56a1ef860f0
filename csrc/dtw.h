// MinED alignment of two tokenizations of the same text (FuseLLM-style), free of torch.
//
// Each side is a sequence of token surface strings. Dynamic time warping over the edit-distance cost matrix
// aligns them monotonically (every token is matched to at least one token of the other side); each matched
// (base token, value token) pair is counted once per alignment step.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace ivl {

// Levenshtein distance of two byte strings.
int edit_distance(const std::string& a, const std::string& b);

// DTW over cost[i][j] = edit_distance(a[i], b[j]); returns the aligned index pairs, in order.
// Ties prefer the diagonal, then advancing a, then advancing b (deterministic).
std::vector<std::pair<int32_t, int32_t>> dtw_align(const std::vector<std::string>& a,
                                                   const std::vector<std::string>& b);

// Count aligned (base id, value id) pairs over many texts, multithreaded over texts.
// vocab tables map ids to surface strings; ids/offsets hold the texts back to back (CSR-like).
// Returns a map keyed by (base_id << 32 | value_id).
std::unordered_map<uint64_t, int64_t> align_counts(const std::vector<std::string>& base_vocab,
                                                   const std::vector<std::string>& value_vocab,
                                                   const int64_t* base_ids, const int64_t* base_offsets,
                                                   const int64_t* value_ids, const int64_t* value_offsets,
                                                   int64_t n_texts, int threads);

}  // namespace ivl
