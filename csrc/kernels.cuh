// Device code of the fused Adam-mini step: the kernels, templated on the storage dtype.
//
// Included by adam_mini_step.cu (which launches them). It depends on nothing of PyTorch but the
// 16-bit float types and CUDA_KERNEL_ASSERT, so that tests/gpu/host_emulator.cpp can also compile
// it for the CPU and run the very same code in CI, where there is no GPU.
//
//   rows_step_kernel     one CUDA block per small block ("row", <= kRowMax elements), held in
//                        registers: sum of g^2, v, m and p in one pass.
//   tile_sumsq_kernel    large blocks, phase 1: sum of g^2 of each tile into the tile's own slot.
//   block_sumsq_kernel   large blocks, phase 2: a fixed-order sum of a block's slots, into its
//                        slot of `sums` (a sharded group all-reduces split blocks' sums next).
//   large_block_v_kernel large blocks, phase 3: each block's v from its sum, one thread each.
//   tile_step_kernel     large blocks, phase 4: m and p of each tile with its block's new v.
//   adam_step_kernel     Adam blocks (biases): one v per element.
//   step_coefficients_kernel  the step counters and the coefficient table, one thread per
//                        parameter.
//
// The rows and tile kernels also step an int8 m (state_t = int8_t): see [Note: int8 first moment
// in the kernels].
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "constants.h"

namespace adam_mini {
namespace kernels {

// [Note: thread fragments]
// Every kernel works on a span of consecutive elements (a row, a tile, an Adam tile) with
// blockDim.x threads that each hold kElemsPerThread (8) elements of it in registers, as float32.
// The span is read in units of kVec = 16 / sizeof(storage) elements (4 for float, 8 for 16-bit
// types), one 16-byte load each: thread t holds the units t, t + T, t + 2T, ... (T threads), so
// a warp reads 512 contiguous bytes per instruction. Fragment slot i * kVec + j is element
// (i * T + t) * kVec + j of the span.
//
// Aligned fast path: when the span starts at a multiple of kVec elements and its length is a
// multiple of kVec (and the buffers themselves are 16-byte aligned, which the launcher checks),
// each unit is entirely in or entirely out of the span and is moved with one 16-byte load or
// store. Parameters start at 32-element boundaries in the flat buffers (buffers.ALIGN_ELEMENTS),
// so a row is aligned when its length is a multiple of kVec: every row, head and whole tensor of
// a transformer. Otherwise (odd lengths such as a 5 x 7 weight) the masked scalar fallback moves
// the same elements one at a time, with a bounds check each. Both paths put the same elements
// in the same slots, so they sum g^2 in the same order and give bitwise the same result.
//
// The choice is made per span at run time (uniform over the CUDA block, no divergence); the
// load/store routines take it as a compile-time flag so each path is straight-line code.
//
// [Note: alignment check of the emulator]
// A vector access at an address that is not a multiple of its size faults on the GPU; on the CPU
// of the host emulator (tests/gpu/host_emulator.cpp) a narrow one just works and a 16-byte one
// may or may not fault (as the host compiler chose the load), so a wrong choice of the fast path
// could pass CI. The emulator defines ADAM_MINI_ASSERT_ALIGNED(ptr) to abort at a misaligned
// access, naming the line (pytest -s shows it); here it is nothing (no code, no cost).
#ifndef ADAM_MINI_ASSERT_ALIGNED
#define ADAM_MINI_ASSERT_ALIGNED(ptr) ((void)0)
#endif

template <typename T, int N = 16 / static_cast<int>(sizeof(T))>
struct alignas(N * sizeof(T)) Chunk {
  static constexpr int kSize = N;  // elements per access: 16 bytes by default
  T val[N];
};

template <typename scalar_t>
constexpr int vec_width() {
  return Chunk<scalar_t>::kSize;
}

// The access that moves T elements of a fragment unit of kVec elements: 16 bytes, or the whole
// unit when it is narrower (int8 codes: 4 or 8 bytes, still one aligned access per unit).
template <typename T, int kVec>
using UnitChunk = Chunk<T, (16 / static_cast<int>(sizeof(T)) < kVec ? 16 / static_cast<int>(sizeof(T)) : kVec)>;

using Fragment = float[kElemsPerThread];

// Loads the thread's fragment of a span of `numel` elements at `base` (zeros past its end).
// kVec is the unit of the fragment layout; it is the storage dtype's vector width also when T is
// float (the per-element v of Adam tiles follows the layout of the 16-bit parameters).
template <int kVec, bool kVectorized, typename T>
__device__ __forceinline__ void load_fragment(Fragment& x, const T* __restrict__ base, int numel) {
  using Access = UnitChunk<T, kVec>;
  constexpr int kChunk = Access::kSize;
  static_assert(kElemsPerThread % kVec == 0 && kVec % kChunk == 0, "fragment layout");
#pragma unroll
  for (int i = 0; i < kElemsPerThread / kVec; ++i) {
    const int first = (i * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
    if constexpr (kVectorized) {
      if (first < numel) {  // numel is a multiple of kVec: the whole unit is in the span
#pragma unroll
        for (int c = 0; c < kVec / kChunk; ++c) {
          const Access* unit = reinterpret_cast<const Access*>(base + first) + c;
          ADAM_MINI_ASSERT_ALIGNED(unit);
          const Access raw = *unit;
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            x[i * kVec + c * kChunk + j] = static_cast<float>(raw.val[j]);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          x[i * kVec + j] = 0.f;
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int k = first + j;
        x[i * kVec + j] = k < numel ? static_cast<float>(base[k]) : 0.f;
      }
    }
  }
}

// [Note: stochastic rounding in the kernels]
// The hash and rounding of adam_mini_kernels/rounding.py, bit for bit: a store of element
// `index` (its position in the flat buffer) of a parameter with key `key` (the coefficient
// table's kRoundKey column, xored with kMomentStream for m) adds 16 random bits to the float32
// pattern and keeps its high half. Only bfloat16 stores round stochastically, and only when the
// launch asks for it; every other store rounds to nearest.
struct Rounding {
  bool stochastic = false;
  uint32_t key = 0;    // the parameter's key, salted for the stream (p or m)
  int64_t start = 0;  // flat index of the span's first element
};

// The rounding of m's stores, from p's: another stream of bits.
__device__ __forceinline__ Rounding moment_rounding(const Rounding& r) {
  return {r.stochastic, r.key ^ kMomentStream, r.start};
}

__device__ __forceinline__ uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixMul1;
  x ^= x >> 15;
  x *= kMixMul2;
  return x ^ (x >> 15);
}

// 16 random bits for flat element `index` under a (salted) key.
__device__ __forceinline__ uint32_t random_bits(uint32_t key, int64_t index) {
  const uint64_t u = static_cast<uint64_t>(index);
  const uint32_t lo = static_cast<uint32_t>(u);
  const uint32_t hi = static_cast<uint32_t>(u >> 32);
  return mix32(lo ^ (key + hi * kGolden)) >> 16;
}

template <typename T>
__device__ __forceinline__ T to_storage(float x, const Rounding& r, int64_t offset) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t raw = float_bits(x);
    if (r.stochastic && (raw & 0x7F800000u) != 0x7F800000u) {  // inf and NaN round to nearest
      const uint32_t bits = random_bits(r.key, r.start + offset);
      return c10::BFloat16(static_cast<uint16_t>((raw + bits) >> 16), c10::BFloat16::from_bits());
    }
  }
  return static_cast<T>(x);
}

// Stores the thread's fragment back (converted to T: round to nearest even, or as `r` says),
// inside the span only.
template <int kVec, bool kVectorized, typename T>
__device__ __forceinline__ void store_fragment(T* __restrict__ base, const Fragment& x, int numel,
                                               Rounding r = {}) {
  using Access = UnitChunk<T, kVec>;
  constexpr int kChunk = Access::kSize;
  static_assert(kElemsPerThread % kVec == 0 && kVec % kChunk == 0, "fragment layout");
#pragma unroll
  for (int i = 0; i < kElemsPerThread / kVec; ++i) {
    const int first = (i * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
    if constexpr (kVectorized) {
      if (first < numel) {
#pragma unroll
        for (int c = 0; c < kVec / kChunk; ++c) {
          Access raw;
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            raw.val[j] = to_storage<T>(x[i * kVec + c * kChunk + j], r, first + c * kChunk + j);
          }
          Access* unit = reinterpret_cast<Access*>(base + first) + c;
          ADAM_MINI_ASSERT_ALIGNED(unit);
          *unit = raw;
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int k = first + j;
        if (k < numel) {
          base[k] = to_storage<T>(x[i * kVec + j], r, k);
        }
      }
    }
  }
}

// [Note: NaN-propagating absmax]
// A NaN m (a NaN gradient in a step that neither AMP nor clipping skips) must make its chunk's
// scale NaN, as torch.amax does in the PyTorch backend, so that the chunk decodes to NaN as a
// float m stays NaN. fmaxf drops a NaN: the scale came out finite and the NaN element's code
// -127, a finite m made up from nothing. So the magnitudes are compared as the unsigned integers
// of their bit patterns, sign bit cleared: for non-negative floats these order as the floats do,
// and every NaN lies above +inf. An integer max is exact and order-free like a float max, at the
// same cost. The codes of a NaN or inf scale's chunk (m * 127 / scale is NaN or 0) are 0
// (quantize_fragment), as in quantization.quantize: they decode to NaN.
__device__ __forceinline__ uint32_t magnitude_bits(float x) {
  return float_bits(x) & 0x7FFFFFFFu;
}

__device__ __forceinline__ uint32_t max_bits(uint32_t a, uint32_t b) {
  return a > b ? a : b;
}

__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = max_bits(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// [Note: int8 first moment in the kernels]
// An int8 m (adam_mini_kernels/quantization.py, [Note: int8 first moment]) is held in the
// fragments as float32 like any m: load_span dequantizes the codes, code * scale / 127, and
// store_span requantizes: each kQBlock-element chunk's new absmax becomes its scale and the codes
// rint(m * 127 / scale), the format's own expressions, so the kernels write the codes the
// PyTorch backend computes from the same m. A span (a row or a tile) starts at a chunk boundary
// (launch_tables.py), so its CUDA block holds whole chunks, and `scales` points at the scale of
// its first chunk. In the fragment layout the 32 units of a warp in one slot are 32 * kVec
// consecutive elements (128 or 256), which lie in one chunk: each warp takes the absmax of its
// units with shuffles and puts it in shared memory, and after one barrier every thread reads
// its chunk's one or two warp maxima. A max is exact in any order, so this is deterministic.
// The codes move with the same aligned accesses as other storage, 4 or 8 bytes per unit.
template <int kVec>
__device__ __forceinline__ void dequantize_fragment(Fragment& m, const float* __restrict__ scales, int numel) {
#pragma unroll
  for (int i = 0; i < kElemsPerThread / kVec; ++i) {
    const int first = (i * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
    if (first < numel) {
      const float scale = scales[first / kQBlock];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        m[i * kVec + j] = m[i * kVec + j] * scale / kCodeMax;
      }
    }
  }
}

// Writes the scale of every chunk of the span and turns `m` into codes (float values in
// [-127, 127]). Every thread of the CUDA block must call it (it has a barrier).
template <int kVec>
__device__ __forceinline__ void quantize_fragment(Fragment& m, float* __restrict__ scales, int numel) {
  constexpr int kSlots = kElemsPerThread / kVec;
  constexpr int kWarpsPerChunk = kQBlock / (32 * kVec);
  static_assert(kQBlock % (32 * kVec) == 0, "a warp's units in one slot must lie in one chunk");
  __shared__ uint32_t warp_absmax[kSlots * (kRowMaxThreads / 32)];  // [slot][warp], magnitude_bits
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    uint32_t absmax = 0u;  // lanes past the span hold m = 0
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      absmax = max_bits(absmax, magnitude_bits(m[i * kVec + j]));
    }
    absmax = warp_max(absmax);
    if (threadIdx.x % 32 == 0) {
      warp_absmax[i * warps + warp] = absmax;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int first = (i * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
    const int chunk = first / kQBlock;
    uint32_t absmax = warp_absmax[chunk * kWarpsPerChunk];
#pragma unroll
    for (int k = 1; k < kWarpsPerChunk; ++k) {
      absmax = max_bits(absmax, warp_absmax[chunk * kWarpsPerChunk + k]);
    }
    float scale;
    memcpy(&scale, &absmax, sizeof(scale));
    if (first < numel && first % kQBlock == 0) {
      scales[chunk] = scale;
    }
    const float divisor = scale == 0.f ? 1.f : scale;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float code = rintf(m[i * kVec + j] * kCodeMax / divisor);
      m[i * kVec + j] = code == code ? fminf(fmaxf(code, -kCodeMax), kCodeMax) : 0.f;  // NaN: 0
    }
  }
}

// The g, m and p fragments of one span, through the path chosen for the span at run time. m may
// be stored wider than p and g (float32 state for 16-bit parameters) or as int8 codes with their
// `scales` (see [Note: int8 first moment in the kernels]; `scales` is unused otherwise): it follows
// the same fragment layout, in units of the parameter's vector width.
template <typename scalar_t, typename state_t>
__device__ __forceinline__ void load_span(Fragment& gf, Fragment& mf, Fragment& pf, const scalar_t* __restrict__ g,
                                          const state_t* __restrict__ m, const scalar_t* __restrict__ p,
                                          const float* __restrict__ scales, int numel, bool vectorized) {
  constexpr int kVec = vec_width<scalar_t>();
  if (vectorized) {
    load_fragment<kVec, true>(gf, g, numel);
    load_fragment<kVec, true>(mf, m, numel);
    load_fragment<kVec, true>(pf, p, numel);
  } else {
    load_fragment<kVec, false>(gf, g, numel);
    load_fragment<kVec, false>(mf, m, numel);
    load_fragment<kVec, false>(pf, p, numel);
  }
  if constexpr (std::is_same_v<state_t, int8_t>) {
    dequantize_fragment<kVec>(mf, scales, numel);
  }
}

// Stores the m and p fragments of one span, through the path it was loaded with; `r` is p's
// rounding (m's is the same with its stream's salt). An int8 m is requantized first (a barrier:
// every thread of the CUDA block calls this), and neither its codes nor its scales are written
// unless `m_changed` (the parameter had an update: [Note: idle int8 m] in
// adam_mini_kernels/quantization.py; one parameter's, so the same in the whole CUDA block).
template <typename scalar_t, typename state_t>
__device__ __forceinline__ void store_span(state_t* __restrict__ m, scalar_t* __restrict__ p, Fragment& mf,
                                           const Fragment& pf, float* __restrict__ scales, int numel,
                                           bool vectorized, bool m_changed, const Rounding& r) {
  constexpr int kVec = vec_width<scalar_t>();
  const bool store_m = !std::is_same_v<state_t, int8_t> || m_changed;
  if constexpr (std::is_same_v<state_t, int8_t>) {
    if (m_changed) {
      quantize_fragment<kVec>(mf, scales, numel);
    }
  }
  const Rounding rm = moment_rounding(r);
  if (vectorized) {
    if (store_m) {
      store_fragment<kVec, true>(m, mf, numel, rm);
    }
    store_fragment<kVec, true>(p, pf, numel, r);
  } else {
    if (store_m) {
      store_fragment<kVec, false>(m, mf, numel, rm);
    }
    store_fragment<kVec, false>(p, pf, numel, r);
  }
}

__device__ __forceinline__ float sum_of_squares(const Fragment& g) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    s += g[k] * g[k];
  }
  return s;
}

// [Note: deterministic reductions]
// No float atomics anywhere: every sum is taken in an order fixed by the launch tables and the
// launch configuration, so a step is bitwise reproducible run to run. Within a CUDA block: each
// thread adds its fragment in slot order, a warp adds its 32 values with a butterfly of
// __shfl_xor_sync, and warp 0 adds the per-warp sums in warp order from shared memory. A large
// block adds the sums of its tiles (phase 1 writes each tile's sum to its own slot of `partial`)
// with kReduceThreads threads taking slots t, t + kReduceThreads, ... in order, then the same
// block sum (into its slot of `sums`, which the step's all-reduce adds over ranks for a sharded group). The Triton backend adds in another (also fixed) order, so the two agree to float32
// rounding, not bitwise.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// The sum of `x` over the CUDA block, valid in thread 0. blockDim.x is a multiple of 32 (at most
// 1024); call once per kernel (`warp_sums` is not reused).
__device__ __forceinline__ float block_sum(float x, float* warp_sums) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  x = warp_sum(x);
  if (lane == 0) {
    warp_sums[warp] = x;
  }
  __syncthreads();
  float total = 0.f;
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.f;
    total = warp_sum(total);
  }
  return total;
}

// One parameter's row of the coefficient table (see [Note: coefficient table] in
// coefficients.py). Every thread of a CUDA block reads the same row: broadcast loads, cached.
struct Coefficients {
  float decay, step_size, bc2_sqrt, eps, beta2, v_weight, m_weight, grad_scale, clip;
  uint32_t round_key;
};

__device__ __forceinline__ Coefficients load_coefficients(const float* __restrict__ table, int64_t param) {
  const float* row = table + param * kNumCoefficients;
  return {row[kDecay],  row[kStepSize], row[kBc2Sqrt],   row[kEps], row[kBeta2], row[kVWeight], row[kMWeight],
          row[kGradScale], row[kClip], float_bits(row[kRoundKey])};
}

// The gradient unscaled, before clipping: times AMP's multiplier (1, 1 / AMP scale, or 0 for a
// parameter without an update this step). A select, not a product: an inf or NaN gradient of a
// skipped parameter must not reach any result. Block sums of squares are of this gradient; the
// update's is clipped after (see [Note: gradient multiplier] in adam_mini_kernels/coefficients.py).
__device__ __forceinline__ float unscaled_grad(float g, const Coefficients& c) {
  return c.grad_scale == 0.f ? 0.f : g * c.grad_scale;
}

__device__ __forceinline__ float clipped_grad(float g, const Coefficients& c) {
  return unscaled_grad(g, c) * c.clip;
}

// [Note: float32 math, IEEE sqrt and division]
// All arithmetic is float32, whatever the storage dtype, with correctly rounded sqrt and division
// (the extension is built without --use_fast_math, which would swap in approximate sqrt/division
// and flush denormals): results then differ from the PyTorch backend only by summation order and
// FMA contraction (setup.py pins nvcc's --fmad=true, as the Triton launches pin theirs). sqrt and
// division run once per block in the rows and tile kernels, and once per element only for Adam
// blocks, so exactness costs nothing measurable in these memory-bound kernels.

// v <- beta2 * v + (1 - beta2) * mean(g^2) for one block (mean 0 for an empty block), from the
// block's sum of squares of the unscaled gradient (the clip factor is applied to the sum twice:
// see [Note: gradient multiplier] in adam_mini_kernels/coefficients.py).
__device__ __forceinline__ float updated_v(float v, float sumsq, int64_t numel, const Coefficients& c) {
  sumsq = c.grad_scale == 0.f ? 0.f : sumsq * c.clip * c.clip;
  const float mean = sumsq / static_cast<float>(numel > 1 ? numel : 1);
  return v * c.beta2 + c.v_weight * mean;
}

// step_size / h with h = sqrt(v) / sqrt(1 - beta2^t) + eps. A parameter without a gradient this
// step has step size 0 and stays exactly still, even where h is 0 (eps = 0, v = 0).
__device__ __forceinline__ float step_scale(float v, const Coefficients& c) {
  if (c.step_size == 0.f) {
    return 0.f;
  }
  return c.step_size / (sqrtf(v) / c.bc2_sqrt + c.eps);
}

// m <- m + (1 - beta1) (g - m);  p <- p * decay - scale * m  (g already multiplied: clipped_grad).
__device__ __forceinline__ void update_element(float& p, float& m, float g, float scale, const Coefficients& c) {
  m = m + c.m_weight * (g - m);
  p = p * c.decay - scale * m;
}

// [Note: 64-bit offsets]
// A flat buffer may hold more than 2^31 elements: span starts, v indices, parameter and tile
// indices come from the int64 launch tables and every pointer is advanced by them in 64-bit
// arithmetic (`base + start`), table rows are addressed with int64(blockIdx.x) * columns. Indices
// inside a span (< kRowMax elements) are int.

// [Note: one CUDA block per row]
// A row class of the launch tables (rows of width/2 < numel <= width elements, width a power of
// two) runs with row_threads(width) threads per CUDA block (width / kElemsPerThread in whole
// warps, constants.h), so every element of a row sits in a register of its block: g, m and p are
// each read once and m, p written once (fp32: 20 bytes per parameter, the minimum), with one
// block-wide reduction between the read and the write. The loads of m and p are issued before
// the reduction so that they are in flight while the block waits on it. Thread 0 updates the
// row's v and broadcasts the step scale through shared memory.
template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kRowMaxThreads)
    rows_step_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, state_t* __restrict__ m,
                     float* __restrict__ m_scales, float* __restrict__ v, const float* __restrict__ coef,
                     const int64_t* __restrict__ rows, bool aligned_buffers, bool stochastic_rounding) {
  constexpr int kVec = vec_width<scalar_t>();
  const int64_t* row = rows + static_cast<int64_t>(blockIdx.x) * kRowCols;
  const int64_t start = row[kRowStart];
  const int numel = static_cast<int>(row[kRowNumel]);
  const int64_t v_index = row[kRowV];
  const Coefficients c = load_coefficients(coef, row[kRowParam]);
  CUDA_KERNEL_ASSERT(numel <= static_cast<int>(blockDim.x) * kElemsPerThread);
  p += start;
  g += start;
  m += start;
  if constexpr (std::is_same_v<state_t, int8_t>) {  // a float group's m_scales is empty (null)
    m_scales += row[kRowScale];
  }

  const bool vectorized = aligned_buffers && start % kVec == 0 && numel % kVec == 0;
  Fragment gf, mf, pf;
  load_span(gf, mf, pf, g, m, p, m_scales, numel, vectorized);
#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    gf[k] = unscaled_grad(gf[k], c);
  }

  __shared__ float warp_sums[32];
  __shared__ float row_scale;
  const float sumsq = block_sum(sum_of_squares(gf), warp_sums);
  if (threadIdx.x == 0) {
    const float new_v = updated_v(v[v_index], sumsq, numel, c);
    v[v_index] = new_v;
    row_scale = step_scale(new_v, c);
  }
  __syncthreads();
  const float scale = row_scale;

#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    update_element(pf[k], mf[k], gf[k] * c.clip, scale, c);
  }
  store_span(m, p, mf, pf, m_scales, numel, vectorized, c.m_weight != 0.f,
             Rounding{stochastic_rounding, c.round_key, start});
}

// Large blocks, phase 1: partial[tile] = sum of (g * inv_scale)^2 over the tile (AMP's 1 / scale:
// the sums come before the coefficient table; `inv_scale` null: 1).
template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads)
    tile_sumsq_kernel(const scalar_t* __restrict__ g, const float* __restrict__ inv_scale,
                      const int64_t* __restrict__ tiles, float* __restrict__ partial, bool aligned_buffers) {
  constexpr int kVec = vec_width<scalar_t>();
  const int64_t tile_id = blockIdx.x;
  const int64_t* tile = tiles + tile_id * kTileCols;
  const int64_t start = tile[kTileStart];
  const int numel = static_cast<int>(tile[kTileNumel]);
  CUDA_KERNEL_ASSERT(numel <= kTile);
  g += start;

  Fragment gf;
  if (aligned_buffers && start % kVec == 0 && numel % kVec == 0) {
    load_fragment<kVec, true>(gf, g, numel);
  } else {
    load_fragment<kVec, false>(gf, g, numel);
  }
  if (inv_scale != nullptr) {
    const float s = *inv_scale;
#pragma unroll
    for (int k = 0; k < kElemsPerThread; ++k) {
      gf[k] *= s;
    }
  }
  __shared__ float warp_sums[32];
  const float sumsq = block_sum(sum_of_squares(gf), warp_sums);
  if (threadIdx.x == 0) {
    partial[tile_id] = sumsq;
  }
}

// Large blocks, phase 2: add a block's tile sums in a fixed order into its slot of `sums`.
__global__ void __launch_bounds__(kReduceThreads)
    block_sumsq_kernel(const float* __restrict__ partial, const int64_t* __restrict__ blocks,
                       float* __restrict__ sums) {
  const int64_t* block = blocks + static_cast<int64_t>(blockIdx.x) * kLbCols;
  const int64_t first = block[kLbFirstTile];
  const int64_t num_tiles = block[kLbNumTiles];
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < num_tiles; k += blockDim.x) {
    acc += partial[first + k];
  }
  __shared__ float warp_sums[32];
  const float sumsq = block_sum(acc, warp_sums);
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = sumsq;
  }
}

// Large blocks, phase 3: each block's v from its sum of g^2 (over every rank for a block split
// across ranks), the mean over kLbNumel elements (the global block size).
__global__ void __launch_bounds__(kBlockVThreads)
    large_block_v_kernel(float* __restrict__ v, const float* __restrict__ coef, const float* __restrict__ sums,
                         const int64_t* __restrict__ blocks, int64_t num_blocks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_blocks) {
    return;
  }
  const int64_t* block = blocks + b * kLbCols;
  const Coefficients c = load_coefficients(coef, block[kLbParam]);
  const int64_t v_index = block[kLbV];
  v[v_index] = updated_v(v[v_index], sums[b], block[kLbNumel], c);
}

// Large blocks, phase 4: m and p of one tile, with its block's v (final after phase 3).
template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kTileThreads)
    tile_step_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, state_t* __restrict__ m,
                     float* __restrict__ m_scales, const float* __restrict__ v, const float* __restrict__ coef,
                     const int64_t* __restrict__ tiles, const int64_t* __restrict__ blocks, bool aligned_buffers,
                     bool stochastic_rounding) {
  constexpr int kVec = vec_width<scalar_t>();
  const int64_t* tile = tiles + static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t start = tile[kTileStart];
  const int numel = static_cast<int>(tile[kTileNumel]);
  const int64_t* block = blocks + tile[kTileBlock] * kLbCols;
  const Coefficients c = load_coefficients(coef, block[kLbParam]);
  const float scale = step_scale(v[block[kLbV]], c);
  CUDA_KERNEL_ASSERT(numel <= kTile);
  p += start;
  g += start;
  m += start;
  if constexpr (std::is_same_v<state_t, int8_t>) {
    m_scales += tile[kTileScale];
  }

  const bool vectorized = aligned_buffers && start % kVec == 0 && numel % kVec == 0;
  Fragment gf, mf, pf;
  load_span(gf, mf, pf, g, m, p, m_scales, numel, vectorized);
#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    update_element(pf[k], mf[k], clipped_grad(gf[k], c), scale, c);
  }
  store_span(m, p, mf, pf, m_scales, numel, vectorized, c.m_weight != 0.f,
             Rounding{stochastic_rounding, c.round_key, start});
}

// [Note: v of Adam tiles]
// An Adam tile's v values are consecutive float32s starting at an arbitrary index (the v offset
// of a bias is the number of blocks before it), so they take the 16-byte path only when that
// index is a multiple of 4 as well; otherwise they are moved one float at a time, within the
// same fragment layout as the parameter's elements. Adam blocks are a tiny share of a model's
// elements (biases), which is why this kernel is not tuned further.
template <typename scalar_t, typename state_t, bool kVectorized, bool kVectorizedV>
__device__ __forceinline__ void adam_tile(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                          state_t* __restrict__ m, float* __restrict__ v, int numel,
                                          const Coefficients& c, const Rounding& r) {
  constexpr int kVec = vec_width<scalar_t>();
  Fragment gf, mf, pf, vf;
  load_fragment<kVec, kVectorized>(gf, g, numel);
  load_fragment<kVec, kVectorized>(mf, m, numel);
  load_fragment<kVec, kVectorized>(pf, p, numel);
  load_fragment<kVec, kVectorizedV>(vf, v, numel);
#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    const float g = clipped_grad(gf[k], c);
    vf[k] = vf[k] * c.beta2 + c.v_weight * (g * g);
    update_element(pf[k], mf[k], g, step_scale(vf[k], c), c);
  }
  store_fragment<kVec, kVectorizedV>(v, vf, numel);
  store_fragment<kVec, kVectorized>(m, mf, numel, moment_rounding(r));
  store_fragment<kVec, kVectorized>(p, pf, numel, r);
}

// Adam blocks: one v per element, an Adam tile of consecutive elements of one parameter.
template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kAdamThreads)
    adam_step_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, state_t* __restrict__ m,
                     float* __restrict__ v, const float* __restrict__ coef, const int64_t* __restrict__ tiles,
                     bool aligned_buffers, bool aligned_v, bool stochastic_rounding) {
  constexpr int kVec = vec_width<scalar_t>();
  const int64_t* tile = tiles + static_cast<int64_t>(blockIdx.x) * kRowCols;
  const int64_t start = tile[kRowStart];
  const int numel = static_cast<int>(tile[kRowNumel]);
  const int64_t v_start = tile[kRowV];
  const Coefficients c = load_coefficients(coef, tile[kRowParam]);
  CUDA_KERNEL_ASSERT(numel <= kAdamTile);
  p += start;
  g += start;
  m += start;
  v += v_start;

  const bool vectorized = aligned_buffers && start % kVec == 0 && numel % kVec == 0;
  const Rounding r{stochastic_rounding, c.round_key, start};
  if (vectorized && aligned_v && v_start % Chunk<float>::kSize == 0) {
    adam_tile<scalar_t, state_t, true, true>(p, g, m, v, numel, c, r);
  } else if (vectorized) {
    adam_tile<scalar_t, state_t, true, false>(p, g, m, v, numel, c, r);
  } else {
    adam_tile<scalar_t, state_t, false, false>(p, g, m, v, numel, c, r);
  }
}

// [Note: coefficient kernel]
// The table of adam_mini_kernels/coefficients.py (step_coefficients), in one launch instead of
// about twenty small tensor ops: each thread advances one parameter's step counter (when it has a
// gradient this step and AMP found no inf) and writes its row, computed in float64 and rounded
// once to float32, as the Python function does (pow differs from the host's by at most an ulp of
// float64, which the rounding to float32 hides). `active`, `inv_scale` and `found_inf` may be
// null (every parameter active, no AMP), and `clip` (no clipping).
__global__ void __launch_bounds__(kCoefThreads)
    step_coefficients_kernel(int64_t* __restrict__ steps, const bool* __restrict__ active,
                             const double* __restrict__ hparams, float* __restrict__ coef,
                             const float* __restrict__ inv_scale, const float* __restrict__ found_inf,
                             const float* __restrict__ clip, int64_t num_params, uint32_t round_seed,
                             bool stochastic_rounding) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_params) {
    return;
  }
  bool on = active == nullptr || active[i];
  if (found_inf != nullptr) {
    on = on && *found_inf == 0.f;
  }
  const int64_t t = steps[i] + (on ? 1 : 0);
  steps[i] = t;
  const double* hp = hparams + i * kNumHparams;
  const double lr = hp[kHpLr], wd = hp[kHpWeightDecay], beta1 = hp[kHpBeta1], beta2 = hp[kHpBeta2];
  const double t_pos = static_cast<double>(t > 1 ? t : 1);  // t is 0 only for idle, never-stepped params
  float* row = coef + i * kNumCoefficients;
  // An idle parameter gets coefficients that leave it exactly as it is.
  row[kDecay] = on && wd > 0 ? static_cast<float>(1.0 - lr * wd) : 1.f;
  row[kStepSize] = on ? static_cast<float>(lr / (1.0 - pow(beta1, t_pos))) : 0.f;
  row[kBc2Sqrt] = on ? static_cast<float>(sqrt(1.0 - pow(beta2, t_pos))) : 1.f;
  row[kEps] = static_cast<float>(hp[kHpEps]);
  row[kBeta2] = on ? static_cast<float>(beta2) : 1.f;
  row[kVWeight] = on ? static_cast<float>(1.0 - beta2) : 0.f;
  row[kMWeight] = on ? static_cast<float>(1.0 - beta1) : 0.f;
  row[kGradScale] = on ? (inv_scale != nullptr ? *inv_scale : 1.f) : 0.f;
  row[kClip] = clip != nullptr ? *clip : 1.f;
  const uint32_t key = stochastic_rounding ? mix32(mix32(static_cast<uint32_t>(t)) + round_seed) : 0u;
  float key_bits;
  memcpy(&key_bits, &key, sizeof(key_bits));
  row[kRoundKey] = key_bits;
}

}  // namespace kernels
}  // namespace adam_mini
