/* userfaultfd wrappers: ioctls with their struct arguments built here, -errno returns. */
#ifndef MIG_UFFD_C
#define MIG_UFFD_C

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "migrate_uapi.h"

#define MIG_UFFD_MAX_BATCH 256

struct mig_uffd_event {
	uint32_t event;
	uint32_t ptid;
	uint64_t flags;
	uint64_t a;
	uint64_t b;
	uint64_t c;
};

static int mig_ioctl_retry(int fd, unsigned long request, void *arg)
{
	int ret;
	do {
		ret = ioctl(fd, request, arg);
	} while (ret < 0 && errno == EINTR);
	return ret < 0 ? -errno : ret;
}

int mig_uffd_sizeof_msg(void)
{
	return (int)sizeof(struct uffd_msg);
}

int mig_uffd_open_dev(int flags)
{
	int dev, fd;
	do {
		dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	} while (dev < 0 && errno == EINTR);
	if (dev < 0)
		return -errno;
	fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
	if (fd < 0)
		fd = -errno;
	close(dev);
	return fd;
}

int mig_uffd_open_syscall(int flags)
{
	long fd = syscall(SYS_userfaultfd, flags);
	return fd < 0 ? -errno : (int)fd;
}

int mig_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = {.api = UFFD_API, .features = features};
	int ret = mig_ioctl_retry(fd, UFFDIO_API, &api);
	if (ret < 0)
		return ret;
	*features_out = api.features;
	*ioctls_out = api.ioctls;
	return 0;
}

int mig_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
	int ret = mig_ioctl_retry(fd, UFFDIO_REGISTER, &reg);
	if (ret < 0)
		return ret;
	*ioctls_out = reg.ioctls;
	return 0;
}

int mig_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = {.start = start, .len = len};
	return mig_ioctl_retry(fd, UFFDIO_UNREGISTER, &range);
}

int mig_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = {.start = start, .len = len};
	return mig_ioctl_retry(fd, UFFDIO_WAKE, &range);
}

int mig_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied)
{
	struct uffdio_copy c = {.dst = dst, .src = src, .len = len, .mode = mode, .copy = 0};
	int ret = mig_ioctl_retry(fd, UFFDIO_COPY, &c);
	*copied = c.copy;
	return ret;
}

int mig_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_zeropage z = {.range = {.start = start, .len = len}, .mode = mode, .zeropage = 0};
	int ret = mig_ioctl_retry(fd, UFFDIO_ZEROPAGE, &z);
	*done = z.zeropage;
	return ret;
}

int mig_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect wp = {.range = {.start = start, .len = len}, .mode = mode};
	return mig_ioctl_retry(fd, UFFDIO_WRITEPROTECT, &wp);
}

int mig_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped)
{
	struct uffdio_continue c = {.range = {.start = start, .len = len}, .mode = mode, .mapped = 0};
	int ret = mig_ioctl_retry(fd, UFFDIO_CONTINUE, &c);
	*mapped = c.mapped;
	return ret;
}

int mig_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *updated)
{
	struct uffdio_poison p = {.range = {.start = start, .len = len}, .mode = mode, .updated = 0};
	int ret = mig_ioctl_retry(fd, UFFDIO_POISON, &p);
	*updated = p.updated;
	return ret;
}

int mig_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *moved)
{
	struct uffdio_move m = {.dst = dst, .src = src, .len = len, .mode = mode, .move = 0};
	int ret = mig_ioctl_retry(fd, UFFDIO_MOVE, &m);
	*moved = m.move;
	return ret;
}

/* Wake every contiguous run of addrs (in the given order) with one UFFDIO_WAKE each. */
static int mig_uffd_wake_runs(int fd, const uint64_t *addrs, uint64_t n, uint64_t page_size)
{
	uint64_t i = 0;
	int first_err = 0;
	while (i < n) {
		uint64_t start = addrs[i], end = addrs[i] + page_size;
		i++;
		while (i < n && addrs[i] == end) {
			end += page_size;
			i++;
		}
		int ret = mig_uffd_wake(fd, start, end - start);
		if (ret < 0 && !first_err)
			first_err = ret;
	}
	return first_err;
}

/* Copy (or zero-fill, when src is NULL) one contiguous range with one ioctl; after a partial
 * result continue past what was done, after EEXIST skip the present page and go on. *done gets
 * the bytes this call installed. Returns 0 or the first error other than EEXIST. */
static int mig_uffd_fill_range(int fd, uint64_t dst, const char *src, uint64_t len,
                               uint64_t page_size, uint64_t mode, uint64_t *done)
{
	uint64_t off = 0;
	*done = 0;
	while (off < len) {
		int64_t count = 0;
		int ret;
		if (src)
			ret = mig_uffd_copy(fd, dst + off, (uint64_t)(uintptr_t)(src + off), len - off, mode,
			                    &count);
		else
			ret = mig_uffd_zeropage(fd, dst + off, len - off,
			                        mode ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0, &count);
		if (ret == 0) {
			*done += len - off;
			return 0;
		}
		if (count > 0) {
			/* Partial (the kernel says -EAGAIN): go on after what was done. */
			*done += (uint64_t)count;
			off += (uint64_t)count;
		} else if (ret == -EEXIST) {
			off += page_size; /* a present page: skip it, keep installing the rest */
		} else {
			return ret;
		}
	}
	return 0;
}

/* Pages whose destinations are contiguous are also contiguous in the source buffer, so each run
 * goes in one multi-page ioctl (fewer syscalls, and the kernel copies faster in larger pieces). */
static int mig_uffd_fill_pages(int fd, const uint64_t *addrs, uint64_t n, const char *src,
                               uint64_t page_size, int wake, uint64_t *installed)
{
	uint64_t total = 0, i = 0, reached = 0;
	int first_err = 0;
	while (i < n) {
		uint64_t j = i + 1, done = 0;
		int ret;
		while (j < n && addrs[j] == addrs[j - 1] + page_size)
			j++;
		ret = mig_uffd_fill_range(fd, addrs[i], src ? src + i * page_size : NULL,
		                          (j - i) * page_size, page_size, UFFDIO_COPY_MODE_DONTWAKE, &done);
		total += done / page_size;
		reached = j;
		if (ret < 0) {
			first_err = ret;
			break;
		}
		i = j;
	}
	*installed = total;
	if (wake) {
		/* Wake even after an error: threads waiting on installed pages must not stay asleep. */
		int ret = mig_uffd_wake_runs(fd, addrs, reached, page_size);
		if (!first_err)
			first_err = ret;
	}
	return first_err;
}

int mig_uffd_copy_pages(int fd, const uint64_t *addrs, uint64_t n, const char *src,
                        uint64_t page_size, int wake, uint64_t *installed)
{
	if (!src && n)
		return -EINVAL;
	return mig_uffd_fill_pages(fd, addrs, n, src, page_size, wake, installed);
}

int mig_uffd_zero_pages(int fd, const uint64_t *addrs, uint64_t n, uint64_t page_size, int wake,
                        uint64_t *installed)
{
	return mig_uffd_fill_pages(fd, addrs, n, NULL, page_size, wake, installed);
}

int mig_uffd_copy_range(int fd, uint64_t dst, const char *src, uint64_t len, uint64_t page_size,
                        uint64_t mode, uint64_t *installed)
{
	return mig_uffd_fill_range(fd, dst, src, len, page_size, mode, installed);
}

static void mig_uffd_decode(const struct uffd_msg *m, struct mig_uffd_event *e)
{
	e->event = m->event;
	e->ptid = 0;
	e->flags = 0;
	e->a = e->b = e->c = 0;
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		e->flags = m->arg.pagefault.flags;
		e->a = m->arg.pagefault.address;
		e->ptid = m->arg.pagefault.feat.ptid;
		break;
	case UFFD_EVENT_FORK:
		e->a = m->arg.fork.ufd;
		break;
	case UFFD_EVENT_REMAP:
		e->a = m->arg.remap.from;
		e->b = m->arg.remap.to;
		e->c = m->arg.remap.len;
		break;
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		e->a = m->arg.remove.start;
		e->b = m->arg.remove.end;
		break;
	default:
		break;
	}
}

int mig_uffd_read_events(int fd, struct mig_uffd_event *out, int max)
{
	struct uffd_msg msgs[MIG_UFFD_MAX_BATCH];
	ssize_t n;
	int i, count;
	if (max <= 0)
		return -EINVAL;
	if (max > MIG_UFFD_MAX_BATCH)
		max = MIG_UFFD_MAX_BATCH;
	do {
		n = read(fd, msgs, sizeof(msgs[0]) * (size_t)max);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	count = (int)(n / (ssize_t)sizeof(msgs[0]));
	for (i = 0; i < count; i++)
		mig_uffd_decode(&msgs[i], &out[i]);
	return count;
}

int mig_uffd_wait(int fd, int timeout_ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	int ret;
	do {
		ret = poll(&p, 1, timeout_ms);
	} while (ret < 0 && errno == EINTR);
	if (ret < 0)
		return -errno;
	if (ret > 0 && (p.revents & (POLLERR | POLLNVAL)))
		return -EBADF;
	return ret;
}

int mig_uffd_wait_events(int fd, struct mig_uffd_event *out, int max, int timeout_ms)
{
	int ret = mig_uffd_read_events(fd, out, max);
	if (ret != 0)
		return ret;
	ret = mig_uffd_wait(fd, timeout_ms);
	if (ret <= 0)
		return ret;
	return mig_uffd_read_events(fd, out, max);
}

#endif /* MIG_UFFD_C */
