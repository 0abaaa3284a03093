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
#include <cstdint>
#include <cstring>
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

// y[0:MR, 8 NR columns from tile t] for MR rows of quantized x starting at row r.
template <int MR, int NR>
void q4_gemm_tile(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
  const int64_t nb = w.nb;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 out[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = _mm256_setzero_ps();
  const int8_t* xq = xr.q.data() + r * K;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    for (int p = 0; p < 4; ++p) {
      __m256i raw[NR];
      for (int j = 0; j < NR; ++j)
        raw[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + ((t + j) * nb + b) * kTileBytes + 32 * p));
      for (int half = 0; half < 2; ++half) {  // low nibbles: weights 8p..8p+3, high: 8p+4..8p+7
        __m256i wq[NR];
        for (int j = 0; j < NR; ++j) wq[j] = _mm256_and_si256(half ? _mm256_srli_epi16(raw[j], 4) : raw[j], mask);
        for (int i = 0; i < MR; ++i) {
          const __m256i xb = broadcast4(xq + i * K + b * kBlock + 8 * p + 4 * half);
          for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_adds_epi16(acc[i][j], _mm256_maddubs_epi16(wq[j], xb));
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const int64_t s = ((t + j) * nb + b) * kTileCols;
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales + s)));
      const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.mins + s)));
      for (int i = 0; i < MR; ++i) {
        const int64_t xi = (r + i) * nb + b;
        const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[i][j], ones));
        out[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(dots, _mm256_set1_ps(xr.d[xi])), dw, out[i][j]);
        out[i][j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xr.sum[xi]), out[i][j]);
      }
    }
  }
  store_tile(out, r, t, y, N);
}

// The same for int8 weights (Q8_0), one column tile at a time: tiles
// [N/8, K/32, 256] int8, per 8 columns and block 8 groups of 32 bytes, byte
// 4c + r of group p holding column c's weight 4p + r; no mins. maddubs wants
// one unsigned operand, so it multiplies |w| by x carrying w's sign (llama.cpp's
// trick for signed x signed). A pair of products (up to 2 x 127 x 127) fills an
// int16, so each maddubs is widened to int32 at once (madd by ones) rather than
// summed over the block in int16. Two tiles at once (as q4 does) measured
// slower: their int32 accumulators and outputs no longer fit in 16 registers.
template <int MR>
void q8_gemm_tile(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
  const int64_t nb = w.nb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 out[MR][1];
  for (int i = 0; i < MR; ++i) out[i][0] = _mm256_setzero_ps();
  const int8_t* xq = xr.q.data() + r * K;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
    const uint8_t* block = w.q + (t * nb + b) * kQ8TileBytes;
    for (int p = 0; p < 8; ++p) {
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * p));
      const __m256i wabs = _mm256_sign_epi8(wq, wq);
      for (int i = 0; i < MR; ++i) {
        const __m256i xb = broadcast4(xq + i * K + b * kBlock + 4 * p);
        const __m256i prod = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xb, wq));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(prod, ones));
      }
    }
    const __m256 dw =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales + (t * nb + b) * kTileCols)));
    for (int i = 0; i < MR; ++i) {
      const __m256 dots = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i]), _mm256_set1_ps(xr.d[(r + i) * nb + b]));
      out[i][0] = _mm256_fmadd_ps(dots, dw, out[i][0]);
    }
  }
  store_tile(out, r, t, y, N);
}

// Rows r0..r1 of y for tiles t.. t + NR - 1, kGemmRows rows at a time.
template <int NR, template <int, int> class Tile>
struct GemmRows {
  static void run(const QuantizedRows& xr, int64_t r0, int64_t r1, int64_t K, const Tiles& w, int64_t t, float* y,
                  int64_t N) {
    int64_t r = r0;
    for (; r + kGemmRows <= r1; r += kGemmRows) Tile<kGemmRows, NR>::run(xr, r, K, w, t, y, N);
    switch (r1 - r) {
      case 3: Tile<3, NR>::run(xr, r, K, w, t, y, N); break;
      case 2: Tile<2, NR>::run(xr, r, K, w, t, y, N); break;
      case 1: Tile<1, NR>::run(xr, r, K, w, t, y, N); break;
      default: break;
    }
  }
};

template <int MR, int NR>
struct Q4Tile {
  static void run(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
    q4_gemm_tile<MR, NR>(xr, r, K, w, t, y, N);
  }
};

template <int MR, int NR>
struct Q8Tile {
  static void run(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
    for (int j = 0; j < NR; ++j) q8_gemm_tile<MR>(xr, r, K, w, t + j, y, N);
  }
};

// y = x @ W^T over column tiles in pairs (the parallel loop), rows of x in
// chunks of kRowChunk so that a chunk's int8 rows stay in cache while every
// tile passes over them.
template <template <int, int> class Tile>
at::Tensor tiled_gemm(const at::Tensor& x, const Tiles& w, int64_t num_tiles, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K);
  float* yp = y.data_ptr<float>();
  const int64_t pairs = (num_tiles + 1) / 2;
  for (int64_t r0 = 0; r0 < M; r0 += kRowChunk) {
    const int64_t r1 = std::min(M, r0 + kRowChunk);
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t t = 2 * pair;
        if (t + 1 < num_tiles) {
          GemmRows<2, Tile>::run(xr, r0, r1, K, w, t, yp, N);
        } else {
          GemmRows<1, Tile>::run(xr, r0, r1, K, w, t, yp, N);
        }
      }
    });
  }
  return y;
}

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
  return tiled_gemm<Q4Tile>(x, w, tiles.size(0), N);
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& tile_scales, int64_t N) {
  check_gemm_input("q8_gemm", x, tiles, at::kChar, kQ8TileBytes, N);
  check_tile_halves("q8_gemm", tile_scales, tiles);
  const Tiles w{reinterpret_cast<const uint8_t*>(tiles.data_ptr<int8_t>()), half_data(tile_scales), nullptr,
                tiles.size(1)};
  return tiled_gemm<Q8Tile>(x, w, tiles.size(0), N);
}

}  // namespace tokenloom

TORCH_LIBRARY_FRAGMENT(tokenloom, m) {
  m.def("q4_gemm(Tensor x, Tensor tiles, Tensor tile_scales, Tensor tile_mins, int N) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor tiles, Tensor tile_scales, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("q4_gemm", &tokenloom::q4_gemm);
  m.impl("q8_gemm", &tokenloom::q8_gemm);
}
