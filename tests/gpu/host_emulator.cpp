// CPU emulation of the CUDA kernels of csrc/kernels.cuh, so that CI (no GPU) runs the very code
// the GPU runs: indexing, masks, the aligned and scalar paths, the block reductions.
//
// [Note: host emulation]
// kernels.cuh is compiled here by the host compiler, with the CUDA built-ins replaced:
//   * a launch of B threads per block runs B fibers (ucontext coroutines) on the calling thread,
//     each looping over the grid's blocks in order; a barrier at the end of every block lets the
//     next one reuse the "shared" memory. A scheduler resumes the fibers round-robin: a fiber runs
//     until it waits at a barrier, so a barrier costs two context switches per thread, not the
//     wake-up of B OS threads (which, on a 2-core CI machine running two ranks, was most of the
//     time of the emulated tests);
//   * __shared__ variables become function statics, shared by the fibers of the (one) running
//     block; __syncthreads() is a barrier over them;
//   * __shfl_xor_sync exchanges values through a per-warp array between two warp barriers;
//   * threadIdx / blockIdx / blockDim are set by the scheduler before it resumes a fiber.
// Everything else (the fragment layout, 16-byte Chunk loads, c10::BFloat16 / c10::Half rounding,
// float32 math) is the kernels' own code. What it cannot show: timing, memory-model subtleties
// and races (the interleaving is fixed: fibers switch only at barriers), the compiled SASS,
// nvcc's FMA contraction (results can differ from the GPU in the last bit). A barrier that some
// threads never reach (divergent __syncthreads) aborts with a message instead of hanging.
// tests/test_cuda_backend.py builds it with g++ and calls it through ctypes.
//
// C interface: dtype 0 = float, 1 = bfloat16, 2 = float16 (the parameters'), plus kWideState (8)
// when m is float32 for 16-bit parameters or kInt8State (16) when m is int8 codes (with the
// pointer to their scales); pointers to the flat buffers and the
// launch tables of one group and the flags (as the launchers in csrc/adam_mini_step.cu receive
// them); the return value counts failed CUDA_KERNEL_ASSERTs.

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local EmulatedDim3 threadIdx, blockIdx, blockDim;

namespace emulation {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; the kernels keep small register arrays

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  unsigned thread = 0;
  unsigned block = 0;
  bool done = false;
};

// The scheduler's state, per OS thread (each calling thread runs its own launches).
thread_local ucontext_t scheduler;
thread_local std::vector<std::unique_ptr<Fiber>> fibers;
thread_local Fiber* current = nullptr;
thread_local std::function<void()> body;  // what every fiber of the launch runs
thread_local uint64_t progress = 0;       // barrier arrivals and finished fibers

inline void yield() {
  swapcontext(&current->context, &scheduler);
}

struct Barrier {
  explicit Barrier(int expected) : expected(expected) {}
  void arrive_and_wait() {
    ++progress;
    const uint64_t generation_now = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == generation_now) {
      yield();
    }
  }
  int expected;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Warp {
  Barrier barrier{32};
  uint32_t values[32];  // each lane's 32 bits in a shuffle
};

thread_local Barrier* block_barrier = nullptr;
thread_local std::vector<std::unique_ptr<Warp>> warps;
thread_local int assert_failures = 0;

void fiber_main() {
  body();
  current->done = true;
  ++progress;
}  // returns to the scheduler (uc_link)

// Runs `threads` fibers of `body` to completion, round-robin.
inline void run_fibers(int threads) {
  while (fibers.size() < static_cast<size_t>(threads)) {
    fibers.push_back(std::make_unique<Fiber>());
  }
  for (int t = 0; t < threads; ++t) {
    Fiber& f = *fibers[t];
    f.thread = static_cast<unsigned>(t);
    f.block = 0;
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  int remaining = threads;
  while (remaining > 0) {
    const uint64_t before = progress;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = *fibers[t];
      if (f.done) {
        continue;
      }
      current = &f;
      threadIdx.x = f.thread;
      blockIdx.x = f.block;
      blockDim.x = static_cast<unsigned>(threads);
      swapcontext(&scheduler, &f.context);
      remaining -= f.done ? 1 : 0;
    }
    if (remaining > 0 && progress == before) {
      std::fprintf(stderr, "host emulator: a barrier that not every thread of the block reaches\n");
      std::abort();
    }
  }
}

}  // namespace emulation

inline void __syncthreads() {
  emulation::block_barrier->arrive_and_wait();
}

template <typename T>  // float or uint32_t: 32 bits moved as they are (a NaN keeps its payload)
inline T __shfl_xor_sync(unsigned /*mask: always the full warp here*/, T x, int offset) {
  static_assert(sizeof(T) == sizeof(uint32_t), "a lane exchanges 32 bits");
  emulation::Warp& warp = *emulation::warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&warp.values[lane], &x, sizeof(x));
  warp.barrier.arrive_and_wait();
  T other;
  std::memcpy(&other, &warp.values[lane ^ static_cast<unsigned>(offset)], sizeof(other));
  warp.barrier.arrive_and_wait();
  return other;
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#include <c10/macros/Macros.h>
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)          \
  do {                                    \
    if (!(cond)) {                        \
      emulation::assert_failures += 1;    \
    }                                     \
  } while (0)

// [Note: alignment check of the emulator] in kernels.cuh: a misaligned vector access, which would
// fault on the GPU, aborts here with the line, before the access (the host compiler may make a
// 16-byte one an aligned SSE load, which would fault without saying where; a narrower one would
// just work).
#define ADAM_MINI_ASSERT_ALIGNED(ptr)                                                                  \
  do {                                                                                                 \
    constexpr std::uintptr_t kAlign = alignof(std::remove_reference_t<decltype(*(ptr))>);              \
    if (reinterpret_cast<std::uintptr_t>(ptr) % kAlign != 0) {                                         \
      std::fprintf(stderr, "emulated kernel: misaligned %zu-byte access at kernels.cuh:%d (faults on a GPU)\n", \
                   static_cast<size_t>(kAlign), __LINE__);                                             \
      std::abort();                                                                                    \
    }                                                                                                  \
  } while (0)

#include "../../csrc/kernels.cuh"

namespace {

using namespace adam_mini;
using namespace adam_mini::kernels;

template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), int64_t grid, int threads, Args... args) {
  if (grid == 0) {
    return 0;
  }
  emulation::assert_failures = 0;
  emulation::Barrier block_barrier(threads);
  emulation::block_barrier = &block_barrier;
  emulation::warps.clear();
  for (int w = 0; w < threads / 32; ++w) {
    emulation::warps.push_back(std::make_unique<emulation::Warp>());
  }
  emulation::body = [=, &block_barrier] {
    for (int64_t b = 0; b < grid; ++b) {
      blockIdx.x = emulation::current->block = static_cast<unsigned>(b);
      kernel(static_cast<Params>(args)...);
      block_barrier.arrive_and_wait();  // the block is done: the next may reuse shared memory
    }
  };
  emulation::run_fibers(threads);
  return emulation::assert_failures;
}

constexpr int kWideState = 8;
constexpr int kInt8State = 16;

// Calls fn(parameter storage value, state storage value) for the dtype code.
template <typename Fn>
int dispatch(int dtype, Fn&& fn) {
  switch (dtype) {
    case 0 + kInt8State:
      return fn(float{}, int8_t{});
    case 1 + kInt8State:
      return fn(c10::BFloat16{}, int8_t{});
    case 2 + kInt8State:
      return fn(c10::Half{}, int8_t{});
    case 0:
      return fn(float{}, float{});
    case 1:
      return fn(c10::BFloat16{}, c10::BFloat16{});
    case 2:
      return fn(c10::Half{}, c10::Half{});
    case 1 + kWideState:
      return fn(c10::BFloat16{}, float{});
    case 2 + kWideState:
      return fn(c10::Half{}, float{});
    default:
      return -1;
  }
}

}  // namespace

extern "C" {

int emulate_rows_step(int dtype, void* p, const void* g, void* m, float* m_scales, float* v, const float* coef,
                      const int64_t* rows, int64_t num_rows, int64_t width, int aligned, int stochastic) {
  return dispatch(dtype, [&](auto tag, auto state_tag) {
    using scalar_t = decltype(tag);
    using state_t = decltype(state_tag);
    return launch(&rows_step_kernel<scalar_t, state_t>, num_rows, row_threads(width), static_cast<scalar_t*>(p),
                  static_cast<const scalar_t*>(g), static_cast<state_t*>(m), m_scales, v, coef, rows, aligned != 0,
                  stochastic != 0);
  });
}

int emulate_large_blocks_sumsq(int dtype, const void* g, const float* inv_scale, const int64_t* tiles,
                               int64_t num_tiles, const int64_t* blocks, int64_t num_blocks, float* partial,
                               float* block_sums, int aligned) {
  return dispatch(dtype, [&](auto tag, auto) {
    using scalar_t = decltype(tag);
    return launch(&tile_sumsq_kernel<scalar_t>, num_tiles, kTileThreads, static_cast<const scalar_t*>(g), inv_scale,
                  tiles, partial, aligned != 0) +
           launch(&block_sumsq_kernel, num_blocks, kReduceThreads, static_cast<const float*>(partial), blocks,
                  block_sums);
  });
}

int emulate_large_blocks_update(int dtype, void* p, const void* g, void* m, float* m_scales, float* v,
                                const float* coef, const int64_t* tiles, int64_t num_tiles, const int64_t* blocks,
                                int64_t num_blocks, const float* block_sums, int aligned, int stochastic) {
  return dispatch(dtype, [&](auto tag, auto state_tag) {
    using scalar_t = decltype(tag);
    using state_t = decltype(state_tag);
    const int64_t v_grid = (num_blocks + kBlockVThreads - 1) / kBlockVThreads;
    int failures = launch(&large_block_v_kernel, v_grid, kBlockVThreads, v, coef, block_sums, blocks, num_blocks);
    failures += launch(&tile_step_kernel<scalar_t, state_t>, num_tiles, kTileThreads, static_cast<scalar_t*>(p),
                       static_cast<const scalar_t*>(g), static_cast<state_t*>(m), m_scales,
                       static_cast<const float*>(v), coef, tiles, blocks, aligned != 0, stochastic != 0);
    return failures;
  });
}

int emulate_adam_step(int dtype, void* p, const void* g, void* m, float* v, const float* coef, const int64_t* tiles,
                      int64_t num_tiles, int aligned, int aligned_v, int stochastic) {
  return dispatch(dtype, [&](auto tag, auto state_tag) {
    using scalar_t = decltype(tag);
    using state_t = decltype(state_tag);
    if constexpr (std::is_same_v<state_t, int8_t>) {
      return -1;  // Adam blocks never have an int8 m (the launcher refuses it)
    } else {
      return launch(&adam_step_kernel<scalar_t, state_t>, num_tiles, kAdamThreads, static_cast<scalar_t*>(p),
                    static_cast<const scalar_t*>(g), static_cast<state_t*>(m), v, coef, tiles, aligned != 0,
                    aligned_v != 0, stochastic != 0);
    }
  });
}

int emulate_step_coefficients(int64_t* steps, const bool* active, const double* hparams, float* coef,
                              const float* inv_scale, const float* found_inf, const float* clip, int64_t num_params,
                              uint32_t round_seed, int stochastic) {
  const int64_t grid = (num_params + kCoefThreads - 1) / kCoefThreads;
  return launch(&step_coefficients_kernel, grid, kCoefThreads, steps, active, hparams, coef, inv_scale, found_inf,
                clip, num_params, round_seed, stochastic != 0);
}

// The 16 random bits of stochastic rounding for one (salted key, flat index): lets tests check the
// hash at indices beyond 2^32, which no CPU test buffer reaches.
uint32_t emulate_random_bits(uint32_t key, int64_t index) {
  return random_bits(key, index);
}

}  // extern "C"
