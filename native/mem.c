/* Memory wrappers: the mmap family, memfd, pagemap and PAGEMAP_SCAN, process_vm_readv/writev. */
#ifndef MIG_MEM_C
#define MIG_MEM_C

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "migrate_uapi.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

struct mig_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

_Static_assert(sizeof(struct mig_page_region) == sizeof(struct page_region), "page_region layout");

long mig_page_size(void)
{
	return sysconf(_SC_PAGESIZE);
}

int mig_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t offset, uint64_t *out)
{
	void *p = mmap((void *)(uintptr_t)addr, len, prot, flags, fd, (off_t)offset);
	if (p == MAP_FAILED)
		return -errno;
	*out = (uint64_t)(uintptr_t)p;
	return 0;
}

int mig_munmap(uint64_t addr, uint64_t len)
{
	return munmap((void *)(uintptr_t)addr, len) < 0 ? -errno : 0;
}

int mig_mprotect(uint64_t addr, uint64_t len, int prot)
{
	return mprotect((void *)(uintptr_t)addr, len, prot) < 0 ? -errno : 0;
}

int mig_madvise(uint64_t addr, uint64_t len, int advice)
{
	int ret;
	do {
		ret = madvise((void *)(uintptr_t)addr, len, advice);
	} while (ret < 0 && errno == EINTR);
	return ret < 0 ? -errno : 0;
}

int mig_mremap(uint64_t old_addr, uint64_t old_len, uint64_t new_len, int flags, uint64_t new_addr,
               uint64_t *out)
{
	void *p = mremap((void *)(uintptr_t)old_addr, old_len, new_len, flags, (void *)(uintptr_t)new_addr);
	if (p == MAP_FAILED)
		return -errno;
	*out = (uint64_t)(uintptr_t)p;
	return 0;
}

int mig_memfd_create(const char *name, unsigned int flags)
{
	long fd = syscall(SYS_memfd_create, name, flags);
	return fd < 0 ? -errno : (int)fd;
}

int mig_ftruncate(int fd, int64_t length)
{
	int ret;
	do {
		ret = ftruncate(fd, (off_t)length);
	} while (ret < 0 && errno == EINTR);
	return ret < 0 ? -errno : 0;
}

int mig_close(int fd)
{
	return close(fd) < 0 ? -errno : 0;
}

int mig_open_pagemap(int pid, int writable)
{
	char path[64];
	int fd;
	if (pid <= 0)
		snprintf(path, sizeof(path), "/proc/self/pagemap");
	else
		snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	do {
		fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	} while (fd < 0 && errno == EINTR);
	return fd < 0 ? -errno : fd;
}

int64_t mig_pagemap_read(int fd, uint64_t vaddr, uint64_t n, uint64_t page_size, uint64_t *out)
{
	uint64_t want = n * sizeof(uint64_t), got = 0;
	off_t base = (off_t)((vaddr / page_size) * sizeof(uint64_t));
	while (got < want) {
		ssize_t r = pread(fd, (char *)out + got, want - got, base + (off_t)got);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			break;
		got += (uint64_t)r;
	}
	return (int64_t)(got / sizeof(uint64_t));
}

int64_t mig_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags, uint64_t max_pages,
                         uint64_t inverted, uint64_t mask, uint64_t anyof, uint64_t return_mask,
                         struct mig_page_region *vec, uint64_t vec_len, uint64_t *walk_end)
{
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = flags,
		.start = start,
		.end = end,
		.walk_end = 0,
		.vec = (uint64_t)(uintptr_t)vec,
		.vec_len = vec_len,
		.max_pages = max_pages,
		.category_inverted = inverted,
		.category_mask = mask,
		.category_anyof_mask = anyof,
		.return_mask = return_mask,
	};
	int ret;
	do {
		ret = ioctl(fd, PAGEMAP_SCAN, &arg);
	} while (ret < 0 && errno == EINTR);
	*walk_end = arg.walk_end;
	return ret < 0 ? -errno : ret;
}

int64_t mig_pagemap_mark(int fd, uint64_t start, uint64_t end, uint64_t flags, uint64_t inverted,
                         uint64_t mask, uint64_t anyof, uint64_t return_mask,
                         struct mig_page_region *vec, uint64_t vec_len, uint64_t page_size,
                         uint8_t *out)
{
	uint64_t pos = start, marked = 0, walk_end = 0;
	if (page_size == 0 || vec_len == 0 || end < start)
		return -EINVAL;
	while (pos < end) {
		int64_t n = mig_pagemap_scan(fd, pos, end, flags, 0, inverted, mask, anyof,
		                             return_mask, vec, vec_len, &walk_end);
		if (n < 0)
			return n;
		for (int64_t i = 0; i < n; i++) {
			uint64_t s = vec[i].start < start ? start : vec[i].start;
			uint64_t e = vec[i].end > end ? end : vec[i].end;
			if (e <= s)
				continue;
			memset(out + (s - start) / page_size, 1, (e - s) / page_size);
			marked += (e - s) / page_size;
		}
		/* the walk stops before end only when vec filled up */
		if ((uint64_t)n < vec_len || walk_end <= pos || walk_end >= end)
			break;
		pos = walk_end;
	}
	return (int64_t)marked;
}

uint64_t mig_bytes_indexes(const uint8_t *map, uint64_t n, uint32_t *out)
{
	uint64_t count = 0;
	for (uint64_t i = 0; i < n; i++) {
		if (map[i] == 1)
			out[count++] = (uint32_t)i;
	}
	return count;
}

void mig_bytes_andnot(uint8_t *dst, const uint8_t *src, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		dst[i] &= (uint8_t)~src[i];
}

void mig_bytes_and(uint8_t *dst, const uint8_t *src, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		dst[i] &= src[i];
}

void mig_bytes_or(uint8_t *dst, const uint8_t *src, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		dst[i] |= src[i];
}

uint64_t mig_bytes_clear_indexes(uint8_t *map, const uint32_t *idx, uint64_t n, uint64_t npages)
{
	uint64_t cleared = 0;
	for (uint64_t k = 0; k < n; k++) {
		if (idx[k] < npages && map[idx[k]]) {
			map[idx[k]] = 0;
			cleared++;
		}
	}
	return cleared;
}

int64_t mig_process_read(int pid, uint64_t local, uint64_t remote, uint64_t len)
{
	struct iovec l = {.iov_base = (void *)(uintptr_t)local, .iov_len = len};
	struct iovec r = {.iov_base = (void *)(uintptr_t)remote, .iov_len = len};
	ssize_t n;
	do {
		n = process_vm_readv(pid, &l, 1, &r, 1, 0);
	} while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : n;
}

int64_t mig_process_write(int pid, uint64_t remote, uint64_t local, uint64_t len)
{
	struct iovec l = {.iov_base = (void *)(uintptr_t)local, .iov_len = len};
	struct iovec r = {.iov_base = (void *)(uintptr_t)remote, .iov_len = len};
	ssize_t n;
	do {
		n = process_vm_writev(pid, &l, 1, &r, 1, 0);
	} while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : n;
}

/* Scattered remote pages <-> one contiguous local buffer, IOV_MAX remote iovecs per syscall.
 * A short transfer (the kernel stops at the first inaccessible remote page) ends the loop. */
static int64_t mig_process_pages(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
                                 uint64_t local, int write)
{
	struct iovec remote[IOV_MAX];
	uint64_t done = 0, i = 0;
	while (i < n) {
		uint64_t chunk = n - i < IOV_MAX ? n - i : IOV_MAX, j;
		struct iovec l = {.iov_base = (void *)(uintptr_t)(local + i * page_size),
		                  .iov_len = chunk * page_size};
		ssize_t r;
		for (j = 0; j < chunk; j++) {
			remote[j].iov_base = (void *)(uintptr_t)addrs[i + j];
			remote[j].iov_len = page_size;
		}
		do {
			r = write ? process_vm_writev(pid, &l, 1, remote, chunk, 0)
			          : process_vm_readv(pid, &l, 1, remote, chunk, 0);
		} while (r < 0 && errno == EINTR);
		if (r < 0)
			return done ? (int64_t)done : -errno;
		done += (uint64_t)r;
		if ((uint64_t)r < chunk * page_size)
			break;
		i += chunk;
	}
	return (int64_t)done;
}

int64_t mig_process_read_pages(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
                               uint64_t into)
{
	return mig_process_pages(pid, addrs, n, page_size, into, 0);
}

int64_t mig_process_write_pages(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
                                uint64_t from)
{
	return mig_process_pages(pid, addrs, n, page_size, from, 1);
}

int mig_pkey_alloc(unsigned int flags, unsigned int access_rights)
{
	long k = syscall(SYS_pkey_alloc, flags, access_rights);
	return k < 0 ? -errno : (int)k;
}

int mig_pkey_free(int pkey)
{
	return syscall(SYS_pkey_free, pkey) < 0 ? -errno : 0;
}

int mig_pkey_mprotect(uint64_t addr, uint64_t len, int prot, int pkey)
{
	return syscall(SYS_pkey_mprotect, (void *)(uintptr_t)addr, len, prot, pkey) < 0 ? -errno : 0;
}

#endif /* MIG_MEM_C */
