// The native ops as C++ functions, for ops built from other ops
// (decoder_stack.cpp). Each is registered under torch.ops.tokenloom by the
// file that defines it; see there for the layouts.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace tokenloom {

// quant_linear.cpp
at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& tile_scales,
                   const at::Tensor& tile_mins, int64_t N);
at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& tile_scales, int64_t N);
// The GEMM of a weight of any format (QuantizedWeight.FORMATS): its tiles, scales,
// mins, super-block scales and super-block mins, None where the format has none
// (quant_gemm: exactly those 5; quant_gemm_from: the 5 from index `first` of a longer list).
enum class QuantFormat : int64_t { kInt8 = 0, kInt4 = 1, kQ4K = 2, kQ6K = 3 };
constexpr int64_t kQuantWeightTensors = 5;
at::Tensor quant_gemm(const at::Tensor& x, int64_t format, const c10::List<std::optional<at::Tensor>>& weight,
                      int64_t N);
at::Tensor quant_gemm_from(const at::Tensor& x, int64_t format, const c10::List<std::optional<at::Tensor>>& weights,
                           int64_t first, int64_t N);

// cache_write.cpp
void write_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping);

// fused_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rotary_qk(const at::Tensor& qkv, const at::Tensor& cos_sin_cache,
                                             const at::Tensor& positions, int64_t num_heads,
                                             int64_t num_kv_heads, int64_t head_dim);
at::Tensor silu_and_mul(const at::Tensor& x);

// paged_attention.cpp
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale);

}  // namespace tokenloom
