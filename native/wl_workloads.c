/* Deterministic guest workloads whose whole state lives in their region (see wl_workloads.h).
 *
 * Rules every kind follows, so that a region copied page by page to another process at another
 * address continues to the byte-identical result:
 *   - nothing outside the region: parameters, counters, RNG state and cursors are in the control
 *     block at offset 0; data structures link by 64-bit indices, never by pointers;
 *   - the next operation depends only on the region: wl_run copies the mutable state into locals,
 *     works, and writes it back (with a checksum) before it returns, always at an operation
 *     boundary. A region is consistent only between wl_run calls: freeze a guest by asking it to
 *     pause (wl_request_pause / the pause signal) and waiting for wl_run to return, not by SIGSTOP
 *     in the middle of a call;
 *   - floating point (the Zipf sampler) uses only + - * / on IEEE doubles and our own log/exp
 *     below, never libm, so results do not depend on the C library's rounding.
 *
 * Work units: wl_run's max_ops counts init steps (phase 0: preloading keys, building the
 * permutation, marking pages) and operations alike, so init is pausable and resumable too. */

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* wl_rotl64 and wl_xxh64 come from wl_digest.c, which build.py includes before this file (the
 * .c files are included in name order into one translation unit). */

#define WL_VERSION 3
#define WL_MAGIC 0x31304c574749524dULL /* "MIGRWL01" little-endian */
#define WL_CONTROL_SIZE 4096
#define WL_MIN_SIZE (1024 * 1024)
#define WL_PAGE_SIZE 4096

#define WL_KIND_KV 1
#define WL_KIND_STREAM 2
#define WL_KIND_CHASE 3
#define WL_KIND_SPARSE 4

#define WL_DONE 0
#define WL_PAUSED 1
#define WL_BUDGET 2

#define WL_EINVAL (-EINVAL)
#define WL_EMAGIC (-1001)
#define WL_EVERSION (-1002)
#define WL_EKIND (-1003)
#define WL_ESIZE (-1004)
#define WL_EHEADER (-1005)
#define WL_ESTATE (-1006)
#define WL_ECORRUPT (-1007)

#define WL_PHASE_INIT 0
#define WL_PHASE_RUN 1
#define WL_PHASE_DONE 2

/* The progress mirror is published every this many work units (a power of two). */
#define WL_PROGRESS_EVERY 4096

struct wl_info {
    uint64_t size;
    uint64_t seed;
    uint64_t total_ops;
    uint64_t ops_done;
    uint64_t init_total;
    uint64_t init_done;
    uint64_t phase;
    uint64_t acc;
    uint32_t version;
    uint32_t kind;
};

/* The control block, at offset 0 of the region. The immutable part is covered by header_check,
 * the mutable part by state_check (both XXH64), so a torn or foreign page 0 is a clear error. */
struct wl_control {
    /* immutable */
    uint64_t magic;
    uint32_t version;
    uint32_t kind;
    uint64_t size;
    uint64_t seed;
    uint64_t total_ops;
    uint64_t init_total;
    uint64_t param[6];
    uint64_t header_check;
    /* mutable */
    uint64_t phase;
    uint64_t init_done;
    uint64_t ops_done;
    uint64_t rng[4];
    uint64_t cursor[4];
    uint64_t acc;
    uint64_t state_check;
};

_Static_assert(sizeof(struct wl_control) <= WL_CONTROL_SIZE, "control block fits its page");

static volatile sig_atomic_t wl_pause_flag;
static volatile uint64_t wl_progress_ops_mirror;
static volatile uint64_t wl_progress_init_mirror;

/* ------------------------------------------------------------------------------------------ */
/* Integer mixing and the RNG                                                                  */

/* splitmix64's finaliser (Stafford's Mix13): a bijective, well-avalanched 64-bit mix. */
static inline uint64_t wl_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* xoshiro256** (Blackman & Vigna); state lives in the control block between calls. */
static inline uint64_t wl_rng_next(uint64_t s[4])
{
    uint64_t result = wl_rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = wl_rotl64(s[3], 45);
    return result;
}

/* Maps a uniform 64-bit value to [0, n) by a 128-bit multiply (Lemire's reduction). */
static inline uint64_t wl_below(uint64_t r, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static inline double wl_unit_double(uint64_t r)
{
    return (double)(r >> 11) * 0x1.0p-53; /* [0, 1) with 53 random bits */
}

/* The floating-point code below must round the same way in every build: no fused multiply-add
 * contraction even when someone compiles with -march=native on an FMA-capable CPU. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

/* ------------------------------------------------------------------------------------------ */
/* Deterministic log/exp for the Zipf sampler (accurate to a few ulp; only + - * / used).     */

#define WL_LN2_HI 6.93147180369123816490e-01 /* fdlibm's split of ln 2 */
#define WL_LN2_LO 1.90821492927058770002e-10
#define WL_INV_LN2 1.44269504088896338700e+00

static double wl_pow2i(int64_t e) /* 2^e for -1022 <= e <= 1023 */
{
    union { double d; uint64_t u; } v;
    v.u = (uint64_t)(e + 1023) << 52;
    return v.d;
}

/* 2*atanh(f) = log((1+f)/(1-f)) by its odd series; |f| <= 0.172 here, 11 terms reach 1e-17. */
static double wl_log_series(double f)
{
    double f2 = f * f;
    double s = 2.0 / 23;
    s = 2.0 / 21 + f2 * s;
    s = 2.0 / 19 + f2 * s;
    s = 2.0 / 17 + f2 * s;
    s = 2.0 / 15 + f2 * s;
    s = 2.0 / 13 + f2 * s;
    s = 2.0 / 11 + f2 * s;
    s = 2.0 / 9 + f2 * s;
    s = 2.0 / 7 + f2 * s;
    s = 2.0 / 5 + f2 * s;
    s = 2.0 / 3 + f2 * s;
    s = 2.0 + f2 * s;
    return f * s;
}

static double wl_log(double x) /* x > 0, normal */
{
    union { double d; uint64_t u; } v = { .d = x };
    int64_t e = (int64_t)((v.u >> 52) & 0x7ff) - 1023;
    v.u = (v.u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL; /* mantissa in [1, 2) */
    double m = v.d;
    if (m > 1.4142135623730951) {
        m *= 0.5;
        e += 1;
    }
    double f = (m - 1.0) / (m + 1.0);
    return (double)e * WL_LN2_HI + (wl_log_series(f) + (double)e * WL_LN2_LO);
}

static double wl_log1p(double x) /* x > -1 */
{
    if (x > -0.25 && x < 0.25)
        return wl_log_series(x / (2.0 + x)); /* log(1+x) = 2 atanh(x / (2 + x)), exact for tiny x */
    return wl_log(1.0 + x);
}

/* 1/k! for k = 0..14 (folded by the compiler, correctly rounded). */
static const double wl_inv_fact[15] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
    1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0,
    1.0 / 87178291200.0,
};

/* sum_{k=first}^{14} r^(k-first) / k!, by Horner: multiplications only (no divisions on the
 * sampler's critical path). */
static double wl_taylor_tail(double r, int first)
{
    double p = wl_inv_fact[14];
    for (int k = 13; k >= first; k--)
        p = p * r + wl_inv_fact[k];
    return p;
}

/* exp(r) for |r| <= 0.35 by Taylor to degree 14 (truncation below 1e-18). */
static double wl_exp_small(double r)
{
    return wl_taylor_tail(r, 0);
}

static double wl_exp(double x)
{
    if (x < -700.0)
        return 0.0;
    if (x > 700.0)
        x = 700.0;
    int64_t k = (int64_t)(x * WL_INV_LN2 + (x >= 0 ? 0.5 : -0.5));
    double r = (x - (double)k * WL_LN2_HI) - (double)k * WL_LN2_LO;
    return wl_exp_small(r) * wl_pow2i(k);
}

static double wl_expm1(double x)
{
    if (x > -0.25 && x < 0.25)
        return x * wl_taylor_tail(x, 1); /* exact for tiny x, unlike exp(x) - 1 */
    return wl_exp(x) - 1.0;
}

/* ------------------------------------------------------------------------------------------ */
/* Zipf(n, s) by rejection-inversion (W. Hormann, G. Derflinger, "Rejection-inversion to generate
 * variates from monotone discrete distributions", ACM TOMACS 6(3), 1996): O(1) memory and time,
 * ranks 1..n, rank 1 the most frequent. */

#define WL_ZIPF_S 0.99

struct wl_zipf {
    double n, one_minus_s, h_x1, h_n, sc;
};

static double wl_zipf_helper1(double x) /* log1p(x)/x */
{
    if (x > 1e-8 || x < -1e-8)
        return wl_log1p(x) / x;
    return 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x));
}

static double wl_zipf_helper2(double x) /* expm1(x)/x */
{
    if (x > 1e-8 || x < -1e-8)
        return wl_expm1(x) / x;
    return 1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + 0.25 * x));
}

static double wl_zipf_hint(const struct wl_zipf *z, double x) /* integral of h: (x^(1-s)-1)/(1-s) */
{
    double lx = wl_log(x);
    return wl_zipf_helper2(z->one_minus_s * lx) * lx;
}

static double wl_zipf_h(double x) /* x^-s */
{
    return wl_exp(-WL_ZIPF_S * wl_log(x));
}

static double wl_zipf_hint_inv(const struct wl_zipf *z, double x)
{
    double t = x * z->one_minus_s;
    if (t < -1.0)
        t = -1.0;
    return wl_exp(wl_zipf_helper1(t) * x);
}

static void wl_zipf_setup(struct wl_zipf *z, uint64_t n)
{
    z->n = (double)n;
    z->one_minus_s = 1.0 - WL_ZIPF_S;
    z->h_x1 = wl_zipf_hint(z, 1.5) - 1.0;
    z->h_n = wl_zipf_hint(z, z->n + 0.5);
    z->sc = 2.0 - wl_zipf_hint_inv(z, wl_zipf_hint(z, 2.5) - wl_zipf_h(2.0));
}

static uint64_t wl_zipf_sample(const struct wl_zipf *z, uint64_t rng[4])
{
    for (;;) {
        double u = z->h_n + wl_unit_double(wl_rng_next(rng)) * (z->h_x1 - z->h_n);
        double x = wl_zipf_hint_inv(z, u);
        double kd = x + 0.5;
        uint64_t k = kd < 1.0 ? 1 : (uint64_t)kd;
        if (k > (uint64_t)z->n)
            k = (uint64_t)z->n;
        if ((double)k - x <= z->sc || u >= wl_zipf_hint(z, (double)k + 0.5) - wl_zipf_h((double)k))
            return k;
    }
}

#if !defined(__clang__) && defined(__GNUC__)
#pragma GCC pop_options
#endif

/* A 4-round Feistel network on the `bits`-bit integers (unbalanced when bits is odd: the halves
 * swap widths each round, and an even number of rounds restores them), cycle-walked into [0, n):
 * a keyed bijection of [0, n) in O(1) time and no memory. bits = ceil(log2 n), so fewer than two
 * walks are needed on average (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002). */
struct wl_perm {
    uint64_t n;
    unsigned lbits, rbits; /* widths of the left and right halves at rounds 0 and 2 */
    uint64_t keys[4];
};

static unsigned wl_perm_bits(uint64_t n)
{
    unsigned bits = 2;
    while (bits < 63 && (1ULL << bits) < n)
        bits++;
    return bits;
}

static void wl_perm_setup(struct wl_perm *p, uint64_t n, unsigned bits, uint64_t seed, uint64_t tag)
{
    p->n = n;
    p->rbits = bits / 2;
    p->lbits = bits - p->rbits;
    for (int k = 0; k < 4; k++)
        p->keys[k] = wl_mix(seed ^ (tag + (uint64_t)k));
}

static inline uint64_t wl_low_bits(uint64_t x, unsigned bits) { return x & ((1ULL << bits) - 1); }

/* Round k maps (l: a bits, r: b bits) to (r, l ^ F_k(r) mod 2^a); a and b alternate. */
static inline uint64_t wl_perm_fwd(const struct wl_perm *p, uint64_t x)
{
    do {
        unsigned a = p->lbits, b = p->rbits;
        uint64_t l = x >> b, r = wl_low_bits(x, b);
        for (int k = 0; k < 4; k++) {
            uint64_t t = l ^ wl_low_bits(wl_mix(r ^ p->keys[k]), a);
            l = r;
            r = t;
            unsigned w = a;
            a = b;
            b = w;
        }
        x = (l << b) | r;
    } while (x >= p->n);
    return x;
}

static inline uint64_t wl_perm_inv(const struct wl_perm *p, uint64_t x)
{
    do {
        unsigned b = p->rbits; /* the widths after round 3 equal those before round 0 */
        uint64_t l = x >> b, r = wl_low_bits(x, b);
        for (int k = 3; k >= 0; k--) {
            /* before round k the left half had width (k even ? lbits : rbits) */
            unsigned wa = (k % 2 == 0) ? p->lbits : p->rbits;
            uint64_t prev_r = l;
            uint64_t prev_l = r ^ wl_low_bits(wl_mix(l ^ p->keys[k]), wa);
            l = prev_l;
            r = prev_r;
        }
        x = (l << b) | r;
    } while (x >= p->n);
    return x;
}

#define WL_TAG_KV 0x6b76000000000000ULL
#define WL_TAG_SPARSE 0x7370617273650000ULL

/* ------------------------------------------------------------------------------------------ */
/* Layout of each kind                                                                         */

/* kv: slots of 64 bytes {key, version, payload[6]}, key 0 = empty; open addressing with linear
 *     probing; keys 1..nkeys preloaded (50% load), then Zipf-ranked gets (80%) and in-place
 *     puts (20%). param: [0] nslots, [1] nkeys, [2] width in bits of the home-slot permutation.
 * stream: 64-byte lines; sweep s adds a constant c(s) to every word of a window of nlines/4 lines
 *     starting at line s*nlines/16 (wrapping), so writes move sequentially through the region.
 *     param: [0] nlines, [1] window, [2] step. cursor: [0] sweep, [1] line within the sweep.
 * chase: 64-byte nodes {next ^ own index, payload[7]}; init runs Sattolo's algorithm in place
 *     (a never-written node reads as a self loop), giving one random cycle through every node;
 *     an op hops to the next node, folds its payload into acc, and writes it 1 time in 16.
 *     param: [0] nnodes. cursor: [0] current node.
 * sparse: a keyed Feistel permutation of the data pages picks nhot = npages/10 of them; init marks
 *     each (word 0), ops read-modify-write a random word of a random marked page; every other page
 *     is never touched. param: [0] npages, [1] nhot, [2] width in bits of the page permutation. */

#define WL_KV_SLOT_WORDS 8
#define WL_LINE_WORDS 8
#define WL_PAGE_WORDS (WL_PAGE_SIZE / 8)

static int wl_kind_valid(uint64_t kind)
{
    return kind >= WL_KIND_KV && kind <= WL_KIND_SPARSE;
}

/* Fills the immutable parameters for (kind, size); returns init_total. */
static uint64_t wl_layout(int kind, uint64_t size, uint64_t param[6])
{
    uint64_t data = size - WL_CONTROL_SIZE;
    memset(param, 0, 6 * sizeof(uint64_t));
    switch (kind) {
    case WL_KIND_KV:
        param[0] = data / (WL_KV_SLOT_WORDS * 8);
        param[1] = param[0] / 2;
        param[2] = wl_perm_bits(param[0]);
        return param[0]; /* init visits every slot once, in address order */
    case WL_KIND_STREAM:
        param[0] = data / (WL_LINE_WORDS * 8);
        param[1] = param[0] / 4 ? param[0] / 4 : 1;
        param[2] = param[0] / 16 ? param[0] / 16 : 1;
        return 0;
    case WL_KIND_CHASE:
        param[0] = data / 64;
        return param[0] - 1;
    case WL_KIND_SPARSE: {
        param[0] = data / WL_PAGE_SIZE;
        param[1] = param[0] / 10 ? param[0] / 10 : 1;
        param[2] = wl_perm_bits(param[0]);
        return param[1];
    }
    }
    return 0;
}

static uint64_t wl_header_hash(const struct wl_control *c)
{
    return wl_xxh64((const uint8_t *)c, offsetof(struct wl_control, header_check), 0x68656164ULL);
}

static uint64_t wl_state_hash(const struct wl_control *c)
{
    const uint8_t *start = (const uint8_t *)&c->phase;
    return wl_xxh64(start, (const uint8_t *)&c->state_check - start, 0x7374617465ULL);
}

uint64_t wl_init_steps(int kind, uint64_t size)
{
    uint64_t param[6];
    if (!wl_kind_valid((uint64_t)kind) || size < WL_MIN_SIZE)
        return 0;
    return wl_layout(kind, size, param);
}

int wl_init(uint8_t *base, uint64_t size, int kind, uint64_t seed, uint64_t total_ops)
{
    if (base == NULL || size < WL_MIN_SIZE || size % WL_PAGE_SIZE != 0 || !wl_kind_valid((uint64_t)kind))
        return WL_EINVAL;
    struct wl_control *c = (struct wl_control *)base;
    struct wl_control n;
    memset(&n, 0, sizeof n);
    n.magic = WL_MAGIC;
    n.version = WL_VERSION;
    n.kind = (uint32_t)kind;
    n.size = size;
    n.seed = seed;
    n.total_ops = total_ops;
    n.init_total = wl_layout(kind, size, n.param);
    n.header_check = wl_header_hash(&n);
    n.phase = n.init_total ? WL_PHASE_INIT : (total_ops ? WL_PHASE_RUN : WL_PHASE_DONE);
    /* Seed xoshiro from splitmix64 of (seed, kind) so kinds sharing a seed do not share a stream. */
    uint64_t sm = seed ^ ((uint64_t)kind << 56);
    for (int i = 0; i < 4; i++) {
        sm += 0x9e3779b97f4a7c15ULL;
        n.rng[i] = wl_mix(sm);
    }
    n.state_check = wl_state_hash(&n);
    memset(base, 0, WL_CONTROL_SIZE);
    memcpy(c, &n, sizeof n);
    return 0;
}

/* Checks everything that can be checked without reading the data; size 0 skips the size check
 * (wl_run uses the stored size; Python passes the real buffer length). */
static int wl_check(const struct wl_control *c, uint64_t size)
{
    if (c->magic != WL_MAGIC)
        return WL_EMAGIC;
    if (c->version != WL_VERSION)
        return WL_EVERSION;
    if (!wl_kind_valid(c->kind))
        return WL_EKIND;
    if (c->header_check != wl_header_hash(c))
        return WL_EHEADER;
    if (size != 0 && c->size != size)
        return WL_ESIZE;
    if (c->size < WL_MIN_SIZE || c->size % WL_PAGE_SIZE != 0)
        return WL_EHEADER;
    uint64_t param[6];
    uint64_t init_total = wl_layout((int)c->kind, c->size, param);
    if (init_total != c->init_total || memcmp(param, c->param, sizeof param) != 0)
        return WL_EHEADER;
    if (c->state_check != wl_state_hash(c))
        return WL_ESTATE;
    if (c->init_done > c->init_total || c->ops_done > c->total_ops)
        return WL_ESTATE;
    uint64_t want_phase = c->init_done < c->init_total ? WL_PHASE_INIT
                          : c->ops_done < c->total_ops ? WL_PHASE_RUN
                                                       : WL_PHASE_DONE;
    if (c->phase != want_phase || (c->phase == WL_PHASE_INIT && c->ops_done != 0))
        return WL_ESTATE;
    switch (c->kind) {
    case WL_KIND_STREAM:
        if (c->cursor[1] >= c->param[1])
            return WL_ESTATE;
        break;
    case WL_KIND_CHASE:
        if (c->cursor[0] >= c->param[0])
            return WL_ESTATE;
        break;
    }
    return 0;
}

int wl_check_control(const uint8_t *base, uint64_t size)
{
    if (base == NULL)
        return WL_EINVAL;
    if (size < WL_CONTROL_SIZE)
        return WL_ESIZE;
    return wl_check((const struct wl_control *)base, size);
}

int wl_get_info(const uint8_t *base, struct wl_info *out)
{
    const struct wl_control *c = (const struct wl_control *)base;
    out->size = c->size;
    out->seed = c->seed;
    out->total_ops = c->total_ops;
    out->ops_done = c->ops_done;
    out->init_total = c->init_total;
    out->init_done = c->init_done;
    out->phase = c->phase;
    out->acc = c->acc;
    out->version = c->version;
    out->kind = c->kind;
    return 0;
}

uint64_t wl_ops_done(const uint8_t *base) { return ((const struct wl_control *)base)->ops_done; }
uint64_t wl_total_ops(const uint8_t *base) { return ((const struct wl_control *)base)->total_ops; }
int wl_kind(const uint8_t *base) { return (int)((const struct wl_control *)base)->kind; }

const char *wl_strerror(int code)
{
    switch (code) {
    case WL_DONE: return "done";
    case WL_PAUSED: return "paused";
    case WL_BUDGET: return "budget reached";
    case WL_EINVAL: return "invalid parameters";
    case WL_EMAGIC: return "no workload control block at offset 0 (bad magic)";
    case WL_EVERSION: return "control block written by another workload version";
    case WL_EKIND: return "unknown workload kind in control block";
    case WL_ESIZE: return "region size differs from the size in the control block";
    case WL_EHEADER: return "control block header corrupted (checksum or parameters)";
    case WL_ESTATE: return "control block state corrupted (checksum or counters out of range)";
    case WL_ECORRUPT: return "workload data corrupted (structure invariant broken)";
    }
    return "unknown workload status";
}

/* ------------------------------------------------------------------------------------------ */
/* Pause request and progress                                                                  */

static void wl_pause_handler(int signo)
{
    (void)signo;
    wl_pause_flag = 1;
}

int wl_install_pause_signal(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = wl_pause_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(signo, &sa, NULL) != 0)
        return -errno;
    return 0;
}

void wl_request_pause(void) { wl_pause_flag = 1; }
void wl_clear_pause(void) { wl_pause_flag = 0; }
int wl_pause_pending(void) { return wl_pause_flag != 0; }
uint64_t wl_progress(void) { return __atomic_load_n(&wl_progress_ops_mirror, __ATOMIC_RELAXED); }
void wl_progress_reset(void)
{
    __atomic_store_n(&wl_progress_ops_mirror, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&wl_progress_init_mirror, 0, __ATOMIC_RELAXED);
}
uint64_t wl_progress_init(void) { return __atomic_load_n(&wl_progress_init_mirror, __ATOMIC_RELAXED); }

/* ------------------------------------------------------------------------------------------ */
/* The run loop                                                                                */

/* Mutable state while wl_run works; written back to the control block on every return. */
struct wl_run_state {
    uint64_t init_done, ops_done, acc;
    uint64_t rng[4];
    uint64_t cursor[4];
    uint64_t budget_left; /* UINT64_MAX when unlimited */
};

static inline uint64_t *wl_words(uint8_t *base) { return (uint64_t *)(base + WL_CONTROL_SIZE); }

/* One status check per unit: pause flag, then budget. Returns -1 to keep going. */
static inline int wl_should_stop(struct wl_run_state *s)
{
    if (__builtin_expect(wl_pause_flag != 0, 0)) {
        wl_pause_flag = 0;
        return WL_PAUSED;
    }
    if (s->budget_left == 0)
        return WL_BUDGET;
    s->budget_left--;
    return -1;
}

static inline void wl_publish(const struct wl_run_state *s)
{
    __atomic_store_n(&wl_progress_ops_mirror, s->ops_done, __ATOMIC_RELAXED);
    __atomic_store_n(&wl_progress_init_mirror, s->init_done, __ATOMIC_RELAXED);
}

/* ---- kv ---- */

/* The home slot of key k (1..nkeys) is perm(k - 1): a keyed bijection of the slots, so hot keys
 * are scattered over the whole region, and init fills the table in address order (slot i holds
 * key perm^-1(i) + 1 when that is <= nkeys) instead of writing millions of random lines. Lookups
 * still probe linearly from the home slot, as an open-addressing table does. */
static int wl_kv_init(uint8_t *base, const struct wl_control *c, struct wl_run_state *s)
{
    uint64_t *w = wl_words(base);
    struct wl_perm perm;
    wl_perm_setup(&perm, c->param[0], (unsigned)c->param[2], c->seed, WL_TAG_KV);
    while (s->init_done < c->init_total) {
        int stop = wl_should_stop(s);
        if (stop >= 0)
            return stop;
        uint64_t slot = s->init_done;
        uint64_t key = wl_perm_inv(&perm, slot) + 1;
        if (key <= c->param[1]) {
            uint64_t *e = &w[slot * WL_KV_SLOT_WORDS];
            e[0] = key;
            e[1] = 0;
            for (int j = 0; j < 6; j++)
                e[2 + j] = wl_mix((key << 3 | (uint64_t)j) ^ perm.keys[0]);
        }
        s->init_done++;
        if ((s->init_done & (WL_PROGRESS_EVERY - 1)) == 0)
            wl_publish(s);
    }
    return -1;
}

static int wl_kv_ops(uint8_t *base, const struct wl_control *c, struct wl_run_state *s)
{
    uint64_t *w = wl_words(base);
    uint64_t nslots = c->param[0];
    struct wl_perm perm;
    wl_perm_setup(&perm, nslots, (unsigned)c->param[2], c->seed, WL_TAG_KV);
    struct wl_zipf z;
    wl_zipf_setup(&z, c->param[1]);
    while (s->ops_done < c->total_ops) {
        int stop = wl_should_stop(s);
        if (stop >= 0)
            return stop;
        uint64_t key = wl_zipf_sample(&z, s->rng);
        uint64_t r = wl_rng_next(s->rng);
        uint64_t slot = wl_perm_fwd(&perm, key - 1);
        uint64_t probes = 0;
        while (w[slot * WL_KV_SLOT_WORDS] != key) {
            if (w[slot * WL_KV_SLOT_WORDS] == 0 || ++probes == nslots)
                return WL_ECORRUPT; /* a preloaded key went missing */
            if (++slot == nslots)
                slot = 0;
        }
        uint64_t *e = &w[slot * WL_KV_SLOT_WORDS];
        if (wl_below(r, 5) == 0) { /* put: 1 in 5 */
            uint64_t version = e[1] + 1;
            e[1] = version;
            for (int j = 0; j < 6; j++)
                e[2 + j] = wl_mix(e[2 + j] ^ r ^ (version << 3 | (uint64_t)j));
        } else { /* get */
            s->acc = wl_mix(s->acc ^ e[1] ^ e[2 + (r & 3)]);
        }
        s->ops_done++;
        if ((s->ops_done & (WL_PROGRESS_EVERY - 1)) == 0)
            wl_publish(s);
    }
    return WL_DONE;
}

/* ---- stream ---- */

static inline uint64_t wl_stream_start(uint64_t sweep, uint64_t nlines, uint64_t step)
{
    return (uint64_t)(((unsigned __int128)sweep * step) % nlines);
}

static int wl_stream_ops(uint8_t *base, const struct wl_control *c, struct wl_run_state *s)
{
    uint64_t *w = wl_words(base);
    uint64_t nlines = c->param[0], window = c->param[1], step = c->param[2];
    uint64_t sweep = s->cursor[0], pos = s->cursor[1];
    uint64_t start = wl_stream_start(sweep, nlines, step);
    uint64_t add = wl_mix(c->seed ^ sweep) | 1;
    int status = WL_DONE;
    while (s->ops_done < c->total_ops) {
        int stop = wl_should_stop(s);
        if (stop >= 0) {
            status = stop;
            break;
        }
        uint64_t line = start + pos;
        if (line >= nlines)
            line -= nlines;
        uint64_t *l = &w[line * WL_LINE_WORDS];
        for (int j = 0; j < WL_LINE_WORDS; j++)
            l[j] += add;
        if (++pos == window) {
            pos = 0;
            sweep++;
            start = wl_stream_start(sweep, nlines, step);
            add = wl_mix(c->seed ^ sweep) | 1;
        }
        s->ops_done++;
        if ((s->ops_done & (WL_PROGRESS_EVERY - 1)) == 0)
            wl_publish(s);
    }
    s->cursor[0] = sweep;
    s->cursor[1] = pos;
    return status;
}

/* ---- chase ---- */

static int wl_chase_init(uint8_t *base, const struct wl_control *c, struct wl_run_state *s)
{
    uint64_t *w = wl_words(base);
    uint64_t n = c->param[0];
    while (s->init_done < c->init_total) {
        int stop = wl_should_stop(s);
        if (stop >= 0)
            return stop;
        /* Sattolo: for i = n-1 down to 1, swap a[i] with a[j], j uniform in [0, i). */
        uint64_t i = n - 1 - s->init_done;
        uint64_t j = wl_below(wl_rng_next(s->rng), i);
        uint64_t ai = w[i * 8] ^ i, aj = w[j * 8] ^ j;
        w[i * 8] = aj ^ i;
        w[j * 8] = ai ^ j;
        s->init_done++;
        if ((s->init_done & (WL_PROGRESS_EVERY - 1)) == 0)
            wl_publish(s);
    }
    return -1;
}

static int wl_chase_ops(uint8_t *base, const struct wl_control *c, struct wl_run_state *s)
{
    uint64_t *w = wl_words(base);
    uint64_t n = c->param[0];
    uint64_t cur = s->cursor[0];
    int status = WL_DONE;
    while (s->ops_done < c->total_ops) {
        int stop = wl_should_stop(s);
        if (stop >= 0) {
            status = stop;
            break;
        }
        uint64_t next = w[cur * 8] ^ cur;
        if (next >= n) {
            status = WL_ECORRUPT;
            break;
        }
        cur = next;
        uint64_t r = wl_rng_next(s->rng);
        uint64_t *node = &w[cur * 8];
        s->acc = wl_mix(s->acc ^ node[1 + (r >> 32) % 7] ^ cur);
        if ((r & 15) == 0)
            node[1 + wl_below(r, 7)] += r | 1;
        s->ops_done++;
        if ((s->ops_done & (WL_PROGRESS_EVERY - 1)) == 0)
            wl_publish(s);
    }
    s->cursor[0] = cur;
    return status;
}

/* ---- sparse ---- */

static int wl_sparse_init(uint8_t *base, const struct wl_control *c, struct wl_run_state *s)
{
    uint64_t *w = wl_words(base);
    struct wl_perm perm;
    wl_perm_setup(&perm, c->param[0], (unsigned)c->param[2], c->seed, WL_TAG_SPARSE);
    while (s->init_done < c->init_total) {
        int stop = wl_should_stop(s);
        if (stop >= 0)
            return stop;
        uint64_t page = wl_perm_fwd(&perm, s->init_done);
        w[page * WL_PAGE_WORDS] = wl_mix(page ^ perm.keys[0]) | 1; /* marker: never zero */
        s->init_done++;
        if ((s->init_done & (WL_PROGRESS_EVERY - 1)) == 0)
            wl_publish(s);
    }
    return -1;
}

static int wl_sparse_ops(uint8_t *base, const struct wl_control *c, struct wl_run_state *s)
{
    uint64_t *w = wl_words(base);
    struct wl_perm perm;
    wl_perm_setup(&perm, c->param[0], (unsigned)c->param[2], c->seed, WL_TAG_SPARSE);
    while (s->ops_done < c->total_ops) {
        int stop = wl_should_stop(s);
        if (stop >= 0)
            return stop;
        uint64_t r = wl_rng_next(s->rng);
        uint64_t page = wl_perm_fwd(&perm, wl_below(r, c->param[1]));
        uint64_t word = 1 + (r & 511) % (WL_PAGE_WORDS - 1); /* never the marker word */
        uint64_t *p = &w[page * WL_PAGE_WORDS + word];
        *p = wl_mix(*p ^ r);
        s->ops_done++;
        if ((s->ops_done & (WL_PROGRESS_EVERY - 1)) == 0)
            wl_publish(s);
    }
    return WL_DONE;
}

/* ---- dispatch ---- */

int wl_run(uint8_t *base, uint64_t max_ops)
{
    if (base == NULL)
        return WL_EINVAL;
    struct wl_control *c = (struct wl_control *)base;
    int err = wl_check(c, 0);
    if (err)
        return err;

    struct wl_run_state s;
    s.init_done = c->init_done;
    s.ops_done = c->ops_done;
    s.acc = c->acc;
    memcpy(s.rng, c->rng, sizeof s.rng);
    memcpy(s.cursor, c->cursor, sizeof s.cursor);
    s.budget_left = max_ops ? max_ops : UINT64_MAX;
    wl_publish(&s); /* a resumed region shows its own progress at once, not the last publish */

    int status = -1;
    if (s.init_done < c->init_total) {
        switch (c->kind) {
        case WL_KIND_KV: status = wl_kv_init(base, c, &s); break;
        case WL_KIND_CHASE: status = wl_chase_init(base, c, &s); break;
        case WL_KIND_SPARSE: status = wl_sparse_init(base, c, &s); break;
        }
    }
    if (status == -1) { /* init complete (or none): run the operations */
        switch (c->kind) {
        case WL_KIND_KV: status = wl_kv_ops(base, c, &s); break;
        case WL_KIND_STREAM: status = wl_stream_ops(base, c, &s); break;
        case WL_KIND_CHASE: status = wl_chase_ops(base, c, &s); break;
        case WL_KIND_SPARSE: status = wl_sparse_ops(base, c, &s); break;
        }
    }
    if (status == WL_ECORRUPT)
        return status; /* leave the control block as it was: the data under it is not ours */

    c->init_done = s.init_done;
    c->ops_done = s.ops_done;
    c->acc = s.acc;
    memcpy(c->rng, s.rng, sizeof s.rng);
    memcpy(c->cursor, s.cursor, sizeof s.cursor);
    c->phase = s.init_done < c->init_total ? WL_PHASE_INIT
               : s.ops_done < c->total_ops ? WL_PHASE_RUN
                                           : WL_PHASE_DONE;
    c->state_check = wl_state_hash(c);
    wl_publish(&s);
    return status;
}
