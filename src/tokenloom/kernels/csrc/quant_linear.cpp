// Quantized linear layers, AVX2 + FMA + F16C: q4_gemm and q8_gemm, the products
// y[M, N] = x[M, K] @ W^T of every quantized weight, at every batch size.
//
// W is stored in blocks of 32 weights along K, in the layouts of llama.cpp's
// Q4_1 / Q8_0 (f16 block scales, as in the file), re-laid out into tiles of 8
// output columns (QuantizedWeight.with_gemm_tiles, layers/quantization.py):
//
//   q4: W[n, 32b + j] = scale[n, b] * nibble + min[n, b]
//   q8: W[n, 32b + j] = scale[n, b] * q
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
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K/32] block scales
  std::vector<float> sum;  // [M, K/32] d * sum(xq): the block's sum as the kernel sees it
};

// One block of 32 floats -> 32 int8 (q), its scale (d) and d * sum(q).
inline void quantize_block(const float* xb, int8_t* q, float* d, float* sum) {
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
  __m256 total = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    total = _mm256_add_ps(total, r);
    qi[j] = _mm256_cvtps_epi32(r);
  }
  // packs works within 128-bit lanes; the permute puts the 32 bytes back in order.
  const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]);
  const __m256i p16b = _mm256_packs_epi32(qi[2], qi[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  *d = scale;
  *sum = scale * hsum(total);
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / kBlock;
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  at::parallel_for(0, M * nb, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_block(x + i * kBlock, out.q.data() + i * kBlock, &out.d[i], &out.sum[i]);
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

constexpr int64_t kTileCols = 8;
constexpr int64_t kTileBytes = 128;  // one block of 32 x 8 nibbles
constexpr int64_t kQ8TileBytes = 256;  // one block of 32 x 8 int8 weights
constexpr int64_t kGemmRows = 4;     // rows of x per micro-kernel
constexpr int64_t kRowChunk = 32;    // rows of x kept cache-hot while every column tile passes

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

struct Tiles {
  const uint8_t* q;
  const Half* scales;
  const Half* mins;  // int4 only
  int64_t nb;
};

// Stores out[i][j] (8 columns of tile t + j) into rows r.. of y, clipping the
// padded columns of the last tile.
template <int MR, int NR>
inline void store_tile(const __m256 (&out)[MR][NR], int64_t r, int64_t t, float* y, int64_t N) {
  for (int j = 0; j < NR; ++j) {
    const int64_t n0 = (t + j) * kTileCols, cols = std::min<int64_t>(kTileCols, N - n0);
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
#include "gemm_tiles.h"
}  // namespace avx2

// AVX-512 VNNI (with VL, on 256-bit registers): vpdpbusd sums four u8 x s8 products
// into each int32 lane in one instruction, where AVX2 takes maddubs + add (+ madd).
// 256-bit registers keep the tile layout and avoid the clock drop of 512-bit ones.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
struct VnniDot {
  static inline __m256i nibbles(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  static inline __m256i nibble_sums(__m256i acc) { return acc; }
  static inline __m256i bytes(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
};

namespace vnni {
using Dot = VnniDot;
#include "gemm_tiles.h"
}  // namespace vnni
#pragma GCC pop_options

// ---- which instruction set runs the GEMMs ----------------------------------------
//
// Chosen at run time from what the CPU reports (the library itself is built for
// AVX2, so one build runs on any x86-64 machine with AVX2); gemm_isa() can force
// the AVX2 path, which tests use to compare the two on a VNNI machine.

enum class Isa : int { kAvx2 = 0, kAvx512Vnni = 1 };

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

std::atomic<int> g_isa{cpu_has_avx512_vnni() ? static_cast<int>(Isa::kAvx512Vnni) : static_cast<int>(Isa::kAvx2)};

inline Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

void check_gemm_input(const char* op, const at::Tensor& x, const at::Tensor& tiles, at::ScalarType tile_type,
                      int64_t tile_bytes, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              op, ": x must be a contiguous float32 CPU matrix");
  const int64_t K = x.size(1), nb = K / kBlock, num_tiles = (N + kTileCols - 1) / kTileCols;
  TORCH_CHECK(K % kBlock == 0, op, ": K must be a multiple of ", kBlock);
  TORCH_CHECK(tiles.scalar_type() == tile_type && tiles.is_contiguous() && tiles.dim() == 3 &&
                  tiles.size(0) == num_tiles && tiles.size(1) == nb && tiles.size(2) == tile_bytes,
              op, ": tiles must be ", tile_type, " [ceil(N/8), K/32, ", tile_bytes, "]");
}

void check_tile_halves(const char* op, const at::Tensor& t, const at::Tensor& tiles) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 3 && t.size(0) == tiles.size(0) &&
                  t.size(1) == tiles.size(1) && t.size(2) == kTileCols,
              op, ": tile scales and mins must be float16 [ceil(N/8), K/32, 8]");
}

}  // namespace

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& tile_scales,
                   const at::Tensor& tile_mins, int64_t N) {
  check_gemm_input("q4_gemm", x, tiles, at::kByte, kTileBytes, N);
  check_tile_halves("q4_gemm", tile_scales, tiles);
  check_tile_halves("q4_gemm", tile_mins, tiles);
  const Tiles w{tiles.data_ptr<uint8_t>(), half_data(tile_scales), half_data(tile_mins), tiles.size(1)};
  return active_isa() == Isa::kAvx512Vnni ? vnni::tiled_gemm<vnni::Q4Tile>(x, w, tiles.size(0), N)
                                           : avx2::tiled_gemm<avx2::Q4Tile>(x, w, tiles.size(0), N);
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& tile_scales, int64_t N) {
  check_gemm_input("q8_gemm", x, tiles, at::kChar, kQ8TileBytes, N);
  check_tile_halves("q8_gemm", tile_scales, tiles);
  const Tiles w{reinterpret_cast<const uint8_t*>(tiles.data_ptr<int8_t>()), half_data(tile_scales), nullptr,
                tiles.size(1)};
  return active_isa() == Isa::kAvx512Vnni ? vnni::tiled_gemm<vnni::Q8Tile>(x, w, tiles.size(0), N)
                                           : avx2::tiled_gemm<avx2::Q8Tile>(x, w, tiles.size(0), N);
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
  m.def("gemm_isa(str choice='') -> str");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("q4_gemm", &tokenloom::q4_gemm);
  m.impl("q8_gemm", &tokenloom::q8_gemm);
}

// No tensor arguments: registered for every backend.
TORCH_LIBRARY_IMPL(tokenloom, CompositeExplicitAutograd, m) { m.impl("gemm_isa", &tokenloom::gemm_isa); }
