/* Read one directory the way a composefs directory scan needs it, in one call.
 *
 * The Python walk cost ~13 us per entry on /usr (os.scandir, lstat, listxattr, readlink or a
 * small read, each a Python call and objects); this does the system calls for a whole
 * directory with the GIL released, then builds one tuple per entry:
 *
 *   (name, mode, uid, gid, rdev, size, mtime_sec, mtime_nsec, xattrs, data)
 *
 * xattrs is None or a tuple of (key, value) byte pairs in listxattr order; data is the symlink
 * target, or the content of a regular file of 1..inline_max bytes, else None. rdev is 0 except
 * for character and block devices; mtime_sec is the u64 the image stores (pre-1970 wraps).
 * Errors are OSError with the path that failed as its filename. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#define FLAG_SKIP_XATTRS 1
#define FLAG_USER_XATTRS 2
#define FLAG_SKIP_DEVICES 4

struct buf {                    /* one growing arena for names, xattrs and data */
    char *p;
    size_t len, cap;
};

static int buf_reserve(struct buf *b, size_t n)
{
    if (b->len + n <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 65536;
    while (cap < b->len + n)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

struct entry {
    size_t name_off, name_len;
    struct stat st;
    size_t xattr_off, xattr_len;    /* packed: u32 klen, key, u32 vlen, value ... */
    int n_xattrs;
    ssize_t data_off, data_len;     /* data_off < 0: no data */
};

struct scan {
    struct buf arena;
    struct entry *entries;
    size_t n, cap;
    int err;                        /* errno of the first failure */
    char *err_path;                 /* malloc'd path it concerns */
};

static void scan_free(struct scan *s)
{
    free(s->arena.p);
    free(s->entries);
    free(s->err_path);
}

static int fail(struct scan *s, int err, const char *dir, const char *name)
{
    s->err = err ? err : EIO;
    size_t dl = strlen(dir), nl = name ? strlen(name) : 0;
    s->err_path = malloc(dl + nl + 2);
    if (s->err_path) {
        memcpy(s->err_path, dir, dl);
        if (name) {
            s->err_path[dl] = '/';
            memcpy(s->err_path + dl + 1, name, nl + 1);
        } else {
            s->err_path[dl] = 0;
        }
    }
    return -1;
}

/* All xattrs of `path` (not following a symlink) into the arena. */
static int read_xattrs(struct scan *s, struct entry *e, const char *path, int flags, char **names, size_t *names_cap)
{
    e->n_xattrs = 0;
    e->xattr_off = s->arena.len;
    e->xattr_len = 0;
    ssize_t len;
    if (*names_cap == 0) {          /* a zero-size buffer would ask for the size instead */
        if (!(*names = malloc(1024))) {
            errno = ENOMEM;
            return -1;
        }
        *names_cap = 1024;
    }
    for (;;) {
        len = llistxattr(path, *names, *names_cap);
        if (len >= 0)
            break;
        if (errno == ENOTSUP || errno == ENODATA)
            return 0;
        if (errno != ERANGE)
            return -1;
        ssize_t need = llistxattr(path, NULL, 0);
        if (need < 0)
            return -1;
        size_t cap = (size_t)need + 256;
        char *p = realloc(*names, cap);
        if (!p) {
            errno = ENOMEM;
            return -1;
        }
        *names = p;
        *names_cap = cap;
    }
    for (char *k = *names; k < *names + len; k += strlen(k) + 1) {
        if ((flags & FLAG_USER_XATTRS) && strncmp(k, "user.", 5) != 0)
            continue;
        size_t klen = strlen(k);
        for (;;) {
            ssize_t vlen = lgetxattr(path, k, NULL, 0);
            if (vlen < 0)
                return -1;
            if (buf_reserve(&s->arena, 8 + klen + (size_t)vlen) < 0) {
                errno = ENOMEM;
                return -1;
            }
            char *at = s->arena.p + s->arena.len;
            uint32_t kl = (uint32_t)klen;
            memcpy(at, &kl, 4);
            memcpy(at + 4, k, klen);
            ssize_t got = lgetxattr(path, k, at + 8 + klen, (size_t)vlen);
            if (got < 0 && errno == ERANGE)
                continue;           /* grew in between: ask again */
            if (got < 0)
                return -1;
            uint32_t vl = (uint32_t)got;
            memcpy(at + 4 + klen, &vl, 4);
            s->arena.len += 8 + klen + (size_t)got;
            e->n_xattrs++;
            break;
        }
    }
    e->xattr_len = s->arena.len - e->xattr_off;
    return 0;
}

/* The system-call part, GIL released. Returns 0 or -1 with s->err set. */
static int scan_dir(struct scan *s, const char *dir, int flags, long inline_max)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return fail(s, errno, dir, NULL);
    DIR *d = fdopendir(dfd);
    if (!d) {
        int err = errno;
        close(dfd);
        return fail(s, err, dir, NULL);
    }
    size_t dlen = strlen(dir);
    char path[PATH_MAX + 1];
    char *names = NULL;
    size_t names_cap = 0;
    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno)
                rc = fail(s, errno, dir, NULL);
            break;
        }
        const char *name = de->d_name;
        if (name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0)))
            continue;
        if (s->n == s->cap) {
            size_t cap = s->cap ? s->cap * 2 : 64;
            struct entry *p = realloc(s->entries, cap * sizeof *p);
            if (!p) {
                rc = fail(s, ENOMEM, dir, NULL);
                break;
            }
            s->entries = p;
            s->cap = cap;
        }
        struct entry *e = &s->entries[s->n];
        if (fstatat(dfd, name, &e->st, AT_SYMLINK_NOFOLLOW) < 0) {
            rc = fail(s, errno, dir, name);
            break;
        }
        mode_t fmt = e->st.st_mode & S_IFMT;
        if ((flags & FLAG_SKIP_DEVICES) && (fmt == S_IFCHR || fmt == S_IFBLK))
            continue;
        size_t nlen = strlen(name);
        if (dlen + 1 + nlen > PATH_MAX) {
            rc = fail(s, ENAMETOOLONG, dir, name);
            break;
        }
        memcpy(path, dir, dlen);
        path[dlen] = '/';
        memcpy(path + dlen + 1, name, nlen + 1);

        if (buf_reserve(&s->arena, nlen) < 0) {
            rc = fail(s, ENOMEM, dir, name);
            break;
        }
        e->name_off = s->arena.len;
        e->name_len = nlen;
        memcpy(s->arena.p + s->arena.len, name, nlen);
        s->arena.len += nlen;

        e->n_xattrs = 0;
        e->xattr_len = 0;
        if (!(flags & FLAG_SKIP_XATTRS) && read_xattrs(s, e, path, flags, &names, &names_cap) < 0) {
            rc = fail(s, errno, dir, name);
            break;
        }

        e->data_off = -1;
        e->data_len = 0;
        if (fmt == S_IFLNK) {
            if (buf_reserve(&s->arena, PATH_MAX) < 0) {
                rc = fail(s, ENOMEM, dir, name);
                break;
            }
            ssize_t n = readlinkat(dfd, name, s->arena.p + s->arena.len, PATH_MAX);
            if (n < 0 || n >= PATH_MAX) {
                rc = fail(s, n < 0 ? errno : ENAMETOOLONG, dir, name);
                break;
            }
            e->data_off = (ssize_t)s->arena.len;
            e->data_len = n;
            s->arena.len += (size_t)n;
        } else if (fmt == S_IFREG && e->st.st_size > 0 && e->st.st_size <= inline_max) {
            size_t want = (size_t)e->st.st_size;
            if (buf_reserve(&s->arena, want + 1) < 0) {
                rc = fail(s, ENOMEM, dir, name);
                break;
            }
            int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
            if (fd < 0) {
                rc = fail(s, errno, dir, name);
                break;
            }
            size_t got = 0;
            char *at = s->arena.p + s->arena.len;
            while (got < want + 1) {     /* one byte more: a file that grew is an error */
                ssize_t n = read(fd, at + got, want + 1 - got);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n < 0) {
                    int err = errno;
                    close(fd);
                    rc = fail(s, err, dir, name);
                    goto out;
                }
                if (n == 0)
                    break;
                got += (size_t)n;
            }
            close(fd);
            if (got != want) {
                rc = fail(s, EIO, dir, name);   /* changed size while being read */
                break;
            }
            e->data_off = (ssize_t)s->arena.len;
            e->data_len = (ssize_t)got;
            s->arena.len += got;
        }
        s->n++;
    }
out:
    free(names);
    closedir(d);
    return rc;
}

static PyObject *entry_tuple(const struct scan *s, const struct entry *e)
{
    const char *a = s->arena.p;
    mode_t fmt = e->st.st_mode & S_IFMT;
    PyObject *xattrs;
    if (e->n_xattrs == 0) {
        xattrs = Py_NewRef(Py_None);
    } else {
        xattrs = PyTuple_New(e->n_xattrs);
        if (!xattrs)
            return NULL;
        const char *p = a + e->xattr_off;
        for (int i = 0; i < e->n_xattrs; i++) {
            uint32_t kl, vl;
            memcpy(&kl, p, 4);
            const char *k = p + 4;
            memcpy(&vl, k + kl, 4);
            const char *v = k + kl + 4;
            PyObject *pair = Py_BuildValue("(y#y#)", k, (Py_ssize_t)kl, v, (Py_ssize_t)vl);
            if (!pair) {
                Py_DECREF(xattrs);
                return NULL;
            }
            PyTuple_SET_ITEM(xattrs, i, pair);
            p = v + vl;
        }
    }
    PyObject *data;
    if (e->data_off < 0)
        data = Py_NewRef(Py_None);
    else if (!(data = PyBytes_FromStringAndSize(a + e->data_off, e->data_len))) {
        Py_DECREF(xattrs);
        return NULL;
    }
    unsigned long long rdev = (fmt == S_IFCHR || fmt == S_IFBLK) ? (unsigned long long)e->st.st_rdev : 0;
    long long size = fmt == S_IFLNK ? (long long)e->data_len : (long long)e->st.st_size;
    return Py_BuildValue("(y#IIIKLKINN)", a + e->name_off, (Py_ssize_t)e->name_len,
                         (unsigned)e->st.st_mode, (unsigned)e->st.st_uid, (unsigned)e->st.st_gid, rdev, size,
                         (unsigned long long)(uint64_t)e->st.st_mtim.tv_sec, (unsigned)e->st.st_mtim.tv_nsec,
                         xattrs, data);
}

PyDoc_STRVAR(scandir_doc,
"scandir(path: bytes, flags: int, inline_max: int) -> list[tuple]\n\n"
"Every entry of directory `path` but . and .. as (name, mode, uid, gid, rdev, size, mtime_sec,\n"
"mtime_nsec, xattrs, data), system calls made with the GIL released. flags: 1 skip xattrs,\n"
"2 only user.* xattrs, 4 leave out block and character devices.");

static PyObject *py_scandir(PyObject *self, PyObject *args)
{
    const char *dir;
    Py_ssize_t dir_len;
    int flags;
    long inline_max;
    if (!PyArg_ParseTuple(args, "y#il:scandir", &dir, &dir_len, &flags, &inline_max))
        return NULL;
    if ((Py_ssize_t)strlen(dir) != dir_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return NULL;
    }
    struct scan s = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = scan_dir(&s, dir, flags, inline_max);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (s.err == ENOMEM) {
            PyErr_NoMemory();
        } else {
            PyObject *fn = s.err_path ? PyBytes_FromString(s.err_path) : NULL;
            errno = s.err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, fn);
            Py_XDECREF(fn);
        }
        scan_free(&s);
        return NULL;
    }
    PyObject *list = PyList_New((Py_ssize_t)s.n);
    if (list) {
        for (size_t i = 0; i < s.n; i++) {
            PyObject *t = entry_tuple(&s, &s.entries[i]);
            if (!t) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
        }
    }
    scan_free(&s);
    return list;
}

static PyMethodDef methods[] = {
    {"scandir", py_scandir, METH_VARARGS, scandir_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "bootimg.composefs._scandir",
    "One directory of a composefs scan per call: stat, xattrs, link targets, small contents.",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__scandir(void)
{
    return PyModule_Create(&moduledef);
}
