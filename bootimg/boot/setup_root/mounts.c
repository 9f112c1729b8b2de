/* Mounting EROFS images and read-only composefs overlays with the kernel's own interfaces. */
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "bsr.h"

/* The new mount API by syscall number (the same on every architecture), so the binary needs
 * no glibc wrapper: a root with an older glibc runs it too. */
#ifndef SYS_fsopen
#define SYS_move_mount 429
#define SYS_fsopen 430
#define SYS_fsconfig 431
#define SYS_fsmount 432
#endif
#define BSR_FSOPEN_CLOEXEC 0x1
#define BSR_FSCONFIG_SET_FLAG 0
#define BSR_FSCONFIG_SET_STRING 1
#define BSR_FSCONFIG_CMD_CREATE 6
#define BSR_FSMOUNT_CLOEXEC 0x1
#define BSR_MOUNT_ATTR_RDONLY 0x1
#define BSR_MOVE_MOUNT_F_EMPTY_PATH 0x4
#define BSR_STATX_ATTR_MOUNT_ROOT 0x2000

#ifdef BOOTIMG_TEST_HOOKS
/* Test builds: BOOTIMG_TEST_EROFS=loop skips the file-backed mount, BOOTIMG_TEST_OVERLAY=mount
 * skips the new mount API, so both paths run on a kernel that has the newer ones. */
static int test_is(const char *var, const char *value)
{
    const char *v = getenv(var);
    return v && strcmp(v, value) == 0;
}
#else
#define test_is(var, value) 0
#endif

static int loop_attach(int image_fd, const char *name, int *loop_fd)
{
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0)
        return errno;
    int e = EBUSY;
    for (int attempt = 0; attempt < 32 && (e == EBUSY || e == ENOENT); attempt++) {
        int n = ioctl(ctl, LOOP_CTL_GET_FREE);
        if (n < 0) {
            e = errno;
            break;
        }
        char dev[32];
        snprintf(dev, sizeof dev, "/dev/loop%d", n);
        int fd = open(dev, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            e = errno;            /* the node may appear a moment after the device */
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        struct loop_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.fd = (uint32_t)image_fd;
        cfg.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        snprintf((char *)cfg.info.lo_file_name, sizeof cfg.info.lo_file_name, "%s", name);
        if (ioctl(fd, LOOP_CONFIGURE, &cfg) == 0) {
            *loop_fd = fd;
            close(ctl);
            return 0;
        }
        e = errno;                /* EBUSY: another process took this device first */
        close(fd);
    }
    close(ctl);
    return e;
}

int mount_erofs(const char *image, const char *target, int *via_loop, char *err, size_t errsize)
{
    if (via_loop)
        *via_loop = 0;
    int fd = open(image, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errsize, "%s: %s", image, fd < 0 ? strerror(errno) : "not a regular file");
        if (fd >= 0)
            close(fd);
        return -1;
    }
    /* The kernel reads the file this process opened (and measured), whatever the path names now. */
    char source[64];
    snprintf(source, sizeof source, "/proc/self/fd/%d", fd);
    if (!test_is("BOOTIMG_TEST_EROFS", "loop")) {
        if (mount(source, target, "erofs", MS_RDONLY, "noacl") == 0) {
            close(fd);
            return 0;
        }
        if (errno != ENOTBLK) {            /* ENOTBLK: no file-backed EROFS in this kernel */
            snprintf(err, errsize, "%s", strerror(errno));
            close(fd);
            return -1;
        }
    }
    int lfd = -1, e = loop_attach(fd, image, &lfd);
    close(fd);
    if (e) {
        snprintf(err, errsize, "cannot set up a loop device: %s", strerror(e));
        return -1;
    }
    char dev[64];
    snprintf(dev, sizeof dev, "/proc/self/fd/%d", lfd);
    char name[64];
    struct stat ls;
    if (fstat(lfd, &ls) == 0)
        snprintf(name, sizeof name, "/dev/loop%u", minor(ls.st_rdev));
    else
        snprintf(name, sizeof name, "%s", dev);
    int rc = mount(name, target, "erofs", MS_RDONLY, "noacl");
    e = errno;
    close(lfd);                            /* autoclear: the device goes with the mount */
    if (rc < 0) {
        snprintf(err, errsize, "%s", strerror(e));
        return -1;
    }
    if (via_loop)
        *via_loop = 1;
    return 0;
}

static int fsconfig_str(int fs, const char *key, const char *value)
{
    return (int)syscall(SYS_fsconfig, fs, BSR_FSCONFIG_SET_STRING, key, value, 0);
}

/* The kernel's own words for a failed fsconfig (it queues them on the context). */
static void fs_error(int fs, int e, char *err, size_t errsize)
{
    char msg[512];
    ssize_t n = read(fs, msg, sizeof msg - 1);
    if (n > 2 && (msg[0] == 'e' || msg[0] == 'w') && msg[1] == ' ') {
        msg[n] = 0;
        snprintf(err, errsize, "%s (%s)", strerror(e), msg + 2);
    } else {
        snprintf(err, errsize, "%s", strerror(e));
    }
}

/* 1: mounted; 0: this kernel lacks what is needed (the caller falls back); -1: failed. */
static int overlay_fsmount(const char *source, const char *const *lowers, int nlowers, const char *datadir,
                           const char *verity, const char *target, char *err, size_t errsize)
{
    int fs = (int)syscall(SYS_fsopen, "overlay", BSR_FSOPEN_CLOEXEC);
    if (fs < 0)
        return 0;
    int rc = -1;
    if (fsconfig_str(fs, "source", source) < 0)
        goto fail;
    for (int i = 0; i < nlowers; i++)
        if (fsconfig_str(fs, "lowerdir+", lowers[i]) < 0) {
            if (i == 0 && errno == EINVAL) {     /* before Linux 6.8: no lowerdir+/datadir+ */
                rc = 0;
                goto out;
            }
            goto fail;
        }
    if ((datadir && fsconfig_str(fs, "datadir+", datadir) < 0) || fsconfig_str(fs, "metacopy", "on") < 0
        || fsconfig_str(fs, "redirect_dir", "on") < 0 || (verity && fsconfig_str(fs, "verity", verity) < 0)
        || syscall(SYS_fsconfig, fs, BSR_FSCONFIG_SET_FLAG, "ro", NULL, 0) < 0
        || syscall(SYS_fsconfig, fs, BSR_FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
        goto fail;
    int mfd = (int)syscall(SYS_fsmount, fs, BSR_FSMOUNT_CLOEXEC, BSR_MOUNT_ATTR_RDONLY);
    if (mfd < 0)
        goto fail;
    if (syscall(SYS_move_mount, mfd, "", AT_FDCWD, target, BSR_MOVE_MOUNT_F_EMPTY_PATH) < 0) {
        int e = errno;
        close(mfd);
        errno = e;
        goto fail;
    }
    close(mfd);
    rc = 1;
    goto out;
fail:
    fs_error(fs, errno, err, errsize);
out:
    close(fs);
    return rc;
}

int mount_overlay_ro(const char *source, const char *const *lowers, int nlowers, const char *datadir,
                     const char *verity, const char *target, char *err, size_t errsize)
{
    if (!test_is("BOOTIMG_TEST_OVERLAY", "mount")) {
        int rc = overlay_fsmount(source, lowers, nlowers, datadir, verity, target, err, errsize);
        if (rc != 0)
            return rc > 0 ? 0 : -1;
    }
    /* mount(2): the layers in one option string ("a:b::data"); the callers' paths hold no
     * ',', ':' or '\\' (checked), which the string could not carry. */
    char opts[4 * BSR_PATH_MAX + 128];
    int n = snprintf(opts, sizeof opts, "ro,metacopy=on,redirect_dir=on%s%s,lowerdir=", verity ? ",verity=" : "",
                     verity ? verity : "");
    for (int i = 0; i < nlowers && n > 0 && (size_t)n < sizeof opts; i++)
        n += snprintf(opts + n, sizeof opts - (size_t)n, "%s%s", i ? ":" : "", lowers[i]);
    if (datadir && n > 0 && (size_t)n < sizeof opts)
        n += snprintf(opts + n, sizeof opts - (size_t)n, "::%s", datadir);
    if (n < 0 || (size_t)n >= sizeof opts) {
        snprintf(err, errsize, "the overlay options are too long");
        return -1;
    }
    if (mount(source, target, "overlay", MS_RDONLY, opts) < 0) {
        snprintf(err, errsize, "%s", strerror(errno));
        return -1;
    }
    return 0;
}

int is_mountpoint(const char *path)
{
    struct statx stx;
    if (statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, STATX_BASIC_STATS, &stx) < 0)
        return 0;
    if (stx.stx_attributes_mask & BSR_STATX_ATTR_MOUNT_ROOT)
        return (stx.stx_attributes & BSR_STATX_ATTR_MOUNT_ROOT) != 0;
    /* kernels before 5.8: a different device than the parent's */
    char parent[BSR_PATH_MAX];
    struct stat a, b;
    if (path_join(parent, sizeof parent, path, "/..") < 0 || stat(path, &a) < 0 || stat(parent, &b) < 0)
        return 0;
    return a.st_dev != b.st_dev || a.st_ino == b.st_ino;
}

int is_readonly_mount(const char *path)
{
    struct statvfs sv;
    return statvfs(path, &sv) == 0 && (sv.f_flag & ST_RDONLY);
}

/* Remount keeping the mount's other flags (a remount resets what it is not given). */
int remount(const char *path, int readonly)
{
    struct statvfs sv;
    if (statvfs(path, &sv) < 0)
        return -1;
    unsigned long f = MS_REMOUNT | (readonly ? MS_RDONLY : 0);
    static const struct { unsigned long st, ms; } map[] = {
        {ST_NOSUID, MS_NOSUID}, {ST_NODEV, MS_NODEV}, {ST_NOEXEC, MS_NOEXEC}, {ST_SYNCHRONOUS, MS_SYNCHRONOUS},
        {ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (sv.f_flag & map[i].st)
            f |= map[i].ms;
    if (!(sv.f_flag & (ST_NOATIME | ST_RELATIME)))
        f |= MS_STRICTATIME;
    return mount(NULL, path, NULL, f, NULL);
}
