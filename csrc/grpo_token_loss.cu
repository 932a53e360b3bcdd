// Per-token clipped GRPO loss and its gradient w.r.t. logp, on float32 [B, T] log-probs with
// advantages [B] broadcast over tokens. Tiny elementwise work, so accurate expf throughout
// and grid-stride loops sized to the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

// NaN-propagating minimum, like torch.minimum (fminf would drop a NaN).
__device__ __forceinline__ float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

struct ClipBounds {
  float lower;  // 1 - eps_low
  float upper;  // 1 + eps_high
};

template <typename index_t, bool kHasRef>
__global__ void grpo_token_loss_forward_kernel(const float* __restrict__ logp,
                                               const float* __restrict__ old_logp,
                                               const float* __restrict__ advantages,
                                               const float* __restrict__ ref_logp,
                                               float* __restrict__ loss, index_t numel,
                                               index_t seq_len, float beta, ClipBounds clip) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const float current = logp[i];
    const float advantage = advantages[i / seq_len];
    const float ratio = expf(current - old_logp[i]);
    const float clipped = fminf(fmaxf(ratio, clip.lower), clip.upper);
    float value = -nan_min(ratio * advantage, clipped * advantage);
    if (kHasRef) {
      const float log_ratio = ref_logp[i] - current;
      value += beta * (expf(log_ratio) - log_ratio - 1.0f);
    }
    loss[i] = value;
  }
}

template <typename index_t, bool kHasRef>
__global__ void grpo_token_loss_backward_kernel(const float* __restrict__ grad_loss,
                                                const float* __restrict__ logp,
                                                const float* __restrict__ old_logp,
                                                const float* __restrict__ advantages,
                                                const float* __restrict__ ref_logp,
                                                float* __restrict__ grad_logp, index_t numel,
                                                index_t seq_len, float beta, ClipBounds clip) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const float current = logp[i];
    const float advantage = advantages[i / seq_len];
    const float ratio = expf(current - old_logp[i]);
    const float clipped = fminf(fmaxf(ratio, clip.lower), clip.upper);
    // The unclipped branch is the one min() picks (ties included); the clipped one is
    // constant in logp.
    float derivative = ratio * advantage <= clipped * advantage ? -advantage * ratio : 0.0f;
    if (kHasRef) derivative += beta * (1.0f - expf(ref_logp[i] - current));
    grad_logp[i] = grad_loss[i] * derivative;
  }
}

void check_token_tensor(const at::Tensor& tensor, const char* name, const at::Tensor& like) {
  TORCH_CHECK(tensor.device() == like.device(), name, " must be on ", like.device(), ", got ",
              tensor.device());
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32, got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ",
              tensor.sizes());
}

// Validates the shared arguments; returns ref_logp when it is given.
std::optional<at::Tensor> check_arguments(const at::Tensor& logp, const at::Tensor& old_logp,
                                          const at::Tensor& advantages,
                                          const std::optional<at::Tensor>& ref_logp,
                                          double eps_low, double eps_high) {
  TORCH_CHECK(logp.is_cuda(), "logp must be a CUDA tensor");
  TORCH_CHECK(logp.dim() == 2, "logp must be 2-D [B, T], got ", logp.dim(), " dims");
  TORCH_CHECK(logp.scalar_type() == at::kFloat, "logp must be float32, got ", logp.scalar_type());
  check_token_tensor(old_logp, "old_logp", logp);
  TORCH_CHECK(advantages.device() == logp.device(), "advantages must be on ", logp.device(),
              ", got ", advantages.device());
  TORCH_CHECK(advantages.scalar_type() == at::kFloat, "advantages must be float32, got ",
              advantages.scalar_type());
  TORCH_CHECK(advantages.dim() == 1 && advantages.size(0) == logp.size(0),
              "advantages must have shape [", logp.size(0), "], got ", advantages.sizes());
  TORCH_CHECK(eps_low >= 0.0 && eps_high >= 0.0, "eps_low and eps_high must be non-negative");
  if (ref_logp.has_value() && ref_logp->defined()) {
    check_token_tensor(*ref_logp, "ref_logp", logp);
    return ref_logp;
  }
  return std::nullopt;
}

int num_blocks_for(int64_t numel) {
  const int64_t needed = (numel + kThreads - 1) / kThreads;
  const int64_t resident =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
      kBlocksPerSm;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, resident)));
}

// Calls launch(index_tag, has_ref_tag): 32-bit indices when they suffice (cheaper division).
template <typename Launch>
void dispatch_index_and_ref(int64_t numel, bool has_ref, const Launch& launch) {
  const auto with_index = [&](auto index_tag) {
    if (has_ref) {
      launch(index_tag, std::true_type{});
    } else {
      launch(index_tag, std::false_type{});
    }
  };
  if (numel <= INT_MAX) {
    with_index(uint32_t{0});
  } else {
    with_index(int64_t{0});
  }
}

ClipBounds clip_bounds(double eps_low, double eps_high) {
  return {static_cast<float>(1.0 - eps_low), static_cast<float>(1.0 + eps_high)};
}

at::Tensor grpo_token_loss_forward_cuda(const at::Tensor& logp_in, const at::Tensor& old_logp_in,
                                        const at::Tensor& advantages_in,
                                        const std::optional<at::Tensor>& ref_logp_in, double beta,
                                        double eps_low, double eps_high) {
  const auto ref = check_arguments(logp_in, old_logp_in, advantages_in, ref_logp_in, eps_low,
                                   eps_high);
  const at::cuda::CUDAGuard device_guard(logp_in.device());
  at::Tensor loss = at::empty(logp_in.sizes(), logp_in.options());
  const int64_t numel = logp_in.numel();
  if (numel == 0) return loss;

  const at::Tensor logp = logp_in.contiguous();
  const at::Tensor old_logp = old_logp_in.contiguous();
  const at::Tensor advantages = advantages_in.contiguous();
  const at::Tensor ref_logp = ref.has_value() ? ref->contiguous() : at::Tensor();
  const int blocks = num_blocks_for(numel);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_index_and_ref(numel, ref.has_value(), [&](auto index_tag, auto has_ref_tag) {
    using index_t = decltype(index_tag);
    constexpr bool kHasRef = decltype(has_ref_tag)::value;
    grpo_token_loss_forward_kernel<index_t, kHasRef><<<blocks, kThreads, 0, stream>>>(
        logp.data_ptr<float>(), old_logp.data_ptr<float>(), advantages.data_ptr<float>(),
        kHasRef ? ref_logp.data_ptr<float>() : nullptr, loss.data_ptr<float>(),
        static_cast<index_t>(numel), static_cast<index_t>(logp.size(1)),
        static_cast<float>(beta), clip_bounds(eps_low, eps_high));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor grpo_token_loss_backward_cuda(const at::Tensor& grad_loss_in,
                                         const at::Tensor& logp_in,
                                         const at::Tensor& old_logp_in,
                                         const at::Tensor& advantages_in,
                                         const std::optional<at::Tensor>& ref_logp_in,
                                         double beta, double eps_low, double eps_high) {
  const auto ref = check_arguments(logp_in, old_logp_in, advantages_in, ref_logp_in, eps_low,
                                   eps_high);
  check_token_tensor(grad_loss_in, "grad_loss", logp_in);
  const at::cuda::CUDAGuard device_guard(logp_in.device());
  at::Tensor grad_logp = at::empty(logp_in.sizes(), logp_in.options());
  const int64_t numel = logp_in.numel();
  if (numel == 0) return grad_logp;

  const at::Tensor grad_loss = grad_loss_in.contiguous();  // autograd may pass expanded grads
  const at::Tensor logp = logp_in.contiguous();
  const at::Tensor old_logp = old_logp_in.contiguous();
  const at::Tensor advantages = advantages_in.contiguous();
  const at::Tensor ref_logp = ref.has_value() ? ref->contiguous() : at::Tensor();
  const int blocks = num_blocks_for(numel);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_index_and_ref(numel, ref.has_value(), [&](auto index_tag, auto has_ref_tag) {
    using index_t = decltype(index_tag);
    constexpr bool kHasRef = decltype(has_ref_tag)::value;
    grpo_token_loss_backward_kernel<index_t, kHasRef><<<blocks, kThreads, 0, stream>>>(
        grad_loss.data_ptr<float>(), logp.data_ptr<float>(), old_logp.data_ptr<float>(),
        advantages.data_ptr<float>(), kHasRef ? ref_logp.data_ptr<float>() : nullptr,
        grad_logp.data_ptr<float>(), static_cast<index_t>(numel),
        static_cast<index_t>(logp.size(1)), static_cast<float>(beta),
        clip_bounds(eps_low, eps_high));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_logp;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmath, CUDA, m) {
  m.impl("grpo_token_loss_forward", &grpo_token_loss_forward_cuda);
  m.impl("grpo_token_loss_backward", &grpo_token_loss_backward_cuda);
}
