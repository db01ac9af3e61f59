// Masked softmax attention on CPU as two XLA FFI custom calls, forward and backward
// (jova_jax/kernels/attention_cpu.py builds, loads and calls them; model/attention_kernels.py
// dispatches to them as the 'cpu' kernel). XLA CPU runs attention as separate dots, transposes
// and softmax loops over B x H x L x L arrays in memory; here each (example, head) works on one
// block of query rows at a time, whose logits stay in cache from QK^T through the softmax to PV.
// Only each example's valid keys are attended (HeadKeys). The backward reads the probabilities
// where the forward saved them (`probs`, (B, H, Lq, Lk_padded), a row's first columns those of its
// attended keys: a fifth of the backward's matmuls and its exp spared, docs/performance.md,
// "Fourteenth round"), else recomputes them from the row log-sum-exp as a flash kernel does.
//
// Two pairs of calls. The joint calls take the sequence as q (B, Lq, H, D), k and v (B, Lk, H, D);
// the segment calls as the blocks project it, each segment (stream) its own QKV projection
// (B, L_seg, 3, H, D) before its bias (3, H, D), which is added as the rows are read, and
// return each segment's output and dqkv where the blocks read them (Rows): no joined q, k, v or
// split output around the kernel. Being self-attention, the segment calls skip the padding rows
// (a query whose key is masked; HeadKeys::queries): their output and dq are 0, which is exact
// where nothing reads them, as in the blocks. kv_valid (B, Lk); all row-major float32 / bool.
// Scale 1/sqrt(D); an invalid key's logit gets MASK_VALUE added, as the 'xla' kernel's bias does.
// Optional per-row RMS norms and RoPE (empty tables: none): each row of q and k is normalised,
// scaled and rotated as it is packed, and its gradient taken back through both as it is
// written, which spares the step their own passes over q and k and their gradients
// (docs/performance.md, "Eleventh round"). Norm: segment_q (Lq,) / segment_k (Lk,) int32 name
// each row's row of scales_q (Sq, D) / scales_k (Sk, D), and the backward returns the scales'
// gradients per (example, head), (B, H, Sq, D) and (B, H, Sk, D). RoPE: cos_q, sin_q (Lq, D/2)
// and cos_k, sin_k (Lk, D/2).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "matmul_tiles.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jova::tiles;

constexpr int64_t kQueryBlock = 64;  // rows whose logits (64 x Lk) stay in L2 between the matmuls
constexpr float kMaskValue = -1e30f;

inline int64_t RoundUp(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// to[0:n] = scale * from[0:n], n a multiple of kLanes, for rows not read again soon: with AVX-512
// and an aligned target by streaming stores, which write whole lines without first reading them
// into the cache (the forward's saved probabilities: 0.92x its time per head).
inline void StreamScaled(const float* from, float scale, float* to, int64_t n) {
#ifdef __AVX512F__
  if (reinterpret_cast<uintptr_t>(to) % 64 == 0) {
    const __m512 factor = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < n; j += kLanes)
      _mm512_stream_ps(to + j, _mm512_mul_ps(_mm512_loadu_ps(from + j), factor));
    return;
  }
#endif
  for (int64_t j = 0; j < n; j += kLanes) Store(to + j, Load(from + j) * scale);
}

// Orders the streaming stores before whatever next tells another thread that the task is done.
inline void StreamFence() {
#ifdef __AVX512F__
  _mm_sfence();
#endif
}

inline float Sum(Vec x) {
  float sum = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) sum += x[lane];
  return sum;
}

// sum over d < n of a[d] * b[d] (* c[d], where given), in kLanes partial sums: a float sum the
// compiler must keep in order runs one dependent add at a time (16% of the kernel at D = 48).
inline float Dot(const float* a, const float* b, int64_t n, const float* c = nullptr) {
  Vec partial{};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    partial += Load(a + d) * Load(b + d) * (c ? Load(c + d) : Splat(1.0f));
  float sum = Sum(partial);
  for (; d < n; ++d) sum += a[d] * b[d] * (c ? c[d] : 1.0f);
  return sum;
}

// exp(x) to within 2 ulp (Cephes' expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2]);
// 0 below -87.3, where float32's exp leaves the normal range.
inline Vec Exp(Vec x) {
  const Vec low = Splat(-87.33654f);
  const VecInt underflow = x < low;
  x = x < low ? low : x;
  x = x > 88.37626f ? Splat(88.37626f) : x;
  // Adding 1.5 * 2^23 rounds x * log2(e) to the nearest integer n, held in the low mantissa bits.
  const Vec shifter = Splat(12582912.0f);
  const Vec shifted = x * 1.44269504f + shifter;
  const Vec n = shifted - shifter;
  const Vec r = x - n * 0.693359375f - n * -2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VecInt exponent = ((VecInt)shifted - (VecInt)shifter + 127) << 23;
  return (Vec)((VecInt)(p * (Vec)exponent) & ~underflow);
}

// RoPE of one sequence: channel pair (2i, 2i+1) of row j turns by the angle whose cosine and sine
// are cos[j * D/2 + i] and sin[j * D/2 + i], as embeddings.apply_rope turns it. No tables: identity.
struct Rotation {
  const float* cos = nullptr;
  const float* sin = nullptr;

  // out = scale * R_j x, for row j's D values x.
  void Apply(int64_t j, const float* x, int64_t dim, float scale, float* out) const {
    Turn(j, x, dim, scale, 1.0f, out);
  }
  // out = scale * R_j^T g (R_j turned back): the gradient of row j before its rotation.
  void Transpose(int64_t j, const float* g, int64_t dim, float scale, float* out) const {
    Turn(j, g, dim, scale, -1.0f, out);
  }

 private:
  // Turns each pair by `direction` times its angle.
  void Turn(int64_t j, const float* x, int64_t dim, float scale, float direction, float* out) const {
    if (!cos) {
      for (int64_t d = 0; d < dim; ++d) out[d] = x[d] * scale;
      return;
    }
    const float* c = cos + j * (dim / 2);
    const float* s = sin + j * (dim / 2);
    for (int64_t i = 0; i < dim / 2; ++i) {
      const float x0 = x[2 * i], x1 = x[2 * i + 1], sine = direction * s[i];
      out[2 * i] = (x0 * c[i] - x1 * sine) * scale;
      out[2 * i + 1] = (x0 * sine + x1 * c[i]) * scale;
    }
  }
};

// The RMS norm of q or k ahead of RoPE (the blocks' q_norm / k_norm, one per stream): row j
// becomes x * rsqrt(mean(x^2) + eps) * scales[segment[j]]. No segments: no norm.
struct Norm {
  const int32_t* segment = nullptr;
  const float* scales = nullptr;
  float eps = 0.0f;

  // out = the normalised, scaled row j (needs segments).
  void Apply(int64_t j, const float* x, int64_t dim, float* out) const {
    const float r = InverseRms(x, dim);
    const float* scale = scales + segment[j] * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = x[d] * r * scale[d];
  }

  // grad: the gradient of row j's output, replaced by that of its input x; the gradient of the
  // row's scales is added to scale_grads (S x D).
  void Backward(int64_t j, const float* x, int64_t dim, float* grad, float* scale_grads) const {
    if (!segment) return;
    const float r = InverseRms(x, dim);
    const float* scale = scales + segment[j] * dim;
    float* scale_grad = scale_grads + segment[j] * dim;
    for (int64_t d = 0; d < dim; ++d) scale_grad[d] += grad[d] * x[d] * r;
    // The mean over d of d(normalised x) * normalised x.
    const float mean = Dot(grad, scale, dim, x) * r / dim;
    for (int64_t d = 0; d < dim; ++d) grad[d] = r * (grad[d] * scale[d] - x[d] * r * mean);
  }

 private:
  float InverseRms(const float* x, int64_t dim) const {
    return 1.0f / std::sqrt(Dot(x, x, dim) / dim + eps);
  }
};

// What a row of q or k goes through before attention: its bias (a segment given as its
// projection before the bias), its norm, then its rotation.
struct Prep {
  Norm norm;
  Rotation rope;

  bool active() const { return norm.segment || rope.cos; }
  // out = scale * the prepared row j, from x (+ bias, where given).
  void Apply(int64_t j, const float* x, const float* bias, int64_t dim, float scale,
             float* out) const {
    if (bias) {  // biased into out, then normalised and rotated there in place
      for (int64_t d = 0; d < dim; ++d) out[d] = x[d] + bias[d];
      x = out;
    }
    if (norm.segment) {
      norm.Apply(j, x, dim, out);
      x = out;
    }
    rope.Apply(j, x, dim, scale, out);
  }
  // out = the gradient of row j's input x (+ bias), from `grad` times `scale`, the gradient of
  // its prepared row; the norm's scales' gradient is added to scale_grads.
  void Backward(int64_t j, const float* x, const float* bias, const float* grad, int64_t dim,
                float scale, float* out, float* scale_grads) const {
    rope.Transpose(j, grad, dim, scale, out);
    if (!norm.segment) return;
    thread_local std::vector<float> biased;
    if (bias) {
      biased.resize(dim);
      for (int64_t d = 0; d < dim; ++d) biased[d] = x[d] + bias[d];
      x = biased.data();
    }
    norm.Backward(j, x, dim, out, scale_grads);
  }
};

struct Shape {
  int64_t batch, queries, keys, heads, dim;
  // Query row i is key row i (the segment calls' self-attention): a row whose key is masked is
  // padding, whose output no valid row reads, and it is not computed (HeadKeys::queries).
  bool self_attention = false;
  int64_t dim_padded() const { return RoundUp(dim); }
  int64_t keys_padded() const { return RoundUp(keys); }
  // Offset of query row i of head h of example b in lse (B, H, Lq).
  int64_t LseAt(int64_t b, int64_t h, int64_t i) const { return (b * heads + h) * queries + i; }
  // Offset of that row in saved probabilities (B, H, Lq, Lk_padded).
  int64_t ProbsAt(int64_t b, int64_t h, int64_t i) const { return LseAt(b, h, i) * keys_padded(); }
};

// Where the rows of one of q, k, v, out or their gradients lie: the sequence is one or more
// segments, each its own row-major array (B, L_seg, slots, H, D) of which this tensor is slot
// `slot` (a segment's q, k and v: the slots of its QKV projection; joint arrays and outputs: one
// slot), with an optional bias (slots, H, D) that its rows take on reading. Reading and writing
// each segment's arrays where they lie spares the step joining the segments into one sequence
// and splitting the results again (docs/performance.md, "Seventeenth round").
class Rows {
 public:
  struct Segment {
    float* data;
    int64_t length;
    const float* bias;  // null: none
  };

  Rows(std::vector<Segment> segments, int64_t slot, int64_t slots, int64_t heads, int64_t dim)
      : segments_(std::move(segments)), row_(slots * heads * dim), offset_(slot * heads * dim),
        dim_(dim) {
    for (int32_t seg = 0; seg < static_cast<int32_t>(segments_.size()); ++seg) {
      if (segments_[seg].bias) biased_ = true;
      for (int32_t i = 0; i < segments_[seg].length; ++i) {
        segment_of_.push_back(seg);
        row_in_.push_back(i);
      }
    }
  }
  // One (B, L, H, D) array.
  static Rows Joint(float* data, int64_t length, int64_t heads, int64_t dim) {
    return Rows({{data, length, nullptr}}, 0, 1, heads, dim);
  }

  // Row i of head h of example b.
  float* At(int64_t b, int64_t i, int64_t h) const {
    const Segment& seg = segments_[segment_of_[i]];
    return seg.data + (b * seg.length + row_in_[i]) * row_ + offset_ + h * dim_;
  }
  // Its bias, or null.
  const float* Bias(int64_t i, int64_t h) const {
    const Segment& seg = segments_[segment_of_[i]];
    return seg.bias ? seg.bias + offset_ + h * dim_ : nullptr;
  }
  bool biased() const { return biased_; }

 private:
  std::vector<Segment> segments_;
  std::vector<int32_t> segment_of_, row_in_;  // per row of the sequence
  int64_t row_, offset_, dim_;
  bool biased_ = false;
};

// One head of one example's attended keys (prepared by Prep where there is a bias, norm or RoPE),
// copied into the layouts the matmuls read, zero-padded to whole vectors of `lk` columns: keys_t
// (D x lk) for QK^T (not in a backward that reads saved probabilities); for the forward values
// (lk x D_padded) for PV; for the backward values_t (D x lk) for dO V^T and keys (lk x D_padded)
// for dS K. The attended keys are the valid ones: an invalid key's probability is exactly 0 in a
// row that has a valid key, so the padding of the text segments costs no work. An example without
// a valid key attends to all of them with MASK_VALUE added, which comes out uniform, as the 'xla'
// kernel's does.
struct HeadKeys {
  std::vector<float> keys_t, values, values_t, keys;
  std::vector<int64_t> kept;  // the attended keys' indices, ascending
  // The query rows computed, ascending: in self-attention the attended keys' rows (the padding
  // rows' output is 0, their gradients 0), else all of them. A row's saved probabilities lie at
  // its position in this list.
  std::vector<int64_t> queries;
  std::vector<float> bias;    // (lk): 0, or MASK_VALUE where no key is valid; -inf for padding
  int64_t lk = 0;             // kept.size() rounded up to whole vectors

  void Pack(const Shape& s, const Rows& k, const Rows& v, const bool* valid, const Prep& prep,
            int64_t b, int64_t h, bool backward, bool logits = true) {
    kept.clear();
    for (int64_t j = 0; j < s.keys; ++j)
      if (valid[b * s.keys + j]) kept.push_back(j);
    const bool none_valid = kept.empty();
    if (none_valid)
      for (int64_t j = 0; j < s.keys; ++j) kept.push_back(j);
    lk = RoundUp(static_cast<int64_t>(kept.size()));
    bias.assign(lk, -std::numeric_limits<float>::infinity());
    std::fill(bias.begin(), bias.begin() + kept.size(), none_valid ? kMaskValue : 0.0f);
    if (s.self_attention) {
      queries = kept;
    } else {
      queries.resize(s.queries);
      for (int64_t i = 0; i < s.queries; ++i) queries[i] = i;
    }
    Attended(s, k, prep, b, h, prepared_keys_, key_rows_);
    Attended(s, v, Prep{}, b, h, prepared_values_, value_rows_);
    if (logits) Transpose(s, key_rows_, keys_t);
    if (backward) {
      RowMajor(s, key_rows_, keys);
      Transpose(s, value_rows_, values_t);
    } else {
      RowMajor(s, value_rows_, values);
    }
  }

 private:
  std::vector<float> prepared_keys_, prepared_values_;  // (kept x D), where prepared
  std::vector<const float*> key_rows_, value_rows_;    // the attended rows, wherever they lie

  // rows = the attended rows of x: where they lie, or where there is a bias or a Prep,
  // prepared into `prepared` first.
  void Attended(const Shape& s, const Rows& x, const Prep& prep, int64_t b, int64_t h,
                std::vector<float>& prepared, std::vector<const float*>& rows) const {
    const int64_t n = static_cast<int64_t>(kept.size());
    rows.resize(n);
    if (!prep.active() && !x.biased()) {
      for (int64_t i = 0; i < n; ++i) rows[i] = x.At(b, kept[i], h);
      return;
    }
    prepared.resize(n * s.dim);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) Prefetch(x.At(b, kept[i + kAhead], h), s.dim);
      prep.Apply(kept[i], x.At(b, kept[i], h), x.Bias(kept[i], h), s.dim, 1.0f,
                 &prepared[i * s.dim]);
      rows[i] = &prepared[i * s.dim];
    }
  }

  // The rows of D values, into (lk x D_padded).
  void RowMajor(const Shape& s, const std::vector<const float*>& rows,
                std::vector<float>& out) const {
    const int64_t dp = s.dim_padded(), n = static_cast<int64_t>(rows.size());
    out.assign(lk * dp, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) Prefetch(rows[i + kAhead], s.dim);
      std::memcpy(&out[i * dp], rows[i], s.dim * sizeof(float));
    }
  }

  // The same rows transposed, into (D x lk).
  void Transpose(const Shape& s, const std::vector<const float*>& rows,
                 std::vector<float>& out) const {
    const int64_t n = static_cast<int64_t>(rows.size());
    out.assign(s.dim * lk, 0.0f);
    // kLanes rows at a time: read row by row (prefetched), then written out column by column
    // from the copy in L1, so that neither side strides through memory.
    thread_local std::vector<float> block;
    block.resize(kLanes * s.dim);
    for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
      const int64_t count = std::min(kLanes, n - i0);
      for (int64_t r = 0; r < count; ++r) {
        if (i0 + r + kAhead < n) Prefetch(rows[i0 + r + kAhead], s.dim);
        std::memcpy(&block[r * s.dim], rows[i0 + r], s.dim * sizeof(float));
      }
      for (int64_t d = 0; d < s.dim; ++d)
        for (int64_t r = 0; r < count; ++r) out[d * lk + i0 + r] = block[r * s.dim + d];
    }
  }
};

inline float Max(Vec x) {
  float max = x[0];
  for (int lane = 1; lane < kLanes; ++lane) max = x[lane] > max ? x[lane] : max;
  return max;
}

// Scaled, masked logits of `rows` queries (already scaled by 1/sqrt(D)) and the head's attended
// keys into probs (rows x head.lk), then each row's exp(logit - offset); the padding columns
// come out 0.
// Forward (row_lse null): the offset is the row's maximum, and row_max and row_sum get each row's
// maximum and sum. Backward: the offset is the row's log-sum-exp from the forward.
void Probabilities(const Shape& s, const HeadKeys& head, const float* queries, int64_t rows,
                   float* probs, float* row_max, float* row_sum, const float* row_lse) {
  const int64_t lk = head.lk, dp = s.dim_padded();
  MatMul(queries, dp, 1, head.keys_t.data(), lk, rows, lk, s.dim, probs, lk, false);
  for (int64_t i = 0; i < rows; ++i) {
    float* row = probs + i * lk;
    Vec max = Splat(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < lk; j += kLanes) {
      const Vec logits = Load(row + j) + Load(&head.bias[j]);
      Store(row + j, logits);
      max = logits > max ? logits : max;
    }
    const float offset = row_lse ? row_lse[i] : Max(max);
    Vec sum{};
    for (int64_t j = 0; j < lk; j += kLanes) {
      const Vec p = Exp(Load(row + j) - offset);
      Store(row + j, p);
      sum += p;
    }
    if (!row_lse) {
      row_max[i] = offset;
      row_sum[i] = Sum(sum);
    }
  }
}

// Rows index[0 .. rows) of one head's queries (or their output gradients: no Prep), prepared
// and scaled, into (rows x D_padded).
void PackRows(const Shape& s, const Rows& x, const Prep& prep, int64_t b, int64_t h,
              const int64_t* index, int64_t rows, float scale, float* out) {
  const int64_t dp = s.dim_padded();
  std::memset(out, 0, rows * dp * sizeof(float));
  for (int64_t i = 0; i < rows; ++i) {
    if (i + kAhead < rows) Prefetch(x.At(b, index[i + kAhead], h), s.dim);
    prep.Apply(index[i], x.At(b, index[i], h), x.Bias(index[i], h), s.dim, scale, out + i * dp);
  }
}

// Zeroes the rows of x (out in the forward, dq in the backward) of head h of example b that the
// head does not compute, padding rows in self-attention, and their entries of `lse` where given.
void ZeroSkippedRows(const Shape& s, const HeadKeys& head, const Rows& x, int64_t b, int64_t h,
                     float* lse = nullptr) {
  for (int64_t j = 0, i = 0; j < s.queries; ++j) {
    if (i < static_cast<int64_t>(head.queries.size()) && head.queries[i] == j) {
      ++i;
      continue;
    }
    std::memset(x.At(b, j, h), 0, s.dim * sizeof(float));
    if (lse) lse[s.LseAt(b, h, j)] = 0.0f;
  }
}

// Whether buffer's dimensions are `want`.
template <typename Buffer>
bool Dims(const Buffer& buffer, std::vector<int64_t> want) {
  const auto d = buffer.dimensions();
  return std::vector<int64_t>(d.begin(), d.end()) == want;
}

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::PRED>& valid) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto md = valid.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("attention_cpu: q, k, v must be (B, L, H, D), kv_valid (B, L)");
  for (int axis : {0, 2, 3})
    if (kd[axis] != qd[axis] || vd[axis] != qd[axis])
      return ffi::Error::InvalidArgument("attention_cpu: q, k and v differ in B, H or D");
  if (vd[1] != kd[1] || md[0] != qd[0] || md[1] != kd[1])
    return ffi::Error::InvalidArgument("attention_cpu: k, v and kv_valid differ in B or Lk");
  return ffi::Error::Success();
}

// The segments' QKV projections (B, L_seg, 3, H, D) and biases (3, H, D): a segment call's first
// 2 x `count` remaining arguments. Sets the call's shape (Lq = Lk = the segments' total length,
// which kv_valid (B, L) must have).
ffi::Error SegmentInputs(const ffi::RemainingArgs& args, int64_t count,
                         const ffi::Buffer<ffi::PRED>& valid, std::vector<Rows::Segment>& segments,
                         Shape& s) {
  if (count < 1 || static_cast<int64_t>(args.size()) < 2 * count)
    return ffi::Error::InvalidArgument("attention_cpu: segment calls take S >= 1 qkv arrays, then S biases");
  segments.clear();
  int64_t length = 0;
  for (int64_t i = 0; i < count; ++i) {
    auto qkv = args.get<ffi::Buffer<ffi::F32>>(i);
    auto bias = args.get<ffi::Buffer<ffi::F32>>(count + i);
    if (qkv.has_error()) return qkv.error();
    if (bias.has_error()) return bias.error();
    const auto d = qkv->dimensions();
    if (d.size() != 5 || d[2] != 3 || !Dims(*bias, {3, d[3], d[4]}))
      return ffi::Error::InvalidArgument(
          "attention_cpu: a segment's qkv must be (B, L, 3, H, D) and its bias (3, H, D)");
    if (i == 0) s = Shape{d[0], 0, 0, d[3], d[4]};
    if (d[0] != s.batch || d[3] != s.heads || d[4] != s.dim)
      return ffi::Error::InvalidArgument("attention_cpu: the segments differ in B, H or D");
    segments.push_back({qkv->typed_data(), d[1], bias->typed_data()});
    length += d[1];
  }
  s.queries = s.keys = length;
  s.self_attention = true;
  if (!Dims(valid, {s.batch, length}))
    return ffi::Error::InvalidArgument("attention_cpu: kv_valid must be (B, the segments' total L)");
  return ffi::Error::Success();
}

// Buffers `first` to `first + segments.size()` of `list` (remaining arguments or results), one per
// segment, each (B, L_seg, H, D) (slots 1) or (B, L_seg, 3, H, D) (slots 3), as segments.
template <typename List, typename Get>
ffi::Error SegmentArrays(const List& list, int64_t first, const std::vector<Rows::Segment>& like,
                         const Shape& s, int64_t slots, Get get, std::vector<Rows::Segment>& out) {
  out.clear();
  for (int64_t i = 0; i < static_cast<int64_t>(like.size()); ++i) {
    auto buffer = get(list, first + i);
    if (buffer.has_error()) return buffer.error();
    std::vector<int64_t> want{s.batch, like[i].length, s.heads, s.dim};
    if (slots > 1) want.insert(want.begin() + 2, slots);
    if (!Dims(*buffer, want))
      return ffi::Error::InvalidArgument(
          "attention_cpu: a segment's output or gradient differs from its qkv in B, L, H or D");
    out.push_back({buffer->typed_data(), like[i].length, nullptr});
  }
  return ffi::Error::Success();
}

ffi::ErrorOr<ffi::Buffer<ffi::F32>> Argument(const ffi::RemainingArgs& args, int64_t i) {
  return args.get<ffi::Buffer<ffi::F32>>(i);
}

ffi::ErrorOr<ffi::Buffer<ffi::F32>> Result(const ffi::RemainingRets& rets, int64_t i) {
  auto result = rets.get<ffi::Buffer<ffi::F32>>(i);
  if (result.has_error()) return ffi::Unexpected<ffi::Error>(result.error());
  return **result;
}

// The norm and RoPE tables of q and k, each pair all empty or all there (shapes above).
struct PrepTables {
  ffi::Buffer<ffi::S32> segment_q, segment_k;
  ffi::Buffer<ffi::F32> scales_q, scales_k, cos_q, sin_q, cos_k, sin_k;
  float eps;

  ffi::Error Check(const Shape& s) const {
    if (segment_q.element_count() + segment_k.element_count() > 0) {
      const auto in_range = [](const ffi::Buffer<ffi::S32>& segment, int64_t rows) {
        for (int64_t j = 0; j < segment.element_count(); ++j)
          if (segment.typed_data()[j] < 0 || segment.typed_data()[j] >= rows) return false;
        return true;
      };
      if (!Dims(segment_q, {s.queries}) || !Dims(segment_k, {s.keys}) ||
          scales_q.dimensions().size() != 2 || scales_q.dimensions()[1] != s.dim ||
          scales_k.dimensions().size() != 2 || scales_k.dimensions()[1] != s.dim ||
          !in_range(segment_q, scales_q.dimensions()[0]) ||
          !in_range(segment_k, scales_k.dimensions()[0]))
        return ffi::Error::InvalidArgument(
            "attention_cpu: norm tables must be empty or segment (L,) naming rows of scales (S, D)");
    }
    if (cos_q.element_count() + sin_q.element_count() + cos_k.element_count() +
            sin_k.element_count() > 0 &&
        (s.dim % 2 || !Dims(cos_q, {s.queries, s.dim / 2}) ||
         !Dims(sin_q, {s.queries, s.dim / 2}) || !Dims(cos_k, {s.keys, s.dim / 2}) ||
         !Dims(sin_k, {s.keys, s.dim / 2})))
      return ffi::Error::InvalidArgument(
          "attention_cpu: RoPE tables must be empty or (Lq, D/2) and (Lk, D/2), D even");
    return ffi::Error::Success();
  }
  Prep Queries() const { return Of(segment_q, scales_q, cos_q, sin_q); }
  Prep Keys() const { return Of(segment_k, scales_k, cos_k, sin_k); }
  // Rows of the (B, H, S, D) scale gradients per (example, head); 0 without a norm.
  int64_t QuerySegments() const { return segment_q.element_count() ? scales_q.dimensions()[0] : 0; }
  int64_t KeySegments() const { return segment_k.element_count() ? scales_k.dimensions()[0] : 0; }

 private:
  Prep Of(const ffi::Buffer<ffi::S32>& segment, const ffi::Buffer<ffi::F32>& scales,
          const ffi::Buffer<ffi::F32>& cos, const ffi::Buffer<ffi::F32>& sin) const {
    Prep prep;
    if (segment.element_count()) prep.norm = Norm{segment.typed_data(), scales.typed_data(), eps};
    if (cos.element_count()) prep.rope = Rotation{cos.typed_data(), sin.typed_data()};
    return prep;
  }
};

// Attention of head h of example b: its rows of out and of lse (B, H, Lq), the row log-sum-exp
// of the scaled, masked logits, and where `saved` is given, of the probabilities (B, H, Lq,
// Lk_padded; the first head.lk columns of a row, in the order of head.kept).
void ForwardHead(const Shape& s, const Rows& q, const Rows& k, const Rows& v, const bool* valid,
                 const Prep& prep_q, const Prep& prep_k, int64_t b, int64_t h, const Rows& out,
                 float* lse, float* saved) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dim));
  // Per thread and reused from call to call: fresh buffers would fault in fresh pages each time.
  thread_local HeadKeys head;  // packed once for all the query blocks
  thread_local std::vector<float> queries, probs, acc, row_max, row_sum;
  head.Pack(s, k, v, valid, prep_k, b, h, /*backward=*/false);
  // Saved rows keep all keys' width (ProbsAt); their first lk columns are the attended keys'.
  const int64_t lk = head.lk, dp = s.dim_padded();
  queries.resize(kQueryBlock * dp), probs.resize(kQueryBlock * lk), acc.resize(kQueryBlock * dp);
  row_max.resize(kQueryBlock), row_sum.resize(kQueryBlock);
  const int64_t computed = static_cast<int64_t>(head.queries.size());
  for (int64_t first = 0; first < computed; first += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, computed - first);
    const int64_t* index = &head.queries[first];
    PackRows(s, q, prep_q, b, h, index, rows, scale, queries.data());
    Probabilities(s, head, queries.data(), rows, probs.data(), row_max.data(), row_sum.data(),
                  nullptr);
    MatMul(probs.data(), lk, 1, head.values.data(), dp, rows, dp, lk, acc.data(), dp, false);
    for (int64_t i = 0; i < rows; ++i) {
      if (saved)  // normalised: what is saved is the probabilities
        StreamScaled(&probs[i * lk], 1.0f / row_sum[i], saved + s.ProbsAt(b, h, first + i), lk);
      if (i + kAhead < rows) Prefetch(out.At(b, index[i + kAhead], h), s.dim, true);
      float* row = out.At(b, index[i], h);
      for (int64_t d = 0; d < s.dim; ++d) row[d] = acc[i * dp + d] / row_sum[i];
      lse[s.LseAt(b, h, index[i])] = row_max[i] + std::log(row_sum[i]);
    }
  }
  if (computed < s.queries) ZeroSkippedRows(s, head, out, b, h, lse);
  if (saved) StreamFence();
}

// dq, dk, dv of head h of example b, from ForwardHead's inputs, its out, lse and saved
// probabilities (null: recomputed from lse), and dout.
void BackwardHead(const Shape& s, const Rows& q, const Rows& k, const Rows& v, const bool* valid,
                  const Prep& prep_q, const Prep& prep_k, const Rows& out, const float* lse,
                  const float* saved, const Rows& dout, int64_t b, int64_t h, const Rows& dq,
                  const Rows& dk, const Rows& dv, float* q_scale_grads, float* k_scale_grads) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dim));
  thread_local HeadKeys head;  // per thread and reused, as in ForwardHead
  thread_local std::vector<float> queries, out_grad, probs, grads, query_grad, delta, block_lse;
  thread_local std::vector<float> key_grad, value_grad;  // summed over the query blocks
  head.Pack(s, k, v, valid, prep_k, b, h, /*backward=*/true, /*logits=*/!saved);
  const int64_t lk = head.lk, dp = s.dim_padded();
  // Rows of the probabilities: saved ones keep all keys' width, recomputed ones are lk wide.
  const int64_t probs_stride = saved ? s.keys_padded() : lk;
  queries.resize(kQueryBlock * dp), out_grad.resize(kQueryBlock * dp);
  probs.resize(kQueryBlock * lk), grads.resize(kQueryBlock * lk);
  query_grad.resize(kQueryBlock * dp), delta.resize(kQueryBlock), block_lse.resize(kQueryBlock);
  key_grad.assign(lk * dp, 0.0f), value_grad.assign(lk * dp, 0.0f);
  const int64_t computed = static_cast<int64_t>(head.queries.size());
  for (int64_t first = 0; first < computed; first += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, computed - first);
    const int64_t* index = &head.queries[first];
    PackRows(s, q, prep_q, b, h, index, rows, scale, queries.data());
    PackRows(s, dout, Prep{}, b, h, index, rows, 1.0f, out_grad.data());
    // delta = rowsum(dO * O): the softmax Jacobian's correction term.
    for (int64_t i = 0; i < rows; ++i) {
      if (i + kAhead < rows) Prefetch(out.At(b, index[i + kAhead], h), s.dim);
      delta[i] = Dot(out.At(b, index[i], h), &out_grad[i * dp], s.dim);
    }
    const float* block = probs.data();
    if (saved) {
      block = saved + s.ProbsAt(b, h, first);
    } else {
      for (int64_t i = 0; i < rows; ++i) block_lse[i] = lse[s.LseAt(b, h, index[i])];
      Probabilities(s, head, queries.data(), rows, probs.data(), nullptr, nullptr,
                    block_lse.data());
    }
    // dV += P^T dO; dP = dO V^T; dS = P * (dP - delta).
    MatMul(block, 1, probs_stride, out_grad.data(), dp, lk, dp, rows, value_grad.data(), dp, true);
    MatMul(out_grad.data(), dp, 1, head.values_t.data(), lk, rows, lk, s.dim, grads.data(), lk,
           false);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < lk; j += kLanes)
        Store(&grads[i * lk + j],
              Load(block + i * probs_stride + j) * (Load(&grads[i * lk + j]) - delta[i]));
    // dQ = scale * dS K; dK += dS^T (scale * Q); both for the prepared q and k until written.
    MatMul(grads.data(), lk, 1, head.keys.data(), dp, rows, dp, lk, query_grad.data(), dp, false);
    MatMul(grads.data(), 1, lk, queries.data(), dp, lk, dp, rows, key_grad.data(), dp, true);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t j = index[i];
      if (i + kAhead < rows) Prefetch(dq.At(b, index[i + kAhead], h), s.dim, true);
      prep_q.Backward(j, q.At(b, j, h), q.Bias(j, h), &query_grad[i * dp], s.dim, scale,
                      dq.At(b, j, h), q_scale_grads);
    }
  }
  if (computed < s.queries) ZeroSkippedRows(s, head, dq, b, h);
  // Keys that were not attended had probability 0 in every row: their gradients are 0.
  for (int64_t j = 0, i = 0; j < s.keys; ++j) {
    if (j + kAhead < s.keys) {
      Prefetch(k.At(b, j + kAhead, h), s.dim);
      Prefetch(dk.At(b, j + kAhead, h), s.dim, true), Prefetch(dv.At(b, j + kAhead, h), s.dim, true);
    }
    float* key_row = dk.At(b, j, h);
    float* value_row = dv.At(b, j, h);
    if (i < static_cast<int64_t>(head.kept.size()) && head.kept[i] == j) {
      prep_k.Backward(j, k.At(b, j, h), k.Bias(j, h), &key_grad[i * dp], s.dim, 1.0f, key_row,
                      k_scale_grads);
      std::memcpy(value_row, &value_grad[i * dp], s.dim * sizeof(float));
      ++i;
    } else {
      std::memset(key_row, 0, s.dim * sizeof(float));
      std::memset(value_row, 0, s.dim * sizeof(float));
    }
  }
}

// Checks the norm and RoPE tables and the saved probabilities (none, or (B, H, Lq, Lk_padded))
// against the shape, then runs work(b, h) for every (example, head) over the pool.
template <typename Work>
ffi::Error ForEachHead(ffi::ThreadPool& pool, const Shape& s, const PrepTables& prep,
                       int64_t saved_probs, Work work) {
  if (auto error = prep.Check(s); error.failure()) return error;
  if (saved_probs && saved_probs != s.batch * s.heads * s.queries * s.keys_padded())
    return ffi::Error::InvalidArgument(
        "attention_cpu: saved probabilities must be empty or (B, H, Lq, Lk rounded up to 16)");
  jova::ParallelFor(pool, s.batch * s.heads,
                    [&](int64_t task) { work(task / s.heads, task % s.heads); });
  return ffi::Error::Success();
}

// The (S, D) slices of a task's scale gradients (B, H, S, D), zeroed: its own, so that no two
// tasks add to one.
float* TaskScaleGrads(ffi::ResultBuffer<ffi::F32>& grads, int64_t segments, const Shape& s,
                      int64_t b, int64_t h) {
  const int64_t rows = segments * s.dim;
  float* task = grads->typed_data() + (b * s.heads + h) * rows;
  std::fill(task, task + rows, 0.0f);
  return task;
}

// Both pairs' forward, once their rows are laid out: out and lse for every (example, head), and
// the probabilities where `probs` has room for them.
ffi::Error ForwardAll(ffi::ThreadPool& pool, const Shape& s, const PrepTables& prep,
                      const bool* valid, const Rows& q, const Rows& k, const Rows& v,
                      const Rows& out, ffi::ResultBuffer<ffi::F32>& lse,
                      ffi::ResultBuffer<ffi::F32>& probs) {
  const int64_t saved = probs->element_count();
  return ForEachHead(pool, s, prep, saved, [&](int64_t b, int64_t h) {
    ForwardHead(s, q, k, v, valid, prep.Queries(), prep.Keys(), b, h, out, lse->typed_data(),
                saved ? probs->typed_data() : nullptr);
  });
}

// Both pairs' backward, likewise: dq, dk, dv and each (example, head)'s share of the scales'
// gradients.
ffi::Error BackwardAll(ffi::ThreadPool& pool, const Shape& s, const PrepTables& prep,
                       const bool* valid, const Rows& q, const Rows& k, const Rows& v,
                       const Rows& out, const Rows& dout, const ffi::Buffer<ffi::F32>& lse,
                       const ffi::Buffer<ffi::F32>& probs, const Rows& dq, const Rows& dk,
                       const Rows& dv, ffi::ResultBuffer<ffi::F32>& dscales_q,
                       ffi::ResultBuffer<ffi::F32>& dscales_k) {
  const int64_t saved = probs.element_count();
  return ForEachHead(pool, s, prep, saved, [&](int64_t b, int64_t h) {
    BackwardHead(s, q, k, v, valid, prep.Queries(), prep.Keys(), out, lse.typed_data(),
                 saved ? probs.typed_data() : nullptr, dout, b, h, dq, dk, dv,
                 TaskScaleGrads(dscales_q, prep.QuerySegments(), s, b, h),
                 TaskScaleGrads(dscales_k, prep.KeySegments(), s, b, h));
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid,
                   ffi::Buffer<ffi::S32> segment_q, ffi::Buffer<ffi::F32> scales_q,
                   ffi::Buffer<ffi::S32> segment_k, ffi::Buffer<ffi::F32> scales_k,
                   ffi::Buffer<ffi::F32> cos_q, ffi::Buffer<ffi::F32> sin_q,
                   ffi::Buffer<ffi::F32> cos_k, ffi::Buffer<ffi::F32> sin_k, float eps,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   ffi::ResultBuffer<ffi::F32> probs) {
  if (auto error = CheckShapes(q, k, v, valid); error.failure()) return error;
  const auto qd = q.dimensions();
  const Shape s{qd[0], qd[1], k.dimensions()[1], qd[2], qd[3]};
  const PrepTables prep{segment_q, segment_k, scales_q, scales_k, cos_q, sin_q, cos_k, sin_k, eps};
  const Rows q_rows = Rows::Joint(q.typed_data(), s.queries, s.heads, s.dim);
  const Rows k_rows = Rows::Joint(k.typed_data(), s.keys, s.heads, s.dim);
  const Rows v_rows = Rows::Joint(v.typed_data(), s.keys, s.heads, s.dim);
  const Rows out_rows = Rows::Joint(out->typed_data(), s.queries, s.heads, s.dim);
  return ForwardAll(pool, s, prep, valid.typed_data(), q_rows, k_rows, v_rows, out_rows, lse, probs);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid,
                    ffi::Buffer<ffi::S32> segment_q, ffi::Buffer<ffi::F32> scales_q,
                    ffi::Buffer<ffi::S32> segment_k, ffi::Buffer<ffi::F32> scales_k,
                    ffi::Buffer<ffi::F32> cos_q, ffi::Buffer<ffi::F32> sin_q,
                    ffi::Buffer<ffi::F32> cos_k, ffi::Buffer<ffi::F32> sin_k, float eps,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    ffi::ResultBuffer<ffi::F32> dscales_q, ffi::ResultBuffer<ffi::F32> dscales_k) {
  if (auto error = CheckShapes(q, k, v, valid); error.failure()) return error;
  const auto qd = q.dimensions();
  const Shape s{qd[0], qd[1], k.dimensions()[1], qd[2], qd[3]};
  const PrepTables prep{segment_q, segment_k, scales_q, scales_k, cos_q, sin_q, cos_k, sin_k, eps};
  const auto joint = [&](float* data, int64_t length) {
    return Rows::Joint(data, length, s.heads, s.dim);
  };
  const Rows q_rows = joint(q.typed_data(), s.queries), k_rows = joint(k.typed_data(), s.keys),
             v_rows = joint(v.typed_data(), s.keys), out_rows = joint(out.typed_data(), s.queries),
             dout_rows = joint(dout.typed_data(), s.queries),
             dq_rows = joint(dq->typed_data(), s.queries), dk_rows = joint(dk->typed_data(), s.keys),
             dv_rows = joint(dv->typed_data(), s.keys);
  return BackwardAll(pool, s, prep, valid.typed_data(), q_rows, k_rows, v_rows, out_rows,
                     dout_rows, lse, probs, dq_rows, dk_rows, dv_rows, dscales_q, dscales_k);
}

// The same attention over a sequence given as segments: each segment's QKV projection (B, L_seg,
// 3, H, D) before its bias (3, H, D), which the kernel adds as it reads; each segment's output
// (B, L_seg, H, D); in the backward each segment's dqkv (B, L_seg, 3, H, D). kv_valid and the norm
// and RoPE tables are the joint sequence's, the segments in order.
ffi::Error SegmentForward(ffi::ThreadPool pool, ffi::Buffer<ffi::PRED> valid,
                          ffi::Buffer<ffi::S32> segment_q, ffi::Buffer<ffi::F32> scales_q,
                          ffi::Buffer<ffi::S32> segment_k, ffi::Buffer<ffi::F32> scales_k,
                          ffi::Buffer<ffi::F32> cos_q, ffi::Buffer<ffi::F32> sin_q,
                          ffi::Buffer<ffi::F32> cos_k, ffi::Buffer<ffi::F32> sin_k,
                          ffi::RemainingArgs args, float eps, ffi::ResultBuffer<ffi::F32> lse,
                          ffi::ResultBuffer<ffi::F32> probs, ffi::RemainingRets rets) {
  const int64_t count = static_cast<int64_t>(rets.size());  // one output per segment
  Shape s;
  std::vector<Rows::Segment> qkv, out;
  if (auto error = SegmentInputs(args, count, valid, qkv, s); error.failure()) return error;
  if (auto error = SegmentArrays(rets, 0, qkv, s, 1, Result, out); error.failure()) return error;
  const PrepTables prep{segment_q, segment_k, scales_q, scales_k, cos_q, sin_q, cos_k, sin_k, eps};
  const Rows q_rows(qkv, 0, 3, s.heads, s.dim), k_rows(qkv, 1, 3, s.heads, s.dim),
             v_rows(qkv, 2, 3, s.heads, s.dim), out_rows(out, 0, 1, s.heads, s.dim);
  return ForwardAll(pool, s, prep, valid.typed_data(), q_rows, k_rows, v_rows, out_rows, lse, probs);
}

ffi::Error SegmentBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::PRED> valid,
                           ffi::Buffer<ffi::S32> segment_q, ffi::Buffer<ffi::F32> scales_q,
                           ffi::Buffer<ffi::S32> segment_k, ffi::Buffer<ffi::F32> scales_k,
                           ffi::Buffer<ffi::F32> cos_q, ffi::Buffer<ffi::F32> sin_q,
                           ffi::Buffer<ffi::F32> cos_k, ffi::Buffer<ffi::F32> sin_k,
                           ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> probs,
                           ffi::RemainingArgs args, float eps,
                           ffi::ResultBuffer<ffi::F32> dscales_q,
                           ffi::ResultBuffer<ffi::F32> dscales_k, ffi::RemainingRets rets) {
  // Arguments: the segments' qkv, biases, outputs and output gradients; results: their dqkv.
  const int64_t count = static_cast<int64_t>(rets.size());
  if (static_cast<int64_t>(args.size()) != 4 * count)
    return ffi::Error::InvalidArgument(
        "attention_cpu: a segment backward takes 4 arguments per segment (qkv, bias, out, dout)");
  Shape s;
  std::vector<Rows::Segment> qkv, out, dout, dqkv;
  if (auto error = SegmentInputs(args, count, valid, qkv, s); error.failure()) return error;
  if (auto error = SegmentArrays(args, 2 * count, qkv, s, 1, Argument, out); error.failure())
    return error;
  if (auto error = SegmentArrays(args, 3 * count, qkv, s, 1, Argument, dout); error.failure())
    return error;
  if (auto error = SegmentArrays(rets, 0, qkv, s, 3, Result, dqkv); error.failure()) return error;
  const PrepTables prep{segment_q, segment_k, scales_q, scales_k, cos_q, sin_q, cos_k, sin_k, eps};
  const auto slot = [&](const std::vector<Rows::Segment>& segments, int64_t slot, int64_t slots) {
    return Rows(segments, slot, slots, s.heads, s.dim);
  };
  const Rows q_rows = slot(qkv, 0, 3), k_rows = slot(qkv, 1, 3), v_rows = slot(qkv, 2, 3),
             out_rows = slot(out, 0, 1), dout_rows = slot(dout, 0, 1),
             dq_rows = slot(dqkv, 0, 3), dk_rows = slot(dqkv, 1, 3), dv_rows = slot(dqkv, 2, 3);
  return BackwardAll(pool, s, prep, valid.typed_data(), q_rows, k_rows, v_rows, out_rows,
                     dout_rows, lse, probs, dq_rows, dk_rows, dv_rows, dscales_q, dscales_k);
}

}  // namespace

// Every call's norm and RoPE tables, after its sequence.
template <typename Binding>
auto WithTables(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::S32>>()   // segment_q
      .template Arg<ffi::Buffer<ffi::F32>>()   // scales_q
      .template Arg<ffi::Buffer<ffi::S32>>()   // segment_k
      .template Arg<ffi::Buffer<ffi::F32>>()   // scales_k
      .template Arg<ffi::Buffer<ffi::F32>>()   // cos_q
      .template Arg<ffi::Buffer<ffi::F32>>()   // sin_q
      .template Arg<ffi::Buffer<ffi::F32>>()   // cos_k
      .template Arg<ffi::Buffer<ffi::F32>>();  // sin_k
}

// The joint calls start with the pool, q, k, v, kv_valid, the tables and eps.
auto AttentionCall() {
  return WithTables(ffi::Ffi::Bind()
                        .Ctx<ffi::ThreadPool>()
                        .Arg<ffi::Buffer<ffi::F32>>()    // q
                        .Arg<ffi::Buffer<ffi::F32>>()    // k
                        .Arg<ffi::Buffer<ffi::F32>>()    // v
                        .Arg<ffi::Buffer<ffi::PRED>>())  // kv_valid
      .Attr<float>("eps");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaAttentionForward, Forward,
                              AttentionCall()  // -> out, lse, probs (saved or empty)
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaAttentionBackward, Backward,
                              // out, lse, probs, dout -> dq, dk, dv, dscales_q, dscales_k
                              AttentionCall()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The segment calls start with the pool, kv_valid and the tables.
auto SegmentCall() {
  return WithTables(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::PRED>>());
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaSegmentAttentionForward, SegmentForward,
                              SegmentCall()  // then each segment's qkv, then each one's bias
                                  .RemainingArgs()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Ret<ffi::Buffer<ffi::F32>>()  // probs (saved or empty)
                                  .RemainingRets());             // each segment's out

XLA_FFI_DEFINE_HANDLER_SYMBOL(JovaSegmentAttentionBackward, SegmentBackward,
                              SegmentCall()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // probs
                                  .RemainingArgs()  // each segment's qkv, bias, out, dout
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscales_q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscales_k
                                  .RemainingRets());             // each segment's dqkv
