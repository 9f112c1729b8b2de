/* boot.conf (KEY=value lines, written at build time) and the kernel command line. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "bsr.h"

static int set(char *dst, size_t size, const char *v, size_t n)
{
    if (n >= size)
        return -1;
    memcpy(dst, v, n);
    dst[n] = 0;
    return 0;
}

int parse_conf(const char *text, size_t len, struct config *c, char *err, size_t errsize)
{
    static const struct { const char *key; size_t off, size; } keys[] = {
        {"BOOTIMG_TRUST=", offsetof(struct config, trust), sizeof c->trust},
        {"BOOTIMG_FSVERITY=", offsetof(struct config, fsverity), sizeof c->fsverity},
        {"BOOTIMG_ETC=", offsetof(struct config, etc), sizeof c->etc},
        {"BOOTIMG_VAR=", offsetof(struct config, var), sizeof c->var},
        {"BOOTIMG_ON_FAILURE=", offsetof(struct config, on_failure), sizeof c->on_failure},
        {"BOOTIMG_RELEASE=", offsetof(struct config, release), sizeof c->release},
        {"BOOTIMG_STATE=", offsetof(struct config, state), sizeof c->state},
        {"BOOTIMG_OBJECTS=", offsetof(struct config, objects), sizeof c->objects},
        {"BOOTIMG_RELEASES=", offsetof(struct config, releases), sizeof c->releases},
        {"BOOTIMG_ROLLBACK_NV=", offsetof(struct config, rollback_nv), sizeof c->rollback_nv},
    };
    memset(c, 0, sizeof *c);
    if (memchr(text, 0, len)) {
        snprintf(err, errsize, "contains a NUL byte");
        return -1;
    }
    int lineno = 0;
    for (const char *p = text, *end = text + len; p < end; lineno++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
            size_t kl = strlen(keys[k].key);
            if (n >= kl && memcmp(p, keys[k].key, kl) == 0) {
                if (set((char *)c + keys[k].off, keys[k].size, p + kl, n - kl) < 0) {
                    snprintf(err, errsize, "line %d: the value of %.*s is too long", lineno + 1, (int)kl - 1,
                             keys[k].key);
                    return -1;
                }
            }
        }
        p += n + 1;
    }
    return 0;
}

int parse_cmdline(const char *text, size_t len, struct cmdline *c)
{
    memset(c, 0, sizeof *c);
    if (memchr(text, 0, len))
        return -1;              /* the kernel's command line never has one: refuse ambiguity */
    const char *p = text, *end = text + len;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == 0))
            p++;
        const char *w = p;
        while (p < end && !(*p == ' ' || *p == '\t' || *p == '\n' || *p == 0))
            p++;
        size_t n = (size_t)(p - w);
        if (n >= 17 && memcmp(w, "composefs.digest=", 17) == 0) {
            c->n_digest++;
            c->digest_arg_long = set(c->digest_arg, sizeof c->digest_arg, w + 17, n - 17) < 0;
            if (c->digest_arg_long)
                set(c->digest_arg, sizeof c->digest_arg, w + 17, sizeof c->digest_arg - 1);
        } else if (n >= 16 && memcmp(w, "bootimg.release=", 16) == 0) {
            c->release_long = set(c->release, sizeof c->release, w + 16, n - 16) < 0;
            if (c->release_long)
                c->release[0] = 0;
        } else if (n >= 25 && memcmp(w, "bootimg.security_version=", 25) == 0) {
            c->n_secver++;
            if (set(c->secver, sizeof c->secver, w + 25, n - 25) < 0)
                c->secver[0] = 0;
        }
    }
    return 0;
}

int parse_digest_arg(const char *arg, char hex[65])
{
    if (strncmp(arg, "v1-sha256-12:", 13) != 0 || !is_hex64(arg + 13))
        return -1;
    memcpy(hex, arg + 13, 65);
    return 0;
}

int parse_nv_index(const char *s, uint32_t *index)
{
    uint32_t v = 0;
    if (s[0] != '0' || s[1] != 'x' || strlen(s) != 10)
        return -1;
    for (const char *p = s + 2; *p; p++) {
        unsigned d = *p >= '0' && *p <= '9' ? (unsigned)(*p - '0') : *p >= 'a' && *p <= 'f' ? (unsigned)(*p - 'a' + 10)
                   : *p >= 'A' && *p <= 'F' ? (unsigned)(*p - 'A' + 10) : 16u;
        if (d > 15)
            return -1;
        v = v << 4 | d;
    }
    if (v >> 24 != 0x01)             /* TPM_HT_NV_INDEX */
        return -1;
    *index = v;
    return 0;
}

int release_in(const char *releases, const char *release)
{
    size_t n = strlen(releases);
    return safe_path(releases) && safe_path(release) && strncmp(release, releases, n) == 0 && release[n] == '/'
           && release[n + 1] && release[n + 1] != '.' && !strchr(release + n + 1, '/');
}
