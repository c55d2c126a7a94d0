#include "parallel.h"

#include <cstdlib>

namespace flashdelta::cpu {

int num_threads() {
  static const int count = [] {
    if (const char* env = std::getenv("FLASHDELTA_NUM_THREADS")) {
      const int n = std::atoi(env);
      if (n >= 1) return n;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }();
  return count;
}

}  // namespace flashdelta::cpu
