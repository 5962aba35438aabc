// Picks the kernel table at import: the best ISA this CPU supports among those compiled in, unless
// FASTNN_CPU_ISA asks for another. Compiled for the baseline ISA (no -mavx*): it must run everywhere.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernels.h"

namespace fastnn::cpu {

namespace {

struct IsaEntry {
  const char* name;
  const KernelTable& (*table)();
  bool (*supported)();
};

bool always() { return true; }
#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
bool has_avx512bf16() {
  __builtin_cpu_init();
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#endif

// Ordered from the baseline up.
const IsaEntry kIsas[] = {
    {"generic", generic::kernel_table, always},
#ifdef FASTNN_HAVE_avx2
    {"avx2", avx2::kernel_table, has_avx2},
#endif
#ifdef FASTNN_HAVE_avx512
    {"avx512", avx512::kernel_table, has_avx512},
#endif
#ifdef FASTNN_HAVE_avx512bf16
    {"avx512bf16", avx512bf16::kernel_table, has_avx512bf16},
#endif
};

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable* best() {
  const KernelTable* t = nullptr;
  for (const auto& e : kIsas)
    if (e.supported()) t = &e.table();
  return t;
}

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

bool set_isa(const char* name) {
  for (const auto& e : kIsas) {
    if (std::strcmp(e.name, name) == 0) {
      if (!e.supported()) return false;
      g_table.store(&e.table(), std::memory_order_release);
      return true;
    }
  }
  return false;
}

const char* isa_in_use() { return kernels().isa; }

const char* isa_supported() {
  static const std::string list = [] {
    std::string s;
    for (const auto& e : kIsas) {
      if (!e.supported()) continue;
      if (!s.empty()) s += ",";
      s += e.name;
    }
    return s;
  }();
  return list.c_str();
}

}  // namespace fastnn::cpu
