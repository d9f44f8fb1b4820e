// Launch-config table, heuristic, and the shape-only sizing helpers of kernels.h.
#include "cuda/launch_config.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "ops_namespace.h"

namespace pagedkv::cuda {

// ---------------------------------------------------------------------------------------
// Shape-only sizing (kernels.h). Everything here depends on tensor shapes and the launch
// config, never on metadata values: that is what keeps the grids graph-safe.
// ---------------------------------------------------------------------------------------

int64_t decode_num_partitions(const AttentionParams& p, int partition_size) {
  const int64_t max_ctx = int64_t(p.max_blocks_per_seq) * p.block_size;
  const int64_t parts = (max_ctx + partition_size - 1) / partition_size;
  return parts > 0 ? parts : 1;
}

DecodePlan decode_plan(const AttentionParams& p, int partition_size, int num_sms,
                       int max_splits) {
  const int64_t rows = p.single_rows_to_decode ? p.num_seqs : p.num_q_tokens;
  const int group = p.num_heads / p.num_kv_heads;
  const int hp = heads_per_cta(group);
  const int64_t ctas_per_split = rows * p.num_kv_heads * ((group + hp - 1) / hp);
  const int64_t floats_per_split = rows * p.num_heads * (int64_t(p.head_size) + 2);
  if (ctas_per_split <= 0) return DecodePlan{rows, 1, 0};
  const int64_t fill = (kDecodeCtasPerSm * std::max(num_sms, 1) + ctas_per_split - 1) /
                       ctas_per_split;  // splits that fill the device
  const int64_t budget = kDecodeScratchBytes / int64_t(sizeof(float)) / floats_per_split;
  int64_t limit = std::min<int64_t>(decode_num_partitions(p, partition_size), 65535);
  if (max_splits > 0) limit = std::min<int64_t>(limit, max_splits);
  const int64_t splits = std::max<int64_t>(1, std::min(std::max(fill, budget), limit));
  return DecodePlan{rows, splits, splits > 1 ? splits * floats_per_split : 0};
}

int heads_per_cta(int group) {
  const int chunks = (group + kMaxHeadsPerCta - 1) / kMaxHeadsPerCta;
  return (group + chunks - 1) / chunks;  // balanced: 12 -> 6 + 6, not 8 + 4
}

int prefill_rows_per_tile(int head_size, int group) {
  const int rows = prefill_tile(head_size).qv / heads_per_cta(group);
  return rows > 0 ? rows : 1;
}

size_t prefill_smem_bytes(int head_size) {
  const PrefillTile t = prefill_tile(head_size);
  const size_t dp = size_t(head_size) + 4;
  const size_t floats = t.qv * dp + 2 * t.kt * dp + size_t(t.qv) * t.kt +
                        size_t(t.qv) * head_size + 3 * size_t(t.qv) + t.kt /* kval ints */;
  return floats * sizeof(float);
}

size_t decode_smem_bytes(int head_size, int heads, int partition_size) {
  // scores [heads][partition], running output and query [heads][head_size] each, and the
  // running max, sum and rescale factor of each head.
  const size_t floats = size_t(heads) * (size_t(partition_size) + 2 * size_t(head_size));
  return (floats + 3 * kMaxHeadsPerCta) * sizeof(float);
}

// ---------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------

namespace {
const char* const kDTypeNames[kNumDTypes] = {"float32", "float16", "bfloat16", "float8_e4m3fn",
                                             "float8_e5m2"};
}

bool parse_dtype(const std::string& name, DType* out) {
  for (int i = 0; i < kNumDTypes; ++i) {
    if (name == kDTypeNames[i]) {
      *out = DType(i);
      return true;
    }
  }
  return false;
}

const char* dtype_name(DType d) { return kDTypeNames[int(d)]; }

// ---------------------------------------------------------------------------------------
// Heuristic
// ---------------------------------------------------------------------------------------

LaunchConfig heuristic_config(int head_size, DType cache, int block_size) {
  (void)cache;
  (void)block_size;
  LaunchConfig c{};
  // Decode: head sizes up to 128 use 16 lanes (or fewer) per cache row, so 4 warps keep
  // 8 rows x 4 in flight per CTA; longer rows take a whole warp each, so use 8 warps.
  c.decode_threads = head_size <= 128 ? 128 : 256;
  // 512 keys per partition: a CTA streams 512 K and V rows (256 KB at head 128, bf16),
  // long enough to amortize its fixed cost, short enough that batch 8 x 32k context
  // still yields thousands of CTAs.
  c.partition_size = 512;
  // Prefill tiles are sized for 4 warps (128 score units of 2x4 at head <= 128).
  c.prefill_threads = 128;
  // reshape_and_cache: one 8-element chunk of K and V per thread.
  c.write_threads = 256;
  return c;
}

std::string config_error(const LaunchConfig& c) {
  auto in = [](int x, std::initializer_list<int> ok) {
    for (int v : ok) if (x == v) return true;
    return false;
  };
  if (!in(c.decode_threads, {64, 128, 256}))
    return "decode_threads must be 64, 128 or 256, got " + std::to_string(c.decode_threads);
  if (c.partition_size < 64 || c.partition_size > 1024 || c.partition_size % 64 != 0)
    return "partition_size must be a multiple of 64 in [64, 1024], got " +
           std::to_string(c.partition_size);
  if (!in(c.prefill_threads, {64, 128, 256}))
    return "prefill_threads must be 64, 128 or 256, got " + std::to_string(c.prefill_threads);
  if (c.write_threads < 64 || c.write_threads > 512 || c.write_threads % 32 != 0)
    return "write_threads must be a multiple of 32 in [64, 512], got " +
           std::to_string(c.write_threads);
  return "";
}

// ---------------------------------------------------------------------------------------
// Table
// ---------------------------------------------------------------------------------------

namespace {

using Key = std::tuple<std::string, int, int, int>;  // device name, head, dtype, block

struct Table {
  std::mutex mu;
  std::map<Key, LaunchConfig> entries;
};

Table& table() {
  static Table t;
  return t;
}

// Fills the table at its first use, not at `import torch_pagedkv`: runs the private op
// pagedkv::_install_launch_configs, whose kernel torch_pagedkv/_load.py registers in
// Python (it reads the shipped JSON table and $PAGEDKV_LAUNCH_CONFIGS). Without that
// kernel (the library loaded on its own) the table starts empty. Every table access
// calls this first, so an entry set or cleared by hand is never overwritten later; the
// install itself sets entries through the same path, so its own thread returns at once.
// Called before taking the table mutex, which the install's set_config calls take.
void install_once() {
  static std::atomic<bool> done{false};
  static std::mutex mu;
  thread_local bool installing = false;
  if (done.load(std::memory_order_acquire) || installing) return;
  std::lock_guard<std::mutex> lock(mu);
  if (done.load(std::memory_order_relaxed)) return;
  auto op = c10::Dispatcher::singleton().findSchema({PAGEDKV_OPS_NS_STR "::_install_launch_configs", ""});
  if (op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd)) {
    installing = true;
    struct Reset {
      bool& flag;
      ~Reset() { flag = false; }
    } reset{installing};
    op->typed<void()>().call();  // an error propagates, and the next access tries again
  }
  done.store(true, std::memory_order_release);
}

}  // namespace

void set_config(const std::string& device_name, int head_size, DType cache, int block_size,
                const LaunchConfig& c) {
  const std::string err = config_error(c);
  if (!err.empty()) throw std::invalid_argument(err);
  install_once();
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.entries[Key{device_name, head_size, int(cache), block_size}] = c;
}

void clear_configs() {
  install_once();
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.entries.clear();
}

LaunchConfig find_config(const std::string& device_name, int head_size, DType cache,
                         int block_size, bool* from_table) {
  install_once();
  {
    Table& t = table();
    std::lock_guard<std::mutex> lock(t.mu);
    auto it = t.entries.find(Key{device_name, head_size, int(cache), block_size});
    if (it != t.entries.end()) {
      if (from_table) *from_table = true;
      return it->second;
    }
  }
  if (from_table) *from_table = false;
  return heuristic_config(head_size, cache, block_size);
}

std::string device_name(int device) {
  static std::mutex mu;
  static std::vector<std::string> names;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= int(names.size())) names.resize(device + 1);
  if (names[device].empty()) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
      cudaGetLastError();  // clear the (non-sticky) error; launches use the heuristic
      return "";
    }
    names[device] = prop.name;
  }
  return names[device];
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> counts;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= int(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      return 1;
    }
    counts[device] = n;
  }
  return counts[device];
}

LaunchConfig config_for_device(int device, int head_size, DType cache, int block_size) {
  return find_config(device_name(device), head_size, cache, block_size, nullptr);
}

}  // namespace pagedkv::cuda
