// A caching CPU allocator for PyTorch (longctx.cpu_cache): blocks of at least kMinBytes are kept when
// freed and handed out again for a request of the same size class, as PyTorch's CUDA caching allocator
// does on the GPU. Without it every tensor above glibc's mmap threshold (at most 32 MB) is a fresh mmap,
// and its first touch faults in and zeroes each 4 KB page: at 16,384 tokens and hidden size 768 every
// (n, hidden) activation is 50 MB, and the faults were a fifth of the fused attention core's time. A
// training step allocates the same sizes step after step, so the cache serves them without a fault.
//
// Size classes are the request rounded up to 64 KB (at most 64 KB wasted per block; a block serves exactly
// the sizes of its class, so there is no splitting). The cache never makes the process larger than its
// own peak use: a request that finds no free block of its class first gives back free blocks of other
// classes, least recently freed first, worth at least its size, so the bytes in use plus the bytes held
// free never exceed the most ever in use at once (a training step that repeats its sizes misses only in
// its first step). The bytes held free are also capped. Smaller requests go straight to c10's alloc_cpu /
// free_cpu, which is what the default allocator does.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kMinBytes = size_t{1} << 20;
constexpr size_t kClass = size_t{1} << 16;

struct CachingCPUAllocator final : c10::Allocator {
  using Lru = std::list<std::pair<void*, size_t>>;  // blocks held free, least recently freed first
  std::mutex mutex;
  Lru lru;
  std::unordered_map<size_t, std::vector<Lru::iterator>> free_blocks;  // size class -> its free blocks
  std::unordered_map<void*, size_t> in_use;                           // block -> its size class
  size_t cap = 0, cached = 0, peak_cached = 0, live = 0, peak_live = 0;
  int64_t hits = 0, misses = 0;

  static CachingCPUAllocator& get() {
    static auto* instance = new CachingCPUAllocator();  // never destroyed: blocks may outlive main()
    return *instance;
  }

  // unlink the free block at it (the caller holds the mutex and frees or reuses the block)
  void unlink(Lru::iterator it) {
    auto& v = free_blocks[it->second];
    v.erase(std::find(v.begin(), v.end(), it));
    cached -= it->second;
    lru.erase(it);
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = (n + kClass - 1) / kClass * kClass;
    void* p = nullptr;
    std::vector<void*> give_back;
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto fb = free_blocks.find(size);
      if (fb != free_blocks.end() && !fb->second.empty()) {
        const Lru::iterator it = fb->second.back();
        p = it->first;
        unlink(it);
        ++hits;
      } else {
        ++misses;
        // keep (in use + held free) within the peak use: give back at least `size` of other classes
        for (size_t freed = 0; freed < size && !lru.empty();) {
          const Lru::iterator it = lru.begin();
          give_back.push_back(it->first), freed += it->second;
          unlink(it);
        }
      }
    }
    for (void* q : give_back) c10::free_cpu(q);
    if (!p) p = c10::alloc_cpu(size);
    std::lock_guard<std::mutex> lock(mutex);
    in_use.emplace(p, size);
    live += size, peak_live = std::max(peak_live, live);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  static void release(void* p) {
    if (!p) return;
    auto& a = get();
    {
      std::lock_guard<std::mutex> lock(a.mutex);
      auto it = a.in_use.find(p);
      if (it != a.in_use.end()) {
        const size_t size = it->second;
        a.in_use.erase(it);
        a.live -= size;
        if (a.cached + size <= a.cap) {
          a.free_blocks[size].push_back(a.lru.insert(a.lru.end(), {p, size}));
          a.cached += size, a.peak_cached = std::max(a.peak_cached, a.cached);
          return;
        }
      }
    }
    c10::free_cpu(p);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // give every block held free back to the system
  void trim() {
    std::vector<void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (auto& kv : lru) blocks.push_back(kv.first);
      lru.clear(), free_blocks.clear();
      cached = 0;
    }
    for (void* p : blocks) c10::free_cpu(p);
  }
};

// Route PyTorch's CPU allocations through the cache, holding at most cap_bytes free (0: back to the
// default allocator; blocks handed out before still come back through release()).
void cpu_cache_enable(int64_t cap_bytes) {
  auto& a = CachingCPUAllocator::get();
  {
    std::lock_guard<std::mutex> lock(a.mutex);
    a.cap = cap_bytes > 0 ? static_cast<size_t>(cap_bytes) : 0;
  }
  if (cap_bytes > 0) {
    c10::SetCPUAllocator(&a, /*priority=*/1);
  } else {
    c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), /*priority=*/1);
    a.trim();
  }
}

// [cap, bytes held free, peak held free, bytes in use, peak in use, hits, misses, enabled]
std::vector<int64_t> cpu_cache_stats() {
  auto& a = CachingCPUAllocator::get();
  std::lock_guard<std::mutex> lock(a.mutex);
  const bool on = c10::GetCPUAllocator() == &a;
  return {static_cast<int64_t>(a.cap), static_cast<int64_t>(a.cached), static_cast<int64_t>(a.peak_cached),
          static_cast<int64_t>(a.live), static_cast<int64_t>(a.peak_live), a.hits, a.misses, on ? 1 : 0};
}

void cpu_cache_trim() { CachingCPUAllocator::get().trim(); }

}  // namespace

TORCH_LIBRARY(longctx_cpu_cache, m) {
  m.def("enable(int cap_bytes) -> ()", cpu_cache_enable);
  m.def("stats() -> int[]", cpu_cache_stats);
  m.def("trim() -> ()", cpu_cache_trim);
}
