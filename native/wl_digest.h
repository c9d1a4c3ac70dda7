/* Page digest: a 64-bit hash per page (XXH64, seed 0, over each page's bytes) and exact zero-page
 * detection. Used by the source (zero pages travel as a flag) and by both ends to compare regions
 * (migrate/digest.py). All functions only read memory; the GIL is released around them. */

void wl_hash_pages(const uint8_t *p, uint64_t npages, uint64_t page_size, uint64_t *out);
uint64_t wl_xxh64(const uint8_t *p, uint64_t len, uint64_t seed);
int wl_page_is_zero(const uint8_t *p, uint64_t len);
uint64_t wl_zero_map(const uint8_t *p, uint64_t npages, uint64_t page_size, uint8_t *out);
