/* The lab's native helpers: see lab.h. */
#ifndef LAB_C
#define LAB_C

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
