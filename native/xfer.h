/* The post-copy fast path (migrate/fastpath.py): the fault, reply, push and ack loops of both
 * daemons in C, on the daemons' own ZeroMQ sockets, through the libzmq that pyzmq loaded.
 * Anything unusual (another message type, a header not in the canonical form, a region event,
 * an interrupted install) is handed back to Python, which decides with the full protocol. */

#define MIG_X_TICK ...
#define MIG_X_EVENTS ...
#define MIG_X_URGENT ...
#define MIG_X_BULK ...
#define MIG_X_COMPLETE ...
#define MIG_X_PUSHED_ALL ...
#define MIG_X_OUTSIDE ...
#define MIG_X_MAX_FRAMES ...
#define MIG_X_MAX_EVENTS ...
#define MIG_X_BATCH_MAX ...

/* Resolve the libzmq API in the shared object at path (the one pyzmq mapped). 0 or -errno;
 * on failure mig_zmq_error() says which step failed. */
int mig_zmq_load(const char *path);
const char *mig_zmq_error(void);

/* A message one of the loops received and hands to Python (frames stay owned by libzmq until
 * mig_x_release). */
struct mig_x_handoff {
	int nframes;          /* frames received; more than MIG_X_MAX_FRAMES are counted, not kept */
	int interrupted;      /* an install met the guest changing its region (EAGAIN/ENOENT) */
	uint64_t size[4];
	char *data[4];
	...;
};

/* Faulted-in memory held for incoming guests (see xfer.c). */
struct mig_reserve {
	char *base;
	uint64_t len;
	uint64_t filled;
	uint64_t freed;
	uint64_t used;
	uint64_t margin;
	...;
};
int mig_reserve_init(struct mig_reserve *r, char *base, uint64_t len, uint64_t margin);
int64_t mig_reserve_fill(struct mig_reserve *r, uint64_t bytes);
void mig_reserve_take(struct mig_reserve *r, uint64_t bytes);
int64_t mig_reserve_claim(struct mig_reserve *r, char *dst, uint64_t bytes);
void mig_reserve_release_all(struct mig_reserve *r);

struct mig_x_samples {
	uint64_t *ns;
	uint64_t count;
	uint64_t cap;
};

struct mig_dest_x {
	void *urgent;
	void *bulk;
	int uffd;
	uint64_t base;
	uint64_t page_size;
	uint64_t npages;
	uint8_t *present;
	uint64_t *hashes;
	uint64_t zero_hash;
	uint32_t around;          /* fault-around asked in each REQUEST */
	uint32_t slice;           /* pushed pages per UFFDIO_COPY batch; faults served between */
	uint32_t local_around;    /* staged pages installed with a faulting one */
	/* staging (hybrid): used only while stage_ready */
	char *staging;
	uint8_t *stage_state;
	int stage_ready;
	char *gather;             /* 512 pages: scattered new pages of a batch, gathered */
	struct mig_reserve *reserve; /* NULL: none */
	/* pending requests: per page first-asked time (0: none), last-sent time, request id, and
	 * whether a fault asked; plus the compact list of pending pages */
	uint64_t *pend_first;
	uint64_t *pend_sent;
	uint64_t *pend_req;
	uint8_t *pend_fault;
	uint32_t *pend_list;
	uint32_t *pend_pos;
	uint64_t pend_n;
	uint64_t next_request;
	/* counters */
	uint64_t present_count;
	uint64_t faults;
	uint64_t local_faults;
	uint64_t local_pages;
	uint64_t demand_pages;
	uint64_t pushed_pages;
	uint64_t zero_pages;
	uint64_t pushed_msgs;
	uint64_t requests_sent;
	uint64_t bulk_seq;
	uint64_t last_heard_ns;
	uint64_t last_bulk_ns;
	uint64_t last_sent_ns;
	uint64_t wakeups;         /* times the loop slept and was woken */
	uint64_t push_install_ns; /* time installing pushed pages */
	uint64_t push_slices;
	struct mig_x_samples fault_lat;    /* fault read -> the install that resolved it */
	struct mig_x_samples request_lat;  /* fault read -> REQUEST sent */
	struct mig_x_samples install_lat;  /* reply received -> installed */
	/* what is handed back */
	struct mig_x_handoff hand[2];      /* [0] urgent, [1] bulk */
	struct mig_uffd_event events[64];
	int nevents;
	uint64_t staging_newly;   /* pages a staged install put in before it was interrupted */
	int staging_interrupted;
	uint64_t bad_address;
	...;
};

int mig_dest_x_run(struct mig_dest_x *st, int timeout_ms);
/* Background install (hybrid) of about max_pages staged pages from index `from` upward, a slice
 * per UFFDIO_COPY with faults and fault replies served between slices (a reply never waits for
 * a whole batch). *reached: where it stopped; *newly: pages that became present (counted in
 * present_count). Returns 0, MIG_X_* flags of what it hands to Python (as mig_dest_x_run), or
 * -errno. */
int mig_dest_x_stage_next(struct mig_dest_x *st, uint64_t from, uint64_t max_pages,
                          uint64_t *reached, uint64_t *newly);
/* Ask for a page (the sweep: fault=0), as a fault would. 0, or -errno of the send. */
int mig_dest_x_ask(struct mig_dest_x *st, uint64_t index, int fault);
/* Send again every request older than retry_ns (0: all of them). Returns how many. */
int64_t mig_dest_x_retry(struct mig_dest_x *st, uint64_t now_ns, uint64_t retry_ns);
void mig_dest_x_resolve(struct mig_dest_x *st, uint64_t first, uint64_t end);
void mig_x_release(struct mig_x_handoff *h);

struct mig_src_x {
	void *urgent;
	void *bulk;
	int pid;
	uint64_t base;
	uint64_t page_size;
	uint64_t npages;
	uint8_t *valid;
	uint64_t valid_count;
	uint64_t seq;
	uint64_t acked;
	uint64_t cursor;
	int push;
	int push_done_sent;
	uint32_t push_batch;
	uint32_t window;
	uint32_t max_around;
	uint64_t *addrs;          /* push_batch */
	uint32_t *idx;            /* push_batch */
	uint8_t *zero;            /* push_batch */
	uint64_t unacked[64];
	uint32_t unacked_head;
	uint32_t unacked_n;
	uint64_t requests;
	uint64_t demand_pages;
	uint64_t pushed_pages;
	uint64_t zero_pages;
	uint64_t bytes_sent;
	uint64_t last_heard_ns;
	uint64_t last_sent_ns;
	uint64_t wakeups;
	uint64_t push_ns;         /* time reading and sending pushed batches */
	uint64_t push_batches;
	struct mig_x_samples service_lat;  /* REQUEST received -> faulting page sent */
	struct mig_x_handoff hand[2];
	int64_t read_error;       /* -errno (or -EIO for a short read) of process_vm_readv */
	uint64_t read_index;
	...;
};

int mig_src_x_run(struct mig_src_x *st, int timeout_ms);
/* One batch (st->idx[0..n), n <= MIG_X_BATCH_MAX) read from the guest and sent as PAGES on the
 * bulk (on_bulk) or urgent channel, zero-copy; pages marked valid, nothing else counted. Returns
 * bytes sent (0: dropped) or -errno; *zeros: the zero pages among them. */
int64_t mig_src_x_send_batch(struct mig_src_x *st, int on_bulk, uint64_t kind, uint64_t request,
                             uint64_t round, uint32_t n, int contiguous, uint32_t *zeros);

/* Protocol pieces, exposed for tests (the protocol is checked against these without sockets). */
struct mig_x_pages {
	uint64_t seq;
	uint64_t kind;
	uint64_t request;
	uint64_t round;
	const uint8_t *indexes;
	const uint8_t *zero;
	uint32_t n;
	uint32_t zeros;
	...;
};
int mig_x_parse_pages(const uint8_t *head, uint64_t len, uint64_t npages, uint64_t page_size,
                      uint64_t data_len, struct mig_x_pages *out);
int mig_x_parse_request(const uint8_t *head, uint64_t len, uint64_t npages, uint64_t *request,
                        uint64_t *index, uint64_t *around);
int mig_x_parse_ack(const uint8_t *head, uint64_t len, uint64_t *seq);
int64_t mig_x_pack_pages(uint8_t *out, uint64_t seq, uint64_t kind, uint64_t request,
                         uint64_t round, const uint32_t *indexes, const uint8_t *zero, uint32_t n);
int64_t mig_x_pack_request(uint8_t *out, uint64_t request, uint64_t index, uint64_t around);
int64_t mig_x_pack_ack(uint8_t *out, uint64_t seq);

/* The benchmark's floor (migrate bench migrate): an echo server and n timed round trips, in C. */
int64_t mig_x_echo(void *sock, uint64_t reply_len);
int mig_x_rtt(void *sock, uint32_t n, uint64_t *ns);
