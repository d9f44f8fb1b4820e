// Fibers for the SIMT emulator: one per emulated GPU thread, switched by a few lines of
// x86-64 assembly (fiber.cpp): callee-saved registers, the stack pointer, MXCSR and the
// x87 control word, no syscall (swapcontext saves the signal mask with one per switch).
// Each stack has an unreadable guard page below it, so an overflow faults (cta.cpp turns
// the fault into an error naming the kernel).
#pragma once

#include <cstddef>

namespace pagedkv::simt {

// Saves the current stack pointer to *save and resumes the fiber whose saved stack
// pointer is `to`.
extern "C" void pagedkv_simt_switch(void** save, void* to);

class FiberStacks {
 public:
  static constexpr size_t kStackBytes = 256 * 1024;
  ~FiberStacks();
  // Makes room for n stacks (kept and reused across CTAs and launches).
  void reserve(int n);
  // The initial saved stack pointer of a fiber on stack i that runs entry(arg), where
  // entry must never return (it switches away for good when done).
  void* prepare(int i, void (*entry)(void*), void* arg);
  // Whether `addr` lies in a guard page of one of the stacks.
  bool in_guard(const void* addr) const;

 private:
  char* base_ = nullptr;
  int count_ = 0;
  size_t span() const;
};

}  // namespace pagedkv::simt
