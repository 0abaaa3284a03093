// Writing a step's new K/V rows into the paged cache.
//
//   k_cache, v_cache  [num_blocks, block_size, num_kv_heads, width], float32 or float16
//                     (width = head_dim) or int8 (width = head_dim + 4: each row quantized
//                     with its own scale, cache_rows.h)
//   k, v              [num_tokens, num_kv_heads, head_dim] float32; each token's heads
//                     contiguous, any stride between tokens (v is a view into the fused
//                     qkv output)
//   slot_mapping      [num_tokens] int64: token i goes to slot slot_mapping[i], that is
//                     block slot / block_size, offset slot % block_size; a slot < 0 is
//                     padding (a batch padded to a static size) and writes nothing
//
// The PyTorch form is a cast and an index_copy_ per cache: four ops, each
// ~10-20 us of dispatch for a decode step's handful of rows, 60 times a step
// for a 30-layer model. Here one call writes both, converting to float16 with
// F16C (round to nearest even, as Tensor.to does, so the cache holds the same
// bits), or quantizing each (token, head) row to int8 as attention.py's
// quantize_kv does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cache_rows.h"
#include "ops.h"

#include <cstdint>
#include <cstring>

namespace tokenloom {
namespace {

constexpr int64_t kLanes = 8;

void check_rows(const char* name, const at::Tensor& rows, const at::Tensor& cache) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 3, "write_kv: ", name,
              " must be a float32 CPU tensor [num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK(rows.size(1) == cache.size(2) &&
                  cache_rows::row_width(cache.scalar_type(), rows.size(2)) == cache.size(3),
              "write_kv: ", name, " has ", rows.size(1), " x ", rows.size(2), " heads x dims per token, the ",
              cache.scalar_type(), " cache ", cache.size(2), " x ", cache.size(3));
  TORCH_CHECK(rows.stride(2) == 1 && rows.stride(1) == rows.size(2), "write_kv: ", name,
              " must have each token's heads contiguous");
}

void check_cache(const char* name, const at::Tensor& cache) {
  TORCH_CHECK(cache.device().is_cpu() && cache.dim() == 4 && cache.is_contiguous() &&
                  (cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kHalf ||
                   cache.scalar_type() == at::kChar),
              "write_kv: ", name, " must be a contiguous float32, float16 or int8 CPU tensor [num_blocks, "
              "block_size, num_kv_heads, width]");
}

// One token's heads (heads x head_dim floats, contiguous) into its slot.
void copy_token(const float* src, float* dst, int64_t heads, int64_t head_dim) {
  std::memcpy(dst, src, heads * head_dim * sizeof(float));
}

void copy_token(const float* src, at::Half* dst, int64_t heads, int64_t head_dim) {
  const int64_t width = heads * head_dim;
  int64_t c = 0;
  for (; c + kLanes <= width; c += kLanes) {
    const __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), halves);
  }
  for (; c < width; ++c) dst[c] = static_cast<at::Half>(src[c]);
}

void copy_token(const float* src, int8_t* dst, int64_t heads, int64_t head_dim) {
  const int64_t row = cache_rows::RowFormat<int8_t>::width(head_dim);
  for (int64_t h = 0; h < heads; ++h) cache_rows::quantize_row(src + h * head_dim, head_dim, dst + h * row);
}

template <typename T>
void write_rows(const at::Tensor& rows, const at::Tensor& cache, const int64_t* slots) {
  const int64_t heads = rows.size(1), head_dim = rows.size(2), stride = rows.stride(0);
  const int64_t slot_width = heads * cache_rows::RowFormat<T>::width(head_dim);
  const float* src = rows.data_ptr<float>();
  T* dst = cache.data_ptr<T>();
  at::parallel_for(0, rows.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (slots[i] >= 0) copy_token(src + i * stride, dst + slots[i] * slot_width, heads, head_dim);
    }
  });
}

}  // namespace

void write_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  check_cache("k_cache", k_cache);
  check_cache("v_cache", v_cache);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "write_kv: k_cache and v_cache must have one shape and dtype");
  check_rows("k", k, k_cache);
  check_rows("v", v, v_cache);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == k.size(0) && v.size(0) == k.size(0),
              "write_kv: slot_mapping must be contiguous int64 [num_tokens], one slot per row of k and v");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot_mapping.size(0); ++i)
    TORCH_CHECK(slots[i] < num_slots, "write_kv: slot ", slots[i], " of token ", i,
                " is outside the cache's ", num_slots, " slots");
  if (k_cache.scalar_type() == at::kHalf) {
    write_rows<at::Half>(k, k_cache, slots);
    write_rows<at::Half>(v, v_cache, slots);
  } else if (k_cache.scalar_type() == at::kChar) {
    write_rows<int8_t>(k, k_cache, slots);
    write_rows<int8_t>(v, v_cache, slots);
  } else {
    write_rows<float>(k, k_cache, slots);
    write_rows<float>(v, v_cache, slots);
  }
}

}  // namespace tokenloom

TORCH_LIBRARY_FRAGMENT(tokenloom, m) {
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("write_kv", &tokenloom::write_kv);
}
