// Launchers of the fused Adam-mini step (the CUDA backend): input checks, launch configuration,
// dtype dispatch. The kernels are in kernels.cuh.
//
// Same decomposition and math as the Triton backend (triton_kernels/kernels.py); the work comes
// from the launch tables of adam_mini_kernels/launch_tables.py, the scalar part of the step from
// the coefficient table of adam_mini_kernels/coefficients.py. Storage dtypes float, c10::BFloat16
// and c10::Half; all math in float32.
//
// This file includes no more of PyTorch than the launchers need (TensorBase, the stream and
// guard), which keeps its compile time low; the operator registration and the Python module live
// in bindings.cpp.

#include "adam_mini_step.h"

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "kernels.cuh"

namespace adam_mini {
namespace {

using namespace kernels;

// ---- launchers ---------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<parameter storage type>{}, TypeTag<state (m) storage type>{}) for the storage
// combinations there are: m in the parameters' dtype, float32 m for 16-bit parameters
// (state_dtype=torch.float32), or int8 codes (state_dtype=torch.int8). One instantiation of
// each kernel per combination, nothing else.
template <typename scalar_t, typename Fn>
void dispatch_state(at::ScalarType state_dtype, Fn&& fn) {
  if (state_dtype == at::kChar) {
    fn(TypeTag<scalar_t>{}, TypeTag<int8_t>{});
  } else if (std::is_same_v<scalar_t, float> || state_dtype != at::kFloat) {
    fn(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
  } else {
    fn(TypeTag<scalar_t>{}, TypeTag<float>{});
  }
}

template <typename Fn>
void dispatch_storage(const char* op, at::ScalarType dtype, at::ScalarType state_dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return dispatch_state<float>(state_dtype, fn);
    case at::kBFloat16:
      return dispatch_state<c10::BFloat16>(state_dtype, fn);
    case at::kHalf:
      return dispatch_state<c10::Half>(state_dtype, fn);
    default:
      TORCH_CHECK(false, "adam_mini_kernels::", op, ": unsupported parameter dtype ", dtype);
  }
}

bool aligned16(const at::TensorBase& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_on_device(const char* op, const char* name, const at::TensorBase& t, const at::TensorBase& p) {
  TORCH_CHECK(t.device() == p.device(), "adam_mini_kernels::", op, ": ", name, " is on ", t.device(),
              ", expected ", p.device(), " (the device of p)");
}

void check_contiguous(const char* op, const char* name, const at::TensorBase& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "adam_mini_kernels::", op, ": ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "adam_mini_kernels::", op, ": ", name, " must be contiguous");
}

// The flat buffers of a group: p, g, m (1-D, same length and storage dtype, or float32 m, or int8
// m for operators that take `m_scales`), v (float32), and the (P, kNumCoefficients) float32
// coefficient table, all on one CUDA device. `m_scales` (null for the Adam tiles, which never
// have an int8 m): float32, 1-D, the quantization scales of an int8 m, empty and unused
// otherwise; their count is the launch tables' business (trusted, see below).
void check_buffers(const char* op, const at::TensorBase& p, const at::TensorBase& g, const at::TensorBase& m,
                   const at::TensorBase* m_scales, const at::TensorBase& v, const at::TensorBase& coef) {
  const bool int8_m = m_scales != nullptr;
  TORCH_CHECK(p.is_cuda(), "adam_mini_kernels::", op, ": p must be a CUDA tensor, got one on ", p.device());
  const at::ScalarType dtype = p.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "adam_mini_kernels::", op,
              ": p must be float32, bfloat16 or float16, got ", dtype);
  const std::pair<const char*, const at::TensorBase*> state[] = {{"p", &p}, {"g", &g}, {"m", &m}};
  for (const auto& [name, t] : state) {
    check_on_device(op, name, *t, p);
    check_contiguous(op, name, *t, 1);
    const bool other_m = t == &m && (t->scalar_type() == at::kFloat || (int8_m && t->scalar_type() == at::kChar));
    TORCH_CHECK(t->scalar_type() == dtype || other_m, "adam_mini_kernels::", op, ": ", name, " has dtype ",
                t->scalar_type(), ", expected ", dtype, " (the dtype of p)",
                t == &m ? (int8_m ? ", float32 or int8" : " or float32") : "");
    TORCH_CHECK(t->numel() == p.numel(), "adam_mini_kernels::", op, ": ", name, " has ", t->numel(),
                " elements, p has ", p.numel());
  }
  check_on_device(op, "v", v, p);
  check_contiguous(op, "v", v, 1);
  TORCH_CHECK(v.scalar_type() == at::kFloat, "adam_mini_kernels::", op, ": v must be float32, got ",
              v.scalar_type());
  check_on_device(op, "coef", coef, p);
  check_contiguous(op, "coef", coef, 2);
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.size(1) == kNumCoefficients, "adam_mini_kernels::", op,
              ": coef must be a float32 (num_params, ", kNumCoefficients, ") table, got ", coef.scalar_type(),
              " of shape ", coef.sizes());
  if (m_scales != nullptr) {
    check_on_device(op, "m_scales", *m_scales, p);
    check_contiguous(op, "m_scales", *m_scales, 1);
    TORCH_CHECK(m_scales->scalar_type() == at::kFloat, "adam_mini_kernels::", op, ": m_scales must be float32, got ",
                m_scales->scalar_type());
    TORCH_CHECK(m.scalar_type() != at::kChar || m_scales->numel() > 0, "adam_mini_kernels::", op,
                ": int8 m needs its quantization scales, m_scales is empty");
  }
}

// Stochastic rounding writes bfloat16 only (see [Note: stochastic rounding in the kernels]).
void check_rounding(const char* op, bool stochastic_rounding, const at::TensorBase& p) {
  TORCH_CHECK(!stochastic_rounding || p.scalar_type() == at::kBFloat16, "adam_mini_kernels::", op,
              ": stochastic_rounding needs bfloat16 p, got ", p.scalar_type());
}

// A launch table: int64 (rows, cols), contiguous, on p's device, at most one grid's worth of rows.
void check_table(const char* op, const char* name, const at::TensorBase& t, int64_t cols, const at::TensorBase& p) {
  check_on_device(op, name, t, p);
  check_contiguous(op, name, t, 2);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.size(1) == cols, "adam_mini_kernels::", op, ": ", name,
              " must be an int64 (n, ", cols, ") launch table, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.size(0) <= INT_MAX, "adam_mini_kernels::", op, ": ", name, " has ", t.size(0),
              " rows, more than one launch can take (", INT_MAX, ")");
}

}  // namespace

// The launch tables themselves are trusted (built by launch_tables.py): checking their contents
// would need a device-to-host copy, a sync, every step. A row longer than its kernel's span trips
// a device-side assertion instead of writing out of bounds.

void rows_step(const at::TensorBase& p, const at::TensorBase& g, const at::TensorBase& m,
               const at::TensorBase& m_scales, const at::TensorBase& v, const at::TensorBase& coef,
               const at::TensorBase& rows, int64_t width, bool stochastic_rounding) {
  constexpr const char* op = "rows_step";
  check_buffers(op, p, g, m, &m_scales, v, coef);
  check_rounding(op, stochastic_rounding, p);
  check_table(op, "rows", rows, kRowCols, p);
  TORCH_CHECK(width >= 1 && width <= kRowMax, "adam_mini_kernels::", op, ": width must be in [1, ", kRowMax,
              "], got ", width);
  const int64_t num_rows = rows.size(0);
  if (num_rows == 0) {
    return;
  }
  const int threads = row_threads(width);
  const bool aligned = aligned16(p) && aligned16(g) && aligned16(m);
  const c10::cuda::CUDAGuard guard(p.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(op, p.scalar_type(), m.scalar_type(), [&](auto tag, auto state_tag) {
    using scalar_t = typename decltype(tag)::type;
    using state_t = typename decltype(state_tag)::type;
    rows_step_kernel<scalar_t, state_t><<<static_cast<unsigned>(num_rows), threads, 0, stream>>>(
        static_cast<scalar_t*>(p.data_ptr()), static_cast<const scalar_t*>(g.data_ptr()),
        static_cast<state_t*>(m.data_ptr()), static_cast<float*>(m_scales.data_ptr()), static_cast<float*>(v.data_ptr()),
        static_cast<const float*>(coef.data_ptr()), static_cast<const int64_t*>(rows.data_ptr()), aligned,
        stochastic_rounding);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// An optional one-element float32 factor (AMP's, clipping's) on `like`'s device.
void check_scalar(const char* op, const char* name, const at::TensorBase* t, const at::TensorBase& like) {
  if (t != nullptr) {
    check_on_device(op, name, *t, like);
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, "adam_mini_kernels::", op, ": ", name,
                " must be a one-element float32 tensor");
  }
}

// A float32 scratch vector with one slot per row of `table` ("tile" or "block").
void check_sums(const char* op, const char* name, const at::TensorBase& sums, const at::TensorBase& table,
                const char* what) {
  check_on_device(op, name, sums, table);
  check_contiguous(op, name, sums, 1);
  TORCH_CHECK(sums.scalar_type() == at::kFloat && sums.numel() >= table.size(0), "adam_mini_kernels::", op, ": ",
              name, " must be float32 with one slot per ", what, " (", table.size(0), "), got ", sums.scalar_type(),
              " of shape ", sums.sizes());
}

void large_blocks_sumsq(const at::TensorBase& g, const at::TensorBase* inv_scale, const at::TensorBase& tiles,
                        const at::TensorBase& blocks, const at::TensorBase& partial, const at::TensorBase& block_sums) {
  constexpr const char* op = "large_blocks_sumsq";
  TORCH_CHECK(g.is_cuda(), "adam_mini_kernels::", op, ": g must be a CUDA tensor, got one on ", g.device());
  check_contiguous(op, "g", g, 1);
  check_scalar(op, "inv_scale", inv_scale, g);
  check_table(op, "tiles", tiles, kTileCols, g);
  check_table(op, "blocks", blocks, kLbCols, g);
  check_sums(op, "partial", partial, tiles, "tile");
  check_sums(op, "block_sums", block_sums, blocks, "block");
  const int64_t num_tiles = tiles.size(0);
  const int64_t num_blocks = blocks.size(0);
  // Blocks without tiles (none in the tables built today) still get their sum written: 0.
  if (num_blocks == 0) {
    return;
  }
  const bool aligned = aligned16(g);
  const c10::cuda::CUDAGuard guard(g.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* partial_ptr = static_cast<float*>(partial.data_ptr());
  if (num_tiles > 0) {
    dispatch_storage(op, g.scalar_type(), g.scalar_type(), [&](auto tag, auto) {
      using scalar_t = typename decltype(tag)::type;
      tile_sumsq_kernel<scalar_t><<<static_cast<unsigned>(num_tiles), kTileThreads, 0, stream>>>(
          static_cast<const scalar_t*>(g.data_ptr()),
          inv_scale ? static_cast<const float*>(inv_scale->data_ptr()) : nullptr,
          static_cast<const int64_t*>(tiles.data_ptr()), partial_ptr, aligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  block_sumsq_kernel<<<static_cast<unsigned>(num_blocks), kReduceThreads, 0, stream>>>(
      partial_ptr, static_cast<const int64_t*>(blocks.data_ptr()), static_cast<float*>(block_sums.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void large_blocks_update(const at::TensorBase& p, const at::TensorBase& g, const at::TensorBase& m,
                         const at::TensorBase& m_scales, const at::TensorBase& v, const at::TensorBase& coef,
                         const at::TensorBase& tiles, const at::TensorBase& blocks, const at::TensorBase& block_sums,
                         bool stochastic_rounding) {
  constexpr const char* op = "large_blocks_update";
  check_buffers(op, p, g, m, &m_scales, v, coef);
  check_rounding(op, stochastic_rounding, p);
  check_table(op, "tiles", tiles, kTileCols, p);
  check_table(op, "blocks", blocks, kLbCols, p);
  check_sums(op, "block_sums", block_sums, blocks, "block");
  const int64_t num_tiles = tiles.size(0);
  const int64_t num_blocks = blocks.size(0);
  if (num_blocks == 0) {  // blocks without tiles still get their v updated
    return;
  }
  const bool aligned = aligned16(p) && aligned16(g) && aligned16(m);
  const c10::cuda::CUDAGuard guard(p.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* blocks_ptr = static_cast<const int64_t*>(blocks.data_ptr());
  auto* v_ptr = static_cast<float*>(v.data_ptr());
  auto* coef_ptr = static_cast<const float*>(coef.data_ptr());
  const unsigned v_blocks = static_cast<unsigned>((num_blocks + kBlockVThreads - 1) / kBlockVThreads);
  large_block_v_kernel<<<v_blocks, kBlockVThreads, 0, stream>>>(
      v_ptr, coef_ptr, static_cast<const float*>(block_sums.data_ptr()), blocks_ptr, num_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_tiles == 0) {
    return;
  }
  dispatch_storage(op, p.scalar_type(), m.scalar_type(), [&](auto tag, auto state_tag) {
    using scalar_t = typename decltype(tag)::type;
    using state_t = typename decltype(state_tag)::type;
    tile_step_kernel<scalar_t, state_t><<<static_cast<unsigned>(num_tiles), kTileThreads, 0, stream>>>(
        static_cast<scalar_t*>(p.data_ptr()), static_cast<const scalar_t*>(g.data_ptr()),
        static_cast<state_t*>(m.data_ptr()), static_cast<float*>(m_scales.data_ptr()), v_ptr, coef_ptr,
        static_cast<const int64_t*>(tiles.data_ptr()), blocks_ptr, aligned, stochastic_rounding);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void adam_step(const at::TensorBase& p, const at::TensorBase& g, const at::TensorBase& m, const at::TensorBase& v,
               const at::TensorBase& coef, const at::TensorBase& tiles, bool stochastic_rounding) {
  constexpr const char* op = "adam_step";
  check_buffers(op, p, g, m, /*m_scales=*/nullptr, v, coef);  // Adam blocks never have an int8 m
  check_rounding(op, stochastic_rounding, p);
  check_table(op, "tiles", tiles, kRowCols, p);
  const int64_t num_tiles = tiles.size(0);
  if (num_tiles == 0) {
    return;
  }
  const bool aligned = aligned16(p) && aligned16(g) && aligned16(m);
  const c10::cuda::CUDAGuard guard(p.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(op, p.scalar_type(), m.scalar_type(), [&](auto tag, auto state_tag) {
    using scalar_t = typename decltype(tag)::type;
    using state_t = typename decltype(state_tag)::type;
    if constexpr (std::is_same_v<state_t, int8_t>) {
      return;  // refused by check_buffers; no int8 instantiation of the Adam kernel
    } else {
      adam_step_kernel<scalar_t, state_t><<<static_cast<unsigned>(num_tiles), kAdamThreads, 0, stream>>>(
          static_cast<scalar_t*>(p.data_ptr()), static_cast<const scalar_t*>(g.data_ptr()),
          static_cast<state_t*>(m.data_ptr()), static_cast<float*>(v.data_ptr()),
          static_cast<const float*>(coef.data_ptr()), static_cast<const int64_t*>(tiles.data_ptr()), aligned,
          aligned16(v), stochastic_rounding);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void step_coefficients(const at::TensorBase& steps, const at::TensorBase& hparams, const at::TensorBase& coef,
                       const at::TensorBase* active, const at::TensorBase* inv_scale,
                       const at::TensorBase* found_inf, const at::TensorBase* clip, int64_t round_seed,
                       bool stochastic_rounding) {
  constexpr const char* op = "step_coefficients";
  TORCH_CHECK(steps.is_cuda(), "adam_mini_kernels::", op, ": steps must be a CUDA tensor, got one on ", steps.device());
  check_contiguous(op, "steps", steps, 1);
  TORCH_CHECK(steps.scalar_type() == at::kLong, "adam_mini_kernels::", op, ": steps must be int64, got ",
              steps.scalar_type());
  const int64_t n = steps.size(0);
  check_on_device(op, "hparams", hparams, steps);
  check_contiguous(op, "hparams", hparams, 2);
  TORCH_CHECK(hparams.scalar_type() == at::kDouble && hparams.size(0) == n && hparams.size(1) == kNumHparams,
              "adam_mini_kernels::", op, ": hparams must be a float64 (", n, ", ", kNumHparams, ") table, got ",
              hparams.scalar_type(), " of shape ", hparams.sizes());
  check_on_device(op, "coef", coef, steps);
  check_contiguous(op, "coef", coef, 2);
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.size(0) == n && coef.size(1) == kNumCoefficients,
              "adam_mini_kernels::", op, ": coef must be a float32 (", n, ", ", kNumCoefficients, ") table, got ",
              coef.scalar_type(), " of shape ", coef.sizes());
  if (active != nullptr) {
    check_on_device(op, "active", *active, steps);
    check_contiguous(op, "active", *active, 1);
    TORCH_CHECK(active->scalar_type() == at::kBool && active->size(0) == n, "adam_mini_kernels::", op,
                ": active must be a bool tensor of ", n, " flags");
  }
  check_scalar(op, "inv_scale", inv_scale, steps);
  check_scalar(op, "found_inf", found_inf, steps);
  check_scalar(op, "clip", clip, steps);
  // The bound of rounding.SEED_BOUND: the Triton launch passes the seed as an int32.
  TORCH_CHECK(round_seed >= 0 && round_seed < (int64_t{1} << 31), "adam_mini_kernels::", op,
              ": round_seed must be in [0, 2^31), got ", round_seed);
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(steps.device());
  const unsigned blocks = static_cast<unsigned>((n + kCoefThreads - 1) / kCoefThreads);
  step_coefficients_kernel<<<blocks, kCoefThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<int64_t*>(steps.data_ptr()), active ? static_cast<const bool*>(active->data_ptr()) : nullptr,
      static_cast<const double*>(hparams.data_ptr()), static_cast<float*>(coef.data_ptr()),
      inv_scale ? static_cast<const float*>(inv_scale->data_ptr()) : nullptr,
      found_inf ? static_cast<const float*>(found_inf->data_ptr()) : nullptr,
      clip ? static_cast<const float*>(clip->data_ptr()) : nullptr, n, static_cast<uint32_t>(round_seed),
      stochastic_rounding);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [Note: kernel images]
// The extension holds machine code for the archs of TORCH_CUDA_ARCH_LIST at build time (and PTX
// for the last, which the driver compiles for newer GPUs). On a GPU outside that set every launch
// fails with "no kernel image"; asking the runtime for a kernel's attributes loads its image for
// the device, so the backend's availability check can say so before the first step. All kernels
// are compiled for the same archs: one of them answers for all.
bool has_kernel_image(int64_t device_index) {
  TORCH_CHECK(device_index >= 0, "adam_mini_kernels: has_kernel_image needs a device index, got ", device_index);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, step_coefficients_kernel);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // not sticky: clear it so that the next launch check does not report it
    return false;
  }
  C10_CUDA_CHECK(status);
  return true;
}

}  // namespace adam_mini
