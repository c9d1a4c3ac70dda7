/* Page digest kernels (see wl_digest.h).
 *
 * Per-page hash: XXH64 exactly as specified by Yann Collet ("xxHash fast digest algorithm",
 * XXH64 section), seed 0, over the page's bytes read as little-endian 64-bit lanes. For inputs of
 * 32 bytes or more it keeps four independent accumulators (one multiply-rotate-multiply round per
 * 8-byte lane), merges them, folds in the length and the tail, and ends with an avalanche
 * (xor-shift/multiply x3) so every input bit affects every output bit. Four independent lanes keep
 * the multiplier busy: it runs at memory speed on one core.
 *
 * Zero detection ORs 64-bit words (exact, no hashing): a page is zero iff every byte is 0. */

#include <stdint.h>
#include <string.h>

#define WL_XXH_P1 0x9E3779B185EBCA87ULL
#define WL_XXH_P2 0xC2B2AE3D27D4EB4FULL
#define WL_XXH_P3 0x165667B19E3779F9ULL
#define WL_XXH_P4 0x85EBCA77C2B2AE63ULL
#define WL_XXH_P5 0x27D4EB2F165667C5ULL

static inline uint64_t wl_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t wl_read64le(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* x86-64 is little-endian; memcpy keeps unaligned reads defined */
    return v;
}

static inline uint32_t wl_read32le(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t wl_xxh_round(uint64_t acc, uint64_t lane)
{
    acc += lane * WL_XXH_P2;
    acc = wl_rotl64(acc, 31);
    return acc * WL_XXH_P1;
}

static inline uint64_t wl_xxh_merge(uint64_t acc, uint64_t v)
{
    acc ^= wl_xxh_round(0, v);
    return acc * WL_XXH_P1 + WL_XXH_P4;
}

uint64_t wl_xxh64(const uint8_t *p, uint64_t len, uint64_t seed)
{
    const uint8_t *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + WL_XXH_P1 + WL_XXH_P2, v2 = seed + WL_XXH_P2, v3 = seed,
                 v4 = seed - WL_XXH_P1;
        const uint8_t *limit = end - 32;
        do {
            v1 = wl_xxh_round(v1, wl_read64le(p));
            v2 = wl_xxh_round(v2, wl_read64le(p + 8));
            v3 = wl_xxh_round(v3, wl_read64le(p + 16));
            v4 = wl_xxh_round(v4, wl_read64le(p + 24));
            p += 32;
        } while (p <= limit);
        h = wl_rotl64(v1, 1) + wl_rotl64(v2, 7) + wl_rotl64(v3, 12) + wl_rotl64(v4, 18);
        h = wl_xxh_merge(h, v1);
        h = wl_xxh_merge(h, v2);
        h = wl_xxh_merge(h, v3);
        h = wl_xxh_merge(h, v4);
    } else {
        h = seed + WL_XXH_P5;
    }
    h += len;
    while (p + 8 <= end) {
        h ^= wl_xxh_round(0, wl_read64le(p));
        h = wl_rotl64(h, 27) * WL_XXH_P1 + WL_XXH_P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)wl_read32le(p) * WL_XXH_P1;
        h = wl_rotl64(h, 23) * WL_XXH_P2 + WL_XXH_P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * WL_XXH_P5;
        h = wl_rotl64(h, 11) * WL_XXH_P1;
        p++;
    }
    h ^= h >> 33;
    h *= WL_XXH_P2;
    h ^= h >> 29;
    h *= WL_XXH_P3;
    h ^= h >> 32;
    return h;
}

void wl_hash_pages(const uint8_t *p, uint64_t npages, uint64_t page_size, uint64_t *out)
{
    for (uint64_t i = 0; i < npages; i++)
        out[i] = wl_xxh64(p + i * page_size, page_size, 0);
}

int wl_page_is_zero(const uint8_t *p, uint64_t len)
{
    uint64_t i = 0;
    /* Four words per step, OR-ed, with an early exit per 64 bytes: a non-zero page usually
     * differs in its first line, a zero page is read once at memory speed. */
    for (; i + 64 <= len; i += 64) {
        uint64_t a = wl_read64le(p + i) | wl_read64le(p + i + 8) | wl_read64le(p + i + 16) |
                     wl_read64le(p + i + 24) | wl_read64le(p + i + 32) | wl_read64le(p + i + 40) |
                     wl_read64le(p + i + 48) | wl_read64le(p + i + 56);
        if (a)
            return 0;
    }
    for (; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

uint64_t wl_zero_map(const uint8_t *p, uint64_t npages, uint64_t page_size, uint8_t *out)
{
    uint64_t zero_pages = 0;
    for (uint64_t i = 0; i < npages; i++) {
        out[i] = (uint8_t)wl_page_is_zero(p + i * page_size, page_size);
        zero_pages += out[i];
    }
    return zero_pages;
}
