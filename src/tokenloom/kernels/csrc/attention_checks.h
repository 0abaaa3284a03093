// Input checks of the paged attention op (paged_attention.cpp).
// Everything is checked before any parallel work
// starts: a failed check inside the parallel region would leave other threads
// mid-flight, and a bad length or block id would read outside the cache.
#pragma once

#include <ATen/ATen.h>

#include "cache_rows.h"

#include <cstdint>

namespace tokenloom::attention_checks {

inline void check_cache(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kChar,
              name, " must be float32, float16 or int8, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, " must be [num_blocks, block_size, num_kv_heads, width], got ",
              t.dim(), " dims");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_index(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// q [rows, num_heads, head_dim] float32 against the caches, and num_seqs rows of tables and lengths
// (num_seqs: a function of the checked q or seq_lens, called once their layout is known to be right).
template <typename NumSeqs>
void check_q_and_cache(const at::Tensor& q, const char* q_layout, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       int64_t lanes, NumSeqs num_seqs_of) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "q must be float32, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3, "q must be ", q_layout, ", got ", q.dim(), " dims");
  TORCH_CHECK(q.is_contiguous(), "q must be contiguous");
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache dtype ",
              v_cache.scalar_type(), " must match k_cache dtype ", k_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(),
              " must match k_cache shape ", k_cache.sizes());
  check_index(block_tables, "block_tables", 2);
  check_index(seq_lens, "seq_lens", 1);
  const int64_t num_seqs = num_seqs_of(), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == cache_rows::row_width(k_cache.scalar_type(), head_dim), "k_cache rows of ",
              k_cache.size(3), " ", k_cache.scalar_type(), " elements do not hold q's head_dim ", head_dim,
              " (int8 rows are head_dim + 4: values, then their float32 scale)");
  // The AVX2 loops have no scalar tail; every common head_dim (64, 80, 128, ...) qualifies.
  TORCH_CHECK(head_dim > 0 && head_dim % lanes == 0, "q head_dim must be a positive multiple of ",
              lanes, ", got ", head_dim);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "q num_heads ", num_heads,
              " must be a multiple of k_cache num_kv_heads ", num_kv_heads);
  TORCH_CHECK(block_tables.size(0) == num_seqs, "block_tables has ", block_tables.size(0),
              " rows, expected num_seqs = ", num_seqs);
  TORCH_CHECK(seq_lens.size(0) == num_seqs, "seq_lens has ", seq_lens.size(0),
              " entries, expected num_seqs = ", num_seqs);
}

// Sequence i's length and the block ids it uses (its first ceil(len / block_size) table entries).
inline void check_sequence(int64_t i, int64_t len, const int64_t* table, int64_t max_num_blocks,
                           int64_t num_blocks, int64_t block_size) {
  TORCH_CHECK(len >= 1, "seq_lens[", i, "] = ", len, " must be >= 1");
  TORCH_CHECK(len <= max_num_blocks * block_size, "seq_lens[", i, "] = ", len,
              " exceeds block_tables capacity ", max_num_blocks, " blocks * ", block_size);
  const int64_t used = (len + block_size - 1) / block_size;
  for (int64_t b = 0; b < used; ++b)
    TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "block_tables[", i, ", ", b, "] = ", table[b],
                " is outside the cache's ", num_blocks, " blocks");
}

}  // namespace tokenloom::attention_checks
