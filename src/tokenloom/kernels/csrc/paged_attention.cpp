// Paged-attention decode on the CPU: every sequence has one new query token
// that attends to its whole cached context. K/V rows are read in place through
// the block table, so no per-step gathered copy of the context is built.
//
// Cache layout (see model/layers/attention.py):
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, width]
//   token t of a sequence lives in block block_table[t / block_size] at offset
//   t % block_size.
//
// Work is split over (sequence, kv head) pairs. Within a pair all the query
// heads of that GQA group are computed together, so each K/V row is fetched
// from memory once per group rather than once per query head, and loaded into
// registers once per pass of up to three heads. Rows are read a tile of 16
// tokens at a time, and the next tile is prefetched while one is computed:
// the loop is bound by memory latency more than by bandwidth (a float32 cache,
// twice the bytes, ran as fast as float16 before the prefetch).
//
// The caches are float32, float16 or int8 (cache_rows.h). Float16 rows are
// widened to float32 with F16C as they are loaded into registers (exactly), so
// a float16 cache halves the K/V bytes read while all arithmetic stays float32,
// in the same order: the result is bit-identical to the float32 path on the
// upcast cache. Int8 rows halve the bytes again: their values are converted in
// registers too, and each row's scale multiplies its score (K) or its weight
// (V) once rather than every element. The loops are templated on the element
// type. Widening each tile into a float scratch instead (once per GQA group
// rather than once per query head) measured slower than converting in registers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention_checks.h"
#include "cache_rows.h"
#include "ops.h"
#include "vec_math.h"
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace tokenloom {
namespace {

using cache_rows::RowFormat;
using tokenloom_vec::exp_ps;
using tokenloom_vec::hsum;
using tokenloom_vec::load8;

constexpr int64_t kLanes = 8;  // floats per AVX2 register

// The query heads of a GQA group are computed together, up to kHeadsPerPass at
// a time: each K/V row chunk is loaded (and widened) once for all of them and
// feeds one FMA per head, instead of being loaded again for every head. That
// matters most for int8 rows, whose widening costs two instructions per chunk.

constexpr int kHeadsPerPass = 3;  // 3 heads x 4 rows (or columns) of accumulators + operands fill 16 registers
constexpr int kRowsPerPass = 4;   // key rows per score pass
constexpr int kColsPerPass = 4;   // head_dim registers per accumulate pass

// {sum of v0's lanes, ..., sum of v3's lanes}: two rounds of pairwise
// horizontal adds leave each sum split over the two 128-bit halves.
inline __m128 sum_each4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// dots[g] = {<q_g, row r>} for the kRowsPerPass rows `stride` elements apart, G
// query heads (q rows d apart). d is a multiple of kLanes (checked on entry).
template <int G, typename T>
inline void group_dots(const float* q, const T* rows, int64_t stride, int64_t d, __m128 dots[G]) {
  __m256 acc[G][kRowsPerPass];
  for (auto& head : acc)
    for (auto& a : head) a = _mm256_setzero_ps();
  int64_t c = 0;
  do {  // a do-while keeps acc in registers (see prefill_attention.cpp); d >= 8
    for (int r = 0; r < kRowsPerPass; ++r) {
      const __m256 k = load8(rows + r * stride + c);
      for (int g = 0; g < G; ++g) acc[g][r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + c), k, acc[g][r]);
    }
    c += kLanes;
  } while (c < d);
  for (int g = 0; g < G; ++g) dots[g] = sum_each4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
}

// scores[g * score_stride + t] = scale * <q_g, row t> for the `count` rows of a
// tile and G query heads.
template <int G, typename T>
void group_tile_scores(const float* q, const T* rows, int64_t stride, int64_t count, int64_t d, float scale,
                       float* scores, int64_t score_stride) {
  int64_t t = 0;
  for (; t + kRowsPerPass <= count; t += kRowsPerPass) {
    __m128 dots[G];
    group_dots<G>(q, rows + t * stride, stride, d, dots);
    __m128 factor = _mm_set1_ps(scale);
    if constexpr (RowFormat<T>::kScaled) {
      alignas(16) float scales[kRowsPerPass];
      for (int r = 0; r < kRowsPerPass; ++r) scales[r] = RowFormat<T>::scale(rows + (t + r) * stride, d);
      for (int g = 0; g < G; ++g) dots[g] = _mm_mul_ps(dots[g], _mm_load_ps(scales));
    }
    for (int g = 0; g < G; ++g) _mm_storeu_ps(scores + g * score_stride + t, _mm_mul_ps(dots[g], factor));
  }
  for (; t < count; ++t) {  // the last rows of a sequence's last tile
    const T* row = rows + t * stride;
    for (int g = 0; g < G; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0; c < d; c += kLanes) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + c), load8(row + c), acc);
      float dot = hsum(acc);
      if constexpr (RowFormat<T>::kScaled) dot *= RowFormat<T>::scale(row, d);
      scores[g * score_stride + t] = dot * scale;
    }
  }
}

// out_g[c .. c + C*8) += sum over t of weights_g[t] * row t, for G heads (out
// rows d apart, weight rows weight_stride apart). The accumulators stay in
// registers across all the rows instead of a load and store of out per row.
template <int G, int C, typename T>
inline void accumulate_columns(const float* weights, int64_t weight_stride, const T* rows, int64_t stride,
                               int64_t count, int64_t d, int64_t c, float* out) {
  __m256 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < C; ++j) acc[g][j] = _mm256_loadu_ps(out + g * d + c + j * kLanes);
  int64_t t = 0;
  do {  // count >= 1
    const T* row = rows + t * stride;
    const float scale = RowFormat<T>::scale(row, d);
    __m256 w[G];
    for (int g = 0; g < G; ++g) {
      const float weight = weights[g * weight_stride + t];
      w[g] = _mm256_set1_ps(RowFormat<T>::kScaled ? weight * scale : weight);
    }
    for (int j = 0; j < C; ++j) {
      const __m256 x = load8(row + c + j * kLanes);
      for (int g = 0; g < G; ++g) acc[g][j] = _mm256_fmadd_ps(w[g], x, acc[g][j]);
    }
  } while (++t < count);
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < C; ++j) _mm256_storeu_ps(out + g * d + c + j * kLanes, acc[g][j]);
}

template <int G, typename T>
void group_tile_accumulate(const float* weights, int64_t weight_stride, const T* rows, int64_t stride,
                           int64_t count, int64_t d, float* out) {
  int64_t c = 0;
  for (; c + kColsPerPass * kLanes <= d; c += kColsPerPass * kLanes)
    accumulate_columns<G, kColsPerPass>(weights, weight_stride, rows, stride, count, d, c, out);
  for (; c < d; c += kLanes) accumulate_columns<G, 1>(weights, weight_stride, rows, stride, count, d, c, out);
}

// Calls fn(std::integral_constant<int, heads>) for each pass of at most
// kHeadsPerPass heads over a group of `group` heads, with the pass's first head.
template <typename Fn>
void for_each_head_pass(int64_t group, Fn&& fn) {
  for (int64_t g0 = 0; g0 < group; g0 += kHeadsPerPass) {
    switch (std::min<int64_t>(kHeadsPerPass, group - g0)) {
      case 1: fn(g0, std::integral_constant<int, 1>{}); break;
      case 2: fn(g0, std::integral_constant<int, 2>{}); break;
      default: fn(g0, std::integral_constant<int, 3>{}); break;
    }
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

// One layer's K or V cache, seen as rows of head_dim values of type T
// (float, at::Half or int8_t; an int8 row carries its scale after them).
template <typename T>
struct CacheView {
  const T* data;
  int64_t block_size;
  int64_t row_stride;  // num_kv_heads * head_width(): from one token slot to the next
  int64_t head_dim;
  int64_t head_width() const { return RowFormat<T>::width(head_dim); }  // elements of one head's row
};

// Tokens per tile: one kv head's K or V rows of a tile (16 * head_dim elements)
// stay in L1 while every query head of the group passes over them.
constexpr int64_t kTileTokens = 16;

// One tile: tokens start .. start + count - 1 of a sequence, within one block,
// whose rows for one kv head lie at rows + i * row_stride.
template <typename T>
struct Tile {
  int64_t start, count;
  const T* rows;
};

template <typename T>
Tile<T> tile_at(const CacheView<T>& cache, const int64_t* block_table, int64_t seq_len, int64_t kv_head,
                int64_t start) {
  const int64_t block = block_table[start / cache.block_size];
  const int64_t offset = start % cache.block_size;
  const int64_t count = std::min({kTileTokens, cache.block_size - offset, seq_len - start});
  const T* rows = cache.data + (block * cache.block_size + offset) * cache.row_stride + kv_head * cache.head_width();
  return {start, count, rows};
}

// Asks for a tile's rows ahead of use. The rows of one kv head lie apart (the
// other heads' rows sit between them), and a tile's 16 rows in flight at once
// keep more of memory's latency hidden than the kernels' own loads of 4 rows
// at a time do.
template <typename T>
void prefetch_tile(const CacheView<T>& cache, const Tile<T>& tile) {
  constexpr int64_t kLineBytes = 64;
  const int64_t row_bytes = cache.head_width() * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < tile.count; ++i) {
    const char* row = reinterpret_cast<const char*>(tile.rows + i * cache.row_stride);
    for (int64_t b = 0; b < row_bytes; b += kLineBytes) _mm_prefetch(row + b, _MM_HINT_T0);
    _mm_prefetch(row + row_bytes - 1, _MM_HINT_T0);  // a row that is not line-aligned ends one line further
  }
}

// Calls fn(start, rows, count) for consecutive tiles of one sequence's tokens
// for kv_head, fetching the next tile while fn works on the current one.
template <typename T, typename Fn>
void for_each_tile(const CacheView<T>& cache, const int64_t* block_table, int64_t seq_len,
                   int64_t kv_head, Fn&& fn) {
  Tile<T> tile = tile_at(cache, block_table, seq_len, kv_head, 0);
  while (true) {
    const int64_t next = tile.start + tile.count;
    Tile<T> following{};
    if (next < seq_len) {
      following = tile_at(cache, block_table, seq_len, kv_head, next);
      prefetch_tile(cache, following);
    }
    fn(tile.start, tile.rows, tile.count);
    if (next >= seq_len) break;
    tile = following;
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
    for_each_head_pass(group, [&](int64_t g0, auto heads) {
      group_tile_scores<decltype(heads)::value>(q + g0 * d, rows, stride, count, d, scale,
                                                s + g0 * seq_len + start, seq_len);
    });
  };
  for_each_tile(keys, block_table, seq_len, kv_head, score_tile);

  std::vector<float> inv_sums(group);
  for (int64_t g = 0; g < group; ++g) inv_sums[g] = 1.0f / exp_shifted(s + g * seq_len, seq_len);

  std::fill(out, out + group * d, 0.0f);
  const auto accumulate_tile = [&](int64_t start, const T* rows, int64_t count) {
    for_each_head_pass(group, [&](int64_t g0, auto heads) {
      group_tile_accumulate<decltype(heads)::value>(s + g0 * seq_len + start, seq_len, rows, stride, count, d,
                                                    out + g0 * d);
    });
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
  const int64_t row_stride = num_kv_heads * k_cache.size(3);  // size(3): a head's row width, checked
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
  } else if (k_cache.scalar_type() == at::kChar) {
    run(int8_t{});
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
