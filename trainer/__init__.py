"""The lean SFT + GRPO trainer built on fastmath_kernels."""
