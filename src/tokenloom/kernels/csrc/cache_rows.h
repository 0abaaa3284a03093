// The rows of a paged KV cache: one per (token slot, kv head), head_dim values.
//
//   float32, float16  head_dim elements
//   int8              head_dim int8 values q, then their float32 scale s (4 bytes):
//                     value c = s * q[c], with s = max|x| / 127 and q = round(x / s)
//                     per row (the values of one token's head), so a row is
//                     head_dim + 4 bytes and needs nothing outside itself
//
// Kernels read a row through RowFormat<T>: its width in elements of T and its
// scale (1 for the float types, never multiplied in: their results stay
// bit-identical to what they were before int8 rows existed).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tokenloom::cache_rows {

constexpr int64_t kInt8ScaleBytes = sizeof(float);

template <typename T>
struct RowFormat {
  static constexpr bool kScaled = false;
  static constexpr int64_t width(int64_t head_dim) { return head_dim; }
  static float scale(const T*, int64_t) { return 1.0f; }
};

template <>
struct RowFormat<int8_t> {
  static constexpr bool kScaled = true;
  static constexpr int64_t width(int64_t head_dim) { return head_dim + kInt8ScaleBytes; }
  static float scale(const int8_t* row, int64_t head_dim) {
    float s;
    std::memcpy(&s, row + head_dim, sizeof s);
    return s;
  }
};

// Elements per row for a cache of dtype `type` (float32, float16 or int8).
inline int64_t row_width(at::ScalarType type, int64_t head_dim) {
  return type == at::kChar ? RowFormat<int8_t>::width(head_dim) : head_dim;
}

// One row of head_dim floats -> an int8 row (values, then the scale). The same
// arithmetic as layers/attention.py's quantize_kv (IEEE float32 throughout,
// round half to even), so both write the same bytes.
inline void quantize_row(const float* x, int64_t head_dim, int8_t* row) {
  float amax = 0.0f;
  for (int64_t c = 0; c < head_dim; ++c) amax = std::max(amax, std::fabs(x[c]));
  const float scale = amax / 127.0f;
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  for (int64_t c = 0; c < head_dim; ++c) {
    const float q = std::nearbyint(x[c] * inv);  // the default rounding mode: half to even
    row[c] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
  }
  std::memcpy(row + head_dim, &scale, sizeof scale);
}

}  // namespace tokenloom::cache_rows
