// The tiled int8-activation GEMMs (q4 and q8), written once and compiled once per
// instruction set: quant_linear.cpp includes this file inside a namespace per ISA,
// with ``Dot`` the integer dot-product steps of that ISA (no include guard, on
// purpose). Each ISA's integer sums are exact, so every path gives the same bits.
//
// Dot::nibbles(acc, w, x)   acc += 4-wide dot products of unsigned nibbles w and int8 x,
//                           per 32-bit lane (AVX2: int16 pairs, summed by nibble_sums)
// Dot::nibble_sums(acc)     the int32 sums of a block's accumulator
// Dot::bytes(acc, |w|, x)   acc (int32) += 4-wide dot products of |w| and signed x

// Independent integer accumulators per output: at one or two rows of x, a single
// accumulator would chain a block's every dot-product instruction on the one
// before (vpdpbusd: ~4 cycles each), and that chain, not the loads, would set the
// speed of decode steps. Integer sums: any split gives the same bits.
template <int MR>
constexpr int chains() { return MR == 1 ? 4 : (MR == 2 ? 2 : 1); }

template <int C>
inline __m256i sum_chains(const __m256i (&acc)[C]) {
  __m256i total = acc[0];
  for (int c = 1; c < C; ++c) total = _mm256_add_epi32(total, acc[c]);
  return total;
}

// y[0:MR, 8 NR columns from tile t] for MR rows of quantized x starting at row r;
// Scales gives each block's f32 scale and min (Q4Scales, Q4KScales).
template <int MR, int NR, class Scales>
void q4_gemm_tile(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
  const int64_t nb = w.nb;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 out[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = _mm256_setzero_ps();
  const int8_t* xq = xr.q.data() + r * K;
  constexpr int C = chains<MR>();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[MR][NR][C];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        for (int c = 0; c < C; ++c) acc[i][j][c] = _mm256_setzero_si256();
    constexpr int64_t stride = Scales::kBlockBytes;
    prefetch_ahead(w, t, b, stride);
    for (int p = 0; p < 4; ++p) {
      __m256i raw[NR];
      for (int j = 0; j < NR; ++j)
        raw[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + at_pair(t + j, b, nb) * stride + 32 * p));
      for (int half = 0; half < 2; ++half) {  // low nibbles: weights 8p..8p+3, high: 8p+4..8p+7
        __m256i wq[NR];
        for (int j = 0; j < NR; ++j) wq[j] = _mm256_and_si256(half ? _mm256_srli_epi16(raw[j], 4) : raw[j], mask);
        for (int i = 0; i < MR; ++i) {
          const __m256i xb = broadcast4(xq + i * K + b * kBlock + 8 * p + 4 * half);
          const int c = (2 * p + half) % C;
          for (int j = 0; j < NR; ++j) acc[i][j][c] = Dot::nibbles(acc[i][j][c], wq[j], xb);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      __m256 dw, mw;
      Scales::load(w, t + j, b, dw, mw);
      for (int i = 0; i < MR; ++i) {
        const int64_t xi = (r + i) * nb + b;
        __m256i sums[C];
        for (int c = 0; c < C; ++c) sums[c] = Dot::nibble_sums(acc[i][j][c]);
        const __m256 dots = _mm256_cvtepi32_ps(sum_chains(sums));
        out[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(dots, _mm256_set1_ps(xr.d[xi])), dw, out[i][j]);
        out[i][j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xr.sum[xi]), out[i][j]);
      }
    }
  }
  store_tile(out, r, t, y, N);
}

// The same for int8 weights (Q8_0): tiles [N/8, K/32, 256] int8, per 8 columns
// and block 8 groups of 32 bytes, byte 4c + r of group p holding column c's
// weight 4p + r; no mins. maddubs wants
// one unsigned operand, so it multiplies |w| by x carrying w's sign (llama.cpp's
// trick for signed x signed). A pair of products (up to 2 x 127 x 127) fills an
// int16, so each maddubs is widened to int32 at once (madd by ones) rather than
// summed over the block in int16. (Q8Tile: AVX-512 takes pairs on 512-bit
// registers instead.)
template <int MR, int NR>
void q8_gemm_tile(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
  const int64_t nb = w.nb;
  __m256 out[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = _mm256_setzero_ps();
  const int8_t* xq = xr.q.data() + r * K;
  constexpr int C = chains<MR>();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[MR][NR][C];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        for (int c = 0; c < C; ++c) acc[i][j][c] = _mm256_setzero_si256();
    prefetch_ahead(w, t, b, kQ8TileBytes);
    for (int p = 0; p < 8; ++p) {
      for (int j = 0; j < NR; ++j) {
        const uint8_t* group = w.q + at_pair(t + j, b, nb) * kQ8TileBytes + 32 * p;
        const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group));
        const __m256i wabs = _mm256_sign_epi8(wq, wq);
        for (int i = 0; i < MR; ++i) {
          const __m256i xb = broadcast4(xq + i * K + b * kBlock + 4 * p);
          acc[i][j][p % C] = Dot::bytes(acc[i][j][p % C], wabs, _mm256_sign_epi8(xb, wq));
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m256 dw = load_halves(w.scales + at_pair(t + j, b, nb) * kTileCols);
      for (int i = 0; i < MR; ++i) {
        const __m256 dots = _mm256_mul_ps(_mm256_cvtepi32_ps(sum_chains(acc[i][j])),
                                          _mm256_set1_ps(xr.d[(r + i) * nb + b]));
        out[i][j] = _mm256_fmadd_ps(dots, dw, out[i][j]);
      }
    }
  }
  store_tile(out, r, t, y, N);
}

// The same for q6_k: tiles [N/8, K/32, 192] uint8, the low nibbles of the 6-bit
// weights (0..63) as q4's tiles, then their top 2 bits, 32 bytes per half-block g
// of 16 weights: byte 4c + r holds column c's weights 16g + r, 16g + 4 + r,
// 16g + 8 + r and 16g + 12 + r in bits 4-5, 6-7, 0-1 and 2-3, so that one shift
// (none for the first) puts each pair where the weight wants it, at bits 4-5. Each
// half-block has its own int8 scale (sub_scales [N/8, K/32, 2 x 8], half-block
// major), so its integer dot product is scaled apart:
//
//   y[m, n] += d[n] * d_x[m, b] * sum_g sc[n, g] * (q_w . q_x - 32 sum(q_x))     (per half g)
//
// The weights are unsigned, as vpdpbusd and maddubs want them (a pair of
// products is at most 2 x 63 x 128, within int16).
// The top bits of the weights 8pp + 4 half + r of a half-block, at bits 4-5 (above: the layout).
inline __m256i top_bits_at_4(__m256i high, int pp, int half) {
  switch (2 * pp + half) {
    case 0: return high;
    case 1: return _mm256_srli_epi16(high, 2);
    case 2: return _mm256_slli_epi16(high, 4);
    default: return _mm256_slli_epi16(high, 2);
  }
}

template <int MR, int NR>
void q6_gemm_tile(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
  const int64_t nb = w.nb;
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  __m256 out[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = _mm256_setzero_ps();
  const int8_t* xq = xr.q.data() + r * K;
  constexpr int C = chains<MR>();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block[NR];
    __m256 d[NR];
    prefetch_ahead(w, t, b, kQ6TileBytes);
    for (int j = 0; j < NR; ++j) {
      block[j] = w.q + at_pair(t + j, b, nb) * kQ6TileBytes;
      d[j] = load_halves(w.super_scales + at_pair(t + j, b / kSuperBlocks, nb / kSuperBlocks) * kTileCols);
    }
    __m256 first[MR][NR];  // the first half-block's scaled dot products
    for (int g = 0; g < 2; ++g) {
      // Each accumulator starts at the offset's share, -32 sum(q_x) of the half-block.
      __m256i acc[MR][NR][C];
      for (int i = 0; i < MR; ++i) {
        const __m256i offset = _mm256_set1_epi32(-32 * xr.half_sums[2 * ((r + i) * nb + b) + g]);
        for (int j = 0; j < NR; ++j)
          for (int c = 0; c < C; ++c) acc[i][j][c] = c == 0 ? offset : _mm256_setzero_si256();
      }
      __m256i high[NR];
      for (int j = 0; j < NR; ++j)
        high[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block[j] + 4 * 32 + 32 * g));
      for (int pp = 0; pp < 2; ++pp) {
        const int p = 2 * g + pp;
        __m256i low[NR];
        for (int j = 0; j < NR; ++j) low[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block[j] + 32 * p));
        for (int half = 0; half < 2; ++half) {
          __m256i wq[NR];
          for (int j = 0; j < NR; ++j) {
            const __m256i nib = _mm256_and_si256(half ? _mm256_srli_epi16(low[j], 4) : low[j], low4);
            wq[j] = _mm256_or_si256(nib, _mm256_and_si256(top_bits_at_4(high[j], pp, half), top2));
          }
          const int c = (2 * pp + half) % C;
          for (int i = 0; i < MR; ++i) {
            const __m256i xb = broadcast4(xq + i * K + b * kBlock + 8 * p + 4 * half);
            for (int j = 0; j < NR; ++j) acc[i][j][c] = Dot::bytes(acc[i][j][c], wq[j], xb);
          }
        }
      }
      // Both half-blocks share the block's d_x: scale each by d * sc, then the sum by d_x.
      for (int j = 0; j < NR; ++j) {
        const int8_t* scales = reinterpret_cast<const int8_t*>(w.sub_scales) + at_pair(t + j, b, nb) * 2 * kTileCols;
        const __m128i sc8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + g * kTileCols));
        const __m256 scale = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)), d[j]);
        for (int i = 0; i < MR; ++i) {
          const __m256 dots = _mm256_cvtepi32_ps(sum_chains(acc[i][j]));
          if (g == 0) {
            first[i][j] = _mm256_mul_ps(dots, scale);
          } else {
            const __m256 both = _mm256_fmadd_ps(dots, scale, first[i][j]);
            out[i][j] = _mm256_fmadd_ps(both, _mm256_set1_ps(xr.d[(r + i) * nb + b]), out[i][j]);
          }
        }
      }
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

// 4-bit tiles with Scales' block scales (Q4Scales, Q4KScales); pairs of tiles on
// 512-bit registers where the ISA has them (Dot::kWide).
template <class Scales>
struct Q4Tiles {
  template <int MR, int NR>
  struct Tile {
    static void run(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
      if constexpr (Dot::kWide && NR == 2) {
        q4_gemm_pair_wide<MR, Scales>(xr, r, K, w, t, y, N);
      } else {
        q4_gemm_tile<MR, NR, Scales>(xr, r, K, w, t, y, N);
      }
    }
  };
};

template <int MR, int NR>
using Q4Tile = Q4Tiles<Q4Scales>::Tile<MR, NR>;
template <int MR, int NR>
using Q4KTile = Q4Tiles<Q4KScales>::Tile<MR, NR>;

// q6_k tiles take both tiles of a pair per block on every ISA, int8 ones on
// 512-bit registers where the ISA has them (Dot::kWide). One tile at a time, on
// AVX2's 16 registers, spilled less but read a pair's blocks in two passes:
// with tile pairs (GemmTiles) that measured 25-45% slower at one row and 6-14%
// slower at 3-256 rows.
template <int MR, int NR>
struct Q6Tile {
  static void run(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
    q6_gemm_tile<MR, NR>(xr, r, K, w, t, y, N);
  }
};

template <int MR, int NR>
struct Q8Tile {
  static void run(const QuantizedRows& xr, int64_t r, int64_t K, const Tiles& w, int64_t t, float* y, int64_t N) {
    if constexpr (Dot::kWide && NR == 2) {
      q8_gemm_pair_wide<MR>(xr, r, K, w, t, y, N);
    } else {
      q8_gemm_tile<MR, NR>(xr, r, K, w, t, y, N);
    }
  }
};

// y = x @ W^T over the tile pairs (the parallel loop), rows of x in chunks of
// kRowChunk so that a chunk's int8 rows stay in cache while every tile passes
// over them.
template <template <int, int> class Tile>
at::Tensor tiled_gemm(const at::Tensor& x, const Tiles& w, int64_t pairs, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const QuantizedRows xr = quantize_rows(x.data_ptr<float>(), M, K);
  float* yp = y.data_ptr<float>();
  for (int64_t r0 = 0; r0 < M; r0 += kRowChunk) {
    const int64_t r1 = std::min(M, r0 + kRowChunk);
    at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) GemmRows<2, Tile>::run(xr, r0, r1, K, w, 2 * pair, yp, N);
    });
  }
  return y;
}

