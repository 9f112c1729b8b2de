/* The rollback minimum's TPM 2.0 NV counter, with raw TPM2 commands (TPM 2.0 Library, Part 3):
 * NV_ReadPublic (does the index exist, is it an 8-byte counter, has it been incremented), NV_Read
 * and NV_Increment with a password session (TPM_RS_PW, empty password) on the index itself, and
 * NV_DefineSpace under the owner hierarchy (empty owner password). No TSS: the commands go to
 * /dev/tpmrm0 (the kernel's resource manager), else /dev/tpm0. Every response is checked to the
 * byte (size, tag, the echoed index, the session area); anything else fails closed. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bsr.h"

#ifdef BOOTIMG_TEST_HOOKS
#include <sys/socket.h>
#include <sys/un.h>
#endif

#define TPM_ST_NO_SESSIONS 0x8001
#define TPM_ST_SESSIONS 0x8002
#define TPM_RH_OWNER 0x40000001u
#define TPM_RS_PW 0x40000009u
#define TPM_ALG_SHA256 0x000B
#define TPMA_NV_OWNERWRITE 0x00000002u
#define TPMA_NV_AUTHWRITE 0x00000004u
#define TPMA_NV_TPM_NT 0x000000F0u
#define TPM_NT_COUNTER 0x00000010u
#define TPMA_NV_OWNERREAD 0x00020000u
#define TPMA_NV_AUTHREAD 0x00040000u
#define TPMA_NV_NO_DA 0x02000000u
#define TPMA_NV_WRITTEN 0x20000000u
#define BOOTIMG_NV_ATTRIBUTES (TPM_NT_COUNTER | TPMA_NV_OWNERWRITE | TPMA_NV_AUTHWRITE | TPMA_NV_OWNERREAD \
                               | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA)
#define MAX_INCREMENTS 10000            /* per call: security versions are small numbers */

static const uint32_t codes[] = {0x00000169, 0x0000014E, 0x00000134, 0x0000012A};

static uint8_t *put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return p + 2;
}

static uint8_t *put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}

static uint32_t get(const uint8_t *p, int bytes)
{
    uint32_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | p[i];
    return v;
}

size_t tpm_command(int which, uint32_t index, uint8_t out[64])
{
    uint8_t *p = put32(put16(out, which == TPM_NV_READ_PUBLIC ? TPM_ST_NO_SESSIONS : TPM_ST_SESSIONS) + 4,
                       codes[which]);
    if (which == TPM_NV_READ_PUBLIC) {
        p = put32(p, index);
    } else {
        /* handles: the authorization (the owner, or the index itself), then the index */
        p = put32(p, which == TPM_NV_DEFINE_SPACE ? TPM_RH_OWNER : index);
        if (which != TPM_NV_DEFINE_SPACE)
            p = put32(p, index);
        /* one password session: size, TPM_RS_PW, empty nonce, continueSession, empty password */
        p = put32(p, 9);
        p = put32(p, TPM_RS_PW);
        p = put16(p, 0);
        *p++ = 1;
        p = put16(p, 0);
        if (which == TPM_NV_READ) {
            p = put16(p, 8);            /* size */
            p = put16(p, 0);            /* offset */
        } else if (which == TPM_NV_DEFINE_SPACE) {
            p = put16(p, 0);            /* the index's authValue: empty */
            p = put16(p, 14);           /* TPM2B_NV_PUBLIC */
            p = put32(p, index);
            p = put16(p, TPM_ALG_SHA256);
            p = put32(p, BOOTIMG_NV_ATTRIBUTES);
            p = put16(p, 0);            /* no authPolicy */
            p = put16(p, 8);            /* dataSize */
        }
    }
    size_t n = (size_t)(p - out);
    put32(out + 2, (uint32_t)n);
    return n;
}

/* A TPM2B of at most max bytes at *p (not past end): its size, or -1. */
static int tpm2b(const uint8_t **p, const uint8_t *end, size_t max)
{
    if (end - *p < 2)
        return -1;
    size_t n = get(*p, 2);
    if (n > max || (size_t)(end - *p - 2) < n)
        return -1;
    *p += 2 + n;
    return (int)n;
}

int tpm_response(int which, uint32_t index, const uint8_t *r, size_t n, uint32_t *rc, uint32_t *attributes,
                 uint16_t *size, uint64_t *value, char *err, size_t errsize)
{
    const char *bad = NULL;
    const uint8_t *p = r + 10, *end = r + n;
    *rc = 0;
    if (n < 10 || get(r + 2, 4) != n) {
        bad = "short, or its size field disagrees with its length";
        goto malformed;
    }
    uint32_t tag = get(r, 2);
    *rc = get(r + 6, 4);
    if (*rc != 0) {
        if (n != 10 || tag != TPM_ST_NO_SESSIONS) {
            bad = "an error response with a body";
            goto malformed;
        }
        return 1;
    }
    if (which == TPM_NV_READ_PUBLIC) {
        /* TPM2B_NV_PUBLIC {nvIndex, nameAlg, attributes, TPM2B authPolicy, dataSize}, TPM2B_NAME */
        const uint8_t *pub = p + 2;
        int policy;
        if (tag != TPM_ST_NO_SESSIONS || end - p < 2 + 14 || get(pub, 4) != index) {
            bad = "not the public area of the index asked for";
            goto malformed;
        }
        size_t pubsize = get(p, 2);
        p = pub + 10;
        if ((policy = tpm2b(&p, end, 64)) < 0 || end - p < 2 || pubsize != (size_t)(14 + policy)) {
            bad = "a malformed public area";
            goto malformed;
        }
        *attributes = get(pub + 6, 4);
        *size = (uint16_t)get(p, 2);
        p += 2;
        if (tpm2b(&p, end, 2 + 64) < 0 || p != end) {
            bad = "a malformed name";
            goto malformed;
        }
        return 0;
    }
    /* sessions: parameterSize, the parameters, one session response {nonce, attributes, hmac} */
    if (tag != TPM_ST_SESSIONS || end - p < 4) {
        bad = "no session area";
        goto malformed;
    }
    size_t params = get(p, 4);
    p += 4;
    if (params != (which == TPM_NV_READ ? 10u : 0u) || (size_t)(end - p) < params) {
        bad = "unexpected parameters";
        goto malformed;
    }
    if (which == TPM_NV_READ) {
        if (get(p, 2) != 8) {
            bad = "not 8 bytes of counter";
            goto malformed;
        }
        *value = (uint64_t)get(p + 2, 4) << 32 | get(p + 6, 4);
        p += 10;
    }
    if (tpm2b(&p, end, 64) < 0 || end - p < 1 || (++p, tpm2b(&p, end, 64)) < 0 || p != end) {
        bad = "a malformed session area";
        goto malformed;
    }
    return 0;
malformed:
    snprintf(err, errsize, "malformed TPM response (%s)", bad);
    return -1;
}

int tpm_open(struct tpm *t, char *err, size_t errsize)
{
    static const char *const devices[] = {"/dev/tpmrm0", "/dev/tpm0"};
    t->fd = -1;
#ifdef BOOTIMG_TEST_HOOKS
    /* Test builds: BOOTIMG_TEST_TPM=none (no TPM), unix:PATH (swtpm's socket) or a device path. */
    const char *test = test_param("BOOTIMG_TEST_TPM", NULL);
    if (test && strcmp(test, "none") == 0)
        return 0;
    if (test && strncmp(test, "unix:", 5) == 0) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        struct timeval tv = {10, 0};
        snprintf(t->path, sizeof t->path, "%s", test);
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", test + 5);
        t->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (t->fd < 0 || setsockopt(t->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0
            || connect(t->fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            snprintf(err, errsize, "cannot connect to %s: %s", test, strerror(errno));
            tpm_close(t);
            return -1;
        }
        return 1;
    }
    const char *only[1] = {test};
    const char *const *list = test ? only : (const char *const *)devices;
    int nlist = test ? 1 : 2;
#else
    const char *const *list = devices;
    int nlist = 2;
#endif
    for (int i = 0; i < nlist; i++) {
        struct stat st;
        if (stat(list[i], &st) < 0)
            continue;
        snprintf(t->path, sizeof t->path, "%s", list[i]);
        t->fd = open(list[i], O_RDWR | O_CLOEXEC | O_NOCTTY);
        if (t->fd < 0) {
            snprintf(err, errsize, "cannot open %s: %s", list[i], strerror(errno));
            return -1;
        }
        return 1;
    }
    return 0;
}

void tpm_close(struct tpm *t)
{
    if (t->fd >= 0)
        close(t->fd);
    t->fd = -1;
}

/* Send one command, read its whole response; TPM warnings (retry, yielded, testing, NV rate) are
 * retried for up to 5 s. Returns tpm_response()'s result. */
static int transact(struct tpm *t, int which, uint32_t index, uint32_t *rc, uint32_t *attributes, uint16_t *size,
                    uint64_t *value, char *err, size_t errsize)
{
    uint8_t cmd[64], resp[TPM_MAX_RESPONSE];
    size_t len = tpm_command(which, index, cmd);
    for (int attempt = 0;; attempt++) {
        size_t n = 0;
        ssize_t w;
        do
            w = write(t->fd, cmd, len);
        while (w < 0 && errno == EINTR);
        if (w != (ssize_t)len) {
            snprintf(err, errsize, "cannot write to %s: %s", t->path, w < 0 ? strerror(errno) : "short write");
            return -1;
        }
        /* one read gives a device's whole response; a socket may need several */
        while (n < 10 || n < get(resp + 2, 4)) {
            ssize_t r = read(t->fd, resp + n, sizeof resp - n);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                snprintf(err, errsize, "cannot read from %s: %s", t->path, strerror(errno));
                return -1;
            }
            if (r == 0 || (n += (size_t)r) == sizeof resp)
                break;
        }
        int res = tpm_response(which, index, resp, n, rc, attributes, size, value, err, errsize);
        uint32_t warn = *rc & 0xfff;
        if (res != 1 || attempt >= 50 || !(warn == 0x908 || warn == 0x90A || warn == 0x920 || warn == 0x922))
            return res;
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static int failed(uint32_t rc, const char *what, uint32_t index, char *err, size_t errsize)
{
    snprintf(err, errsize, "TPM2_%s of NV index 0x%08x failed: TPM_RC 0x%03x", what, index, rc);
    return -1;
}

/* 0 (*attributes), 1 (not defined), -1 (err). Only an 8-byte counter the index's own (empty)
 * password can read is a rollback counter. */
static int read_public(struct tpm *t, uint32_t index, uint32_t *attributes, char *err, size_t errsize)
{
    uint32_t rc;
    uint16_t size;
    uint64_t unused;
    int res = transact(t, TPM_NV_READ_PUBLIC, index, &rc, attributes, &size, &unused, err, errsize);
    if (res == 1 && (rc & 0x80) && (rc & 0x3f) == 0x0b)     /* TPM_RC_HANDLE: no such index */
        return 1;
    if (res == 1)
        return failed(rc, "NV_ReadPublic", index, err, errsize);
    if (res < 0)
        return -1;
    if ((*attributes & TPMA_NV_TPM_NT) != TPM_NT_COUNTER || size != 8 || !(*attributes & TPMA_NV_AUTHREAD)) {
        snprintf(err, errsize, "NV index 0x%08x is not an 8-byte counter readable with its password "
                 "(attributes 0x%08x, %u bytes)", index, *attributes, size);
        return -1;
    }
    return 0;
}

/* The counter of an index that must exist by now: 0 or -1. */
static int reread(struct tpm *t, uint32_t index, uint64_t *value, char *err, size_t errsize)
{
    int res = tpm_counter_read(t, index, value, err, errsize);
    if (res == 1)
        snprintf(err, errsize, "NV index 0x%08x disappeared", index);
    return res == 0 ? 0 : -1;
}

int tpm_counter_read(struct tpm *t, uint32_t index, uint64_t *value, char *err, size_t errsize)
{
    uint32_t attributes, rc;
    uint16_t size;
    *value = 0;
    int res = read_public(t, index, &attributes, err, errsize);
    if (res != 0 || !(attributes & TPMA_NV_WRITTEN))
        return res;                     /* never incremented: 0 */
    res = transact(t, TPM_NV_READ, index, &rc, &attributes, &size, value, err, errsize);
    return res == 1 ? failed(rc, "NV_Read", index, err, errsize) : res;
}

int tpm_counter_raise(struct tpm *t, uint32_t index, uint64_t target, uint64_t *before, uint64_t *after,
                      int *defined, char *err, size_t errsize)
{
    uint32_t rc, attributes;
    uint16_t size;
    uint64_t unused;
    *defined = 0;
    int res = tpm_counter_read(t, index, before, err, errsize);
    if (res < 0)
        return -1;
    if (res == 1) {
        res = transact(t, TPM_NV_DEFINE_SPACE, index, &rc, &attributes, &size, &unused, err, errsize);
        if (res == 1 && (rc & 0xfff) != 0x14c)              /* TPM_RC_NV_DEFINED: someone was quicker */
            return failed(rc, "NV_DefineSpace", index, err, errsize);
        if (res < 0 || reread(t, index, before, err, errsize) < 0)
            return -1;
        *defined = res == 0;
    }
    /* A counter's first increment sets it to the TPM's highest counter value ever, plus one: the
     * value is read back after every increment. */
    *after = *before;
    for (int i = 0; *after < target; i++) {
        if (i == MAX_INCREMENTS) {
            snprintf(err, errsize, "NV index 0x%08x is at %llu: %llu more increments to %llu is too many", index,
                     (unsigned long long)*after, (unsigned long long)(target - *after), (unsigned long long)target);
            return -1;
        }
        res = transact(t, TPM_NV_INCREMENT, index, &rc, &attributes, &size, &unused, err, errsize);
        if (res == 1)
            return failed(rc, "NV_Increment", index, err, errsize);
        if (res < 0 || reread(t, index, after, err, errsize) < 0)
            return -1;
    }
    return 0;
}
