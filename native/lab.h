/* The lab's native helpers (migrate/lab): a recursion that deepens the main thread's stack, a
 * spinning thread pinned to a CPU, and a dependent random-access walk. (Its fault probe is
 * native/probe.c's mig_probe_value, which also reports the trap number and #PF error code.) */

/* Recurse until about total_bytes of stack are in use, frame_bytes per level (each frame's
 * buffer written, so the pages are really touched). Every sample_every levels, the size of the
 * [stack] VMA (from /proc/self/maps) and the depth in bytes are stored. Returns samples taken
 * (at most max_samples) or -errno. Call it on the main thread: only its stack is [stack]. */
int64_t lab_stack_grow(uint64_t total_bytes, uint64_t frame_bytes, uint64_t sample_every,
                       uint64_t *depth_out, uint64_t *vma_size_out, uint64_t max_samples);

/* A pthread pinned to cpu that spins (in this process's mm) until stopped. */
int lab_spinner_start(int cpu);
/* Stops the spinner; returns how many loop iterations it ran, or -1 if none was running. */
int64_t lab_spinner_stop(void);
/* 1 if the spinner runs SCHED_FIFO (it tries; needs CAP_SYS_NICE), else 0. */
int lab_spinner_is_rt(void);
/* sched_setaffinity(0 = calling thread) to one CPU. 0 or -errno. */
int lab_pin_self(int cpu);

/* n dependent loads at pseudo-random 64-byte-aligned offsets of [base, base+size) (each address
 * depends on the previous load, so no two misses overlap). Returns elapsed nanoseconds. */
uint64_t lab_random_chase(uint64_t base, uint64_t size, uint64_t n, uint64_t seed);
