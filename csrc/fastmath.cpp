// Schemas of the fastmath custom ops. Each op's CUDA implementation registers itself in its
// own .cu file with TORCH_LIBRARY_IMPL(fastmath, CUDA, m); fake (meta) and autograd
// registrations live in Python beside each op.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module: importing fastmath_kernels._C loads this library and runs the static
// registrations below. No pybind11 bindings are needed, which keeps the build short.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastmath, m) {
  // scale_mode: 0 = group std, 1 = batch std, 2 = none (mean-centred only).
  m.def("group_advantages(Tensor rewards, int group_size, int scale_mode, float eps) -> Tensor");

  // Row-wise log-softmax statistics of logits [N, V] (last dim contiguous) at targets [N]:
  // float32 logp and entropy ([0] unless with_entropy) of logits / temperature, and the float64
  // lse = temperature * logsumexp(logits / temperature), in the logits' units, for the backward
  // (a float32 lse near 1e4 would cost every probability up to 5e-4 of itself).
  m.def(
      "token_logprobs_forward(Tensor logits, Tensor targets, float temperature, bool with_entropy)"
      " -> (Tensor logp, Tensor entropy, Tensor lse)");
  // Gradient w.r.t. logits, elementwise given the forward's row statistics; grad_logits may be
  // the logits tensor itself (in place) or any tensor of the same shape.
  m.def(
      "token_logprobs_backward(Tensor(a!) grad_logits, Tensor logits, Tensor targets, Tensor lse,"
      " Tensor? entropy, Tensor grad_logp, Tensor? grad_entropy, float temperature) -> ()");

  // Clipped GRPO token loss on float32 [B, T] log-probs with advantages [B].
  m.def(
      "grpo_token_loss_forward(Tensor logp, Tensor old_logp, Tensor advantages, Tensor? ref_logp,"
      " float beta, float eps_low, float eps_high) -> Tensor");
  m.def(
      "grpo_token_loss_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages,"
      " Tensor? ref_logp, float beta, float eps_low, float eps_high) -> Tensor");
}
