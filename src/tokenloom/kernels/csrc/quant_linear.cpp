// Weight-only quantized linear layers for small batches (decode), AVX2 + FMA.
//
// y[M, N] = x[M, K] @ W^T where W is stored in blocks of 32 weights along K,
// in the layouts of llama.cpp's Q4_1 / Q8_0 with the f16 scales widened to f32:
//
//   q4: qweight [N, K/2] uint8, scales [N, K/32], mins [N, K/32]
//       byte j of a block holds weight j (low nibble) and weight j+16 (high):
//       W[n, 32b + j] = scales[n, b] * nibble + mins[n, b]
//   q8: qweight [N, K] int8, scales [N, K/32]
//       W[n, 32b + j] = scales[n, b] * q
//
// Decode is bound by reading the weights, so each weight block is read from
// memory once per call: output rows are the outer (parallel) loop and every
// row of x (small, cache resident) is visited while a block sits in registers,
// dequantized to f32 once. Activations stay f32, so the only error against
// the dense f32 product of the same weights is summation order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowTile = 4;  // rows of x sharing one dequantized block

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

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
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({qweight.size(0), x.size(1) / kBlock}),
              "quantized linear: scales must be contiguous float32 [N, K/32]");
}

// Rows of output per parallel task: enough work to amortise the task, enough
// tasks to keep every thread busy on the smallest projections.
int64_t grain_for(int64_t N, int64_t M) { return std::max<int64_t>(8, 256 / std::max<int64_t>(M, 1)); }

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins) {
  check_common(x, qweight, scales, kBlock / 2);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "q4_linear: qweight must be uint8");
  TORCH_CHECK(mins.scalar_type() == at::kFloat && mins.is_contiguous() && mins.sizes() == scales.sizes(),
              "q4_linear: mins must be contiguous float32 shaped like scales");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), num_blocks = K / kBlock;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* mp = mins.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_for(N, M), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* qrow = qp + n * (K / 2);
      const float* srow = sp + n * num_blocks;
      const float* mrow = mp + n * num_blocks;
      auto load = [&](int64_t b) { return load_q4(qrow + b * (kBlock / 2), srow[b], mrow[b]); };
      output_column(xp, M, K, load, yp + n, N);
    }
  });
  return y;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_common(x, qweight, scales, kBlock);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "q8_linear: qweight must be int8");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), num_blocks = K / kBlock;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_for(N, M), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* qrow = qp + n * K;
      const float* srow = sp + n * num_blocks;
      auto load = [&](int64_t b) { return load_q8(qrow + b * kBlock, srow[b]); };
      output_column(xp, M, K, load, yp + n, N);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenloom, m) {
  m.def("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
}
