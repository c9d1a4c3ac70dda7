/* Fault probe (sigsetjmp/siglongjmp around one access), the native toucher, and a native
 * userfaultfd handler thread for benchmarks. */

#define SIGSEGV ...
#define SIGBUS ...
#define SEGV_MAPERR ...
#define SEGV_ACCERR ...
#define SEGV_BNDERR ...
#define SEGV_PKUERR ...
#define BUS_ADRALN ...
#define BUS_ADRERR ...
#define BUS_OBJERR ...
#define BUS_MCEERR_AR ...
#define BUS_MCEERR_AO ...

#define MIG_PROBE_READ ...
#define MIG_PROBE_WRITE ...
#define MIG_PROBE_FETCH ...

struct mig_probe_result {
    int faulted;
    int signo;
    int code;
    uint64_t addr;     /* si_addr */
    uint64_t trapno;   /* x86-64: uc_mcontext.gregs[REG_TRAPNO] (14 for #PF), else 0 */
    uint64_t err;      /* x86-64: uc_mcontext.gregs[REG_ERR], the #PF error code, else 0 */
    int64_t ret;       /* mig_probe_value: the byte read, or what a fetched function returned */
};

/* Access addr (read one byte, write it back unchanged atomically, or call it) and report whether
 * it raised SIGSEGV/SIGBUS. One probe at a time per process (a mutex serialises callers). */
int mig_probe(uint64_t addr, int kind, struct mig_probe_result *out);
/* The same, but a write stores ``value`` (a real store that changes memory) and a fetch calls addr
 * as int (*)(void), keeping what it returns (or the byte read) in out->ret. */
int mig_probe_value(uint64_t addr, int kind, int value, struct mig_probe_result *out);

uint64_t mig_now_ns(void);
int mig_gettid(void);

/* Touch each page once (read a byte, or a locked add of zero for a write) and store the
 * nanoseconds each first touch took. Runs without the GIL. Returns pages touched. */
int64_t mig_touch_pages(const uint64_t *addrs, uint64_t n, int write, uint64_t *lat_ns);
int64_t mig_touch_range(uint64_t start, uint64_t npages, uint64_t stride, int write, uint64_t *lat_ns);

/* The same in a pthread started here; the arrays must outlive the join. */
struct mig_toucher;
struct mig_toucher *mig_toucher_start(const uint64_t *addrs, uint64_t n, int write, uint64_t *lat_ns);
/* 0 when joined (the toucher is then freed), -ETIMEDOUT if still running after timeout_ms. */
int mig_toucher_join(struct mig_toucher *t, int timeout_ms);
uint64_t mig_toucher_done(struct mig_toucher *t);
int mig_toucher_tid(struct mig_toucher *t);

/* A C thread serving MISSING faults of uffd with UFFDIO_COPY of the page at src (or ZEROPAGE when
 * src == 0): poll + batched read + copy, woken to stop by an eventfd. */
struct mig_handler;
struct mig_handler *mig_handler_start(int uffd, uint64_t src, uint64_t page_size);
/* Stops and frees the handler; returns the faults it served (or -errno of its first error). */
int64_t mig_handler_stop(struct mig_handler *h);

/* fork() from C (no Python runs in the child). The child touches addrs[i] in order (read a byte,
 * or a locked add of zero), writes the n bytes it read to out_fd, then _exit(0)s. Returns the
 * child's pid or -errno. With EVENT_FORK on a registered range, fork() itself blocks until the
 * parent's handler reads the FORK event, so call this from a thread other than the handler's. */
int mig_fork_touch(const uint64_t *addrs, uint64_t n, int write, int out_fd);
/* fork() a child that only waits for a signal (for process_vm_* and PAGEMAP_SCAN on a pid). */
int mig_fork_pause(void);
