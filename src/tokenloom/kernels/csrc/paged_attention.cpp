// Paged attention on the CPU, for every step: each sequence brings q_len new
// query tokens (a whole prompt, a chunk of one, or a single decode token) that
// attend causally to each other and fully to the sequence's cached prefix.
// K/V are read through the block table in place, so no gathered copy of a
// context is built.
//
// One kernel for decodes and prompt chunks alike, with one order of arithmetic
// for every query row: a row's result is the same bits whatever else is in the
// step and however its prompt was chunked (batch invariance: greedy output does
// not depend on the load, and speculative decoding's verify step scores draft
// tokens exactly as decoding them would). Every score is an 8-lane FMA chain
// across head_dim then one fixed tree of adds; every output sums its keys in
// key order (see the micro-kernels).
//
// Layout (see model/layers/attention.py):
//   q, out:            [num_tokens, num_heads, head_dim], sequences back to back;
//                      sequence s owns rows query_start_loc[s]:query_start_loc[s+1]
//   k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, width], float32 or
//                      float16 (width = head_dim) or int8 (width = head_dim + 4,
//                      cache_rows.h); token t of a sequence lives in block
//                      block_table[t / block_size] at offset t % block_size
//   seq_lens[s]:       context length after this step (the new tokens' K/V are
//                      already cached); query j of s sits at position
//                      seq_lens[s] - q_len + j and sees keys 0..that position.
//                      seq_lens[s] = 0 marks padding (a batch padded to a static
//                      size, runner/cuda_graph.py): its rows attend to nothing
//                      and come out zero.
//
// Algorithm (flash attention): a task is (sequence, kv head, up to kQueryTokens
// query tokens). Its query rows are those tokens' heads of that GQA group,
// token-major, so one K/V tile serves all of them. Keys are streamed in tiles of
// kKeyTile, up to the task's last position only. A tile's rows are read where
// they are (float32 caches, and the few rows of a decode token), or widened to
// float32 once per tile when many query rows share it; either way int8 scales
// multiply scores and weights, not elements. Then for every block of kRowBlock
// query rows:
//   scores   = q . K^T          (register-blocked FMA, q pre-multiplied by scale)
//   online softmax per row: keep the running max and sum, turn scores into
//            exp(score - max), 0 past the row's causal limit, and rescale the
//            row's accumulator when the max grows
//   acc     += weights x V      (register-blocked FMA)
// and the accumulator is divided by the sum at the end. A row block's scores
// are computed only up to the last key its last row sees (rounded up to 8
// keys), so hardly any of the triangle above the diagonal is computed.
//
// Tasks differ in cost (later positions see more keys; decode rows are tiny), so
// they are sorted by cost and handed out from a shared counter, largest first.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "attention_checks.h"
#include "cache_rows.h"
#include "ops.h"
#include "vec_math.h"
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace tokenloom {
namespace {

using cache_rows::RowFormat;
using tokenloom_vec::exp_ps;
using tokenloom_vec::hmax;
using tokenloom_vec::hsum;
using tokenloom_vec::load8;

constexpr int64_t kLanes = 8;          // floats per AVX2 register
constexpr int64_t kQueryTokens = 32;   // query tokens per task
constexpr int64_t kKeyTile = 64;       // keys per tile
// Query rows go through the online softmax kRowBlock at a time: a block's
// scores are computed up to the last key its last row sees, so little of the
// triangle above the diagonal is computed.
constexpr int64_t kRowBlock = 6;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Calls fn(std::integral_constant<int, value>) for 1 <= value <= Max.
template <int Max, typename Fn>
void with_constant(int64_t value, Fn&& fn) {
  if constexpr (Max > 1) {
    if (value < Max) return with_constant<Max - 1>(value, fn);
  }
  fn(std::integral_constant<int, Max>{});
}

// The micro-kernels below keep acc, a one-dimensional array, in registers.
// GCC only manages that reliably when the loop is a do-while (a loop that may
// run zero times spills acc on every iteration); both loops run at least once
// (head_dim >= 8, count >= 1).
//
// One order of arithmetic for every query row, whatever the step holds: a
// score is an 8-lane FMA chain across head_dim, in order, then one fixed tree
// of adds over the lanes, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7));
// an output element sums its keys' weighted values in key order. Decodes and
// prompt chunks run the same micro-kernels, only on rows read from the cache
// or widened into scratch first, so a row's result does not depend on the batch
// or on how its prompt was chunked.

// The four dot products of lanes 0..3: a_j's 8 lanes summed by the fixed tree.
inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// s[m][0 .. 4) = q row m . keys[0 .. 4) for M query rows (d apart), s rows
// kKeyTile apart. A key is a row of d elements of type K (float rows widened
// into scratch, or cache rows: load8 converts f16 and int8 in registers).
// 4M accumulators + M q registers + 1 key register fill AVX2's 16 at M = 3.
template <int M, typename K>
void score_block(const float* q, const K* const keys[4], int64_t d, float* s) {
  __m256 acc[M * 4];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t c = 0;
  do {
    __m256 qv[M];
    for (int m = 0; m < M; ++m) qv[m] = _mm256_loadu_ps(q + m * d + c);
    for (int j = 0; j < 4; ++j) {
      const __m256 k = load8(keys[j] + c);
      for (int m = 0; m < M; ++m) acc[m * 4 + j] = _mm256_fmadd_ps(qv[m], k, acc[m * 4 + j]);
    }
  } while ((c += kLanes) < d);
  for (int m = 0; m < M; ++m)
    _mm_storeu_ps(s + m * kKeyTile, reduce4(acc[m * 4], acc[m * 4 + 1], acc[m * 4 + 2], acc[m * 4 + 3]));
}

// o[m][col .. col + N*8) += sum over k < count of p[m][k] * value k [col ..] for
// M accumulator rows (d apart); p rows are kKeyTile apart; value k is the row
// at values + offsets[k].
template <int M, int N, typename K>
void accumulate_block(const float* p, const K* values, const int64_t* offsets, int64_t count, int64_t col,
                      int64_t d, float* o) {
  __m256 acc[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) acc[m * N + n] = _mm256_loadu_ps(o + m * d + col + n * kLanes);
  int64_t k = 0;
  do {
    const K* row = values + offsets[k];
    __m256 w[M];
    for (int m = 0; m < M; ++m) w[m] = _mm256_broadcast_ss(p + m * kKeyTile + k);
    for (int n = 0; n < N; ++n) {
      const __m256 x = load8(row + col + n * kLanes);
      for (int m = 0; m < M; ++m) acc[m * N + n] = _mm256_fmadd_ps(w[m], x, acc[m * N + n]);
    }
  } while (++k < count);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) _mm256_storeu_ps(o + m * d + col + n * kLanes, acc[m * N + n]);
}

// All-ones in the lanes of register v (keys v*8 .. v*8+7) whose key < limit.
inline __m256 keys_below(int64_t limit, int64_t v) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i bound = _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(limit - v * kLanes, kLanes)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(bound, lane));
}

// The running state of one query row's online softmax.
struct RowState {
  float max;   // of the scores so far
  __m256 sum;  // lane sums of exp(score - max) so far
};

// One online-softmax step for m query rows. s holds their scores, rows
// kKeyTile apart, for n_vecs registers of keys; row i sees the keys below
// visible[i] (possibly none). Overwrites s with the weights exp(score - new
// max), exactly 0 for hidden keys, updates the rows' states and sets
// rescale[i] to the factor for row i's accumulator (1 when its max did not
// grow). All the maxima come first, so the exponentials of all the rows form
// one stream of independent work.
void softmax_block(float* s, int64_t m, int64_t n_vecs, const int64_t* visible, RowState* rows,
                   float* rescale) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int64_t i = 0; i < m; ++i) {
    float* row_scores = s + i * kKeyTile;
    const bool masked = visible[i] < n_vecs * kLanes;  // only near the diagonal
    __m256 vmax = neg_inf;
    for (int64_t v = 0; v < n_vecs; ++v) {
      __m256 x = _mm256_loadu_ps(row_scores + v * kLanes);
      if (masked) {
        x = _mm256_blendv_ps(neg_inf, x, keys_below(visible[i], v));
        _mm256_storeu_ps(row_scores + v * kLanes, x);
      }
      vmax = _mm256_max_ps(vmax, x);
    }
    const float tile_max = hmax(vmax);
    rescale[i] = 1.0f;
    if (tile_max > rows[i].max) {
      rescale[i] = std::exp(rows[i].max - tile_max);  // 0 on the first tile (max = -inf)
      rows[i].max = tile_max;
      rows[i].sum = _mm256_mul_ps(rows[i].sum, _mm256_set1_ps(rescale[i]));
    }
  }
  // The first tile shows every row key 0, so every max is finite from then on
  // and the subtraction below never sees -inf - -inf.
  for (int64_t i = 0; i < m; ++i) {
    float* row_scores = s + i * kKeyTile;
    const __m256 shift = _mm256_set1_ps(rows[i].max);
    __m256 sum = rows[i].sum;  // in a register: rows[i].sum would chain every add through memory
    for (int64_t v = 0; v < n_vecs; ++v) {
      const __m256 x = _mm256_loadu_ps(row_scores + v * kLanes);
      const __m256 e = exp_ps(_mm256_sub_ps(x, shift));
      // exp_ps clamps, so a hidden key (-inf) would still get e^-87: zero it.
      const __m256 w = _mm256_and_ps(e, _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_UQ));
      _mm256_storeu_ps(row_scores + v * kLanes, w);
      sum = _mm256_add_ps(sum, w);
    }
    rows[i].sum = sum;
  }
}

void scale_row(float alpha, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += kLanes) _mm256_storeu_ps(y + i, _mm256_mul_ps(a, _mm256_loadu_ps(y + i)));
}

// Cache rows are widened without their int8 scale: a key's scale multiplies its
// score once and a value's scale its weight once (scale_columns), rather than
// every element.
template <typename T>
void widen_row(const T* row, int64_t d, float* dst) {
  for (int64_t c = 0; c < d; c += kLanes) _mm256_storeu_ps(dst + c, load8(row + c));
}

// Everything a task reads and writes. The caches hold elements of type T.
template <typename T>
struct Problem {
  const float* q;
  float* out;
  const T* k_cache;
  const T* v_cache;
  const int64_t* block_tables;
  int64_t max_num_blocks, block_size, num_heads, num_kv_heads, head_dim;
  float scale;
  int64_t head_width() const { return RowFormat<T>::width(head_dim); }  // elements of one head's cache row
};

// Query tokens first .. first + count - 1 (rows of q) of sequence seq, for the
// query heads of kv_head; the first sits at position first_pos.
struct Task {
  int64_t seq, kv_head, first, count, first_pos;
  // Keys visited, summed over the task's tokens.
  int64_t cost() const { return count * (first_pos + 1) + count * (count - 1) / 2; }
};

// Per-thread buffers, sized once for the call's largest task (a decode step's
// tasks are one token's heads: a few KB). k and v are sized on first use: tiles
// read in place never need them.
struct Scratch {
  std::vector<float> q, acc, scores, k, v;
  std::vector<RowState> rows;
  std::vector<int64_t> offsets;
  std::vector<int64_t> widened_offsets;  // row k of a widened tile starts at k * d
  std::vector<float> key_scales, value_scales;  // int8 caches: the tile's rows' scales
  Scratch(int64_t num_rows, int64_t d)
      : q(num_rows * d), acc(num_rows * d), scores(kRowBlock * kKeyTile), rows(num_rows), offsets(kKeyTile),
        widened_offsets(kKeyTile), key_scales(kKeyTile), value_scales(kKeyTile) {
    for (int64_t k = 0; k < kKeyTile; ++k) widened_offsets[k] = k * d;
  }
};

// The element offsets of keys start .. start + count - 1 of one sequence and kv
// head into scratch.offsets.
template <typename T>
void tile_offsets(const Problem<T>& p, const int64_t* table, int64_t kv_head, int64_t start, int64_t count,
                  Scratch& scratch) {
  const int64_t width = p.head_width(), row_stride = p.num_kv_heads * width;
  for (int64_t k = 0; k < count;) {  // a block at a time: one division per block, not per key
    const int64_t t = start + k, offset_in_block = t % p.block_size;
    int64_t offset = (table[t / p.block_size] * p.block_size + offset_in_block) * row_stride + kv_head * width;
    for (int64_t i = std::min(p.block_size - offset_in_block, count - k); i > 0; --i, offset += row_stride) {
      scratch.offsets[k++] = offset;
    }
  }
  // The rows are scattered over blocks, so the hardware prefetcher cannot guess
  // them: ask for every line of the tile's K and V rows now, ahead of their use.
  constexpr int64_t kLineBytes = 64;
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  for (int64_t k = 0; k < count; ++k) {
    const char* key = reinterpret_cast<const char*>(p.k_cache + scratch.offsets[k]);
    const char* value = reinterpret_cast<const char*>(p.v_cache + scratch.offsets[k]);
    for (int64_t b = 0; b < row_bytes; b += kLineBytes) {
      _mm_prefetch(key + b, _MM_HINT_T1);
      _mm_prefetch(value + b, _MM_HINT_T1);
    }
  }
  if constexpr (RowFormat<T>::kScaled) {
    // Keys count .. round up to 8 repeat the last row, as attend_rows pads.
    for (int64_t k = 0; k < (count + kLanes - 1) / kLanes * kLanes; ++k) {
      const int64_t offset = scratch.offsets[std::min(k, count - 1)];
      scratch.key_scales[k] = RowFormat<T>::scale(p.k_cache + offset, p.head_dim);
      scratch.value_scales[k] = RowFormat<T>::scale(p.v_cache + offset, p.head_dim);
    }
  }
}

// One key tile of count keys: key and value k are the rows at offsets[k] of
// keys and values (cache rows, or float rows widened into scratch).
template <typename K>
struct Tile {
  const K* keys;
  const K* values;
  const int64_t* offsets;
  int64_t count;
};

// Widens the tile at scratch.offsets into scratch.k and scratch.v: worth it when
// many query rows share it (a prompt chunk) and its rows need converting.
template <typename T>
Tile<float> widen_tile(const Problem<T>& p, int64_t count, Scratch& scratch) {
  const int64_t d = p.head_dim;
  if (scratch.k.empty()) {
    scratch.k.resize(kKeyTile * d);
    scratch.v.resize(kKeyTile * d);
  }
  for (int64_t k = 0; k < count; ++k) {
    widen_row(p.k_cache + scratch.offsets[k], d, scratch.k.data() + k * d);
    widen_row(p.v_cache + scratch.offsets[k], d, scratch.v.data() + k * d);
  }
  return {scratch.k.data(), scratch.v.data(), scratch.widened_offsets.data(), count};
}

// s[i][0 .. n_vecs * 8) *= factors[0 ..] for m rows kKeyTile apart.
void scale_columns(float* s, int64_t m, int64_t n_vecs, const float* factors) {
  for (int64_t v = 0; v < n_vecs; ++v) {
    const __m256 f = _mm256_loadu_ps(factors + v * kLanes);
    for (int64_t i = 0; i < m; ++i) {
      float* x = s + i * kKeyTile + v * kLanes;
      _mm256_storeu_ps(x, _mm256_mul_ps(_mm256_loadu_ps(x), f));
    }
  }
}

constexpr int64_t kScoreRows = 3;  // query rows per score_block call

// Rows row0 .. row0 + m - 1 of the task against one key tile of count keys
// from position start. limit(r) = how many of the tile's keys row r sees.
// scaled: int8 rows, whose scales (scratch.key_scales / value_scales) multiply
// each score and each weight once.
template <typename K, typename Limit>
void attend_rows(const Tile<K>& tile, int64_t row0, int64_t m, int64_t d, const Limit& limit, bool scaled,
                 Scratch& scratch) {
  const int64_t count = tile.count;
  const int64_t visible = std::min(count, limit(row0 + m - 1));  // the block's last row sees most
  if (visible <= 0) return;
  const int64_t n_vecs = (visible + kLanes - 1) / kLanes;
  float* s = scratch.scores.data();
  float* acc = scratch.acc.data() + row0 * d;
  for (int64_t k0 = 0; k0 < n_vecs * kLanes; k0 += 4) {
    const K* keys[4];  // keys past the tile repeat its last one: their scores are never shown
    for (int64_t j = 0; j < 4; ++j) keys[j] = tile.keys + tile.offsets[std::min(k0 + j, count - 1)];
    for (int64_t r = 0; r < m; r += kScoreRows) {
      with_constant<kScoreRows>(std::min(kScoreRows, m - r), [&](auto M) {
        score_block<decltype(M)::value>(scratch.q.data() + (row0 + r) * d, keys, d, s + r * kKeyTile + k0);
      });
    }
  }
  if (scaled) scale_columns(s, m, n_vecs, scratch.key_scales.data());
  int64_t row_visible[kRowBlock];
  float rescale[kRowBlock];
  for (int64_t i = 0; i < m; ++i) row_visible[i] = std::min(count, limit(row0 + i));
  softmax_block(s, m, n_vecs, row_visible, scratch.rows.data() + row0, rescale);
  for (int64_t i = 0; i < m; ++i) {
    if (rescale[i] != 1.0f) scale_row(rescale[i], acc + i * d, d);
  }
  if (scaled) scale_columns(s, m, n_vecs, scratch.value_scales.data());  // after the sum: it counts weights
  // Rows kScoreRows at a time, 4 registers of columns a pass (12 accumulators):
  // each value row is read once per 3 rows and 32 columns; the order of every sum
  // is the same whatever the blocking.
  constexpr int64_t kVecs = 4;
  for (int64_t r = 0; r < m; r += kScoreRows) {
    with_constant<kScoreRows>(std::min(kScoreRows, m - r), [&](auto M) {
      for (int64_t col = 0; col < d; col += kVecs * kLanes) {
        with_constant<kVecs>(std::min(kVecs, (d - col) / kLanes), [&](auto N) {
          accumulate_block<decltype(M)::value, decltype(N)::value>(s + r * kKeyTile, tile.values, tile.offsets,
                                                                   visible, col, d, acc + r * d);
        });
      }
    });
  }
}

template <typename T>
void run_task(const Problem<T>& p, const Task& task, Scratch& scratch) {
  const int64_t d = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t rows = task.count * group;
  // Row r is head r % group of token r / group; q rows of one token's group are adjacent.
  for (int64_t i = 0; i < task.count; ++i) {
    const float* src = p.q + ((task.first + i) * p.num_heads + task.kv_head * group) * d;
    for (int64_t j = 0; j < group * d; ++j) scratch.q[i * group * d + j] = src[j] * p.scale;
  }
  std::fill(scratch.acc.begin(), scratch.acc.begin() + rows * d, 0.0f);
  std::fill(scratch.rows.begin(), scratch.rows.begin() + rows, RowState{kNegInf, _mm256_setzero_ps()});

  const int64_t* table = p.block_tables + task.seq * p.max_num_blocks;
  const int64_t end = task.first_pos + task.count;  // keys 0 .. end - 1 are visible to some row
  // Rows of f16 or int8 are converted once per tile when many query rows share it.
  const bool widen = !std::is_same_v<T, float> && rows > kRowBlock;
  for (int64_t start = 0; start < end; start += kKeyTile) {
    const int64_t count = std::min(kKeyTile, end - start);
    tile_offsets(p, table, task.kv_head, start, count, scratch);
    const auto limit = [&](int64_t r) { return task.first_pos + r / group + 1 - start; };
    const auto attend = [&](const auto& tile) {
      for (int64_t row0 = 0; row0 < rows; row0 += kRowBlock) {
        attend_rows(tile, row0, std::min(kRowBlock, rows - row0), d, limit, RowFormat<T>::kScaled, scratch);
      }
    };
    if (widen) {
      attend(widen_tile(p, count, scratch));
    } else {
      attend(Tile<T>{p.k_cache, p.v_cache, scratch.offsets.data(), count});
    }
  }
  for (int64_t i = 0; i < task.count; ++i) {
    float* dst = p.out + ((task.first + i) * p.num_heads + task.kv_head * group) * d;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      const float inv_sum = 1.0f / hsum(scratch.rows[r].sum);  // sum >= 1: the max's own weight is 1
      for (int64_t c = 0; c < d; ++c) dst[g * d + c] = scratch.acc[r * d + c] * inv_sum;
    }
  }
}

// Every sequence's query tokens in runs of at most kQueryTokens, times every kv
// head, most expensive first.
std::vector<Task> make_tasks(const int64_t* starts, const int64_t* lens, int64_t num_seqs,
                             int64_t num_kv_heads) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = starts[s + 1] - starts[s];
    if (lens[s] == 0) continue;  // padding: zero_padding_rows writes its rows
    for (int64_t j = 0; j < q_len; j += kQueryTokens) {
      const int64_t count = std::min(kQueryTokens, q_len - j);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        tasks.push_back(Task{s, h, starts[s] + j, count, lens[s] - q_len + j});
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost() > b.cost(); });
  return tasks;
}

template <typename T>
void run_all(const Problem<T>& p, const std::vector<Task>& tasks) {
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks.size());
  int64_t max_count = 0;
  for (const Task& task : tasks) max_count = std::max(max_count, task.count);
  const int64_t max_rows = max_count * (p.num_heads / p.num_kv_heads);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch(max_rows, p.head_dim);
    for (size_t i; (i = next.fetch_add(1)) < tasks.size();) run_task(p, tasks[i], scratch);
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                  const at::Tensor& query_start_loc) {
  attention_checks::check_q_and_cache(q, "[num_tokens, num_heads, head_dim]", k_cache, v_cache, block_tables,
                                      seq_lens, kLanes, [&] { return seq_lens.size(0); });
  attention_checks::check_index(query_start_loc, "query_start_loc", 1);
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1, "query_start_loc has ",
              query_start_loc.size(0), " entries, expected num_seqs + 1 = ", num_seqs + 1);
}

// Inconsistent offsets, lengths or block ids would read or write outside the
// tensors, so they are rejected before any work starts (a check inside the
// parallel region would leave other threads mid-flight).
void check_tables(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                  const at::Tensor& query_start_loc, int64_t num_tokens, int64_t num_blocks,
                  int64_t block_size) {
  const int64_t num_seqs = seq_lens.size(0), max_num_blocks = block_tables.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  TORCH_CHECK(starts[0] == 0, "query_start_loc[0] = ", starts[0], " must be 0");
  TORCH_CHECK(starts[num_seqs] == num_tokens, "query_start_loc[", num_seqs, "] = ", starts[num_seqs],
              " must equal q's num_tokens ", num_tokens);
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = starts[i + 1] - starts[i];
    TORCH_CHECK(q_len >= 0, "query_start_loc must be nondecreasing, but query_start_loc[", i + 1,
                "] = ", starts[i + 1], " < query_start_loc[", i, "] = ", starts[i]);
    if (lens[i] == 0) continue;  // padding: reads nothing
    attention_checks::check_sequence(i, lens[i], tables + i * max_num_blocks, max_num_blocks, num_blocks,
                                     block_size);
    TORCH_CHECK(q_len <= lens[i], "sequence ", i, " has ", q_len, " query tokens, more than seq_lens[",
                i, "] = ", lens[i]);
  }
}

// The rows of padding sequences (seq_lens 0), which no task writes: zero, not
// whatever empty_like left there (a NaN would be harmless to the other rows but
// poisons any reduction a caller makes over the whole padded batch).
void zero_padding_rows(at::Tensor& out, const at::Tensor& seq_lens, const at::Tensor& query_start_loc) {
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* starts = query_start_loc.data_ptr<int64_t>();
  for (int64_t s = 0; s < seq_lens.size(0); ++s) {
    if (lens[s] == 0 && starts[s + 1] > starts[s]) out.narrow(0, starts[s], starts[s + 1] - starts[s]).zero_();
  }
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale) {
  check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  check_tables(block_tables, seq_lens, query_start_loc, q.size(0), num_blocks, block_size);

  at::Tensor out = at::empty_like(q);
  zero_padding_rows(out, seq_lens, query_start_loc);
  const std::vector<Task> tasks = make_tasks(query_start_loc.data_ptr<int64_t>(),
                                             seq_lens.data_ptr<int64_t>(), seq_lens.size(0),
                                             k_cache.size(2));
  const auto run = [&](auto element) {
    using T = decltype(element);
    const Problem<T> problem{q.data_ptr<float>(), out.data_ptr<float>(), k_cache.data_ptr<T>(),
                             v_cache.data_ptr<T>(), block_tables.data_ptr<int64_t>(),
                             block_tables.size(1), block_size, q.size(1), k_cache.size(2),
                             q.size(2), static_cast<float>(scale)};
    run_all(problem, tasks);
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
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("paged_attention", &tokenloom::paged_attention);
}
