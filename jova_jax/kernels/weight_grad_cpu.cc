// The weight gradient of a dense layer on CPU as an XLA FFI custom call: dW = X^T dY for X (K, M)
// and dY (K, N), both row-major with the K = batch x tokens rows first, into dW (M, N), the
// layer's (in, out) layout (weight_grad_cpu.py; layers.contract's backward). XLA CPU runs this
// product after a transposed copy of X or dY, in Eigen or in its faster library (YNN), neither
// of which takes a transposed operand; the tiles of matmul_tiles.h read X in either orientation,
// so here X and dY are read as they lie (docs/performance.md, "Fifteenth round"). An optional
// valid (K,) restricts the sum to the rows it marks (dense_rows_cpu.py: the text streams' padding
// rows, whose dY is 0).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "matmul_tiles.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jova::tiles;

// One task: a block of dW of up to kRows x kColumns, over the depth in chunks of kDepth rows of
// X and dY. Each chunk's slices are first copied together: X's (kDepth x kRows), and dY's as
// kDepth x 48 panels, each read from L1 by every 8-row tile of the block in turn. Read in place,
// rows N floats apart fall into a few cache sets (N = 768: 4 of L1's 64) and evict each other.
constexpr int64_t kRows = 192;
constexpr int64_t kPanel = 3 * kLanes;  // the widest tile, matmul_tiles.h's MatMul
constexpr int64_t kColumns = 2 * kPanel;
constexpr int64_t kDepth = 256;

// Rows index[0 .. depth) x columns [j, j + width) of a row-major array `stride` wide, into `to`
// (depth x width). The rows come from memory (a layer's activations and their gradients):
// prefetched, the kernel runs 4-7% faster.
inline void CopyBlock(const float* from, int64_t stride, const int64_t* index, int64_t j,
                      int64_t depth, int64_t width, float* to) {
  for (int64_t r = 0; r < depth; ++r) {
    if (r + kAhead < depth) Prefetch(from + index[r + kAhead] * stride + j, width);
    std::copy_n(from + index[r] * stride + j, width, to + r * width);
  }
}

// Rows [i, i + rows) x columns [j, j + columns) of dW = X^T dY, summed over the `depth` rows of X
// and dY that `index` lists.
void Block(const float* x, const float* dy, const int64_t* index, int64_t depth, int64_t m,
           int64_t n, int64_t i, int64_t j, int64_t rows, int64_t columns, float* dw) {
  thread_local std::vector<float> x_block, dy_panels;
  x_block.resize(kDepth * kRows), dy_panels.resize(kDepth * kColumns);
  for (int64_t k = 0; k < depth; k += kDepth) {
    const int64_t chunk = std::min(kDepth, depth - k);
    CopyBlock(x, m, index + k, i, chunk, rows, x_block.data());
    for (int64_t p = 0; p < columns; p += kPanel)
      CopyBlock(dy, n, index + k, j + p, chunk, std::min(kPanel, columns - p),
                &dy_panels[p * chunk]);
    for (int64_t p = 0; p < columns; p += kPanel) {
      const int64_t width = std::min(kPanel, columns - p);
      // X^T's row r is X's column r: A(r, k) = x_block[k * rows + r].
      MatMul(x_block.data(), 1, rows, &dy_panels[p * chunk], width, rows, width, chunk,
             dw + i * n + j + p, n, /*accumulate=*/k > 0);
    }
  }
}

ffi::Error WeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || wd.size() != 2 || xd[0] != yd[0] || wd[0] != xd[1] ||
      wd[1] != yd[1] || (valid.element_count() && valid.element_count() != xd[0]))
    return ffi::Error::InvalidArgument(
        "weight_grad_cpu: x must be (K, M), dy (K, N), valid empty or (K,) and dw (M, N)");
  const int64_t m = xd[1], n = yd[1];
  // The rows summed over: all, or the valid ones.
  std::vector<int64_t> index;
  for (int64_t r = 0; r < xd[0]; ++r)
    if (!valid.element_count() || valid.typed_data()[r]) index.push_back(r);
  const int64_t depth = static_cast<int64_t>(index.size());
  if (n % kLanes)
    return ffi::Error::InvalidArgument("weight_grad_cpu: dy's columns must be a multiple of 16");
  const float* a = x.typed_data();
  const float* b = dy.typed_data();
  float* c = dw->typed_data();
  if (depth == 0) {
    std::fill(c, c + m * n, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t row_blocks = (m + kRows - 1) / kRows, column_blocks = (n + kColumns - 1) / kColumns;
  jova::ParallelFor(pool, row_blocks * column_blocks, [&](int64_t task) {
    const int64_t i = task / column_blocks * kRows, j = task % column_blocks * kColumns;
    Block(a, b, index.data(), depth, m, n, i, j, std::min(kRows, m - i), std::min(kColumns, n - j),
          c);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaWeightGradient, WeightGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (K, M)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy (K, N)
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid: empty, or (K,)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dw (M, N)
