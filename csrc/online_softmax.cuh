#pragma once
// Building blocks of one-pass (online) log-sum-exp over rows of logits, with the extra sum
// that gives the entropy of the same softmax.
//
// Exponents are taken in log2 units, e = (x - max) * log2(e) / temperature, so that every
// exponential is one exp2 instruction. A running state holds
//   max       the largest raw logit seen (kEmptyMax before anything finite was seen),
//   sum       sum of exp2(e),
//   weighted  sum of exp2(e) * e,
// so that lse = max / temperature + ln2 * log2(sum) and entropy = ln2 * (log2(sum) - weighted / sum).
// The max stays a raw logit, not a rounded product max * scale: at |x| ~ 1e4 that product
// is off by up to 5e-4, which would shift every probability by that much relative to the
// lse the backward pass uses. Keeping `weighted` relative to the running max avoids the
// cancellation of lse - sum(p * z) when logits are large.
#include <cfloat>
#include <cstdint>

namespace fastmath {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr double kLog2eDouble = 1.4426950408889634;
constexpr double kLn2Double = 0.6931471805599453;

// A finite "nothing seen yet" max: exponents relative to it are -inf or huge negative, never
// NaN (-inf - -inf would be), so rows or threads that saw only -inf logits stay harmless.
constexpr float kEmptyMax = -FLT_MAX;
// exp2 of anything below this is 0 in float; clamping there keeps 0 * -inf out of the
// entropy sums when logits are -inf.
constexpr float kMinLog2 = -256.0f;

// 2^x in one MUFU instruction (relative error ~2 ulp); subnormal results flush to 0, which
// only drops terms below 2^-126 of the row's largest one.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Elements from `ptr` to the next kAlignBytes boundary. `ptr` must be aligned to sizeof(T).
template <int kAlignBytes, typename T>
__device__ __forceinline__ int elements_to_alignment(const T* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  return static_cast<int>(((kAlignBytes - address % kAlignBytes) % kAlignBytes) / sizeof(T));
}

// kCount elements moved as one aligned load or store.
template <typename T, int kCount>
struct alignas(sizeof(T) * kCount) AlignedPack {
  T val[kCount];
};

struct LogSumExp2 {
  float max;
  float sum;
  float weighted;
};

__device__ __forceinline__ LogSumExp2 empty_log_sum_exp2() { return {kEmptyMax, 0.0f, 0.0f}; }

// Adds kCount raw values x (scale_log2 = log2(e) / temperature > 0). The max is taken over
// the whole batch first, so the running state is rescaled at most once per batch.
template <bool kEntropy, int kCount>
__device__ __forceinline__ void accumulate(LogSumExp2& state, const float (&x)[kCount],
                                           float scale_log2) {
  float batch_max = x[0];
#pragma unroll
  for (int k = 1; k < kCount; ++k) batch_max = fmaxf(batch_max, x[k]);
  if (batch_max > state.max) {
    // fmaxf: kEmptyMax - batch_max may overflow to -inf, and -inf * 0 would be NaN.
    const float shift = fmaxf((state.max - batch_max) * scale_log2, -FLT_MAX);
    const float shrink = fast_exp2(shift);
    if (kEntropy) state.weighted = shrink * fmaf(shift, state.sum, state.weighted);
    state.sum *= shrink;
    state.max = batch_max;
  }
#pragma unroll
  for (int k = 0; k < kCount; ++k) {
    // The same expression gives the target's log-prob later, so both agree to the last bit.
    const float exponent = (x[k] - state.max) * scale_log2;
    const float term = fast_exp2(exponent);
    state.sum += term;
    if (kEntropy) state.weighted = fmaf(term, fmaxf(exponent, kMinLog2), state.weighted);
  }
}

template <bool kEntropy>
__device__ __forceinline__ LogSumExp2 merge(const LogSumExp2& a, const LogSumExp2& b,
                                            float scale_log2) {
  const float new_max = fmaxf(a.max, b.max);
  // Clamped so that an empty side (kEmptyMax, sum 0) contributes 0, never NaN.
  const float shift_a = fmaxf((a.max - new_max) * scale_log2, -FLT_MAX);
  const float shift_b = fmaxf((b.max - new_max) * scale_log2, -FLT_MAX);
  const float scale_a = fast_exp2(shift_a);
  const float scale_b = fast_exp2(shift_b);
  LogSumExp2 merged;
  merged.max = new_max;
  merged.sum = a.sum * scale_a + b.sum * scale_b;
  merged.weighted = kEntropy ? scale_a * fmaf(shift_a, a.sum, a.weighted) +
                                   scale_b * fmaf(shift_b, b.sum, b.weighted)
                             : 0.0f;
  return merged;
}

// Every lane gets the warp's merged state. Needs all 32 lanes active.
template <bool kEntropy>
__device__ __forceinline__ LogSumExp2 warp_merge(LogSumExp2 state, float scale_log2) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    LogSumExp2 other;
    other.max = __shfl_xor_sync(0xffffffffu, state.max, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, state.sum, offset);
    other.weighted = kEntropy ? __shfl_xor_sync(0xffffffffu, state.weighted, offset) : 0.0f;
    state = merge<kEntropy>(state, other, scale_log2);
  }
  return state;
}

// The block's merged state, valid in thread 0 only. blockDim.x must be a multiple of 32 and
// at most 1024; call once per kernel (the shared scratch is not synchronised for reuse).
template <bool kEntropy>
__device__ __forceinline__ LogSumExp2 block_merge(LogSumExp2 state, float scale_log2) {
  __shared__ float shared_max[32];
  __shared__ float shared_sum[32];
  __shared__ float shared_weighted[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  state = warp_merge<kEntropy>(state, scale_log2);
  if (lane == 0) {
    shared_max[warp] = state.max;
    shared_sum[warp] = state.sum;
    shared_weighted[warp] = state.weighted;
  }
  __syncthreads();
  if (warp == 0) {
    state = empty_log_sum_exp2();
    if (lane < num_warps) {
      state.max = shared_max[lane];
      state.sum = shared_sum[lane];
      state.weighted = shared_weighted[lane];
    }
    state = warp_merge<kEntropy>(state, scale_log2);
  }
  return state;
}

}  // namespace fastmath
