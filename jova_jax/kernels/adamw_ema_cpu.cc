// The train step's update on CPU as two XLA FFI custom calls (jova_jax/kernels/adamw_ema_cpu.py
// builds, loads and calls them): the gradients' sum of squares, then AdamW + the EMA in one pass
// over each leaf, in place. XLA CPU gives each of a leaf's four outputs its own loop (it has no
// multi-output loop fusion); this reads g, p, mu, nu and the EMA once and writes four
// (docs/performance.md, "Fifth round").
//
// The arithmetic is optim.adamw_ema_update's, term for term and in its order, built with
// -ffp-contract=off so no multiply-add is fused: tests/test_adamw_ema_cpu.py holds the two
// equal. The first moment is stored in float32 or bfloat16 (train.mu_dtype); a bfloat16 one is
// computed as XLA computes optax's expression: b1 rounded to bfloat16 (optax multiplies mu by a
// Python float, which takes mu's dtype), the rest in float32, and rounded to nearest even when
// stored.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A range of one leaf: the unit of work a thread claims.
struct Chunk {
  int64_t leaf, begin, end;
};

// 32k floats: small enough that two threads share the work evenly, large enough that a claim
// costs nothing next to it.
constexpr int64_t kChunkElements = 1 << 15;

std::vector<Chunk> Chunks(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  for (int64_t leaf = 0; leaf < static_cast<int64_t>(sizes.size()); ++leaf)
    for (int64_t begin = 0; begin < sizes[leaf]; begin += kChunkElements)
      chunks.push_back({leaf, begin, std::min(sizes[leaf], begin + kChunkElements)});
  return chunks;
}

// Float32 data and sizes of the first `count` args.
ffi::Error Leaves(const ffi::RemainingArgs& args, size_t count,
                  std::vector<const float*>& data, std::vector<int64_t>& sizes) {
  for (size_t i = 0; i < count; ++i) {
    auto buffer = args.get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) return buffer.error();
    if (buffer->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("adamw_ema_cpu: every leaf must be float32");
    data.push_back(static_cast<const float*>(buffer->untyped_data()));
    sizes.push_back(static_cast<int64_t>(buffer->element_count()));
  }
  return ffi::Error::Success();
}

ffi::Error SumOfSquares(ffi::ThreadPool pool, ffi::RemainingArgs grads,
                        ffi::ResultBuffer<ffi::F32> out) {
  std::vector<const float*> data;
  std::vector<int64_t> sizes;
  if (auto error = Leaves(grads, grads.size(), data, sizes); error.failure()) return error;
  const std::vector<Chunk> chunks = Chunks(sizes);
  std::vector<double> partial(chunks.size());
  jova::ParallelFor(pool, chunks.size(), [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const float* g = data[chunk.leaf];
    double sum = 0;  // in double: memory-bound either way; vectorized, the pragma allows the
                     // reduction's reassociation
#pragma omp simd reduction(+ : sum)
    for (int64_t i = chunk.begin; i < chunk.end; ++i) sum += static_cast<double>(g[i]) * g[i];
    partial[c] = sum;
  });
  double total = 0;  // in chunk order: the same sum on every run
  for (double sum : partial) total += sum;
  out->typed_data()[0] = static_cast<float>(total);
  return ffi::Error::Success();
}

// The step's scalars, in the order adamw_ema_cpu.COEFFICIENTS lists them.
struct Coefficients {
  float clip, apply, new_weight1, b1, new_weight2, b2, correct1, correct2, eps, weight_decay,
      step_size, ema_weight;
};

// bfloat16 is the top half of a float32's bits.
struct Bfloat16 {
  uint16_t bits;
};

inline float Widen(float x) { return x; }
inline float Widen(Bfloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void Store(float x, float& to) { to = x; }
// Round to nearest, ties to even; a NaN stays a (quiet) NaN.
inline void Store(float x, Bfloat16& to) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  to.bits = static_cast<uint16_t>(nan ? (bits >> 16) | 0x40u : rounded);
}

// x rounded to the precision of Moment.
template <typename Moment>
inline float Rounded(float x) {
  Moment stored;
  Store(x, stored);
  return Widen(stored);
}

template <typename Moment>
void UpdateRange(const float* __restrict g, float* __restrict p, Moment* __restrict mu,
                 float* __restrict nu, float* __restrict ema, int64_t begin, int64_t end,
                 const Coefficients c, const float weight_decay) {
  const bool applied = c.apply != 0.0f;
  const float ema_new = 1.0f - c.ema_weight;
  const float b1 = Rounded<Moment>(c.b1);
  for (int64_t i = begin; i < end; ++i) {
    float gi = g[i] * c.clip;
    gi = applied ? gi : 0.0f;  // a skipped step's gradient may hold NaN
    const float m = c.new_weight1 * gi + b1 * Widen(mu[i]);
    const float v = c.new_weight2 * (gi * gi) + c.b2 * nu[i];
    float update = (m / c.correct1) / (std::sqrt(v / c.correct2) + c.eps);
    update = update + weight_decay * p[i];
    const float new_p = p[i] + c.step_size * update;
    Store(m, mu[i]);
    nu[i] = v;
    p[i] = new_p;
    ema[i] = c.ema_weight * ema[i] + ema_new * new_p;
  }
}

// args: the coefficients, then the n leaves of each of g, p, mu, nu and the EMA; results: p,
// mu, nu and the EMA, each aliased to its argument (so XLA hands over the argument's values in
// the result's buffer and the update runs in place). decays[i]: weight decay applies to leaf i.
// Every leaf is float32 but mu's, which are all float32 or all bfloat16.
ffi::Error AdamwEma(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coefficients,
                    ffi::RemainingArgs args, ffi::RemainingRets results,
                    ffi::Span<const int64_t> decays) {
  const size_t n = decays.size();
  if (args.size() != 5 * n || results.size() != 4 * n)
    return ffi::Error::InvalidArgument("adamw_ema_cpu: expected 5n arguments and 4n results");
  if (coefficients.element_count() != sizeof(Coefficients) / sizeof(float))
    return ffi::Error::InvalidArgument("adamw_ema_cpu: wrong number of coefficients");
  std::vector<const float*> grads;
  std::vector<int64_t> sizes;
  if (auto error = Leaves(args, n, grads, sizes); error.failure()) return error;
  std::vector<void*> state[4];  // p, mu, nu, EMA: the results' buffers
  const ffi::DataType mu_type =
      n == 0 ? ffi::DataType::F32 : (*results.get<ffi::AnyBuffer>(n))->element_type();
  for (size_t kind = 0; kind < 4; ++kind)
    for (size_t i = 0; i < n; ++i) {
      auto buffer = results.get<ffi::AnyBuffer>(kind * n + i);
      if (!buffer.has_value()) return buffer.error();
      if ((*buffer)->element_count() != static_cast<size_t>(sizes[i]))
        return ffi::Error::InvalidArgument("adamw_ema_cpu: a state leaf's size differs from its gradient's");
      const ffi::DataType expected = kind == 1 ? mu_type : ffi::DataType::F32;
      if ((*buffer)->element_type() != expected ||
          (expected != ffi::DataType::F32 && expected != ffi::DataType::BF16))
        return ffi::Error::InvalidArgument(
            "adamw_ema_cpu: params, nu and the EMA must be float32, mu all float32 or all bfloat16");
      state[kind].push_back((*buffer)->untyped_data());
    }
  Coefficients c;
  std::copy_n(coefficients.typed_data(), sizeof(Coefficients) / sizeof(float),
              reinterpret_cast<float*>(&c));
  const std::vector<Chunk> chunks = Chunks(sizes);
  jova::ParallelFor(pool, chunks.size(), [&](int64_t index) {
    const Chunk& chunk = chunks[index];
    const int64_t leaf = chunk.leaf;
    float* p = static_cast<float*>(state[0][leaf]);
    float* nu = static_cast<float*>(state[2][leaf]);
    float* ema = static_cast<float*>(state[3][leaf]);
    const float weight_decay = decays[leaf] ? c.weight_decay : 0.0f;
    if (mu_type == ffi::DataType::BF16)
      UpdateRange(grads[leaf], p, static_cast<Bfloat16*>(state[1][leaf]), nu, ema, chunk.begin,
                  chunk.end, c, weight_decay);
    else
      UpdateRange(grads[leaf], p, static_cast<float*>(state[1][leaf]), nu, ema, chunk.begin,
                  chunk.end, c, weight_decay);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaSumOfSquares, SumOfSquares,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaAdamwEma, AdamwEma,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("decays"));
