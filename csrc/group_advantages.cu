// GRPO group advantages in one launch: no host sync, so the op can be captured in a CUDA
// graph. One warp normalises one group. Batch scaling needs statistics over every reward
// before any output, so it runs as a single block; the other modes spread groups over a grid.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "block_reduce.cuh"

namespace {

constexpr int kThreads = 512;
constexpr int64_t kMaxBlocks = 1024;  // later groups are taken by a grid-stride loop
constexpr int kScaleGroup = 0;
constexpr int kScaleBatch = 1;

// Non-finite rewards (NaN from a failed reward, +-inf) are missing values.
__device__ __forceinline__ bool is_valid(float value) { return isfinite(value); }

// With eps = 0 a group of equal rewards has std 0 and deviations 0: its advantages are 0.
__device__ __forceinline__ float safe_inverse(float denominator) {
  return denominator > 0.0f ? 1.0f / denominator : 0.0f;
}

template <typename scalar_t>
__global__ void group_advantages_kernel(const scalar_t* __restrict__ rewards,
                                        float* __restrict__ advantages, int64_t num_groups,
                                        int64_t group_size, int scale_mode, float eps) {
  __shared__ float scratch[32];
  const int64_t total = num_groups * group_size;

  float batch_std = 0.0f;
  if (scale_mode == kScaleBatch) {
    // Two passes (mean, then squared deviations) for the unbiased batch std.
    float sum = 0.0f, count = 0.0f;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
      const float value = static_cast<float>(rewards[i]);
      if (is_valid(value)) {
        sum += value;
        count += 1.0f;
      }
    }
    sum = block_sum(sum, scratch);
    count = block_sum(count, scratch);
    const float batch_mean = sum / fmaxf(count, 1.0f);
    float squares = 0.0f;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
      const float value = static_cast<float>(rewards[i]);
      if (is_valid(value)) squares += (value - batch_mean) * (value - batch_mean);
    }
    squares = block_sum(squares, scratch);
    batch_std = sqrtf(squares / fmaxf(count - 1.0f, 1.0f));
  }

  // Every lane of a warp walks the same groups, so the warp-wide sums see all 32 lanes.
  const int lane = threadIdx.x & 31;
  const int warps_per_block = blockDim.x >> 5;
  const int64_t group_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5);
       group < num_groups; group += group_stride) {
    const scalar_t* row = rewards + group * group_size;
    float* out = advantages + group * group_size;
    float sum = 0.0f, count = 0.0f;
    for (int64_t j = lane; j < group_size; j += 32) {
      const float value = static_cast<float>(row[j]);
      if (is_valid(value)) {
        sum += value;
        count += 1.0f;
      }
    }
    sum = warp_all_sum(sum);
    count = warp_all_sum(count);
    const float mean = sum / fmaxf(count, 1.0f);
    float inv_scale = 1.0f;
    if (scale_mode == kScaleGroup) {
      float squares = 0.0f;
      for (int64_t j = lane; j < group_size; j += 32) {
        const float value = static_cast<float>(row[j]);
        if (is_valid(value)) squares += (value - mean) * (value - mean);
      }
      squares = warp_all_sum(squares);
      inv_scale = safe_inverse(sqrtf(squares / fmaxf(count - 1.0f, 1.0f)) + eps);
    } else if (scale_mode == kScaleBatch) {
      inv_scale = safe_inverse(batch_std + eps);
    }
    for (int64_t j = lane; j < group_size; j += 32) {
      const float value = static_cast<float>(row[j]);
      out[j] = (count >= 2.0f && is_valid(value)) ? (value - mean) * inv_scale : 0.0f;
    }
  }
}

at::Tensor group_advantages_cuda(const at::Tensor& rewards, int64_t group_size,
                                 int64_t scale_mode, double eps) {
  TORCH_CHECK(rewards.is_cuda(), "rewards must be a CUDA tensor");
  TORCH_CHECK(rewards.dim() == 1, "rewards must be 1-D, got ", rewards.dim(), " dims");
  TORCH_CHECK(group_size >= 1 && rewards.numel() % group_size == 0,
              "group_size must divide the number of rewards");
  TORCH_CHECK(scale_mode >= 0 && scale_mode <= 2, "scale_mode must be 0, 1 or 2");
  const at::cuda::CUDAGuard device_guard(rewards.device());
  const at::Tensor input = rewards.contiguous();
  at::Tensor advantages = at::empty(input.sizes(), input.options().dtype(at::kFloat));
  if (input.numel() == 0) return advantages;
  const int64_t num_groups = input.numel() / group_size;
  constexpr int kWarpsPerBlock = kThreads / 32;
  const int64_t blocks_needed = (num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned blocks =
      scale_mode == kScaleBatch ? 1u : static_cast<unsigned>(std::min<int64_t>(blocks_needed, kMaxBlocks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "group_advantages_cuda", [&] {
        group_advantages_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            input.data_ptr<scalar_t>(), advantages.data_ptr<float>(), num_groups, group_size,
            static_cast<int>(scale_mode), static_cast<float>(eps));
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return advantages;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmath, CUDA, m) { m.impl("group_advantages", &group_advantages_cuda); }
