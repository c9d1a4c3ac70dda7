/* The lab's native helpers: see lab.h. */
#ifndef LAB_C
#define LAB_C

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ucontext.h>
#include <time.h>
#include <unistd.h>

#define LAB_READ 0
#define LAB_WRITE 1
#define LAB_FETCH 2

struct lab_fault {
	int faulted;
	int signo;
	int code;
	uint64_t addr;
	uint64_t trapno;
	uint64_t err;
	int64_t ret;
};

static pthread_mutex_t lab_probe_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction lab_old_segv, lab_old_bus;
static __thread sigjmp_buf lab_probe_env;
static __thread volatile sig_atomic_t lab_probe_active;
static __thread struct lab_fault lab_seen;

static void lab_probe_handler(int signo, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = (ucontext_t *)ctx;
	if (!lab_probe_active) {
		sigaction(signo, signo == SIGSEGV ? &lab_old_segv : &lab_old_bus, NULL);
		return;
	}
	lab_probe_active = 0;
	lab_seen.faulted = 1;
	lab_seen.signo = signo;
	lab_seen.code = info->si_code;
	lab_seen.addr = (uint64_t)(uintptr_t)info->si_addr;
#if defined(__x86_64__)
	/* arch/x86/kernel/signal.c setup_sigcontext: trapno and err come from the fault. */
	lab_seen.trapno = (uint64_t)uc->uc_mcontext.gregs[REG_TRAPNO];
	lab_seen.err = (uint64_t)uc->uc_mcontext.gregs[REG_ERR];
#else
	(void)uc;
#endif
	siglongjmp(lab_probe_env, 1);
}

int lab_fault_probe(uint64_t addr, int kind, int value, struct lab_fault *out)
{
	struct sigaction sa;
	if (kind < LAB_READ || kind > LAB_FETCH)
		return -EINVAL;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = lab_probe_handler;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	pthread_mutex_lock(&lab_probe_lock);
	if (sigaction(SIGSEGV, &sa, &lab_old_segv) < 0 || sigaction(SIGBUS, &sa, &lab_old_bus) < 0) {
		int err = errno;
		pthread_mutex_unlock(&lab_probe_lock);
		return -err;
	}
	memset(&lab_seen, 0, sizeof(lab_seen));
	if (sigsetjmp(lab_probe_env, 1) == 0) {
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
		lab_probe_active = 1;
		if (kind == LAB_READ)
			lab_seen.ret = *p;
		else if (kind == LAB_WRITE)
			*p = (uint8_t)value;
		else
			lab_seen.ret = ((int (*)(void))(uintptr_t)addr)();
		lab_probe_active = 0;
	}
	sigaction(SIGSEGV, &lab_old_segv, NULL);
	sigaction(SIGBUS, &lab_old_bus, NULL);
	*out = lab_seen;
	pthread_mutex_unlock(&lab_probe_lock);
	return 0;
}

/* Size of the [stack] VMA, or 0. */
static uint64_t lab_stack_vma_size(void)
{
	char buf[256];
	uint64_t size = 0;
	FILE *f = fopen("/proc/self/maps", "re");
	if (!f)
		return 0;
	while (fgets(buf, sizeof(buf), f)) {
		unsigned long lo, hi;
		if (strstr(buf, "[stack]") && sscanf(buf, "%lx-%lx", &lo, &hi) == 2) {
			size = hi - lo;
			break;
		}
	}
	fclose(f);
	return size;
}

struct lab_stack_state {
	uint64_t total, frame, every, level, n, max;
	uint64_t *depth, *size;
	uintptr_t top;
};

static __attribute__((noinline)) void lab_stack_level(struct lab_stack_state *s)
{
	volatile char *buf = __builtin_alloca(s->frame);
	uintptr_t here = (uintptr_t)buf;
	uint64_t used = s->top - here;
	for (uint64_t i = 0; i < s->frame; i += 1024)
		buf[i] = (char)i;  /* touch every page of this frame, top to bottom is fine */
	if (s->level % s->every == 0 && s->n < s->max) {
		s->depth[s->n] = used;
		s->size[s->n] = lab_stack_vma_size();
		s->n++;
	}
	s->level++;
	if (used + s->frame < s->total)
		lab_stack_level(s);
	__asm__ volatile("" : : "r"(buf) : "memory");  /* keep the frame alive (no tail call) */
}

int64_t lab_stack_grow(uint64_t total_bytes, uint64_t frame_bytes, uint64_t sample_every,
		       uint64_t *depth_out, uint64_t *vma_size_out, uint64_t max_samples)
{
	struct lab_stack_state s;
	volatile char anchor = 0;
	if (frame_bytes < 64 || frame_bytes > (1u << 20) || sample_every == 0)
		return -EINVAL;
	memset(&s, 0, sizeof(s));
	s.total = total_bytes;
	s.frame = frame_bytes;
	s.every = sample_every;
	s.max = max_samples;
	s.depth = depth_out;
	s.size = vma_size_out;
	s.top = (uintptr_t)&anchor;
	lab_stack_level(&s);
	return (int64_t)s.n;
}

static pthread_t lab_spinner_thread;
static volatile int lab_spinner_run;
static volatile int64_t lab_spinner_iters;
static int lab_spinner_cpu = -1;
static int lab_spinner_started;
static volatile int lab_spinner_rt;

static void *lab_spinner_main(void *arg)
{
	cpu_set_t set;
	struct sched_param sp;
	(void)arg;
	CPU_ZERO(&set);
	CPU_SET(lab_spinner_cpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
	/* Stay on the CPU while the other thread changes protections (root only; RT throttling
	 * still leaves other tasks 5% of the CPU). Without it, other load preempts the spinner
	 * and the kernel has no reason to interrupt that CPU. */
	memset(&sp, 0, sizeof(sp));
	sp.sched_priority = 1;
	lab_spinner_rt = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0;
	while (__atomic_load_n(&lab_spinner_run, __ATOMIC_RELAXED))
		lab_spinner_iters++;
	return NULL;
}

int lab_spinner_start(int cpu)
{
	int rc;
	if (lab_spinner_started)
		return -EBUSY;
	if (cpu < 0 || cpu >= CPU_SETSIZE)
		return -EINVAL;
	lab_spinner_cpu = cpu;
	lab_spinner_iters = 0;
	lab_spinner_rt = 0;
	lab_spinner_run = 1;
	rc = pthread_create(&lab_spinner_thread, NULL, lab_spinner_main, NULL);
	if (rc)
		return -rc;
	lab_spinner_started = 1;
	return 0;
}

int64_t lab_spinner_stop(void)
{
	if (!lab_spinner_started)
		return -1;
	__atomic_store_n(&lab_spinner_run, 0, __ATOMIC_RELAXED);
	pthread_join(lab_spinner_thread, NULL);
	lab_spinner_started = 0;
	return lab_spinner_iters;
}

int lab_spinner_is_rt(void)
{
	return lab_spinner_rt;
}

int lab_pin_self(int cpu)
{
	cpu_set_t set;
	if (cpu < 0 || cpu >= CPU_SETSIZE)
		return -EINVAL;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set) < 0 ? -errno : 0;
}

uint64_t lab_random_chase(uint64_t base, uint64_t size, uint64_t n, uint64_t seed)
{
	struct timespec t0, t1;
	uint64_t x = seed | 1, lines = size / 64;
	volatile const uint8_t *mem = (const uint8_t *)(uintptr_t)base;
	if (lines == 0)
		return 0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (uint64_t i = 0; i < n; i++) {
		/* xorshift64; the loaded byte (zero, or whatever is there) feeds the next address,
		 * so each load waits for the previous one. */
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		x += mem[(x % lines) * 64];
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	__asm__ volatile("" : : "r"(x));
	return (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ull + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
}

#endif /* LAB_C */
