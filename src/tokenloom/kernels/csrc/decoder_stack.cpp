// Every decoder layer of a Llama-family model, for one step, in one op.
//
// A decode step of a small model is ~10 native ops per layer; called one at a
// time from Python, each pays the interpreter, nn.Module and dispatcher on top
// of its kernel (about a quarter of a batch-1 step of the 30-layer default
// model). Here the same ops run back to back from C++, with the GIL released
// for the whole stack:
//
//   per layer:  norm (+ residual add) -> qkv -> rotary q, k -> write K/V to the
//               paged cache -> paged attention -> o -> add + norm ->
//               gate_up -> silu * up -> down
//   at the end: the final add + norm
//
// It computes exactly what LlamaModel's per-layer path computes with the same
// kernels (tests/model/test_decode_stack.py compares them). Inputs:
//
//   hidden        [M, hidden] float32: the embeddings of the step's tokens
//   norms         2 L + 1 weights: input norm and post-attention norm per layer, then the final norm
//   parts_per_linear, formats, weights, out_features
//                 4 L quantized linears, per layer qkv, o, gate_up, down, each of one
//                 or more parts (a StackedWeight's, outputs side by side): each part's
//                 format, its 5 GEMM tensors in a row (quant_gemm, quant_linear.cpp)
//                 and its output size
//   qkv_biases    L optional biases of the fused qkv projection (Qwen2)
//   k_caches, v_caches, block_tables, seq_lens, query_start_loc: as paged_attention
//                 (any mix: decodes, verify steps of speculative decoding, prompt chunks)
//   slot_mapping  [M] int64: the cache slot of each new token's K/V

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

#include <cstdint>
#include <vector>

namespace tokenloom {
namespace {

constexpr int64_t kLinearsPerLayer = 4;  // qkv, o, gate_up, down

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// The kernel of QuantizedWeight.matmul (layers/quantization.py), per linear: its
// parts' GEMMs (quant_gemm_from reads each part's tensors in place), their outputs
// side by side.
class QuantLinears {
 public:
  QuantLinears(at::IntArrayRef parts_per_linear, at::IntArrayRef formats, const OptionalTensors& weights,
               at::IntArrayRef out_features)
      : formats_(formats), weights_(weights), out_features_(out_features) {
    first_part_.reserve(parts_per_linear.size() + 1);
    first_part_.push_back(0);
    for (const int64_t count : parts_per_linear) first_part_.push_back(first_part_.back() + count);
  }

  at::Tensor operator()(int64_t i, const at::Tensor& x) const {
    const int64_t begin = first_part_[i], end = first_part_[i + 1];
    if (end - begin == 1) return part(begin, x);
    std::vector<at::Tensor> outputs;
    for (int64_t p = begin; p < end; ++p) outputs.push_back(part(p, x));
    return at::cat(outputs, 1);
  }

 private:
  at::Tensor part(int64_t p, const at::Tensor& x) const {
    return quant_gemm_from(x, formats_[p], weights_, kQuantWeightTensors * p, out_features_[p]);
  }

  at::IntArrayRef formats_;
  const OptionalTensors& weights_;
  at::IntArrayRef out_features_;
  std::vector<int64_t> first_part_;  // linear i's parts are first_part_[i] .. first_part_[i + 1] - 1
};

}  // namespace

at::Tensor decoder_stack(const at::Tensor& hidden, at::TensorList norms, at::IntArrayRef parts_per_linear,
                         at::IntArrayRef formats, const OptionalTensors& weights, at::IntArrayRef out_features,
                         const OptionalTensors& qkv_biases, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& cos_sin_cache, const at::Tensor& positions,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, const at::Tensor& query_start_loc, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim,
                         double eps, double scale) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(v_caches.size()) == layers, "decoder_stack: need one K and V cache per layer");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers + 1, "decoder_stack: expected ", 2 * layers + 1,
              " norm weights, got ", norms.size());
  const int64_t linears = kLinearsPerLayer * layers;
  int64_t parts = 0;
  for (const int64_t count : parts_per_linear) parts += count;
  TORCH_CHECK(static_cast<int64_t>(parts_per_linear.size()) == linears &&
                  static_cast<int64_t>(formats.size()) == parts &&
                  static_cast<int64_t>(weights.size()) == kQuantWeightTensors * parts &&
                  static_cast<int64_t>(out_features.size()) == parts,
              "decoder_stack: expected ", linears, " quantized linears of parts_per_linear parts (formats, ",
              kQuantWeightTensors, " weight tensors each, out_features per part)");
  TORCH_CHECK(static_cast<int64_t>(qkv_biases.size()) == layers, "decoder_stack: expected one qkv bias entry per layer");
  TORCH_CHECK(hidden.dim() == 2 && slot_mapping.dim() == 1 && slot_mapping.size(0) == hidden.size(0) &&
                  seq_lens.dim() == 1 && query_start_loc.dim() == 1 &&
                  query_start_loc.size(0) == seq_lens.size(0) + 1,
              "decoder_stack: expected hidden [M, H], slot_mapping [M], seq_lens [S], query_start_loc [S + 1]");

  const QuantLinears linear(parts_per_linear, formats, weights, out_features);
  const int64_t M = hidden.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor residual = hidden;
  at::Tensor delta;
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor normed;
    if (l == 0) {
      normed = rms_norm(hidden, norms[0], eps);
    } else {
      std::tie(normed, residual) = add_rms_norm(delta, residual, norms[2 * l], eps);
    }
    at::Tensor qkv = linear(kLinearsPerLayer * l, normed);
    if (const std::optional<at::Tensor> bias = qkv_biases.get(l); bias.has_value()) qkv.add_(*bias);
    auto [q, k] = rotary_qk(qkv, cos_sin_cache, positions, num_heads, num_kv_heads, head_dim);
    write_kv(k_caches[l], v_caches[l], k,
             qkv.narrow(1, q_size + kv_size, kv_size).view({M, num_kv_heads, head_dim}), slot_mapping);
    const at::Tensor attn = paged_attention(q, k_caches[l], v_caches[l], block_tables, seq_lens, query_start_loc, scale);
    const at::Tensor attn_out = linear(kLinearsPerLayer * l + 1, attn.view({M, q_size}));
    std::tie(normed, residual) = add_rms_norm(attn_out, residual, norms[2 * l + 1], eps);
    const at::Tensor act = silu_and_mul(linear(kLinearsPerLayer * l + 2, normed));
    delta = linear(kLinearsPerLayer * l + 3, act);
  }
  return std::get<0>(add_rms_norm(delta, residual, norms[2 * layers], eps));
}

}  // namespace tokenloom

TORCH_LIBRARY_FRAGMENT(tokenloom, m) {
  m.def(
      "decoder_stack(Tensor hidden, Tensor[] norms, int[] parts_per_linear, int[] formats, Tensor?[] weights, "
      "int[] out_features, Tensor?[] qkv_biases, Tensor[] k_caches, Tensor[] v_caches, Tensor cos_sin_cache, "
      "Tensor positions, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, Tensor query_start_loc, "
      "int num_heads, "
      "int num_kv_heads, int head_dim, "
      "float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenloom, CPU, m) {
  m.impl("decoder_stack", &tokenloom::decoder_stack);
}
