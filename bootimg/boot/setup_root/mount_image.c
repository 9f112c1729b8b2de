/* mount-image: mount or unmount the verified composefs image of one boot-time container (for
 * bootimg-image-NAME.service).
 *
 *   bootimg-setup-root mount-image [--fsverity=required|optional] [--bind=SOURCE:TARGET]... NAME DIGEST
 *   bootimg-setup-root mount-image --umount NAME      (also: umount-image NAME)
 *
 * RELEASE/images/NAME.cfs must have fs-verity enabled with exactly DIGEST. It is mounted
 * read-only (EROFS) at /run/bootimg/images/NAME, and a read-only overlay at
 * /run/bootimg/containers/NAME: the image, over a skeleton layer, over RELEASE/objects as
 * data-only layer, with verity=require. The skeleton is a small read-only tmpfs at
 * /run/bootimg/skel/NAME holding only the mount points systemd needs in the container's root
 * (dev proc sys run tmp var/tmp) and the TARGET of each --bind (a directory, or an empty file
 * when SOURCE is not a directory); anything in the image itself takes precedence.
 * Any failure: one line "bootimg: FATAL: container NAME: REASON" on stderr, exit 1, nothing left
 * mounted. --fsverity=optional (development only) turns a missing or different image digest into
 * a warning and mounts with verity=off.
 * RELEASE and the object store: "release_dir" and "objects" of /run/bootimg/booted.json, which the
 * root setup wrote (so the containers always come from the release that was booted). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bsr.h"

#define MAX_BINDS 64

static const char *name;

static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...)
{
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(line, sizeof line, "bootimg: FATAL: container %s: ", name ? name : "?");
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    log_line(-1, line);
    exit(1);
}

static void __attribute__((noreturn)) usage(void)
{
    die("usage: bootimg-mount-image [--fsverity=required|optional] [--bind=SOURCE:TARGET]... NAME DIGEST "
        "| --umount NAME");
}

static void check_name(void)
{
    int ok = name[0] && name[0] != '-';
    for (const char *c = name; *c && ok; c++)
        ok = (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '-';
    if (!ok || strlen(name) > 200)
        die("invalid container name");
}

static const char *run_dir(void)
{
    return PARAM("BOOTIMG_RUN", "/run/bootimg");
}

static int do_umount(const char *run, int fail_hard)
{
    static const char *const kinds[] = {"containers", "skel", "images"};
    char failed[2048] = "";
    for (int i = 0; i < 3; i++) {
        char m[BSR_PATH_MAX];
        if (snprintf(m, sizeof m, "%s/%s/%s", run, kinds[i], name) >= (int)sizeof m)
            die("path too long");
        if (is_mountpoint(m) && umount2(m, 0) < 0) {
            size_t n = strlen(failed);
            snprintf(failed + n, sizeof failed - n, " %s: %s", m, strerror(errno));
        }
    }
    if (failed[0] && fail_hard)
        die("cannot unmount:%s", failed);
    return failed[0] ? -1 : 0;
}

static int touch(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        return errno == EEXIST ? 0 : errno;
    close(fd);
    return 0;
}

/* The skeleton layer: a small tmpfs of mount points, then read-only. 0 or -1 with err. */
static int make_skeleton(const char *skel, char **binds, int nbinds, char *err, size_t errsize)
{
    static const char *const dirs[] = {"dev", "proc", "sys", "run", "tmp", "var/tmp"};
    char src[64], p[BSR_PATH_MAX];
    snprintf(src, sizeof src, "bootimg-skel-%s", name);
    if (mount(src, skel, "tmpfs", 0, "mode=0755,size=64k,nr_inodes=1024") < 0) {
        snprintf(err, errsize, "%s", strerror(errno));
        return -1;
    }
    int e = 0;
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0] && !e; i++) {
        e = snprintf(p, sizeof p, "%s/%s", skel, dirs[i]) >= (int)sizeof p ? ENAMETOOLONG : mkdir_p(p, 0755);
    }
    for (const char *t = "tmp"; !e && t; t = strcmp(t, "tmp") == 0 ? "var/tmp" : NULL) {
        if (snprintf(p, sizeof p, "%s/%s", skel, t) >= (int)sizeof p)
            e = ENAMETOOLONG;
        else if (chmod(p, 01777) < 0)
            e = errno;
    }
    for (int i = 0; i < nbinds && !e; i++) {
        char *colon = strchr(binds[i], ':');
        *colon = 0;
        struct stat st;
        int dir = stat(binds[i], &st) == 0 && S_ISDIR(st.st_mode);
        *colon = ':';
        if (snprintf(p, sizeof p, "%s%s", skel, colon + 1) >= (int)sizeof p) {
            e = ENAMETOOLONG;
            break;
        }
        if (dir) {
            e = mkdir_p(p, 0755);
        } else {
            char *slash = strrchr(p, '/');
            *slash = 0;
            e = slash == p + strlen(skel) ? 0 : mkdir_p(p, 0755);
            *slash = '/';
            if (!e)
                e = touch(p);
        }
    }
    if (!e && mount(NULL, skel, NULL, MS_REMOUNT | MS_RDONLY, "mode=0755,size=64k,nr_inodes=1024") < 0)
        e = errno;
    if (e) {
        snprintf(err, errsize, "%s", strerror(e));
        return -1;
    }
    return 0;
}

static int bad_bind(const char *b)
{
    const char *colon = strchr(b, ':');
    if (!colon || strchr(colon + 1, ':') || b[0] != '/' || colon[1] != '/')
        return 1;
    for (const char *c = b; *c; c++)
        if (*c == ' ' || *c == '\t' || *c == '\n' || *c == '\r' || *c == '\v' || *c == '\f')
            return 1;
    /* no "/../", "/./" and no ".." or "." as the last part of either path */
    for (const char *c = b; *c; c++)
        if (c[0] == '/' && c[1] == '.') {
            const char *q = c + 2;
            if (*q == '.')
                q++;
            if (*q == '/' || *q == ':' || *q == 0)
                return 1;
        }
    return 0;
}

int mount_image_main(int argc, char **argv)
{
    const char *run = run_dir();
    const char *policy = "required";
    char *binds[MAX_BINDS];
    int nbinds = 0, i = 1;
    if (argc > 1 && strcmp(argv[1], "--umount") == 0) {
        if (argc != 3)
            usage();
        name = argv[2];
        check_name();
        do_umount(run, 1);
        return 0;
    }
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--fsverity=required") == 0 || strcmp(a, "--fsverity=optional") == 0) {
            policy = a + 11;
        } else if (strncmp(a, "--bind=/", 8) == 0 && strstr(a + 8, ":/")) {
            if (bad_bind(a + 7)) {
                char sb[80];
                die("invalid --bind '%s'", shown(a + 7, sb));
            }
            if (nbinds == MAX_BINDS)
                die("more than %d --bind", MAX_BINDS);
            binds[nbinds++] = argv[i] + 7;
        } else if (a[0] == '-') {
            usage();
        } else {
            break;
        }
    }
    if (argc - i != 2)
        usage();
    name = argv[i];
    const char *digest = argv[i + 1];
    check_name();
    char sb[80];
    if (!is_hex64(digest))
        die("invalid digest '%s' (64 lowercase hex digits)", shown(digest, sb));
    char release[BSR_PATH_MAX], image[BSR_PATH_MAX], objects[BSR_PATH_MAX], err[512];
    const char *test_release = PARAM("BOOTIMG_RELEASE", NULL);       /* test builds: a release as is */
    if (test_release) {
        if (path_join(release, sizeof release, test_release, "") < 0
            || path_join(objects, sizeof objects, test_release, "/objects") < 0)
            die("path too long");
    } else {
        struct booted_info b;
        const char *root = PARAM("BOOTIMG_TEST_ROOT", "");
        if (read_booted(run, &b, err, sizeof err) < 0)
            die("%s", err);
        if (!safe_path(b.release_dir) || !safe_path(b.objects))
            die("%s/booted.json has no safe release_dir and objects", run);
        if (snprintf(release, sizeof release, "%s%s", root, b.release_dir) >= (int)sizeof release
            || snprintf(objects, sizeof objects, "%s%s", root, b.objects) >= (int)sizeof objects)
            die("path too long");
    }
    if (strpbrk(release, ",:\\ \t\n\r\v\f") || strpbrk(objects, ",:\\ \t\n\r\v\f"))
        die("release directory '%s' contains a character overlayfs options cannot hold", shown(release, sb));
    if (snprintf(image, sizeof image, "%s/images/%s.cfs", release, name) >= (int)sizeof image)
        die("path too long");
    struct stat st;
    if (stat(objects, &st) < 0 || !S_ISDIR(st.st_mode))
        die("%s: no such directory", objects);
    if (stat(image, &st) < 0 || !S_ISREG(st.st_mode))
        die("%s: no such file", image);

    int fd = open(image, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    uint8_t got[32];
    char got_hex[65] = "", reason[BSR_PATH_MAX + 256] = "";
    if (fd < 0)
        die("%s: %s", image, strerror(errno));
    if (verity_measure(fd, image, got) == 0)
        hex_encode(got, 32, got_hex);
    if (strcmp(got_hex, digest) != 0) {
        if (!got_hex[0])
            snprintf(reason, sizeof reason, "%s has no fs-verity digest (expected sha256:%s)", image, digest);
        else
            snprintf(reason, sizeof reason, "%s has fs-verity digest sha256:%s, expected sha256:%s", image, got_hex,
                     digest);
        if (strcmp(policy, "optional") != 0)
            die("%s", reason);
        dprintf(2, "bootimg: WARNING: container %s: %s; fs-verity is optional: mounting UNVERIFIED\n", name, reason);
    }
    const char *verity = strcmp(policy, "required") == 0 ? "require" : "off";

    char meta[BSR_PATH_MAX], skel[BSR_PATH_MAX], target[BSR_PATH_MAX], fdpath[64];
    if (snprintf(meta, sizeof meta, "%s/images/%s", run, name) >= (int)sizeof meta
        || snprintf(skel, sizeof skel, "%s/skel/%s", run, name) >= (int)sizeof skel
        || snprintf(target, sizeof target, "%s/containers/%s", run, name) >= (int)sizeof target)
        die("path too long");
    do_umount(run, 1);
    if (mkdir_p(meta, 0755) || mkdir_p(skel, 0755) || mkdir_p(target, 0755))
        die("cannot create the mount points under %s", run);
    snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
    if (mount_erofs(fdpath, meta, NULL, err, sizeof err) < 0)
        die("cannot mount %s on %s: %s", image, meta, err);
    close(fd);
    if (make_skeleton(skel, binds, nbinds, err, sizeof err) < 0) {
        umount2(skel, 0);
        umount2(meta, 0);
        die("cannot make the skeleton layer %s: %s", skel, err);
    }
    char source[256];
    snprintf(source, sizeof source, "bootimg-%s", name);
    const char *lowers[2] = {meta, skel};
    if (mount_overlay_ro(source, lowers, 2, objects, verity, target, err, sizeof err) < 0) {
        umount2(skel, 0);
        umount2(meta, 0);
        die("cannot mount the overlay on %s: %s", target, err);
    }
    return 0;
}
