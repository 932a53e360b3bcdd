// Log-probabilities (and entropy) of target tokens under softmax(logits / temperature), and
// their gradient w.r.t. the logits.
//
// Forward: one thread block per row reads the row once with 16-byte loads and keeps an
// online log-sum-exp per thread, merged across the block at the end. Backward: elementwise
// given the forward's per-row lse (and entropy), so it can overwrite the logits in place.
//
// Rows need not be 16-byte aligned: each row is split into a scalar head up to the first
// aligned address, an aligned vector body and a scalar tail of fewer than one vector. So any
// vocabulary size and any row stride take the vector path for all but a few elements.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <optional>
#include <tuple>

#include "online_softmax.cuh"

namespace {

using fastmath::AlignedPack;
using fastmath::elements_to_alignment;
using fastmath::fast_exp2;
using fastmath::LogSumExp2;

constexpr int kVectorBytes = 16;
constexpr int kForwardMaxThreads = 512;
// Elements each forward thread loads before reducing them: 16 keeps 32-64 bytes in flight
// per thread without spilling registers.
constexpr int kForwardElementsPerIteration = 16;
constexpr int kBackwardMaxThreads = 256;
constexpr int kBackwardPacksPerThread = 4;

template <typename scalar_t>
constexpr int forward_vector_size() {
  return kVectorBytes / static_cast<int>(sizeof(scalar_t));
}

template <typename scalar_t>
constexpr int forward_packs_per_iteration() {
  return kForwardElementsPerIteration / forward_vector_size<scalar_t>() > 0
             ? kForwardElementsPerIteration / forward_vector_size<scalar_t>()
             : 1;
}

// The backward moves the same number of elements of logits and of grad_logits per pack, so
// the wider of the two dtypes sets the pack size (16 bytes for it, maybe 8 for the other).
template <typename logits_t, typename grad_t>
constexpr int backward_vector_size() {
  return kVectorBytes /
         static_cast<int>(sizeof(logits_t) > sizeof(grad_t) ? sizeof(logits_t) : sizeof(grad_t));
}

// Smallest power of two >= needed, within [32, max_threads].
int threads_for(int64_t needed, int max_threads) {
  int threads = 32;
  while (threads < max_threads && threads < needed) threads *= 2;
  return threads;
}

template <typename scalar_t, bool kEntropy>
__global__ void __launch_bounds__(kForwardMaxThreads)
    token_logprobs_forward_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                                  int vocab, const int64_t* __restrict__ targets,
                                  float scale_log2,
                                  float* __restrict__ logp,
                                  float* __restrict__ entropy, double* __restrict__ lse) {
  constexpr int kVec = forward_vector_size<scalar_t>();
  constexpr int kPacks = forward_packs_per_iteration<scalar_t>();
  using Pack = AlignedPack<scalar_t, kVec>;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* row_logits = logits + row * row_stride;

  // The target logit is read directly; issued first so its latency hides behind the row.
  float target_logit = 0.0f;
  if (tid == 0) {
    const int64_t target = targets[row];
    // Targets are validated by the caller; an invalid one gives NaN, never a stray read.
    target_logit = (target >= 0 && target < vocab) ? static_cast<float>(row_logits[target]) : NAN;
  }

  const int head = min(vocab, elements_to_alignment<kVectorBytes>(row_logits));
  const int num_packs = (vocab - head) / kVec;
  const int tail_begin = head + num_packs * kVec;

  LogSumExp2 state = fastmath::empty_log_sum_exp2();
  // Head and tail hold fewer than kVec elements each.
  for (int j = tid; j < head; j += blockDim.x) {
    const float x[1] = {static_cast<float>(row_logits[j])};
    fastmath::accumulate<kEntropy>(state, x, scale_log2);
  }
  for (int j = tail_begin + tid; j < vocab; j += blockDim.x) {
    const float x[1] = {static_cast<float>(row_logits[j])};
    fastmath::accumulate<kEntropy>(state, x, scale_log2);
  }

  const Pack* packs = reinterpret_cast<const Pack*>(row_logits + head);
  const int threads = blockDim.x;
  int first = tid;
  // Full batches: no bounds checks between the loads, so all kPacks are in flight at once.
  for (; first + (kPacks - 1) * threads < num_packs; first += kPacks * threads) {
    Pack loaded[kPacks];
#pragma unroll
    for (int u = 0; u < kPacks; ++u) loaded[u] = packs[first + u * threads];
    float x[kPacks * kVec];
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) x[u * kVec + k] = static_cast<float>(loaded[u].val[k]);
    }
    fastmath::accumulate<kEntropy>(state, x, scale_log2);
  }
  // Fewer than kPacks packs remain for this thread.
  for (; first < num_packs; first += threads) {
    const Pack pack = packs[first];
    float x[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) x[k] = static_cast<float>(pack.val[k]);
    fastmath::accumulate<kEntropy>(state, x, scale_log2);
  }

  state = fastmath::block_merge<kEntropy>(state, scale_log2);
  if (tid == 0) {
    const float log2_sum = log2f(state.sum);
    // The target's exponent relative to the same max that `sum` used: no large
    // intermediate (lse ~ 1e4) is subtracted, so small log-probs keep full precision.
    const float target_log2 = (target_logit - state.max) * scale_log2;
    logp[row] = static_cast<float>(
        (static_cast<double>(target_log2) - static_cast<double>(log2_sum)) * fastmath::kLn2Double);
    // In the logits' units, log p = (x - lse) * scale_log2 * ln2 with the backward's own
    // scale_log2, and in double: near 1e4 a float lse is off by up to 5e-4, and every p with it.
    lse[row] = static_cast<double>(state.max) +
               static_cast<double>(log2_sum) / static_cast<double>(scale_log2);
    if (kEntropy) entropy[row] = (log2_sum - state.weighted / state.sum) * fastmath::kLn2;
  }
}

// grad = (g * ([j == target] - p) - ge * p * (log p + H)) / T. The entropy term keeps this
// form: (log p + H) is its only cancellation, between two numbers each one rounding from exact.
// Folding g and ge * H into one coefficient first made the cancellation lose several times as
// much (measured: 5x plain float32's error on weight gradients at logits near 1e4).
struct RowGradient {
  float scale_log2;       // log2(e) / T, the forward's own
  float inv_temperature;
  float lse_hi;           // lse_hi + lse_lo = the double lse, each a float
  float lse_lo;
  float grad_logp;        // g
  float grad_entropy;     // ge
  float entropy;          // H
  int target;
};

template <bool kEntropy>
__device__ __forceinline__ float logit_gradient(const RowGradient& row, float x, int column) {
  // x - lse_hi is exact (Sterbenz) where p matters, x near the lse; the small lse_lo carries
  // the rest of the double lse, and only the difference is scaled: full float precision.
  const float shifted = (x - row.lse_hi) - row.lse_lo;
  const float p = fast_exp2(shifted * row.scale_log2);
  float grad = -p * row.grad_logp;
  if (kEntropy) {
    // The clamp keeps log p finite for -inf logits, where p = 0.
    const float log_p = fmaxf(shifted * row.inv_temperature, fastmath::kMinLog2 * fastmath::kLn2);
    grad = fmaf(-row.grad_entropy * p, log_p + row.entropy, grad);
  }
  if (column == row.target) grad += row.grad_logp;
  return grad * row.inv_temperature;
}

// One block per (row, chunk of columns). grad_logits may alias logits: every element is read
// and then written by the same thread, and no two threads share an element, so the pointers
// carry no __restrict__.
template <typename logits_t, typename grad_t, bool kEntropy>
__global__ void __launch_bounds__(kBackwardMaxThreads) token_logprobs_backward_kernel(
    grad_t* grad_logits, int64_t grad_row_stride, const logits_t* logits, int64_t logits_row_stride,
    int vocab, int num_chunks, const int64_t* __restrict__ targets, const double* __restrict__ lse,
    const float* __restrict__ entropy, const float* __restrict__ grad_logp,
    const float* __restrict__ grad_entropy, float inv_temperature, float scale_log2) {
  constexpr int kVec = backward_vector_size<logits_t, grad_t>();
  using InPack = AlignedPack<logits_t, kVec>;
  using OutPack = AlignedPack<grad_t, kVec>;

  const int64_t row = blockIdx.x / static_cast<unsigned>(num_chunks);
  const int chunk = static_cast<int>(blockIdx.x - row * num_chunks);
  const int tid = threadIdx.x;
  const logits_t* row_in = logits + row * logits_row_stride;
  grad_t* row_out = grad_logits + row * grad_row_stride;

  RowGradient stats;
  stats.scale_log2 = scale_log2;
  const double row_lse = lse[row];
  stats.lse_hi = static_cast<float>(row_lse);
  stats.lse_lo = isfinite(row_lse) ? static_cast<float>(row_lse - static_cast<double>(stats.lse_hi)) : 0.0f;
  stats.inv_temperature = inv_temperature;
  stats.grad_logp = grad_logp[row];
  stats.grad_entropy = kEntropy ? grad_entropy[row] : 0.0f;
  stats.entropy = kEntropy ? entropy[row] : 0.0f;
  const int64_t target = targets[row];
  stats.target = (target >= 0 && target < vocab) ? static_cast<int>(target) : -1;

  // Vector packs need both rows at the same offset from their alignment boundaries; when
  // they are not, the whole row goes the scalar way (head = vocab).
  const int head_in = elements_to_alignment<kVec * static_cast<int>(sizeof(logits_t))>(row_in);
  const int head_out = elements_to_alignment<kVec * static_cast<int>(sizeof(grad_t))>(row_out);
  const int head = head_in == head_out ? min(head_in, vocab) : vocab;
  const int num_packs = (vocab - head) / kVec;
  const int tail_begin = head + num_packs * kVec;

  const int packs_per_chunk = blockDim.x * kBackwardPacksPerThread;
  const InPack* in_packs = reinterpret_cast<const InPack*>(row_in + head);
  OutPack* out_packs = reinterpret_cast<OutPack*>(row_out + head);
  const int first_pack = chunk * packs_per_chunk + tid;
  InPack loaded[kBackwardPacksPerThread];
  // All loads first (in flight together), then compute and store.
#pragma unroll
  for (int u = 0; u < kBackwardPacksPerThread; ++u) {
    const int index = first_pack + u * static_cast<int>(blockDim.x);
    if (index < num_packs) loaded[u] = in_packs[index];
  }
#pragma unroll
  for (int u = 0; u < kBackwardPacksPerThread; ++u) {
    const int index = first_pack + u * static_cast<int>(blockDim.x);
    if (index < num_packs) {
      OutPack result;
      const int column = head + index * kVec;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        result.val[k] = static_cast<grad_t>(
            logit_gradient<kEntropy>(stats, static_cast<float>(loaded[u].val[k]), column + k));
      }
      out_packs[index] = result;
    }
  }

  // Scalar head and tail: this chunk's share of the same column range.
  const int chunk_begin = chunk * packs_per_chunk * kVec;
  const int chunk_end = min(chunk_begin + packs_per_chunk * kVec, vocab);
  const int head_end = min(head, chunk_end);
  for (int j = chunk_begin + tid; j < head_end; j += blockDim.x) {
    row_out[j] = static_cast<grad_t>(logit_gradient<kEntropy>(stats, static_cast<float>(row_in[j]), j));
  }
  for (int j = max(tail_begin, chunk_begin) + tid; j < chunk_end; j += blockDim.x) {
    row_out[j] = static_cast<grad_t>(logit_gradient<kEntropy>(stats, static_cast<float>(row_in[j]), j));
  }
}

void check_vector(const at::Tensor& tensor, const char* name, int64_t size, const at::Tensor& like,
                  at::ScalarType dtype) {
  TORCH_CHECK(tensor.device() == like.device(), name, " must be on ", like.device(), ", got ",
              tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, name, " must be ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == size, name, " must have shape [", size,
              "], got ", tensor.sizes());
}

void check_logits_like(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(tensor.dim() == 2, name, " must be 2-D [N, V], got ", tensor.dim(), " dims");
  TORCH_CHECK(c10::isFloatingType(tensor.scalar_type()), name, " must be floating point, got ",
              tensor.scalar_type());
}

void check_targets(const at::Tensor& targets, const at::Tensor& logits) {
  TORCH_CHECK(targets.device() == logits.device(), "targets must be on ", logits.device(),
              ", got ", targets.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0),
              "targets must have shape [", logits.size(0), "], got ", targets.sizes());
}

// Rows are addressed as int offsets within a row and int64 offsets across rows.
void check_row_layout(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.size(1) <= INT_MAX / 2, name, ": vocabulary of ", tensor.size(1),
              " columns is too large");
  TORCH_CHECK(tensor.size(1) <= 1 || tensor.stride(1) == 1, name,
              " must have a contiguous last dimension");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(tensor.data_ptr()) % tensor.element_size() == 0, name,
              " must be aligned to its element size");
}

float scale_log2_of(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "temperature must be positive and finite, got ", temperature);
  const double scale = fastmath::kLog2eDouble / temperature;
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), "temperature ", temperature,
              " is too small");
  return static_cast<float>(scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_cuda(
    const at::Tensor& logits_in, const at::Tensor& targets_in, double temperature,
    bool with_entropy) {
  check_logits_like(logits_in, "logits");
  check_targets(targets_in, logits_in);
  const float scale_log2 = scale_log2_of(temperature);
  const at::cuda::CUDAGuard device_guard(logits_in.device());

  const int64_t num_rows = logits_in.size(0);
  const int64_t vocab = logits_in.size(1);
  const auto float_options = logits_in.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({num_rows}, float_options);
  at::Tensor lse = at::empty({num_rows}, logits_in.options().dtype(at::kDouble));
  at::Tensor entropy = at::empty({with_entropy ? num_rows : 0}, float_options);
  if (num_rows == 0) return {logp, entropy, lse};
  TORCH_CHECK(vocab > 0, "logits must have at least one column");
  TORCH_CHECK(num_rows <= INT_MAX, "too many rows: ", num_rows);

  // Strided rows are read in place; only a non-contiguous last dimension is copied.
  const at::Tensor logits =
      (vocab > 1 && logits_in.stride(1) != 1) ? logits_in.contiguous() : logits_in;
  check_row_layout(logits, "logits");
  const at::Tensor targets = targets_in.contiguous();

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_forward_cuda", [&] {
        constexpr int kVec = forward_vector_size<scalar_t>();
        constexpr int kPacks = forward_packs_per_iteration<scalar_t>();
        // Enough threads for one batch of packs each, up to the maximum.
        const int threads =
            threads_for((vocab / kVec + kPacks - 1) / kPacks, kForwardMaxThreads);
        const auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(num_rows), threads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), logits.stride(0), static_cast<int>(vocab),
              targets.data_ptr<int64_t>(), scale_log2, logp.data_ptr<float>(),
              with_entropy ? entropy.data_ptr<float>() : nullptr, lse.data_ptr<double>());
        };
        if (with_entropy) {
          launch(token_logprobs_forward_kernel<scalar_t, true>);
        } else {
          launch(token_logprobs_forward_kernel<scalar_t, false>);
        }
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, entropy, lse};
}

void token_logprobs_backward_cuda(at::Tensor& grad_logits, const at::Tensor& logits_in,
                                  const at::Tensor& targets_in, const at::Tensor& lse_in,
                                  const std::optional<at::Tensor>& entropy_in,
                                  const at::Tensor& grad_logp_in,
                                  const std::optional<at::Tensor>& grad_entropy_in,
                                  double temperature) {
  check_logits_like(logits_in, "logits");
  check_logits_like(grad_logits, "grad_logits");
  TORCH_CHECK(grad_logits.device() == logits_in.device(), "grad_logits must be on ",
              logits_in.device(), ", got ", grad_logits.device());
  TORCH_CHECK(grad_logits.sizes() == logits_in.sizes(), "grad_logits must have the shape of logits ",
              logits_in.sizes(), ", got ", grad_logits.sizes());
  check_targets(targets_in, logits_in);
  const int64_t num_rows = logits_in.size(0);
  const int64_t vocab = logits_in.size(1);
  check_vector(lse_in, "lse", num_rows, logits_in, at::kDouble);
  check_vector(grad_logp_in, "grad_logp", num_rows, logits_in, at::kFloat);
  // The entropy term needs both the entropy and its upstream gradient; an empty entropy (a
  // forward without it) counts as absent.
  const bool with_entropy = entropy_in.has_value() && entropy_in->defined() &&
                            grad_entropy_in.has_value() && grad_entropy_in->defined() &&
                            !(entropy_in->numel() == 0 && num_rows > 0);
  if (with_entropy) {
    check_vector(*entropy_in, "entropy", num_rows, logits_in, at::kFloat);
    check_vector(*grad_entropy_in, "grad_entropy", num_rows, logits_in, at::kFloat);
  }
  const float scale_log2 = scale_log2_of(temperature);  // also validates the temperature
  if (num_rows == 0 || vocab == 0) return;
  TORCH_CHECK(num_rows <= INT_MAX, "too many rows: ", num_rows);
  check_row_layout(grad_logits, "grad_logits");
  // Overlapping output rows (e.g. an expanded tensor) would be written by several blocks.
  TORCH_CHECK(num_rows == 1 || grad_logits.stride(0) >= vocab,
              "grad_logits rows must not overlap (row stride ", grad_logits.stride(0), " < ", vocab,
              ")");
  const at::cuda::CUDAGuard device_guard(logits_in.device());

  const at::Tensor logits =
      (vocab > 1 && logits_in.stride(1) != 1) ? logits_in.contiguous() : logits_in;
  check_row_layout(logits, "logits");
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_logp = grad_logp_in.contiguous();  // autograd may pass expanded grads
  at::Tensor entropy, grad_entropy;
  if (with_entropy) {
    entropy = entropy_in->contiguous();
    grad_entropy = grad_entropy_in->contiguous();
  }
  const float inv_temperature = static_cast<float>(1.0 / temperature);

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_backward_cuda", [&] {
        using logits_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, grad_logits.scalar_type(), "token_logprobs_backward_cuda",
            [&] {
              using grad_t = scalar_t;
              constexpr int kVec = backward_vector_size<logits_t, grad_t>();
              const int threads =
                  threads_for((vocab + kVec * kBackwardPacksPerThread - 1) /
                                  (kVec * kBackwardPacksPerThread),
                              kBackwardMaxThreads);
              const int64_t chunk_elements =
                  static_cast<int64_t>(threads) * kBackwardPacksPerThread * kVec;
              const int64_t num_chunks = (vocab + chunk_elements - 1) / chunk_elements;
              const int64_t num_blocks = num_rows * num_chunks;
              TORCH_CHECK(num_blocks <= INT_MAX, "logits too large: ", num_blocks, " blocks");
              const auto launch = [&](auto kernel) {
                kernel<<<static_cast<unsigned>(num_blocks), threads, 0, stream>>>(
                    grad_logits.data_ptr<grad_t>(), grad_logits.stride(0),
                    logits.data_ptr<logits_t>(), logits.stride(0), static_cast<int>(vocab),
                    static_cast<int>(num_chunks), targets.data_ptr<int64_t>(),
                    lse.data_ptr<double>(), with_entropy ? entropy.data_ptr<float>() : nullptr,
                    grad_logp.data_ptr<float>(),
                    with_entropy ? grad_entropy.data_ptr<float>() : nullptr, inv_temperature,
                    scale_log2);
              };
              if (with_entropy) {
                launch(token_logprobs_backward_kernel<logits_t, grad_t, true>);
              } else {
                launch(token_logprobs_backward_kernel<logits_t, grad_t, false>);
              }
            });
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmath, CUDA, m) {
  m.impl("token_logprobs_forward", &token_logprobs_forward_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
}
