// Fused elementwise ops of a decoder layer, float32, AVX2 + FMA.
//
// A decode step of a small model is hundreds of tiny ops whose cost is the
// dispatch, not the arithmetic: an RMSNorm in plain PyTorch is six ops, the
// rotary embedding of q and k a dozen. Each op here does one of those groups
// in a single pass over rows, parallel over tokens.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "ops.h"
#include "vec_math.h"

#include <cmath>
#include <cstdint>
#include <tuple>

namespace tokenloom {
namespace {

using tokenloom_vec::exp_ps;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be a [rows, cols] matrix with unit column stride");
}

// out[i] = weight[i] * x[i] / sqrt(mean(x^2) + eps): the order of operations of
// the PyTorch reference (sum of squares, divide, add eps, reciprocal sqrt).
inline void rms_norm_row(const float* x, const float* weight, float eps, int64_t d, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < d; ++i) sum += x[i] * x[i];
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = weight[i] * (x[i] * inv);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm: x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == at::kFloat,
              "rms_norm: weight must be float32 [", x.size(1), "]");
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::empty({n, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * stride, wp, static_cast<float>(eps), d, op + r * d);
  });
  return out;
}

// (rms_norm(x + residual), x + residual): the residual add before a norm.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm: x");
  check_rows(residual, "add_rms_norm: residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x and residual differ in shape");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == at::kFloat,
              "add_rms_norm: weight must be float32 [", x.size(1), "]");
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor sum = at::empty({n, d}, x.options());
  at::Tensor out = at::empty({n, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* s = sp + r * d;
      for (int64_t i = 0; i < d; ++i) s[i] = rp[r * rs + i] + xp[r * xs + i];
      rms_norm_row(s, wp, static_cast<float>(eps), d, op + r * d);
    }
  });
  return {out, sum};
}

namespace {

// Rotate heads [first, first + count) of one token's row, HF "rotate half"
// convention: pairs (i, i + d/2) with cos/sin of frequency i.
inline void rotate_heads(const float* src, float* dst, int64_t count, int64_t head_dim, const float* cos,
                         const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < count; ++h) {
    const float* x = src + h * head_dim;
    float* y = dst + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      y[i] = x1 * cos[i] - x2 * sin[i];
      y[i + half] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

}  // namespace

// qkv [n, (H + 2 KVH) * D] (the fused projection's output) -> rotated q [n, H, D]
// and k [n, KVH, D]; cos_sin_cache [max_position, D] = [cos | sin].
std::tuple<at::Tensor, at::Tensor> rotary_qk(const at::Tensor& qkv, const at::Tensor& cos_sin_cache,
                                             const at::Tensor& positions, int64_t num_heads,
                                             int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "rotary_qk: qkv");
  TORCH_CHECK(head_dim % 2 == 0, "rotary_qk: head_dim must be even");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim, "rotary_qk: qkv has ", qkv.size(1),
              " columns, expected ", (num_heads + 2 * num_kv_heads) * head_dim);
  TORCH_CHECK(cos_sin_cache.is_contiguous() && cos_sin_cache.scalar_type() == at::kFloat &&
                  cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim,
              "rotary_qk: cos_sin_cache must be float32 [max_position, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.dim() == 1 &&
                  positions.size(0) == qkv.size(0),
              "rotary_qk: positions must be int64 [num_tokens]");
  const int64_t n = qkv.size(0), max_pos = cos_sin_cache.size(0);
  at::Tensor q = at::empty({n, num_heads, head_dim}, qkv.options());
  at::Tensor k = at::empty({n, num_kv_heads, head_dim}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cache = cos_sin_cache.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const int64_t stride = qkv.stride(0);
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rotary_qk: position ", pos[t], " outside [0, ", max_pos, ")");
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cos = cache + pos[t] * head_dim;
      const float* sin = cos + head_dim / 2;
      const float* row = src + t * stride;
      rotate_heads(row, qp + t * num_heads * head_dim, num_heads, head_dim, cos, sin);
      rotate_heads(row + num_heads * head_dim, kp + t * num_kv_heads * head_dim, num_kv_heads, head_dim, cos,
                   sin);
    }
  });
  return {q, k};
}

// x [n, 2 I] = [gate | up] -> silu(gate) * up [n, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul: x");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: x must have an even number of columns");
  const int64_t n = x.size(0), inter = x.size(1) / 2;
  at::Tensor out = at::empty({n, inter}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * stride;
      const float* up = gate + inter;
      float* y = op + r * inter;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= inter; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
      }
      for (; i < inter; ++i) y[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

}  // namespace tokenloom

TORCH_LIBRARY_FRAGMENT(tokenloom, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_qk(Tensor qkv, Tensor cos_sin_cache, Tensor positions, int num_heads, int num_kv_heads, "
        "int head_dim) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("rms_norm", &tokenloom::rms_norm);
  m.impl("add_rms_norm", &tokenloom::add_rms_norm);
  m.impl("rotary_qk", &tokenloom::rotary_qk);
  m.impl("silu_and_mul", &tokenloom::silu_and_mul);
}
