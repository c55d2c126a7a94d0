// Cached per-device properties for the CUDA backend (see device_info.cuh for what and why).
// One slot per device index, each filled once under std::call_once.
#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda_check.cuh"
#include "device_info.cuh"

namespace flashdelta::detail::cuda {
namespace {

constexpr int kMaxDevices = 64;

struct Slot {
  std::once_flag once;
  DeviceInfo info;
};

std::array<Slot, kMaxDevices>& slots() {
  static std::array<Slot, kMaxDevices> table;
  return table;
}

}  // namespace

const DeviceInfo& device_info(int device) {
  if (device < 0) FLASHDELTA_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kMaxDevices) {
    throw Error(Error::Kind::kRuntime, "flashdelta: CUDA device index " +
                                           std::to_string(device) + " above the supported " +
                                           std::to_string(kMaxDevices));
  }
  Slot& slot = slots()[device];
  // A throw inside call_once leaves the flag unset, so a failed query is retried next time.
  std::call_once(slot.once, [&] {
    DeviceInfo info;
    info.device = device;
    const auto get = [device](int* value, cudaDeviceAttr attribute) {
      FLASHDELTA_CUDA_CHECK(cudaDeviceGetAttribute(value, attribute, device));
    };
    get(&info.major, cudaDevAttrComputeCapabilityMajor);
    get(&info.minor, cudaDevAttrComputeCapabilityMinor);
    get(&info.sm_count, cudaDevAttrMultiProcessorCount);
    get(&info.max_smem_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin);
    get(&info.max_smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor);
    get(&info.l2_bytes, cudaDevAttrL2CacheSize);
    info.is_sm90 = info.major == 9 && info.minor == 0;
    slot.info = info;
  });
  return slot.info;
}

long long resident_blocks(const void* kernel, int threads, size_t smem, int device) {
  if (device < 0) FLASHDELTA_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, long long> cache;
  const auto key = std::make_tuple(kernel, threads, smem, device);
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  int per_sm = 0;
  FLASHDELTA_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const long long blocks =
      static_cast<long long>(std::max(per_sm, 1)) * device_info(device).sm_count;
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, blocks);
  return blocks;
}

}  // namespace flashdelta::detail::cuda
