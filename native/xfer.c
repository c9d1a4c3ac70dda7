/* The post-copy fast path: see xfer.h and migrate/fastpath.py.
 *
 * Why C: a remote fault is a chain of wake-ups (guest -> handler -> zmq I/O thread -> wire ->
 * peer's I/O thread -> peer's loop -> back). Python on both ends added ~250 us of work to a
 * ~125 us round trip and made a reply wait behind whole pushed batches. Here each loop runs
 * without the GIL (cffi releases it around the call) on the daemon's own sockets; a message it
 * does not fully understand is handed back to Python untouched in meaning.
 *
 * libzmq is reached through the copy pyzmq already mapped (dlopen of the same path returns the
 * same handle), so the sockets Python created are the ones used here. Python never touches those
 * sockets while a run is in progress: the run is called from the session's only thread. */
#ifndef MIG_XFER_C
#define MIG_XFER_C

#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIG_X_TICK 0
#define MIG_X_EVENTS 1
#define MIG_X_URGENT 2
#define MIG_X_BULK 4
#define MIG_X_COMPLETE 8
#define MIG_X_PUSHED_ALL 16
#define MIG_X_OUTSIDE 32
#define MIG_X_MAX_FRAMES 4
#define MIG_X_MAX_EVENTS 64
#define MIG_X_DEMAND_MAX 65 /* the faulting page and at most 64 neighbours */
#define MIG_X_BATCH_MAX 512 /* pages in one batch the source reads and sends */
#define MIG_X_READ_PIECE 16 /* pages of a pushed batch read between looks at the requests */

/* Wire constants of migrate/protocol.py. */
#define MSG_PAGES 4
#define MSG_ACK 6
#define MSG_REQUEST 9
#define BATCH_DEMAND 2
#define BATCH_PUSH 3
#define MAX_PAGES_PER_BATCH 4096
#define MAX_HEADER_BYTES (1u << 20)

/* ---- libzmq, as pyzmq loaded it ------------------------------------------------------------ */

typedef struct { uint64_t _[8]; } mig_zmq_msg_t; /* zmq_msg_t: 64 opaque bytes */
typedef struct {
	void *socket;
	int fd;
	short events;
	short revents;
} mig_zmq_pollitem_t;

#define ZMQ_DONTWAIT_ 1
#define ZMQ_SNDMORE_ 2
#define ZMQ_POLLIN_ 1

static struct {
	int loaded;
	int (*msg_init)(mig_zmq_msg_t *);
	int (*msg_recv)(mig_zmq_msg_t *, void *, int);
	void *(*msg_data)(mig_zmq_msg_t *);
	size_t (*msg_size)(const mig_zmq_msg_t *);
	int (*msg_more)(const mig_zmq_msg_t *);
	int (*msg_close)(mig_zmq_msg_t *);
	int (*msg_init_size)(mig_zmq_msg_t *, size_t);
	int (*msg_send)(mig_zmq_msg_t *, void *, int);
	int (*send)(void *, const void *, size_t, int);
	int (*poll)(mig_zmq_pollitem_t *, int, long);
	int (*err)(void);
} Z;
static char mig_zmq_err[256];

int mig_zmq_load(const char *path)
{
	void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
	if (!h)
		h = dlopen(path, RTLD_NOW);
	if (!h) {
		snprintf(mig_zmq_err, sizeof mig_zmq_err, "dlopen: %s", dlerror());
		return -ENOENT;
	}
#define SYM(field, name)                                                                     \
	do {                                                                                 \
		*(void **)&Z.field = dlsym(h, name);                                         \
		if (!Z.field) {                                                              \
			snprintf(mig_zmq_err, sizeof mig_zmq_err, "%s not exported by %s", name,  \
			         path);                                                      \
			return -ENOSYS;                                                      \
		}                                                                            \
	} while (0)
	SYM(msg_init, "zmq_msg_init");
	SYM(msg_recv, "zmq_msg_recv");
	SYM(msg_data, "zmq_msg_data");
	SYM(msg_size, "zmq_msg_size");
	SYM(msg_more, "zmq_msg_more");
	SYM(msg_close, "zmq_msg_close");
	SYM(msg_init_size, "zmq_msg_init_size");
	SYM(msg_send, "zmq_msg_send");
	SYM(send, "zmq_send");
	SYM(poll, "zmq_poll");
	SYM(err, "zmq_errno");
#undef SYM
	Z.loaded = 1;
	return 0;
}

const char *mig_zmq_error(void)
{
	return mig_zmq_err;
}

static uint64_t mig_x_now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* zmq_poll for the loops: ready items, 0 when interrupted (EINTR: nothing ready, look again),
 * or -errno. A wait that ends with something ready counts as a wake-up in *wakeups. */
static int mig_x_poll(mig_zmq_pollitem_t *items, int n, long wait, uint64_t *wakeups)
{
	int ready = Z.poll(items, n, wait);
	if (ready < 0) {
		int e = Z.err();
		if (e != EINTR)
			return -e;
		for (int i = 0; i < n; i++)
			items[i].revents = 0;
		return 0;
	}
	if (ready > 0 && wait != 0 && wakeups)
		(*wakeups)++;
	return ready;
}

struct mig_x_handoff {
	int nframes;
	int interrupted;
	uint64_t size[4];
	char *data[4];
	mig_zmq_msg_t msg[4];
};

struct mig_x_samples {
	uint64_t *ns;
	uint64_t count;
	uint64_t cap;
};

static void mig_x_sample(struct mig_x_samples *s, uint64_t ns)
{
	if (s->ns && s->count < s->cap)
		s->ns[s->count++] = ns;
}

void mig_x_release(struct mig_x_handoff *h)
{
	int kept = h->nframes < MIG_X_MAX_FRAMES ? h->nframes : MIG_X_MAX_FRAMES;
	for (int i = 0; i < kept; i++)
		Z.msg_close(&h->msg[i]);
	h->nframes = 0;
	h->interrupted = 0;
}

/* One whole message from sock into h (frames beyond MIG_X_MAX_FRAMES are read and dropped, but
 * counted). 1: received; 0: none waiting; -errno. */
static int mig_x_recv(void *sock, struct mig_x_handoff *h)
{
	int n = 0;
	for (;;) {
		mig_zmq_msg_t spare, *m = n < MIG_X_MAX_FRAMES ? &h->msg[n] : &spare;
		Z.msg_init(m);
		if (Z.msg_recv(m, sock, n == 0 ? ZMQ_DONTWAIT_ : 0) < 0) {
			int e = Z.err();
			Z.msg_close(m);
			if (n == 0 && e == EAGAIN)
				return 0;
			if (e == EINTR && n == 0)
				continue;
			h->nframes = n;
			mig_x_release(h);
			return -e;
		}
		int more = Z.msg_more(m);
		if (n < MIG_X_MAX_FRAMES) {
			h->data[n] = Z.msg_data(m);
			h->size[n] = Z.msg_size(m);
		} else {
			Z.msg_close(m);
		}
		n++;
		if (!more)
			break;
	}
	h->nframes = n;
	h->interrupted = 0;
	return 1;
}

/* Send header (+ data frame when data_len or with_data). 1 sent, 0 dropped (no peer / queue
 * full: the protocol recovers, see transport.send_frames), -errno. */
static int mig_x_send(void *sock, const uint8_t *head, size_t hlen, const void *data,
                      size_t dlen, int with_data)
{
	if (Z.send(sock, head, hlen, ZMQ_DONTWAIT_ | (with_data ? ZMQ_SNDMORE_ : 0)) < 0) {
		int e = Z.err();
		return e == EAGAIN ? 0 : -e;
	}
	if (with_data) {
		/* Once the first part is queued the rest of a multipart message always is too. */
		while (Z.send(sock, data, dlen, 0) < 0) {
			int e = Z.err();
			if (e != EINTR)
				return -e;
		}
	}
	return 1;
}

/* ---- msgpack, the canonical forms msgpack-python writes ------------------------------------ */

static uint64_t mp_be(const uint8_t *q, int len)
{
	uint64_t v = 0;
	for (int i = 0; i < len; i++)
		v = (v << 8) | q[i];
	return v;
}

static int mp_uint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
	const uint8_t *q = *p;
	if (q >= end)
		return -1;
	uint8_t t = *q++;
	int len;
	if (t <= 0x7f) {
		*out = t;
		*p = q;
		return 0;
	}
	switch (t) {
	case 0xcc: len = 1; break;
	case 0xcd: len = 2; break;
	case 0xce: len = 4; break;
	case 0xcf: len = 8; break;
	default: return -1;
	}
	if (end - q < len)
		return -1;
	*out = mp_be(q, len);
	*p = q + len;
	return 0;
}

static int mp_bin(const uint8_t **p, const uint8_t *end, const uint8_t **data, uint32_t *len)
{
	const uint8_t *q = *p;
	if (q >= end)
		return -1;
	uint8_t t = *q++;
	int nb;
	switch (t) {
	case 0xc4: nb = 1; break;
	case 0xc5: nb = 2; break;
	case 0xc6: nb = 4; break;
	default: return -1;
	}
	if (end - q < nb)
		return -1;
	uint64_t v = mp_be(q, nb);
	q += nb;
	if ((uint64_t)(end - q) < v)
		return -1;
	*data = q;
	*len = (uint32_t)v;
	*p = q + v;
	return 0;
}

static uint8_t *mp_put_uint(uint8_t *o, uint64_t v)
{
	if (v <= 0x7f) {
		*o++ = (uint8_t)v;
		return o;
	}
	int len;
	if (v <= 0xff) {
		*o++ = 0xcc;
		len = 1;
	} else if (v <= 0xffff) {
		*o++ = 0xcd;
		len = 2;
	} else if (v <= 0xffffffffull) {
		*o++ = 0xce;
		len = 4;
	} else {
		*o++ = 0xcf;
		len = 8;
	}
	for (int i = len - 1; i >= 0; i--)
		*o++ = (uint8_t)(v >> (8 * i));
	return o;
}

static uint8_t *mp_put_bin(uint8_t *o, const void *data, uint32_t len)
{
	if (len <= 0xff) {
		*o++ = 0xc4;
		*o++ = (uint8_t)len;
	} else if (len <= 0xffff) {
		*o++ = 0xc5;
		*o++ = (uint8_t)(len >> 8);
		*o++ = (uint8_t)len;
	} else {
		*o++ = 0xc6;
		for (int i = 3; i >= 0; i--)
			*o++ = (uint8_t)(len >> (8 * i));
	}
	memcpy(o, data, len);
	return o + len;
}

struct mig_x_pages {
	uint64_t seq;
	uint64_t kind;
	uint64_t request;
	uint64_t round;
	const uint8_t *indexes;
	const uint8_t *zero;
	uint32_t n;
	uint32_t zeros;
};

static uint32_t mig_x_index(const uint8_t *indexes, uint32_t i)
{
	uint32_t v;
	memcpy(&v, indexes + 4 * (size_t)i, 4); /* little-endian uint32, as array("I") packs */
	return v;
}

/* 0: a PAGES message valid in every respect protocol.decode checks; 1: anything else (another
 * type, another encoding, a violation): Python decides. */
int mig_x_parse_pages(const uint8_t *head, uint64_t len, uint64_t npages, uint64_t page_size,
                      uint64_t data_len, struct mig_x_pages *out)
{
	const uint8_t *p = head, *end = head + len;
	uint64_t type;
	uint32_t ilen, zlen;
	if (len < 2 || len > MAX_HEADER_BYTES || *p++ != 0x97)
		return 1;
	if (mp_uint(&p, end, &type) || type != MSG_PAGES)
		return 1;
	if (mp_uint(&p, end, &out->seq) || mp_uint(&p, end, &out->kind) ||
	    mp_uint(&p, end, &out->request) || mp_uint(&p, end, &out->round))
		return 1;
	if (out->kind > BATCH_PUSH || out->round > 0xffff)
		return 1;
	if (mp_bin(&p, end, &out->indexes, &ilen) || mp_bin(&p, end, &out->zero, &zlen) || p != end)
		return 1;
	if (ilen == 0 || ilen % 4 || ilen / 4 > MAX_PAGES_PER_BATCH || zlen != ilen / 4)
		return 1;
	out->n = ilen / 4;
	out->zeros = 0;
	for (uint32_t i = 0; i < out->n; i++) {
		if (mig_x_index(out->indexes, i) >= npages || out->zero[i] > 1)
			return 1;
		out->zeros += out->zero[i];
	}
	if (data_len != (uint64_t)(out->n - out->zeros) * page_size)
		return 1;
	if (out->kind == BATCH_DEMAND && out->request == 0)
		return 1;
	return 0;
}

int mig_x_parse_request(const uint8_t *head, uint64_t len, uint64_t npages, uint64_t *request,
                        uint64_t *index, uint64_t *around)
{
	const uint8_t *p = head, *end = head + len;
	uint64_t type;
	if (len < 2 || *p++ != 0x94)
		return 1;
	if (mp_uint(&p, end, &type) || type != MSG_REQUEST || mp_uint(&p, end, request) ||
	    mp_uint(&p, end, index) || mp_uint(&p, end, around) || p != end)
		return 1;
	return *index < npages && *around <= 0xffff ? 0 : 1;
}

int mig_x_parse_ack(const uint8_t *head, uint64_t len, uint64_t *seq)
{
	const uint8_t *p = head, *end = head + len;
	uint64_t type;
	if (len < 2 || *p++ != 0x92)
		return 1;
	if (mp_uint(&p, end, &type) || type != MSG_ACK || mp_uint(&p, end, seq) || p != end)
		return 1;
	return 0;
}

/* out needs 64 + 5 * n bytes. Returns the header's length. */
int64_t mig_x_pack_pages(uint8_t *out, uint64_t seq, uint64_t kind, uint64_t request,
                         uint64_t round, const uint32_t *indexes, const uint8_t *zero, uint32_t n)
{
	uint8_t *o = out;
	*o++ = 0x97;
	o = mp_put_uint(o, MSG_PAGES);
	o = mp_put_uint(o, seq);
	o = mp_put_uint(o, kind);
	o = mp_put_uint(o, request);
	o = mp_put_uint(o, round);
	o = mp_put_bin(o, indexes, 4 * n);
	o = mp_put_bin(o, zero, n);
	return o - out;
}

int64_t mig_x_pack_request(uint8_t *out, uint64_t request, uint64_t index, uint64_t around)
{
	uint8_t *o = out;
	*o++ = 0x94;
	o = mp_put_uint(o, MSG_REQUEST);
	o = mp_put_uint(o, request);
	o = mp_put_uint(o, index);
	o = mp_put_uint(o, around);
	return o - out;
}

int64_t mig_x_pack_ack(uint8_t *out, uint64_t seq)
{
	uint8_t *o = out;
	*o++ = 0x92;
	o = mp_put_uint(o, MSG_ACK);
	o = mp_put_uint(o, seq);
	return o - out;
}

/* ---- the destination's reserve of faulted-in memory --------------------------------------- */

/* Memory this daemon faulted in ahead of time and gives back just before a migration needs
 * fresh pages: the kernel then hands the same (already backed) frames to UFFDIO_COPY. On a VM
 * whose balloon reports free pages to the host, a fresh page costs a host fault (measured here:
 * 0.29 GB/s cold against 1.77 GB/s for pages just released from a reserve). */
struct mig_reserve {
	char *base;
	uint64_t len;
	uint64_t filled;   /* [0, filled) is faulted in */
	uint64_t freed;    /* [0, freed) was given back */
	uint64_t used;     /* bytes of fresh memory migrations asked for */
	uint64_t margin;   /* given back this far ahead of what was asked */
	pthread_mutex_t lock;
};

#define MIG_RESERVE_CHUNK (2ull << 20)

int mig_reserve_init(struct mig_reserve *r, char *base, uint64_t len, uint64_t margin)
{
	if (((uintptr_t)base | len) & (MIG_RESERVE_CHUNK - 1))
		return -EINVAL;
	r->base = base;
	r->len = len;
	r->filled = r->freed = r->used = 0;
	r->margin = margin;
	return -pthread_mutex_init(&r->lock, NULL);
}

/* Fault in the next `bytes` (whole chunks) of the reserve. Returns bytes now filled or -errno. */
int64_t mig_reserve_fill(struct mig_reserve *r, uint64_t bytes)
{
	pthread_mutex_lock(&r->lock);
	uint64_t from = r->filled > r->freed ? r->filled : r->freed;
	uint64_t to = from + ((bytes + MIG_RESERVE_CHUNK - 1) & ~(MIG_RESERVE_CHUNK - 1));
	pthread_mutex_unlock(&r->lock);
	if (to > r->len)
		to = r->len;
	for (uint64_t off = from; off < to; off += MIG_RESERVE_CHUNK) {
		pthread_mutex_lock(&r->lock);
		int gone = off < r->freed; /* given back meanwhile: nothing to fill there */
		pthread_mutex_unlock(&r->lock);
		if (!gone) {
			/* MADV_POPULATE_WRITE (5.14+) faults the range in without touching it from here */
			if (madvise(r->base + off, MIG_RESERVE_CHUNK, 23 /* MADV_POPULATE_WRITE */) < 0) {
				int e = errno;
				pthread_mutex_lock(&r->lock);
				gone = off < r->freed;
				pthread_mutex_unlock(&r->lock);
				if (gone)
					continue; /* given back while it was being filled */
				return -e; /* EINVAL: a kernel before 5.14 (no MADV_POPULATE_WRITE) */
			}
		}
		pthread_mutex_lock(&r->lock);
		if (off + MIG_RESERVE_CHUNK > r->filled)
			r->filled = off + MIG_RESERVE_CHUNK;
		pthread_mutex_unlock(&r->lock);
	}
	return (int64_t)r->filled;
}

/* A migration is about to use `bytes` of fresh memory: give back filled chunks up to what all
 * migrations asked for so far plus the margin. */
void mig_reserve_take(struct mig_reserve *r, uint64_t bytes)
{
	if (!r)
		return;
	pthread_mutex_lock(&r->lock);
	r->used += bytes;
	uint64_t target = r->used + r->margin;
	if (target > r->filled)
		target = r->filled;
	while (r->freed < target) {
		munmap(r->base + r->freed, MIG_RESERVE_CHUNK);
		r->freed += MIG_RESERVE_CHUNK;
	}
	pthread_mutex_unlock(&r->lock);
}

/* Move filled chunks of the reserve (whole chunks, at most `bytes`) to dst with mremap: the
 * frames stay faulted in, now at dst (the destination's staging memory), so pre-copied pages
 * are stored there without a page fault each. Counted as used, so take() keeps giving back
 * ahead of the installs that follow. Returns bytes moved (0: nothing filled left) or -errno. */
int64_t mig_reserve_claim(struct mig_reserve *r, char *dst, uint64_t bytes)
{
	uint64_t moved = 0;
	pthread_mutex_lock(&r->lock);
	while (moved + MIG_RESERVE_CHUNK <= bytes && r->freed + MIG_RESERVE_CHUNK <= r->filled) {
		void *to = mremap(r->base + r->freed, MIG_RESERVE_CHUNK, MIG_RESERVE_CHUNK,
		                  MREMAP_MAYMOVE | MREMAP_FIXED, dst + moved);
		if (to == MAP_FAILED) {
			int e = errno;
			pthread_mutex_unlock(&r->lock);
			return -e;
		}
		r->freed += MIG_RESERVE_CHUNK;
		r->used += MIG_RESERVE_CHUNK;
		moved += MIG_RESERVE_CHUNK;
	}
	pthread_mutex_unlock(&r->lock);
	return (int64_t)moved;
}

/* Give back everything still held (the reserve is done with). */
void mig_reserve_release_all(struct mig_reserve *r)
{
	pthread_mutex_lock(&r->lock);
	if (r->freed < r->len)
		munmap(r->base + r->freed, r->len - r->freed);
	r->freed = r->filled = r->len;
	pthread_mutex_unlock(&r->lock);
}

/* ---- the destination ----------------------------------------------------------------------- */

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
	uint32_t around;
	uint32_t slice;
	uint32_t local_around;
	char *staging;
	uint8_t *stage_state;
	int stage_ready;
	char *gather;
	struct mig_reserve *reserve;
	uint64_t *pend_first;
	uint64_t *pend_sent;
	uint64_t *pend_req;
	uint8_t *pend_fault;
	uint32_t *pend_list;
	uint32_t *pend_pos;
	uint64_t pend_n;
	uint64_t next_request;
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
	uint64_t wakeups;
	uint64_t push_install_ns; /* time installing pushed pages */
	uint64_t push_slices;
	struct mig_x_samples fault_lat;
	struct mig_x_samples request_lat;
	struct mig_x_samples install_lat;
	struct mig_x_handoff hand[2];
	struct mig_uffd_event events[MIG_X_MAX_EVENTS];
	int nevents;
	uint64_t staging_newly;
	int staging_interrupted;
	uint64_t bad_address;
	uint64_t last_fault_index; /* page of the last fault asked of the source (+1; 0: none) */
};

static int mig_dest_x_send_request(struct mig_dest_x *st, uint64_t index, uint64_t around)
{
	uint8_t head[40];
	int64_t len = mig_x_pack_request(head, st->pend_req[index], index, around);
	int ret = mig_x_send(st->urgent, head, (size_t)len, NULL, 0, 0);
	uint64_t now = mig_x_now();
	st->pend_sent[index] = now;
	if (ret > 0) {
		st->last_sent_ns = now;
		st->requests_sent++;
	}
	return ret < 0 ? ret : 0;
}

int mig_dest_x_ask(struct mig_dest_x *st, uint64_t index, int fault)
{
	if (index >= st->npages)
		return -EINVAL;
	if (st->pend_first[index])
		return 0;
	st->pend_first[index] = mig_x_now();
	st->pend_req[index] = st->next_request++;
	st->pend_fault[index] = (uint8_t)(fault != 0);
	st->pend_pos[index] = (uint32_t)st->pend_n;
	st->pend_list[st->pend_n++] = (uint32_t)index;
	return mig_dest_x_send_request(st, index, st->around);
}

int64_t mig_dest_x_retry(struct mig_dest_x *st, uint64_t now_ns, uint64_t retry_ns)
{
	int64_t sent = 0;
	for (uint64_t k = 0; k < st->pend_n; k++) {
		uint32_t p = st->pend_list[k];
		if (retry_ns == 0 || now_ns - st->pend_sent[p] >= retry_ns) {
			int ret = mig_dest_x_send_request(st, p, 0);
			if (ret < 0)
				return ret;
			sent++;
		}
	}
	return sent;
}

/* Pages of [first, end) that Python put in the guest (a message it handled, staged runs):
 * their requests are over. */
void mig_dest_x_resolve(struct mig_dest_x *st, uint64_t first, uint64_t end);

/* Page p is in the guest now: a request waiting for it is over (timed if a fault asked). */
static void mig_dest_x_resolved(struct mig_dest_x *st, uint64_t p, uint64_t now)
{
	if (!st->pend_first[p])
		return;
	if (st->pend_fault[p])
		mig_x_sample(&st->fault_lat, now - st->pend_first[p]);
	st->pend_first[p] = 0;
	uint32_t pos = st->pend_pos[p], last = st->pend_list[--st->pend_n];
	st->pend_list[pos] = last;
	st->pend_pos[last] = pos;
}

void mig_dest_x_resolve(struct mig_dest_x *st, uint64_t first, uint64_t end)
{
	uint64_t now = mig_x_now(), k = 0;
	while (k < st->pend_n) {
		uint32_t p = st->pend_list[k];
		if (p >= first && p < end && st->present[p])
			mig_dest_x_resolved(st, p, now); /* moves the last entry to k: look at k again */
		else
			k++;
	}
}

static void mig_dest_x_mark(struct mig_dest_x *st, uint64_t p, uint64_t hash, uint64_t now)
{
	if (st->present[p])
		return;
	st->present[p] = 1;
	st->present_count++;
	st->hashes[p] = hash;
	if (st->stage_state)
		st->stage_state[p] = 0; /* a staged copy (stale, or not yet known fresh) is moot */
	if (st->pend_n)
		mig_dest_x_resolved(st, p, now);
}

/* A fault on a staged page (fresh: STALE has come): install it and its staged followers here,
 * no round trip. 0, or MIG_X_EVENTS when the guest is changing its region. */
static int mig_dest_x_staged(struct mig_dest_x *st, uint64_t index)
{
	uint64_t end = index + st->local_around, newly = 0, now;
	if (end > st->npages)
		end = st->npages;
	int64_t reached = mig_stage_install(st->uffd, st->base, st->staging, st->stage_state,
	                                    st->present, index, end, st->page_size,
	                                    st->local_around, &newly);
	st->present_count += newly;
	st->local_pages += newly;
	st->local_faults++;
	if (reached < 0) {
		if (reached == -EAGAIN || reached == -ENOENT) {
			st->staging_interrupted = 1;
			return MIG_X_EVENTS;
		}
		return (int)reached;
	}
	now = mig_x_now();
	if (st->pend_n)
		for (uint64_t p = index; p < (uint64_t)reached; p++)
			if (st->present[p])
				mig_dest_x_resolved(st, p, now);
	return 0;
}

/* Read the guest's uffd: faults become requests (or local installs); the first other event
 * stops the batch and goes to Python with everything after it. */
static int mig_dest_x_faults(struct mig_dest_x *st)
{
	struct uffd_msg msgs[MIG_X_MAX_EVENTS];
	ssize_t got;
	do {
		got = read(st->uffd, msgs, sizeof msgs);
	} while (got < 0 && errno == EINTR);
	if (got < 0)
		return errno == EAGAIN ? 0 : -errno;
	int n = (int)(got / (ssize_t)sizeof msgs[0]);
	uint64_t page = st->page_size;
	for (int i = 0; i < n; i++) {
		if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
			for (int k = i; k < n; k++)
				mig_uffd_decode(&msgs[k], &st->events[st->nevents++]);
			return MIG_X_EVENTS;
		}
		uint64_t t = mig_x_now();
		uint64_t addr = msgs[i].arg.pagefault.address & ~(page - 1);
		if (addr < st->base || (addr - st->base) / page >= st->npages) {
			st->bad_address = addr;
			return MIG_X_OUTSIDE;
		}
		uint64_t index = (addr - st->base) / page;
		if (st->present[index]) {
			int ret = mig_uffd_wake(st->uffd, addr, page); /* installed meanwhile */
			if (ret < 0)
				return ret;
			continue;
		}
		if (st->stage_ready && st->stage_state[index]) {
			int ret = mig_dest_x_staged(st, index);
			if (ret) {
				/* Python takes this fault (the staged install did not resolve it) and the
				 * rest of the batch, in order, after the events it will read */
				for (int k = i; k < n; k++)
					mig_uffd_decode(&msgs[k], &st->events[st->nevents++]);
				return ret;
			}
			continue;
		}
		if (st->pend_first[index])
			continue;
		st->faults++;
		st->pend_first[index] = t;
		st->pend_req[index] = st->next_request++;
		st->pend_fault[index] = 1;
		st->pend_pos[index] = (uint32_t)st->pend_n;
		st->pend_list[st->pend_n++] = (uint32_t)index;
		/* Fault-around follows locality, like readahead: a fault just after the previous one
		 * (a forward sweep) asks for the pages that follow it; an isolated fault asks for its
		 * page alone. The neighbours travel on the urgent channel and delay the reply's
		 * processing (measured, kv 1 GiB post-copy: p50 109-115 us with 8 neighbours on every
		 * fault, 97-103 us with none), while random access gets nothing from them. */
		uint64_t around = 0;
		if (st->last_fault_index && index >= st->last_fault_index &&
		    index < st->last_fault_index + 2 * ((uint64_t)st->around + 1))
			around = st->around;
		st->last_fault_index = index + 1;
		int ret = mig_dest_x_send_request(st, index, around);
		if (ret < 0)
			return ret;
		mig_x_sample(&st->request_lat, mig_x_now() - t);
	}
	return 0;
}

/* Install the pages [from, to) of a parsed batch that are not present yet, waking waiters, and
 * mark them present with their hashes. *data_off: where page `from`'s bytes start in the frame
 * (advanced past the batch's data pages). 0 or the ioctl's -errno (EAGAIN/ENOENT: the guest is
 * changing its region). At most 512 pages a call. */
static int mig_dest_x_install(struct mig_dest_x *st, const struct mig_x_pages *m,
                              const char *frame, uint32_t from, uint32_t to, uint64_t *data_off)
{
	uint64_t page = st->page_size, installed = 0, off = *data_off;
	uint64_t addrs[512], zaddrs[512], srcoff[512];
	int nz = 0, nd = 0, contiguous = 1, ret;
	const char *src = frame;
	if (to - from > 512)
		return -EINVAL;
	for (uint32_t k = from; k < to; k++) {
		uint64_t p = mig_x_index(m->indexes, k);
		if (m->zero[k]) {
			if (!st->present[p])
				zaddrs[nz++] = st->base + p * page;
			continue;
		}
		if (!st->present[p]) {
			srcoff[nd] = off;
			if (nd && off != srcoff[0] + (uint64_t)nd * page)
				contiguous = 0;
			addrs[nd++] = st->base + p * page;
		}
		off += page;
	}
	*data_off = off;
	if (nd) {
		mig_reserve_take(st->reserve, (uint64_t)nd * page);
		if (contiguous) {
			src = frame + srcoff[0];
		} else {
			for (int d = 0; d < nd; d++)
				memcpy(st->gather + (uint64_t)d * page, frame + srcoff[d], page);
			src = st->gather;
		}
		ret = mig_uffd_copy_pages(st->uffd, addrs, (uint64_t)nd, src, page, 1, &installed);
		if (ret < 0)
			return ret;
	}
	if (nz) {
		ret = mig_uffd_zero_pages(st->uffd, zaddrs, (uint64_t)nz, page, 1, &installed);
		if (ret < 0)
			return ret;
	}
	uint64_t now = mig_x_now();
	for (int d = 0; d < nd; d++)
		mig_dest_x_mark(st, (addrs[d] - st->base) / page,
		                wl_xxh64((const uint8_t *)src + (uint64_t)d * page, page, 0), now);
	for (int z = 0; z < nz; z++)
		mig_dest_x_mark(st, (zaddrs[z] - st->base) / page, st->zero_hash, now);
	return 0;
}

static int mig_dest_x_urgent(struct mig_dest_x *st);

/* Faults and fast urgent messages, without waiting (between slices of a pushed batch). */
static int mig_dest_x_service(struct mig_dest_x *st)
{
	struct pollfd pf = {.fd = st->uffd, .events = POLLIN};
	if (poll(&pf, 1, 0) > 0) {
		int ret = mig_dest_x_faults(st);
		if (ret)
			return ret;
	}
	return st->hand[0].nframes ? 0 : mig_dest_x_urgent(st);
}

/* A DEMAND reply: the faulting page alone first (its thread wakes after one ioctl), then the
 * neighbours. Anything else on the urgent channel: MIG_X_URGENT (kept in hand[0] for Python). */
static int mig_dest_x_on_urgent(struct mig_dest_x *st, uint64_t arrival)
{
	struct mig_x_handoff *h = &st->hand[0];
	struct mig_x_pages m;
	if (h->nframes != 2 ||
	    mig_x_parse_pages((const uint8_t *)h->data[0], h->size[0], st->npages, st->page_size,
	                      h->size[1], &m) ||
	    m.kind != BATCH_DEMAND)
		return MIG_X_URGENT;
	uint64_t first = mig_x_index(m.indexes, 0), off = 0;
	int timed = st->pend_first[first] && st->pend_fault[first];
	int ret = mig_dest_x_install(st, &m, h->data[1], 0, 1, &off);
	if (ret == 0 && timed)
		mig_x_sample(&st->install_lat, mig_x_now() - arrival);
	for (uint32_t from = 1; ret == 0 && from < m.n; from += 512)
		ret = mig_dest_x_install(st, &m, h->data[1], from, m.n < from + 512 ? m.n : from + 512,
		                         &off);
	if (ret == -EAGAIN || ret == -ENOENT) {
		h->interrupted = 1;
		return MIG_X_URGENT;
	}
	if (ret < 0)
		return ret;
	st->demand_pages += m.n;
	st->zero_pages += m.zeros;
	return 0;
}

/* Every message waiting on the urgent channel; stops at one that goes to Python. */
static int mig_dest_x_urgent(struct mig_dest_x *st)
{
	for (;;) {
		int got = mig_x_recv(st->urgent, &st->hand[0]);
		if (got <= 0)
			return got;
		uint64_t now = mig_x_now();
		st->last_heard_ns = now;
		int ret = mig_dest_x_on_urgent(st, now);
		if (ret)
			return ret;
		mig_x_release(&st->hand[0]);
	}
}

/* A pushed batch, in slices with faults and fault replies served between them; then its ACK. */
static int mig_dest_x_on_bulk(struct mig_dest_x *st)
{
	struct mig_x_handoff *h = &st->hand[1];
	struct mig_x_pages m;
	int flags = 0;
	if (h->nframes != 2 ||
	    mig_x_parse_pages((const uint8_t *)h->data[0], h->size[0], st->npages, st->page_size,
	                      h->size[1], &m) ||
	    m.kind != BATCH_PUSH)
		return MIG_X_BULK;
	uint64_t off = 0;
	uint32_t slice = st->slice ? st->slice : 32;
	if (slice > 512)
		slice = 512;
	for (uint32_t from = 0; from < m.n; from += slice) {
		uint32_t to = m.n < from + slice ? m.n : from + slice;
		uint64_t t0 = mig_x_now();
		int ret = mig_dest_x_install(st, &m, h->data[1], from, to, &off);
		st->push_install_ns += mig_x_now() - t0;
		st->push_slices++;
		if (ret == -EAGAIN || ret == -ENOENT) {
			h->interrupted = 1;
			return flags | MIG_X_BULK;
		}
		if (ret < 0)
			return ret;
		if (to < m.n) {
			ret = mig_dest_x_service(st);
			if (ret < 0 || (ret & (MIG_X_EVENTS | MIG_X_OUTSIDE))) {
				/* the guest is changing its region: Python installs the rest its way */
				h->interrupted = 1;
				return ret < 0 ? ret : ret | MIG_X_BULK;
			}
			flags |= ret;
		}
	}
	st->pushed_pages += m.n;
	st->zero_pages += m.zeros;
	st->pushed_msgs++;
	st->bulk_seq = m.seq;
	uint8_t head[16];
	int64_t len = mig_x_pack_ack(head, m.seq);
	int ret = mig_x_send(st->bulk, head, (size_t)len, NULL, 0, 0);
	if (ret < 0)
		return ret;
	st->last_sent_ns = mig_x_now();
	mig_x_release(h);
	return flags;
}

int mig_dest_x_stage_next(struct mig_dest_x *st, uint64_t from, uint64_t max_pages,
                          uint64_t *reached, uint64_t *newly)
{
	uint32_t slice = st->slice ? st->slice : 16;
	uint64_t i = from, budget = max_pages;
	*newly = 0;
	*reached = from;
	if (!Z.loaded)
		return -ENOSYS;
	if (st->hand[0].nframes || st->hand[1].nframes || st->nevents)
		return -EBUSY;
	if (!st->stage_ready || !st->staging)
		return 0;
	while (i < st->npages && budget) {
		uint64_t n = 0, want = budget < slice ? budget : slice;
		int64_t r = mig_stage_install(st->uffd, st->base, st->staging, st->stage_state,
		                              st->present, i, st->npages, st->page_size, want, &n);
		st->present_count += n;
		st->local_pages += n;
		*newly += n;
		if (r < 0) {
			*reached = i;
			if (r == -EAGAIN || r == -ENOENT) {
				st->staging_interrupted = 1;
				return MIG_X_EVENTS;
			}
			return (int)r;
		}
		if (st->pend_n)
			mig_dest_x_resolve(st, i, (uint64_t)r);
		budget -= want;
		i = (uint64_t)r;
		*reached = i;
		if (i < st->npages) {
			int ret = mig_dest_x_service(st);
			if (ret)
				return ret;
		}
	}
	return 0;
}

int mig_dest_x_run(struct mig_dest_x *st, int timeout_ms)
{
	uint64_t deadline = mig_x_now() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	if (!Z.loaded)
		return -ENOSYS;
	if (st->hand[0].nframes || st->hand[1].nframes || st->nevents)
		return -EBUSY; /* Python has not taken what the last run handed over */
	for (;;) {
		if (st->present_count >= st->npages)
			return MIG_X_COMPLETE;
		uint64_t now = mig_x_now();
		long wait = now >= deadline ? 0 : (long)((deadline - now + 999999) / 1000000);
		mig_zmq_pollitem_t items[3] = {
			{.socket = st->urgent, .events = ZMQ_POLLIN_},
			{.socket = st->bulk, .events = ZMQ_POLLIN_},
			{.socket = NULL, .fd = st->uffd, .events = ZMQ_POLLIN_},
		};
		int ready = mig_x_poll(items, 3, wait, &st->wakeups);
		if (ready < 0)
			return ready;
		int ret;
		if (items[2].revents) {
			ret = mig_dest_x_faults(st);
			if (ret)
				return ret;
		}
		ret = mig_dest_x_urgent(st);
		if (ret)
			return ret;
		if (items[1].revents & ZMQ_POLLIN_) {
			/* One bulk message per turn: a fault reply never waits behind more than one. */
			int got = mig_x_recv(st->bulk, &st->hand[1]);
			if (got < 0)
				return got;
			if (got > 0) {
				st->last_heard_ns = st->last_bulk_ns = mig_x_now();
				ret = mig_dest_x_on_bulk(st);
				if (ret)
					return ret;
			}
		}
		if (mig_x_now() >= deadline)
			return MIG_X_TICK;
	}
}

/* ---- the source ------------------------------------------------------------------------------ */

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
	uint64_t *addrs;
	uint32_t *idx;
	uint8_t *zero;
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
	struct mig_x_samples service_lat;
	struct mig_x_handoff hand[2];
	int64_t read_error;
	uint64_t read_index;
	/* a fault's reply is built here, so one can be served while a push batch is half done */
	uint32_t didx[MIG_X_DEMAND_MAX];
	uint8_t dzero[MIG_X_DEMAND_MAX];
	uint64_t daddrs[MIG_X_DEMAND_MAX];
	char dbuf[MIG_X_DEMAND_MAX * 4096];
};

static int mig_src_x_requests(struct mig_src_x *st);

/* Read n pages (idx[0..n), contiguous when contiguous) of the guest into buf. 0 or -errno
 * (-EIO for a short read), recorded for the report. */
static int mig_src_x_read(struct mig_src_x *st, const uint32_t *idx, uint32_t n, int contiguous,
                          char *buf, uint64_t *addrs)
{
	uint64_t page = st->page_size, want = (uint64_t)n * page;
	int64_t got;
	if (contiguous) {
		got = mig_process_read(st->pid, (uint64_t)(uintptr_t)buf,
		                       st->base + (uint64_t)idx[0] * page, want);
	} else {
		for (uint32_t k = 0; k < n; k++)
			addrs[k] = st->base + (uint64_t)idx[k] * page;
		got = mig_process_read_pages(st->pid, addrs, n, page, (uint64_t)(uintptr_t)buf);
	}
	if (got < 0 || (uint64_t)got != want) {
		st->read_error = got < 0 ? got : -EIO;
		st->read_index = idx[0];
		return got < 0 ? (int)got : -EIO;
	}
	return 0;
}

/* Flag the zero pages of buf and move the others together (in place). Returns the data bytes. */
static uint64_t mig_src_x_compact(struct mig_src_x *st, char *buf, uint32_t n, uint8_t *zero,
                                  uint32_t *zeros)
{
	uint64_t page = st->page_size, dlen = 0;
	*zeros = 0;
	for (uint32_t k = 0; k < n; k++) {
		char *pg = buf + (uint64_t)k * page;
		zero[k] = (uint8_t)wl_page_is_zero((const uint8_t *)pg, page);
		if (zero[k]) {
			(*zeros)++;
			continue;
		}
		if (buf + dlen != pg)
			memmove(buf + dlen, pg, page);
		dlen += page;
	}
	return dlen;
}

/* The header of a batch already read (and compacted), then its data: from buf with a copy, or
 * as the zmq message msg itself (no copy) when msg is given. Marks the pages valid. Returns
 * the header's length (0 when the message was dropped: no peer, queue full) or -errno. */
static int64_t mig_src_x_finish(struct mig_src_x *st, void *sock, uint64_t kind,
                                uint64_t request, uint64_t round, const uint32_t *idx,
                                const uint8_t *zero, uint32_t n, const char *buf, uint64_t dlen,
                                mig_zmq_msg_t *msg)
{
	uint8_t head[64 + 5 * MIG_X_BATCH_MAX];
	int64_t hlen = mig_x_pack_pages(head, ++st->seq, kind, request, round, idx, zero, n);
	int sent;
	if (!msg) {
		sent = mig_x_send(sock, head, (size_t)hlen, buf, dlen, 1);
	} else if (Z.send(sock, head, (size_t)hlen, ZMQ_DONTWAIT_ | ZMQ_SNDMORE_) < 0) {
		int e = Z.err();
		Z.msg_close(msg);
		sent = e == EAGAIN ? 0 : -e;
	} else {
		while (Z.msg_send(msg, sock, 0) < 0) {
			int e = Z.err();
			if (e != EINTR) {
				Z.msg_close(msg);
				return -e;
			}
		}
		sent = 1;
	}
	if (sent < 0)
		return sent;
	st->last_sent_ns = mig_x_now();
	for (uint32_t k = 0; k < n; k++) {
		if (!st->valid[idx[k]]) {
			st->valid[idx[k]] = 1;
			st->valid_count++;
		}
	}
	return sent ? hlen : 0;
}

/* Account for a batch the loop sent: bytes, zero pages, the window. */
static void mig_src_x_sent(struct mig_src_x *st, void *sock, int64_t hlen, uint64_t dlen,
                           uint32_t zeros)
{
	if (hlen <= 0)
		return;
	if (sock == st->bulk && st->unacked_n < 64)
		st->unacked[(st->unacked_head + st->unacked_n++) % 64] = st->seq;
	st->bytes_sent += dlen + (uint64_t)hlen;
	st->zero_pages += zeros;
}

/* Read the pages idx[0..n) straight into a zmq message and send it as one PAGES (zero pages cut
 * out as flags, which costs a copy). Returns the header's length (0 if dropped) or -errno;
 * *dlen_out and *zeros_out say what went. With serve_between, requests that arrived while the
 * pages were read are answered before they are sent. */
static int64_t mig_src_x_send_read(struct mig_src_x *st, void *sock, uint64_t kind,
                                   uint64_t request, uint64_t round, uint32_t n, int contiguous,
                                   int serve_between, uint64_t *dlen_out, uint32_t *zeros_out)
{
	uint64_t want = (uint64_t)n * st->page_size;
	mig_zmq_msg_t msg;
	if (n == 0 || n > MIG_X_BATCH_MAX)
		return -EINVAL;
	if (Z.msg_init_size(&msg, want) < 0)
		return -Z.err();
	char *data = Z.msg_data(&msg);
	/* With serve_between the batch is read a piece at a time and requests that arrived are
	 * answered after each piece: a fault then waits for at most one piece (64 KiB, ~10 us)
	 * instead of the whole batch (512 KiB, ~100 us). */
	uint32_t piece = serve_between ? MIG_X_READ_PIECE : n;
	int ret = 0;
	for (uint32_t k = 0; k < n && ret >= 0; k += piece) {
		uint32_t m = n - k < piece ? n - k : piece;
		ret = mig_src_x_read(st, st->idx + k, m, contiguous, data + (uint64_t)k * st->page_size,
		                     st->addrs + k);
		if (ret == 0 && serve_between && !st->hand[0].nframes)
			ret = mig_src_x_requests(st); /* the guest waits on a request, not on the push */
	}
	if (ret < 0) {
		Z.msg_close(&msg);
		return ret;
	}
	uint32_t zeros;
	uint64_t dlen = mig_src_x_compact(st, data, n, st->zero, &zeros);
	int64_t hlen;
	if (zeros) {
		hlen = mig_src_x_finish(st, sock, kind, request, round, st->idx, st->zero, n, data,
		                        dlen, NULL);
		Z.msg_close(&msg);
	} else {
		hlen = mig_src_x_finish(st, sock, kind, request, round, st->idx, st->zero, n, NULL,
		                        dlen, &msg);
	}
	*dlen_out = dlen;
	*zeros_out = zeros;
	return hlen;
}

int64_t mig_src_x_send_batch(struct mig_src_x *st, int on_bulk, uint64_t kind, uint64_t request,
                             uint64_t round, uint32_t n, int contiguous, uint32_t *zeros)
{
	uint64_t dlen = 0;
	if (!Z.loaded)
		return -ENOSYS;
	int64_t hlen = mig_src_x_send_read(st, on_bulk ? st->bulk : st->urgent, kind, request, round,
	                                   n, contiguous, 0, &dlen, zeros);
	return hlen <= 0 ? hlen : hlen + (int64_t)dlen;
}

/* A reply of n (<= MIG_X_DEMAND_MAX) contiguous pages from idx0, built in the demand buffers. */
static int mig_src_x_reply(struct mig_src_x *st, uint64_t request, uint64_t idx0, uint32_t n)
{
	uint32_t zeros;
	for (uint32_t k = 0; k < n; k++)
		st->didx[k] = (uint32_t)(idx0 + k);
	int ret = mig_src_x_read(st, st->didx, n, 1, st->dbuf, st->daddrs);
	if (ret < 0)
		return ret;
	uint64_t dlen = mig_src_x_compact(st, st->dbuf, n, st->dzero, &zeros);
	int64_t hlen = mig_src_x_finish(st, st->urgent, BATCH_DEMAND, request, 0, st->didx, st->dzero,
	                                n, st->dbuf, dlen, NULL);
	if (hlen < 0)
		return (int)hlen;
	mig_src_x_sent(st, st->urgent, hlen, dlen, zeros);
	return 0;
}

/* The faulting page goes alone first, so the destination can wake the guest as soon as 4 KiB
 * have crossed; its unsent neighbours (fault-around) follow in a second reply. */
static int mig_src_x_serve(struct mig_src_x *st, uint64_t request, uint64_t index,
                           uint64_t around, uint64_t arrival)
{
	st->requests++;
	int ret = mig_src_x_reply(st, request, index, 1);
	if (ret < 0)
		return ret;
	mig_x_sample(&st->service_lat, mig_x_now() - arrival);
	uint64_t j = index + 1, lim = around < st->max_around ? around : st->max_around;
	if (lim > MIG_X_DEMAND_MAX - 1)
		lim = MIG_X_DEMAND_MAX - 1;
	uint64_t limit = j + lim < st->npages ? j + lim : st->npages;
	while (j < limit && !st->valid[j])
		j++;
	if (j > index + 1) {
		ret = mig_src_x_reply(st, request, index + 1, (uint32_t)(j - index - 1));
		if (ret < 0)
			return ret;
	}
	st->demand_pages += j - index;
	st->cursor = j;
	return 0;
}

/* Every request waiting on the urgent channel; one that is not a request stays in hand[0]
 * (1 is returned) for Python. */
static int mig_src_x_requests(struct mig_src_x *st)
{
	while (!st->hand[0].nframes) {
		int got = mig_x_recv(st->urgent, &st->hand[0]);
		if (got <= 0)
			return got;
		uint64_t arrival = mig_x_now(), request, index, around;
		st->last_heard_ns = arrival;
		struct mig_x_handoff *h = &st->hand[0];
		if (h->nframes != 1 ||
		    mig_x_parse_request((const uint8_t *)h->data[0], h->size[0], st->npages, &request,
		                        &index, &around))
			return 1;
		mig_x_release(h);
		int ret = mig_src_x_serve(st, request, index, around, arrival);
		if (ret < 0)
			return ret;
	}
	return 1;
}

/* Up to push_batch pages the destination lacks, from the cursor onward (wrapping once to the
 * start): one contiguous run when there is one, else the scattered pages gathered. */
static int mig_src_x_push(struct mig_src_x *st)
{
	uint64_t n = st->npages, i = st->cursor < n ? st->cursor : 0;
	const uint8_t *hit = memchr(st->valid + i, 0, n - i);
	if (!hit) {
		hit = memchr(st->valid, 0, n);
		if (!hit)
			return 0;
	}
	i = (uint64_t)(hit - st->valid);
	uint32_t count = 0;
	while (i < n && count < st->push_batch) {
		st->idx[count++] = (uint32_t)i;
		hit = memchr(st->valid + i + 1, 0, n - i - 1);
		if (!hit)
			break;
		i = (uint64_t)(hit - st->valid);
	}
	int contiguous = st->idx[count - 1] - st->idx[0] == count - 1;
	uint64_t t0 = mig_x_now(), dlen = 0;
	uint32_t zeros = 0;
	int64_t hlen = mig_src_x_send_read(st, st->bulk, BATCH_PUSH, 0, 0, count, contiguous, 1, &dlen,
	                                   &zeros);
	int ret = hlen < 0 ? (int)hlen : 0;
	mig_src_x_sent(st, st->bulk, hlen, dlen, zeros);
	st->push_ns += mig_x_now() - t0;
	st->push_batches++;
	if (ret < 0)
		return ret;
	st->pushed_pages += count;
	st->cursor = (uint64_t)st->idx[count - 1] + 1;
	return 0;
}

int mig_src_x_run(struct mig_src_x *st, int timeout_ms)
{
	uint64_t deadline = mig_x_now() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	if (!Z.loaded)
		return -ENOSYS;
	if (st->hand[0].nframes || st->hand[1].nframes)
		return -EBUSY;
	if (st->push_batch == 0 || st->push_batch > 512 || st->window == 0 || st->window > 64)
		return -EINVAL;
	for (;;) {
		if (st->valid_count >= st->npages && !st->push_done_sent)
			return MIG_X_PUSHED_ALL;
		int can_push = st->push && st->valid_count < st->npages && st->unacked_n < st->window;
		uint64_t now = mig_x_now();
		long wait = can_push || now >= deadline ? 0 : (long)((deadline - now + 999999) / 1000000);
		mig_zmq_pollitem_t items[2] = {
			{.socket = st->urgent, .events = ZMQ_POLLIN_},
			{.socket = st->bulk, .events = ZMQ_POLLIN_},
		};
		int ready = mig_x_poll(items, 2, wait, &st->wakeups);
		if (ready < 0)
			return ready;
		int ret = mig_src_x_requests(st); /* requests first */
		if (ret < 0)
			return ret;
		if (ret > 0)
			return MIG_X_URGENT;
		for (;;) { /* acknowledgements */
			int got = mig_x_recv(st->bulk, &st->hand[1]);
			if (got < 0)
				return got;
			if (got == 0)
				break;
			uint64_t seq;
			struct mig_x_handoff *h = &st->hand[1];
			st->last_heard_ns = mig_x_now();
			if (h->nframes != 1 ||
			    mig_x_parse_ack((const uint8_t *)h->data[0], h->size[0], &seq))
				return MIG_X_BULK;
			mig_x_release(h);
			if (seq > st->acked)
				st->acked = seq;
			while (st->unacked_n && st->unacked[st->unacked_head] <= st->acked) {
				st->unacked_head = (st->unacked_head + 1) % 64;
				st->unacked_n--;
			}
		}
		if (st->push && st->valid_count < st->npages && st->unacked_n < st->window) {
			ret = mig_src_x_push(st);
			if (ret < 0)
				return ret;
			if (st->hand[0].nframes)
				return MIG_X_URGENT; /* met while the batch was read */
		}
		if (mig_x_now() >= deadline)
			return MIG_X_TICK;
	}
}

/* ---- the benchmark's floor: the same round trip, in C on both ends --------------------------- */

/* Answer every message on sock with reply_len bytes until a one-byte "q". Returns requests
 * answered or -errno. */
int64_t mig_x_echo(void *sock, uint64_t reply_len)
{
	static char reply[1 << 16];
	struct mig_x_handoff h = {0};
	int64_t count = 0;
	if (!Z.loaded || reply_len > sizeof reply)
		return -EINVAL;
	for (;;) {
		mig_zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN_};
		int ready = mig_x_poll(&item, 1, -1, NULL);
		if (ready < 0)
			return ready;
		int got = mig_x_recv(sock, &h);
		if (got < 0)
			return got;
		if (got == 0)
			continue;
		int quit = h.nframes == 1 && h.size[0] == 1 && h.data[0][0] == 'q';
		mig_x_release(&h);
		if (quit)
			return count;
		if (Z.send(sock, reply, reply_len, 0) < 0)
			return -Z.err();
		count++;
	}
}

/* n round trips: a 16-byte request, a reply awaited (blocking, as a fault's loop waits);
 * ns[i] is each one's duration. 0 or -errno. */
int mig_x_rtt(void *sock, uint32_t n, uint64_t *ns)
{
	char req[16] = {0};
	struct mig_x_handoff h = {0};
	if (!Z.loaded)
		return -ENOSYS;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t t0 = mig_x_now();
		if (Z.send(sock, req, sizeof req, 0) < 0)
			return -Z.err();
		for (;;) {
			mig_zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN_};
			int ready = mig_x_poll(&item, 1, -1, NULL);
			if (ready < 0)
				return ready;
			int got = mig_x_recv(sock, &h);
			if (got < 0)
				return got;
			if (got > 0)
				break;
		}
		mig_x_release(&h);
		ns[i] = mig_x_now() - t0;
	}
	return 0;
}

#endif /* MIG_XFER_C */
