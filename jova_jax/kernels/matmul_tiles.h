// Register-tiled float32 matmuls on 16-lane vectors, and row prefetching, shared by the CPU
// kernels in this folder: the attention kernel (attention_cpu.cc) and the layers' weight
// gradients (weight_grad_cpu.cc). One tile keeps R rows x NV vectors of C in registers over the
// whole depth; A is read in either orientation through (a_row, a_col), so A^T B needs no
// transposed copy.
#ifndef JOVA_JAX_KERNELS_MATMUL_TILES_H_
#define JOVA_JAX_KERNELS_MATMUL_TILES_H_

#include <cstdint>
#include <cstring>

namespace jova::tiles {

constexpr int64_t kLanes = 16;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecInt __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec Splat(float x) { return Vec{} + x; }

// Rows that lie far apart (a head's rows in q, k, v: H * D floats; a block's rows of a layer's
// activations: a row of features) defeat the hardware prefetcher, so each first read of a row
// waits on memory (a third of the attention kernel's packing time). Row loops ask for the row
// kAhead on while they work on this one.
constexpr int64_t kAhead = 8;
// for_write: the row is about to be written (its lines fetched for ownership).
inline void Prefetch(const float* row, int64_t dim, bool for_write = false) {
  for (int64_t d = 0; d < dim; d += kLanes) {
    if (for_write) __builtin_prefetch(row + d, 1);
    else __builtin_prefetch(row + d, 0);
  }
}

// C[m][0:16 * NV] (+)= sum_k A(m, k) * B[k][0:16 * NV] for R rows, all in registers.
// A(m, k) = a[m * a_row + k * a_col] (either orientation), B row-major with row stride ldb.
template <int R, int NV>
inline void Tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                 int64_t depth, float* c, int64_t ldc, bool accumulate) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Load(c + r * ldc + v * kLanes) : Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec column[NV];
    for (int v = 0; v < NV; ++v) column[v] = Load(b + k * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec scalar = Splat(a[r * a_row + k * a_col]);
      for (int v = 0; v < NV; ++v) acc[r][v] += scalar * column[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) Store(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int R, int NV>
inline void Rows(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                 int64_t m, int64_t depth, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + R <= m; i += R)
    Tile<R, NV>(a + i * a_row, a_row, a_col, b, ldb, depth, c + i * ldc, ldc, accumulate);
  for (; i + 4 <= m; i += 4)
    Tile<4, NV>(a + i * a_row, a_row, a_col, b, ldb, depth, c + i * ldc, ldc, accumulate);
  for (; i < m; ++i)
    Tile<1, NV>(a + i * a_row, a_row, a_col, b, ldb, depth, c + i * ldc, ldc, accumulate);
}

// C (m x n) (+)= A (m x depth) B (depth x n); n a multiple of 16, B and C row-major.
inline void MatMul(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                   int64_t m, int64_t n, int64_t depth, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 3 * kLanes <= n; j += 3 * kLanes)
    Rows<8, 3>(a, a_row, a_col, b + j, ldb, m, depth, c + j, ldc, accumulate);
  switch ((n - j) / kLanes) {
    case 2: Rows<8, 2>(a, a_row, a_col, b + j, ldb, m, depth, c + j, ldc, accumulate); break;
    case 1: Rows<8, 1>(a, a_row, a_col, b + j, ldb, m, depth, c + j, ldc, accumulate); break;
  }
}

}  // namespace jova::tiles

#endif  // JOVA_JAX_KERNELS_MATMUL_TILES_H_
