/*
 * fs-verity v1 digests (SHA-256, 4096-byte blocks, no salt) in C, with the GIL released.
 *
 * Optional accelerator for bootimg/composefs/fsverity.py, which keeps the pure-Python
 * implementation as fallback and reference. The digest is the one the kernel and
 * `fsverity digest` compute (composefs-format.md section 5.1): a Merkle tree of SHA-256 over
 * 4 KiB blocks (the last block of each level zero-padded), then SHA-256 of the 256-byte
 * struct fsverity_descriptor. An empty file has a root hash of 32 zero bytes.
 *
 * Level 0 is hashed as the data streams in; its hashes go to a growable buffer, and the upper
 * levels are reduced in place in that buffer (block i of a level is hashed before its hash is
 * written at offset 32*i, which is never past the start of block i).
 *
 * Block hashing: on x86-64 CPUs with the SHA extensions (SHA-NI), two 4 KiB blocks are hashed at
 * once with interleaved sha256rnds2 instructions, which hides their latency: 2.6 GB/s per core
 * against 1.65 GB/s for OpenSSL's one-stream SHA-NI code (AMD Zen 4). It is chosen at import
 * from CPUID and only if it passes a self-check against OpenSSL; otherwise, on other CPUs or
 * architectures, or when built with -DBOOTIMG_NO_SHANI, OpenSSL EVP does all the hashing (one
 * EVP_MD_CTX per call or batch, re-initialised per block, EVP_MD fetched once at import).
 * The 256-byte descriptor is always hashed with OpenSSL.
 *
 *   digest_fd(fd, size=-1) -> bytes
 *   digest_paths(paths, sizes=None) -> list[bytes]
 *   digest_bytes(data) -> bytes
 *   backend() -> "sha-ni-2x" or "openssl";  _set_backend(name) -> previous (for tests)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define BLOCK 4096u
#define HLEN 32u
/* Read size: big enough to amortise syscalls, small enough that the data read is still in
 * cache when hashed. 1 GiB cached file, 2-vCPU AMD EPYC (Zen 4), GB/s: OpenSSL backend 64 KiB
 * 1.38, 256 KiB 1.37-1.42, 1 MiB 1.45-1.47, 2 MiB 1.46; sha-ni-2x 128 KiB 2.29-2.33, 256 KiB
 * 2.19-2.27, 1 MiB 2.44-2.55, 2 MiB 2.36-2.41. */
#define CHUNK ((size_t)1 << 20)
/* digest_bytes keeps the GIL below this size: re-taking a contended GIL can cost a switch
 * interval (5 ms), much more than hashing a few blocks. */
#define GIL_MINSIZE ((Py_ssize_t)64 << 10)

/* Outcome codes besides 0 (success) and positive errno values. */
#define ERR_CRYPTO (-1) /* an OpenSSL call failed */
#define ERR_SHORT (-2)  /* file shorter than the expected size (reported as EIO) */

static EVP_MD *g_sha256; /* fetched once; read-only afterwards, shared by all threads */

typedef struct {
    EVP_MD_CTX *ctx;
    unsigned char *buf; /* read buffer */
    size_t bufcap;
    unsigned char *l0; /* level-0 hashes, then the upper levels in place */
    size_t l0cap;
} worker;

static int worker_init(worker *w)
{
    memset(w, 0, sizeof *w);
    w->ctx = EVP_MD_CTX_new();
    return w->ctx != NULL ? 0 : ENOMEM;
}

static void worker_free(worker *w)
{
    EVP_MD_CTX_free(w->ctx);
    free(w->buf);
    free(w->l0);
    memset(w, 0, sizeof *w);
}

static int reserve(unsigned char **p, size_t *cap, size_t need, int exact)
{
    if (need <= *cap)
        return 0;
    size_t n = need;
    if (!exact) {
        n = *cap ? *cap : 4096;
        while (n < need) {
            if (n > SIZE_MAX / 2)
                return ENOMEM;
            n *= 2;
        }
    }
    unsigned char *q = realloc(*p, n);
    if (q == NULL)
        return ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(BOOTIMG_NO_SHANI)
#define HAVE_SHANI 1
#include <cpuid.h>
#include <immintrin.h>

/* SHA-256 of 4096-byte blocks with the x86 SHA extensions, two blocks interleaved. The message
 * schedule and round structure follow Intel's SHA-NI reference; state is kept as ABEF/CDGH. */
#define SHANI __attribute__((target("sha,sse4.1,ssse3")))

static const uint32_t sha256_k[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};
/* Initial state H0 in ABEF / CDGH order. */
static const uint32_t sha256_abef[4] __attribute__((aligned(16))) = {0x9b05688c, 0x510e527f, 0xbb67ae85, 0x6a09e667};
static const uint32_t sha256_cdgh[4] __attribute__((aligned(16))) = {0x5be0cd19, 0x1f83d9ab, 0xa54ff53a, 0x3c6ef372};
/* The padding block that follows 4096 bytes of message: 0x80, zeros, be64 bit length 32768. */
static const unsigned char pad_4k[64] = {[0] = 0x80, [62] = 0x80};

/* Message words W[4g..4g+3] for group g into slot g%4: loaded for g < 4, else scheduled. */
#define SCHED(W, g)                                                                               \
    W[(g) % 4] = _mm_sha256msg2_epu32(                                                            \
        _mm_add_epi32(_mm_sha256msg1_epu32(W[(g) % 4], W[((g) + 1) % 4]),                         \
                      _mm_alignr_epi8(W[((g) + 3) % 4], W[((g) + 2) % 4], 4)),                    \
        W[((g) + 3) % 4])
#define ROUNDS(S0, S1, W, g)                                                                      \
    do {                                                                                          \
        __m128i m_ = _mm_add_epi32(W[(g) % 4], _mm_load_si128((const __m128i *)&sha256_k[4 * (g)])); \
        S1 = _mm_sha256rnds2_epu32(S1, S0, m_);                                                   \
        S0 = _mm_sha256rnds2_epu32(S0, S1, _mm_shuffle_epi32(m_, 0x0E));                          \
    } while (0)
#define GROUP(g)                                                                                  \
    do {                                                                                          \
        if ((g) < 4) {                                                                            \
            WA[(g) % 4] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(pa + 16 * (g))), bswap); \
            WB[(g) % 4] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(pb + 16 * (g))), bswap); \
        } else {                                                                                  \
            SCHED(WA, g);                                                                         \
            SCHED(WB, g);                                                                         \
        }                                                                                         \
        ROUNDS(A0, A1, WA, g);                                                                    \
        ROUNDS(B0, B1, WB, g);                                                                    \
    } while (0)

/* Compress one 64-byte block into each of two states (A: pa, B: pb). */
SHANI static inline void shani_compress2(__m128i *st, const unsigned char *pa, const unsigned char *pb)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A0 = st[0], A1 = st[1], B0 = st[2], B1 = st[3];
    __m128i WA[4], WB[4];
    GROUP(0); GROUP(1); GROUP(2); GROUP(3); GROUP(4); GROUP(5); GROUP(6); GROUP(7);
    GROUP(8); GROUP(9); GROUP(10); GROUP(11); GROUP(12); GROUP(13); GROUP(14); GROUP(15);
    st[0] = _mm_add_epi32(st[0], A0);
    st[1] = _mm_add_epi32(st[1], A1);
    st[2] = _mm_add_epi32(st[2], B0);
    st[3] = _mm_add_epi32(st[3], B1);
}

SHANI static inline void shani_store(__m128i abef, __m128i cdgh, unsigned char *out)
{
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
    __m128i dcba = _mm_blend_epi16(feba, dchg, 0xF0);
    __m128i hgfe = _mm_alignr_epi8(dchg, feba, 8);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(dcba, bswap));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(hgfe, bswap));
}

/* SHA-256 of the 4096-byte blocks a and b (b may equal a) into oa and ob. The outputs are
 * written after both inputs have been read, so they may overlap them (in-place reduction). */
SHANI static void shani_4k_x2(const unsigned char *a, const unsigned char *b, unsigned char *oa,
                              unsigned char *ob)
{
    __m128i st[4];
    st[0] = st[2] = _mm_load_si128((const __m128i *)sha256_abef);
    st[1] = st[3] = _mm_load_si128((const __m128i *)sha256_cdgh);
    for (size_t off = 0; off < BLOCK; off += 64)
        shani_compress2(st, a + off, b + off);
    shani_compress2(st, pad_4k, pad_4k);
    shani_store(st[0], st[1], oa);
    shani_store(st[2], st[3], ob);
}

static int cpu_has_shani(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 9)) || !(c & (1u << 19))) /* SSSE3, SSE4.1 */
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 29) & 1; /* SHA */
}

static int g_shani_ok; /* CPU has SHA-NI and shani_4k_x2 agrees with OpenSSL */
static int g_shani;    /* use shani_4k_x2 for full blocks */

/* At import: SHA-NI only if the CPU has it and it gives OpenSSL's results on a few blocks. */
static void shani_select(void)
{
    g_shani_ok = g_shani = 0;
    if (!cpu_has_shani())
        return;
    unsigned char *data = malloc(2 * BLOCK);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = data != NULL && ctx != NULL;
    if (ok) {
        uint32_t x = 0x12345678u;
        for (size_t i = 0; i < 2 * BLOCK; i++) {
            x = x * 1103515245u + 12345u;
            data[i] = (unsigned char)(x >> 24);
        }
        unsigned char got[3][HLEN], want[2][HLEN];
        shani_4k_x2(data, data + BLOCK, got[0], got[1]);
        shani_4k_x2(data + BLOCK, data + BLOCK, got[2], got[2]);
        for (int i = 0; i < 2 && ok; i++)
            ok = EVP_DigestInit_ex(ctx, g_sha256, NULL) &&
                 EVP_DigestUpdate(ctx, data + i * BLOCK, BLOCK) &&
                 EVP_DigestFinal_ex(ctx, want[i], NULL);
        ok = ok && memcmp(got[0], want[0], HLEN) == 0 && memcmp(got[1], want[1], HLEN) == 0 &&
             memcmp(got[2], want[1], HLEN) == 0;
    }
    EVP_MD_CTX_free(ctx);
    free(data);
    g_shani_ok = g_shani = ok;
}
#endif /* HAVE_SHANI */

/* SHA-256 of each of the n full blocks at data into out[32 * i]. out may point into data at or
 * before it (in-place reduction): each hash is written after its block has been read. */
static int hash_full_blocks(EVP_MD_CTX *ctx, const unsigned char *data, size_t n, unsigned char *out)
{
    size_t i = 0;
#ifdef HAVE_SHANI
    if (g_shani) {
        for (; i + 2 <= n; i += 2)
            shani_4k_x2(data + i * BLOCK, data + (i + 1) * BLOCK, out + i * HLEN, out + (i + 1) * HLEN);
        if (i < n) {
            unsigned char dummy[HLEN];
            shani_4k_x2(data + i * BLOCK, data + i * BLOCK, out + i * HLEN, dummy);
        }
        return 0;
    }
#endif
    for (; i < n; i++) {
        if (!EVP_DigestInit_ex(ctx, g_sha256, NULL) || !EVP_DigestUpdate(ctx, data + i * BLOCK, BLOCK) ||
            !EVP_DigestFinal_ex(ctx, out + i * HLEN, NULL))
            return ERR_CRYPTO;
    }
    return 0;
}

/* SHA-256 of p[0:n] zero-padded to one block (0 < n < BLOCK) into out (may overlap p). */
static int hash_padded(EVP_MD_CTX *ctx, const unsigned char *p, size_t n, unsigned char *out)
{
    unsigned char blk[BLOCK];
    memcpy(blk, p, n);
    memset(blk + n, 0, BLOCK - n);
    return hash_full_blocks(ctx, blk, 1, out);
}

/* Level-0 hashes of data[0:n] appended at w->l0 + 32 * *nblk (capacity already reserved). */
static int hash_data(worker *w, const unsigned char *data, size_t n, size_t *nblk)
{
    unsigned char *out = w->l0 + (size_t)HLEN * *nblk;
    size_t full = n / BLOCK;
    int rc = hash_full_blocks(w->ctx, data, full, out);
    if (rc == 0 && n % BLOCK)
        rc = hash_padded(w->ctx, data + full * BLOCK, n % BLOCK, out + full * HLEN);
    if (rc == 0)
        *nblk += full + (n % BLOCK != 0);
    return rc;
}

/* Fold the nblk level-0 hashes in w->l0 to the root and hash the descriptor into out. */
static int finish(worker *w, size_t nblk, uint64_t size, unsigned char *out)
{
    unsigned char desc[256];
    int rc;

    memset(desc, 0, sizeof desc);
    desc[0] = 1;  /* version */
    desc[1] = 1;  /* FS_VERITY_HASH_ALG_SHA256 */
    desc[2] = 12; /* log2(block size) */
    desc[3] = 0;  /* salt size; bytes 4..7: sig_size (reserved) = 0 */
    for (int i = 0; i < 8; i++)
        desc[8 + i] = (unsigned char)(size >> (8 * i)); /* le64 data_size */
    if (size != 0) {                                    /* else the root hash stays all zeros */
        size_t len = nblk * HLEN;
        while (len > HLEN) { /* one level up, in place */
            size_t full = len / BLOCK;
            if ((rc = hash_full_blocks(w->ctx, w->l0, full, w->l0)) != 0)
                return rc;
            if (len % BLOCK &&
                (rc = hash_padded(w->ctx, w->l0 + full * BLOCK, len % BLOCK, w->l0 + full * HLEN)) != 0)
                return rc;
            len = (full + (len % BLOCK != 0)) * HLEN;
        }
        memcpy(desc + 16, w->l0, HLEN); /* root_hash[64]; then salt[32], reserved[144] */
    }
    if (!EVP_DigestInit_ex(w->ctx, g_sha256, NULL) || !EVP_DigestUpdate(w->ctx, desc, sizeof desc) ||
        !EVP_DigestFinal_ex(w->ctx, out, NULL))
        return ERR_CRYPTO;
    return 0;
}

/*
 * Digest of the file at fd, read from offset 0 with pread (read() if it is a pipe), up to EOF
 * (size < 0) or exactly size bytes. Returns 0, an errno value, ERR_CRYPTO, or ERR_SHORT with
 * *got set to the bytes available. Must not touch Python objects: runs without the GIL.
 */
static int digest_fd_impl(worker *w, int fd, int64_t size, unsigned char *out, uint64_t *got)
{
    int seekable = 1, rc;
    uint64_t total = 0;
    size_t nblk = 0;
    size_t bufwant;

    if (size >= 0) {
        uint64_t blocks = ((uint64_t)size + BLOCK - 1) / BLOCK;
        if (blocks > SIZE_MAX / HLEN)
            return ENOMEM;
        if ((rc = reserve(&w->l0, &w->l0cap, blocks ? (size_t)blocks * HLEN : HLEN, 1)) != 0)
            return rc;
        bufwant = (uint64_t)size < CHUNK ? (size_t)size : CHUNK;
    } else {
        /* Size the buffer for one read that also sees EOF, when the file is small. */
        struct stat st;
        bufwant = CHUNK;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size < CHUNK)
            bufwant = ((size_t)st.st_size + BLOCK) / BLOCK * BLOCK; /* > st_size, whole blocks */
    }
    if (size < 0 || (uint64_t)size > CHUNK)
        (void)posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    if (bufwant && (rc = reserve(&w->buf, &w->bufcap, bufwant, 0)) != 0)
        return rc;

    /* bufcap is a power of two >= BLOCK, so every read but a sized file's last is whole blocks
     * and a partial block is only ever hashed at the end of the data. */
    while (size < 0 || total < (uint64_t)size) {
        size_t want = w->bufcap < CHUNK ? w->bufcap : CHUNK;
        if (size >= 0 && (uint64_t)size - total < want)
            want = (size_t)((uint64_t)size - total);
        size_t n = 0;
        while (n < want) {
            ssize_t r = seekable ? pread(fd, w->buf + n, want - n, (off_t)(total + n))
                                 : read(fd, w->buf + n, want - n);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == ESPIPE && seekable) { /* pipe or socket: nothing consumed */
                    seekable = 0;
                    continue;
                }
                return errno;
            }
            if (r == 0)
                break;
            n += (size_t)r;
        }
        if ((rc = reserve(&w->l0, &w->l0cap, (nblk + (n + BLOCK - 1) / BLOCK) * HLEN, 0)) != 0)
            return rc;
        if ((rc = hash_data(w, w->buf, n, &nblk)) != 0)
            return rc;
        total += n;
        if (n < want || n % BLOCK)
            break;
    }
    if (size >= 0 && total != (uint64_t)size) {
        *got = total;
        return ERR_SHORT;
    }
    return finish(w, nblk, total, out);
}

/* Python exceptions (GIL held). */

static PyObject *raise_outcome(int rc, uint64_t got, int64_t size, PyObject *filename)
{
    if (rc == ERR_CRYPTO)
        return PyErr_Format(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
    if (rc == ENOMEM)
        return PyErr_NoMemory();
    PyObject *msg = rc == ERR_SHORT
                        ? PyUnicode_FromFormat("file ended after %llu of %lld bytes",
                                               (unsigned long long)got, (long long)size)
                        : PyUnicode_DecodeLocale(strerror(rc), "surrogateescape");
    if (msg == NULL)
        return NULL;
    int err = rc == ERR_SHORT ? EIO : rc;
    /* OSError(errno, strerror[, filename]) picks the subclass (FileNotFoundError, ...). */
    PyObject *exc = filename != NULL
                        ? PyObject_CallFunction(PyExc_OSError, "iOO", err, msg, filename)
                        : PyObject_CallFunction(PyExc_OSError, "iO", err, msg);
    Py_DECREF(msg);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

PyDoc_STRVAR(digest_fd_doc,
"digest_fd(fd, size=-1, /) -> bytes\n\n"
"fs-verity digest of the file open at fd, read with pread from offset 0 (the file position is\n"
"untouched; a pipe is read from where it is), up to EOF (size -1) or exactly size bytes\n"
"(OSError EIO if the file is shorter). The GIL is released throughout.");

static PyObject *py_digest_fd(PyObject *self, PyObject *args)
{
    int fd;
    long long size = -1;
    if (!PyArg_ParseTuple(args, "i|L:digest_fd", &fd, &size))
        return NULL;
    if (size < -1)
        return PyErr_Format(PyExc_ValueError, "size must be >= 0, or -1 for EOF");
    worker w;
    unsigned char out[HLEN];
    uint64_t got = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = worker_init(&w);
    if (rc == 0)
        rc = digest_fd_impl(&w, fd, (int64_t)size, out, &got);
    worker_free(&w);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return raise_outcome(rc, got, size, NULL);
    return PyBytes_FromStringAndSize((const char *)out, HLEN);
}

PyDoc_STRVAR(digest_paths_doc,
"digest_paths(paths, sizes=None, /) -> list[bytes]\n\n"
"fs-verity digests of files (str, bytes or path-like; symlinks refused with O_NOFOLLOW), in\n"
"order. sizes[i] (or None/-1) is the size each file must have, as in digest_fd. The GIL is\n"
"released for the whole batch. Raises OSError naming the first file that failed.");

static PyObject *py_digest_paths(PyObject *self, PyObject *args)
{
    PyObject *paths_arg, *sizes_arg = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:digest_paths", &paths_arg, &sizes_arg))
        return NULL;

    PyObject *paths = PySequence_Fast(paths_arg, "paths must be a sequence");
    if (paths == NULL)
        return NULL;
    PyObject *sizes = NULL, *encoded = NULL, *result = NULL;
    const char **cpaths = NULL;
    int64_t *csizes = NULL;
    unsigned char *digests = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(paths), failed = -1;
    int rc = 0;
    uint64_t got = 0;

    if (sizes_arg != Py_None) {
        sizes = PySequence_Fast(sizes_arg, "sizes must be a sequence or None");
        if (sizes == NULL)
            goto done;
        if (PySequence_Fast_GET_SIZE(sizes) != n) {
            PyErr_SetString(PyExc_ValueError, "paths and sizes differ in length");
            goto done;
        }
    }
    encoded = PyList_New(n);
    cpaths = PyMem_Calloc(n ? (size_t)n : 1, sizeof *cpaths);
    csizes = PyMem_Calloc(n ? (size_t)n : 1, sizeof *csizes);
    digests = PyMem_Malloc(n ? (size_t)n * HLEN : 1);
    if (encoded == NULL || cpaths == NULL || csizes == NULL || digests == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = NULL;
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(paths, i), &b))
            goto done;
        PyList_SET_ITEM(encoded, i, b); /* steals the reference; keeps the char * alive */
        cpaths[i] = PyBytes_AS_STRING(b);
        csizes[i] = -1;
        if (sizes != NULL) {
            PyObject *s = PySequence_Fast_GET_ITEM(sizes, i);
            if (s != Py_None) {
                long long v = PyLong_AsLongLong(s);
                if (v == -1 && PyErr_Occurred())
                    goto done;
                if (v < -1) {
                    PyErr_SetString(PyExc_ValueError, "sizes must be >= 0, -1 or None");
                    goto done;
                }
                csizes[i] = v;
            }
        }
    }

    Py_BEGIN_ALLOW_THREADS
    worker w;
    rc = worker_init(&w);
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
        int fd;
        do
            fd = open(cpaths[i], O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        while (fd < 0 && errno == EINTR);
        if (fd < 0) {
            rc = errno;
        } else {
            rc = digest_fd_impl(&w, fd, csizes[i], digests + (size_t)i * HLEN, &got);
            close(fd); /* read-only: a close error cannot lose data */
        }
        if (rc != 0)
            failed = i;
    }
    worker_free(&w);
    Py_END_ALLOW_THREADS

    if (rc != 0) {
        raise_outcome(rc, got, failed >= 0 ? csizes[failed] : -1,
                      failed >= 0 ? PySequence_Fast_GET_ITEM(paths, failed) : NULL);
        goto done;
    }
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyBytes_FromStringAndSize((const char *)digests + (size_t)i * HLEN, HLEN);
        if (d == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, d);
    }
done:
    PyMem_Free(digests);
    PyMem_Free(csizes);
    PyMem_Free(cpaths);
    Py_XDECREF(encoded);
    Py_XDECREF(sizes);
    Py_DECREF(paths);
    return result;
}

PyDoc_STRVAR(digest_bytes_doc,
"digest_bytes(data, /) -> bytes\n\n"
"fs-verity digest of a bytes-like object (C-contiguous buffer). The GIL is released for\n"
"inputs of 64 KiB and more.");

static PyObject *py_digest_bytes(PyObject *self, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*:digest_bytes", &view))
        return NULL;
    worker w;
    unsigned char out[HLEN];
    size_t len = (size_t)view.len, nblk = 0;
    int rc;
    int release = view.len >= GIL_MINSIZE;
    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    rc = worker_init(&w);
    if (rc == 0)
        rc = reserve(&w.l0, &w.l0cap, len ? (len + BLOCK - 1) / BLOCK * HLEN : HLEN, 1);
    if (rc == 0)
        rc = hash_data(&w, view.buf, len, &nblk);
    if (rc == 0)
        rc = finish(&w, nblk, len, out);
    worker_free(&w);
    if (release)
        PyEval_RestoreThread(ts);
    PyBuffer_Release(&view);
    if (rc != 0)
        return raise_outcome(rc, 0, -1, NULL);
    return PyBytes_FromStringAndSize((const char *)out, HLEN);
}

static const char *backend_name(void)
{
#ifdef HAVE_SHANI
    if (g_shani)
        return "sha-ni-2x";
#endif
    return "openssl";
}

PyDoc_STRVAR(backend_doc,
"backend() -> str\n\n"
"How full blocks are hashed: 'sha-ni-2x' (x86 SHA extensions, two blocks interleaved) or\n"
"'openssl' (EVP).");

static PyObject *py_backend(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(backend_name());
}

PyDoc_STRVAR(set_backend_doc,
"_set_backend(name, /) -> str\n\n"
"For tests: select 'openssl' or 'sha-ni-2x' (ValueError if this CPU or build lacks it) and\n"
"return the previous backend. Not for use while digests run in other threads.");

static PyObject *py_set_backend(PyObject *self, PyObject *arg)
{
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (name == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "backend name must be str");
        return NULL;
    }
    PyObject *prev = PyUnicode_FromString(backend_name());
    if (prev == NULL)
        return NULL;
    if (strcmp(name, "openssl") == 0) {
#ifdef HAVE_SHANI
        g_shani = 0;
#endif
        return prev;
    }
#ifdef HAVE_SHANI
    if (strcmp(name, "sha-ni-2x") == 0 && g_shani_ok) {
        g_shani = 1;
        return prev;
    }
#endif
    Py_DECREF(prev);
    return PyErr_Format(PyExc_ValueError, "backend %R not available here", arg);
}

static PyMethodDef methods[] = {
    {"backend", py_backend, METH_NOARGS, backend_doc},
    {"_set_backend", py_set_backend, METH_O, set_backend_doc},
    {"digest_fd", py_digest_fd, METH_VARARGS, digest_fd_doc},
    {"digest_paths", py_digest_paths, METH_VARARGS, digest_paths_doc},
    {"digest_bytes", py_digest_bytes, METH_VARARGS, digest_bytes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "bootimg.composefs._fsverity_accel",
    "fs-verity v1 digests (SHA-256, 4 KiB blocks, no salt) with OpenSSL, GIL released.",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__fsverity_accel(void)
{
    if (g_sha256 == NULL) {
        g_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (g_sha256 == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA256 (EVP_MD_fetch failed)");
            return NULL;
        }
    }
#ifdef HAVE_SHANI
    shani_select();
#endif
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "CHUNK_SIZE", (long)CHUNK) < 0 ||
        PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
