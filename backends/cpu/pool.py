"""The persistent core pool: one thread pinned per core, handed native tasks.

Workers run a `NativeTask` (a native function and its argument block: a GEMM share, a loop
kernel's range) without the GIL, and poll for the next one for a while after each, so a hand-off
takes microseconds, not a futex wake-up. `pool().run(jobs)` runs the first job in the calling
thread and the others on workers. The GEMM drivers (threads.py), loop kernels (launch.py),
attention and the data-movement kernels all share it.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

F32 = 4  # bytes

_local = threading.local()


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


try:
    _sched_getcpu = ctypes.CDLL(None).sched_getcpu
except (OSError, AttributeError):  # not glibc/Linux: no preference of core
    _sched_getcpu = None


def _current_cpu() -> int:
    return _sched_getcpu() if _sched_getcpu else -1


# -- the core pool --

# Control block of one worker, i64 words; `done` and `waiting` sit on cache lines of their own.
POSTED, SEEN, FN, ARG, SCRATCH, DONE, WAITING, CTL_WORDS = 0, 1, 2, 3, 4, 8, 16, 24
# Spin budgets: a worker keeps polling this long after a job before it sleeps (a model's next
# kernel usually comes sooner), the caller this long for a worker's share before it sleeps.
SERVE_SPIN_US, WAIT_SPIN_US = 200, 300

_POOL_IR = """
define void @lmc_pool_post(ptr %ctl, i64 %fn, i64 %arg, i64 %scratch, i64 %seq) {
  %fnp = getelementptr i64, ptr %ctl, i64 2
  store i64 %fn, ptr %fnp, align 8
  %argp = getelementptr i64, ptr %ctl, i64 3
  store i64 %arg, ptr %argp, align 8
  %scp = getelementptr i64, ptr %ctl, i64 4
  store i64 %scratch, ptr %scp, align 8
  store atomic i64 %seq, ptr %ctl release, align 8
  ret void
}

; 0: nothing posted within `spins` polls; 1: a Python job is posted; 2: a native job finished
; and the caller sleeps waiting for it. Native jobs run here, in a loop, without the GIL.
define i64 @lmc_pool_serve(ptr %ctl, i64 %spins) {
entry:
  %seenp = getelementptr i64, ptr %ctl, i64 1
  %donep = getelementptr i64, ptr %ctl, i64 8
  %waitp = getelementptr i64, ptr %ctl, i64 16
  br label %idle
idle:
  %seen = load i64, ptr %seenp, align 8
  br label %spin
spin:
  %i = phi i64 [ 0, %idle ], [ %i.next, %pause ]
  %posted = load atomic i64, ptr %ctl acquire, align 8
  %new = icmp ne i64 %posted, %seen
  br i1 %new, label %take, label %pause
pause:
  PAUSE
  %i.next = add i64 %i, 1
  %more = icmp slt i64 %i.next, %spins
  br i1 %more, label %spin, label %timeout
timeout:
  ret i64 0
take:
  store i64 %posted, ptr %seenp, align 8
  %fnp = getelementptr i64, ptr %ctl, i64 2
  %fn = load i64, ptr %fnp, align 8
  %python = icmp eq i64 %fn, 0
  br i1 %python, label %to.python, label %native
to.python:
  ret i64 1
native:
  %argp = getelementptr i64, ptr %ctl, i64 3
  %arg = load i64, ptr %argp, align 8
  %scp = getelementptr i64, ptr %ctl, i64 4
  %sc = load i64, ptr %scp, align 8
  %f = inttoptr i64 %fn to ptr
  %a = inttoptr i64 %arg to ptr
  %s = inttoptr i64 %sc to ptr
  call void %f(ptr %a, ptr %s)
  store atomic i64 %posted, ptr %donep seq_cst, align 8
  %waiting = load atomic i64, ptr %waitp seq_cst, align 8
  %wake = icmp ne i64 %waiting, 0
  br i1 %wake, label %to.wake, label %idle
to.wake:
  ret i64 2
}

; A range task: block = [fn, start, end, args] for a kernel fn(start, end, args, scratch) (the
; loops.py ABI).
define void @lmc_pool_range(ptr %block, ptr %scratch) {
  %fn.w = load i64, ptr %block, align 8
  %start.p = getelementptr i64, ptr %block, i64 1
  %start = load i64, ptr %start.p, align 8
  %end.p = getelementptr i64, ptr %block, i64 2
  %end = load i64, ptr %end.p, align 8
  %args.p = getelementptr i64, ptr %block, i64 3
  %args.w = load i64, ptr %args.p, align 8
  %fn = inttoptr i64 %fn.w to ptr
  %args = inttoptr i64 %args.w to ptr
  call void %fn(i64 %start, i64 %end, ptr %args, ptr %scratch)
  ret void
}

; Publish a Python job's end; nonzero when the caller sleeps waiting for it.
define i64 @lmc_pool_finish(ptr %ctl, i64 %seq) {
  %donep = getelementptr i64, ptr %ctl, i64 8
  store atomic i64 %seq, ptr %donep seq_cst, align 8
  %waitp = getelementptr i64, ptr %ctl, i64 16
  %waiting = load atomic i64, ptr %waitp seq_cst, align 8
  ret i64 %waiting
}

; 1 once done >= target; 0 after `spins` polls, with the waiting flag raised (seq_cst, so the
; worker's finish cannot miss it): the caller then sleeps until the worker wakes it.
define i64 @lmc_pool_wait(ptr %ctl, i64 %target, i64 %spins) {
entry:
  %donep = getelementptr i64, ptr %ctl, i64 8
  %waitp = getelementptr i64, ptr %ctl, i64 16
  br label %spin
spin:
  %i = phi i64 [ 0, %entry ], [ %i.next, %pause ]
  %d = load atomic i64, ptr %donep acquire, align 8
  %ok = icmp sge i64 %d, %target
  br i1 %ok, label %done, label %pause
pause:
  PAUSE
  %i.next = add i64 %i, 1
  %more = icmp slt i64 %i.next, %spins
  br i1 %more, label %spin, label %timeout
timeout:
  store atomic i64 1, ptr %waitp seq_cst, align 8
  %d2 = load atomic i64, ptr %donep seq_cst, align 8
  %ok2 = icmp sge i64 %d2, %target
  br i1 %ok2, label %late, label %block
late:
  store atomic i64 0, ptr %waitp seq_cst, align 8
  ret i64 1
block:
  ret i64 0
done:
  ret i64 1
}
"""


def compile_primitives():
    """The pool's module (compiled once per process, by `kernels.prefetch` if it ran)."""
    from .jit import default_engine, spin_pause
    decl, pause = spin_pause()
    return default_engine().add_ir("lmc_pool", decl + _POOL_IR.replace("PAUSE", pause))


class _Primitives:
    """The pool's native spin/handoff functions (ctypes calls release the GIL) and how many
    polls make a microsecond on this machine (measured once)."""

    def __init__(self) -> None:
        module = compile_primitives()
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.post = module.function("lmc_pool_post", None, ptr, i64, i64, i64, i64)
        self.serve = module.function("lmc_pool_serve", i64, ptr, i64)
        self.finish = module.function("lmc_pool_finish", i64, ptr, i64)
        self.wait = module.function("lmc_pool_wait", i64, ptr, i64, i64)
        self.range_address = module.engine.function_address("lmc_pool_range")
        probe = _aligned_words(CTL_WORDS)
        start, spins = time.perf_counter(), 20000
        self.wait(probe.ctypes.data, 1, spins)  # never done: exactly `spins` polls
        self.polls_per_us = max(1.0, spins / ((time.perf_counter() - start) * 1e6))


@dataclass(frozen=True)
class NativeTask:
    """A pool job a worker runs natively, without the GIL: `fn(arg, scratch)` with `scratch`
    that worker's own memory of >= scratch_bytes; `keep` holds what `arg` points into."""

    fn: int
    arg: int
    scratch_bytes: int
    keep: object = field(default=None, repr=False)

    def __call__(self) -> None:
        """Run here instead (a nested or concurrent pool call), with this thread's scratch."""
        scratch = _thread_scratch(self.scratch_bytes)
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(self.fn)(self.arg, scratch)


def range_task(fn: int, start: int, end: int, args: int, scratch_bytes: int = 0,
               keep: object = None) -> NativeTask:
    """A NativeTask running kernel `fn(start, end, args, scratch)` (the loops.py ABI) natively
    on a worker: no GIL hand-off between the caller and the worker."""
    block = np.array([fn, start, end, args], np.int64)
    return NativeTask(pool().prims.range_address, block.ctypes.data, scratch_bytes,
                      (block, keep))


class _Worker:
    """One thread pinned to a core, fed through its control block: it polls for a while after
    each job (a handoff then costs ~1 us instead of a ~10-400 us futex wake-up on this VM) and
    sleeps on a semaphore when nothing comes."""

    def __init__(self, cpu: int, prims: _Primitives) -> None:
        self.cpu, self.prims = cpu, prims
        self.ctl = _aligned_words(CTL_WORDS)
        self.addr = self.ctl.ctypes.data
        self.seq, self.job, self.error, self.keep = 0, None, None, None
        self.scratch = _aligned(0)
        self.sleeping = False
        self.wake, self.finished = threading.Semaphore(0), threading.Semaphore(0)
        threading.Thread(target=self._serve, daemon=True, name=f"lmc-cpu{cpu}").start()

    def post(self, job) -> None:
        self.seq += 1
        if isinstance(job, NativeTask):
            if self.scratch.nbytes < job.scratch_bytes:  # the worker is idle: safe to swap
                self.scratch = _aligned(-(-job.scratch_bytes // F32))
            self.job, self.keep = None, job
            self.prims.post(self.addr, job.fn, job.arg, self.scratch.ctypes.data, self.seq)
        else:
            self.job = job
            self.prims.post(self.addr, 0, 0, 0, self.seq)
        if self.sleeping:
            self.wake.release()

    def wait(self) -> BaseException | None:
        """Block until the posted job is done; its exception, if any."""
        spins = int(WAIT_SPIN_US * self.prims.polls_per_us)
        if not self.prims.wait(self.addr, self.seq, spins):
            while self.ctl[DONE] < self.seq:
                self.finished.acquire()
            self.ctl[WAITING] = 0
        error, self.error, self.keep = self.error, None, None
        return error

    def _serve(self) -> None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {self.cpu})
        spins = int(SERVE_SPIN_US * self.prims.polls_per_us)
        while True:
            status = self.prims.serve(self.addr, spins)
            if status == 1:
                try:
                    self.job()
                except BaseException as exc:
                    self.error = exc
                self.job = None
                if self.prims.finish(self.addr, int(self.ctl[SEEN])):
                    self.finished.release()
            elif status == 2:
                self.finished.release()
            else:  # idle: sleep; `post` checks `sleeping` after publishing, under the GIL
                self.sleeping = True
                if self.ctl[POSTED] == self.ctl[SEEN]:
                    self.wake.acquire()
                self.sleeping = False


class CorePool:
    """One worker thread pinned to each core. The caller runs the first job itself and hands
    the others to workers on *other* cores: an unpinned worker woken by the caller lands on the
    caller's core (wake-affine) and time-slices with it for the ~100 us the scheduler takes to
    migrate it. One call at a time: a concurrent or nested call runs its jobs inline."""

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        self.prims = _Primitives()
        self.workers = [_Worker(cpu, self.prims) for cpu in self.cpus]
        self._busy = threading.Lock()

    def run(self, jobs: list) -> None:
        """Run `jobs` (callables, or NativeTasks) in parallel, the first in this thread;
        re-raise the first error."""
        if len(jobs) == 1 or not self._busy.acquire(blocking=False):
            for job in jobs:
                job()
            return
        try:
            here = _current_cpu()
            others = [w for w in self.workers if w.cpu != here] or self.workers
            posted = others[:len(jobs) - 1]
            for worker, job in zip(posted, jobs[1:]):
                worker.post(job)
            errors = []
            for job in [jobs[0], *jobs[1 + len(posted):]]:
                try:
                    job()
                except BaseException as exc:
                    errors.append(exc)
            errors += [e for e in (w.wait() for w in posted) if e is not None]
        finally:
            self._busy.release()
        if errors:
            raise errors[0]


def _aligned_words(n: int) -> np.ndarray:
    """n zeroed int64 words, 64-byte aligned (a control block's cache lines)."""
    words = _aligned(2 * n).view(np.int64)
    words[:] = 0
    return words


def thread_buffer(floats: int, use: str) -> np.ndarray:
    """This thread's 64-byte aligned buffer for `use` of `floats` floats, kept and grown (never
    shrunk): a kernel's scratch per call would cost an allocation, and page faults, per call.
    Each `use` has its own, so that no two of them alias."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(use)
    if buf is None or buf.size < floats:
        buf = buffers[use] = _aligned(floats)
    return buf[:floats]


def _thread_scratch(nbytes: int) -> int:
    """This thread's scratch memory for native tasks of >= nbytes, as an address."""
    return thread_buffer(-(-nbytes // F32), "tasks").ctypes.data


_pool: CorePool | None = None
_pool_lock = threading.Lock()


def pool() -> CorePool:
    """The process-wide pool (created on first use; daemon threads live until exit)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = CorePool()
    return _pool


def _forget_pool_after_fork() -> None:
    global _pool
    _pool = None  # the child has no worker threads; start new ones on first use


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _aligned(n: int, align: int = 64) -> np.ndarray:
    raw = np.empty(n + align // F32, np.float32)
    skip = (-raw.ctypes.data % align) // F32
    return raw[skip:skip + n]
