// Operator registration of the CUDA backend and the Python module adam_mini_kernels._C.
//
// Loading the module (`import adam_mini_kernels._C`, done by adam_mini_kernels/cuda_backend.py)
// runs the TORCH_LIBRARY blocks below, after which the operators are reachable as
// torch.ops.adam_mini_kernels.<name>. Their fake (meta) implementations are Python functions in
// adam_mini_kernels/cuda_backend.py, named by set_python_module so that torch can find them.

#include <cstdint>
#include <optional>
#include <utility>

#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "adam_mini_step.h"

// [Note: operator granularity]
// One operator per kind of work of the launch tables (see [Note: launch tables] in
// adam_mini_kernels/launch_tables.py), rather than one operator for the whole group step:
//
//   rows_step            one row class (its table and its width); called once per class.
//   large_blocks_sumsq   the large blocks' sums of g^2: per tile into the scratch `partial`,
//                        then per block into `block_sums`.
//   large_blocks_update  the large blocks' v from `block_sums`, then m and p of every tile.
//                        The boundary between the two is where a sharded group all-reduces the
//                        sums of its blocks split across ranks (one collective, in Python).
//   adam_step            the Adam tiles.
//   step_coefficients    the step counters and the coefficient table of a group (one launch).
//
// rows_step and large_blocks_update also take `m_scales`, the quantization scales of an int8 m
// (empty and unused for a float m), so that one schema serves every storage of m.
//
// A step is then a handful of operator calls per group (one per row class, plus at most three),
// independent of the number of parameters, each with a short fixed schema that torch.compile,
// CUDA graphs and opcheck handle without special cases (a single group operator would need lists
// of tables and optional mutable scratch). Every operator mutates its outputs in place (p, m,
// m_scales, v; the scratch sums) and returns nothing; the alias annotations say so, so that
// functionalization and torch.compile treat them as the in-place updates they are.

namespace {

void rows_step_op(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& m_scales, at::Tensor& v,
                  const at::Tensor& coef, const at::Tensor& rows, int64_t width, bool stochastic_rounding) {
  adam_mini::rows_step(p, g, m, m_scales, v, coef, rows, width, stochastic_rounding);
}

void large_blocks_sumsq_op(const at::Tensor& g, const std::optional<at::Tensor>& inv_scale, const at::Tensor& tiles,
                           const at::Tensor& blocks, at::Tensor& partial, at::Tensor& block_sums) {
  adam_mini::large_blocks_sumsq(g, inv_scale ? &*inv_scale : nullptr, tiles, blocks, partial, block_sums);
}

void large_blocks_update_op(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& m_scales, at::Tensor& v,
                            const at::Tensor& coef, const at::Tensor& tiles, const at::Tensor& blocks,
                            const at::Tensor& block_sums, bool stochastic_rounding) {
  adam_mini::large_blocks_update(p, g, m, m_scales, v, coef, tiles, blocks, block_sums, stochastic_rounding);
}

void adam_step_op(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v, const at::Tensor& coef,
                  const at::Tensor& tiles, bool stochastic_rounding) {
  adam_mini::adam_step(p, g, m, v, coef, tiles, stochastic_rounding);
}

void step_coefficients_op(at::Tensor& steps, const at::Tensor& hparams, at::Tensor& coef,
                          const std::optional<at::Tensor>& active, const std::optional<at::Tensor>& inv_scale,
                          const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip,
                          int64_t round_seed, bool stochastic_rounding) {
  const auto ptr = [](const std::optional<at::Tensor>& t) -> const at::TensorBase* { return t ? &*t : nullptr; };
  adam_mini::step_coefficients(steps, hparams, coef, ptr(active), ptr(inv_scale), ptr(found_inf), ptr(clip),
                               round_seed, stochastic_rounding);
}

}  // namespace

TORCH_LIBRARY(adam_mini_kernels, m) {
  m.set_python_module("adam_mini_kernels.cuda_backend");
  m.def(
      "rows_step(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) m_scales, Tensor(d!) v, Tensor coef, "
      "Tensor rows, int width, bool stochastic_rounding) -> ()");
  m.def(
      "large_blocks_sumsq(Tensor g, Tensor? inv_scale, Tensor tiles, Tensor blocks, Tensor(a!) partial, "
      "Tensor(b!) block_sums) -> ()");
  m.def(
      "large_blocks_update(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) m_scales, Tensor(d!) v, Tensor coef, "
      "Tensor tiles, Tensor blocks, Tensor block_sums, bool stochastic_rounding) -> ()");
  m.def(
      "adam_step(Tensor(a!) p, Tensor g, Tensor(b!) m, Tensor(c!) v, Tensor coef, Tensor tiles, "
      "bool stochastic_rounding) -> ()");
  m.def(
      "step_coefficients(Tensor(a!) steps, Tensor hparams, Tensor(b!) coef, Tensor? active, Tensor? inv_scale, "
      "Tensor? found_inf, Tensor? clip, int round_seed, bool stochastic_rounding) -> ()");
}

TORCH_LIBRARY_IMPL(adam_mini_kernels, CUDA, m) {
  m.impl("rows_step", &rows_step_op);
  m.impl("large_blocks_sumsq", &large_blocks_sumsq_op);
  m.impl("large_blocks_update", &large_blocks_update_op);
  m.impl("adam_step", &adam_step_op);
  m.impl("step_coefficients", &step_coefficients_op);
}

// The Python module: the constants the kernels were compiled with, which cuda_backend.py checks
// against launch_tables.py and coefficients.py at import (a build from other sources would
// otherwise read the tables with the wrong columns), and has_kernel_image, which the backend's
// availability check asks.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of adam-mini-kernels; the operators are torch.ops.adam_mini_kernels.*";
  const std::pair<const char*, int64_t> constants[] = {
      {"ROW_START", adam_mini::kRowStart},
      {"ROW_NUMEL", adam_mini::kRowNumel},
      {"ROW_V", adam_mini::kRowV},
      {"ROW_PARAM", adam_mini::kRowParam},
      {"ROW_SCALE", adam_mini::kRowScale},
      {"ROW_COLS", adam_mini::kRowCols},
      {"TILE_START", adam_mini::kTileStart},
      {"TILE_NUMEL", adam_mini::kTileNumel},
      {"TILE_BLOCK", adam_mini::kTileBlock},
      {"TILE_SCALE", adam_mini::kTileScale},
      {"TILE_COLS", adam_mini::kTileCols},
      {"LB_V", adam_mini::kLbV},
      {"LB_PARAM", adam_mini::kLbParam},
      {"LB_FIRST_TILE", adam_mini::kLbFirstTile},
      {"LB_NUM_TILES", adam_mini::kLbNumTiles},
      {"LB_NUMEL", adam_mini::kLbNumel},
      {"LB_COLS", adam_mini::kLbCols},
      {"C_DECAY", adam_mini::kDecay},
      {"C_STEP_SIZE", adam_mini::kStepSize},
      {"C_BC2_SQRT", adam_mini::kBc2Sqrt},
      {"C_EPS", adam_mini::kEps},
      {"C_BETA2", adam_mini::kBeta2},
      {"C_V_WEIGHT", adam_mini::kVWeight},
      {"C_M_WEIGHT", adam_mini::kMWeight},
      {"C_GRAD_SCALE", adam_mini::kGradScale},
      {"C_CLIP", adam_mini::kClip},
      {"C_ROUND_KEY", adam_mini::kRoundKey},
      {"NUM_COEFFICIENTS", adam_mini::kNumCoefficients},
      {"HP_LR", adam_mini::kHpLr},
      {"HP_WEIGHT_DECAY", adam_mini::kHpWeightDecay},
      {"HP_BETA1", adam_mini::kHpBeta1},
      {"HP_BETA2", adam_mini::kHpBeta2},
      {"HP_EPS", adam_mini::kHpEps},
      {"NUM_HPARAMS", adam_mini::kNumHparams},
      {"MIX_MUL1", adam_mini::kMixMul1},
      {"MIX_MUL2", adam_mini::kMixMul2},
      {"GOLDEN", adam_mini::kGolden},
      {"MOMENT_STREAM", adam_mini::kMomentStream},
      {"ROW_MAX", adam_mini::kRowMax},
      {"TILE", adam_mini::kTile},
      {"ADAM_TILE", adam_mini::kAdamTile},
      {"QBLOCK", adam_mini::kQBlock},
      {"CODE_MAX", static_cast<int64_t>(adam_mini::kCodeMax)},
      {"ELEMS_PER_THREAD", adam_mini::kElemsPerThread},
  };
  pybind11::dict table;
  for (const auto& [name, value] : constants) {
    table[name] = value;
  }
  module.attr("CONSTANTS") = table;
  module.def("has_kernel_image", &adam_mini::has_kernel_image, pybind11::arg("device_index"),
             "Whether the kernels can run on CUDA device `device_index` (built for its arch); see "
             "[Note: kernel images] in adam_mini_step.cu.");
}
