/* emu.cpp - the CUDA emulator's runtime (see include/cuda_runtime.h for what it emulates and what it does not).
 *
 * A kernel launch runs its blocks one after another on the calling thread; a block's threads are ucontext fibers
 * that run in turn until each finishes or waits at a barrier (__syncthreads, or a warp-synchronous intrinsic
 * for the lanes its mask names); when every live thread waits, the barriers that are complete release their
 * threads, and if none is, the block is deadlocked (a hang on a GPU) and the launch fails. Errors are reported
 * on stderr as they happen (so a test's output says which kernel did what) and through the runtime's error
 * codes: configuration errors as the launch's last error, faults as a sticky error every later call returns.
 */
#include "cuda_runtime.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <execinfo.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <map>
#include <mutex>
#include <vector>

namespace tk_emu {

thread_local fiber_state *g_cur;
thread_local uint3 g_block_idx;
thread_local dim3 g_block_dim, g_grid_dim;

enum { READY, WAIT_BLOCK, WAIT_WARP, DONE };
enum { STACK_BYTES = 256 * 1024, MAX_THREADS = 1024, DEFAULT_SHARED = 48 * 1024, MAX_SHARED = 227 * 1024 };

struct fiber {
    fiber_state s;
    ucontext_t ctx;  /* starts the fiber on its stack (makecontext + setcontext: once per block) */
    jmp_buf resume;  /* where it waits at a barrier (_setjmp / _longjmp switch without a signal-mask syscall) */
    int started;
    int state;
    unsigned warp_mask; /* the mask of the warp barrier it waits at */
    uint64_t slot;      /* what it offers in a warp exchange */
    char *stack;
};

static std::recursive_mutex g_lock; /* one launch, allocation or copy at a time */
static std::map<uintptr_t, size_t> g_device; /* device (and page-locked host) allocations: start -> bytes */
static std::map<uintptr_t, int> g_pinned;    /* which of them are host memory from cudaMallocHost */
static std::map<const void *, int> g_max_shared;
static size_t g_used, g_limit;
static long g_allocations, g_fail_at = -2; /* $TK_CUDA_EMU_FAIL_ALLOC: the allocation (1-based) that fails */
static thread_local cudaError_t g_last = cudaSuccess; /* per host thread, as CUDA's */
static cudaError_t g_sticky = cudaSuccess;             /* the context's */
static int g_device_set;

/* the launch being run */
static const char *g_kernel = "";
static fiber g_fibers[MAX_THREADS]; /* fixed: a ucontext_t points into itself, so fibers never move */
static unsigned g_fibers_ready;     /* how many have a stack */
static unsigned g_threads;
static jmp_buf g_scheduler;
static void (*g_body)(void *);
static void *g_body_ctx;
static std::vector<unsigned char> g_shared;
static int g_failed;

static void report(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cuda-emu: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static cudaError_t fail_sticky(cudaError_t err)
{
    if (g_sticky == cudaSuccess) g_sticky = err;
    return err;
}

static cudaError_t result(cudaError_t err)
{
    if (g_sticky != cudaSuccess) return g_sticky;
    if (err != cudaSuccess) g_last = err;
    return err;
}

static size_t limit(void)
{
    if (!g_limit) {
        const char *env = getenv("TK_CUDA_EMU_MEMORY");
        g_limit = env && *env ? (size_t)strtoull(env, NULL, 10) : (size_t)80 << 30;
    }
    return g_limit;
}

/* the allocation holding [p, p + bytes), or end() */
static std::map<uintptr_t, size_t>::iterator allocation_of(const void *p, size_t bytes)
{
    uintptr_t a = (uintptr_t)p;
    auto it = g_device.upper_bound(a);
    if (it == g_device.begin()) return g_device.end();
    --it;
    if (a + bytes > it->first + it->second) return g_device.end();
    return it;
}

static int is_device(const void *p, size_t bytes) { return allocation_of(p, bytes) != g_device.end(); }

/* ---- fibers ---- */

static void fiber_main(void)
{
    g_body(g_body_ctx);
    ((fiber *)g_cur)->state = DONE;
    _longjmp(g_scheduler, 1); /* never returns: its stack is reused by the next block */
}

static void yield_to_scheduler(int state)
{
    fiber *f = (fiber *)g_cur;
    f->state = state;
    if (!_setjmp(f->resume)) _longjmp(g_scheduler, 1);
}

/* runs fiber f until it finishes or waits */
static void resume(fiber *f)
{
    g_cur = &f->s;
    if (_setjmp(g_scheduler)) return;
    if (f->started) _longjmp(f->resume, 1);
    f->started = 1;
    setcontext(&f->ctx);
}

static void launch_failure(const char *what)
{
    if (!g_failed)
        report("kernel %s, block (%u, %u, %u): %s", g_kernel, g_block_idx.x, g_block_idx.y, g_block_idx.z, what);
    g_failed = 1;
}

void sync_threads(void)
{
    if (!g_failed) yield_to_scheduler(WAIT_BLOCK);
}

void sync_warp(unsigned mask)
{
    fiber *f = (fiber *)g_cur;
    f->warp_mask = mask;
    if (!g_failed) yield_to_scheduler(WAIT_WARP);
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane)
{
    fiber *f = (fiber *)g_cur;
    unsigned lane = f->s.linear & 31u, base = f->s.linear - lane;
    if (!(mask >> lane & 1u)) launch_failure("a warp intrinsic called by a lane outside its own mask");
    f->slot = value;
    sync_warp(mask); /* every lane has offered its value */
    uint64_t got = value;
    if (src_lane >= 0 && src_lane < 32 && (mask >> src_lane & 1u) && base + (unsigned)src_lane < g_threads)
        got = g_fibers[base + (unsigned)src_lane].slot;
    sync_warp(mask); /* every lane has read before any offers again */
    return got;
}

void *dynamic_shared(void) { return g_shared.data(); }

/* Releases the barriers that are complete; 0 when none is (every live thread waits: a deadlock). */
static int release_barriers(void)
{
    int released = 0, live = 0, at_block = 0, exited = 0;
    for (unsigned i = 0; i < g_threads; i++) {
        live += g_fibers[i].state != DONE;
        at_block += g_fibers[i].state == WAIT_BLOCK;
        exited += g_fibers[i].state == DONE;
    }
    if (live && at_block == live) {
        if (exited) launch_failure("__syncthreads reached after some threads of the block exited (undefined on a GPU)");
        for (unsigned i = 0; i < g_threads; i++)
            if (g_fibers[i].state == WAIT_BLOCK) g_fibers[i].state = READY;
        return 1;
    }
    for (unsigned base = 0; base < g_threads; base += 32) {
        unsigned waiting = 0, mask = 0;
        int ok = 1;
        for (unsigned l = 0; l < 32 && base + l < g_threads; l++)
            if (g_fibers[base + l].state == WAIT_WARP) {
                if (waiting && g_fibers[base + l].warp_mask != mask) ok = 0;
                mask = g_fibers[base + l].warp_mask;
                waiting |= 1u << l;
            }
        if (!waiting) continue;
        if (!ok) {
            launch_failure("lanes of one warp wait at warp barriers with different masks");
            return 0;
        }
        if ((waiting & mask) != mask) { /* a named lane is missing: exited, absent, or elsewhere */
            for (unsigned l = 0; l < 32; l++) {
                if (!(mask >> l & 1u) || (waiting >> l & 1u)) continue;
                if (base + l >= g_threads) {
                    launch_failure("a warp intrinsic's mask names a lane the block does not have");
                    return 0;
                }
                if (g_fibers[base + l].state == DONE) {
                    launch_failure("a warp intrinsic's mask names a lane that has exited");
                    return 0;
                }
            }
            continue; /* the missing lanes wait elsewhere: maybe a deadlock */
        }
        for (unsigned l = 0; l < 32; l++)
            if (waiting >> l & 1u) g_fibers[base + l].state = READY;
        released = 1;
    }
    return released;
}

static void run_block(void)
{
    memset(g_shared.data(), 0xff, g_shared.size()); /* NaN bytes: shared memory starts undefined */
    for (unsigned i = 0; i < g_threads; i++) {
        fiber *f = &g_fibers[i];
        unsigned x = i % g_block_dim.x, y = i / g_block_dim.x % g_block_dim.y, z = i / (g_block_dim.x * g_block_dim.y);
        f->s.tid = uint3{x, y, z};
        f->s.linear = i;
        f->state = READY;
        f->started = 0;
        f->ctx.uc_stack.ss_sp = f->stack;
        f->ctx.uc_stack.ss_size = STACK_BYTES;
        f->ctx.uc_link = NULL;
        makecontext(&f->ctx, fiber_main, 0);
    }
    for (;;) {
        int any = 0;
        for (unsigned i = 0; i < g_threads; i++)
            if (g_fibers[i].state == READY) {
                any = 1;
                resume(&g_fibers[i]);
            }
        if (g_failed) return; /* threads left waiting are abandoned: their stacks are reused */
        int all_done = 1;
        for (unsigned i = 0; i < g_threads; i++) all_done &= g_fibers[i].state == DONE;
        if (all_done) return;
        if (!release_barriers() && !any) {
            launch_failure("deadlock: every live thread waits at a barrier that cannot complete (a hang on a GPU)");
            return;
        }
    }
}

int begin_launch(const char *name, const void *kernel, dim3 grid, dim3 block, size_t shared)
{
    g_lock.lock();
    g_kernel = name;
    if (g_sticky != cudaSuccess) {
        g_lock.unlock();
        return 0;
    }
    unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    int max_shared = g_max_shared.count(kernel) ? g_max_shared[kernel] : DEFAULT_SHARED;
    const char *bad = !threads || threads > MAX_THREADS ? "a block of 0 or more than 1024 threads"
                      : block.z > 64                     ? "block.z > 64"
                      : !grid.x || grid.x > 0x7fffffffu  ? "grid.x outside [1, 2^31 - 1]"
                      : !grid.y || grid.y > 65535 || !grid.z || grid.z > 65535 ? "grid.y or grid.z outside [1, 65535]"
                                                                              : NULL;
    if (!bad && shared > (size_t)max_shared) bad = "more dynamic shared memory than the kernel may use";
    if (bad) {
        report("kernel %s <<<(%u, %u, %u), (%u, %u, %u), %zu>>>: %s", name, grid.x, grid.y, grid.z, block.x, block.y,
               block.z, shared, bad);
        g_last = shared > (size_t)max_shared ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration;
        g_lock.unlock();
        return 0;
    }
    g_threads = (unsigned)threads;
    g_block_dim = block;
    g_grid_dim = grid;
    for (; g_fibers_ready < g_threads; g_fibers_ready++) {
        fiber *f = &g_fibers[g_fibers_ready];
        void *stack = mmap(NULL, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (stack == MAP_FAILED) abort(); /* the test machine itself is out of memory */
        f->stack = (char *)stack;
        getcontext(&f->ctx); /* once: makecontext reuses it for every block */
    }
    g_shared.resize(shared ? shared : 16); /* run_block fills it before each block */
    g_failed = 0;
    return 1;
}

void check_pointer_arg(const char *name, int index, const void *p)
{
    if (p && !is_device(p, 0) && !g_failed) {
        report("kernel %s: argument %d (%p) is not device memory (a host pointer handed to a kernel)", name, index, p);
        g_failed = 1;
    }
}

void run_grid(void (*body)(void *), void *ctx)
{
    if (g_failed) return;
    g_body = body, g_body_ctx = ctx;
    for (unsigned z = 0; z < g_grid_dim.z && !g_failed; z++)
        for (unsigned y = 0; y < g_grid_dim.y && !g_failed; y++)
            for (unsigned x = 0; x < g_grid_dim.x && !g_failed; x++) {
                g_block_idx = uint3{x, y, z};
                run_block();
            }
}

void end_launch(void)
{
    if (g_failed) fail_sticky(cudaErrorLaunchFailure);
    g_cur = NULL;
    g_lock.unlock();
}

cudaError_t set_max_dynamic_shared(const void *kernel, int bytes)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    if (bytes < 0 || bytes > MAX_SHARED) return result(cudaErrorInvalidValue);
    g_max_shared[kernel] = bytes;
    return cudaSuccess;
}

} // namespace tk_emu

using namespace tk_emu;

unsigned __ballot_sync(unsigned mask, int predicate)
{
    fiber *f = (fiber *)g_cur;
    unsigned lane = f->s.linear & 31u, base = f->s.linear - lane, bits = 0;
    f->slot = predicate != 0;
    sync_warp(mask);
    for (unsigned l = 0; l < 32; l++)
        if ((mask >> l & 1u) && base + l < g_threads && g_fibers[base + l].slot) bits |= 1u << l;
    sync_warp(mask);
    return bits;
}

/* ---- the runtime API ---- */

cudaError_t cudaGetDeviceCount(int *count)
{
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device)
{
    if (device != 0) return result(cudaErrorInvalidDevice);
    g_device_set = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device)
{
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int device)
{
    if (device != 0) return result(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "CUDA emulator (CPU)");
    p->totalGlobalMem = limit();
    p->sharedMemPerBlock = DEFAULT_SHARED;
    p->sharedMemPerBlockOptin = MAX_SHARED;
    p->warpSize = 32;
    p->maxThreadsPerBlock = MAX_THREADS;
    p->major = 9, p->minor = 0;
    p->multiProcessorCount = 132;
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *v) { return *v = 13000, cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int *v) { return *v = 13000, cudaSuccess; }

const char *cudaGetErrorName(cudaError_t err)
{
    switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError(other)";
    }
}

const char *cudaGetErrorString(cudaError_t err)
{
    switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "an emulated CUDA error";
    }
}

cudaError_t cudaGetLastError(void)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    if (g_sticky != cudaSuccess) return g_sticky;
    cudaError_t e = g_last;
    g_last = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return g_sticky != cudaSuccess ? g_sticky : g_last; }
cudaError_t cudaDeviceSynchronize(void) { return g_sticky; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return g_sticky; }

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    *total_bytes = limit();
    *free_bytes = limit() - g_used;
    return result(cudaSuccess);
}

static void print_stats(void) { fprintf(stderr, "cuda-emu-stats: %ld device allocations\n", g_allocations); }

/* $TK_CUDA_EMU_FAIL_ALLOC=n makes the n-th device allocation fail as out of memory (once), so tests can reach
 * every allocation's failure path; $TK_CUDA_EMU_STATS=1 prints the count at exit */
static int injected_failure(void)
{
    if (g_fail_at == -2) {
        const char *env = getenv("TK_CUDA_EMU_FAIL_ALLOC"), *stats = getenv("TK_CUDA_EMU_STATS");
        g_fail_at = env && *env ? strtol(env, NULL, 10) : -1;
        if (stats && *stats == '1') atexit(print_stats);
    }
    if (++g_allocations != g_fail_at) return 0;
    if (getenv("TK_CUDA_EMU_TRACE")) { /* where the injected failure hits, for debugging a test */
        void *frames[32];
        backtrace_symbols_fd(frames, backtrace(frames, 32), 2);
    }
    return 1;
}

static cudaError_t allocate(void **ptr, size_t bytes, int pinned)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    *ptr = NULL;
    if (g_sticky != cudaSuccess) return g_sticky;
    if (!pinned && injected_failure()) return result(cudaErrorMemoryAllocation);
    if (bytes > limit()) return result(cudaErrorMemoryAllocation);
    size_t rounded = (bytes + 255) & ~(size_t)255;
    if (!pinned && g_used > limit() - rounded) return result(cudaErrorMemoryAllocation);
    void *p = aligned_alloc(256, rounded ? rounded : 256);
    if (!p) return result(cudaErrorMemoryAllocation);
    memset(p, 0xff, rounded ? rounded : 256); /* NaN bytes: new memory is undefined */
    g_device[(uintptr_t)p] = bytes;
    if (pinned) g_pinned[(uintptr_t)p] = 1;
    else g_used += rounded;
    *ptr = p;
    return cudaSuccess;
}

static cudaError_t release(void *p, int pinned)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    if (!p) return cudaSuccess;
    auto it = g_device.find((uintptr_t)p);
    if (it == g_device.end() || (g_pinned.count((uintptr_t)p) != 0) != (pinned != 0)) {
        report("%s(%p): not an allocation of that kind", pinned ? "cudaFreeHost" : "cudaFree", p);
        return result(cudaErrorInvalidDevicePointer);
    }
    if (!pinned) g_used -= (it->second + 255) & ~(size_t)255;
    g_pinned.erase((uintptr_t)p);
    g_device.erase(it);
    free(p);
    return g_sticky;
}

cudaError_t cudaMalloc(void **ptr, size_t bytes) { return allocate(ptr, bytes, 0); }
cudaError_t cudaMallocAsync(void **ptr, size_t bytes, cudaStream_t) { return allocate(ptr, bytes, 0); }
cudaError_t cudaMallocHost(void **ptr, size_t bytes) { return allocate(ptr, bytes, 1); }
cudaError_t cudaFree(void *p) { return release(p, 0); }
cudaError_t cudaFreeAsync(void *p, cudaStream_t) { return release(p, 0); }
cudaError_t cudaFreeHost(void *p) { return release(p, 1); }

/* each side must be the memory the kind names (page-locked host memory may be either) */
static cudaError_t check_copy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, const char *call)
{
    int dst_dev = is_device(dst, bytes), src_dev = is_device(src, bytes);
    int dst_pinned = dst_dev && g_pinned.count(allocation_of(dst, bytes)->first);
    int src_pinned = src_dev && g_pinned.count(allocation_of(src, bytes)->first);
    int want_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    int want_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    const char *bad = NULL;
    if (kind == cudaMemcpyDefault || kind == cudaMemcpyHostToHost) bad = NULL;
    else if (want_dst && !dst_dev) bad = "the destination is not device memory";
    else if (!want_dst && dst_dev && !dst_pinned) bad = "the destination is device memory";
    else if (want_src && !src_dev) bad = "the source is not device memory";
    else if (!want_src && src_dev && !src_pinned) bad = "the source is device memory";
    if (bad) {
        report("%s(%p, %p, %zu bytes, kind %d): %s (or the range runs past its allocation)", call, dst, src, bytes,
               (int)kind, bad);
        return cudaErrorInvalidValue;
    }
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    if (g_sticky != cudaSuccess) return g_sticky;
    if (!bytes) return cudaSuccess;
    cudaError_t err = check_copy(dst, src, bytes, kind, "cudaMemcpyAsync");
    if (err != cudaSuccess) return result(err);
    memmove(dst, src, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind)
{
    return cudaMemcpyAsync(dst, src, bytes, kind, 0);
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    if (g_sticky != cudaSuccess) return g_sticky;
    if (!width || !height) return cudaSuccess;
    if (width > dpitch || width > spitch) return result(cudaErrorInvalidValue);
    size_t dspan = dpitch * (height - 1) + width, sspan = spitch * (height - 1) + width;
    cudaError_t err = check_copy(dst, src, dspan < sspan ? dspan : sspan, kind, "cudaMemcpy2DAsync");
    if (err == cudaSuccess && (!is_device(dst, dspan) && kind != cudaMemcpyDeviceToHost)) err = cudaErrorInvalidValue;
    if (err != cudaSuccess) return result(err);
    for (size_t r = 0; r < height; r++) memmove((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int value, size_t bytes, cudaStream_t)
{
    std::lock_guard<std::recursive_mutex> hold(g_lock);
    if (g_sticky != cudaSuccess) return g_sticky;
    if (!bytes) return cudaSuccess;
    if (!is_device(p, bytes)) {
        report("cudaMemsetAsync(%p, %zu bytes): not device memory (or past its allocation)", p, bytes);
        return result(cudaErrorInvalidValue);
    }
    memset(p, value, bytes);
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int value, size_t bytes) { return cudaMemsetAsync(p, value, bytes, 0); }

static char g_stream_token[8];
cudaError_t cudaStreamCreate(cudaStream_t *s) { return *s = (cudaStream_t)(void *)g_stream_token, cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
