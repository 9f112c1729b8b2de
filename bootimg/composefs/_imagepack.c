/* Place and pack the inodes of a composefs image: the writer's last two steps in C.
 *
 * The Python writer decides everything that is about the tree (inode order, xattrs, sharing);
 * this is its _layout + _serialize loop, transliterated, because at ~10 us per inode in Python
 * it was the longest serial step of a /usr build. The input is the writer's _Inode list in
 * breadth-first order, with xsz/xfilter/shared_ids/inline_xattrs set; every rule (compact vs
 * extended, inline tails that must not cross a block, symlinks sharing their inode's block,
 * the spilled chunk table with the reference's union overwrite) follows writer.py exactly,
 * and the tests compare both byte for byte. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

#define BLOCK 4096u
#define HALF_BLOCK 2048u
#define COMPACT_SIZE 32u
#define EXTENDED_SIZE 64u
#define DIRENT_SIZE 12u
#define XATTR_HEADER_SIZE 12u
#define LAYOUT_FLAT_PLAIN 0
#define LAYOUT_FLAT_INLINE 2
#define LAYOUT_CHUNK_BASED 4

enum { A_MODE, A_NLINK, A_UID, A_GID, A_RDEV, A_MTIME_SEC, A_MTIME_NSEC, A_SIZE, A_XSZ, A_XFILTER,
       A_SHARED_IDS, A_INLINE_XATTRS, A_ENTRIES, A_NODE, A_PAYLOAD, A_CONTENT, A_CHUNK_BITS, A_INO, A_XATTRS,
       N_ATTRS };
static const char *const attr_names[N_ATTRS] = {
    "mode", "nlink", "uid", "gid", "rdev", "mtime_sec", "mtime_nsec", "size", "xsz", "xfilter",
    "shared_ids", "inline_xattrs", "entries", "node", "payload", "content", "chunk_bits", "ino", "xattrs"};
static PyObject *attrs[N_ATTRS];

struct ino {
    uint64_t nlink, uid, gid, rdev, mtime_sec, mtime_nsec, size, i_size, blkaddr;
    uint32_t mode, xsz, n_blocks, tail, chunk_bits;
    uint64_t nid;
    uint8_t isz, layout, spilled, inline_content;
};

static int get_u64(PyObject *obj, int attr, uint64_t *out)
{
    PyObject *v = PyObject_GetAttr(obj, attrs[attr]);
    if (!v)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

static int too_big(const char *what, uint64_t v)
{
    PyErr_Format(PyExc_OverflowError, "%s %llu does not fit its on-disk field", what, (unsigned long long)v);
    return -1;
}

/* The node's payload (symlink target) or content (inline file data), a new reference or None. */
static PyObject *node_bytes(PyObject *ino_obj, int attr)
{
    PyObject *node = PyObject_GetAttr(ino_obj, attrs[A_NODE]);
    if (!node)
        return NULL;
    PyObject *v = node == Py_None ? Py_NewRef(Py_None) : PyObject_GetAttr(node, attrs[attr]);
    Py_DECREF(node);
    if (v && v != Py_None && !PyBytes_Check(v)) {
        Py_DECREF(v);
        PyErr_SetString(PyExc_TypeError, "node payload/content is not bytes");
        return NULL;
    }
    return v;
}

/* Greedy packing of a directory's dirents into blocks (as _dir_chunks): the end of the chunk
 * that starts at entry `start`, and the bytes it uses. */
static Py_ssize_t chunk_end(PyObject *entries, Py_ssize_t start, uint32_t *used)
{
    Py_ssize_t n = PyList_GET_SIZE(entries), end = start;
    uint32_t u = 0;
    while (end < n) {
        PyObject *name = PyTuple_GET_ITEM(PyList_GET_ITEM(entries, end), 0);
        uint32_t size = DIRENT_SIZE + (uint32_t)PyBytes_GET_SIZE(name);
        if (u + size > BLOCK && end > start)
            break;
        u += size;
        end++;
    }
    *used = u;
    return end;
}

static uint8_t file_type(uint32_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFREG: return 1;
    case S_IFDIR: return 2;
    case S_IFCHR: return 3;
    case S_IFBLK: return 4;
    case S_IFIFO: return 5;
    case S_IFSOCK: return 6;
    case S_IFLNK: return 7;
    default: return 0;
    }
}

static void put16(unsigned char *p, uint32_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }

/* Pass 1 (_layout): read each inode's fields and place it. Returns the end of the inode area. */
static int layout(PyObject *order, struct ino *inos, uint64_t area_start, uint64_t min_sec, uint64_t min_nsec,
                  uint64_t *end)
{
    Py_ssize_t count = PyList_GET_SIZE(order);
    uint64_t pos = area_start;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *o = PyList_GET_ITEM(order, i);
        struct ino *d = &inos[i];
        uint64_t mode, xsz;
        if (get_u64(o, A_MODE, &mode) || get_u64(o, A_NLINK, &d->nlink) || get_u64(o, A_UID, &d->uid) ||
            get_u64(o, A_GID, &d->gid) || get_u64(o, A_RDEV, &d->rdev) || get_u64(o, A_MTIME_SEC, &d->mtime_sec) ||
            get_u64(o, A_MTIME_NSEC, &d->mtime_nsec) || get_u64(o, A_SIZE, &d->size) || get_u64(o, A_XSZ, &xsz))
            return -1;
        d->mode = (uint32_t)mode;
        d->xsz = (uint32_t)xsz;
        uint32_t ftype = d->mode & S_IFMT;
        uint64_t n_blocks = 0, tail = 0, size = d->size;
        int lay = LAYOUT_FLAT_PLAIN;
        d->spilled = 0;
        d->inline_content = 0;
        if (ftype == S_IFDIR) {
            PyObject *entries = PyObject_GetAttr(o, attrs[A_ENTRIES]);
            if (!entries)
                return -1;
            if (!PyList_Check(entries)) {
                Py_DECREF(entries);
                PyErr_SetString(PyExc_TypeError, "directory entries are not a list");
                return -1;
            }
            Py_ssize_t n_chunks = 0, start = 0;
            uint32_t used = 0;
            do {                        /* . and .. are always there: at least one chunk */
                start = chunk_end(entries, start, &used);
                n_chunks++;
            } while (start < PyList_GET_SIZE(entries));
            Py_DECREF(entries);
            n_blocks = (uint64_t)n_chunks - 1;
            tail = used;
            if (tail > HALF_BLOCK) {
                n_blocks++;
                tail = 0;
            }
            size = n_blocks * BLOCK + tail;
            d->i_size = size;
        } else if (ftype == S_IFREG) {
            d->i_size = size;
            if (size > 0) {
                PyObject *content = node_bytes(o, A_CONTENT);
                if (!content)
                    return -1;
                int inline_content = content != Py_None;
                Py_DECREF(content);
                if (inline_content) {
                    d->inline_content = 1;
                    n_blocks = size / BLOCK;
                    tail = size % BLOCK;
                    if (tail > HALF_BLOCK) {
                        n_blocks++;
                        tail = 0;
                    }
                } else {
                    uint64_t bits;
                    if (get_u64(o, A_CHUNK_BITS, &bits))
                        return -1;
                    d->chunk_bits = (uint32_t)bits;
                    lay = LAYOUT_CHUNK_BASED;
                    tail = 4 * ((size + ((uint64_t)1 << bits) - 1) >> bits);
                }
            }
        } else if (ftype == S_IFLNK) {
            tail = size;
            d->i_size = size;
        } else {
            d->i_size = 0;
        }

        uint32_t isz = (d->mtime_sec == min_sec && d->mtime_nsec == min_nsec && d->nlink <= 0xFFFF &&
                        d->uid <= 0xFFFF && d->gid <= 0xFFFF && size <= 0xFFFFFFFFu) ? COMPACT_SIZE : EXTENDED_SIZE;
        d->isz = (uint8_t)isz;

        pos = (pos + 31) & ~(uint64_t)31;
        if (ftype == S_IFLNK) {
            uint64_t total = isz + xsz + tail;
            if (total >= BLOCK) {
                n_blocks++;
                tail = 0;
            }
            if (pos / BLOCK != (pos + total - 1) / BLOCK)
                pos += (BLOCK - pos % BLOCK) % BLOCK;
        } else {
            uint64_t rem = BLOCK - (pos + isz + xsz) % BLOCK;
            if (rem < tail) {
                uint64_t extra = (rem + 31) & ~(uint64_t)31;
                uint64_t rem2 = BLOCK - (pos + isz + xsz + extra) % BLOCK;
                if (tail > rem2) {
                    n_blocks++;
                    tail = 0;
                    extra = (BLOCK - pos % BLOCK) % BLOCK;
                    if (lay == LAYOUT_CHUNK_BASED)
                        d->spilled = 1;
                }
                pos += extra;
            }
        }
        d->nid = pos >> 5;
        pos += isz + xsz + tail;
        if (lay != LAYOUT_CHUNK_BASED)
            lay = tail ? LAYOUT_FLAT_INLINE : LAYOUT_FLAT_PLAIN;
        d->layout = (uint8_t)lay;
        if (n_blocks > UINT32_MAX || tail > UINT32_MAX)
            return too_big("block count", n_blocks);
        d->n_blocks = (uint32_t)n_blocks;
        d->tail = (uint32_t)tail;
    }
    *end = (pos + 31) & ~(uint64_t)31;
    return 0;
}

static int check_range(size_t out_len, uint64_t at, uint64_t n)
{
    if (at > out_len || n > out_len - at) {
        PyErr_SetString(PyExc_RuntimeError, "image layout overflow (writer bug)");
        return -1;
    }
    return 0;
}

static int copy_bytes(unsigned char *out, size_t out_len, uint64_t at, const char *src, size_t n)
{
    if (check_range(out_len, at, n) < 0)
        return -1;
    if (n)
        memcpy(out + at, src, n);
    return 0;
}

/* Pass 2 (_serialize's loop): every inode, its xattr body and its data into out. */
static int pack(PyObject *order, struct ino *inos, unsigned char *out, size_t out_len, uint64_t shared_base)
{
    Py_ssize_t count = PyList_GET_SIZE(order);
    unsigned char buf[BLOCK];
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *o = PyList_GET_ITEM(order, i);
        struct ino *d = &inos[i];
        uint64_t off = d->nid << 5;
        uint32_t ftype = d->mode & S_IFMT;
        uint64_t i_u;
        if (ftype == S_IFCHR || ftype == S_IFBLK)
            i_u = d->rdev;
        else if (d->layout == LAYOUT_CHUNK_BASED) {
            i_u = d->chunk_bits - 12;
            if (d->spilled)
                i_u |= d->blkaddr & 0xFFFF0000u;          /* the reference's union overwrite */
        } else
            i_u = d->n_blocks ? d->blkaddr : 0;
        if (i_u > UINT32_MAX)
            return too_big("i_u", i_u);
        uint32_t icount = d->xsz ? (d->xsz - 12) / 4 + 1 : 0;
        unsigned char *p = out + off;
        if (check_range(out_len, off, (uint64_t)d->isz + d->xsz + d->tail) < 0)
            return -1;
        if (d->isz == COMPACT_SIZE) {
            put16(p, (uint32_t)d->layout << 1);
            put16(p + 2, icount);
            put16(p + 4, d->mode & 0xFFFF);
            put16(p + 6, (uint32_t)d->nlink);
            put32(p + 8, (uint32_t)d->i_size);
            put32(p + 12, 0);
            put32(p + 16, (uint32_t)i_u);
            put32(p + 20, (uint32_t)i);
            put16(p + 24, (uint32_t)d->uid);
            put16(p + 26, (uint32_t)d->gid);
            put32(p + 28, 0);
        } else {
            if (d->nlink > UINT32_MAX || d->uid > UINT32_MAX || d->gid > UINT32_MAX || d->mtime_nsec > UINT32_MAX)
                return too_big("nlink/uid/gid/mtime_nsec", d->nlink > UINT32_MAX ? d->nlink : d->uid);
            put16(p, ((uint32_t)d->layout << 1) | 1);
            put16(p + 2, icount);
            put16(p + 4, d->mode & 0xFFFF);
            put16(p + 6, 0);
            put64(p + 8, d->i_size);
            put32(p + 16, (uint32_t)i_u);
            put32(p + 20, (uint32_t)i);
            put32(p + 24, (uint32_t)d->uid);
            put32(p + 28, (uint32_t)d->gid);
            put64(p + 32, d->mtime_sec);
            put32(p + 40, (uint32_t)d->mtime_nsec);
            put32(p + 44, (uint32_t)d->nlink);
            memset(p + 48, 0, 16);
        }
        off += d->isz;

        if (d->xsz) {
            uint64_t xfilter;
            if (get_u64(o, A_XFILTER, &xfilter))
                return -1;
            PyObject *ids = PyObject_GetAttr(o, attrs[A_SHARED_IDS]);
            if (!ids)
                return -1;
            PyObject *body = PyObject_GetAttr(o, attrs[A_INLINE_XATTRS]);
            if (!body || !PySequence_Check(ids) || !PyBytes_Check(body)) {
                Py_DECREF(ids);
                Py_XDECREF(body);
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "shared_ids/inline_xattrs of the wrong type");
                return -1;
            }
            PyObject *seq = PySequence_Fast(ids, "shared_ids");
            Py_DECREF(ids);
            if (!seq) {
                Py_DECREF(body);
                return -1;
            }
            ids = seq;
            Py_ssize_t n_ids = PySequence_Fast_GET_SIZE(ids);
            Py_ssize_t body_len = PyBytes_GET_SIZE(body);
            if ((uint64_t)XATTR_HEADER_SIZE + 4 * (uint64_t)n_ids + (uint64_t)body_len != d->xsz) {
                Py_DECREF(ids);
                Py_DECREF(body);
                PyErr_SetString(PyExc_RuntimeError, "xattr body size mismatch (writer bug)");
                return -1;
            }
            p = out + off;
            put32(p, (uint32_t)xfilter);
            p[4] = (unsigned char)n_ids;
            memset(p + 5, 0, 7);
            for (Py_ssize_t k = 0; k < n_ids; k++) {
                unsigned long long o_ = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(ids, k));
                if (o_ == (unsigned long long)-1 && PyErr_Occurred()) {
                    Py_DECREF(ids);
                    Py_DECREF(body);
                    return -1;
                }
                put32(p + 12 + 4 * k, (uint32_t)((shared_base + o_) >> 2));
            }
            memcpy(p + 12 + 4 * n_ids, PyBytes_AS_STRING(body), (size_t)body_len);
            Py_DECREF(ids);
            Py_DECREF(body);
            off += d->xsz;
        }

        if (ftype == S_IFDIR) {
            PyObject *entries = PyObject_GetAttr(o, attrs[A_ENTRIES]);
            if (!entries)
                return -1;
            Py_ssize_t n = PyList_GET_SIZE(entries), start = 0;
            uint64_t blk = d->blkaddr * BLOCK;
            for (uint32_t chunk = 0; start < n; chunk++) {
                uint32_t used;
                Py_ssize_t end = chunk_end(entries, start, &used);
                uint32_t nameoff = DIRENT_SIZE * (uint32_t)(end - start), at_name = nameoff;
                for (Py_ssize_t k = start; k < end; k++) {
                    PyObject *entry = PyList_GET_ITEM(entries, k);
                    PyObject *name = PyTuple_GET_ITEM(entry, 0);
                    uint64_t child;
                    if (get_u64(PyTuple_GET_ITEM(entry, 1), A_INO, &child)) {
                        Py_DECREF(entries);
                        return -1;
                    }
                    if (child >= (uint64_t)count) {
                        Py_DECREF(entries);
                        PyErr_SetString(PyExc_RuntimeError, "dirent to an unnumbered inode (writer bug)");
                        return -1;
                    }
                    unsigned char *e = buf + DIRENT_SIZE * (k - start);
                    put64(e, inos[child].nid);
                    put16(e + 8, at_name);
                    e[10] = file_type(inos[child].mode);
                    e[11] = 0;
                    memcpy(buf + at_name, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
                    at_name += (uint32_t)PyBytes_GET_SIZE(name);
                }
                uint64_t at = chunk < d->n_blocks ? blk + (uint64_t)chunk * BLOCK : off;
                if (copy_bytes(out, out_len, at, (const char *)buf, used) < 0) {
                    Py_DECREF(entries);
                    return -1;
                }
                start = end;
            }
            Py_DECREF(entries);
        } else if (ftype == S_IFLNK) {
            PyObject *target = node_bytes(o, A_PAYLOAD);
            if (!target)
                return -1;
            if (target != Py_None) {
                uint64_t at = d->n_blocks ? d->blkaddr * BLOCK : off;
                int rc = copy_bytes(out, out_len, at, PyBytes_AS_STRING(target), (size_t)PyBytes_GET_SIZE(target));
                Py_DECREF(target);
                if (rc < 0)
                    return -1;
            } else {
                Py_DECREF(target);
            }
        } else if (d->layout == LAYOUT_CHUNK_BASED) {
            if (d->spilled) {               /* the reference fills the whole block it spilled to */
                if (check_range(out_len, d->blkaddr * BLOCK, BLOCK) < 0)
                    return -1;
                memset(out + d->blkaddr * BLOCK, 0xff, BLOCK);
            } else {
                memset(out + off, 0xff, d->tail);
            }
        } else if (ftype == S_IFREG && d->size && d->inline_content) {
            PyObject *content = node_bytes(o, A_CONTENT);
            if (!content)
                return -1;
            const char *c = PyBytes_AS_STRING(content);
            size_t len = (size_t)PyBytes_GET_SIZE(content);
            int rc = 0;
            if (d->n_blocks)   /* sizes up to 5000 need at most one full block */
                rc = copy_bytes(out, out_len, d->blkaddr * BLOCK, c, len < BLOCK ? len : BLOCK);
            if (rc == 0 && d->tail) {
                size_t from = (size_t)d->n_blocks * BLOCK;
                rc = copy_bytes(out, out_len, off, c + (from < len ? from : len), from < len ? len - from : 0);
            }
            Py_DECREF(content);
            if (rc < 0)
                return -1;
        }
    }
    return 0;
}


/* -- xattrs (_prepare_xattrs) ----------------------------------------------------------------- */

struct keyinfo {            /* per distinct key: its prefix index, suffix and bloom bit */
    int index;
    PyObject *suffix;       /* borrowed from the cache dict's value tuple */
    uint32_t bit;
};

/* Look up (or ask key_info for, and cache) what an entry with this key needs. */
static int key_lookup(PyObject *cache, PyObject *key_info, PyObject *key, struct keyinfo *out)
{
    PyObject *info = PyDict_GetItemWithError(cache, key);
    if (!info) {
        if (PyErr_Occurred())
            return -1;
        info = PyObject_CallOneArg(key_info, key);
        if (!info)
            return -1;
        int rc = PyTuple_Check(info) && PyTuple_GET_SIZE(info) == 3 && PyBytes_Check(PyTuple_GET_ITEM(info, 1))
                     ? PyDict_SetItem(cache, key, info) : -1;
        Py_DECREF(info);            /* the cache holds it now */
        if (rc < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "key_info must return (index, suffix, bit)");
            return -1;
        }
    }
    long index = PyLong_AsLong(PyTuple_GET_ITEM(info, 0));
    unsigned long bit = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(info, 2));
    if (PyErr_Occurred())
        return -1;
    out->index = (int)index;
    out->suffix = PyTuple_GET_ITEM(info, 1);
    out->bit = (uint32_t)bit;
    return 0;
}

struct growbuf {
    unsigned char *p;
    size_t len, cap;
};

static int grow(struct growbuf *b, size_t n)
{
    if (b->len + n <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n)
        cap *= 2;
    unsigned char *p = PyMem_Realloc(b->p, cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* One entry: e_name_len u8, e_name_index u8, e_value_size u16, suffix, value, pad to 4. */
static int put_entry(struct growbuf *b, const struct keyinfo *k, PyObject *value)
{
    Py_ssize_t sl = PyBytes_GET_SIZE(k->suffix), vl = PyBytes_GET_SIZE(value);
    if (sl > 255 || vl > 65535) {
        PyErr_Format(PyExc_OverflowError, "xattr name suffix (%zd) or value (%zd bytes) too long", sl, vl);
        return -1;
    }
    size_t size = 4 + (size_t)sl + (size_t)vl, padded = (size + 3) & ~(size_t)3;
    if (grow(b, padded) < 0)
        return -1;
    unsigned char *p = b->p + b->len;
    p[0] = (unsigned char)sl;
    p[1] = (unsigned char)k->index;
    put16(p + 2, (uint32_t)vl);
    memcpy(p + 4, PyBytes_AS_STRING(k->suffix), (size_t)sl);
    memcpy(p + 4 + sl, PyBytes_AS_STRING(value), (size_t)vl);
    memset(p + size, 0, padded - size);
    b->len += padded;
    return 0;
}

static int set_steal(PyObject *obj, int attr, PyObject *v)
{
    if (!v)
        return -1;
    int rc = PyObject_SetAttr(obj, attrs[attr], v);
    Py_DECREF(v);
    return rc;
}

PyDoc_STRVAR(prepare_xattrs_doc,
"prepare_xattrs(order, key_info, acl_keys, budget_max, max_shared) -> (table, has_acl, over)\n\n"
"The writer's _prepare_xattrs: sort each inode's xattrs, build the shared table (pairs used\n"
"more than once, ordered by (key, len(value), value) descending) and set xsz, xfilter,\n"
"shared_ids and inline_xattrs on each inode. key_info(key) -> (index, suffix, bloom bit).\n"
"over is None, or (position in order, budget) of the first inode over budget_max.");

static PyObject *py_prepare_xattrs(PyObject *self, PyObject *args)
{
    PyObject *order, *key_info, *acl_keys;
    long budget_max, max_shared;
    if (!PyArg_ParseTuple(args, "O!OO!ll:prepare_xattrs", &PyList_Type, &order, &key_info, &PyTuple_Type, &acl_keys,
                          &budget_max, &max_shared))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(order);
    /* Memory as the Python version: each inode's dict is replaced by its sorted item list, and
     * the use counts are small ints (cached objects); only shared pairs get an offset. */
    PyObject *result = NULL, *cache = PyDict_New(), *counts = PyDict_New(), *offsets = PyDict_New();
    PyObject *with = PyList_New(0), *zero = PyLong_FromLong(0), *no_ids = PyTuple_New(0), *shared = NULL;
    struct growbuf table = {0}, body = {0};
    int has_acl = 0;
    if (!cache || !counts || !offsets || !with || !zero || !no_ids)
        goto done;

    /* Pass 1: sorted items, budget, use count of every (key, value) pair. */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *ino = PyList_GET_ITEM(order, i);
        PyObject *x = PyObject_GetAttr(ino, attrs[A_XATTRS]);
        if (!x)
            goto done;
        if (!PyDict_Check(x) || PyDict_GET_SIZE(x) == 0) {
            int empty = PyDict_Check(x) || !PyObject_IsTrue(x);
            Py_DECREF(x);
            if (!empty) {
                PyErr_SetString(PyExc_TypeError, "inode xattrs must be a dict");
                goto done;
            }
            if (PyObject_SetAttr(ino, attrs[A_XSZ], zero) < 0)
                goto done;
            continue;
        }
        for (Py_ssize_t a = 0; a < PyTuple_GET_SIZE(acl_keys); a++) {
            int has = PyDict_Contains(x, PyTuple_GET_ITEM(acl_keys, a));
            if (has < 0) {
                Py_DECREF(x);
                goto done;
            }
            has_acl |= has;
        }
        PyObject *items = PyDict_Items(x);
        Py_DECREF(x);
        if (!items || PyList_Sort(items) < 0) {
            Py_XDECREF(items);
            goto done;
        }
        Py_ssize_t n = PyList_GET_SIZE(items);
        long long budget = 12 + 7 * (long long)n;
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *pair = PyList_GET_ITEM(items, k);
            PyObject *key = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
            if (!PyBytes_Check(key) || !PyBytes_Check(value)) {
                Py_DECREF(items);
                PyErr_SetString(PyExc_TypeError, "xattr keys and values must be bytes");
                goto done;
            }
            budget += PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(value);
        }
        if (budget > budget_max) {
            Py_DECREF(items);
            result = Py_BuildValue("(yO(nL))", "", Py_False, i, budget);
            goto done;
        }
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *pair = PyList_GET_ITEM(items, k);
            PyObject *c = PyDict_GetItemWithError(counts, pair);
            if (!c && PyErr_Occurred())
                goto fail_items;
            PyObject *next = PyLong_FromSsize_t(c ? PyLong_AsSsize_t(c) + 1 : 1);
            int rc = next ? PyDict_SetItem(counts, pair, next) : -1;
            Py_XDECREF(next);
            if (rc < 0)
                goto fail_items;
        }
        if (PyObject_SetAttr(ino, attrs[A_XATTRS], items) < 0 || PyList_Append(with, ino) < 0)
            goto fail_items;
        Py_DECREF(items);
        continue;
    fail_items:
        Py_DECREF(items);
        goto done;
    }

    /* The shared table: pairs used more than once, by (key, len(value), value) descending. */
    if (!(shared = PyList_New(0)))
        goto done;
    {
        Py_ssize_t pos = 0;
        PyObject *pair, *c;
        while (PyDict_Next(counts, &pos, &pair, &c)) {
            if (PyLong_AsSsize_t(c) > 1) {
                PyObject *value = PyTuple_GET_ITEM(pair, 1);
                PyObject *sort_key = Py_BuildValue("(OnOO)", PyTuple_GET_ITEM(pair, 0), PyBytes_GET_SIZE(value), value,
                                                   pair);
                int rc = sort_key ? PyList_Append(shared, sort_key) : -1;
                Py_XDECREF(sort_key);
                if (rc < 0)
                    goto done;
            }
        }
    }
    Py_CLEAR(counts);
    if (PyList_Sort(shared) < 0 || PyList_Reverse(shared) < 0)
        goto done;
    for (Py_ssize_t s_ = 0; s_ < PyList_GET_SIZE(shared); s_++) {
        PyObject *sk = PyList_GET_ITEM(shared, s_);
        struct keyinfo ki;
        if (key_lookup(cache, key_info, PyTuple_GET_ITEM(sk, 0), &ki) < 0)
            goto done;
        PyObject *off = PyLong_FromSize_t(table.len);
        int rc = off ? PyDict_SetItem(offsets, PyTuple_GET_ITEM(sk, 3), off) : -1;
        Py_XDECREF(off);
        if (rc < 0 || put_entry(&table, &ki, PyTuple_GET_ITEM(sk, 2)) < 0)
            goto done;
    }
    Py_CLEAR(shared);

    /* Pass 2: each inode's shared ids and inline entries. */
    int any_shared = PyDict_GET_SIZE(offsets) > 0;
    for (Py_ssize_t w = 0; w < PyList_GET_SIZE(with); w++) {
        PyObject *ino = PyList_GET_ITEM(with, w);
        PyObject *items = PyObject_GetAttr(ino, attrs[A_XATTRS]);
        if (!items)
            goto done;
        Py_ssize_t n = PyList_GET_SIZE(items);
        PyObject *ids = NULL;
        body.len = 0;
        uint32_t bits = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *pair = PyList_GET_ITEM(items, k);
            struct keyinfo ki;
            if (key_lookup(cache, key_info, PyTuple_GET_ITEM(pair, 0), &ki) < 0)
                goto fail_pass2;
            bits |= ki.bit;
            PyObject *off = any_shared ? PyDict_GetItemWithError(offsets, pair) : NULL;
            if (!off && PyErr_Occurred())
                goto fail_pass2;
            if (off && (!ids || PyList_GET_SIZE(ids) < max_shared)) {
                if (!ids && !(ids = PyList_New(0)))
                    goto fail_pass2;
                if (PyList_Append(ids, off) < 0)
                    goto fail_pass2;
            } else if (put_entry(&body, &ki, PyTuple_GET_ITEM(pair, 1)) < 0) {
                goto fail_pass2;
            }
        }
        Py_DECREF(items);
        Py_ssize_t n_ids = ids ? PyList_GET_SIZE(ids) : 0;
        if (set_steal(ino, A_SHARED_IDS, ids ? ids : Py_NewRef(no_ids)) < 0 ||
            set_steal(ino, A_INLINE_XATTRS, PyBytes_FromStringAndSize((const char *)body.p, (Py_ssize_t)body.len)) < 0 ||
            set_steal(ino, A_XSZ, PyLong_FromSize_t(XATTR_HEADER_SIZE + 4 * (size_t)n_ids + body.len)) < 0 ||
            set_steal(ino, A_XFILTER, PyLong_FromUnsignedLong(~bits & 0xFFFFFFFFu)) < 0)
            goto done;
        continue;
    fail_pass2:
        Py_DECREF(items);
        Py_XDECREF(ids);
        goto done;
    }
    result = Py_BuildValue("(y#OO)", table.p ? (const char *)table.p : "", (Py_ssize_t)table.len,
                           has_acl ? Py_True : Py_False, Py_None);
done:
    Py_XDECREF(cache);
    Py_XDECREF(counts);
    Py_XDECREF(offsets);
    Py_XDECREF(shared);
    Py_XDECREF(with);
    Py_XDECREF(zero);
    Py_XDECREF(no_ids);
    PyMem_Free(table.p);
    PyMem_Free(body.p);
    return result;
}

/* -- placement and packing ------------------------------------------------------------------- */

PyDoc_STRVAR(pack_doc,
"pack(order, area_start, table, min_mtime_sec, min_mtime_nsec) -> (bytearray, inodes_end, blocks, root_nid)\n\n"
"Place every _Inode of `order` (breadth-first, xattr bodies prepared), put the shared xattr\n"
"table after the inode area and the data blocks after that, and return the image buffer with\n"
"everything but the composefs header and the superblock written.");

static PyObject *py_pack(PyObject *self, PyObject *args)
{
    PyObject *order;
    unsigned long long area_start, min_sec, min_nsec;
    Py_buffer table;
    if (!PyArg_ParseTuple(args, "O!Ky*KK:pack", &PyList_Type, &order, &area_start, &table, &min_sec, &min_nsec))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(order);
    PyObject *result = NULL, *out = NULL;
    struct ino *inos = PyMem_Calloc(count ? (size_t)count : 1, sizeof *inos);
    if (!inos) {
        PyBuffer_Release(&table);
        return PyErr_NoMemory();
    }
    uint64_t inodes_end;
    if (layout(order, inos, area_start, min_sec, min_nsec, &inodes_end) < 0)
        goto done;
    uint64_t next = (inodes_end + (uint64_t)table.len + BLOCK - 1) / BLOCK;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (inos[i].n_blocks) {
            inos[i].blkaddr = next;
            next += inos[i].n_blocks;
        }
    }
    if (next > UINT32_MAX) {
        too_big("block count", next);
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(next * BLOCK));
    if (!out)
        goto done;
    unsigned char *buf = (unsigned char *)PyByteArray_AS_STRING(out);
    memset(buf, 0, next * BLOCK);
    memcpy(buf + inodes_end, table.buf, (size_t)table.len);
    if (pack(order, inos, buf, next * BLOCK, inodes_end % BLOCK) < 0)
        goto done;
    result = Py_BuildValue("(OKKK)", out, (unsigned long long)inodes_end, (unsigned long long)next,
                           (unsigned long long)(count ? inos[0].nid : 0));
done:
    Py_XDECREF(out);
    PyMem_Free(inos);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"prepare_xattrs", py_prepare_xattrs, METH_VARARGS, prepare_xattrs_doc},
    {"pack", py_pack, METH_VARARGS, pack_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "bootimg.composefs._imagepack",
    "Inode placement and packing of a composefs image (the writer's last steps in C).",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__imagepack(void)
{
    for (int i = 0; i < N_ATTRS; i++)
        if (!attrs[i] && !(attrs[i] = PyUnicode_InternFromString(attr_names[i])))
            return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m && (PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0 || PyModule_AddIntConstant(m, "COMPACT_SIZE", COMPACT_SIZE) < 0 ||
              PyModule_AddIntConstant(m, "EXTENDED_SIZE", EXTENDED_SIZE) < 0 ||
              PyModule_AddIntConstant(m, "LAYOUT_CHUNK_BASED", LAYOUT_CHUNK_BASED) < 0 ||
              PyModule_AddIntConstant(m, "LAYOUT_FLAT_INLINE", LAYOUT_FLAT_INLINE) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
