/* fs-verity through the kernel's ioctls, and the same digest computed in user space
 * (SHA-256, 4096-byte blocks, no salt: composefs' "v1-sha256-12" parameters). */
#include <errno.h>
#include <fcntl.h>
#include <linux/fsverity.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bsr.h"

#define BLOCK 4096

#ifdef BOOTIMG_TEST_HOOKS
/* Test builds only: a kernel without fs-verity (this project's CI) is simulated as
 * BOOTIMG_TEST_VERITY says: "enabled" (every file has fs-verity), "track" (files enabled by this
 * simulation have it: a marker under BOOTIMG_TEST_VERITY_STATE), "none" (no fs-verity), "term"
 * (like enabled, but measuring sends SIGTERM to the process). Calls are logged to
 * BOOTIMG_TEST_LOG. Unset: the real ioctls. */
#include <signal.h>
static const char *sim_mode, *sim_state, *sim_log;

void verity_test_setup(void)
{
    sim_mode = getenv("BOOTIMG_TEST_VERITY");
    sim_state = getenv("BOOTIMG_TEST_VERITY_STATE");
    sim_log = getenv("BOOTIMG_TEST_LOG");
    if (sim_mode && !*sim_mode)
        sim_mode = NULL;
}

static void sim_record(const char *what, const char *path)
{
    if (!sim_log)
        return;
    int fd = open(sim_log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        dprintf(fd, "%s %s\n", what, path);
        close(fd);
    }
}

static int sim_marker(const char *path, char *out, size_t size)
{
    char abs[BSR_PATH_MAX];
    if (path[0] != '/') {
        char cwd[BSR_PATH_MAX];
        if (!getcwd(cwd, sizeof cwd) || path_join(abs, sizeof abs, cwd, "/") < 0)
            return -1;
        if (strlen(abs) + strlen(path) >= sizeof abs)
            return -1;
        strcat(abs, path);
    } else if (path_join(abs, sizeof abs, path, "") < 0) {
        return -1;
    }
    return path_join(out, size, sim_state ? sim_state : "/nonexistent", abs);
}
#endif

int verity_measure(int fd, const char *path, uint8_t digest[32])
{
#ifdef BOOTIMG_TEST_HOOKS
    if (sim_mode) {
        char mark[BSR_PATH_MAX];
        sim_record("measure", path);
        if (strcmp(sim_mode, "none") == 0)
            return EOPNOTSUPP;
        if (strcmp(sim_mode, "track") == 0 && (sim_marker(path, mark, sizeof mark) < 0 || access(mark, F_OK) < 0))
            return ENODATA;
        if (strcmp(sim_mode, "term") == 0)
            kill(getpid(), SIGTERM);
        return verity_digest_fd(fd, digest);
    }
#else
    (void)path;
#endif
    struct { struct fsverity_digest d; uint8_t buf[64]; } m;
    memset(&m, 0, sizeof m);
    m.d.digest_size = 64;
    if (ioctl(fd, FS_IOC_MEASURE_VERITY, &m) < 0)
        return errno;
    if (m.d.digest_algorithm != FS_VERITY_HASH_ALG_SHA256 || m.d.digest_size != 32)
        return EINVAL;
    memcpy(digest, m.d.digest, 32);
    return 0;
}

int verity_enable(int fd, const char *path)
{
#ifdef BOOTIMG_TEST_HOOKS
    if (sim_mode) {
        char mark[BSR_PATH_MAX];
        sim_record("enable", path);
        if (strcmp(sim_mode, "track") == 0) {
            if (sim_marker(path, mark, sizeof mark) < 0)
                return ENAMETOOLONG;
            if (access(mark, F_OK) == 0)
                return EEXIST;
            char *slash = strrchr(mark, '/');
            *slash = 0;
            int e = mkdir_p(mark, 0755);
            *slash = '/';
            return e ? e : write_file(mark, "", 0, 0644);
        }
        return strcmp(sim_mode, "none") == 0 ? EOPNOTSUPP : EEXIST;
    }
#else
    (void)path;
#endif
    struct fsverity_enable_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.version = 1;
    arg.hash_algorithm = FS_VERITY_HASH_ALG_SHA256;
    arg.block_size = BLOCK;
    for (;;) {
        if (ioctl(fd, FS_IOC_ENABLE_VERITY, &arg) == 0)
            return 0;
        if (errno != EINTR)
            return errno;
    }
}

static int read_block(int fd, uint64_t off, uint8_t *buf, size_t *got)
{
    size_t n = 0;
    while (n < BLOCK) {
        ssize_t r = pread(fd, buf + n, BLOCK - n, (off_t)(off + n));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)
            break;
        n += (size_t)r;
    }
    *got = n;
    return 0;
}

int verity_digest_fd(int fd, uint8_t digest[32])
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return errno;
    if (!S_ISREG(st.st_mode))
        return EINVAL;
    uint64_t size = (uint64_t)st.st_size, nblocks = (size + BLOCK - 1) / BLOCK;
    uint8_t root[32] = {0}, *level = NULL, buf[BLOCK];
    if (nblocks > (SIZE_MAX / 32))
        return EFBIG;
    if (size > 0) {
        level = malloc(nblocks * 32 + 32);
        if (!level)
            return ENOMEM;
        for (uint64_t i = 0; i < nblocks; i++) {
            size_t got = 0;
            int e = read_block(fd, i * BLOCK, buf, &got);
            if (!e && got == 0)
                e = EIO;                 /* the file shrank while it was read */
            if (e) {
                free(level);
                return e;
            }
            memset(buf + got, 0, BLOCK - got);
            sha256(buf, BLOCK, level + 32 * i);
        }
        /* Up the Merkle tree: 128 hashes per block, until one block's hash is the root. */
        uint64_t n = nblocks;
        while (n > 1) {
            uint64_t up = (n + 127) / 128;
            for (uint64_t i = 0; i < up; i++) {
                uint64_t take = n - i * 128 < 128 ? n - i * 128 : 128;
                memset(buf, 0, BLOCK);
                memcpy(buf, level + 32 * 128 * i, take * 32);
                sha256(buf, BLOCK, level + 32 * i);
            }
            n = up;
        }
        memcpy(root, level, 32);
        free(level);
    }
    /* struct fsverity_descriptor: version, hash algorithm, log2 block size, salt size,
     * sig_size (0), data size (le64), root hash[64], salt[32], reserved[144] */
    uint8_t desc[256] = {1, FS_VERITY_HASH_ALG_SHA256, 12, 0};
    for (int i = 0; i < 8; i++)
        desc[8 + i] = (uint8_t)(size >> (8 * i));
    memcpy(desc + 16, root, 32);
    sha256(desc, sizeof desc, digest);
    return 0;
}
