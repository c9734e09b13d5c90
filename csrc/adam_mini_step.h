// The launchers of the fused Adam-mini step (the CUDA backend).
//
// kernels.cuh holds the kernels, adam_mini_step.cu the launchers declared here, constants.h the
// table layout and launch shapes they share; bindings.cpp registers the launchers as the operators
// adam_mini_kernels::{rows_step, large_blocks_sumsq, large_blocks_update, adam_step, step_coefficients} and exports the constants to
// Python, where tests check them against their Python definitions.
#pragma once

#include <cstdint>

#include <ATen/core/TensorBase.h>

#include "constants.h"

namespace adam_mini {

// Every launcher takes `stochastic_rounding`: round the bfloat16 stores of p (and of a bfloat16
// m) stochastically with the keys of the coefficient table (adam_mini_kernels/rounding.py); only
// for bfloat16 p.

// Small blocks ("rows", at most `width` <= kRowMax elements each), one CUDA block per row of
// `rows` (R, kRowCols): sum of g^2, v, m and p in one pass.
void rows_step(const at::TensorBase& p, const at::TensorBase& g, const at::TensorBase& m,
               const at::TensorBase& m_scales, const at::TensorBase& v, const at::TensorBase& coef, const at::TensorBase& rows,
               int64_t width, bool stochastic_rounding);

// Large blocks, first half (two launches): the sum of (g * inv_scale)^2 of every tile into
// `partial` (one slot per tile), then of every block into `block_sums` (a fixed-order sum of its
// tiles' slots). `inv_scale` (AMP's 1 / scale, 0-dim float32) is optional.
void large_blocks_sumsq(const at::TensorBase& g, const at::TensorBase* inv_scale, const at::TensorBase& tiles,
                        const at::TensorBase& blocks, const at::TensorBase& partial, const at::TensorBase& block_sums);

// Large blocks, second half (two launches): every block's v from `block_sums` (all-reduced over
// the ranks in between for blocks split across them), then m and p of every tile.
void large_blocks_update(const at::TensorBase& p, const at::TensorBase& g, const at::TensorBase& m,
                         const at::TensorBase& m_scales, const at::TensorBase& v, const at::TensorBase& coef,
                         const at::TensorBase& tiles, const at::TensorBase& blocks,
                         const at::TensorBase& block_sums, bool stochastic_rounding);

// Adam blocks (one v per element), one CUDA block per Adam tile of `tiles` (A, kRowCols).
void adam_step(const at::TensorBase& p, const at::TensorBase& g, const at::TensorBase& m,
               const at::TensorBase& v, const at::TensorBase& coef, const at::TensorBase& tiles,
               bool stochastic_rounding);

// The step counters and the coefficient table of one group (one launch): `steps` (P) int64,
// `hparams` (P, kNumHparams) float64, `coef` (P, kNumCoefficients) float32; `active` (P) bool,
// `inv_scale` and `found_inf` (AMP) and `clip` (max_grad_norm's factor), 0-dim float32, are optional.
void step_coefficients(const at::TensorBase& steps, const at::TensorBase& hparams, const at::TensorBase& coef,
                       const at::TensorBase* active, const at::TensorBase* inv_scale,
                       const at::TensorBase* found_inf, const at::TensorBase* clip, int64_t round_seed,
                       bool stochastic_rounding);

// Whether the kernels have an image (machine code, or PTX the driver compiles) for CUDA device
// `device_index`: false for a GPU whose arch the extension was not built for.
bool has_kernel_image(int64_t device_index);

}  // namespace adam_mini
