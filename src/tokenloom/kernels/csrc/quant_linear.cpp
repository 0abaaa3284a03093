// Quantized linear layers, AVX2 + FMA + F16C (and AVX-512 VNNI where the CPU has
// it): q4_gemm, q8_gemm, q4k_gemm and q6k_gemm, the products
// y[M, N] = x[M, K] @ W^T of every quantized weight, at every batch size.
//
// W is stored in blocks of 32 weights along K, in the layouts of llama.cpp's
// Q4_1 / Q8_0 (f16 block scales, as in the file) or, for K-quant files, its
// Q4_K / Q6_K super-blocks of 256 (8 blocks of 32 under one f16 scale, with
// integer sub-scales), re-laid out into tiles of 8 output columns
// (QuantizedWeight.with_gemm_tiles, layers/quantization.py):
//
//   q4:   W[n, 32b + j] = scale[n, b] * nibble + min[n, b]
//   q8:   W[n, 32b + j] = scale[n, b] * q
//   q4_k: W[n, 32b + j] = d[n, b/8] * sc[n, b] * nibble - dmin[n, b/8] * m[n, b]    sc, m: 6-bit
//   q6_k: W[n, 16s + j] = d[n, s/16] * sc[n, s] * (q - 32)                          q: 6-bit, sc: int8
//
// The rows of x are quantized to int8 per block of 32 first, as llama.cpp
// does, so that each block's dot products run on integer instructions.
// Kernels taking f32 activations per weight row (one for one row, one for a
// few) lived here before; the tiles measured faster at every batch size, so
// they went (docs/performance.md).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace tokenloom {
namespace {

using tokenloom_vec::hmax;
using tokenloom_vec::hsum;

constexpr int64_t kBlock = 32;

// Block scales and mins are IEEE half floats (the GGUF's own); F16C widens them.
using Half = uint16_t;
inline const Half* half_data(const at::Tensor& t) { return reinterpret_cast<const Half*>(t.data_ptr<at::Half>()); }

// ---- int8 activations --------------------------------------------------------
//
// Each row of x is quantized to int8 per block of 32 (llama.cpp's Q8 scheme:
// xd = max|x| / 127, xq = round(x / xd)), so a block's dot product is an
// integer sum with one float FMA per block:
//
//   q4: sum_j (d q_j + m) xd xq_j = d xd (q . xq) + m xd sum(xq)
//   q8: sum_j (d q_j) xd xq_j     = d xd (q . xq)

struct QuantizedRows {
  std::vector<int8_t> q;         // [M, K]
  std::vector<float> d;          // [M, K/32] block scales
  std::vector<float> sum;        // [M, K/32] d * sum(xq): the block's sum as the kernel sees it
  std::vector<int32_t> half_sums;  // [M, K/16] sum(xq) per 16 values (q6_k's offset of 32)
};

// One block of 32 floats -> 32 int8 (q), its scale (d), d * sum(q) and the sums of
// q's two halves.
inline void quantize_block(const float* xb, int8_t* q, float* d, float* sum, int32_t* half_sums) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(xb + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  const float scale = hmax(amax) / 127.f;
  const __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  __m256i qi[4];
  __m256 halves[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int j = 0; j < 4; ++j) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    halves[j / 2] = _mm256_add_ps(halves[j / 2], r);
    qi[j] = _mm256_cvtps_epi32(r);
  }
  // packs works within 128-bit lanes; the permute puts the 32 bytes back in order.
  const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]);
  const __m256i p16b = _mm256_packs_epi32(qi[2], qi[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  // Small integers: their float sums are exact.
  half_sums[0] = static_cast<int32_t>(hsum(halves[0]));
  half_sums[1] = static_cast<int32_t>(hsum(halves[1]));
  *d = scale;
  *sum = scale * static_cast<float>(half_sums[0] + half_sums[1]);
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock;
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb),
                    std::vector<int32_t>(2 * M * nb)};
  at::parallel_for(0, M * nb, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_block(x + i * kBlock, out.q.data() + i * kBlock, &out.d[i], &out.sum[i], &out.half_sums[2 * i]);
  });
  return out;
}

// ---- int4 x int8 GEMM -----------------------------------------------------------
//
// With x quantized per block of 32 as above, a block's dot products are integer
// sums, and the layout below lets them run on 32-bit lanes that each hold one
// output column: per 4 values of K, one maddubs multiplies 8 columns x 4 weights
// by a broadcast of 4 activation bytes, with no horizontal sums. Nibbles (0..15)
// times int8 (|q| <= 127) stay within int16 for a whole block (8 maddubs of at
// most 2 x 15 x 127 each: 30480), so the int16 accumulators are widened and
// scaled once per block:
//
//   y[m, n] += d_w[n, b] * d_x[m, b] * (q_w . q_x) + min_w[n, b] * d_x[m, b] * sum(q_x)
//
// That is ~11 multiply-port instructions per 8 columns x 32 values where f32
// FMAs take 32. The packed layout (GemmTiles, built from the q4 blocks by
// QuantizedWeight.with_gemm_tiles), with N padded to a multiple of 8:
//
//   tiles  [N/8, K/32, 128] uint8: per 8 columns and block, 4 groups of 32 bytes;
//          byte 4c + r of group p holds column c's weight 8p + r (low nibble)
//          and 8p + 4 + r (high nibble)
//   tile_scales, tile_mins [N/8, K/32, 8] f16
//
// q4_k runs on the same nibbles with the scales of its super-blocks instead: each
// block's 6-bit sub-scales and sub-mins follow its nibbles (8 + 8 bytes: tiles
// [N/8, K/32, 144], so that one stream brings a tile's weights and scales), and
// the super-block's d and -dmin [N/8, K/256, 8] f16 multiply them in f32 per block
// (exactly the file's weights).
// q6_k (q6_gemm_tile) adds a plane of the weights' top 2 bits to the nibbles.
//
// Every per-tile tensor is stored as tile pairs (GemmTiles): [N/16, X, 2 W] for
// the [N/8, X, W] above, tiles 2p and 2p + 1 side by side per block (or
// super-block) x. The kernels take two column tiles at a time and a thread a run
// of pairs, so each tensor is one forward stream per thread; at one row of x
// (decode) that reads weights 30-50% faster than two streams that jump every
// K/32 blocks (docs/performance.md, "Tile pairs").

constexpr int64_t kTileCols = 8;
constexpr int64_t kTileBytes = 128;  // one block of 32 x 8 nibbles
constexpr int64_t kQ8TileBytes = 256;  // one block of 32 x 8 int8 weights
constexpr int64_t kQ4KTileBytes = 144;  // 32 x 8 nibbles, 8 sub-scales, 8 sub-mins
constexpr int64_t kQ6TileBytes = 192;  // 32 x 8 nibbles, then 32 x 8 x 2 high bits
constexpr int64_t kSuperBlocks = 8;    // blocks of 32 per K-quant super-block
constexpr int64_t kGemmRows = 4;     // rows of x per micro-kernel
constexpr int64_t kRowChunk = 32;    // rows of x kept cache-hot while every column tile passes

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// The index, in units of one tile's entry, of tile t's entry x of X in a tile-pair tensor.
inline int64_t at_pair(int64_t t, int64_t x, int64_t X) { return (((t >> 1) * X + x) << 1) | (t & 1); }

struct Tiles {
  const uint8_t* q;
  const Half* scales;  // q4, q8: [N/8, K/32, 8]
  const Half* mins;    // q4
  const uint8_t* sub_scales;  // q6_k: int8 [N/8, K/32, 2 x 8] (q4_k's are in its tiles)
  const Half* super_scales;   // q4_k, q6_k: d [N/8, K/256, 8]
  const Half* super_mins;     // q4_k: -dmin [N/8, K/256, 8]
  int64_t nb;
};

// Asks for the weight bytes of tile t's pair kPrefetchBlocks blocks ahead of block b
// (block_bytes per tile; past the pair's last block, the next pair's, as the thread
// will read them): at one or a few rows the kernels read weights faster than the
// hardware prefetcher alone brings them.
constexpr int64_t kPrefetchBlocks = 8;
inline void prefetch_ahead(const Tiles& w, int64_t t, int64_t b, int64_t block_bytes) {
  const uint8_t* pair_ahead = w.q + at_pair(t & ~int64_t{1}, b + kPrefetchBlocks, w.nb) * block_bytes;
  const char* ahead = reinterpret_cast<const char*>(pair_ahead);
  for (int64_t off = 0; off < 2 * block_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
}

inline __m256 load_halves(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load_u8_floats(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The f32 scale and min of block b of tile t's 8 columns: q4's f16 pair, or
// q4_k's d * sc and -dmin * m (products exact in f32: 11-bit d times 6-bit sc).
struct Q4Scales {
  static constexpr int64_t kBlockBytes = kTileBytes;
  static inline void load(const Tiles& w, int64_t t, int64_t b, __m256& dw, __m256& mw) {
    const int64_t s = at_pair(t, b, w.nb) * kTileCols;
    dw = load_halves(w.scales + s);
    mw = load_halves(w.mins + s);
  }
};

struct Q4KScales {
  static constexpr int64_t kBlockBytes = kQ4KTileBytes;  // the sub-scales and sub-mins follow the nibbles
  static inline void load(const Tiles& w, int64_t t, int64_t b, __m256& dw, __m256& mw) {
    const uint8_t* sub = w.q + at_pair(t, b, w.nb) * kBlockBytes + kTileBytes;
    const int64_t ss = at_pair(t, b / kSuperBlocks, w.nb / kSuperBlocks) * kTileCols;
    dw = _mm256_mul_ps(load_u8_floats(sub), load_halves(w.super_scales + ss));
    mw = _mm256_mul_ps(load_u8_floats(sub + kTileCols), load_halves(w.super_mins + ss));
  }
};

// Stores out[i][j] (8 columns of tile t + j) into rows r.. of y, clipping the
// padded columns of the last pair.
template <int MR, int NR>
inline void store_tile(const __m256 (&out)[MR][NR], int64_t r, int64_t t, float* y, int64_t N) {
  for (int j = 0; j < NR; ++j) {
    const int64_t n0 = (t + j) * kTileCols, cols = std::min<int64_t>(kTileCols, N - n0);
    if (cols <= 0) continue;
    for (int i = 0; i < MR; ++i) {
      float* dst = y + (r + i) * N + n0;
      if (cols == kTileCols) {
        _mm256_storeu_ps(dst, out[i][j]);
      } else {
        alignas(32) float tmp[kTileCols];
        _mm256_store_ps(tmp, out[i][j]);
        std::copy(tmp, tmp + cols, dst);
      }
    }
  }
}

// The integer dot-product steps of each instruction set (see gemm_tiles.h).
struct Avx2Dot {
  static constexpr bool kWide = false;   // no 512-bit registers
  // maddubs: pairs of u8 x s8 products summed into int16 lanes; a block's 8 steps of
  // nibbles (at most 2 x 15 x 127 each: 30480 in all) stay within int16.
  static inline __m256i nibbles(__m256i acc, __m256i w, __m256i x) {
    return _mm256_adds_epi16(acc, _mm256_maddubs_epi16(w, x));
  }
  static inline __m256i nibble_sums(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
  static inline __m256i bytes(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
  }
};

namespace avx2 {
using Dot = Avx2Dot;
template <int MR, class Scales>  // declared for gemm_tiles.h; AVX2 never runs them
void q4_gemm_pair_wide(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N);
template <int MR>
void q8_gemm_pair_wide(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N);
#include "gemm_tiles.h"
}  // namespace avx2

// AVX-512 VNNI (with VL): vpdpbusd sums four u8 x s8 products into each int32 lane
// in one instruction, where AVX2 takes maddubs + add (+ madd). The kernels run on
// 256-bit registers, which keep the tile layout, except the 4-bit and int8 ones on
// pairs of tiles (q4_gemm_pair_wide, q8_gemm_pair_wide): 8-10% more at 256 rows on
// the Zen 4 they were measured on, where 512-bit instructions cost no clock speed
// (on older Xeons they may).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
struct VnniDot {
  static constexpr bool kWide = true;   // 4-bit and int8 tile pairs on 512-bit registers (*_pair_wide)
  static inline __m256i nibbles(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  static inline __m256i nibble_sums(__m256i acc) { return acc; }
  static inline __m256i bytes(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
};

namespace vnni {
using Dot = VnniDot;
template <int MR, class Scales>
void q4_gemm_pair_wide(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N);
template <int MR>
void q8_gemm_pair_wide(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N);
#include "gemm_tiles.h"

inline __m512i broadcast4_wide(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

inline __m512i join(__m256i low, __m256i high) { return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1); }
inline __m512 join(__m256 low, __m256 high) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(low)), _mm256_castps_pd(high), 1));
}

// Stores the 16 columns of tiles t and t + 1 for MR rows (store_tile clips padding).
template <int MR>
inline void store_pair(const __m512 (&out)[MR], int64_t r, int64_t t, float* y, int64_t N) {
  __m256 halves[MR][2];
  for (int i = 0; i < MR; ++i) {
    halves[i][0] = _mm512_castps512_ps256(out[i]);
    halves[i][1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(out[i]), 1));
  }
  store_tile(halves, r, t, y, N);
}

// q4_gemm_tile for a pair of column tiles (NR = 2) on 512-bit registers: each
// instruction covers both tiles' 16 columns, so a block takes about half the
// instructions (8-10% faster at 256 rows on Zen 4, which splits a 512-bit
// vpdpbusd in two: fewer instructions, not more multiplies). The same integer
// sums and the same float operations per column as q4_gemm_tile: the same bits.
template <int MR, class Scales>
void q4_gemm_pair_wide(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
  const int64_t nb = w.nb;
  constexpr int64_t stride = Scales::kBlockBytes;
  constexpr int C = chains<MR>();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 out[MR];
  for (int i = 0; i < MR; ++i) out[i] = _mm512_setzero_ps();
  const int8_t* xq = xr.q.data() + r * K;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* first = w.q + at_pair(t, b, nb) * stride;
    const uint8_t* second = first + stride;
    prefetch_ahead(w, t, b, stride);
    __m512i acc[MR][C];
    for (int i = 0; i < MR; ++i)
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_si512();
    for (int p = 0; p < 4; ++p) {
      const __m512i raw = join(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + 32 * p)),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + 32 * p)));
      for (int half = 0; half < 2; ++half) {
        const __m512i wq = _mm512_and_si512(half ? _mm512_srli_epi16(raw, 4) : raw, mask);
        const int c = (2 * p + half) % C;
        for (int i = 0; i < MR; ++i)
          acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], wq, broadcast4_wide(xq + i * K + b * kBlock + 8 * p + 4 * half));
      }
    }
    __m256 dw0, mw0, dw1, mw1;
    Scales::load(w, t, b, dw0, mw0);
    Scales::load(w, t + 1, b, dw1, mw1);
    const __m512 dw = join(dw0, dw1), mw = join(mw0, mw1);
    for (int i = 0; i < MR; ++i) {
      const int64_t xi = (r + i) * nb + b;
      __m512i sum = acc[i][0];
      for (int c = 1; c < C; ++c) sum = _mm512_add_epi32(sum, acc[i][c]);
      const __m512 dots = _mm512_cvtepi32_ps(sum);
      out[i] = _mm512_fmadd_ps(_mm512_mul_ps(dots, _mm512_set1_ps(xr.d[xi])), dw, out[i]);
      out[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xr.sum[xi]), out[i]);
    }
  }
  store_pair(out, r, t, y, N);
}

// q8_gemm_tile for a pair of column tiles on 512-bit registers, as q4_gemm_pair_wide.
// AVX-512 has no vpsignb: x takes w's sign by a masked negation instead (|x| <= 127).
template <int MR>
void q8_gemm_pair_wide(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
  const int64_t nb = w.nb;
  constexpr int C = chains<MR>();
  const __m512i zero = _mm512_setzero_si512();
  __m512 out[MR];
  for (int i = 0; i < MR; ++i) out[i] = _mm512_setzero_ps();
  const int8_t* xq = xr.q.data() + r * K;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* first = w.q + at_pair(t, b, nb) * kQ8TileBytes;
    const uint8_t* second = first + kQ8TileBytes;
    prefetch_ahead(w, t, b, kQ8TileBytes);
    __m512i acc[MR][C];
    for (int i = 0; i < MR; ++i)
      for (int c = 0; c < C; ++c) acc[i][c] = zero;
    for (int p = 0; p < 8; ++p) {
      const __m512i wq = join(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + 32 * p)),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + 32 * p)));
      const __m512i wabs = _mm512_abs_epi8(wq);
      const __mmask64 negative = _mm512_movepi8_mask(wq);
      for (int i = 0; i < MR; ++i) {
        const __m512i xb = broadcast4_wide(xq + i * K + b * kBlock + 4 * p);
        acc[i][p % C] = _mm512_dpbusd_epi32(acc[i][p % C], wabs, _mm512_mask_sub_epi8(xb, negative, zero, xb));
      }
    }
    const Half* scales = w.scales + at_pair(t, b, nb) * kTileCols;  // the pair's 16, side by side
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
    for (int i = 0; i < MR; ++i) {
      __m512i sum = acc[i][0];
      for (int c = 1; c < C; ++c) sum = _mm512_add_epi32(sum, acc[i][c]);
      const __m512 dots = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xr.d[(r + i) * nb + b]));
      out[i] = _mm512_fmadd_ps(dots, dw, out[i]);
    }
  }
  store_pair(out, r, t, y, N);
}
}  // namespace vnni
#pragma GCC pop_options

// ---- which instruction set runs the GEMMs ----------------------------------------
//
// Chosen at run time from what the CPU reports (the library itself is built for
// AVX2, so one build runs on any x86-64 machine with AVX2); gemm_isa() can force
// the AVX2 path, which tests use to compare the two on a VNNI machine.

enum class Isa : int { kAvx2 = 0, kAvx512Vnni = 1 };

bool use_vnni();

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

std::atomic<int> g_isa{cpu_has_avx512_vnni() ? static_cast<int>(Isa::kAvx512Vnni) : static_cast<int>(Isa::kAvx2)};

inline Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }
bool use_vnni() { return active_isa() == Isa::kAvx512Vnni; }

// The GEMM of one tile kind on the active instruction set.
template <template <int, int> class Avx2Tile, template <int, int> class VnniTile>
at::Tensor run_gemm(const at::Tensor& x, const Tiles& w, int64_t pairs, int64_t N) {
  return use_vnni() ? vnni::tiled_gemm<VnniTile>(x, w, pairs, N) : avx2::tiled_gemm<Avx2Tile>(x, w, pairs, N);
}

void check_gemm_input(const char* op, const at::Tensor& x, const at::Tensor& tiles, at::ScalarType tile_type,
                      int64_t tile_bytes, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              op, ": x must be a contiguous float32 CPU matrix");
  const int64_t K = x.size(1), nb = K / kBlock, pairs = (N + 2 * kTileCols - 1) / (2 * kTileCols);
  TORCH_CHECK(K % kBlock == 0, op, ": K must be a multiple of ", kBlock);
  TORCH_CHECK(tiles.scalar_type() == tile_type && tiles.is_contiguous() && tiles.dim() == 3 &&
                  tiles.size(0) == pairs && tiles.size(1) == nb && tiles.size(2) == 2 * tile_bytes,
              op, ": tiles must be ", tile_type, " tile pairs [ceil(N/16), K/32, 2 x ", tile_bytes, "]");
}

void check_tile_halves(const char* op, const at::Tensor& t, const at::Tensor& tiles) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 3 && t.size(0) == tiles.size(0) &&
                  t.size(1) == tiles.size(1) && t.size(2) == 2 * kTileCols,
              op, ": tile scales and mins must be float16 tile pairs [ceil(N/16), K/32, 2 x 8]");
}

// A K-quant tensor of the tiles' (super-)blocks: `type` tile pairs [ceil(N/16), K/32 / per, 2 x width].
void check_super_tensor(const char* op, const char* what, const at::Tensor& t, const at::Tensor& tiles,
                        at::ScalarType type, int64_t per, int64_t width) {
  TORCH_CHECK(tiles.size(1) % kSuperBlocks == 0, op, ": K must be a multiple of 256 (super-blocks)");
  TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.dim() == 3 && t.size(0) == tiles.size(0) &&
                  t.size(1) == tiles.size(1) / per && t.size(2) == 2 * width,
              op, ": ", what, " must be ", type, " tile pairs [ceil(N/16), K/", 32 * per, ", 2 x ", width, "]");
}

}  // namespace

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& tile_scales,
                   const at::Tensor& tile_mins, int64_t N) {
  check_gemm_input("q4_gemm", x, tiles, at::kByte, kTileBytes, N);
  check_tile_halves("q4_gemm", tile_scales, tiles);
  check_tile_halves("q4_gemm", tile_mins, tiles);
  const Tiles w{tiles.data_ptr<uint8_t>(), half_data(tile_scales), half_data(tile_mins), nullptr, nullptr,
                nullptr, tiles.size(1)};
  return run_gemm<avx2::Q4Tile, vnni::Q4Tile>(x, w, tiles.size(0), N);
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& tile_scales, int64_t N) {
  check_gemm_input("q8_gemm", x, tiles, at::kChar, kQ8TileBytes, N);
  check_tile_halves("q8_gemm", tile_scales, tiles);
  const Tiles w{reinterpret_cast<const uint8_t*>(tiles.data_ptr<int8_t>()), half_data(tile_scales), nullptr,
                nullptr, nullptr, nullptr, tiles.size(1)};
  return run_gemm<avx2::Q8Tile, vnni::Q8Tile>(x, w, tiles.size(0), N);
}

static at::Tensor q4k_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& super_scales,
                    const at::Tensor& super_mins, int64_t N) {
  check_gemm_input("q4k_gemm", x, tiles, at::kByte, kQ4KTileBytes, N);
  check_super_tensor("q4k_gemm", "super-block scales", super_scales, tiles, at::kHalf, kSuperBlocks, kTileCols);
  check_super_tensor("q4k_gemm", "super-block mins", super_mins, tiles, at::kHalf, kSuperBlocks, kTileCols);
  const Tiles w{tiles.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, half_data(super_scales),
                half_data(super_mins), tiles.size(1)};
  return run_gemm<avx2::Q4KTile, vnni::Q4KTile>(x, w, tiles.size(0), N);
}

static at::Tensor q6k_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& sub_scales,
                    const at::Tensor& super_scales, int64_t N) {
  check_gemm_input("q6k_gemm", x, tiles, at::kByte, kQ6TileBytes, N);
  check_super_tensor("q6k_gemm", "sub-scales", sub_scales, tiles, at::kChar, 1, 2 * kTileCols);
  check_super_tensor("q6k_gemm", "super-block scales", super_scales, tiles, at::kHalf, kSuperBlocks, kTileCols);
  const Tiles w{tiles.data_ptr<uint8_t>(), nullptr, nullptr, reinterpret_cast<const uint8_t*>(sub_scales.data_ptr<int8_t>()),
                half_data(super_scales), nullptr, tiles.size(1)};
  return run_gemm<avx2::Q6Tile, vnni::Q6Tile>(x, w, tiles.size(0), N);
}

at::Tensor quant_gemm_from(const at::Tensor& x, int64_t format, const c10::List<std::optional<at::Tensor>>& weights,
                           int64_t first, int64_t N) {
  TORCH_CHECK(first >= 0 && first + kQuantWeightTensors <= static_cast<int64_t>(weights.size()),
              "quant_gemm: expected ", kQuantWeightTensors, " weight tensors (tiles, scales, mins, super-block "
              "scales and mins; None where the format has none)");
  const auto at = [&](int64_t i) -> at::Tensor {
    const std::optional<at::Tensor> t = weights.get(first + i);
    TORCH_CHECK(t.has_value(), "quant_gemm: format ", format, " needs weight tensor ", i);
    return *t;
  };
  switch (static_cast<QuantFormat>(format)) {
    case QuantFormat::kInt8: return q8_gemm(x, at(0), at(1), N);
    case QuantFormat::kInt4: return q4_gemm(x, at(0), at(1), at(2), N);
    case QuantFormat::kQ4K: return q4k_gemm(x, at(0), at(3), at(4), N);
    case QuantFormat::kQ6K: return q6k_gemm(x, at(0), at(1), at(3), N);
  }
  TORCH_CHECK(false, "quant_gemm: unknown format ", format);
}

at::Tensor quant_gemm(const at::Tensor& x, int64_t format, const c10::List<std::optional<at::Tensor>>& weight,
                      int64_t N) {
  TORCH_CHECK(static_cast<int64_t>(weight.size()) == kQuantWeightTensors, "quant_gemm: expected ",
              kQuantWeightTensors, " weight tensors, got ", weight.size());
  return quant_gemm_from(x, format, weight, 0, N);
}

std::string gemm_isa(const std::string& choice) {
  if (choice == "auto") {
    g_isa = static_cast<int>(cpu_has_avx512_vnni() ? Isa::kAvx512Vnni : Isa::kAvx2);
  } else if (choice == "avx2") {
    g_isa = static_cast<int>(Isa::kAvx2);
  } else if (choice == "avx512_vnni") {
    TORCH_CHECK(cpu_has_avx512_vnni(), "gemm_isa: this CPU has no AVX-512 VNNI (with F, BW and VL)");
    g_isa = static_cast<int>(Isa::kAvx512Vnni);
  } else {
    TORCH_CHECK(choice.empty(), "gemm_isa: choose auto, avx2 or avx512_vnni, not '", choice, "'");
  }
  return active_isa() == Isa::kAvx512Vnni ? "avx512_vnni" : "avx2";
}

}  // namespace tokenloom

TORCH_LIBRARY_FRAGMENT(tokenloom, m) {
  m.def("q4_gemm(Tensor x, Tensor tiles, Tensor tile_scales, Tensor tile_mins, int N) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor tiles, Tensor tile_scales, int N) -> Tensor");
  m.def("quant_gemm(Tensor x, int format, Tensor?[] weight, int N) -> Tensor");
  m.def("gemm_isa(str choice='') -> str");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("q4_gemm", &tokenloom::q4_gemm);
  m.impl("q8_gemm", &tokenloom::q8_gemm);
  m.impl("quant_gemm", &tokenloom::quant_gemm);
}

// No tensor arguments: registered for every backend.
TORCH_LIBRARY_IMPL(tokenloom, CompositeExplicitAutograd, m) { m.impl("gemm_isa", &tokenloom::gemm_isa); }
