/* Staging of pre-copied pages at the destination: see uffd_stage.h and migrate/staging.py. */
#ifndef MIG_UFFD_STAGE_C
#define MIG_UFFD_STAGE_C

#include <stdint.h>
#include <string.h>

uint64_t mig_stage_store(char *staging, uint8_t *state, uint64_t *hashes,
                         const uint32_t *indexes, const uint8_t *zero, uint64_t n,
                         const char *src, const uint64_t *data_hashes, uint64_t zero_hash,
                         uint64_t page_size)
{
	uint64_t first_time = 0, k = 0;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t p = indexes[i];
		if (!state[p])
			first_time++;
		if (zero[i]) {
			state[p] = 2;
			hashes[p] = zero_hash;
			continue;
		}
		/* Consecutive indexes are consecutive in src too: one memcpy for the whole run. */
		uint64_t j = i + 1;
		while (j < n && !zero[j] && indexes[j] == indexes[j - 1] + 1)
			j++;
		memcpy(staging + p * page_size, src + k * page_size, (j - i) * page_size);
		for (uint64_t m = i; m < j; m++) {
			uint64_t q = indexes[m];
			if (m > i && !state[q])
				first_time++;
			state[q] = 1;
			hashes[q] = data_hashes[k++];
		}
		i = j - 1;
	}
	return first_time;
}

int64_t mig_stage_install(int fd, uint64_t dst, const char *staging, uint8_t *state,
                          uint8_t *present, uint64_t from, uint64_t to, uint64_t page_size,
                          uint64_t max_pages, uint64_t *newly_present)
{
	uint64_t i = from, handled = 0, fresh = 0;
	*newly_present = 0;
	while (i < to && handled < max_pages) {
		uint8_t kind = state[i];
		if (!kind) {
			i++;
			continue;
		}
		uint64_t j = i + 1, done = 0, stop = i + (max_pages - handled);
		if (stop > to)
			stop = to;
		while (j < stop && state[j] == kind)
			j++;
		int ret = mig_uffd_fill_range(fd, dst + i * page_size,
		                              kind == 1 ? staging + i * page_size : NULL,
		                              (j - i) * page_size, page_size, 0, &done);
		if (ret < 0) {
			*newly_present = fresh;
			return ret;
		}
		for (uint64_t m = i; m < j; m++) {
			state[m] = 0;
			if (!present[m]) {
				present[m] = 1;
				fresh++;
			}
		}
		handled += j - i;
		i = j;
	}
	*newly_present = fresh;
	return (int64_t)i;
}

#endif
