// normlab's CPU kernels as torch operators (namespace `normlab`), on torch's C++ API.
//
// Three canonical forms (see normlab/kernels/__init__.py):
//   rows      x (R, D), one statistic per row; γ, β index (r % groups)·(D/seg) + j/seg
//             (LayerNorm, RMSNorm; GroupNorm and InstanceNorm on contiguous input);
//   channels  x (N, C, S), one statistic per channel over (N, S) (BatchNorm in training;
//             S == 1 is the (M, C) layout of 2-D and channels_last input);
//   groups    x (N, S, C), one statistic per (sample, group of C/groups adjacent channels)
//             (GroupNorm and InstanceNorm on channels_last input);
// plus BatchNorm in eval: y = (x − m)·a + h per channel.
//
// Every op takes x in its own shape and layout, plus the canonical view to compute in
// (`shape`, and `permute` for channels_last), and returns y/dx as a fresh tensor in x's shape
// and memory format.
//
// Numerics (the reference path in normlab/autograd.py is the oracle, tests/test_kernels.py):
// statistics in float64 whatever the input, in one pass over d = x − x₀ (x₀ the first value
// of the row or channel, 0 if it is not finite), so a large common offset cancels first
// (float input: float lanes over chunks of 256 values, each chunk then in float64; a run whose
// float sums overflow is redone in float64); the output in x's precision (float for fp16/bf16) with
// the mean split into m₀ = (x's type)(mean) and the residual folded into the shift, so (x − m₀)
// is exact near the mean; parameter-gradient partials per block of at most 256 rows, summed in
// float64. The compiler contracts nothing into FMAs (-ffp-contract=off): γ·dy − mean(g) must
// cancel exactly when it is 0; the explicit at::vec fused multiply-adds sit where nothing does.

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace normlab {
namespace {

using at::IntArrayRef;
using at::Tensor;

// Outputs are allocated uninitialized (the tests run with torch.use_deterministic_algorithms, which
// fills fresh memory with NaN, so an element a kernel forgets to write shows)
Tensor out_like(const Tensor& x) { return at::empty_like(x); }

Tensor vec(const Tensor& x, int64_t n, at::ScalarType dtype) {
  return at::empty({n}, x.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

int64_t grain(int64_t work_per_item);

#if defined(__AVX2__)
// an 8×8 block of 4-byte values transposed in registers: rows of src at stride ss, of dst at ds
inline void transpose8(const uint32_t* src, int64_t ss, uint32_t* dst, int64_t ds) {
  const float* sp = reinterpret_cast<const float*>(src);
  float* dp = reinterpret_cast<float*>(dst);
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(sp + i * ss);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dp + i * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dp + (i + 4) * ds, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// an 8×8 block of 2-byte values (fp16, bf16) transposed in registers, as transpose8 does
inline void transpose8_u16(const uint16_t* src, int64_t ss, uint16_t* dst, int64_t ds) {
  __m128i r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ss));
  for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved by 16 bits
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // then by 32 bits: four rows' values of two columns each
    u[4 * h + 0] = _mm_unpacklo_epi32(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm_unpackhi_epi32(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // then by 64 bits: whole columns
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i) * ds), _mm_unpacklo_epi64(u[i], u[i + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i + 1) * ds), _mm_unpackhi_epi64(u[i], u[i + 4]));
  }
}
#endif

// dst (S, C) = src (C, S)ᵀ for each of B matrices, in tiles of 32×32 (both sides in cache);
// 4- and 2-byte values in 8×8 register blocks where AVX2 is there
template <typename T>
void transpose_kernel(const T* src, T* dst, int64_t B, int64_t C, int64_t S) {
  constexpr int64_t K = 32;
  const int64_t tc = (C + K - 1) / K, ts = (S + K - 1) / K;
  at::parallel_for(0, B * ts * tc, grain(K * K), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / (ts * tc), j = i % (ts * tc), s0 = (j / tc) * K, c0 = (j % tc) * K;
      const T* sp = src + b * C * S;
      T* dp = dst + b * C * S;
      const int64_t s1 = std::min(S, s0 + K), c1 = std::min(C, c0 + K);
      int64_t c = c0;
#if defined(__AVX2__)
      if constexpr (sizeof(T) == 4 || sizeof(T) == 2) {
        for (; c + 8 <= c1; c += 8) {
          int64_t s = s0;
          for (; s + 8 <= s1; s += 8) {
            if constexpr (sizeof(T) == 4) {
              transpose8(sp + c * S + s, S, dp + s * C + c, C);
            } else {
              transpose8_u16(sp + c * S + s, S, dp + s * C + c, C);
            }
          }
          for (; s < s1; ++s)
            for (int64_t k = c; k < c + 8; ++k) dp[s * C + k] = sp[k * S + s];
        }
      }
#endif
      for (int64_t s = s0; s < s1; ++s)
        for (int64_t k = c; k < c1; ++k) dp[s * C + k] = sp[k * S + s];
    }
  });
}

// t contiguous. A permuted view whose last dim is dim 1 (or 0) of a contiguous tensor (ConvNext's
// (N, H, W, C) of an (N, C, H, W) activation, a transposed matrix) is transposed in tiles; torch's
// strided copy of the same runs about 3x longer. Anything else: torch's copy.
Tensor packed(const Tensor& t) {
  if (t.is_contiguous()) return t;
  for (int64_t lo : {1, 0}) {
    if (t.dim() < lo + 2 || t.numel() == 0 || !t.movedim(-1, lo).is_contiguous()) continue;
    const int64_t B = lo ? t.size(0) : 1, C = t.size(-1), S = t.numel() / (B * C);
    Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    const void* src = t.const_data_ptr();
    void* dst = out.mutable_data_ptr();
    switch (t.element_size()) {
      case 2: transpose_kernel(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), B, C, S); return out;
      case 4: transpose_kernel(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), B, C, S); return out;
      case 8: transpose_kernel(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), B, C, S); return out;
      default: break;
    }
  }
  return t.contiguous();
}

// t (shaped like x) with its data in the canonical layout, for the kernels' pointers (its sizes are
// not the form's: the kernels take those from `shape`); t itself where it is already (no view to
// make: each costs as much as a small kernel), a copy only for an input or an incoming gradient
// in another layout
Tensor canon(const Tensor& t, IntArrayRef shape, IntArrayRef permute) {
  if (permute.empty() && t.is_contiguous()) return t;
  return packed(permute.empty() ? t : t.permute(permute)).view(shape);
}

// a fresh contiguous tensor of x's shape (the rows forms' y and dx, whatever x's strides, as torch's)
Tensor out_contiguous(const Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

// γ and β are read as they are where they are in x's dtype, else in x's compute precision (float
// for fp16/bf16 input): a float32 γ scales x̂ unrounded, as in torch's mixed-precision norms (a
// zero-centred 1 + γ keeps its digits), and a bf16 γ for bf16 input is read without a copy
template <typename T>
using param_t = at::opmath_type<T>;

// γ or β flat and contiguous in `dtype`; absent: a constant vector of `fill` (kept per thread for
// the last size and dtype asked: an RMSNorm layer asks for the same zeros each call)
Tensor param(const c10::optional<Tensor>& t, int64_t n, double fill, const Tensor& x, at::ScalarType dtype) {
  const auto options = x.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous);
  if (t.has_value() && t->defined()) {
    TORCH_CHECK_VALUE(t->numel() == n, "normlab: expected a parameter of ", n, " elements, got ", t->numel());
    if (t->dim() == 1 && t->scalar_type() == dtype && t->is_contiguous()) return *t;
    return t->reshape({n}).to(dtype).contiguous();
  }
  thread_local Tensor cached[2];
  Tensor& c = cached[fill == 0.0 ? 0 : 1];
  if (!x.device().is_cpu()) return at::full({n}, fill, options);
  if (!c.defined() || c.numel() != n || c.scalar_type() != dtype) c = at::full({n}, fill, options);
  return c;
}

// the dtype a kernel reads γ, β in and returns dγ, dβ in: x's where every given one is in it, else
// x's compute dtype (a float32 γ of bf16 input gets its gradient summed and stored in float32)
at::ScalarType param_dtype(const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, const Tensor& x) {
  auto in_x = [&](const c10::optional<Tensor>& t) {
    return !(t.has_value() && t->defined()) || t->scalar_type() == x.scalar_type();
  };
  return in_x(weight) && in_x(bias) ? x.scalar_type() : at::toOpMathType(x.scalar_type());
}

// (γ, β) for a kernel on x, in param_dtype
std::pair<Tensor, Tensor> params(const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t n,
                                 const Tensor& x) {
  const auto dtype = param_dtype(weight, bias, x);
  return {param(weight, n, 1.0, x, dtype), param(bias, n, 0.0, x, dtype)};
}

// f(w_t{}) with w_t the C++ type of the parameters `w` (from params): scalar_t or param_t<scalar_t>
template <typename scalar_t, typename F>
void with_param_type(const Tensor& w, F f) {
  if constexpr (std::is_same_v<scalar_t, param_t<scalar_t>>) {
    f(scalar_t{});
  } else if (w.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else {
    f(param_t<scalar_t>{});
  }
}

int64_t blocks(int64_t rows) {
  // a block per thread at least, at most 256 rows each (their partial sums run in x's precision)
  int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(threads, (rows + 255) / 256)));
}

int64_t grain(int64_t work_per_item) {
  // items per task so that a task touches at least ~2K values (smaller: one thread): torch's own
  // norm kernels split even a few thousand rows' worth over the threads, and a warm pool's
  // fork and join (a microsecond or two) is less than the half of a 10K-value pass it saves
  return std::max<int64_t>(1, 2048 / std::max<int64_t>(1, work_per_item));
}

// the shift of the shifted sums: a value of the data, so that a large common offset cancels
// first; a non-finite one shifts nothing, so an inf in the data reaches the mean as in torch
inline double shift_of(double v) { return std::isfinite(v) ? v : 0.0; }

struct Stats {
  double mean, var, rstd;
};

// the biased variance as the statistics report it: clamped at 0 against rounding, and NaN where
// the mean is not finite (the data hold an inf or a NaN: inf − inf, as torch's), whatever order
// the sums were merged in
inline double variance(double mean, double v) {
  if (!std::isfinite(mean)) return std::numeric_limits<double>::quiet_NaN();
  return v < 0.0 ? 0.0 : v;
}

// mean, biased variance and rstd from the shifted sums s = Σd, ss = Σd², d = x − shift
inline Stats finish(double n, double shift, double s, double ss, bool center, double eps) {
  double m = 0.0, v;
  if (center) {
    double md = s / n;
    v = (ss - s * md) / n;
    m = shift + md;
  } else {
    v = ss / n;
  }
  v = center ? variance(m, v) : (v < 0.0 ? 0.0 : v);
  return {m, v, 1.0 / std::sqrt(v + eps)};
}

// the saved float64 statistics in x's precision: x̂ = (x − m₀)·r₀ − c₀, the mean's rounding
// residual folded into c₀; rstd recomputed from the saved variance exactly as the forward did
template <typename opmath_t>
struct Saved {
  double rs;
  opmath_t m0, rs0, c0;
};

template <typename scalar_t, typename opmath_t>
inline Saved<opmath_t> saved(double m, double v, double eps) {
  double rs = 1.0 / std::sqrt(v + eps);
  opmath_t m0 = static_cast<opmath_t>(static_cast<scalar_t>(m));
  return {rs, m0, static_cast<opmath_t>(rs), static_cast<opmath_t>((m - static_cast<double>(m0)) * rs)};
}

// ------------------------------------------------------------------------ the reductions
// float input: vectors of at::vec (8 lanes with AVX2) summed in float over chunks of at most 256
// values (two independent accumulators, so adds do not wait on each other), each chunk's lanes
// then added in float64 lane by lane; the tail of fewer than a vector and other dtypes: a plain
// loop in float64

constexpr int64_t kChunk = 256;  // 32 values per float lane: the float error stays ~1e-6 of the chunk

// fp16 and bf16 are computed in float lanes as float is: each value converts exactly
template <typename T>
constexpr bool kReduced = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
template <typename T>
constexpr bool kFloatLanes = std::is_same_v<T, float> || kReduced<T>;

using VF = at::vec::Vectorized<float>;

// the VF::size() values at p, as floats (float and fp16/bf16 only: other types never get here)
template <typename scalar_t>
inline VF load_f(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return VF::loadu(p);
  } else if constexpr (kReduced<scalar_t>) {
    VF v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  } else {
    return VF(0.f);
  }
}

// two float vectors stored as 2·Vectorized<float>::size() values of scalar_t at p, rounded to nearest
// even as static_cast does
template <typename scalar_t>
inline void store_f2(scalar_t* p, const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
    b.store(p + at::vec::Vectorized<float>::size());
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

// one float vector stored as Vectorized<float>::size() values of scalar_t at p (fp16/bf16: the
// first half of a converted pair)
template <typename scalar_t>
inline void store_f1(scalar_t* p, const at::vec::Vectorized<float>& a) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
  } else {
    at::vec::convert_from_float<scalar_t>(a, a).store(p, at::vec::Vectorized<float>::size());
  }
}

// The vector at k of a vec_map: n ≤ VF::size() valid lanes (fewer at the end of a run: the rest
// read as 0 and never written)
struct Lanes {
  int64_t k, n;
  static constexpr int64_t L = VF::size();

  // p[k, k + n) as floats: the values of x (fp16/bf16), or coefficients and partials (float)
  template <typename T>
  VF operator()(const T* p) const {
    if constexpr (std::is_same_v<T, float>) {
      return n == L ? VF::loadu(p + k) : VF::loadu(p + k, n);
    } else {
      if (n == L) return load_f(p + k);
      if constexpr (kReduced<T>) {  // a masked load where the ISA has one (AVX512)
        return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p + k, n)));
      } else {
        return VF(0.f);
      }
    }
  }
  void put(float* p, const VF& v) const { n == L ? v.store(p + k) : v.store(p + k, n); }
};

// y[k, k + n) = f(ld) over [0, n) in float vectors for fp16/bf16 y, pairs of vectors, then one,
// then the partial vector of the last < VF::size() values: f computes the vector that ld (a
// Lanes) reads from its arrays, with the operations of the scalar loop that float and double run
// instead. Returns where that loop starts: n for fp16/bf16 (every value is done here — their
// scalar conversions, one value per instruction for fp16, cost more than the arithmetic),
// 0 for float and double, whose scalar loops the compiler vectorizes itself
template <typename scalar_t, typename F>
inline int64_t vec_map(int64_t n, scalar_t* y, F f) {
  if constexpr (kReduced<scalar_t>) {
    constexpr int64_t L = VF::size();
    int64_t k = 0;
    for (; k + 2 * L <= n; k += 2 * L) store_f2(y + k, f(Lanes{k, L}), f(Lanes{k + L, L}));
    if (k + L <= n) {
      store_f1(y + k, f(Lanes{k, L}));
      k += L;
    }
    if (k < n) {
      const VF v = f(Lanes{k, n - k});
      at::vec::convert_from_float<scalar_t>(v, v).store(y + k, n - k);
    }
    return n;
  } else {
    return 0;
  }
}

// p[0, n) in x's compute precision: for fp16/bf16 converted into buf in float vectors (exact), for
// float and double p itself. The scalar loops after it then run on floats, which the compiler
// vectorizes; fp16's scalar conversion (one value per instruction) would not be.
template <typename scalar_t>
inline const at::opmath_type<scalar_t>* widened(const scalar_t* p, int64_t n, at::opmath_type<scalar_t>* buf) {
  if constexpr (kReduced<scalar_t>) {
    constexpr int64_t L = VF::size();
    int64_t k = 0;
    for (; k + L <= n; k += L) load_f(p + k).store(buf + k);
    for (; k < n; ++k) buf[k] = static_cast<float>(p[k]);
    return buf;
  } else {
    return p;
  }
}

// where a loop writes values of x's compute precision that belong in dst: buf for fp16/bf16 (then
// narrowed into dst), dst itself for float and double
template <typename scalar_t>
inline at::opmath_type<scalar_t>* widened_out(scalar_t* dst, at::opmath_type<scalar_t>* buf) {
  if constexpr (kReduced<scalar_t>) {
    return buf;
  } else {
    return dst;
  }
}

// buf[0, n) rounded into dst (fp16/bf16, to nearest even as static_cast does); nothing for
// float and double, whose loop wrote dst
template <typename scalar_t>
inline void narrowed(const at::opmath_type<scalar_t>* buf, int64_t n, scalar_t* dst) {
  if constexpr (kReduced<scalar_t>) {
    const int64_t k0 = vec_map(n, dst, [&](const Lanes& ld) { return ld(buf); });
    for (int64_t k = k0; k < n; ++k) dst[k] = static_cast<scalar_t>(buf[k]);
  }
}

// the pairs of sums (s, ss) += Σ f over the whole vectors of R runs of n values each, run r at
// offset r·stride (BatchNorm's N runs of a channel's S values: the float lanes carry on from one
// run to the next, each chunk of kChunk values then added in float64); returns the length of a
// run's whole vectors, the caller sums the tails. f(base, k, a, c) adds the vector at base + k
// into the accumulators a and c
template <typename F>
int64_t vec_pair_sums(int64_t R, int64_t n, int64_t stride, double& s, double& ss, F f) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t L = V::size();
  const int64_t whole = n - n % L;
  double ds[L] = {}, dss[L] = {};
  V a0(0.f), a1(0.f), c0(0.f), c1(0.f);
  int64_t since = 0;  // values in the float lanes since they were last added in float64
  auto flush = [&] {
    float ta[L], tc[L];
    (a0 + a1).store(ta);
    (c0 + c1).store(tc);
    for (int64_t l = 0; l < L; ++l) {
      ds[l] += ta[l];
      dss[l] += tc[l];
    }
    a0 = a1 = c0 = c1 = V(0.f);
    since = 0;
  };
  for (int64_t r = 0; r < R; ++r) {
    const int64_t base = r * stride;
    for (int64_t j = 0; j < whole;) {
      const int64_t end = std::min(whole, j + (kChunk - since));
      int64_t k = j;
      for (; k + 2 * L <= end; k += 2 * L) {
        f(base, k, a0, c0);
        f(base, k + L, a1, c1);
      }
      if (k < end) f(base, k, a0, c0);
      since += end - j;
      if (since >= kChunk) flush();
      j = end;
    }
  }
  if (since > 0) flush();
  for (int64_t l = 0; l < L; ++l) {
    s += ds[l];
    ss += dss[l];
  }
  return whole;
}

// R runs of n values each (n shorter than a vector), value(r, j) converted to float, copied into a
// buffer of at most kChunk values, whole runs at a time; sum(buffer, used) takes each full buffer
template <typename Value, typename Sum>
void pack_runs(int64_t n, int64_t R, Value value, Sum sum) {
  float buf[kChunk];
  int64_t used = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (used + n > kChunk) {
      sum(static_cast<const float*>(buf), used);
      used = 0;
    }
    for (int64_t j = 0; j < n; ++j) buf[used++] = value(r, j);
  }
  if (used > 0) sum(static_cast<const float*>(buf), used);
}

// (Σd, Σd²), d = x − shift (shift a value of x: a large common offset cancels first), over R runs
// of n values at stride `stride`
template <typename scalar_t>
std::pair<double, double> shifted_sums(const scalar_t* x, int64_t n, double shift, int64_t R = 1, int64_t stride = 0) {
  double s = 0.0, ss = 0.0;
  int64_t j0 = 0;
  if constexpr (kFloatLanes<scalar_t>) {
    if (n < 2 * VF::size() && n % VF::size() && R > 1) {  // short runs (a 2×2 to 5×5 map) that leave a
      // tail: packed as floats, then summed in lanes
      pack_runs(n, R, [&](int64_t r, int64_t j) { return static_cast<float>(x[r * stride + j]); },
                [&](const float* buf, int64_t used) {
                  auto [a, b] = shifted_sums<float>(buf, used, shift);
                  s += a, ss += b;
                });
      return {s, ss};
    }
    using V = at::vec::Vectorized<float>;
    const V vs(static_cast<float>(shift));  // exact: shift is a value of x
    j0 = vec_pair_sums(R, n, stride, s, ss, [&](int64_t base, int64_t k, V& a, V& c) {
      V d = load_f(x + base + k) - vs;
      a = a + d;
      c = c + d * d;
    });
    if (!std::isfinite(s + ss)) s = ss = 0.0, j0 = 0;  // float squares overflow past ~1e19: again in float64
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = j0; j < n; ++j) {
      double d = static_cast<double>(x[r * stride + j]) - shift;
      s += d;
      ss += d * d;
    }
  return {s, ss};
}

// (Σg, Σg·x̂), g = γ·dy (γ = 1 where w is null; else γ[k] for the k-th value of a run),
// x̂ = (x − m₀)·r₀ − c₀, over R runs of n values at stride `stride`
template <typename scalar_t, typename opmath_t, typename w_t>
std::pair<double, double> grad_sums(const scalar_t* x, const scalar_t* dy, const w_t* w, int64_t n,
                                    opmath_t m0, opmath_t rs0, opmath_t c0, int64_t R = 1, int64_t stride = 0) {
  double sg = 0.0, sgx = 0.0;
  int64_t j0 = 0;
  if constexpr (kFloatLanes<scalar_t>) {
    if (n < 2 * VF::size() && n % VF::size() && R > 1 && w == nullptr) {  // short runs: packed as floats first
      float gbuf[kChunk];
      int64_t at = 0;
      pack_runs(n, R, [&](int64_t r, int64_t j) {
                  gbuf[at++] = static_cast<float>(dy[r * stride + j]);  // beside x's copy, reset with it
                  return static_cast<float>(x[r * stride + j]);
                },
                [&](const float* xbuf, int64_t used) {
                  auto [a, b] = grad_sums<float, opmath_t, float>(xbuf, gbuf, nullptr, used, m0, rs0, c0);
                  sg += a, sgx += b;
                  at = 0;
                });
      return {sg, sgx};
    }
    using V = at::vec::Vectorized<float>;
    const V vm(m0), vr(rs0), vc(c0);
    j0 = vec_pair_sums(R, n, stride, sg, sgx, [&](int64_t base, int64_t k, V& a, V& c) {
      V xh = at::vec::fmsub(load_f(x + base + k) - vm, vr, vc);
      V g = w ? load_f(dy + base + k) * load_f(w + k) : load_f(dy + base + k);
      a = a + g;
      c = at::vec::fmadd(g, xh, c);
    });
    if (!std::isfinite(sg + sgx)) sg = sgx = 0.0, j0 = 0;  // a float overflow: again in float64
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = j0; j < n; ++j) {
      const int64_t i = r * stride + j;
      opmath_t xh = (static_cast<opmath_t>(x[i]) - m0) * rs0 - c0;
      opmath_t g = static_cast<opmath_t>(dy[i]) * (w ? static_cast<opmath_t>(w[j]) : opmath_t(1));
      sg += g;
      sgx += g * xh;
    }
  return {sg, sgx};
}

// ------------------------------------------------------------------------------------ rows

template <typename scalar_t, typename w_t>
void rows_forward_kernel(const scalar_t* x, const w_t* w, const w_t* b, double eps, bool center,
                         int64_t R, int64_t D, int64_t groups, int64_t seg, scalar_t* y, double* mean,
                         double* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t K = D / seg;
  at::parallel_for(0, R, grain(D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* xr = x + r * D;
      scalar_t* yr = y + r * D;
      const double shift = center ? shift_of(static_cast<double>(xr[0])) : 0.0;
      auto [s, ss] = shifted_sums(xr, D, shift);
      Stats st = finish(static_cast<double>(D), shift, s, ss, center, eps);
      mean[r] = st.mean;
      var[r] = st.var;
      const opmath_t m0 = static_cast<opmath_t>(static_cast<scalar_t>(st.mean));
      if (seg == 1) {  // γ, β per column: row r uses their slice (r % groups)·D
        const w_t* wr = w + (r % groups) * D;
        const w_t* br = b + (r % groups) * D;
        const opmath_t rs0 = static_cast<opmath_t>(st.rstd);
        const opmath_t c0 = static_cast<opmath_t>((st.mean - static_cast<double>(m0)) * st.rstd);
        int64_t j0 = 0;
        if constexpr (kReduced<scalar_t>) {  // the loop below in float lanes, the same operations
          using V = at::vec::Vectorized<float>;
          const V vm(m0), vr(rs0), vc(c0);
          j0 = vec_map(D, yr, [&](const Lanes& ld) { return ((ld(xr) - vm) * vr - vc) * ld(wr) + ld(br); });
        }
#pragma omp simd
        for (int64_t j = j0; j < D; ++j) {
          opmath_t v = ((static_cast<opmath_t>(xr[j]) - m0) * rs0 - c0) * static_cast<opmath_t>(wr[j]) +
                       static_cast<opmath_t>(br[j]);
          yr[j] = static_cast<scalar_t>(v);
        }
      } else {  // γ, β per segment of `seg` columns
        const int64_t p0 = (r % groups) * K;
        for (int64_t k = 0; k < K; ++k) {
          const double scale = st.rstd * static_cast<double>(w[p0 + k]);
          const opmath_t s0 = static_cast<opmath_t>(scale);
          const opmath_t h0 =
              static_cast<opmath_t>(static_cast<double>(b[p0 + k]) - (st.mean - static_cast<double>(m0)) * scale);
          const scalar_t* xs = xr + k * seg;
          scalar_t* ys = yr + k * seg;
          const int64_t j0 = vec_map(seg, ys, [&](const Lanes& ld) { return (ld(xs) - VF(m0)) * VF(s0) + VF(h0); });
#pragma omp simd
          for (int64_t j = j0; j < seg; ++j) ys[j] = static_cast<scalar_t>((static_cast<opmath_t>(xs[j]) - m0) * s0 + h0);
        }
      }
    }
  });
}

// parameter gradients: per-block partials (float64) summed, stored in x's dtype
template <typename out_t>
void sum_blocks(const std::vector<double>& dwp, const std::vector<double>& dbp, int64_t nblk, int64_t P,
                out_t* dw, out_t* db) {
  at::parallel_for(0, P, nblk * P < 65536 ? P : grain(nblk), [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      double a = 0.0, c = 0.0;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        a += dwp[blk * P + j];
        c += dbp[blk * P + j];
      }
      dw[j] = static_cast<out_t>(a);
      db[j] = static_cast<out_t>(c);
    }
  });
}

// one row's coefficients for its dx: x̂ = (x − m₀)·r₀ − c₀, dx = r₀·(γ·dy − mg − x̂·mgx)
struct RowGrad {
  float m0, rs0, c0, mg, mgx;
};

// float rows with γ, β per column, NR rows at once: dx of each, and their dy·x̂, dy added to the
// block's partial dγ, dβ (read and written once for the NR rows). Fused multiply-adds only
// where nothing must cancel: γ·dy − mg is exactly 0 where γ·dy equals its mean
template <int NR>
void rows_dx_float(const float* const* xr, const float* const* gr, float* const* dxr, const float* w, int64_t D,
                   const RowGrad* c, float* dwl, float* dbl) {
  using V = at::vec::Vectorized<float>;
  V vm[NR], vr[NR], vc[NR], vmg[NR], vmgx[NR];
  for (int i = 0; i < NR; ++i) {
    vm[i] = V(c[i].m0), vr[i] = V(c[i].rs0), vc[i] = V(c[i].c0), vmg[i] = V(c[i].mg), vmgx[i] = V(c[i].mgx);
  }
  int64_t j = 0;
  for (; j + V::size() <= D; j += V::size()) {
    const V wv = V::loadu(w + j);
    V dwv = V::loadu(dwl + j), dbv = V::loadu(dbl + j);
    for (int i = 0; i < NR; ++i) {
      const V xh = at::vec::fmsub(V::loadu(xr[i] + j) - vm[i], vr[i], vc[i]);
      const V g0 = V::loadu(gr[i] + j);
      dwv = at::vec::fmadd(g0, xh, dwv);
      dbv = dbv + g0;
      (vr[i] * at::vec::fnmadd(xh, vmgx[i], g0 * wv - vmg[i])).store(dxr[i] + j);
    }
    dwv.store(dwl + j);
    dbv.store(dbl + j);
  }
  for (; j < D; ++j) {
    for (int i = 0; i < NR; ++i) {
      const float xh = (xr[i][j] - c[i].m0) * c[i].rs0 - c[i].c0, g0 = gr[i][j];
      dwl[j] += g0 * xh;
      dbl[j] += g0;
      dxr[i][j] = c[i].rs0 * (g0 * w[j] - c[i].mg - xh * c[i].mgx);
    }
  }
}

// dx = r·(g − mean(g) − x̂·mean(g·x̂)), g = γ·dy (RMS: no mean(g)); dγ = Σ dy·x̂, dβ = Σ dy
template <typename scalar_t, typename w_t>
void rows_backward_kernel(const scalar_t* dy, const scalar_t* x, const double* mean, const double* var,
                          const w_t* w, double eps, bool center, int64_t R, int64_t D, int64_t groups,
                          int64_t seg, scalar_t* dx, w_t* dw, w_t* db) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t K = D / seg, P = groups * K;
  // γ, β per column (seg = 1): row r uses the slice (r % groups)·D of them, and its partial dγ, dβ
  const bool elem = seg == 1;
  const int64_t nblk = blocks(R), per = (R + nblk - 1) / nblk;
  std::vector<double> dwp(nblk * P, 0.0), dbp(nblk * P, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<opmath_t> dwl(elem ? P : 0), dbl(elem ? P : 0);
    for (int64_t blk = blo; blk < bhi; ++blk) {
      std::fill(dwl.begin(), dwl.end(), opmath_t(0));
      std::fill(dbl.begin(), dbl.end(), opmath_t(0));
      double* dwb = dwp.data() + blk * P;
      double* dbb = dbp.data() + blk * P;
      const int64_t r_lo = blk * per, r_hi = std::min(R, (blk + 1) * per);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (elem) {  // rows by four where they share γ: the partial dγ, dβ pass through the cache once
          const int64_t step = groups == 1 ? 4 : 1;
          for (int64_t r = r_lo; r < r_hi; r += step) {
            const int nr = static_cast<int>(std::min<int64_t>(step, r_hi - r));
            const int64_t p0 = (r % groups) * D;
            const float* wr = w + p0;
            RowGrad c[4];
            const float* xs[4];
            const float* gs[4];
            float* dxs[4];
            for (int i = 0; i < nr; ++i) {
              xs[i] = x + (r + i) * D, gs[i] = dy + (r + i) * D, dxs[i] = dx + (r + i) * D;
              const auto sv = saved<float, float>(mean[r + i], var[r + i], eps);
              auto [sg, sgx] = grad_sums(xs[i], gs[i], wr, D, sv.m0, sv.rs0, sv.c0);
              c[i] = {sv.m0, sv.rs0, sv.c0, center ? static_cast<float>(sg / D) : 0.f, static_cast<float>(sgx / D)};
            }
            switch (nr) {
              case 4: rows_dx_float<4>(xs, gs, dxs, wr, D, c, dwl.data() + p0, dbl.data() + p0); break;
              case 3: rows_dx_float<3>(xs, gs, dxs, wr, D, c, dwl.data() + p0, dbl.data() + p0); break;
              case 2: rows_dx_float<2>(xs, gs, dxs, wr, D, c, dwl.data() + p0, dbl.data() + p0); break;
              default: rows_dx_float<1>(xs, gs, dxs, wr, D, c, dwl.data() + p0, dbl.data() + p0);
            }
          }
          for (int64_t j = 0; j < P; ++j) {
            dwb[j] = static_cast<double>(dwl[j]);
            dbb[j] = static_cast<double>(dbl[j]);
          }
          continue;
        }
      }
      for (int64_t r = r_lo; r < r_hi; ++r) {
        const scalar_t* xr = x + r * D;
        const scalar_t* gr = dy + r * D;
        scalar_t* dxr = dx + r * D;
        const auto sv = saved<scalar_t, opmath_t>(mean[r], var[r], eps);
        const opmath_t m0 = sv.m0, rs0 = sv.rs0, c0 = sv.c0;
        double sg = 0.0, sgx = 0.0;
        const int64_t p0 = (r % groups) * K;
        if (elem) {
          std::tie(sg, sgx) = grad_sums(xr, gr, w + p0, D, m0, rs0, c0);
        } else {
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* xs = xr + k * seg;
            const scalar_t* gs = gr + k * seg;
            auto [sd, sdx] = grad_sums<scalar_t, opmath_t, float>(xs, gs, nullptr, seg, m0, rs0, c0);
            dwb[p0 + k] += sdx;
            dbb[p0 + k] += sd;
            const double wk = static_cast<double>(w[p0 + k]);
            sg += wk * sd;
            sgx += wk * sdx;
          }
        }
        const opmath_t mg = center ? static_cast<opmath_t>(sg / D) : opmath_t(0);
        const opmath_t mgx = static_cast<opmath_t>(sgx / D);
        if (elem) {  // dx, and the block's partial dγ, dβ in the same pass
          opmath_t* dwlp = dwl.data() + p0;
          opmath_t* dblp = dbl.data() + p0;
          const w_t* wr = w + p0;
          int64_t j0 = 0;
          if constexpr (kReduced<scalar_t>) {  // the loop below in float lanes, the same operations
            using V = at::vec::Vectorized<float>;
            const V vm(m0), vr(rs0), vc(c0), vmg(mg), vmgx(mgx);
            j0 = vec_map(D, dxr, [&](const Lanes& ld) {  // each vector's partials added once, in order
              V xh = (ld(xr) - vm) * vr - vc;
              V g0 = ld(gr);
              ld.put(dwlp, ld(dwlp) + g0 * xh);
              ld.put(dblp, ld(dblp) + g0);
              return vr * (g0 * ld(wr) - vmg - xh * vmgx);
            });
          }
#pragma omp simd
          for (int64_t j = j0; j < D; ++j) {
            opmath_t xh = (static_cast<opmath_t>(xr[j]) - m0) * rs0 - c0;
            opmath_t g0 = static_cast<opmath_t>(gr[j]);
            dwlp[j] += g0 * xh;
            dblp[j] += g0;
            dxr[j] = static_cast<scalar_t>(rs0 * (g0 * static_cast<opmath_t>(wr[j]) - mg - xh * mgx));
          }
        } else {
          for (int64_t k = 0; k < K; ++k) {
            const opmath_t wk = static_cast<opmath_t>(w[p0 + k]);
            const scalar_t* xs = xr + k * seg;
            const scalar_t* gs = gr + k * seg;
            scalar_t* dxs = dxr + k * seg;
            const int64_t j0 = vec_map(seg, dxs, [&](const Lanes& ld) {
              VF xh = (ld(xs) - VF(m0)) * VF(rs0) - VF(c0);
              return VF(rs0) * (ld(gs) * VF(wk) - VF(mg) - xh * VF(mgx));
            });
#pragma omp simd
            for (int64_t j = j0; j < seg; ++j) {
              opmath_t xh = (static_cast<opmath_t>(xs[j]) - m0) * rs0 - c0;
              dxs[j] = static_cast<scalar_t>(rs0 * (static_cast<opmath_t>(gs[j]) * wk - mg - xh * mgx));
            }
          }
        }
      }
      if (elem) {
        for (int64_t j = 0; j < P; ++j) {
          dwb[j] = static_cast<double>(dwl[j]);
          dbb[j] = static_cast<double>(dbl[j]);
        }
      }
    }
  });
  sum_blocks(dwp, dbp, nblk, P, dw, db);
}

// -------------------------------------------------------------------------------- channels

// BN training on (N, C, S), S > 1: statistics per channel over (N, S)
template <typename scalar_t, typename coef_t>
void channels_affine_kernel(const scalar_t* x, const coef_t* m, const coef_t* a, const coef_t* h, int64_t N,
                            int64_t C, int64_t S, scalar_t* y);

// channel c of x (N, C, S): its statistics from the sums shifted by its first value
template <typename scalar_t>
inline Stats channel_stats(const scalar_t* x, int64_t c, int64_t N, int64_t C, int64_t S, double eps) {
  const double shift = shift_of(static_cast<double>(x[c * S]));
  auto [s, ss] = shifted_sums(x + c * S, S, shift, N, C * S);
  return finish(static_cast<double>(N * S), shift, s, ss, true, eps);
}

template <typename scalar_t, typename w_t>
void channels_forward_kernel(const scalar_t* x, const w_t* w, const w_t* b, double eps, int64_t N,
                             int64_t C, int64_t S, scalar_t* y, double* mean, double* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  // runs shorter than two vectors (small maps): the statistics first, then the map by the eval
  // kernel, which runs whole vectors across channels there
  const bool short_runs = S < 2 * VF::size() && S != VF::size();
  std::vector<opmath_t> m0s(short_runs ? C : 0), s0s(m0s.size()), h0s(m0s.size());
  at::parallel_for(0, C, grain(N * S), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Stats st = channel_stats(x, c, N, C, S, eps);
      mean[c] = st.mean;
      var[c] = st.var;
      const opmath_t m0 = static_cast<opmath_t>(static_cast<scalar_t>(st.mean));
      const double scale = st.rstd * static_cast<double>(w[c]);
      const opmath_t s0 = static_cast<opmath_t>(scale);
      const opmath_t h0 = static_cast<opmath_t>(static_cast<double>(b[c]) - (st.mean - static_cast<double>(m0)) * scale);
      if (short_runs) {
        m0s[c] = m0, s0s[c] = s0, h0s[c] = h0;
        continue;
      }
      for (int64_t i = 0; i < N; ++i) {
        const scalar_t* xs = x + (i * C + c) * S;
        scalar_t* ys = y + (i * C + c) * S;
        const int64_t k0 = vec_map(S, ys, [&](const Lanes& ld) { return (ld(xs) - VF(m0)) * VF(s0) + VF(h0); });
#pragma omp simd
        for (int64_t k = k0; k < S; ++k) ys[k] = static_cast<scalar_t>((static_cast<opmath_t>(xs[k]) - m0) * s0 + h0);
      }
    }
  });
  if (short_runs) channels_affine_kernel(x, m0s.data(), s0s.data(), h0s.data(), N, C, S, y);
}

// y = (x − m[c])·a[c] + h[c] on (M, C), parallel over blocks of rows
template <typename scalar_t, typename coef_t>
void columns_affine(const scalar_t* x, const coef_t* m, const coef_t* a, const coef_t* h, int64_t M, int64_t C,
                    scalar_t* y) {
  at::parallel_for(0, M, grain(C), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const scalar_t* xi = x + i * C;
      scalar_t* yi = y + i * C;
      const int64_t c0 = vec_map(C, yi, [&](const Lanes& ld) {
        return (ld(xi) - ld(m)) * ld(a) + ld(h);
      });
#pragma omp simd
      for (int64_t c = c0; c < C; ++c) yi[c] = static_cast<scalar_t>((static_cast<coef_t>(xi[c]) - m[c]) * a[c] + h[c]);
    }
  });
}

// one block of rows [lo, hi) of x (M, C), per column: its mean and M2 = Σ(x − mean)², two passes
// over the block in cache. Float and fp16/bf16: NV float vectors of
// columns at once, summed down the rows in registers (≤ 256 rows: the float error stays ~1e-6),
// the mean then corrected by Σd/n in float64; columns whose float sums are not finite (an inf or
// a square past ~1e19) and the tail of fewer than a vector: again in float64
template <int NV, typename scalar_t>
inline void column_lanes(const scalar_t* x, int64_t lo, int64_t hi, int64_t C, int64_t c0, double* mean,
                         double* m2) {
  constexpr int64_t L = VF::size();
  const float inv = 1.0f / static_cast<float>(hi - lo);
  VF s[NV], q[NV], d1[NV];
  for (int v = 0; v < NV; ++v) s[v] = q[v] = d1[v] = VF(0.f);
  for (int64_t i = lo; i < hi; ++i)
    for (int v = 0; v < NV; ++v) s[v] = s[v] + load_f(x + i * C + c0 + v * L);
  for (int v = 0; v < NV; ++v) s[v] = s[v] * VF(inv);
  for (int64_t i = lo; i < hi; ++i)
    for (int v = 0; v < NV; ++v) {
      const VF d = load_f(x + i * C + c0 + v * L) - s[v];
      d1[v] = d1[v] + d;
      q[v] = q[v] + d * d;
    }
  const double n = static_cast<double>(hi - lo);
  for (int v = 0; v < NV; ++v) {
    float ts[L], tq[L], td[L];
    s[v].store(ts);
    q[v].store(tq);
    d1[v].store(td);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t c = c0 + v * L + l;
      mean[c] = static_cast<double>(ts[l]) + static_cast<double>(td[l]) / n;
      m2[c] = static_cast<double>(tq[l]) - static_cast<double>(td[l]) * static_cast<double>(td[l]) / n;
    }
  }
}

template <typename scalar_t>
void column_block_stats(const scalar_t* x, int64_t lo, int64_t hi, int64_t C, double* mean, double* m2) {
  const double cnt = static_cast<double>(hi - lo);
  int64_t c0 = 0;
  if constexpr (kFloatLanes<scalar_t>) {
    constexpr int64_t L = VF::size();
    for (; c0 + 4 * L <= C; c0 += 4 * L) column_lanes<4>(x, lo, hi, C, c0, mean, m2);
    for (; c0 + L <= C; c0 += L) column_lanes<1>(x, lo, hi, C, c0, mean, m2);
  }
  // float64: the tail, and any column the float lanes could not sum
  auto exact = [&](int64_t c) {
    double a = 0.0;
    for (int64_t i = lo; i < hi; ++i) a += static_cast<double>(x[i * C + c]);
    a /= cnt;
    double q = 0.0, d1 = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
      const double d = static_cast<double>(x[i * C + c]) - a;
      q += d * d;
      d1 += d;
    }
    mean[c] = a;
    m2[c] = q - d1 * d1 / cnt;
  };
  for (int64_t c = 0; c < c0; ++c)
    if (!std::isfinite(mean[c]) || !std::isfinite(m2[c])) exact(c);
  for (int64_t c = c0; c < C; ++c) exact(c);
}

// (n, m, q) += a block of nb values with mean mb and M2 qb (Chan et al.); plain += nb·mb, the
// mean's fallback where the data hold an inf
inline void chan_merge(double& n, double& m, double& q, double& plain, double nb, double mb, double qb) {
  if (nb <= 0) return;
  const double d = mb - m, tot = n + nb;
  m += d * nb / tot;
  q += (qb > 0.0 ? qb : 0.0) + d * d * n * nb / tot;
  n = tot;
  plain += mb * nb;
}

// mean and biased variance per column of x (M, C): per block of rows a two-pass mean and M2 per
// column (the block is in cache), merged across blocks with Chan's formula
template <typename scalar_t>
void columns_stats(const scalar_t* x, int64_t M, int64_t C, double* mean, double* var) {
  const int64_t nblk = blocks(M), per = (M + nblk - 1) / nblk;
  std::vector<double> pn(nblk, 0.0), pmean(nblk * C, 0.0), pm2(nblk * C, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<double> bm(C), m2(C);
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t lo = blk * per, hi = std::min(M, (blk + 1) * per), cnt = hi - lo;
      pn[blk] = static_cast<double>(std::max<int64_t>(cnt, 0));
      if (cnt <= 0) continue;
      column_block_stats(x, lo, hi, C, bm.data(), m2.data());
      for (int64_t c = 0; c < C; ++c) {
        pmean[blk * C + c] = bm[c];
        pm2[blk * C + c] = m2[c];
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0.0, m = 0.0, q = 0.0, plain = 0.0;
    for (int64_t blk = 0; blk < nblk; ++blk) chan_merge(n, m, q, plain, pn[blk], pmean[blk * C + c], pm2[blk * C + c]);
    if (!std::isfinite(m)) m = plain / n;  // an inf in the data: the mean is that inf, as in torch
    mean[c] = m;
    var[c] = variance(m, q / n);
  }
}

// BN training on (M, C): the statistics (columns_stats), then the affine map
template <typename scalar_t, typename w_t>
void columns_forward_kernel(const scalar_t* x, const w_t* w, const w_t* b, double eps, int64_t M,
                            int64_t C, scalar_t* y, double* mean, double* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  columns_stats(x, M, C, mean, var);
  std::vector<opmath_t> m0(C), s0(C), h0(C);
  for (int64_t c = 0; c < C; ++c) {
    const double m = mean[c];
    m0[c] = static_cast<opmath_t>(static_cast<scalar_t>(m));
    const double scale = static_cast<double>(w[c]) / std::sqrt(var[c] + eps);
    s0[c] = static_cast<opmath_t>(scale);
    h0[c] = static_cast<opmath_t>(static_cast<double>(b[c]) - (m - static_cast<double>(m0[c])) * scale);
  }
  columns_affine(x, m0.data(), s0.data(), h0.data(), M, C, y);
}

// dx = a·(dy − mg − x̂·mgx), x̂ = (x − m₀)·r₀ − c₀, on (M, C) with every coefficient per column
// (BatchNorm's backward on the (M, C) layout, and on short runs with each channel's coefficients
// repeated over its run), parallel over blocks of rows
template <typename scalar_t, typename opmath_t>
void columns_dx(const scalar_t* x, const scalar_t* dy, const opmath_t* m0, const opmath_t* rs0, const opmath_t* c0,
                const opmath_t* a, const opmath_t* mg, const opmath_t* mgx, int64_t M, int64_t C, scalar_t* dx) {
  at::parallel_for(0, M, grain(C), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const scalar_t* xi = x + i * C;
      const scalar_t* gi = dy + i * C;
      scalar_t* dxi = dx + i * C;
      const int64_t cv = vec_map(C, dxi, [&](const Lanes& ld) {
        VF xh = (ld(xi) - ld(m0)) * ld(rs0) - ld(c0);
        return ld(a) * (ld(gi) - ld(mg) - xh * ld(mgx));
      });
#pragma omp simd
      for (int64_t c = cv; c < C; ++c) {
        opmath_t xh = (static_cast<opmath_t>(xi[c]) - m0[c]) * rs0[c] - c0[c];
        dxi[c] = static_cast<scalar_t>(a[c] * (static_cast<opmath_t>(gi[c]) - mg[c] - xh * mgx[c]));
      }
    }
  });
}

template <typename scalar_t, typename w_t>
void channels_backward_kernel(const scalar_t* dy, const scalar_t* x, const double* mean, const double* var,
                              const w_t* w, double eps, int64_t N, int64_t C, int64_t S, scalar_t* dx,
                              w_t* dw, w_t* db) {
  using opmath_t = at::opmath_type<scalar_t>;
  const double n = static_cast<double>(N * S);
  // runs shorter than two vectors (small maps): the sums first, then dx with every channel's
  // coefficients repeated S times, so that whole vectors run across channels (the same operations)
  const bool short_runs = S < 2 * VF::size() && S != VF::size();
  std::vector<opmath_t> coef(short_runs ? 6 * C * S : 0);
  at::parallel_for(0, C, grain(N * S), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const auto sv = saved<scalar_t, opmath_t>(mean[c], var[c], eps);
      const opmath_t m0 = sv.m0, rs0 = sv.rs0, c0 = sv.c0;
      auto [sd, sdx] = grad_sums<scalar_t, opmath_t, float>(x + c * S, dy + c * S, nullptr, S, m0, rs0, c0, N, C * S);
      dw[c] = static_cast<w_t>(sdx);
      db[c] = static_cast<w_t>(sd);
      const opmath_t a = static_cast<opmath_t>(static_cast<double>(w[c]) * sv.rs);
      const opmath_t mg = static_cast<opmath_t>(sd / n), mgx = static_cast<opmath_t>(sdx / n);
      if (short_runs) {
        const opmath_t vals[6] = {m0, rs0, c0, a, mg, mgx};
        for (int q = 0; q < 6; ++q) std::fill_n(coef.data() + q * C * S + c * S, S, vals[q]);
        continue;
      }
      for (int64_t i = 0; i < N; ++i) {
        const scalar_t* xs = x + (i * C + c) * S;
        const scalar_t* gs = dy + (i * C + c) * S;
        scalar_t* dxs = dx + (i * C + c) * S;
        const int64_t k0 = vec_map(S, dxs, [&](const Lanes& ld) {
          VF xh = (ld(xs) - VF(m0)) * VF(rs0) - VF(c0);
          return VF(a) * (ld(gs) - VF(mg) - xh * VF(mgx));
        });
#pragma omp simd
        for (int64_t k = k0; k < S; ++k) {
          opmath_t xh = (static_cast<opmath_t>(xs[k]) - m0) * rs0 - c0;
          dxs[k] = static_cast<scalar_t>(a * (static_cast<opmath_t>(gs[k]) - mg - xh * mgx));
        }
      }
    }
  });
  if (!short_runs) return;
  const int64_t D = C * S;
  const opmath_t* q = coef.data();
  columns_dx(x, dy, q, q + D, q + 2 * D, q + 3 * D, q + 4 * D, q + 5 * D, N, D, dx);
}

template <typename scalar_t, typename w_t>
void columns_backward_kernel(const scalar_t* dy, const scalar_t* x, const double* mean, const double* var,
                             const w_t* w, double eps, int64_t M, int64_t C, scalar_t* dx, w_t* dw,
                             w_t* db) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<opmath_t> m0(C), rs0(C), c0(C), a(C), mg(C), mgx(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto sv = saved<scalar_t, opmath_t>(mean[c], var[c], eps);
    m0[c] = sv.m0;
    rs0[c] = sv.rs0;
    c0[c] = sv.c0;
    a[c] = static_cast<opmath_t>(static_cast<double>(w[c]) * sv.rs);
  }
  const int64_t nblk = blocks(M), per = (M + nblk - 1) / nblk;
  std::vector<double> pd(nblk * C, 0.0), pdx(nblk * C, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<opmath_t> lb(C), lbx(C);  // a block's partial sums in x's precision (≤ 256 rows)
    std::vector<opmath_t> wx(kReduced<scalar_t> ? C : 0), wg(wx.size());
    for (int64_t blk = blo; blk < bhi; ++blk) {
      std::fill(lb.begin(), lb.end(), opmath_t(0));
      std::fill(lbx.begin(), lbx.end(), opmath_t(0));
      opmath_t* pb = lb.data();
      opmath_t* pbx = lbx.data();
      for (int64_t i = blk * per; i < std::min(M, (blk + 1) * per); ++i) {
        const opmath_t* xi = widened(x + i * C, C, wx.data());
        const opmath_t* gi = widened(dy + i * C, C, wg.data());
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          opmath_t xh = (xi[c] - m0[c]) * rs0[c] - c0[c];
          pb[c] += gi[c];
          pbx[c] += gi[c] * xh;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        pd[blk * C + c] = static_cast<double>(lb[c]);
        pdx[blk * C + c] = static_cast<double>(lbx[c]);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double sd = 0.0, sdx = 0.0;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      sd += pd[blk * C + c];
      sdx += pdx[blk * C + c];
    }
    db[c] = static_cast<w_t>(sd);
    dw[c] = static_cast<w_t>(sdx);
    mg[c] = static_cast<opmath_t>(sd / M);
    mgx[c] = static_cast<opmath_t>(sdx / M);
  }
  columns_dx(x, dy, m0.data(), rs0.data(), c0.data(), a.data(), mg.data(), mgx.data(), M, C, dx);
}

// BN eval: y = (x − m[c])·a[c] + h[c] on (N, C, S) (S == 1: the (M, C) layout)
template <typename scalar_t, typename coef_t>
void channels_affine_kernel(const scalar_t* x, const coef_t* m, const coef_t* a, const coef_t* h, int64_t N,
                            int64_t C, int64_t S, scalar_t* y) {
  if (S == 1) return columns_affine(x, m, a, h, N, C, y);
  if (S < 2 * VF::size() && S != VF::size()) {  // runs shorter than two vectors (a 2×2 to 5×5 map): each
    // sample's C·S values as columns, the channels' coefficients repeated S times, so that whole
    // vectors run across channels
    std::vector<coef_t> me(C * S), ae(C * S), he(C * S);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < S; ++k) me[c * S + k] = m[c], ae[c * S + k] = a[c], he[c * S + k] = h[c];
    return columns_affine(x, me.data(), ae.data(), he.data(), N, C * S, y);
  }
  if constexpr (kReduced<scalar_t>) {
    if (S == VF::size()) {  // runs of one vector each (a 4×4 map with 16 lanes): two adjacent runs per store
      const int64_t R = N * C;
      at::parallel_for(0, (R + 1) / 2, grain(2 * S), [&](int64_t lo, int64_t hi) {
        int64_t c = (2 * lo) % C;  // the channel of run 2p, carried along (a division per run costs as much as the run)
        auto next = [&] { c = c + 1 == C ? 0 : c + 1; };
        for (int64_t p = lo; p < hi; ++p) {
          const VF v0 = (load_f(x + 2 * p * S) - VF(m[c])) * VF(a[c]) + VF(h[c]);
          next();
          if (2 * p + 1 < R) {
            store_f2(y + 2 * p * S, v0, (load_f(x + (2 * p + 1) * S) - VF(m[c])) * VF(a[c]) + VF(h[c]));
            next();
          } else {
            store_f1(y + 2 * p * S, v0);
          }
        }
      });
      return;
    }
  }
  at::parallel_for(0, N * C, grain(S), [&](int64_t lo, int64_t hi) {
    int64_t c = lo % C;  // carried along: a division per run costs as much as a short run
    for (int64_t ic = lo; ic < hi; ++ic, c = c + 1 == C ? 0 : c + 1) {
      const coef_t m0 = m[c], a0 = a[c], h0 = h[c];
      const scalar_t* xs = x + ic * S;
      scalar_t* ys = y + ic * S;
      const int64_t k0 = vec_map(S, ys, [&](const Lanes& ld) { return (ld(xs) - VF(m0)) * VF(a0) + VF(h0); });
#pragma omp simd
      for (int64_t k = k0; k < S; ++k) ys[k] = static_cast<scalar_t>((static_cast<coef_t>(xs[k]) - m0) * a0 + h0);
    }
  });
}

// BatchNorm eval backward on (N, C, S): dx = a·dy, a = γ·r per channel; the sums Σdy and
// Σdy·(x − m₀) per channel (m₀ = μ in x's precision; the caller folds μ − m₀ back in float64).
// S > 1: each channel's runs of S values in float lanes (chunks → float64); S = 1: per-block
// partials (≤ 256 rows each, in x's precision) summed in float64
template <typename scalar_t>
void channels_eval_backward_kernel(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* m,
                                   const at::opmath_type<scalar_t>* a, int64_t N, int64_t C, int64_t S,
                                   scalar_t* dx, double* sx, double* sg) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (S > 1) {
    at::parallel_for(0, C, grain(N * S), [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const opmath_t m0 = m[c], a0 = a[c];
        const int64_t stride = C * S;
        const scalar_t* xc = x + c * S;
        const scalar_t* gc = dy + c * S;
        scalar_t* dxc = dx + c * S;
        double sb = 0.0, sa = 0.0;
        int64_t k0 = 0;
        if constexpr (kFloatLanes<scalar_t>) {
          const VF vm(m0), va(a0);
          k0 = vec_pair_sums(N, S, stride, sb, sa, [&](int64_t base, int64_t j, VF& p, VF& q) {
            const VF g = load_f(gc + base + j);
            p = p + g;
            q = at::vec::fmadd(g, load_f(xc + base + j) - vm, q);
            if constexpr (std::is_same_v<scalar_t, float>) (g * va).store(dxc + base + j);
          });
          if constexpr (kReduced<scalar_t>) {  // dx stored in pairs of vectors, over what the sums covered
            for (int64_t i = 0; i < N; ++i) {
              const scalar_t* gs = gc + i * stride;
              scalar_t* dxs = dxc + i * stride;
              const int64_t k2 = vec_map(k0, dxs, [&](const Lanes& ld) { return ld(gs) * va; });
              for (int64_t j = k2; j < k0; ++j) dxs[j] = static_cast<scalar_t>(static_cast<opmath_t>(gs[j]) * a0);
            }
          }
        }
        for (int64_t i = 0; i < N; ++i)
          for (int64_t k = k0; k < S; ++k) {
            const int64_t o = i * stride + k;
            const opmath_t g = static_cast<opmath_t>(gc[o]);
            sb += g;
            sa += static_cast<double>(g) * (static_cast<double>(xc[o]) - static_cast<double>(m0));
            dxc[o] = static_cast<scalar_t>(g * a0);
          }
        sx[c] = sa;
        sg[c] = sb;
      }
    });
    return;
  }
  const int64_t M = N, nblk = blocks(M), per = (M + nblk - 1) / nblk;
  std::vector<double> pa(nblk * C, 0.0), pb(nblk * C, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<opmath_t> la(C), lb(C);
    for (int64_t blk = blo; blk < bhi; ++blk) {
      std::fill(la.begin(), la.end(), opmath_t(0));
      std::fill(lb.begin(), lb.end(), opmath_t(0));
      opmath_t* lap = la.data();
      opmath_t* lbp = lb.data();
      for (int64_t i = blk * per; i < std::min(M, (blk + 1) * per); ++i) {
        const scalar_t* xi = x + i * C;
        const scalar_t* gi = dy + i * C;
        scalar_t* dxi = dx + i * C;
        int64_t c0 = 0;
        if constexpr (kReduced<scalar_t>) {  // the loop below in float lanes, the same operations
          c0 = vec_map(C, dxi, [&](const Lanes& ld) {  // each vector's partials added once, in order
            const VF g = ld(gi);
            ld.put(lap, ld(lap) + g * (ld(xi) - ld(m)));
            ld.put(lbp, ld(lbp) + g);
            return g * ld(a);
          });
        }
#pragma omp simd
        for (int64_t c = c0; c < C; ++c) {
          const opmath_t g = static_cast<opmath_t>(gi[c]);
          lap[c] += g * (static_cast<opmath_t>(xi[c]) - m[c]);
          lbp[c] += g;
          dxi[c] = static_cast<scalar_t>(g * a[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        pa[blk * C + c] = static_cast<double>(la[c]);
        pb[blk * C + c] = static_cast<double>(lb[c]);
      }
    }
  });
  sum_blocks(pa, pb, nblk, C, sx, sg);
}

// ---------------------------------------------------------------------------------- groups

// GN/IN on channels_last (N, S, C): per channel a mean and M2 per block of ≤ 256 positions,
// merged over the blocks and then per group of cg channels (Chan et al.); parallel over samples,
// channels innermost (contiguous)
template <typename scalar_t, typename w_t>
void groups_forward_kernel(const scalar_t* x, const w_t* w, const w_t* b, double eps, int64_t N,
                           int64_t S, int64_t C, int64_t G, scalar_t* y, double* mean, double* var) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t cg = C / G;
  at::parallel_for(0, N, grain(S * C), [&](int64_t lo, int64_t hi) {
    std::vector<double> bm(C), b2(C), cm(C), cq(C), cp(C);
    std::vector<opmath_t> m0(C), a0(C), h0(C);
    for (int64_t n = lo; n < hi; ++n) {
      const scalar_t* xn = x + n * S * C;
      scalar_t* yn = y + n * S * C;
      for (auto* v : {&cm, &cq, &cp}) std::fill(v->begin(), v->end(), 0.0);
      for (int64_t k0 = 0; k0 < S; k0 += kChunk) {
        const int64_t k1 = std::min(S, k0 + kChunk);
        column_block_stats(xn, k0, k1, C, bm.data(), b2.data());
        for (int64_t c = 0; c < C; ++c) {
          double n = static_cast<double>(k0);  // the positions merged so far, the same for every channel
          chan_merge(n, cm[c], cq[c], cp[c], static_cast<double>(k1 - k0), bm[c], b2[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c)
        if (!std::isfinite(cm[c])) cm[c] = cp[c] / S;  // an inf in the data: the mean is that inf, as in torch
      for (int64_t g = 0; g < G; ++g) {
        double m = 0.0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) m += cm[c];
        m /= cg;
        double q = 0.0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) q += cq[c] + S * (cm[c] - m) * (cm[c] - m);
        const double v = variance(m, q / static_cast<double>(S * cg));
        const double rs = 1.0 / std::sqrt(v + eps);
        mean[n * G + g] = m;
        var[n * G + g] = v;
        const opmath_t mm = static_cast<opmath_t>(static_cast<scalar_t>(m));
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          const double scale = rs * static_cast<double>(w[c]);
          m0[c] = mm;
          a0[c] = static_cast<opmath_t>(scale);
          h0[c] = static_cast<opmath_t>(static_cast<double>(b[c]) - (m - static_cast<double>(mm)) * scale);
        }
      }
      for (int64_t k = 0; k < S; ++k) {
        const scalar_t* xk = xn + k * C;
        scalar_t* yk = yn + k * C;
        const int64_t cv = vec_map(C, yk, [&](const Lanes& ld) {
          return (ld(xk) - ld(m0.data())) * ld(a0.data()) + ld(h0.data());
        });
#pragma omp simd
        for (int64_t c = cv; c < C; ++c) yk[c] = static_cast<scalar_t>((static_cast<opmath_t>(xk[c]) - m0[c]) * a0[c] + h0[c]);
      }
    }
  });
}

template <typename scalar_t, typename w_t>
void groups_backward_kernel(const scalar_t* dy, const scalar_t* x, const double* mean, const double* var,
                            const w_t* w, double eps, int64_t N, int64_t S, int64_t C, int64_t G,
                            scalar_t* dx, w_t* dw, w_t* db) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t cg = C / G;
  std::vector<double> dwp(N * C, 0.0), dbp(N * C, 0.0);
  at::parallel_for(0, N, grain(S * C), [&](int64_t lo, int64_t hi) {
    std::vector<opmath_t> m0(C), rs0(C), c0(C), b0(C), b1(C), wgt(C);
    std::vector<opmath_t> wx(kReduced<scalar_t> ? C : 0), wg(wx.size()), wd(wx.size());
    std::vector<double> mg(G), mgx(G);
    for (int64_t c = 0; c < C; ++c) wgt[c] = static_cast<opmath_t>(w[c]);
    for (int64_t n = lo; n < hi; ++n) {
      const scalar_t* xn = x + n * S * C;
      const scalar_t* gn = dy + n * S * C;
      scalar_t* dxn = dx + n * S * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / cg;
        const auto sv = saved<scalar_t, opmath_t>(mean[n * G + g], var[n * G + g], eps);
        m0[c] = sv.m0;
        rs0[c] = sv.rs0;
        c0[c] = sv.c0;
      }
      double* sd = dbp.data() + n * C;
      double* sdx = dwp.data() + n * C;
      for (int64_t k = 0; k < S; ++k) {
        const opmath_t* xk = widened(xn + k * C, C, wx.data());
        const opmath_t* gk = widened(gn + k * C, C, wg.data());
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          opmath_t xh = (xk[c] - m0[c]) * rs0[c] - c0[c];
          sd[c] += gk[c];
          sdx[c] += gk[c] * xh;
        }
      }
      std::fill(mg.begin(), mg.end(), 0.0);
      std::fill(mgx.begin(), mgx.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) {
        mg[c / cg] += static_cast<double>(w[c]) * sd[c];
        mgx[c / cg] += static_cast<double>(w[c]) * sdx[c];
      }
      const double m = static_cast<double>(S * cg);
      for (int64_t c = 0; c < C; ++c) {
        b0[c] = static_cast<opmath_t>(mg[c / cg] / m);
        b1[c] = static_cast<opmath_t>(mgx[c / cg] / m);
      }
      for (int64_t k = 0; k < S; ++k) {
        const opmath_t* xk = widened(xn + k * C, C, wx.data());
        const opmath_t* gk = widened(gn + k * C, C, wg.data());
        opmath_t* dxk = widened_out(dxn + k * C, wd.data());
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          opmath_t xh = (xk[c] - m0[c]) * rs0[c] - c0[c];
          dxk[c] = rs0[c] * (gk[c] * wgt[c] - b0[c] - xh * b1[c]);
        }
        narrowed(dxk, C, dxn + k * C);
      }
    }
  });
  sum_blocks(dwp, dbp, N, C, dw, db);
}

// ------------------------------------------------------------------------------- the ops

#define NORMLAB_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

void check_float(const Tensor& x, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "normlab.", op, ": expected a floating-point tensor, got ",
                   x.scalar_type(), "; convert it first, e.g. x.float()");
}

// the canonical view: `rank` dims (2: (R, D), 3: (N, C, S) or (N, S, C)) holding x's elements
void check_view(const Tensor& x, IntArrayRef shape, const char* op) {
  const bool rows = std::string(op).rfind("rows", 0) == 0;
  TORCH_CHECK_VALUE(shape.size() == (rows ? 2u : 3u), "normlab.", op, ": shape must have ", rows ? 2 : 3,
                    " dims, got ", shape);
  int64_t n = 1;
  for (auto s : shape) {
    TORCH_CHECK_VALUE(s >= 0, "normlab.", op, ": negative size in shape ", shape);
    n *= s;
  }
  TORCH_CHECK_VALUE(n == x.numel(), "normlab.", op, ": canonical shape ", shape, " does not match the ",
                    x.numel(), " elements of the input");
}

void check_grad(const Tensor& dy, const Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "normlab.", op, ": dy must have x's shape ", x.sizes(), ", got ",
                    dy.sizes());
}

void check_len(const Tensor& t, int64_t n, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.numel() == n, "normlab.", op, ": ", name, " must have ", n, " elements, got ", t.numel());
}

void check_rows(int64_t R, int64_t D, int64_t groups, int64_t seg, const char* op) {
  TORCH_CHECK_VALUE(groups > 0 && seg > 0 && R % groups == 0 && D % seg == 0, "normlab.", op,
                    ": groups must divide R and seg must divide D");
}

void check_groups(int64_t C, int64_t groups, const char* op) {
  TORCH_CHECK_VALUE(groups > 0 && C % groups == 0, "normlab.", op, ": groups must divide C");
}

std::tuple<Tensor, Tensor, Tensor> rows_forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias, double eps, bool center,
                                                int64_t groups, int64_t seg, IntArrayRef shape) {
  check_float(x, "rows_forward");
  check_view(x, shape, "rows_forward");
  const int64_t R = shape[0], D = shape[1];
  check_rows(R, D, groups, seg, "rows_forward");
  const int64_t P = groups * (D / seg);
  Tensor y = out_contiguous(x);
  Tensor mean = vec(x, R, at::kDouble), var = vec(x, R, at::kDouble);
  if (x.numel() == 0) return {y, mean, var};
  Tensor xv = canon(x, shape, {}), yv = y.view(shape);
  auto [w, b] = params(weight, bias, P, x);
  NORMLAB_DISPATCH(x, "rows_forward", [&] {
    with_param_type<scalar_t>(w, [&](auto tag) {
      using w_t = decltype(tag);
      rows_forward_kernel<scalar_t, w_t>(xv.const_data_ptr<scalar_t>(), w.const_data_ptr<w_t>(),
                                         b.const_data_ptr<w_t>(), eps, center, R, D, groups, seg,
                                         yv.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<double>(),
                                         var.mutable_data_ptr<double>());
    });
  });
  return {y, mean, var};
}

Tensor f64(const Tensor& t) { return t.to(at::kDouble).contiguous(); }

std::tuple<Tensor, Tensor, Tensor> rows_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                 const Tensor& var, const c10::optional<Tensor>& weight, double eps,
                                                 bool center, int64_t groups, int64_t seg, IntArrayRef shape) {
  check_float(x, "rows_backward");
  check_view(x, shape, "rows_backward");
  check_grad(dy, x, "rows_backward");
  const int64_t R = shape[0], D = shape[1];
  check_rows(R, D, groups, seg, "rows_backward");
  check_len(mean, R, "mean", "rows_backward");
  check_len(var, R, "var", "rows_backward");
  const int64_t P = groups * (D / seg);
  Tensor dx = out_contiguous(x);
  const auto pdt = param_dtype(weight, c10::nullopt, x);
  Tensor dw = vec(x, P, pdt), db = vec(x, P, pdt);
  if (x.numel() == 0) return {dx, dw.zero_(), db.zero_()};
  Tensor xv = canon(x, shape, {}), dyv = canon(dy.to(x.scalar_type()), shape, {}), dxv = dx.view(shape);
  Tensor w = params(weight, c10::nullopt, P, x).first, m = f64(mean), v = f64(var);
  NORMLAB_DISPATCH(x, "rows_backward", [&] {
    with_param_type<scalar_t>(w, [&](auto tag) {
      using w_t = decltype(tag);
      rows_backward_kernel<scalar_t, w_t>(dyv.const_data_ptr<scalar_t>(), xv.const_data_ptr<scalar_t>(),
                                          m.const_data_ptr<double>(), v.const_data_ptr<double>(),
                                          w.const_data_ptr<w_t>(), eps, center, R, D, groups, seg,
                                          dxv.mutable_data_ptr<scalar_t>(), dw.mutable_data_ptr<w_t>(),
                                          db.mutable_data_ptr<w_t>());
    });
  });
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> channels_forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias, double eps, IntArrayRef shape,
                                                    IntArrayRef permute) {
  check_float(x, "channels_forward");
  check_view(x, shape, "channels_forward");
  const int64_t N = shape[0], C = shape[1], S = shape[2];
  Tensor y = out_like(x);
  Tensor mean = vec(x, C, at::kDouble), var = vec(x, C, at::kDouble);
  if (x.numel() == 0) return {y, mean, var};
  Tensor xv = canon(x, shape, permute), yv = canon(y, shape, permute);
  auto [w, b] = params(weight, bias, C, x);
  NORMLAB_DISPATCH(x, "channels_forward", [&] {
    with_param_type<scalar_t>(w, [&](auto tag) {
      using w_t = decltype(tag);
      auto* px = xv.const_data_ptr<scalar_t>();
      auto* pw = w.const_data_ptr<w_t>();
      auto* pb = b.const_data_ptr<w_t>();
      auto* py = yv.mutable_data_ptr<scalar_t>();
      if (S > 1)
        channels_forward_kernel<scalar_t, w_t>(px, pw, pb, eps, N, C, S, py, mean.mutable_data_ptr<double>(),
                                               var.mutable_data_ptr<double>());
      else
        columns_forward_kernel<scalar_t, w_t>(px, pw, pb, eps, N, C, py, mean.mutable_data_ptr<double>(),
                                              var.mutable_data_ptr<double>());
    });
  });
  return {y, mean, var};
}

// BatchNorm's statistics alone: per channel of x (N, C, S) the mean and the biased variance in
// float64, as channels_forward computes them (SyncBatchNorm all-reduces them, BatchRenorm corrects)
std::tuple<Tensor, Tensor> channels_stats(const Tensor& x, IntArrayRef shape, IntArrayRef permute) {
  check_float(x, "channels_stats");
  check_view(x, shape, "channels_stats");
  const int64_t N = shape[0], C = shape[1], S = shape[2];
  Tensor mean = vec(x, C, at::kDouble), var = vec(x, C, at::kDouble);
  if (x.numel() == 0) return {mean.fill_(NAN), var.fill_(NAN)};
  Tensor xv = canon(x, shape, permute);
  NORMLAB_DISPATCH(x, "channels_stats", [&] {
    const scalar_t* px = xv.const_data_ptr<scalar_t>();
    double *pm = mean.mutable_data_ptr<double>(), *pv = var.mutable_data_ptr<double>();
    if (S > 1) {
      at::parallel_for(0, C, grain(N * S), [&](int64_t lo, int64_t hi) {
        for (int64_t c = lo; c < hi; ++c) {
          const Stats st = channel_stats(px, c, N, C, S, 0.0);
          pm[c] = st.mean, pv[c] = st.var;
        }
      });
    } else {
      columns_stats(px, N, C, pm, pv);
    }
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor, Tensor> channels_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                     const Tensor& var, const c10::optional<Tensor>& weight,
                                                     double eps, IntArrayRef shape, IntArrayRef permute) {
  check_float(x, "channels_backward");
  check_view(x, shape, "channels_backward");
  check_grad(dy, x, "channels_backward");
  const int64_t N = shape[0], C = shape[1], S = shape[2];
  check_len(mean, C, "mean", "channels_backward");
  check_len(var, C, "var", "channels_backward");
  Tensor dx = out_like(x);
  const auto pdt = param_dtype(weight, c10::nullopt, x);
  Tensor dw = vec(x, C, pdt), db = vec(x, C, pdt);
  if (x.numel() == 0) return {dx, dw.zero_(), db.zero_()};
  Tensor xv = canon(x, shape, permute), dyv = canon(dy.to(x.scalar_type()), shape, permute);
  Tensor dxv = canon(dx, shape, permute);
  Tensor w = params(weight, c10::nullopt, C, x).first, m = f64(mean), v = f64(var);
  NORMLAB_DISPATCH(x, "channels_backward", [&] {
    with_param_type<scalar_t>(w, [&](auto tag) {
      using w_t = decltype(tag);
      auto* pg = dyv.const_data_ptr<scalar_t>();
      auto* px = xv.const_data_ptr<scalar_t>();
      auto* pm = m.const_data_ptr<double>();
      auto* pv = v.const_data_ptr<double>();
      auto* pw = w.const_data_ptr<w_t>();
      if (S > 1)
        channels_backward_kernel<scalar_t, w_t>(pg, px, pm, pv, pw, eps, N, C, S, dxv.mutable_data_ptr<scalar_t>(),
                                                dw.mutable_data_ptr<w_t>(), db.mutable_data_ptr<w_t>());
      else
        columns_backward_kernel<scalar_t, w_t>(pg, px, pm, pv, pw, eps, N, C, dxv.mutable_data_ptr<scalar_t>(),
                                               dw.mutable_data_ptr<w_t>(), db.mutable_data_ptr<w_t>());
    });
  });
  return {dx, dw, db};
}

// per-channel statistics and parameters as float64 values (read in place when they are (C,)
// vectors on the CPU); `fill` where the tensor is not given
std::vector<double> values(const c10::optional<Tensor>& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!(t.has_value() && t->defined())) return v;
  const bool flat = t->dim() == 1 && t->is_contiguous() && t->device().is_cpu();
  Tensor u = flat ? *t : t->reshape({C}).contiguous().cpu();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "values", [&] {
    const scalar_t* p = u.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<double>(p[c]);
  });
  return v;
}

// BN eval straight from the running statistics: the per-channel map built in float64,
// y = (x − m₀)·a + h with a = γ/√(σ²+ε), h = β − (μ − m₀)·a (the mean's rounding in h)
Tensor channels_eval(const Tensor& x, const Tensor& mean, const Tensor& var, const c10::optional<Tensor>& weight,
                     const c10::optional<Tensor>& bias, double eps, IntArrayRef shape, IntArrayRef permute) {
  check_float(x, "channels_eval");
  check_view(x, shape, "channels_eval");
  const int64_t N = shape[0], C = shape[1], S = shape[2];
  check_len(mean, C, "mean", "channels_eval");
  check_len(var, C, "var", "channels_eval");
  for (const auto* t : {&weight, &bias})
    if (t->has_value() && (*t)->defined()) check_len(**t, C, "weight/bias", "channels_eval");
  Tensor y = out_like(x);
  if (x.numel() == 0) return y;
  Tensor xv = canon(x, shape, permute), yv = canon(y, shape, permute);
  const std::vector<double> pm = values(mean, C, 0.0), pv = values(var, C, 1.0), pw = values(weight, C, 1.0),
                            pb = values(bias, C, 0.0);
  NORMLAB_DISPATCH(x, "channels_eval", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<opmath_t> m0(C), a0(C), h0(C);
    for (int64_t c = 0; c < C; ++c) {
      const double a = pw[c] / std::sqrt(pv[c] + eps);
      const opmath_t m = static_cast<opmath_t>(static_cast<scalar_t>(pm[c]));
      m0[c] = m;
      a0[c] = static_cast<opmath_t>(a);
      h0[c] = static_cast<opmath_t>(pb[c] - (pm[c] - static_cast<double>(m)) * a);
    }
    channels_affine_kernel<scalar_t, opmath_t>(xv.const_data_ptr<scalar_t>(), m0.data(), a0.data(), h0.data(), N, C,
                                               S, yv.mutable_data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> channels_eval_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                          const Tensor& var, const c10::optional<Tensor>& weight,
                                                          double eps, IntArrayRef shape, IntArrayRef permute) {
  static constexpr const char* op = "channels_eval_backward";
  check_float(x, op);
  check_view(x, shape, op);
  check_grad(dy, x, op);
  const int64_t N = shape[0], C = shape[1], S = shape[2];
  check_len(mean, C, "mean", op);
  check_len(var, C, "var", op);
  if (weight.has_value() && weight->defined()) check_len(*weight, C, "weight", op);
  const auto acc = at::promote_types(x.scalar_type(), at::kFloat);
  Tensor dx = out_like(x);
  const std::vector<double> pm = values(mean, C, 0.0), pv = values(var, C, 1.0), pw = values(weight, C, 1.0);
  std::vector<double> r(C), sx(C, 0.0), sg(C, 0.0);
  for (int64_t c = 0; c < C; ++c) r[c] = 1.0 / std::sqrt(pv[c] + eps);
  std::vector<double> m0d(C);
  if (x.numel() > 0) {
    Tensor xv = canon(x, shape, permute), dyv = canon(dy.to(x.scalar_type()), shape, permute);
    Tensor dxv = canon(dx, shape, permute);
    NORMLAB_DISPATCH(x, op, [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      std::vector<opmath_t> m0(C), a0(C);
      for (int64_t c = 0; c < C; ++c) {
        m0[c] = static_cast<opmath_t>(static_cast<scalar_t>(pm[c]));
        m0d[c] = static_cast<double>(m0[c]);
        a0[c] = static_cast<opmath_t>(pw[c] * r[c]);
      }
      channels_eval_backward_kernel<scalar_t>(dyv.const_data_ptr<scalar_t>(), xv.const_data_ptr<scalar_t>(),
                                              m0.data(), a0.data(), N, C, S, dxv.mutable_data_ptr<scalar_t>(),
                                              sx.data(), sg.data());
    });
  }
  // ∂l/∂γ = r·Σ dy·(x − μ) = r·(Σ dy·(x − m₀) − (μ − m₀)·Σ dy), ∂l/∂β = Σ dy; float32 or wider
  Tensor dw = vec(x, C, acc), db = vec(x, C, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    scalar_t* pdw = dw.mutable_data_ptr<scalar_t>();
    scalar_t* pdb = db.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double shift = x.numel() > 0 ? pm[c] - m0d[c] : 0.0;
      pdw[c] = static_cast<scalar_t>(r[c] * (sx[c] - shift * sg[c]));
      pdb[c] = static_cast<scalar_t>(sg[c]);
    }
  });
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> groups_forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                                  const c10::optional<Tensor>& bias, double eps, int64_t groups,
                                                  IntArrayRef shape, IntArrayRef permute) {
  check_float(x, "groups_forward");
  check_view(x, shape, "groups_forward");
  const int64_t N = shape[0], S = shape[1], C = shape[2];
  check_groups(C, groups, "groups_forward");
  Tensor y = out_like(x);
  Tensor mean = vec(x, N * groups, at::kDouble), var = vec(x, N * groups, at::kDouble);
  if (x.numel() == 0) return {y, mean, var};
  Tensor xv = canon(x, shape, permute), yv = canon(y, shape, permute);
  auto [w, b] = params(weight, bias, C, x);
  NORMLAB_DISPATCH(x, "groups_forward", [&] {
    with_param_type<scalar_t>(w, [&](auto tag) {
      using w_t = decltype(tag);
      groups_forward_kernel<scalar_t, w_t>(xv.const_data_ptr<scalar_t>(), w.const_data_ptr<w_t>(),
                                           b.const_data_ptr<w_t>(), eps, N, S, C, groups,
                                           yv.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<double>(),
                                           var.mutable_data_ptr<double>());
    });
  });
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> groups_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                                   const Tensor& var, const c10::optional<Tensor>& weight,
                                                   double eps, int64_t groups, IntArrayRef shape,
                                                   IntArrayRef permute) {
  check_float(x, "groups_backward");
  check_view(x, shape, "groups_backward");
  check_grad(dy, x, "groups_backward");
  const int64_t N = shape[0], S = shape[1], C = shape[2];
  check_groups(C, groups, "groups_backward");
  check_len(mean, N * groups, "mean", "groups_backward");
  check_len(var, N * groups, "var", "groups_backward");
  Tensor dx = out_like(x);
  const auto pdt = param_dtype(weight, c10::nullopt, x);
  Tensor dw = vec(x, C, pdt), db = vec(x, C, pdt);
  if (x.numel() == 0) return {dx, dw.zero_(), db.zero_()};
  Tensor xv = canon(x, shape, permute), dyv = canon(dy.to(x.scalar_type()), shape, permute);
  Tensor dxv = canon(dx, shape, permute);
  Tensor w = params(weight, c10::nullopt, C, x).first, m = f64(mean), v = f64(var);
  NORMLAB_DISPATCH(x, "groups_backward", [&] {
    with_param_type<scalar_t>(w, [&](auto tag) {
      using w_t = decltype(tag);
      groups_backward_kernel<scalar_t, w_t>(dyv.const_data_ptr<scalar_t>(), xv.const_data_ptr<scalar_t>(),
                                            m.const_data_ptr<double>(), v.const_data_ptr<double>(),
                                            w.const_data_ptr<w_t>(), eps, N, S, C, groups,
                                            dxv.mutable_data_ptr<scalar_t>(), dw.mutable_data_ptr<w_t>(),
                                            db.mutable_data_ptr<w_t>());
    });
  });
  return {dx, dw, db};
}


// ------------------------------------------------------------------- meta (shapes only)

std::tuple<Tensor, Tensor, Tensor> rows_forward_meta(const Tensor& x, const c10::optional<Tensor>&,
                                                     const c10::optional<Tensor>&, double, bool, int64_t, int64_t,
                                                     IntArrayRef shape) {
  auto opts = x.options().dtype(at::kDouble);
  return {at::empty(x.sizes(), x.options()), at::empty({shape[0]}, opts), at::empty({shape[0]}, opts)};
}

std::tuple<Tensor, Tensor, Tensor> rows_backward_meta(const Tensor&, const Tensor& x, const Tensor&, const Tensor&,
                                                      const c10::optional<Tensor>& w, double, bool, int64_t groups,
                                                      int64_t seg, IntArrayRef shape) {
  const int64_t P = groups * (shape[1] / seg);
  auto opts = x.options().dtype(param_dtype(w, c10::nullopt, x));
  return {at::empty(x.sizes(), x.options()), at::empty({P}, opts), at::empty({P}, opts)};
}

std::tuple<Tensor, Tensor, Tensor> channels_forward_meta(const Tensor& x, const c10::optional<Tensor>&,
                                                         const c10::optional<Tensor>&, double, IntArrayRef shape,
                                                         IntArrayRef) {
  auto opts = x.options().dtype(at::kDouble);
  return {at::empty_like(x), at::empty({shape[1]}, opts), at::empty({shape[1]}, opts)};
}

std::tuple<Tensor, Tensor, Tensor> channels_backward_meta(const Tensor&, const Tensor& x, const Tensor&,
                                                          const Tensor&, const c10::optional<Tensor>& w, double,
                                                          IntArrayRef shape, IntArrayRef) {
  auto opts = x.options().dtype(param_dtype(w, c10::nullopt, x));
  return {at::empty_like(x), at::empty({shape[1]}, opts), at::empty({shape[1]}, opts)};
}

std::tuple<Tensor, Tensor> channels_stats_meta(const Tensor& x, IntArrayRef shape, IntArrayRef) {
  auto opts = x.options().dtype(at::kDouble);
  return {at::empty({shape[1]}, opts), at::empty({shape[1]}, opts)};
}

Tensor channels_eval_meta(const Tensor& x, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                          const c10::optional<Tensor>&, double, IntArrayRef, IntArrayRef) {
  return at::empty_like(x);
}

std::tuple<Tensor, Tensor, Tensor> channels_eval_backward_meta(const Tensor&, const Tensor& x, const Tensor&,
                                                               const Tensor&, const c10::optional<Tensor>&, double,
                                                               IntArrayRef shape, IntArrayRef) {
  auto opts = x.options().dtype(at::promote_types(x.scalar_type(), at::kFloat));
  return {at::empty_like(x), at::empty({shape[1]}, opts), at::empty({shape[1]}, opts)};
}

std::tuple<Tensor, Tensor, Tensor> groups_forward_meta(const Tensor& x, const c10::optional<Tensor>&,
                                                       const c10::optional<Tensor>&, double, int64_t groups,
                                                       IntArrayRef shape, IntArrayRef) {
  auto opts = x.options().dtype(at::kDouble);
  return {at::empty_like(x), at::empty({shape[0] * groups}, opts), at::empty({shape[0] * groups}, opts)};
}

std::tuple<Tensor, Tensor, Tensor> groups_backward_meta(const Tensor&, const Tensor& x, const Tensor&, const Tensor&,
                                                        const c10::optional<Tensor>& w, double, int64_t,
                                                        IntArrayRef shape, IntArrayRef) {
  auto opts = x.options().dtype(param_dtype(w, c10::nullopt, x));
  return {at::empty_like(x), at::empty({shape[2]}, opts), at::empty({shape[2]}, opts)};
}

}  // namespace
}  // namespace normlab

TORCH_LIBRARY(normlab, m) {
  m.def("rows_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, bool center, int groups, int seg, "
        "int[] shape) -> (Tensor, Tensor, Tensor)");
  m.def("rows_backward(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, bool center, "
        "int groups, int seg, int[] shape) -> (Tensor, Tensor, Tensor)");
  m.def("channels_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, int[] shape, int[] permute) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("channels_backward(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, int[] shape, "
        "int[] permute) -> (Tensor, Tensor, Tensor)");
  m.def("channels_stats(Tensor x, int[] shape, int[] permute) -> (Tensor, Tensor)");
  m.def("channels_eval(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, int[] shape, "
        "int[] permute) -> Tensor");
  m.def("channels_eval_backward(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, "
        "int[] shape, int[] permute) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("groups_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, int groups, int[] shape, "
        "int[] permute) -> (Tensor, Tensor, Tensor)");
  m.def("groups_backward(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, int groups, "
        "int[] shape, int[] permute) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normlab, CPU, m) {
  m.impl("rows_forward", &normlab::rows_forward);
  m.impl("rows_backward", &normlab::rows_backward);
  m.impl("channels_forward", &normlab::channels_forward);
  m.impl("channels_backward", &normlab::channels_backward);
  m.impl("channels_stats", &normlab::channels_stats);
  m.impl("channels_eval", &normlab::channels_eval);
  m.impl("channels_eval_backward", &normlab::channels_eval_backward);
  m.impl("groups_forward", &normlab::groups_forward);
  m.impl("groups_backward", &normlab::groups_backward);
}

TORCH_LIBRARY_IMPL(normlab, Meta, m) {
  m.impl("rows_forward", &normlab::rows_forward_meta);
  m.impl("rows_backward", &normlab::rows_backward_meta);
  m.impl("channels_forward", &normlab::channels_forward_meta);
  m.impl("channels_backward", &normlab::channels_backward_meta);
  m.impl("channels_stats", &normlab::channels_stats_meta);
  m.impl("channels_eval", &normlab::channels_eval_meta);
  m.impl("channels_eval_backward", &normlab::channels_eval_backward_meta);
  m.impl("groups_forward", &normlab::groups_forward_meta);
  m.impl("groups_backward", &normlab::groups_backward_meta);
}
