/* LD_PRELOAD shim for running the reference composefs-info on corrupt images.
 *
 * composefs-info mmaps the whole image and reads it without bounds checks, so a corrupt image
 * makes it read whatever lies past the file: zeros up to the end of the last page, then other
 * mappings or nothing. Its output then depends on the process layout. This shim places the
 * image so that it ends exactly at a page boundary, between inaccessible (PROT_NONE) regions
 * of 1 TiB before and 17 TiB after (more than any 32-bit block address times 4096 reaches), so
 * every read past the end of the file faults. With GUARDMAP_ALIGN=start the image starts at a
 * page boundary instead, so that reads before it (a 64-bit offset that wraps around) fault.
 * The reference code itself runs unchanged; only where its read-only mapping of the image lies
 * changes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GUARD_BEFORE ((size_t)1 << 40)
#define GUARD_AFTER ((size_t)17 << 40)

static void *region;
static size_t region_len;
static void *image;

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef int (*munmap_fn)(void *, size_t);

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	static mmap_fn real;
	struct stat st;

	if (real == NULL)
		real = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
	if (region != NULL || addr != NULL || fd < 0 || off != 0 || len == 0 ||
	    prot != PROT_READ || !(flags & MAP_PRIVATE) || fstat(fd, &st) != 0 ||
	    !S_ISREG(st.st_mode) || (size_t)st.st_size != len)
		return real(addr, len, prot, flags, fd, off);

	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t span = (len + page - 1) / page * page;
	size_t total = GUARD_BEFORE + span + GUARD_AFTER;
	char *r = real(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (r == MAP_FAILED)
		return r;
	char *pages = r + GUARD_BEFORE;
	if (mprotect(pages, span, PROT_READ | PROT_WRITE) != 0)
		goto fail;
	const char *align = getenv("GUARDMAP_ALIGN");
	char *data = align != NULL && strcmp(align, "start") == 0 ? pages : pages + span - len;
	size_t done = 0;
	while (done < len) {
		ssize_t n = pread(fd, data + done, len - done, (off_t)done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			goto fail;
		done += (size_t)n;
	}
	if (mprotect(pages, span, PROT_READ) != 0)
		goto fail;
	region = r;
	region_len = total;
	image = data;
	return data;
fail:
	munmap(r, total);
	errno = EIO;
	return MAP_FAILED;
}

int munmap(void *addr, size_t len)
{
	static munmap_fn real;

	if (real == NULL)
		real = (munmap_fn)dlsym(RTLD_NEXT, "munmap");
	if (region != NULL && addr == image) {
		int r = real(region, region_len);
		region = NULL;
		image = NULL;
		return r;
	}
	return real(addr, len);
}
