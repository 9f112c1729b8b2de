/* A small strict JSON reader (RFC 8259) for release.json and booted.json: the whole document is
 * validated (syntax, UTF-8, escapes, a depth limit) and the few members the boot needs are
 * extracted, each of its type. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bsr.h"

struct parser {
    const unsigned char *p, *end, *start;
    char *err;
    size_t errsize;
    struct json_field *f;
    int nf;
};

static int fail(struct parser *ps, const char *fmt, ...)
{
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t line = 1, col = 1;
    for (const unsigned char *q = ps->start; q < ps->p && q < ps->end; q++, col++)
        if (*q == '\n') {
            line++;
            col = 0;
        }
    snprintf(ps->err, ps->errsize, "line %zu column %zu: %s", line, col, msg);
    return -1;
}

static void ws(struct parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int hex4(struct parser *ps, unsigned *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++, ps->p++) {
        if (ps->p >= ps->end)
            return fail(ps, "truncated \\u escape");
        unsigned c = *ps->p, d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return fail(ps, "bad \\u escape");
        *v = *v << 4 | d;
    }
    return 0;
}

static void put(char *out, size_t size, size_t *n, int *overflow, unsigned char c)
{
    if (!out)
        return;
    if (*n + 1 < size)
        out[(*n)++] = (char)c;
    else
        *overflow = 1;
}

/* A string at ps->p (the opening quote); decoded into out (if not NULL) when it fits. */
static int string(struct parser *ps, char *out, size_t size, int *overflow)
{
    size_t n = 0;
    int of = 0;
    ps->p++;
    for (;;) {
        if (ps->p >= ps->end)
            return fail(ps, "unterminated string");
        unsigned c = *ps->p;
        if (c == '"') {
            ps->p++;
            break;
        }
        if (c < 0x20)
            return fail(ps, "control character in a string");
        if (c == '\\') {
            ps->p++;
            if (ps->p >= ps->end)
                return fail(ps, "unterminated string");
            unsigned e = *ps->p++, cp;
            switch (e) {
            case '"': case '\\': case '/': put(out, size, &n, &of, (unsigned char)e); continue;
            case 'b': put(out, size, &n, &of, '\b'); continue;
            case 'f': put(out, size, &n, &of, '\f'); continue;
            case 'n': put(out, size, &n, &of, '\n'); continue;
            case 'r': put(out, size, &n, &of, '\r'); continue;
            case 't': put(out, size, &n, &of, '\t'); continue;
            case 'u':
                if (hex4(ps, &cp) < 0)
                    return -1;
                if (cp >= 0xdc00 && cp < 0xe000)
                    return fail(ps, "unpaired surrogate in a \\u escape");
                if (cp >= 0xd800 && cp < 0xdc00) {
                    unsigned lo;
                    if (ps->end - ps->p < 2 || ps->p[0] != '\\' || ps->p[1] != 'u')
                        return fail(ps, "unpaired surrogate in a \\u escape");
                    ps->p += 2;
                    if (hex4(ps, &lo) < 0)
                        return -1;
                    if (lo < 0xdc00 || lo >= 0xe000)
                        return fail(ps, "unpaired surrogate in a \\u escape");
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                }
                if (cp == 0)
                    return fail(ps, "NUL (\\u0000) in a string");
                if (cp < 0x80) {
                    put(out, size, &n, &of, (unsigned char)cp);
                } else if (cp < 0x800) {
                    put(out, size, &n, &of, (unsigned char)(0xc0 | cp >> 6));
                    put(out, size, &n, &of, (unsigned char)(0x80 | (cp & 0x3f)));
                } else if (cp < 0x10000) {
                    put(out, size, &n, &of, (unsigned char)(0xe0 | cp >> 12));
                    put(out, size, &n, &of, (unsigned char)(0x80 | ((cp >> 6) & 0x3f)));
                    put(out, size, &n, &of, (unsigned char)(0x80 | (cp & 0x3f)));
                } else {
                    put(out, size, &n, &of, (unsigned char)(0xf0 | cp >> 18));
                    put(out, size, &n, &of, (unsigned char)(0x80 | ((cp >> 12) & 0x3f)));
                    put(out, size, &n, &of, (unsigned char)(0x80 | ((cp >> 6) & 0x3f)));
                    put(out, size, &n, &of, (unsigned char)(0x80 | (cp & 0x3f)));
                }
                continue;
            default:
                return fail(ps, "bad escape '\\%c'", e >= 0x20 && e < 0x7f ? (int)e : '?');
            }
        }
        /* UTF-8, strictly: no overlong forms, no surrogates, nothing above U+10FFFF */
        int len = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        if (!len || ps->end - ps->p < len)
            return fail(ps, "invalid UTF-8");
        unsigned cp = len == 1 ? c : len == 2 ? c & 0x1f : len == 3 ? c & 0x0f : c & 0x07;
        for (int i = 1; i < len; i++) {
            if ((ps->p[i] & 0xc0) != 0x80)
                return fail(ps, "invalid UTF-8");
            cp = cp << 6 | (ps->p[i] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff
            || (cp >= 0xd800 && cp < 0xe000))
            return fail(ps, "invalid UTF-8");
        for (int i = 0; i < len; i++)
            put(out, size, &n, &of, ps->p[i]);
        ps->p += len;
    }
    if (out)
        out[n] = 0;
    if (overflow)
        *overflow = of;
    return 0;
}

static int number(struct parser *ps)
{
    const unsigned char *p = ps->p;
#define DIGIT(q) ((q) < ps->end && *(q) >= '0' && *(q) <= '9')
    if (p < ps->end && *p == '-')
        p++;
    if (p < ps->end && *p == '0')
        p++;
    else if (DIGIT(p))
        while (DIGIT(p)) p++;
    else
        return fail(ps, "bad number");
    if (p < ps->end && *p == '.') {
        p++;
        if (!DIGIT(p))
            return fail(ps, "bad number");
        while (DIGIT(p)) p++;
    }
    if (p < ps->end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < ps->end && (*p == '+' || *p == '-'))
            p++;
        if (!DIGIT(p))
            return fail(ps, "bad number");
        while (DIGIT(p)) p++;
    }
#undef DIGIT
    ps->p = p;
    return 0;
}

static int literal(struct parser *ps, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
        return fail(ps, "unexpected character");
    ps->p += n;
    return 0;
}

/* where: -1 = the top-level object, -2 = anywhere else, k >= 0 = the object of field k */
static int value(struct parser *ps, int depth, int where);

static int member_value(struct parser *ps, int depth, int where, const char *key, int key_of)
{
    const char *parent = where >= 0 ? ps->f[where].name : NULL;
    for (int k = 0; k < ps->nf && where != -2 && !key_of; k++) {
        struct json_field *f = &ps->f[k];
        if (strcmp(f->name, key) != 0 || (parent ? !f->parent || strcmp(f->parent, parent) != 0 : f->parent != NULL))
            continue;
        char what[160];
        snprintf(what, sizeof what, "%s%s%s\"%s\"", parent ? "\"" : "", parent ? parent : "", parent ? "\"." : "", key);
        if (f->count++ && !f->multi)
            return fail(ps, "duplicate member %s", what);
        if (f->type == JSON_OBJECT) {
            if (ps->p >= ps->end || *ps->p != '{')
                return fail(ps, "%s is not an object", what);
            return value(ps, depth + 1, k);
        }
        if (f->type == JSON_STRING) {
            int of = 0;
            if (ps->p >= ps->end || *ps->p != '"')
                return fail(ps, "%s is not a string", what);
            if (string(ps, f->str, f->size, &of) < 0)
                return -1;
            if (of)
                f->str[0] = 0;
            return 0;
        }
        /* JSON_U32: digits only (the grammar forbids leading zeros), at most 4294967295 */
        const unsigned char *at = ps->p;
        char digits[16];
        size_t n = 0;
        if (at < ps->end && (*at == '-' || (*at >= '0' && *at <= '9'))) {
            if (number(ps) < 0)
                return -1;
            n = (size_t)(ps->p - at);
        }
        if (n == 0 || n >= sizeof digits || (memcpy(digits, at, n), digits[n] = 0, parse_u32(digits, f->num) < 0)) {
            ps->p = at;
            return fail(ps, "%s is not an integer from 0 to 4294967295", what);
        }
        return 0;
    }
    return value(ps, depth + 1, -2);
}

static int value(struct parser *ps, int depth, int where)
{
    if (depth > JSON_MAX_DEPTH)
        return fail(ps, "nested deeper than %d levels", JSON_MAX_DEPTH);
    ws(ps);
    if (ps->p >= ps->end)
        return fail(ps, "unexpected end of the document");
    switch (*ps->p) {
    case '{': {
        ps->p++;
        ws(ps);
        if (ps->p < ps->end && *ps->p == '}') {
            ps->p++;
            return 0;
        }
        for (;;) {
            char key[64];
            int of = 0;
            ws(ps);
            if (ps->p >= ps->end || *ps->p != '"')
                return fail(ps, "expected a member name");
            if (string(ps, key, sizeof key, &of) < 0)
                return -1;
            ws(ps);
            if (ps->p >= ps->end || *ps->p != ':')
                return fail(ps, "expected ':'");
            ps->p++;
            ws(ps);
            if (member_value(ps, depth, where, key, of) < 0)
                return -1;
            ws(ps);
            if (ps->p < ps->end && *ps->p == ',') {
                ps->p++;
                continue;
            }
            if (ps->p < ps->end && *ps->p == '}') {
                ps->p++;
                return 0;
            }
            return fail(ps, "expected ',' or '}'");
        }
    }
    case '[':
        ps->p++;
        ws(ps);
        if (ps->p < ps->end && *ps->p == ']') {
            ps->p++;
            return 0;
        }
        for (;;) {
            if (value(ps, depth + 1, -2) < 0)
                return -1;
            ws(ps);
            if (ps->p < ps->end && *ps->p == ',') {
                ps->p++;
                continue;
            }
            if (ps->p < ps->end && *ps->p == ']') {
                ps->p++;
                return 0;
            }
            return fail(ps, "expected ',' or ']'");
        }
    case '"':
        return string(ps, NULL, 0, NULL);
    case 't':
        return literal(ps, "true");
    case 'f':
        return literal(ps, "false");
    case 'n':
        return literal(ps, "null");
    default:
        if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9'))
            return number(ps);
        return fail(ps, "unexpected character");
    }
}

int json_extract(const char *text, size_t len, struct json_field *f, int nf, char *err, size_t errsize)
{
    struct parser ps = {(const unsigned char *)text, (const unsigned char *)text + len, (const unsigned char *)text,
                        err, errsize, f, nf};
    for (int k = 0; k < nf; k++) {
        f[k].count = 0;
        if (f[k].str)
            f[k].str[0] = 0;
    }
    ws(&ps);
    if (ps.p >= ps.end || *ps.p != '{')
        return fail(&ps, "the document is not a JSON object");
    if (value(&ps, 1, -1) < 0)
        return -1;
    ws(&ps);
    if (ps.p != ps.end)
        return fail(&ps, "content after the JSON document");
    return 0;
}

#define STR(parent, name, buf) {parent, name, JSON_STRING, 0, buf, sizeof buf, NULL, 0}

int parse_release(const char *text, size_t len, struct release_info *r, char *err, size_t errsize)
{
    memset(r, 0, sizeof *r);
    struct json_field f[] = {
        STR(NULL, "format", r->format),
        STR(NULL, "version", r->version),
        {NULL, "security_version", JSON_U32, 0, NULL, 0, &r->security_version, 0},
        {NULL, "root", JSON_OBJECT, 0, NULL, 0, NULL, 0},
        {"root", "kernel_argument", JSON_STRING, 1, r->kernel_argument, sizeof r->kernel_argument, NULL, 0},
        STR("root", "digest", r->root_digest),
    };
    int rc = json_extract(text, len, f, 6, err, errsize);
    r->has_security_version = f[2].count;
    r->n_kernel_argument = f[4].count;
    return rc;
}

int read_booted(const char *run, struct booted_info *b, char *err, size_t errsize)
{
    char path[BSR_PATH_MAX], *text, e2[200];
    size_t len;
    memset(b, 0, sizeof *b);
    if (path_join(path, sizeof path, run, "/booted.json") < 0) {
        snprintf(err, errsize, "path too long");
        return -1;
    }
    int e = read_file(path, MAX_CONF, &text, &len);
    if (e) {
        snprintf(err, errsize, "cannot read %s: %s (the root was not set up by bootimg-setup-root)", path,
                 e == EFBIG ? "larger than 64 KiB" : strerror(e));
        return -1;
    }
    struct json_field f[] = {
        STR(NULL, "release_dir", b->release_dir),
        STR(NULL, "objects", b->objects),
        STR(NULL, "rollback_file", b->rollback_file),
        STR(NULL, "rollback_nv", b->rollback_nv),
        STR(NULL, "version", b->version),
        {NULL, "security_version", JSON_U32, 0, NULL, 0, &b->security_version, 0},
    };
    int rc = json_extract(text, len, f, 6, e2, sizeof e2);
    free(text);
    b->has_security_version = f[5].count;
    if (rc < 0)
        snprintf(err, errsize, "%s: %s", path, e2);
    return rc;
}
