// The CPU workspace: a caching allocator for the tensors jacext's CPU kernels create (carries,
// temporaries, outputs, gradients).
//
// Why: a fresh tensor of more than a few hundred KiB comes from mmap, and every page of it is
// faulted in on first touch (more than the GEMM work per element of a width-256
// carry); when it is freed, glibc hands it back to the kernel, so the next training step
// pays again. The workspace keeps freed blocks and hands them out again by size, so a second
// identical step touches no new page. It never changes the process's malloc settings: only
// tensors that jacext allocates use it. CUDA needs none: torch's caching allocator does this.
//
// Freed blocks are kept up to a limit (default: 1/8 of physical memory, at most 4 GiB; see
// jacext.workspace in Python); beyond it they go back to the system. Small tensors (< 64 KiB),
// which malloc serves from its heap without page faults, are not cached.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace jacext {

// An uninitialized CPU tensor from the workspace (contiguous).
at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// {cached bytes (free, kept), bytes in use, limit, allocations served from the cache, allocations
// that needed new memory}.
std::vector<int64_t> workspace_stats();
void workspace_set_limit(int64_t bytes);
// Give every cached block back to the system.
void workspace_release();

}  // namespace jacext
