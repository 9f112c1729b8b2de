/* Provisioning: enable fs-verity on every regular file of releases' images/ and of the object
 * store (xx/ subdirectories), in one process with a few threads (the kernel hashes each file in
 * the caller's context, so threads overlap the reads and the hashing). A file that has fs-verity
 * already answers EEXIST; on a read-only filesystem (EROFS) it is measured instead. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bsr.h"

#define MAX_THREADS 8

struct job {
    char **paths;
    size_t n, cap;
    atomic_size_t next, enabled, total;
    atomic_int failed;
    pthread_mutex_t lock;
    char error[BSR_PATH_MAX + 128];
};

static int add(struct job *j, const char *dir, const char *name)
{
    if (j->n == j->cap) {
        size_t cap = j->cap ? 2 * j->cap : 1024;
        char **p = realloc(j->paths, cap * sizeof *p);
        if (!p)
            return ENOMEM;
        j->paths = p;
        j->cap = cap;
    }
    size_t len = strlen(dir) + strlen(name) + 2;
    char *s = malloc(len);
    if (!s)
        return ENOMEM;
    snprintf(s, len, "%s/%s", dir, name);
    j->paths[j->n++] = s;
    return 0;
}

/* Regular files of dir (and, with depth 1, of its subdirectories). */
static int collect(struct job *j, const char *dir, int depth)
{
    DIR *d = opendir(dir);
    if (!d)
        return errno;
    struct dirent *e;
    int rc = 0;
    while (!rc && (errno = 0, e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2])))
            continue;
        unsigned char type = e->d_type;
        if (type == DT_UNKNOWN) {
            struct stat st;
            if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                continue;
            type = S_ISREG(st.st_mode) ? DT_REG : S_ISDIR(st.st_mode) ? DT_DIR : DT_UNKNOWN;
        }
        if (type == DT_REG) {
            rc = add(j, dir, e->d_name);
        } else if (type == DT_DIR && depth > 0) {
            char sub[BSR_PATH_MAX];
            if (snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name) >= (int)sizeof sub)
                rc = ENAMETOOLONG;
            else
                rc = collect(j, sub, depth - 1);
        }
    }
    if (!rc && errno)
        rc = errno;
    closedir(d);
    return rc;
}

static void fail(struct job *j, const char *path, int e)
{
    pthread_mutex_lock(&j->lock);
    if (!atomic_load(&j->failed))
        snprintf(j->error, sizeof j->error, "cannot enable fs-verity on %s: %s", path, strerror(e));
    atomic_store(&j->failed, 1);
    pthread_mutex_unlock(&j->lock);
}

static void *worker(void *arg)
{
    struct job *j = arg;
    for (;;) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->n || atomic_load(&j->failed))
            return NULL;
        const char *path = j->paths[i];
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
        if (fd < 0) {
            fail(j, path, errno);
            continue;
        }
        struct stat st;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {    /* replaced since it was listed */
            close(fd);
            continue;
        }
        atomic_fetch_add(&j->total, 1);
        int e = verity_enable(fd, path);
        if (e == 0) {
            atomic_fetch_add(&j->enabled, 1);
        } else if (e != EEXIST) {
            uint8_t digest[32];
            if (verity_measure(fd, path, digest) != 0)      /* e.g. EROFS, but it has fs-verity */
                fail(j, path, e);
        }
        close(fd);
    }
}

int provision(const char *const *images, int nimages, const char *objects, const char *label)
{
    struct job j;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    memset(&j, 0, sizeof j);
    pthread_mutex_init(&j.lock, NULL);
    int e = 0;
    const char *where = objects;
    for (int i = 0; i < nimages && !e; i++)
        e = collect(&j, where = images[i], 0);
    if (!e) {
        e = collect(&j, objects, 1);
        where = objects;
    }
    int rc = 1;
    if (e) {
        dprintf(2, "bootimg-provision: cannot list %s: %s\n", where, strerror(e));
        goto out;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int nthreads = cpus < 2 ? 2 : cpus > MAX_THREADS ? MAX_THREADS : (int)cpus;
    pthread_t threads[MAX_THREADS];
    int started = 0;
    for (; started < nthreads; started++)
        if (pthread_create(&threads[started], NULL, worker, &j) != 0)
            break;
    if (started == 0)
        worker(&j);
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    if (atomic_load(&j.failed)) {
        dprintf(2, "bootimg-provision: %s\n", j.error);
        goto out;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    dprintf(2, "bootimg-provision: fs-verity enabled on %zu files; all %zu files of %s have it (%.2f s, %d threads)\n",
            (size_t)atomic_load(&j.enabled), (size_t)atomic_load(&j.total), label,
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9, started ? started : 1);
    rc = 0;
out:
    for (size_t i = 0; i < j.n; i++)
        free(j.paths[i]);
    free(j.paths);
    pthread_mutex_destroy(&j.lock);
    return rc;
}

int provision_main(int argc, char **argv)
{
    /* provision RELEASE_DIR [OBJECTS_DIR]: the store defaults to RELEASE_DIR/objects */
    if (argc < 2 || argc > 3 || argv[1][0] == '-') {
        dprintf(2, "usage: bootimg-setup-root provision RELEASE_DIR [OBJECTS_DIR]\n");
        return 2;
    }
    char images[BSR_PATH_MAX], objects[BSR_PATH_MAX];
    if (path_join(images, sizeof images, argv[1], "/images") < 0
        || path_join(objects, sizeof objects, argc == 3 ? argv[2] : argv[1], argc == 3 ? "" : "/objects") < 0) {
        dprintf(2, "bootimg-provision: path too long\n");
        return 1;
    }
    struct stat a, b;
    if (stat(images, &a) < 0 || !S_ISDIR(a.st_mode) || stat(objects, &b) < 0 || !S_ISDIR(b.st_mode)) {
        dprintf(2, "bootimg-provision: %s is not a release directory (no images/ or objects/)\n", argv[1]);
        return 1;
    }
    const char *dirs[1] = {images};
    return provision(dirs, 1, objects, argv[1]);
}
