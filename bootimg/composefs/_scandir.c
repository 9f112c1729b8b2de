/* Read one directory the way a composefs directory scan needs it, in one call.
 *
 * The Python walk cost ~13 us per entry on /usr (os.scandir, lstat, listxattr, readlink or a
 * small read, each a Python call and objects, then a Node). scandir_into does the system calls
 * for a whole directory with the GIL released, then makes the directory's tree.Node objects
 * directly: xattrs in listxattr order, the symlink target as payload, the content of a regular
 * file of 1..inline_max bytes, rdev only for devices, mtime_sec as the u64 the image stores
 * (pre-1970 wraps), nlink 1 (directory scans do not detect hardlinks, as the reference).
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
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#define FLAG_SKIP_XATTRS 1
#define FLAG_USER_XATTRS 2
#define FLAG_SKIP_DEVICES 4

/* listxattrat(2) (Linux 6.13) names the file relative to the directory's fd: llistxattr with
 * the full path walked every component again, ~20% of a /usr walk. Same number on every
 * architecture; older kernels say ENOSYS once and the full path is used from then on. */
#ifndef __NR_listxattrat
#define __NR_listxattrat 465
#endif
static int g_no_listxattrat;

static ssize_t list_xattrs(int dfd, const char *name, const char *path, char *list, size_t size)
{
    if (!g_no_listxattrat) {
        ssize_t n = syscall(__NR_listxattrat, dfd, name, AT_SYMLINK_NOFOLLOW, list, size);
        if (n >= 0 || (errno != ENOSYS && errno != EPERM))   /* EPERM: a seccomp filter */
            return n;
        g_no_listxattrat = 1;
    }
    return llistxattr(path, list, size);
}

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
static int read_xattrs(struct scan *s, struct entry *e, int dfd, const char *name, const char *path, int flags,
                       char **names, size_t *names_cap)
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
        len = list_xattrs(dfd, name, path, *names, *names_cap);
        if (len >= 0)
            break;
        if (errno == ENOTSUP || errno == ENODATA)
            return 0;
        if (errno != ERANGE)
            return -1;
        ssize_t need = list_xattrs(dfd, name, path, NULL, 0);
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
        if (!(flags & FLAG_SKIP_XATTRS) && read_xattrs(s, e, dfd, name, path, flags, &names, &names_cap) < 0) {
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

/* Run the system-call part for `dir` without the GIL; on failure set the Python error. */
static int scan_or_raise(struct scan *s, const char *dir, Py_ssize_t dir_len, int flags, long inline_max)
{
    if ((Py_ssize_t)strlen(dir) != dir_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return -1;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = scan_dir(s, dir, flags, inline_max);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (s->err == ENOMEM) {
            PyErr_NoMemory();
        } else {
            PyObject *fn = s->err_path ? PyBytes_FromString(s->err_path) : NULL;
            errno = s->err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, fn);
            Py_XDECREF(fn);
        }
        scan_free(s);
    }
    return rc;
}

/* Attribute names of bootimg.composefs.tree.Node, interned once. */
enum { A_NAME, A_PARENT, A_CHILDREN, A_LINK_TO, A_MODE, A_NLINK, A_UID, A_GID, A_RDEV, A_MTIME_SEC,
       A_MTIME_NSEC, A_SIZE, A_PAYLOAD, A_CONTENT, A_DIGEST, A_XATTRS, N_ATTRS };
static const char *const attr_names[N_ATTRS] = {
    "name", "parent", "children", "link_to", "mode", "nlink", "uid", "gid", "rdev", "mtime_sec",
    "mtime_nsec", "size", "payload", "content", "digest", "xattrs"};
static PyObject *attrs[N_ATTRS];

/* Set attribute i of node to v, stealing the reference to v. */
static int set_steal(PyObject *node, int i, PyObject *v)
{
    if (!v)
        return -1;
    int rc = PyObject_SetAttr(node, attrs[i], v);
    Py_DECREF(v);
    return rc;
}

static PyObject *make_node(const struct scan *s, const struct entry *e, PyTypeObject *node_type, PyObject *parent,
                           int use_epoch, PyObject **name_out)
{
    const char *a = s->arena.p;
    mode_t fmt = e->st.st_mode & S_IFMT;
    PyObject *node = node_type->tp_alloc(node_type, 0);
    if (!node)
        return NULL;
    PyObject *name = PyBytes_FromStringAndSize(a + e->name_off, (Py_ssize_t)e->name_len);
    if (!name)
        goto fail;
    if (PyObject_SetAttr(node, attrs[A_NAME], name) < 0) {
        Py_DECREF(name);
        goto fail;
    }
    *name_out = name;

    PyObject *xattrs = PyDict_New();
    if (!xattrs)
        goto fail;
    const char *p = a + e->xattr_off;
    for (int i = 0; i < e->n_xattrs; i++) {
        uint32_t kl, vl;
        memcpy(&kl, p, 4);
        const char *k = p + 4;
        memcpy(&vl, k + kl, 4);
        const char *v = k + kl + 4;
        PyObject *key = PyBytes_FromStringAndSize(k, kl), *val = PyBytes_FromStringAndSize(v, vl);
        int rc = key && val ? PyDict_SetItem(xattrs, key, val) : -1;
        Py_XDECREF(key);
        Py_XDECREF(val);
        if (rc < 0) {
            Py_DECREF(xattrs);
            goto fail;
        }
        p = v + vl;
    }
    PyObject *data = e->data_off < 0 ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize(a + e->data_off, e->data_len);
    uint64_t size = fmt == S_IFREG ? (uint64_t)e->st.st_size : fmt == S_IFLNK ? (uint64_t)e->data_len : 0;
    unsigned long long rdev = (fmt == S_IFCHR || fmt == S_IFBLK) ? (unsigned long long)e->st.st_rdev : 0;
    if (set_steal(node, A_XATTRS, xattrs) < 0 ||
        PyObject_SetAttr(node, attrs[A_PARENT], parent) < 0 ||
        set_steal(node, A_CHILDREN, fmt == S_IFDIR ? PyDict_New() : Py_NewRef(Py_None)) < 0 ||
        PyObject_SetAttr(node, attrs[A_LINK_TO], Py_None) < 0 ||
        PyObject_SetAttr(node, attrs[A_DIGEST], Py_None) < 0 ||
        set_steal(node, A_MODE, PyLong_FromUnsignedLong(e->st.st_mode)) < 0 ||
        set_steal(node, A_NLINK, PyLong_FromLong(1)) < 0 ||
        set_steal(node, A_UID, PyLong_FromUnsignedLong(e->st.st_uid)) < 0 ||
        set_steal(node, A_GID, PyLong_FromUnsignedLong(e->st.st_gid)) < 0 ||
        set_steal(node, A_RDEV, PyLong_FromUnsignedLongLong(rdev)) < 0 ||
        set_steal(node, A_MTIME_SEC, PyLong_FromUnsignedLongLong(use_epoch ? 0 : (uint64_t)e->st.st_mtim.tv_sec)) < 0 ||
        set_steal(node, A_MTIME_NSEC, PyLong_FromLong(use_epoch ? 0 : e->st.st_mtim.tv_nsec)) < 0 ||
        set_steal(node, A_SIZE, PyLong_FromUnsignedLongLong(size)) < 0 ||
        set_steal(node, A_PAYLOAD, fmt == S_IFLNK ? Py_XNewRef(data) : Py_NewRef(Py_None)) < 0 ||
        set_steal(node, A_CONTENT, fmt == S_IFREG ? Py_XNewRef(data) : Py_NewRef(Py_None)) < 0) {
        Py_XDECREF(data);
        goto fail;
    }
    Py_XDECREF(data);
    return node;
fail:
    Py_CLEAR(*name_out);
    Py_DECREF(node);
    return NULL;
}

PyDoc_STRVAR(scandir_into_doc,
"scandir_into(path, flags, inline_max, node_type, parent, use_epoch, subdirs, external) -> int\n\n"
"Make a node_type (tree.Node) for every entry of directory `path` but . and .., linked into\n"
"parent.children; append (path, node) of each directory to subdirs and of each regular file\n"
"larger than inline_max to external. Returns the number of entries. flags: 1 skip xattrs,\n"
"2 only user.* xattrs, 4 leave out block and character devices.");

static PyObject *py_scandir_into(PyObject *self, PyObject *args)
{
    const char *dir;
    Py_ssize_t dir_len;
    int flags, use_epoch;
    long inline_max;
    PyObject *node_type, *parent, *subdirs, *external;
    if (!PyArg_ParseTuple(args, "y#ilO!OpO!O!:scandir_into", &dir, &dir_len, &flags, &inline_max, &PyType_Type,
                          &node_type, &parent, &use_epoch, &PyList_Type, &subdirs, &PyList_Type, &external))
        return NULL;
    PyObject *children = PyObject_GetAttr(parent, attrs[A_CHILDREN]);
    if (!children)
        return NULL;
    if (!PyDict_Check(children)) {
        Py_DECREF(children);
        PyErr_SetString(PyExc_TypeError, "parent.children is not a dict");
        return NULL;
    }
    struct scan s = {0};
    if (scan_or_raise(&s, dir, dir_len, flags, inline_max) < 0) {
        Py_DECREF(children);
        return NULL;
    }
    PyObject *result = NULL;
    for (size_t i = 0; i < s.n; i++) {
        const struct entry *e = &s.entries[i];
        PyObject *name = NULL;
        PyObject *node = make_node(&s, e, (PyTypeObject *)node_type, parent, use_epoch, &name);
        if (!node)
            goto out;
        int rc = PyDict_SetItem(children, name, node);
        mode_t fmt = e->st.st_mode & S_IFMT;
        if (rc == 0 && (fmt == S_IFDIR || (fmt == S_IFREG && e->st.st_size > inline_max))) {
            PyObject *path = PyBytes_FromStringAndSize(NULL, dir_len + 1 + (Py_ssize_t)e->name_len);
            PyObject *pair = NULL;
            if (path) {
                char *b = PyBytes_AS_STRING(path);
                memcpy(b, dir, (size_t)dir_len);
                b[dir_len] = '/';
                memcpy(b + dir_len + 1, s.arena.p + e->name_off, e->name_len);
                pair = PyTuple_Pack(2, path, node);
                Py_DECREF(path);
            }
            rc = pair ? PyList_Append(fmt == S_IFDIR ? subdirs : external, pair) : -1;
            Py_XDECREF(pair);
        }
        Py_DECREF(name);
        Py_DECREF(node);
        if (rc < 0)
            goto out;
    }
    result = PyLong_FromSize_t(s.n);
out:
    Py_DECREF(children);
    scan_free(&s);
    return result;
}

static PyMethodDef methods[] = {
    {"scandir_into", py_scandir_into, METH_VARARGS, scandir_into_doc},
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
    for (int i = 0; i < N_ATTRS; i++)
        if (!attrs[i] && !(attrs[i] = PyUnicode_InternFromString(attr_names[i])))
            return NULL;
    return PyModule_Create(&moduledef);
}
