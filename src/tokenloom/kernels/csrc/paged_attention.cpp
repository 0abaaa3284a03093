// Paged-attention decode on the CPU: every sequence has one new query token
// that attends to its whole cached context. K/V rows are read in place through
// the block table, so no per-step gathered copy of the context is built.
//
// Cache layout (see model/layers/attention.py):
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
//   token t of a sequence lives in block block_table[t / block_size] at offset
//   t % block_size.
//
// Work is split over (sequence, kv head) pairs. Within a pair all the query
// heads of that GQA group are computed together, so each K/V row is fetched
// from memory once per group rather than once per query head.
//
// The caches are float32 or float16 (both the same). Float16 rows are widened
// to float32 with F16C as they are loaded into registers (exactly), so a
// float16 cache halves the K/V bytes read while all arithmetic stays float32,
// in the same order: the result is bit-identical to the float32 path on the
// upcast cache. The loops are templated on the element type. Widening each
// tile into a float scratch instead (once per GQA group rather than once per
// query head) measured slower than converting in registers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention_checks.h"
#include "ops.h"
#include "vec_math.h"
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace tokenloom {
namespace {

using tokenloom_vec::exp_ps;
using tokenloom_vec::hsum;
using tokenloom_vec::load8;

constexpr int64_t kLanes = 8;  // floats per AVX2 register

// n is a multiple of kLanes (checked on entry to the op).
template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  // Two independent accumulators so consecutive FMAs do not wait on each other.
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + kLanes), load8(b + i + kLanes), acc1);
  }
  if (i < n) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

// {sum of v[0]'s lanes, ..., sum of v[7]'s lanes}. Two rounds of pairwise
// horizontal adds leave, in each 128-bit half, partial sums of four inputs;
// adding the halves finishes all eight sums at once instead of one by one.
__m256 sum_each(const __m256 v[kLanes]) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]);
  const __m256 s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]);
  const __m256 s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23);  // [v0..v3 low halves | v0..v3 high halves]
  const __m256 s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// The dot products of q with kLanes rows lying `stride` elements apart.
template <typename T>
__m256 dot_rows(const float* q, const T* rows, int64_t stride, int64_t d) {
  __m256 acc[kLanes];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += kLanes) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int64_t r = 0; r < kLanes; ++r) {
      acc[r] = _mm256_fmadd_ps(qc, load8(rows + r * stride + c), acc[r]);
    }
  }
  return sum_each(acc);
}

// scores[t] = scale * <q, row t> for the `count` rows of a tile.
template <typename T>
void tile_scores(const float* q, const T* rows, int64_t stride, int64_t count, int64_t d,
                 float scale, float* scores) {
  int64_t t = 0;
  for (; t + kLanes <= count; t += kLanes) {
    const __m256 dots = dot_rows(q, rows + t * stride, stride, d);
    _mm256_storeu_ps(scores + t, _mm256_mul_ps(dots, _mm256_set1_ps(scale)));
  }
  for (; t < count; ++t) scores[t] = dot(q, rows + t * stride, d) * scale;
}

// out += sum over t of weights[t] * row t, for the `count` rows of a tile.
// The accumulators stay in registers across all the rows, kAccRegs vectors of
// head_dim at a time, instead of a load and store of out per row.
template <typename T>
void tile_accumulate(const float* weights, const T* rows, int64_t stride, int64_t count,
                     int64_t d, float* out) {
  constexpr int64_t kAccRegs = 8;  // 8 accumulators + a weight + a row chunk fit in 16 registers
  int64_t c = 0;
  for (; c + kAccRegs * kLanes <= d; c += kAccRegs * kLanes) {
    __m256 acc[kAccRegs];
    for (int64_t j = 0; j < kAccRegs; ++j) acc[j] = _mm256_loadu_ps(out + c + j * kLanes);
    for (int64_t t = 0; t < count; ++t) {
      const __m256 w = _mm256_set1_ps(weights[t]);
      const T* row = rows + t * stride + c;
      for (int64_t j = 0; j < kAccRegs; ++j) {
        acc[j] = _mm256_fmadd_ps(w, load8(row + j * kLanes), acc[j]);
      }
    }
    for (int64_t j = 0; j < kAccRegs; ++j) _mm256_storeu_ps(out + c + j * kLanes, acc[j]);
  }
  for (; c < d; c += kLanes) {
    __m256 acc = _mm256_loadu_ps(out + c);
    for (int64_t t = 0; t < count; ++t) {
      const __m256 w = _mm256_set1_ps(weights[t]);
      acc = _mm256_fmadd_ps(w, load8(rows + t * stride + c), acc);
    }
    _mm256_storeu_ps(out + c, acc);
  }
}

void scale_in_place(float alpha, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += kLanes) {
    _mm256_storeu_ps(y + i, _mm256_mul_ps(a, _mm256_loadu_ps(y + i)));
  }
}

float max_of(const float* x, int64_t n) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, vmax);
  float max = *std::max_element(lanes, lanes + kLanes);
  for (; i < n; ++i) max = std::max(max, x[i]);
  return max;
}

// Turns scores into unnormalised probabilities exp(x - max) and returns their
// sum. Subtracting the max keeps every exponent <= 0, so nothing overflows and
// the largest term is exactly 1 (the sum is never 0).
float exp_shifted(float* x, int64_t n) {
  const float max = max_of(x, n);
  const __m256 vmax = _mm256_set1_ps(max);
  __m256 vsum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
    _mm256_storeu_ps(x + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  return sum;
}

// One layer's K or V cache, seen as rows of head_dim elements of type T
// (float or at::Half).
template <typename T>
struct CacheView {
  const T* data;
  int64_t block_size;
  int64_t row_stride;  // num_kv_heads * head_dim: from one token slot to the next
  int64_t head_dim;
};

// Tokens per tile: one kv head's K or V rows of a tile (16 * head_dim elements)
// stay in L1 while every query head of the group passes over them.
constexpr int64_t kTileTokens = 16;

// Calls fn(start, rows, count) for consecutive tiles of one sequence's tokens
// for kv_head: tokens start..start+count-1, within one block, whose rows lie at
// rows + i * row_stride.
template <typename T, typename Fn>
void for_each_tile(const CacheView<T>& cache, const int64_t* block_table, int64_t seq_len,
                   int64_t kv_head, Fn&& fn) {
  for (int64_t start = 0; start < seq_len;) {
    const int64_t block = block_table[start / cache.block_size];
    const int64_t offset = start % cache.block_size;
    const int64_t count = std::min({kTileTokens, cache.block_size - offset, seq_len - start});
    const T* rows = cache.data + (block * cache.block_size + offset) * cache.row_stride +
                    kv_head * cache.head_dim;
    fn(start, rows, count);
    start += count;
  }
}

// Attention of one GQA group (the query heads sharing kv_head) of one sequence.
// q and out are [group, head_dim]; scores is scratch, resized to group * seq_len.
template <typename T>
void attend_group(const float* q, const CacheView<T>& keys, const CacheView<T>& values,
                  const int64_t* block_table, int64_t seq_len, int64_t kv_head, int64_t group,
                  float scale, std::vector<float>& scores, float* out) {
  const int64_t d = keys.head_dim, stride = keys.row_stride;
  scores.resize(group * seq_len);
  float* s = scores.data();  // [group, seq_len]

  const auto score_tile = [&](int64_t start, const T* rows, int64_t count) {
    for (int64_t g = 0; g < group; ++g) {
      tile_scores(q + g * d, rows, stride, count, d, scale, s + g * seq_len + start);
    }
  };
  for_each_tile(keys, block_table, seq_len, kv_head, score_tile);

  std::vector<float> inv_sums(group);
  for (int64_t g = 0; g < group; ++g) inv_sums[g] = 1.0f / exp_shifted(s + g * seq_len, seq_len);

  std::fill(out, out + group * d, 0.0f);
  const auto accumulate_tile = [&](int64_t start, const T* rows, int64_t count) {
    for (int64_t g = 0; g < group; ++g) {
      tile_accumulate(s + g * seq_len + start, rows, stride, count, d, out + g * d);
    }
  };
  for_each_tile(values, block_table, seq_len, kv_head, accumulate_tile);
  // Normalising once at the end costs head_dim multiplies instead of seq_len.
  for (int64_t g = 0; g < group; ++g) scale_in_place(inv_sums[g], out + g * d, d);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens) {
  attention_checks::check_q_and_cache(q, "[num_seqs, num_heads, head_dim]", k_cache, v_cache, block_tables,
                                      seq_lens, kLanes, [&] { return q.size(0); });
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t max_num_blocks = block_tables.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < seq_lens.size(0); ++i)
    attention_checks::check_sequence(i, lens[i], tables + i * max_num_blocks, max_num_blocks, num_blocks,
                                     block_size);
}

// Every (sequence, kv head) pair of the batch, with caches of element type T.
template <typename T>
void attend_all(const float* q, const CacheView<T>& keys, const CacheView<T>& values,
                const int64_t* tables, int64_t max_num_blocks, const int64_t* lens,
                int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, float scale,
                float* out) {
  const int64_t group = num_heads / num_kv_heads, head_dim = keys.head_dim;
  // Query heads of one group are adjacent ([num_seqs, num_heads, head_dim]),
  // so pair (i, kv_head) owns one contiguous [group, head_dim] slice of q and out.
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // reused by every pair of this task
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t i = pair / num_kv_heads, kv_head = pair % num_kv_heads;
      const int64_t offset = (i * num_heads + kv_head * group) * head_dim;
      attend_group(q + offset, keys, values, tables + i * max_num_blocks, lens[i], kv_head, group,
                   scale, scores, out + offset);
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale) {
  check_inputs(q, k_cache, v_cache, block_tables, seq_lens);
  const int64_t block_size = k_cache.size(1);

  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(2);
  const int64_t row_stride = num_kv_heads * head_dim;
  at::Tensor out = at::empty({num_seqs, num_heads, head_dim}, q.options());

  const auto run = [&](auto element) {
    using T = decltype(element);
    const CacheView<T> keys{k_cache.data_ptr<T>(), block_size, row_stride, head_dim};
    const CacheView<T> values{v_cache.data_ptr<T>(), block_size, row_stride, head_dim};
    attend_all(q.data_ptr<float>(), keys, values, block_tables.data_ptr<int64_t>(),
               block_tables.size(1), seq_lens.data_ptr<int64_t>(), num_seqs, num_heads,
               num_kv_heads, static_cast<float>(scale), out.data_ptr<float>());
  };
  if (k_cache.scalar_type() == at::kHalf) {
    run(at::Half{});
  } else {
    run(float{});
  }
  return out;
}

}  // namespace tokenloom

TORCH_LIBRARY_FRAGMENT(tokenloom, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("paged_decode_attention", &tokenloom::paged_decode_attention);
}
