/* The destination's staging of pre-copied pages (migrate/staging.py), in C for the bulk loops.
 * state[i]: 0 nothing staged, 1 data at staging + i*page, 2 a zero page. */

/* Keep one PAGES batch: page k is indexes[k]; zero[k] != 0 marks a zero page (no data); the data
 * pages follow one another in src and their hashes in data_hashes. Each data page is copied to
 * staging + index*page; state and hashes[index] are set. Returns the pages staged for the first
 * time (state was 0). Indexes must be < the region's pages (the protocol checked them). */
uint64_t mig_stage_store(char *staging, uint8_t *state, uint64_t *hashes,
                         const uint32_t *indexes, const uint8_t *zero, uint64_t n,
                         const char *src, const uint64_t *data_hashes, uint64_t zero_hash,
                         uint64_t page_size);

/* Install the staged pages of [from, to) into the registered region at dst + i*page: each run of
 * data pages with one UFFDIO_COPY from the same offset of the staging mapping, each run of zero
 * pages with one UFFDIO_ZEROPAGE, waking any waiter; a page found present (EEXIST) is skipped.
 * state[i] becomes 0 and present[i] 1 for each page handled. Stops once max_pages are handled.
 * Returns the index reached (<= to), or -errno on a failed ioctl (*newly_present counts what
 * was done before it). *newly_present: pages whose present[] went from 0 to 1. */
int64_t mig_stage_install(int fd, uint64_t dst, const char *staging, uint8_t *state,
                          uint8_t *present, uint64_t from, uint64_t to, uint64_t page_size,
                          uint64_t max_pages, uint64_t *newly_present);
