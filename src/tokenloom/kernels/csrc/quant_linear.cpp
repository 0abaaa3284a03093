// Quantized linear layers, AVX2 + FMA + F16C. Three families, in this file's order:
//
//   q4_linear, q8_linear        f32 activations, up to ~32 rows (below)
//   q4_linear_i8, q8_linear_i8  activations quantized to int8 per block of 32, a few rows
//   q4_gemm, q8_gemm            int8 activations x weights re-laid out in tiles, any rows
//
// y[M, N] = x[M, K] @ W^T where W is stored in blocks of 32 weights along K,
// in the layouts of llama.cpp's Q4_1 / Q8_0 (f16 block scales, as in the file):
//
//   q4: qweight [N, K/2] uint8, scales [N, K/32], mins [N, K/32]
//       byte j of a block holds weight j (low nibble) and weight j+16 (high):
//       W[n, 32b + j] = scales[n, b] * nibble + mins[n, b]
//   q8: qweight [N, K] int8, scales [N, K/32]
//       W[n, 32b + j] = scales[n, b] * q
//
// Decode is bound by reading the weights, so each weight block is read from
// memory once per call: output rows are the outer (parallel) loop and every
// row of x (small, cache resident) is visited while the weight row is near.
// Activations stay f32, so the only error against the dense f32 product of
// the same weights is summation order.
//
//   M <= kDirectRows   each block is dequantized into registers and used at once
//   M >  kDirectRows   (batched decode, compute bound) two weight rows at a time
//                      are dequantized into an L1 scratch row, then a 4 x 2
//                      register-blocked f32 micro-kernel runs over all M rows

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace tokenloom {
namespace {

using tokenloom_vec::hmax;
using tokenloom_vec::hsum;

constexpr int64_t kBlock = 32;

// Block scales and mins are IEEE half floats (the GGUF's own); F16C widens them.
using Half = uint16_t;
inline float f16(Half h) { return _cvtsh_ss(h); }
constexpr int64_t kRowTile = 4;  // rows of x sharing one dequantized block
constexpr int64_t kDirectRows = 4;  // larger batches take the scratch-row path

inline __m256 bytes_to_ps_u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 bytes_to_ps_i8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// One block of 32 weights as four vectors of 8 f32.
struct Block {
  __m256 w[4];
};

inline Block load_q4(const uint8_t* q, float scale, float min) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(packed, mask);                     // weights 0..15
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);  // weights 16..31
  const __m256 d = _mm256_set1_ps(scale);
  const __m256 m = _mm256_set1_ps(min);
  Block b;
  b.w[0] = _mm256_fmadd_ps(bytes_to_ps_u8(lo), d, m);
  b.w[1] = _mm256_fmadd_ps(bytes_to_ps_u8(_mm_unpackhi_epi64(lo, lo)), d, m);
  b.w[2] = _mm256_fmadd_ps(bytes_to_ps_u8(hi), d, m);
  b.w[3] = _mm256_fmadd_ps(bytes_to_ps_u8(_mm_unpackhi_epi64(hi, hi)), d, m);
  return b;
}

inline Block load_q8(const int8_t* q, float scale) {
  const __m256 d = _mm256_set1_ps(scale);
  Block b;
  for (int i = 0; i < 4; ++i) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
    b.w[i] = _mm256_mul_ps(bytes_to_ps_i8(v), d);
  }
  return b;
}

// Dot products of one weight row with ROWS rows of x. Two accumulators per
// row keep the FMA dependency chains short enough to hide their latency.
template <int ROWS, typename LoadBlock>
inline void dot_rows(const float* x, int64_t x_stride, int64_t num_blocks, LoadBlock load_block,
                     float* y, int64_t y_stride) {
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const Block blk = load_block(b);
    for (int r = 0; r < ROWS; ++r) {
      const float* xb = x + r * x_stride + b * kBlock;
      acc[r][0] = _mm256_fmadd_ps(blk.w[0], _mm256_loadu_ps(xb), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(blk.w[1], _mm256_loadu_ps(xb + 8), acc[r][1]);
      acc[r][0] = _mm256_fmadd_ps(blk.w[2], _mm256_loadu_ps(xb + 16), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(blk.w[3], _mm256_loadu_ps(xb + 24), acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r * y_stride] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// Every row of x against weight row n, in tiles of kRowTile rows.
template <typename LoadBlock>
inline void output_column(const float* x, int64_t M, int64_t K, LoadBlock load_block, float* y,
                          int64_t N) {
  const int64_t num_blocks = K / kBlock;
  int64_t r = 0;
  for (; r + kRowTile <= M; r += kRowTile)
    dot_rows<kRowTile>(x + r * K, K, num_blocks, load_block, y + r * N, N);
  switch (M - r) {
    case 3: dot_rows<3>(x + r * K, K, num_blocks, load_block, y + r * N, N); break;
    case 2: dot_rows<2>(x + r * K, K, num_blocks, load_block, y + r * N, N); break;
    case 1: dot_rows<1>(x + r * K, K, num_blocks, load_block, y + r * N, N); break;
    default: break;
  }
}

// Four rows of x against two dequantized weight rows w0, w1 (K floats each):
// 8 independent accumulators keep both FMA ports busy. (Three weight rows, by
// three or four rows of x, measured about 2x slower.)
template <int ROWS>
inline void micro_kernel(const float* x, int64_t K, const float* w0, const float* w1, float* y,
                         int64_t N, bool second) {
  __m256 acc0[ROWS], acc1[ROWS];
  for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 a = _mm256_loadu_ps(w0 + k);
    const __m256 b = _mm256_loadu_ps(w1 + k);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      acc0[r] = _mm256_fmadd_ps(a, xv, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(b, xv, acc1[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    y[r * N] = hsum(acc0[r]);
    if (second) y[r * N + 1] = hsum(acc1[r]);
  }
}

// The batched path: weight rows in pairs, each pair dequantized once into
// scratch (2 K floats, L1 resident) and swept over every row of x.
template <typename DequantRow>
void batched_linear(const float* x, int64_t M, int64_t K, int64_t N, DequantRow dequant_row, float* y) {
  const int64_t pairs = (N + 1) / 2;
  at::parallel_for(0, pairs, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * K);
    float* w0 = scratch.data();
    float* w1 = w0 + K;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = 2 * p;
      const bool second = n + 1 < N;
      dequant_row(n, w0);
      dequant_row(second ? n + 1 : n, w1);
      int64_t r = 0;
      for (; r + kRowTile <= M; r += kRowTile)
        micro_kernel<kRowTile>(x + r * K, K, w0, w1, y + r * N + n, N, second);
      for (; r < M; ++r) micro_kernel<1>(x + r * K, K, w0, w1, y + r * N + n, N, second);
    }
  });
}

template <typename LoadBlock>
inline void store_row(int64_t num_blocks, LoadBlock load_block, float* out) {
  for (int64_t b = 0; b < num_blocks; ++b) {
    const Block blk = load_block(b);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * kBlock + 8 * i, blk.w[i]);
  }
}

inline const Half* half_data(const at::Tensor& t) { return reinterpret_cast<const Half*>(t.data_ptr<at::Half>()); }

void check_common(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  int64_t bytes_per_block) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(),
              "quantized linear: x, qweight and scales must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantized linear: x must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quantized linear: x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.size(1) % kBlock == 0, "quantized linear: K (", x.size(1), ") must be a multiple of 32");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "quantized linear: qweight must be contiguous 2-D");
  TORCH_CHECK(qweight.size(1) == x.size(1) / kBlock * bytes_per_block, "quantized linear: qweight has ",
              qweight.size(1), " bytes per row, expected ", x.size(1) / kBlock * bytes_per_block,
              " for K = ", x.size(1));
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({qweight.size(0), x.size(1) / kBlock}),
              "quantized linear: scales must be contiguous float16 [N, K/32]");
}

void check_q4(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
              const at::Tensor& mins) {
  check_common(x, qweight, scales, kBlock / 2);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8");
  TORCH_CHECK(mins.scalar_type() == at::kHalf && mins.is_contiguous() && mins.sizes() == scales.sizes(), op,
              ": mins must be contiguous float16 shaped like scales");
}

void check_q8(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_common(x, qweight, scales, kBlock);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8");
}

// Rows of output per parallel task: enough work to amortise the task, enough
// tasks to keep every thread busy on the smallest projections.
int64_t grain_for(int64_t M) { return std::max<int64_t>(8, 256 / std::max<int64_t>(M, 1)); }

}  // namespace

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins) {
  check_q4("q4_linear", x, qweight, scales, mins);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), num_blocks = K / kBlock;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const Half* sp = half_data(scales);
  const Half* mp = half_data(mins);
  float* yp = y.data_ptr<float>();
  if (M > kDirectRows) {
    batched_linear(xp, M, K, N, [&](int64_t n, float* out) {
      const uint8_t* qrow = qp + n * (K / 2);
      store_row(num_blocks, [&](int64_t b) {
        return load_q4(qrow + b * (kBlock / 2), f16(sp[n * num_blocks + b]), f16(mp[n * num_blocks + b]));
      }, out);
    }, yp);
    return y;
  }
  at::parallel_for(0, N, grain_for(M), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* qrow = qp + n * (K / 2);
      const Half* srow = sp + n * num_blocks;
      const Half* mrow = mp + n * num_blocks;
      auto load = [&](int64_t b) { return load_q4(qrow + b * (kBlock / 2), f16(srow[b]), f16(mrow[b])); };
      output_column(xp, M, K, load, yp + n, N);
    }
  });
  return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_q8("q8_linear", x, qweight, scales);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), num_blocks = K / kBlock;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const Half* sp = half_data(scales);
  float* yp = y.data_ptr<float>();
  if (M > kDirectRows) {
    batched_linear(xp, M, K, N, [&](int64_t n, float* out) {
      store_row(num_blocks, [&](int64_t b) { return load_q8(qp + n * K + b * kBlock, f16(sp[n * num_blocks + b])); },
                out);
    }, yp);
    return y;
  }
  at::parallel_for(0, N, grain_for(M), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* qrow = qp + n * K;
      const Half* srow = sp + n * num_blocks;
      auto load = [&](int64_t b) { return load_q8(qrow + b * kBlock, f16(srow[b])); };
      output_column(xp, M, K, load, yp + n, N);
    }
  });
  return y;
}

namespace {

// ---- int8 activations (decode-sized batches) --------------------------------
//
// The f32 path above is bound by turning each weight into a float (about 26
// instructions per block of 32). Quantizing the few rows of x to int8 per
// block of 32 (llama.cpp's Q8 scheme: xd = max|x| / 127, xq = round(x / xd))
// lets a block's dot product run on integers (maddubs: u8 x s8 pairs -> s16,
// madd -> s32), about half the instructions, with one float FMA per block:
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

// The 32 nibbles of a q4 block as bytes in weight order (0..15 low, 16..31 high).
inline __m256i q4_bytes(const uint8_t* q) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
}

inline __m256 dot_u8_s8(__m256i u, __m256i s) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

template <int ROWS>
inline void q4_i8_rows(const QuantizedRows& xr, int64_t r0, int64_t nb, const uint8_t* qrow, const Half* srow,
                       const Half* mrow, float* y, int64_t N) {
  __m256 acc[ROWS];
  float offset[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i w = q4_bytes(qrow + b * (kBlock / 2));
    for (int r = 0; r < ROWS; ++r) {
      const int64_t i = (r0 + r) * nb + b;
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q.data() + i * kBlock));
      acc[r] = _mm256_fmadd_ps(dot_u8_s8(w, xq), _mm256_set1_ps(f16(srow[b]) * xr.d[i]), acc[r]);
      offset[r] += f16(mrow[b]) * xr.sum[i];
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r * N] = hsum(acc[r]) + offset[r];
}

template <int ROWS>
inline void q8_i8_rows(const QuantizedRows& xr, int64_t r0, int64_t nb, const int8_t* qrow, const Half* srow,
                       float* y, int64_t N) {
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + b * kBlock));
    const __m256i wabs = _mm256_sign_epi8(w, w);  // |w| as u8 (weights lie in [-127, 127])
    for (int r = 0; r < ROWS; ++r) {
      const int64_t i = (r0 + r) * nb + b;
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q.data() + i * kBlock));
      acc[r] = _mm256_fmadd_ps(dot_u8_s8(wabs, _mm256_sign_epi8(xq, w)), _mm256_set1_ps(f16(srow[b]) * xr.d[i]),
                               acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r * N] = hsum(acc[r]);
}

// Rows of x in tiles of up to kDirectRows, one weight row at a time.
template <typename Rows>
inline void each_row_tile(int64_t M, Rows rows) {
  for (int64_t r = 0; r < M; r += kDirectRows) {
    switch (std::min<int64_t>(kDirectRows, M - r)) {
      case 4: rows(std::integral_constant<int, 4>{}, r); break;
      case 3: rows(std::integral_constant<int, 3>{}, r); break;
      case 2: rows(std::integral_constant<int, 2>{}, r); break;
      default: rows(std::integral_constant<int, 1>{}, r); break;
    }
  }
}

}  // namespace

at::Tensor q4_linear_i8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& mins) {
  check_q4("q4_linear_i8", x, qweight, scales, mins);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), nb = K / kBlock;
  at::Tensor y = at::empty({M, N}, x.options());
  const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K);
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const Half* sp = half_data(scales);
  const Half* mp = half_data(mins);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_for(M), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      each_row_tile(M, [&](auto rows, int64_t r) {
        q4_i8_rows<decltype(rows)::value>(xr, r, nb, qp + n * (K / 2), sp + n * nb, mp + n * nb, yp + r * N + n, N);
      });
  });
  return y;
}

at::Tensor q8_linear_i8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_q8("q8_linear_i8", x, qweight, scales);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), nb = K / kBlock;
  at::Tensor y = at::empty({M, N}, x.options());
  const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K);
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const Half* sp = half_data(scales);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_for(M), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      each_row_tile(M, [&](auto rows, int64_t r) {
        q8_i8_rows<decltype(rows)::value>(xr, r, nb, qp + n * K, sp + n * nb, yp + r * N + n, N);
      });
  });
  return y;
}

namespace {

// ---- int4 x int8 GEMM (prefill, batched decode) ------------------------------
//
// Past a few rows the matmul is bound by arithmetic, not by weight bytes. With
// x quantized per block of 32 as above, a block's dot products are integer
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
// FMAs take 32. The packed layout (QuantizedWeight.tiles, built from the q4
// blocks by pack_q4_tiles in quantization.py), with N padded to a multiple of 8:
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
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("q4_linear_i8(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("q8_linear_i8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("q4_gemm(Tensor x, Tensor tiles, Tensor tile_scales, Tensor tile_mins, int N) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor tiles, Tensor tile_scales, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("q4_linear", &tokenloom::q4_linear);
  m.impl("q8_linear", &tokenloom::q8_linear);
  m.impl("q4_linear_i8", &tokenloom::q4_linear_i8);
  m.impl("q8_linear_i8", &tokenloom::q8_linear_i8);
  m.impl("q4_gemm", &tokenloom::q4_gemm);
  m.impl("q8_gemm", &tokenloom::q8_gemm);
}
