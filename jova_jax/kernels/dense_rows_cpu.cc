// A dense layer's product over some of its rows on CPU, as an XLA FFI custom call: C = A B for
// the rows of A (K, M) that `valid` (K,) marks, 0 in the others; B (M, N) and C (K, N), all
// row-major float32 (dense_rows_cpu.py: the forward y = x W and the backward dx = dy W^T of the
// text streams' layers, whose padding rows nothing reads). XLA's dot computes every row; a
// prompt shorter than the text length leaves padding rows (about half the text rows of the
// bench's synthetic prompts).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "matmul_tiles.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jova::tiles;

constexpr int64_t kPanel = 3 * kLanes;  // columns of B per task: the widest tile's (MatMul)
constexpr int64_t kRowBlock = 64;       // rows of A per task

ffi::Error RowsProduct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> c) {
  const auto ad = a.dimensions(), bd = b.dimensions(), vd = valid.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || vd.size() != 1 || ad[1] != bd[0] || vd[0] != ad[0])
    return ffi::Error::InvalidArgument("dense_rows_cpu: a must be (K, M), b (M, N), valid (K,)");
  const int64_t k = ad[0], m = ad[1], n = bd[1];
  if (n % kLanes)
    return ffi::Error::InvalidArgument("dense_rows_cpu: b's columns must be a multiple of 16");
  const bool* mask = valid.typed_data();
  float* out = c->typed_data();
  // The valid rows of A gathered together: whole 8-row tiles over all of them, where each
  // example's run of a few rows would end in 1-row tiles.
  std::vector<int64_t> index;
  for (int64_t i = 0; i < k; ++i) {
    if (mask[i]) index.push_back(i);
    else std::memset(out + i * n, 0, n * sizeof(float));
  }
  const int64_t rows = static_cast<int64_t>(index.size());
  // The caller's, reused from call to call (fresh ones would fault in fresh pages each time);
  // the tasks reach them through these pointers, not by name, which is each thread's own.
  thread_local std::vector<float> gathered_rows, products;
  gathered_rows.resize(rows * m), products.resize(rows * n);
  float* gathered = gathered_rows.data();
  float* product = products.data();
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(gathered + r * m, a.typed_data() + index[r] * m, m * sizeof(float));
  const int64_t panels = (n + kPanel - 1) / kPanel;
  // A task: a block of rows times a panel of columns, read from B in place (a panel of B is a
  // few hundred KiB at most, which L2 holds).
  jova::ParallelFor(pool, (rows + kRowBlock - 1) / kRowBlock * panels, [&](int64_t task) {
    const int64_t first = task / panels * kRowBlock, count = std::min(kRowBlock, rows - first);
    const int64_t column = task % panels * kPanel, width = std::min(kPanel, n - column);
    MatMul(gathered + first * m, m, 1, b.typed_data() + column, n, count, width, m,
           product + first * n + column, n, /*accumulate=*/false);
    for (int64_t r = first; r < first + count; ++r)
      std::memcpy(out + index[r] * n + column, product + r * n + column, width * sizeof(float));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaDenseRows, RowsProduct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // a (K, M)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b (M, N)
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // valid (K,)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c (K, N)
