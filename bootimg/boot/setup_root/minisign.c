/* minisign public keys and signatures (the format bootimg/signing/minisig.py writes):
 *   key:       "untrusted comment: ..." / base64("Ed" keynum(8) pk(32))
 *   signature: "untrusted comment: ..." / base64(alg(2) keynum(8) sig(64)) /
 *              "trusted comment: ..." / base64(global sig(64) over sig || trusted comment)
 * alg "Ed" signs the message itself, "ED" its BLAKE2b-512 hash. Both signatures must verify. */
#include <stdio.h>
#include <string.h>

#include "bsr.h"
#include "vendor/monocypher/monocypher.h"

static int b64val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Standard alphabet, '=' padding required, no stray bits: exactly one text per byte string. */
int b64_decode(const char *in, size_t inlen, uint8_t *out, size_t outsize, size_t *outlen)
{
    if (inlen % 4)
        return -1;
    size_t n = 0;
    for (size_t i = 0; i < inlen; i += 4) {
        int v[4], pad = 0;
        for (int j = 0; j < 4; j++) {
            unsigned char c = (unsigned char)in[i + j];
            if (c == '=' && i + 4 == inlen && j >= 2) {
                v[j] = 0;
                pad++;
            } else if (pad || (v[j] = b64val(c)) < 0) {
                return -1;
            }
        }
        if (pad == 1 && in[i + 3] != '=')
            return -1;
        if (pad == 2 && (v[1] & 15))
            return -1;
        if (pad == 1 && (v[2] & 3))
            return -1;
        uint8_t b[3] = {(uint8_t)(v[0] << 2 | v[1] >> 4), (uint8_t)(v[1] << 4 | v[2] >> 2), (uint8_t)(v[2] << 6 | v[3])};
        for (int j = 0; j < 3 - pad; j++) {
            if (n >= outsize)
                return -1;
            out[n++] = b[j];
        }
    }
    *outlen = n;
    return 0;
}

struct line { const char *s; size_t n; };

/* Exactly count lines (LF or CRLF, a final newline optional, only blank lines after them). */
static int split_lines(const char *text, size_t len, struct line *lines, int count, const char *what, char *err,
                       size_t errsize)
{
    if (memchr(text, 0, len)) {
        snprintf(err, errsize, "malformed %s: contains a NUL byte", what);
        return -1;
    }
    int i = 0;
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (n && p[n - 1] == '\r')
            n--;
        if (memchr(p, '\r', n)) {
            snprintf(err, errsize, "malformed %s: line %d: contains a CR", what, i + 1);
            return -1;
        }
        if (i < count) {
            lines[i].s = p;
            lines[i].n = n;
        } else {
            for (size_t k = 0; k < n; k++)
                if (p[k] != ' ' && p[k] != '\t') {
                    snprintf(err, errsize, "malformed %s: line %d: unexpected content after the %d lines", what,
                             i + 1, count);
                    return -1;
                }
        }
        i++;
        p += (nl ? n + 1 + (p[n] == '\r') : n);
        if (!nl)
            break;
    }
    if (i < count) {
        snprintf(err, errsize, "malformed %s: line %d: missing (expected %d lines, found %d)", what, i + 1, count, i);
        return -1;
    }
    return 0;
}

static int prefixed(const struct line *l, const char *prefix)
{
    size_t n = strlen(prefix);
    return l->n >= n && memcmp(l->s, prefix, n) == 0;
}

int parse_pubkey(const char *text, size_t len, struct minisign_key *k, char *err, size_t errsize)
{
    struct line l[2];
    uint8_t raw[64];
    size_t n;
    if (split_lines(text, len, l, 2, "public key file", err, errsize) < 0)
        return -1;
    if (!prefixed(&l[0], "untrusted comment: ")) {
        snprintf(err, errsize, "malformed public key file: line 1: does not start with 'untrusted comment:'");
        return -1;
    }
    if (b64_decode(l[1].s, l[1].n, raw, sizeof raw, &n) < 0 || n != 42) {
        snprintf(err, errsize, "malformed public key file: line 2: not the base64 of a 42-byte key");
        return -1;
    }
    if (raw[0] != 'E' || raw[1] != 'd') {
        snprintf(err, errsize, "malformed public key file: line 2: unsupported algorithm (expected Ed25519)");
        return -1;
    }
    memcpy(k->keynum, raw + 2, 8);
    memcpy(k->pk, raw + 10, 32);
    return 0;
}

int parse_signature(const char *text, size_t len, struct minisign_sig *s, char *err, size_t errsize)
{
    struct line l[4];
    uint8_t raw[96];
    size_t n;
    if (split_lines(text, len, l, 4, "signature file", err, errsize) < 0)
        return -1;
    if (!prefixed(&l[0], "untrusted comment: ")) {
        snprintf(err, errsize, "malformed signature file: line 1: does not start with 'untrusted comment:'");
        return -1;
    }
    if (b64_decode(l[1].s, l[1].n, raw, sizeof raw, &n) < 0 || n != 74) {
        snprintf(err, errsize, "malformed signature file: line 2: not the base64 of a 74-byte signature");
        return -1;
    }
    if (raw[0] != 'E' || (raw[1] != 'd' && raw[1] != 'D')) {
        snprintf(err, errsize, "malformed signature file: line 2: unsupported algorithm");
        return -1;
    }
    memcpy(s->alg, raw, 2);
    memcpy(s->keynum, raw + 2, 8);
    memcpy(s->sig, raw + 10, 64);
    if (!prefixed(&l[2], "trusted comment: ")) {
        snprintf(err, errsize, "malformed signature file: line 3: does not start with 'trusted comment:'");
        return -1;
    }
    s->trusted = l[2].s + 17;
    s->trusted_len = l[2].n - 17;
    if (b64_decode(l[3].s, l[3].n, raw, sizeof raw, &n) < 0 || n != 64) {
        snprintf(err, errsize, "malformed signature file: line 4: not the base64 of a 64-byte signature");
        return -1;
    }
    memcpy(s->global_sig, raw, 64);
    return 0;
}

void keyid_hex(const uint8_t keynum[8], char out[17])
{
    static const char digits[] = "0123456789ABCDEF";
    for (int i = 0; i < 8; i++) {            /* the little-endian u64, as minisign prints it */
        out[2 * i] = digits[keynum[7 - i] >> 4];
        out[2 * i + 1] = digits[keynum[7 - i] & 15];
    }
    out[16] = 0;
}

int minisign_verify(const struct minisign_key *k, const struct minisign_sig *s, const uint8_t *msg, size_t msglen,
                    char *err, size_t errsize)
{
    uint8_t hashed[64], global[64 + 8192];
    if (memcmp(k->keynum, s->keynum, 8) != 0) {
        char a[17], b[17];
        keyid_hex(s->keynum, a);
        keyid_hex(k->keynum, b);
        snprintf(err, errsize, "signed by key %s, not %s", a, b);
        return -1;
    }
    if (s->alg[1] == 'D') {
        crypto_blake2b(hashed, 64, msg, msglen);
        msg = hashed;
        msglen = 64;
    } else if (msglen > (1u << 30)) {
        snprintf(err, errsize, "a legacy signature over more than 1 GiB");
        return -1;
    }
    if (ed25519_verify(s->sig, k->pk, msg, msglen) != 0) {
        snprintf(err, errsize, "signature verification failed");
        return -1;
    }
    if (s->trusted_len > sizeof global - 64) {
        snprintf(err, errsize, "trusted comment too long");
        return -1;
    }
    memcpy(global, s->sig, 64);
    memcpy(global + 64, s->trusted, s->trusted_len);
    if (ed25519_verify(s->global_sig, k->pk, global, 64 + s->trusted_len) != 0) {
        snprintf(err, errsize, "the trusted comment's signature verification failed");
        return -1;
    }
    return 0;
}
