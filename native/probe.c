/* Fault probe, toucher and native fault-handler thread. */
#ifndef MIG_PROBE_C
#define MIG_PROBE_C

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <time.h>
#include <unistd.h>

#include "migrate_uapi.h"

#define MIG_PROBE_READ 0
#define MIG_PROBE_WRITE 1
#define MIG_PROBE_FETCH 2

struct mig_probe_result {
	int faulted;
	int signo;
	int code;
	uint64_t addr;
	uint64_t trapno;
	uint64_t err;
	int64_t ret;
};

static pthread_mutex_t mig_probe_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction mig_probe_old_segv, mig_probe_old_bus;
static __thread sigjmp_buf mig_probe_env;
static __thread volatile sig_atomic_t mig_probe_active;
static __thread struct mig_probe_result mig_probe_seen;

static void mig_probe_handler(int signo, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = (ucontext_t *)ctx;
	if (!mig_probe_active) {
		/* Not our probe (another thread, or a real bug): put the previous action back and
		 * return, so the faulting instruction re-executes under it. */
		sigaction(signo, signo == SIGSEGV ? &mig_probe_old_segv : &mig_probe_old_bus, NULL);
		return;
	}
	mig_probe_active = 0;
	mig_probe_seen.faulted = 1;
	mig_probe_seen.signo = signo;
	mig_probe_seen.code = info->si_code;
	mig_probe_seen.addr = (uint64_t)(uintptr_t)info->si_addr;
#if defined(__x86_64__)
	/* arch/x86/kernel/signal.c setup_sigcontext: trapno and err come from the fault. */
	mig_probe_seen.trapno = (uint64_t)uc->uc_mcontext.gregs[REG_TRAPNO];
	mig_probe_seen.err = (uint64_t)uc->uc_mcontext.gregs[REG_ERR];
#else
	(void)uc;
#endif
	siglongjmp(mig_probe_env, 1);
}

/* value < 0: the harmless access of mig_probe (a write keeps the byte); value >= 0: a real store
 * of that byte, and the value read or returned is kept in mig_probe_seen.ret. */
static void mig_probe_access(uint64_t addr, int kind, int value)
{
	volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
	switch (kind) {
	case MIG_PROBE_READ:
		mig_probe_seen.ret = *p;
		break;
	case MIG_PROBE_WRITE:
		if (value >= 0) {
			*p = (uint8_t)value;
			break;
		}
		/* A write that keeps the byte's value, atomically, so probing live memory is harmless. */
#if defined(__x86_64__)
		__asm__ volatile("lock; addb $0, %0" : "+m"(*p) : : "memory");
#else
		__atomic_fetch_add(p, 0, __ATOMIC_SEQ_CST);
#endif
		break;
	case MIG_PROBE_FETCH:
		mig_probe_seen.ret = ((int (*)(void))(uintptr_t)addr)();
		break;
	}
}

static int mig_probe_run(uint64_t addr, int kind, int value, struct mig_probe_result *out)
{
	struct sigaction sa;
	if (kind < MIG_PROBE_READ || kind > MIG_PROBE_FETCH)
		return -EINVAL;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = mig_probe_handler;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);

	pthread_mutex_lock(&mig_probe_lock);
	if (sigaction(SIGSEGV, &sa, &mig_probe_old_segv) < 0 ||
	    sigaction(SIGBUS, &sa, &mig_probe_old_bus) < 0) {
		int err = errno;
		pthread_mutex_unlock(&mig_probe_lock);
		return -err;
	}
	memset(&mig_probe_seen, 0, sizeof(mig_probe_seen));
	if (sigsetjmp(mig_probe_env, 1) == 0) {
		mig_probe_active = 1;
		mig_probe_access(addr, kind, value);
		mig_probe_active = 0;
	}
	sigaction(SIGSEGV, &mig_probe_old_segv, NULL);
	sigaction(SIGBUS, &mig_probe_old_bus, NULL);
	*out = mig_probe_seen;
	pthread_mutex_unlock(&mig_probe_lock);
	return 0;
}

int mig_probe(uint64_t addr, int kind, struct mig_probe_result *out)
{
	return mig_probe_run(addr, kind, -1, out);
}

int mig_probe_value(uint64_t addr, int kind, int value, struct mig_probe_result *out)
{
	if (value < 0 || value > 255)
		return -EINVAL;
	return mig_probe_run(addr, kind, value, out);
}

uint64_t mig_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int mig_gettid(void)
{
	return (int)syscall(SYS_gettid);
}

static inline void mig_touch_one(uint64_t addr, int write)
{
	volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addr;
	if (write) {
#if defined(__x86_64__)
		__asm__ volatile("lock; addb $0, %0" : "+m"(*p) : : "memory");
#else
		__atomic_fetch_add(p, 0, __ATOMIC_SEQ_CST);
#endif
	} else {
		(void)*p;
	}
}

int64_t mig_touch_pages(const uint64_t *addrs, uint64_t n, int write, uint64_t *lat_ns)
{
	uint64_t i;
	for (i = 0; i < n; i++) {
		uint64_t t0 = mig_now_ns();
		mig_touch_one(addrs[i], write);
		if (lat_ns)
			lat_ns[i] = mig_now_ns() - t0;
	}
	return (int64_t)n;
}

int64_t mig_touch_range(uint64_t start, uint64_t npages, uint64_t stride, int write, uint64_t *lat_ns)
{
	uint64_t i;
	for (i = 0; i < npages; i++) {
		uint64_t t0 = mig_now_ns();
		mig_touch_one(start + i * stride, write);
		if (lat_ns)
			lat_ns[i] = mig_now_ns() - t0;
	}
	return (int64_t)npages;
}

struct mig_toucher {
	pthread_t thread;
	const uint64_t *addrs;
	uint64_t n;
	int write;
	uint64_t *lat_ns;
	volatile uint64_t done;
	volatile int tid;
};

static void *mig_toucher_main(void *arg)
{
	struct mig_toucher *t = arg;
	uint64_t i;
	t->tid = mig_gettid();
	for (i = 0; i < t->n; i++) {
		uint64_t t0 = mig_now_ns();
		mig_touch_one(t->addrs[i], t->write);
		if (t->lat_ns)
			t->lat_ns[i] = mig_now_ns() - t0;
		__atomic_store_n(&t->done, i + 1, __ATOMIC_RELEASE);
	}
	return NULL;
}

struct mig_toucher *mig_toucher_start(const uint64_t *addrs, uint64_t n, int write, uint64_t *lat_ns)
{
	struct mig_toucher *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->addrs = addrs;
	t->n = n;
	t->write = write;
	t->lat_ns = lat_ns;
	if (pthread_create(&t->thread, NULL, mig_toucher_main, t) != 0) {
		free(t);
		return NULL;
	}
	return t;
}

int mig_toucher_join(struct mig_toucher *t, int timeout_ms)
{
	struct timespec ts;
	int ret;
	if (timeout_ms < 0) {
		ret = pthread_join(t->thread, NULL);
	} else {
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += timeout_ms / 1000;
		ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		ret = pthread_timedjoin_np(t->thread, NULL, &ts);
	}
	if (ret != 0)
		return -ret;
	free(t);
	return 0;
}

uint64_t mig_toucher_done(struct mig_toucher *t)
{
	return __atomic_load_n(&t->done, __ATOMIC_ACQUIRE);
}

int mig_toucher_tid(struct mig_toucher *t)
{
	return t->tid;
}

struct mig_handler {
	pthread_t thread;
	int uffd;
	int stop_fd;
	uint64_t src;
	uint64_t page_size;
	int64_t served;
	int error;
};

static void *mig_handler_main(void *arg)
{
	struct mig_handler *h = arg;
	struct uffd_msg msgs[64];
	struct pollfd fds[2] = {{.fd = h->uffd, .events = POLLIN}, {.fd = h->stop_fd, .events = POLLIN}};
	for (;;) {
		ssize_t n;
		int i, count;
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			h->error = -errno;
			break;
		}
		if (fds[1].revents)
			break;
		n = read(h->uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			h->error = -errno;
			break;
		}
		count = (int)(n / (ssize_t)sizeof(msgs[0]));
		for (i = 0; i < count; i++) {
			uint64_t page;
			int ret;
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			page = msgs[i].arg.pagefault.address & ~(h->page_size - 1);
			if (h->src) {
				struct uffdio_copy c = {.dst = page, .src = h->src, .len = h->page_size};
				ret = ioctl(h->uffd, UFFDIO_COPY, &c);
			} else {
				struct uffdio_zeropage z = {.range = {.start = page, .len = h->page_size}};
				ret = ioctl(h->uffd, UFFDIO_ZEROPAGE, &z);
			}
			if (ret < 0 && errno == EEXIST) {
				/* Already present (a racing install): just make sure the faulter wakes. */
				struct uffdio_range r = {.start = page, .len = h->page_size};
				ioctl(h->uffd, UFFDIO_WAKE, &r);
			} else if (ret < 0 && !h->error) {
				h->error = -errno;
			} else {
				h->served++;
			}
		}
	}
	return NULL;
}

struct mig_handler *mig_handler_start(int uffd, uint64_t src, uint64_t page_size)
{
	struct mig_handler *h = calloc(1, sizeof(*h));
	if (!h)
		return NULL;
	h->uffd = uffd;
	h->src = src;
	h->page_size = page_size;
	h->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (h->stop_fd < 0) {
		free(h);
		return NULL;
	}
	if (pthread_create(&h->thread, NULL, mig_handler_main, h) != 0) {
		close(h->stop_fd);
		free(h);
		return NULL;
	}
	return h;
}

int64_t mig_handler_stop(struct mig_handler *h)
{
	uint64_t one = 1;
	int64_t result;
	if (write(h->stop_fd, &one, sizeof(one)) < 0) {
		/* eventfd write cannot fail with a counter this small; keep the compiler quiet. */
	}
	pthread_join(h->thread, NULL);
	close(h->stop_fd);
	result = h->error ? h->error : h->served;
	free(h);
	return result;
}

/* fork without glibc's fork(): glibc takes its malloc and stdio locks before the syscall and
 * keeps them until it returns, and with EVENT_FORK the syscall waits for the handler to read the
 * event, so a handler thread that allocates (any large Python object) would deadlock. The raw
 * clone runs no atfork handlers; the child below only touches memory, write()s and _exit()s. */
static pid_t mig_raw_fork(void)
{
	return (pid_t)syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
}

int mig_fork_touch(const uint64_t *addrs, uint64_t n, int write_access, int out_fd)
{
	pid_t pid = mig_raw_fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		/* Child of a multithreaded parent: only async-signal-safe calls from here on. */
		uint8_t buf[256];
		uint64_t i = 0;
		while (i < n) {
			uint64_t k = 0;
			for (; k < sizeof(buf) && i < n; k++, i++) {
				mig_touch_one(addrs[i], write_access);
				buf[k] = *(volatile uint8_t *)(uintptr_t)addrs[i];
			}
			if (out_fd >= 0 && write(out_fd, buf, k) != (ssize_t)k)
				_exit(2);
		}
		_exit(0);
	}
	return pid;
}

int mig_fork_pause(void)
{
	pid_t pid = mig_raw_fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		for (;;)
			pause();
	}
	return pid;
}

#endif /* MIG_PROBE_C */
