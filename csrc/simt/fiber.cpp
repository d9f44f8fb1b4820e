// Context switch and stacks of the emulator's fibers (fiber.h). x86-64 System V only.
#include "simt/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

#if !defined(__x86_64__)
#error "the SIMT emulator's context switch is written for x86-64"
#endif

// pagedkv_simt_switch(save, to): push the callee-saved registers and the floating-point
// control words, save rsp, load the other fiber's rsp, pop its registers, return into it.
// pagedkv_simt_start: the first return of a new fiber lands here, with the entry function
// in r13 and its argument in r12 (prepared by FiberStacks::prepare).
asm(R"(
  .text
  .globl pagedkv_simt_switch
  .hidden pagedkv_simt_switch
  .type pagedkv_simt_switch, @function
pagedkv_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pagedkv_simt_switch, .-pagedkv_simt_switch

  .globl pagedkv_simt_start
  .hidden pagedkv_simt_start
  .type pagedkv_simt_start, @function
pagedkv_simt_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size pagedkv_simt_start, .-pagedkv_simt_start
)");

extern "C" void pagedkv_simt_start();

namespace pagedkv::simt {

namespace {
size_t page() { return size_t(sysconf(_SC_PAGESIZE)); }
}  // namespace

size_t FiberStacks::span() const { return kStackBytes + page(); }

FiberStacks::~FiberStacks() {
  if (base_) munmap(base_, span() * count_);
}

void FiberStacks::reserve(int n) {
  if (n <= count_) return;
  if (base_) munmap(base_, span() * count_);
  base_ = nullptr;
  count_ = 0;
  void* p = mmap(nullptr, span() * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map fiber stacks");
  base_ = static_cast<char*>(p);
  count_ = n;
  for (int i = 0; i < n; ++i) mprotect(base_ + span() * i, page(), PROT_NONE);  // guard below
}

void* FiberStacks::prepare(int i, void (*entry)(void*), void* arg) {
  char* top = base_ + span() * (i + 1);  // page aligned, so 16-byte aligned
  // After the switch pops 8 + 6 * 8 bytes and returns into pagedkv_simt_start, rsp is
  // s, 16-byte aligned, as a call instruction expects before it pushes.
  char* s = top - 64;
  uint64_t* f = reinterpret_cast<uint64_t*>(s - 64);
  const uint32_t mxcsr = 0x1F80;
  const uint16_t fpucw = 0x037F;
  std::memset(f, 0, 64);
  std::memcpy(reinterpret_cast<char*>(f), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(f) + 4, &fpucw, 2);
  f[1] = 0;                                      // r15
  f[2] = 0;                                      // r14
  f[3] = reinterpret_cast<uint64_t>(entry);      // r13
  f[4] = reinterpret_cast<uint64_t>(arg);        // r12
  f[5] = 0;                                      // rbx
  f[6] = 0;                                      // rbp
  f[7] = reinterpret_cast<uint64_t>(&pagedkv_simt_start);
  return f;
}

bool FiberStacks::in_guard(const void* addr) const {
  const char* a = static_cast<const char*>(addr);
  if (!base_ || a < base_ || a >= base_ + span() * count_) return false;
  return size_t(a - base_) % span() < page();
}

}  // namespace pagedkv::simt
