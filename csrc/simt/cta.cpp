// The SIMT emulator's execution of a launch: every CTA of the grid in turn, its threads as
// fibers (fiber.h) on this OS thread. A fiber runs until it reaches a synchronization point
// (__syncthreads, a warp shuffle or __syncwarp) or exits; when no thread can run, the
// scheduler completes what is complete and checks what the GPU would leave undefined:
//   - __syncthreads releases only when every thread of the CTA waits at the same one; a
//     barrier some threads never reach (they exited, or wait elsewhere) is an error naming
//     the kernel, the barrier and the threads, never a hang;
//   - a warp operation completes when every lane of its mask waits at the same call with
//     the same mask and width; lanes that disagree, or a mask naming an exited lane or a
//     lane past the CTA, are an error;
//   - between two such points, threads run in a seeded random order, or forward, or in
//     reverse (control.h), so a missing barrier reads stale shared memory;
//   - dynamic shared memory is exactly the launch's byte count, ending at an unmapped
//     page: a read or write past it faults and the fault becomes an error naming the
//     kernel (up to 64 KiB past it); writes into the at most 15 bytes of alignment slack are found by a canary
//     after each CTA, and every CTA starts with all bytes 0xff (NaN floats), so a read
//     of memory no thread wrote this CTA shows in the result.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cstdio>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt/control.h"
#include "simt/fiber.h"
#include "simt/runtime.h"

namespace pagedkv::simt {
namespace {

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Thread {
  void* sp = nullptr;
  uint3 idx{};
  int linear = 0;
  State state = State::kRunnable;
  // Where it waits, and (warp operations) what it asks.
  const char* file = "";
  int line = 0;
  Shfl kind = Shfl::kXor;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t value = 0, result = 0;
};

struct Cta {
  const char* kernel = "";
  dim3 grid, block;
  uint3 bidx{};
  std::vector<Thread> threads;
  Thread* current = nullptr;
  void* sched_sp = nullptr;
  char* smem = nullptr;
  KernelBody body{};
  bool failed = false;
  std::string error;
};

// Per OS thread: the CTA being run, its fiber stacks, its shared-memory window, and the
// jump back from a fault in a guard page.
thread_local Cta* t_cta = nullptr;
thread_local FiberStacks* t_stacks = nullptr;
thread_local char* t_smem_map = nullptr;  // [window | guard]
thread_local size_t t_smem_window = 0;
thread_local sigjmp_buf t_fault_jump;
thread_local volatile sig_atomic_t t_fault_armed = 0;
thread_local const void* volatile t_fault_addr = nullptr;
thread_local std::string t_last_failure;

std::mutex g_mu;
Settings g_settings;
Counters g_counters;
std::atomic<uint64_t> g_launch_seq{0};
constexpr size_t kMaxKernelLog = 4096;

size_t page() { return size_t(sysconf(_SC_PAGESIZE)); }
// Unmapped bytes after the shared-memory window: an index up to 64 KiB past the end faults.
size_t guard() { return 16 * page(); }

std::string where(const Cta& c, const Thread* t) {
  std::ostringstream s;
  s << "kernel " << c.kernel << ", block (" << c.bidx.x << "," << c.bidx.y << "," << c.bidx.z
    << ")";
  if (t) s << ", thread (" << t->idx.x << "," << t->idx.y << "," << t->idx.z << ")";
  return s.str();
}

std::string site(const char* file, int line) {
  std::string f(file);
  const size_t p = f.find("csrc/");
  return (p == std::string::npos ? f : f.substr(p)) + ":" + std::to_string(line);
}

const char* op_name(Shfl k) {
  switch (k) {
    case Shfl::kXor: return "__shfl_xor_sync";
    case Shfl::kDown: return "__shfl_down_sync";
    case Shfl::kUp: return "__shfl_up_sync";
    case Shfl::kIdx: return "__shfl_sync";
    default: return "__syncwarp";
  }
}

std::string describe_wait(const Thread& t) {
  switch (t.state) {
    case State::kRunnable: return "running";
    case State::kDone: return "exited";
    case State::kBarrier: return "__syncthreads at " + site(t.file, t.line);
    default: {
      std::ostringstream s;
      s << op_name(t.kind) << " at " << site(t.file, t.line) << " (mask 0x" << std::hex << t.mask
        << std::dec << ", width " << t.width << ")";
      return s.str();
    }
  }
}

// Threads grouped by what they wait on, for error messages: "threads 0-31, 64: ...".
std::string census(const Cta& c) {
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (const Thread& t : c.threads) {
    const std::string w = describe_wait(t);
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == w; });
    if (it == groups.end()) groups.push_back({w, {t.linear}});
    else it->second.push_back(t.linear);
  }
  std::ostringstream s;
  for (auto& [what, ids] : groups) {
    s << "\n  threads ";
    for (size_t i = 0; i < ids.size();) {
      size_t j = i;
      while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
      if (i) s << ",";
      s << ids[i];
      if (j > i) s << "-" << ids[j];
      i = j + 1;
    }
    s << ": " << what;
  }
  return s.str();
}

[[noreturn]] void back_to_scheduler(Thread* t) {
  pagedkv_simt_switch(&t->sp, t_cta->sched_sp);
  __builtin_unreachable();
}

void wait_here(Thread* t) { pagedkv_simt_switch(&t->sp, t_cta->sched_sp); }

void fiber_main(void* arg) {
  Thread* t = static_cast<Thread*>(arg);
  t_cta->body.run(t_cta->body.closure);
  t->state = State::kDone;
  back_to_scheduler(t);
}

// ---- faults in guard pages ----

void on_fault(int sig, siginfo_t* info, void* ctx);
struct sigaction g_prev_segv, g_prev_bus;

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
    sigaction(SIGBUS, &sa, &g_prev_bus);
  });
  // A fiber's stack overflow must be handled on another stack.
  thread_local bool alt = false;
  if (!alt) {
    stack_t cur{};
    sigaltstack(nullptr, &cur);
    if (cur.ss_flags & SS_DISABLE) {
      static thread_local std::vector<char> mem(1 << 16);
      stack_t ss{};
      ss.ss_sp = mem.data();
      ss.ss_size = mem.size();
      sigaltstack(&ss, nullptr);
    }
    alt = true;
  }
}

bool in_smem_guard(const void* a) {
  const char* p = static_cast<const char*>(a);
  return t_smem_map && p >= t_smem_map + t_smem_window && p < t_smem_map + t_smem_window + guard();
}

void on_fault(int sig, siginfo_t* info, void* ctx) {
  if (t_fault_armed && (in_smem_guard(info->si_addr) || (t_stacks && t_stacks->in_guard(info->si_addr)))) {
    t_fault_addr = info->si_addr;
    t_fault_armed = 0;
    siglongjmp(t_fault_jump, 1);
  }
  // Not ours: hand it to whoever had it.
  struct sigaction& prev = sig == SIGBUS ? g_prev_bus : g_prev_segv;
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction) return prev.sa_sigaction(sig, info, ctx);
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    return prev.sa_handler(sig);
  }
  signal(sig, SIG_DFL);  // returning re-executes the access, which now kills the process
}

// The shared-memory window of this OS thread, at least `bytes` long, with unmapped guard
// pages right after it; the CTA's memory is its last `bytes` bytes (16-byte aligned start).
char* smem_for(size_t bytes) {
  const size_t need = (bytes + page() - 1) / page() * page() + page();
  if (need > t_smem_window) {
    if (t_smem_map) munmap(t_smem_map, t_smem_window + guard());
    void* m = mmap(nullptr, need + guard(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    t_smem_map = static_cast<char*>(m);
    t_smem_window = need;
    mprotect(t_smem_map + t_smem_window, guard(), PROT_NONE);
  }
  char* end = t_smem_map + t_smem_window;
  return end - ((bytes + 15) / 16 * 16);
}

// ---- the scheduler ----

bool fail_cta(Cta& c, const std::string& msg) {
  if (!c.failed) {
    c.failed = true;
    c.error = msg;
  }
  return false;
}

// Completes every warp operation whose lanes have all arrived; false on an error (in
// c.error). *progress: something completed.
bool complete_warp_ops(Cta& c, bool* progress) {
  const int n = int(c.threads.size());
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    Thread* warp = &c.threads[w0];
    for (int l = 0; l < lanes; ++l) {
      Thread& t = warp[l];
      if (t.state != State::kWarp) continue;
      const unsigned m = t.mask;
      // What the error messages call this call (built only for an error: it is costly).
      auto op = [&t] { return describe_wait(t); };
      if (!(m >> l & 1u))
        return fail_cta(c, where(c, &t) + ": " + op() + " is called by a lane outside its mask");
      if (lanes < 32 && (m >> lanes) != 0)
        return fail_cta(c, where(c, &t) + ": " + op() + " names lanes past the end of the CTA (" +
                               std::to_string(lanes) + " threads in this warp)");
      if (t.width < 1 || t.width > 32 || (t.width & (t.width - 1)))
        return fail_cta(c, where(c, &t) + ": " + op() + ": width must be a power of 2 in [1, 32]");
      bool ready = true;
      for (int j = 0; j < lanes && ready; ++j) {
        if (!(m >> j & 1u)) continue;
        const Thread& o = warp[j];
        if (o.state == State::kRunnable) ready = false;
        else if (o.state != State::kWarp || o.kind != t.kind || o.mask != t.mask ||
                 o.width != t.width || o.line != t.line || std::strcmp(o.file, t.file) != 0)
          return fail_cta(c, where(c, &t) + ": lanes of warp " + std::to_string(w0 / 32) +
                                 " disagree at " + op() + ": lane " + std::to_string(j) +
                                 " is at " + describe_wait(o) + census(c));
      }
      if (!ready) continue;
      // Every lane of the mask is here, at the same call: exchange (PTX shfl.sync).
      const unsigned seg = unsigned(32 - t.width);
      for (int j = 0; j < lanes; ++j) {
        if (!(m >> j & 1u)) continue;
        Thread& d = warp[j];
        const unsigned lane = unsigned(j), b = unsigned(d.arg);
        const unsigned max_lane = (lane & seg) | (31u & ~seg), min_lane = lane & seg;
        unsigned src = lane;
        bool in = true;
        switch (d.kind) {
          case Shfl::kXor: src = lane ^ b; in = src <= max_lane; break;
          case Shfl::kDown: src = lane + b; in = src <= max_lane; break;
          case Shfl::kUp: src = lane - b; in = int(src) >= int(min_lane); break;
          case Shfl::kIdx: src = min_lane | (b & ~seg); in = src <= max_lane; break;
          default: break;
        }
        if (!in) src = lane;
        if (d.kind != Shfl::kSyncwarp) {
          if (src >= unsigned(lanes) || !(m >> src & 1u))
            return fail_cta(c, where(c, &d) + ": " + op() + " reads lane " + std::to_string(src) +
                                   ", which is not in the mask (undefined on the GPU)");
          d.result = warp[src].value;
        }
      }
      for (int j = 0; j < lanes; ++j)
        if (m >> j & 1u) warp[j].state = State::kRunnable;
      *progress = true;
    }
  }
  return true;
}

// Releases the CTA's barrier when every thread waits at the same one; false on an error.
bool release_barrier(Cta& c) {
  const Thread* first = nullptr;
  int waiting = 0, done = 0;
  for (const Thread& t : c.threads) {
    if (t.state == State::kBarrier) {
      ++waiting;
      if (!first) first = &t;
      else if (t.line != first->line || std::strcmp(t.file, first->file) != 0)
        return fail_cta(c, where(c, nullptr) + ": threads wait at different __syncthreads:" + census(c));
    } else if (t.state == State::kDone) {
      ++done;
    } else {
      return fail_cta(c, where(c, nullptr) + ": deadlock:" + census(c));
    }
  }
  if (done > 0)
    return fail_cta(c, where(c, nullptr) + ": __syncthreads at " + site(first->file, first->line) +
                           " is reached by " + std::to_string(waiting) + " of " +
                           std::to_string(c.threads.size()) + " threads; the others exited:" + census(c));
  for (Thread& t : c.threads) t.state = State::kRunnable;
  return true;
}

bool run_threads(Cta& c, std::mt19937_64& rng, Order order, Counters& k) {
  std::vector<int> ready;
  ready.reserve(c.threads.size());
  while (true) {
    ready.clear();
    for (const Thread& t : c.threads)
      if (t.state == State::kRunnable) ready.push_back(t.linear);
    if (!ready.empty()) {
      if (order == Order::kReverse) std::reverse(ready.begin(), ready.end());
      else if (order == Order::kRandom) std::shuffle(ready.begin(), ready.end(), rng);
      for (int i : ready) {
        Thread* t = &c.threads[i];
        c.current = t;
        pagedkv_simt_switch(&c.sched_sp, t->sp);
        c.current = nullptr;
        if (c.failed) return false;
        if (t->state == State::kBarrier) ++k.barriers;
        else if (t->state == State::kWarp) ++k.warp_ops;
      }
      continue;
    }
    bool all_done = true;
    for (const Thread& t : c.threads) all_done = all_done && t.state == State::kDone;
    if (all_done) return true;
    bool progress = false;
    if (!complete_warp_ops(c, &progress)) return false;
    if (progress) continue;
    if (!release_barrier(c)) return false;
  }
}

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

cudaError_t record(cudaError_t e, const std::string& msg);

}  // namespace

// ---- the kernel language (runtime.h) ----

uint3 thread_idx() { return t_cta->current->idx; }
uint3 block_idx() { return t_cta->bidx; }
dim3 block_dim() { return t_cta->block; }
dim3 grid_dim() { return t_cta->grid; }
void* dynamic_smem() { return t_cta->smem; }

void fail(const char* file, int line, const char* what) {
  Cta* c = t_cta;
  if (!c || !c->current) {
    throw std::runtime_error(std::string("simt: ") + what + " at " + site(file, line));
  }
  Thread* t = c->current;
  fail_cta(*c, where(*c, t) + ": " + what + " at " + site(file, line));
  t->state = State::kDone;
  back_to_scheduler(t);
}

void syncthreads(const char* file, int line) {
  Thread* t = t_cta->current;
  t->state = State::kBarrier;
  t->file = file;
  t->line = line;
  wait_here(t);
}

uint64_t warp_op(const char* file, int line, Shfl kind, unsigned mask, uint64_t value, int arg,
                 int width) {
  Thread* t = t_cta->current;
  t->state = State::kWarp;
  t->file = file;
  t->line = line;
  t->kind = kind;
  t->mask = mask;
  t->value = value;
  t->arg = arg;
  t->width = width;
  wait_here(t);
  return t->result;
}

const char* last_failure() { return t_last_failure.c_str(); }

Settings settings() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_settings;
}
void set_settings(const Settings& s) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_settings = s;
}
Counters counters() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_counters;
}
void reset_counters() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_counters = Counters{};
}

cudaError_t launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
                   KernelBody body) {
  const Profile& pr = profile();
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  std::ostringstream why;
  if (threads < 1 || threads > pr.max_threads_per_block || int(block.x) > pr.max_block_dim[0] ||
      int(block.y) > pr.max_block_dim[1] || int(block.z) > pr.max_block_dim[2])
    why << "block (" << block.x << "," << block.y << "," << block.z << ") exceeds " << pr.name
        << "'s limits (" << pr.max_threads_per_block << " threads, dims " << pr.max_block_dim[0]
        << "x" << pr.max_block_dim[1] << "x" << pr.max_block_dim[2] << ")";
  else if (grid.x < 1 || grid.y < 1 || grid.z < 1 || int64_t(grid.x) > pr.max_grid_dim[0] ||
           int64_t(grid.y) > pr.max_grid_dim[1] || int64_t(grid.z) > pr.max_grid_dim[2])
    why << "grid (" << grid.x << "," << grid.y << "," << grid.z << ") exceeds " << pr.name
        << "'s limits (" << pr.max_grid_dim[0] << " x " << pr.max_grid_dim[1] << " x "
        << pr.max_grid_dim[2] << ", none 0)";
  if (!why.str().empty())
    return record(cudaErrorInvalidConfiguration, std::string("launch of ") + name + ": " + why.str());
  if (smem > size_t(max_dynamic_smem(fn)))
    return record(cudaErrorInvalidValue,
                  std::string("launch of ") + name + ": " + std::to_string(smem) +
                      " bytes of dynamic shared memory, more than the kernel's limit of " +
                      std::to_string(max_dynamic_smem(fn)) +
                      (smem <= size_t(pr.smem_per_block_optin)
                           ? " (raise it with cudaFuncSetAttribute)"
                           : " (over the device's opt-in maximum)"));

  install_fault_handler();
  if (!t_stacks) t_stacks = new FiberStacks();
  t_stacks->reserve(int(threads));
  char* mem = smem_for(smem);
  if (!mem) return record(cudaErrorMemoryAllocation, "simt: cannot map shared memory");
  const Settings st = settings();
  const uint64_t seq = g_launch_seq.fetch_add(1);
  Counters k;
  k.launches = 1;

  Cta c;
  c.kernel = name;
  c.grid = grid;
  c.block = block;
  c.body = body;
  c.smem = mem;
  c.threads.resize(size_t(threads));
  Cta* const saved = t_cta;
  t_cta = &c;
  struct Restore {
    Cta* saved;
    ~Restore() {
      t_cta = saved;
      t_fault_armed = 0;
    }
  } restore{saved};
  const size_t slack = (smem + 15) / 16 * 16 - smem;
  cudaError_t result = cudaSuccess;
  std::string msg;
  for (unsigned z = 0; z < grid.z && result == cudaSuccess; ++z)
    for (unsigned y = 0; y < grid.y && result == cudaSuccess; ++y)
      for (unsigned x = 0; x < grid.x && result == cudaSuccess; ++x) {
        c.bidx = uint3{x, y, z};
        c.failed = false;
        std::memset(mem, 0xff, smem + slack);
        std::mt19937_64 rng(mix(st.seed ^ mix(seq) ^ mix((uint64_t(z) << 42) ^ (uint64_t(y) << 21) ^ x)));
        int i = 0;
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx, ++i) {
              Thread& t = c.threads[i];
              t = Thread{};
              t.idx = uint3{tx, ty, tz};
              t.linear = i;
              t.sp = t_stacks->prepare(i, fiber_main, &t);
            }
        bool ok;
        if (sigsetjmp(t_fault_jump, 1) == 0) {
          t_fault_armed = 1;
          ok = run_threads(c, rng, st.order, k);
          t_fault_armed = 0;
        } else {  // a fault in a guard page, from the fiber c.current
          const void* a = t_fault_addr;
          std::ostringstream s;
          s << where(c, c.current) << ": ";
          if (in_smem_guard(a))
            s << "shared memory access at byte offset "
              << (static_cast<const char*>(a) - mem) << " past the launch's " << smem
              << " bytes of dynamic shared memory";
          else
            s << "stack overflow of an emulated thread";
          fail_cta(c, s.str());
          ok = false;
        }
        ++k.ctas;
        k.threads += threads;
        if (ok) {
          for (size_t b = smem; b < smem + slack; ++b)
            if (static_cast<unsigned char>(mem[b]) != 0xff) {
              fail_cta(c, where(c, nullptr) + ": a write at byte offset " + std::to_string(b) +
                              " past the launch's " + std::to_string(smem) +
                              " bytes of dynamic shared memory");
              ok = false;
              break;
            }
        }
        if (!ok) {
          result = cudaErrorLaunchFailure;
          msg = c.error;
        }
      }
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_counters.launches += k.launches;
    g_counters.ctas += k.ctas;
    g_counters.threads += k.threads;
    g_counters.barriers += k.barriers;
    g_counters.warp_ops += k.warp_ops;
    if (g_counters.kernels.size() < kMaxKernelLog) g_counters.kernels.push_back(name);
  }
  return result == cudaSuccess ? cudaSuccess : record(result, msg);
}

namespace {
thread_local cudaError_t t_last_error = cudaSuccess;
cudaError_t record(cudaError_t e, const std::string& msg) {
  t_last_error = e;
  t_last_failure = msg;
  return e;
}
}  // namespace

cudaError_t take_last_error() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t peek_last_error() { return t_last_error; }

}  // namespace pagedkv::simt
