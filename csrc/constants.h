// Constants shared by the kernels (kernels.cuh), their launchers (adam_mini_step.cu), the
// bindings (bindings.cpp, which export them to Python) and the CPU emulation of the kernels used in
// CI (tests/gpu/host_emulator.cpp). No PyTorch includes.
#pragma once

#include <cstdint>

namespace adam_mini {

// Columns of the int64 launch tables (adam_mini_kernels/launch_tables.py, [Note: launch tables]).
// Rows and Adam tiles: first element, number of elements, index of the (first) v, parameter,
// index of the first quantization scale (int8 m).
constexpr int kRowStart = 0;
constexpr int kRowNumel = 1;
constexpr int kRowV = 2;
constexpr int kRowParam = 3;
constexpr int kRowScale = 4;
constexpr int kRowCols = 5;
// Tiles of large blocks: first element, number of elements, index of the large block, index of
// the first quantization scale.
constexpr int kTileStart = 0;
constexpr int kTileNumel = 1;
constexpr int kTileBlock = 2;
constexpr int kTileScale = 3;
constexpr int kTileCols = 4;
// Large blocks: v index, parameter, first tile, number of tiles, number of elements.
constexpr int kLbV = 0;
constexpr int kLbParam = 1;
constexpr int kLbFirstTile = 2;
constexpr int kLbNumTiles = 3;
constexpr int kLbNumel = 4;
constexpr int kLbCols = 5;

// Columns of the float32 coefficient table (adam_mini_kernels/coefficients.py), one row per
// parameter:  p <- p * DECAY - STEP_SIZE * m / (sqrt(v) / BC2_SQRT + EPS),
//             v <- BETA2 * v + V_WEIGHT * mean(g^2),  m <- m + M_WEIGHT * (g - m).
constexpr int kDecay = 0;
constexpr int kStepSize = 1;
constexpr int kBc2Sqrt = 2;
constexpr int kEps = 3;
constexpr int kBeta2 = 4;
constexpr int kVWeight = 5;
constexpr int kMWeight = 6;
constexpr int kGradScale = 7;  // AMP's 1 / scale (or 1; 0 when idle)
constexpr int kClip = 8;       // max_grad_norm's clip factor (or 1), applied after kGradScale
constexpr int kRoundKey = 9;   // uint32 stochastic rounding key, stored as float32 bits
constexpr int kNumCoefficients = 10;

// Columns of the float64 per-parameter hyperparameter table (adam_mini_kernels/buffers.py).
constexpr int kHpLr = 0;
constexpr int kHpWeightDecay = 1;
constexpr int kHpBeta1 = 2;
constexpr int kHpBeta2 = 3;
constexpr int kHpEps = 4;
constexpr int kNumHparams = 5;

// The counter-based hash of stochastic rounding (adam_mini_kernels/rounding.py, [Note: stochastic
// rounding]): multipliers of the 32-bit finaliser, the spread of an index's high word, and the
// salt of m's stream.
constexpr uint32_t kMixMul1 = 0x21F0AAADu;
constexpr uint32_t kMixMul2 = 0x735A2D97u;
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kMomentStream = 0x68E31DA4u;

// Sizes the launch tables are cut to (launch_tables.py): the widest row held on chip, the
// elements of one tile of a large block, the elements of one Adam tile.
constexpr int kRowMax = 8192;
constexpr int kTile = 4096;
constexpr int kAdamTile = 1024;
// Elements per quantization chunk of an int8 m and its largest code (adam_mini_kernels/
// quantization.py: QBLOCK, CODE_MAX).
constexpr int kQBlock = 256;
constexpr float kCodeMax = 127.f;

// Every kernel gives each thread this many elements of its span (see [Note: thread fragments] in
// kernels.cuh), which fixes the threads per CUDA block of each kernel.
constexpr int kElemsPerThread = 8;
constexpr int kTileThreads = kTile / kElemsPerThread;      // tile_sumsq_kernel, tile_step_kernel
constexpr int kAdamThreads = kAdamTile / kElemsPerThread;  // adam_step_kernel
constexpr int kReduceThreads = 256;                        // block_sumsq_kernel
constexpr int kBlockVThreads = 128;                        // large_block_v_kernel (a block each)
constexpr int kCoefThreads = 128;                          // step_coefficients_kernel
constexpr int kRowMaxThreads = kRowMax / kElemsPerThread;  // rows_step_kernel, widest class

// Threads of a rows_step_kernel CUDA block for a row class of `width` elements (1 <= width <=
// kRowMax): enough for the whole row, in whole warps (see [Note: one CUDA block per row]).
constexpr int row_threads(int64_t width) {
  const int64_t needed = (width + kElemsPerThread - 1) / kElemsPerThread;
  return static_cast<int>((needed + 31) / 32 * 32);
}

static_assert(kTile % (32 * kElemsPerThread) == 0 && kAdamTile % (32 * kElemsPerThread) == 0,
              "tiles must be whole warps");
static_assert(kRowMaxThreads <= 1024, "the widest row must fit one CUDA block");
static_assert(kTile % kQBlock == 0, "tiles must start at quantization chunk boundaries");

}  // namespace adam_mini
