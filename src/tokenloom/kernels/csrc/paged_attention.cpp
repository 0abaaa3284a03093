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
// tokens exactly as decoding them would). Decode tokens read their tile's cache
// rows in place (CacheTile); rows of a chunk share a tile widened once
// (WidenedTile); both sum every score and every output in the same order.
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
//
// Algorithm (flash attention): a task is (sequence, kv head, up to kQueryTokens
// query tokens). Its query rows are those tokens' heads of that GQA group,
// token-major, so one K/V tile serves all of them. Keys are streamed in tiles of
// kKeyTile, up to the task's last position only. Each tile is widened to float32
// (int8 rows times their scales) once per task (K transposed to
// [head_dim][kKeyTile] for the score kernel, V as rows), then for every block
// of kRowBlock query rows:
//   scores   = q . K^T          (register-blocked FMA, q pre-multiplied by scale)
//   online softmax per row: keep the running max and sum, turn scores into
//            exp(score - max), 0 past the row's causal limit, and rescale the
//            row's accumulator when the max grows
//   acc     += weights x V      (register-blocked FMA)
// and the accumulator is divided by the sum at the end. A row block's scores
// are computed only up to the last key its last row sees (rounded up to 16
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
// The micro-kernels work on kRowBlock rows x kBlockVecs registers: 10
// accumulators, the 5 rows' broadcasts and one loaded register fill the 16 AVX2
// registers. (3 x 4 measured the same; 5 x 2 trims scores to the diagonal in
// steps of 16 keys rather than 32.)
constexpr int64_t kRowBlock = 5;       // query rows per micro-kernel call
constexpr int64_t kBlockVecs = 2;      // key or head_dim registers per micro-kernel call
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Calls fn(std::integral_constant<int, value>) for 1 <= value <= Max.
template <int Max, typename Fn>
void with_constant(int64_t value, Fn&& fn) {
  if constexpr (Max > 1) {
    if (value < Max) return with_constant<Max - 1>(value, fn);
  }
  fn(std::integral_constant<int, Max>{});
}

// Calls fn(M, N) with M = m in [1, kRowBlock] and N = n in [1, kBlockVecs] as
// compile-time constants, so the micro-kernels keep their accumulators in
// registers for every tail size.
template <typename Fn>
void dispatch(int64_t m, int64_t n, Fn&& fn) {
  with_constant<kRowBlock>(m, [&](auto M) { with_constant<kBlockVecs>(n, [&](auto N) { fn(M, N); }); });
}

// The micro-kernels below keep acc, a one-dimensional [M][N] array, in
// registers. GCC only manages that reliably when the loop is a do-while (a
// loop that may run zero times spills acc on every iteration); both loops run
// at least once (head_dim >= 8, count >= 1).

// s[m][0 .. N*8) = q row m . keys 0 .. N*8 for M query rows (d apart); kt
// points into a key tile transposed to [d][kKeyTile]; s rows are kKeyTile apart.
template <int M, int N>
void score_block(const float* q, const float* kt, int64_t d, float* s) {
  __m256 acc[M * N];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t c = 0;
  do {
    __m256 qc[M];
    for (int m = 0; m < M; ++m) qc[m] = _mm256_broadcast_ss(q + m * d + c);
    for (int n = 0; n < N; ++n) {
      const __m256 k = _mm256_loadu_ps(kt + c * kKeyTile + n * kLanes);
      for (int m = 0; m < M; ++m) acc[m * N + n] = _mm256_fmadd_ps(qc[m], k, acc[m * N + n]);
    }
  } while (++c < d);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) _mm256_storeu_ps(s + m * kKeyTile + n * kLanes, acc[m * N + n]);
}

// o[m][col .. col + N*8) += sum over k < count of p[m][k] * v[k][col ..] for
// M accumulator rows (d apart); p rows are kKeyTile apart, v rows d apart.
template <int M, int N>
void accumulate_block(const float* p, const float* v, int64_t count, int64_t col, int64_t d,
                      float* o) {
  __m256 acc[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) acc[m * N + n] = _mm256_loadu_ps(o + m * d + col + n * kLanes);
  int64_t k = 0;
  do {
    __m256 w[M];
    for (int m = 0; m < M; ++m) w[m] = _mm256_broadcast_ss(p + m * kKeyTile + k);
    for (int n = 0; n < N; ++n) {
      const __m256 x = _mm256_loadu_ps(v + k * d + col + n * kLanes);
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

// Columns of r[0..7] become its rows (inlined, so r stays in registers).
inline __attribute__((always_inline)) void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Cache rows are widened without their int8 scale: a key's scale multiplies its
// score once and a value's scale its weight once (scale_scores, scale_weights),
// rather than every element.

// kt[c][k] = key row k's element c, widened, for the tile's count key rows
// (at element offsets offsets[k] of keys). Keys count .. round up to 8 repeat
// the last row; their scores are never shown.
template <typename T>
void transpose_keys(const T* keys, const int64_t* offsets, int64_t count, int64_t d, float* kt) {
  for (int64_t k0 = 0; k0 < count; k0 += kLanes) {
    const T* rows[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) rows[i] = keys + offsets[std::min(k0 + i, count - 1)];
    for (int64_t c = 0; c < d; c += kLanes) {
      __m256 r[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) r[i] = load8(rows[i] + c);
      transpose8(r);
      for (int64_t i = 0; i < kLanes; ++i) _mm256_storeu_ps(kt + (c + i) * kKeyTile + k0, r[i]);
    }
  }
}

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
// tasks are one token's heads: a few KB). kt and v are sized on first use: tiles
// read in place (CacheTile) never need them.
struct Scratch {
  std::vector<float> q, acc, scores, kt, v;
  std::vector<RowState> rows;
  std::vector<int64_t> offsets;
  std::vector<float> key_scales, value_scales;  // int8 caches: the tile's rows' scales
  Scratch(int64_t num_rows, int64_t d)
      : q(num_rows * d), acc(num_rows * d), scores(kRowBlock * kKeyTile), rows(num_rows), offsets(kKeyTile),
        key_scales(kKeyTile), value_scales(kKeyTile) {}
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
  if constexpr (RowFormat<T>::kScaled) {
    // Keys count .. round up to 8 repeat the last row, as transpose_keys pads.
    for (int64_t k = 0; k < (count + kLanes - 1) / kLanes * kLanes; ++k) {
      const int64_t offset = scratch.offsets[std::min(k, count - 1)];
      scratch.key_scales[k] = RowFormat<T>::scale(p.k_cache + offset, p.head_dim);
      scratch.value_scales[k] = RowFormat<T>::scale(p.v_cache + offset, p.head_dim);
    }
  }
}

// Widens the tile at scratch.offsets into scratch.kt (transposed) and scratch.v (rows).
template <typename T>
void widen_tile(const Problem<T>& p, int64_t count, Scratch& scratch) {
  const int64_t d = p.head_dim;
  if (scratch.kt.empty()) {
    scratch.kt.resize(d * kKeyTile);
    scratch.v.resize(kKeyTile * d);
  }
  transpose_keys(p.k_cache, scratch.offsets.data(), count, d, scratch.kt.data());
  for (int64_t k = 0; k < count; ++k) widen_row(p.v_cache + scratch.offsets[k], d, scratch.v.data() + k * d);
}

// A key tile widened into scratch: K transposed to [d][kKeyTile], V as rows.
// Worth it when many query rows share the tile (prompt chunks).
struct WidenedTile {
  Scratch& scratch;
  template <int M, int N>
  void scores(const float* q, int64_t v, int64_t d, float* s) const {
    score_block<M, N>(q, scratch.kt.data() + v * kLanes, d, s + v * kLanes);
  }
  template <int M>
  void accumulate(const float* p, int64_t count, int64_t d, float* o) const {
    for (int64_t col = 0; col < d; col += kBlockVecs * kLanes) {
      with_constant<kBlockVecs>(std::min(kBlockVecs, (d - col) / kLanes), [&](auto N) {
        accumulate_block<M, decltype(N)::value>(p, scratch.v.data(), count, col, d, o);
      });
    }
  }
};

// A key tile read from the cache rows as they are (at element offsets
// offsets[k]), for a task of at most kRowBlock query rows (a decode token's
// heads), where widening the tile first would cost more than the rows' work.
// Keys are transposed 8 at a time in registers; every score and every
// accumulator sees the same FMAs in the same order as through WidenedTile, so
// both give the same bits, and a token's result does not depend on whether it
// came alone or in a chunk.
template <typename T>
struct CacheTile {
  const T* keys;
  const T* values;
  const int64_t* offsets;
  int64_t count;
  template <int M, int N>
  void scores(const float* q, int64_t v, int64_t d, float* s) const {
    for (int n = 0; n < N; ++n) score_keys<M>(q, (v + n) * kLanes, d, s + (v + n) * kLanes);
  }
  template <int M>
  void score_keys(const float* q, int64_t k0, int64_t d, float* s) const {
    const T* rows[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) rows[i] = keys + offsets[std::min(k0 + i, count - 1)];  // as transpose_keys pads
    __m256 acc[M];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += kLanes) {
      __m256 r[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) r[i] = load8(rows[i] + c);
      transpose8(r);  // r[i] = element c + i of the 8 keys
      for (int64_t i = 0; i < kLanes; ++i)
        for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + m * d + c + i), r[i], acc[m]);
    }
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(s + m * kKeyTile, acc[m]);
  }
  // Every accumulator still sums its keys in order, so the columns may be cut
  // differently from WidenedTile: 4 registers of them per pass for up to 3 rows
  // (12 accumulators), so each cache row is read and widened half as often.
  template <int M>
  void accumulate(const float* p, int64_t n_keys, int64_t d, float* o) const {
    constexpr int64_t kVecs = M <= 3 ? 4 : 2;
    for (int64_t col = 0; col < d; col += kVecs * kLanes) {
      with_constant<kVecs>(std::min(kVecs, (d - col) / kLanes), [&](auto N) {
        accumulate_cols<M, decltype(N)::value>(p, n_keys, col, d, o);
      });
    }
  }
  template <int M, int N>
  void accumulate_cols(const float* p, int64_t n_keys, int64_t col, int64_t d, float* o) const {
    __m256 acc[M * N];
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) acc[m * N + n] = _mm256_loadu_ps(o + m * d + col + n * kLanes);
    int64_t k = 0;
    do {
      const T* row = values + offsets[k];
      __m256 w[M];
      for (int m = 0; m < M; ++m) w[m] = _mm256_broadcast_ss(p + m * kKeyTile + k);
      for (int n = 0; n < N; ++n) {
        const __m256 x = load8(row + col + n * kLanes);
        for (int m = 0; m < M; ++m) acc[m * N + n] = _mm256_fmadd_ps(w[m], x, acc[m * N + n]);
      }
    } while (++k < n_keys);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) _mm256_storeu_ps(o + m * d + col + n * kLanes, acc[m * N + n]);
  }
};

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

// Rows row0 .. row0 + m - 1 of the task against one key tile of count keys
// from position start. limit(r) = how many of the tile's keys row r sees.
// scaled: int8 rows, whose scales (scratch.key_scales / value_scales) multiply
// each score and each weight once.
template <typename Tile, typename Limit>
void attend_rows(const Tile& tile, int64_t row0, int64_t m, int64_t count, int64_t d, const Limit& limit,
                 bool scaled, Scratch& scratch) {
  const int64_t visible = std::min(count, limit(row0 + m - 1));  // the block's last row sees most
  if (visible <= 0) return;
  const int64_t n_vecs = (visible + kLanes - 1) / kLanes;
  float* s = scratch.scores.data();
  float* acc = scratch.acc.data() + row0 * d;
  for (int64_t v = 0; v < n_vecs; v += kBlockVecs) {
    dispatch(m, std::min(kBlockVecs, n_vecs - v), [&](auto M, auto N) {
      tile.template scores<decltype(M)::value, decltype(N)::value>(scratch.q.data() + row0 * d, v, d, s);
    });
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
  with_constant<kRowBlock>(m, [&](auto M) { tile.template accumulate<decltype(M)::value>(s, visible, d, acc); });
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
  for (int64_t start = 0; start < end; start += kKeyTile) {
    const int64_t count = std::min(kKeyTile, end - start);
    tile_offsets(p, table, task.kv_head, start, count, scratch);
    const auto limit = [&](int64_t r) { return task.first_pos + r / group + 1 - start; };
    if (rows <= kRowBlock) {  // one row block (a decode token): read the cache rows in place
      const CacheTile<T> tile{p.k_cache, p.v_cache, scratch.offsets.data(), count};
      attend_rows(tile, 0, rows, count, d, limit, RowFormat<T>::kScaled, scratch);
      continue;
    }
    widen_tile(p, count, scratch);
    const WidenedTile tile{scratch};
    for (int64_t row0 = 0; row0 < rows; row0 += kRowBlock) {
      attend_rows(tile, row0, std::min(kRowBlock, rows - row0), count, d, limit, RowFormat<T>::kScaled, scratch);
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
    attention_checks::check_sequence(i, lens[i], tables + i * max_num_blocks, max_num_blocks, num_blocks,
                                     block_size);
    TORCH_CHECK(q_len <= lens[i], "sequence ", i, " has ", q_len, " query tokens, more than seq_lens[",
                i, "] = ", lens[i]);
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
