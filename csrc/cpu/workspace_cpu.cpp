// The CPU workspace (../workspace.h): freed blocks kept by size and handed out again, most
// recently freed first (the block most likely still in cache).
#include "../workspace.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>

namespace jacext {
namespace {

constexpr size_t kMinCachedBytes = size_t(64) << 10;  // smaller tensors: plain malloc
constexpr size_t kRounding = size_t(4) << 10;          // one page: sizes that differ by less share blocks

int64_t default_limit() {
  const int64_t physical = static_cast<int64_t>(sysconf(_SC_PAGE_SIZE)) * sysconf(_SC_PHYS_PAGES);
  return std::min<int64_t>(physical / 8, int64_t(4) << 30);
}

class WorkspaceAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t size = (nbytes + kRounding - 1) / kRounding * kRounding;
    void* data = take_cached(size);
    if (data == nullptr) {
      data = c10::alloc_cpu(size);
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[data] = size;
      in_use_ += size;
    }
    return {data, data, &WorkspaceAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &WorkspaceAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static WorkspaceAllocator& get() {
    static auto* instance = new WorkspaceAllocator();  // never destroyed: tensors may outlive exit
    return *instance;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(in_use_), limit_, hits_, misses_};
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked();
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t limit = limit_;
    limit_ = 0;
    trim_locked();
    limit_ = limit;
  }

 private:
  static void release(void* data) { get().give_back(data); }

  // A cached block of exactly `size` bytes (the most recently freed), or nullptr.
  void* take_cached(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) {
      ++misses_;
      return nullptr;
    }
    void* data = it->second.back();
    it->second.pop_back();
    cached_ -= size;
    in_use_ += size;
    ++hits_;
    return data;
  }

  void give_back(void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = sizes_.find(data);
    const size_t size = it->second;
    in_use_ -= size;
    if (static_cast<int64_t>(cached_ + size) > limit_) {
      sizes_.erase(it);
      c10::free_cpu(data);
      return;
    }
    free_[size].push_back(data);
    cached_ += size;
  }

  // Frees cached blocks, largest first, until the cache fits the limit.
  void trim_locked() {
    std::vector<size_t> sizes;
    for (const auto& entry : free_) sizes.push_back(entry.first);
    std::sort(sizes.rbegin(), sizes.rend());
    for (size_t size : sizes) {
      auto& blocks = free_[size];
      while (!blocks.empty() && static_cast<int64_t>(cached_) > limit_) {
        sizes_.erase(blocks.back());
        c10::free_cpu(blocks.back());
        blocks.pop_back();
        cached_ -= size;
      }
    }
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // block size -> free blocks (LIFO)
  std::unordered_map<void*, size_t> sizes_;              // every block this allocator owns
  size_t cached_ = 0, in_use_ = 0;
  int64_t limit_ = default_limit();
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &WorkspaceAllocator::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

std::vector<int64_t> workspace_stats() { return WorkspaceAllocator::get().stats(); }

void workspace_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "jacext: the workspace limit must be >= 0 bytes, got ", bytes);
  WorkspaceAllocator::get().set_limit(bytes);
}

void workspace_release() { WorkspaceAllocator::get().release_all(); }

}  // namespace jacext
