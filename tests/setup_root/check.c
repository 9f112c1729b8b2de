/* Test driver for bootimg-setup-root's parsers and crypto (tests/test_setup_root_units.py builds
 * it with the program's sources under AddressSanitizer and UBSan). One check per run:
 *
 *   check sha256|sha512 HEX                 print the digest of the bytes
 *   check ed25519 PKHEX SIGHEX MSGHEX       exit 0 when the signature verifies
 *   check minisign KEYFILE SIGFILE MSGFILE  "ok KEYID" or "fail: REASON"
 *   check json FILE                         the extracted members, or "error: ..."
 *   check conf FILE | cmdline FILE          the parsed values, or "error: ..."
 *   check verity FILE                       the user-space fs-verity digest
 *   check release-in RELEASES PATH          "yes" when PATH is a release of RELEASES, else "no"
 *   check nv-index TEXT | u32 TEXT          the parsed value, or "error"
 *   check state FILE                        the rollback state file's value, or "error: ..."
 *   check booted RUN_DIR                    what bless and mount-image read from RUN_DIR/booted.json
 *   check tpm-command WHICH INDEX           the command's bytes (hex); WHICH: read-public, read,
 *                                           increment, define
 *   check tpm-response WHICH INDEX HEX      the unmarshalled response, "rc 0x..." or "error: ..."
 *   check tpm-read INDEX | tpm-raise INDEX TARGET
 *                                           the counter of the TPM (BOOTIMG_TEST_TPM=unix:PATH)
 *   check fuzz SEED N KEYFILE SIGFILE MSGFILE CONFFILE
 *       N rounds of mutations of those inputs, and of TPM responses, security versions and
 *       release paths, through every parser; a mutated signature or message that still
 *       verifies must be the original one, an accepted release path must be a direct child
 *       (exit 3 otherwise). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bsr.h"

static size_t unhex(const char *h, uint8_t *out, size_t max)
{
    size_t n = strlen(h) / 2;
    if (n > max)
        exit(2);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(h + 2 * i, "%2x", &v) != 1)
            exit(2);
        out[i] = (uint8_t)v;
    }
    return n;
}

static char *slurp(const char *path, size_t *len)
{
    char *data;
    if (read_file(path, 64 * 1024 * 1024, &data, len) != 0) {
        perror(path);
        exit(2);
    }
    return data;
}

static uint64_t rng;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* A mutated copy of data: bit flips, byte changes, truncation, insertion, repetition. */
static char *mutate(const char *data, size_t len, size_t *outlen)
{
    size_t cap = len * 2 + 70000;
    char *m = malloc(cap + 1);
    memcpy(m, data, len);
    size_t n = len;
    int rounds = 1 + (int)(next() % 4);
    for (int r = 0; r < rounds; r++) {
        size_t pos = n ? next() % n : 0;
        switch (next() % 8) {
        case 0: if (n) m[pos] ^= (char)(1 << (next() % 8)); break;
        case 1: if (n) m[pos] = (char)next(); break;
        case 2: n = pos; break;                                     /* truncate */
        case 3: if (n + 1 < cap) { memmove(m + pos + 1, m + pos, n - pos); m[pos] = "\n\0/.:=\"\\{}[],"[next() % 13]; n++; } break;
        case 4: { size_t k = next() % 66000; if (n + k < cap) { memmove(m + pos + k, m + pos, n - pos); memset(m + pos, 'A' + (int)(next() % 26), k); n += k; } } break;
        case 5: if (n) { size_t k = next() % (n - pos + 1); memmove(m + pos, m + pos + k, n - pos - k); n -= k; } break;
        case 6: if (n > 1) { size_t a = next() % n; char t = m[a]; m[a] = m[pos]; m[pos] = t; } break;
        default: if (n + 3 < cap) { memmove(m + pos + 3, m + pos, n - pos); memcpy(m + pos, "/..", 3); n += 3; } break;
        }
    }
    m[n] = 0;
    *outlen = n;
    return m;
}

static int same_sig(const struct minisign_sig *a, const struct minisign_sig *b)
{
    return memcmp(a->alg, b->alg, 2) == 0 && memcmp(a->keynum, b->keynum, 8) == 0 && memcmp(a->sig, b->sig, 64) == 0
           && a->trusted_len == b->trusted_len && memcmp(a->trusted, b->trusted, a->trusted_len) == 0
           && memcmp(a->global_sig, b->global_sig, 64) == 0;
}

/* Real responses of swtpm 0.7.1 (libtpms) for NV index 0x01500016. */
static const char *const TPM_RESPONSES[][2] = {
    {"read-public", "80010000003e00000000000e01500016000b02060016000000080022000b7757e09815ac4f98ee9d99371563a83d0cc000"
                    "3903f860ab02f2cf8d151e19fc"},
    {"read-public", "80010000000a0000018b"},
    {"read", "80020000001d000000000000000a000800000000000000020000010000"},
    {"increment", "80020000001300000000000000000000010000"},
    {"define", "80010000000a0000014c"},
};

static int which_of(const char *w)
{
    static const char *const names[] = {"read-public", "read", "increment", "define"};
    for (int i = 0; i < 4; i++)
        if (strcmp(w, names[i]) == 0)
            return i;
    exit(2);
}

/* What release_in must say, written plainly. */
static int direct_child(const char *releases, const char *p)
{
    size_t n = strlen(releases);
    if (strncmp(p, releases, n) != 0 || p[n] != '/' || !p[n + 1] || p[n + 1] == '.')
        return 0;
    for (const char *c = p + n + 1; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '.'
              || *c == '_' || *c == '-'))
            return 0;
    return 1;
}

static int fuzz(uint64_t seed, long rounds, char **files)
{
    size_t klen, slen, mlen, clen;
    char *key = slurp(files[0], &klen), *sig = slurp(files[1], &slen), *msg = slurp(files[2], &mlen),
         *conf = slurp(files[3], &clen), err[256];
    struct minisign_key k0, k;
    struct minisign_sig s0, s;
    if (parse_pubkey(key, klen, &k0, err, sizeof err) || parse_signature(sig, slen, &s0, err, sizeof err)
        || minisign_verify(&k0, &s0, (uint8_t *)msg, mlen, err, sizeof err)) {
        fprintf(stderr, "the seed inputs do not verify: %s\n", err);
        return 2;
    }
    rng = seed ? seed : 1;
    long accepted = 0;
    for (long i = 0; i < rounds; i++) {
        size_t n;
        char *m;
        switch (i % 9) {
        case 0: {                               /* key */
            m = mutate(key, klen, &n);
            if (parse_pubkey(m, n, &k, err, sizeof err) == 0 && minisign_verify(&k, &s0, (uint8_t *)msg, mlen, err, sizeof err) == 0) {
                if (memcmp(&k, &k0, sizeof k) != 0) {
                    fprintf(stderr, "round %ld: a different key verifies\n", i);
                    return 3;
                }
                accepted++;
            }
            break;
        }
        case 1: {                               /* signature */
            m = mutate(sig, slen, &n);
            if (parse_signature(m, n, &s, err, sizeof err) == 0 && minisign_verify(&k0, &s, (uint8_t *)msg, mlen, err, sizeof err) == 0) {
                if (!same_sig(&s, &s0)) {
                    fprintf(stderr, "round %ld: a different signature verifies\n", i);
                    return 3;
                }
                accepted++;
            }
            break;
        }
        case 2: {                               /* message: parse it, and it must not verify */
            struct release_info r;
            m = mutate(msg, mlen, &n);
            parse_release(m, n, &r, err, sizeof err);
            if ((n != mlen || memcmp(m, msg, n) != 0) && minisign_verify(&k0, &s0, (uint8_t *)m, n, err, sizeof err) == 0) {
                fprintf(stderr, "round %ld: a different release.json verifies\n", i);
                return 3;
            }
            break;
        }
        case 3: {
            struct config c;
            m = mutate(conf, clen, &n);
            parse_conf(m, n, &c, err, sizeof err);
            break;
        }
        case 4: {
            struct cmdline cl;
            char hex[65];
            m = mutate("quiet composefs.digest=v1-sha256-12:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef bootimg.release=/bootimg/release rw", 117, &n);
            uint32_t v;
            if (parse_cmdline(m, n, &cl) == 0 && cl.n_digest == 1)
                parse_digest_arg(cl.digest_arg, hex);
            safe_path(cl.release);
            if (cl.n_secver && parse_u32(cl.secver, &v) == 0 && strtoull(cl.secver, NULL, 10) != v) {
                fprintf(stderr, "round %ld: security_version %s read as %u\n", i, cl.secver, v);
                return 3;
            }
            break;
        }
        case 6: {                               /* TPM responses */
            uint8_t r[TPM_MAX_RESPONSE], hexbuf[2 * TPM_MAX_RESPONSE];
            int k = (int)(next() % 5), which = which_of(TPM_RESPONSES[k][0]);
            const char *h = TPM_RESPONSES[k][1];
            size_t hn = strlen(h) / 2;
            for (size_t j = 0; j < hn; j++) {
                unsigned x;
                sscanf(h + 2 * j, "%2x", &x);
                hexbuf[j] = (uint8_t)x;
            }
            m = mutate((char *)hexbuf, hn, &n);
            if (n > sizeof r)
                n = sizeof r;
            memcpy(r, m, n);
            uint32_t rc, attributes;
            uint16_t size;
            uint64_t value;
            if (tpm_response(which, 0x01500016, r, n, &rc, &attributes, &size, &value, err, sizeof err) >= 0
                && (n < 10 || ((size_t)r[2] << 24 | (size_t)r[3] << 16 | (size_t)r[4] << 8 | r[5]) != n)) {
                fprintf(stderr, "round %ld: a TPM response of the wrong length was accepted\n", i);
                return 3;
            }
            break;
        }
        case 7: {                               /* security versions in release.json */
            static const char doc[] = "{\"format\": \"bootimg-release/1\", \"version\": \"1.4.0\", "
                                      "\"security_version\": 4294967295, \"root\": {\"kernel_argument\": \"x\"}}";
            struct release_info r;
            m = mutate(doc, sizeof doc - 1, &n);
            if (parse_release(m, n, &r, err, sizeof err) == 0 && r.has_security_version) {
                char *at = strstr(m, "\"security_version\":");
                if (at && strtoull(at + 19 + strspn(at + 19, " "), NULL, 10) != r.security_version) {
                    fprintf(stderr, "round %ld: security_version read as %u\n", i, r.security_version);
                    return 3;
                }
            }
            break;
        }
        case 8: {                               /* release paths */
            m = mutate("/bootimg/releases/1.4.0", 23, &n);
            if (strlen(m) == n && release_in("/bootimg/releases", m) != (safe_path(m) && direct_child("/bootimg/releases", m))) {
                fprintf(stderr, "round %ld: release_in is wrong about '%s'\n", i, m);
                return 3;
            }
            break;
        }
        default: {
            uint8_t out[128];
            size_t got;
            m = mutate(sig, slen < 120 ? slen : 120, &n);
            b64_decode(m, n, out, sizeof out, &got);
            break;
        }
        }
        free(m);
    }
    printf("fuzz: %ld rounds, %ld accepted (equal to the originals)\n", rounds, accepted);
    free(key);
    free(sig);
    free(msg);
    free(conf);
    return 0;
}

int main(int argc, char **argv)
{
    static uint8_t buf[1 << 20], sig[64], pk[32];
    char err[256];
    if (argc == 3 && (strcmp(argv[1], "sha256") == 0 || strcmp(argv[1], "sha512") == 0)) {
        size_t n = unhex(argv[2], buf, sizeof buf);
        uint8_t d[64];
        char hex[129];
        if (argv[1][3] == '2') {
            sha256(buf, n, d);
            hex_encode(d, 32, hex);
        } else {
            sha512_ctx c;
            sha512_init(&c);
            for (size_t i = 0; i < n; i++)          /* byte by byte: the buffering paths */
                sha512_update(&c, buf + i, 1);
            sha512_final(&c, d);
            hex_encode(d, 64, hex);
        }
        puts(hex);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "ed25519") == 0) {
        if (unhex(argv[2], pk, 32) != 32 || unhex(argv[3], sig, 64) != 64)
            return 2;
        size_t n = unhex(argv[4], buf, sizeof buf);
        return ed25519_verify(sig, pk, buf, n) == 0 ? 0 : 1;
    }
    if (argc == 5 && strcmp(argv[1], "minisign") == 0) {
        size_t kl, sl, ml;
        char *kt = slurp(argv[2], &kl), *st = slurp(argv[3], &sl), *mt = slurp(argv[4], &ml), id[17];
        struct minisign_key k;
        struct minisign_sig s;
        if (parse_pubkey(kt, kl, &k, err, sizeof err) || parse_signature(st, sl, &s, err, sizeof err)
            || minisign_verify(&k, &s, (uint8_t *)mt, ml, err, sizeof err)) {
            printf("fail: %s\n", err);
            free(kt);
            free(st);
            free(mt);
            return 1;
        }
        keyid_hex(k.keynum, id);
        printf("ok %s\n", id);
        free(kt);
        free(st);
        free(mt);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "json") == 0) {
        size_t n;
        char *t = slurp(argv[2], &n);
        struct release_info r;
        int rc = parse_release(t, n, &r, err, sizeof err);
        free(t);
        if (rc) {
            printf("error: %s\n", err);
            return 1;
        }
        printf("format=%s\nkernel_argument=%s\nroot_digest=%s\nn_kernel_argument=%d\n", r.format, r.kernel_argument,
               r.root_digest, r.n_kernel_argument);
        printf("version=%s\nsecurity_version=%s%u\n", r.version, r.has_security_version ? "" : "absent ",
               r.security_version);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "conf") == 0) {
        size_t n;
        char *t = slurp(argv[2], &n);
        struct config c;
        int rc = parse_conf(t, n, &c, err, sizeof err);
        free(t);
        if (rc) {
            printf("error: %s\n", err);
            return 1;
        }
        printf("trust=%s\nfsverity=%s\netc=%s\nvar=%s\non_failure=%s\nrelease=%s\nstate=%s\nobjects=%s\nreleases=%s\n"
               "rollback_nv=%s\n", c.trust, c.fsverity, c.etc, c.var, c.on_failure, c.release, c.state, c.objects,
               c.releases, c.rollback_nv);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "cmdline") == 0) {
        size_t n;
        char *t = slurp(argv[2], &n), hex[65] = "";
        struct cmdline c;
        int rc = parse_cmdline(t, n, &c);
        free(t);
        if (rc) {
            printf("error: NUL\n");
            return 1;
        }
        int ok = c.n_digest == 1 && !c.digest_arg_long && parse_digest_arg(c.digest_arg, hex) == 0;
        printf("n_digest=%d\ndigest=%s\nrelease=%s\nrelease_safe=%d\nn_secver=%d\nsecver=%s\n", c.n_digest, ok ? hex : "",
               c.release, c.release[0] ? safe_path(c.release) : 0, c.n_secver, c.secver);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "verity") == 0) {
        int fd = open(argv[2], O_RDONLY);
        uint8_t d[32];
        char hex[65];
        if (fd < 0 || verity_digest_fd(fd, d))
            return 2;
        hex_encode(d, 32, hex);
        puts(hex);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "release-in") == 0) {
        puts(release_in(argv[2], argv[3]) ? "yes" : "no");
        return 0;
    }
    if (argc == 3 && (strcmp(argv[1], "nv-index") == 0 || strcmp(argv[1], "u32") == 0)) {
        uint32_t v;
        if ((argv[1][0] == 'n' ? parse_nv_index(argv[2], &v) : parse_u32(argv[2], &v)) < 0) {
            puts("error");
            return 1;
        }
        printf("%u\n", v);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "state") == 0) {
        uint64_t v;
        if (rollback_read_file(argv[2], "STATE", &v, err, sizeof err) < 0) {
            printf("error: %s\n", err);
            return 1;
        }
        printf("%llu\n", (unsigned long long)v);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "booted") == 0) {
        struct booted_info b;
        if (read_booted(argv[2], &b, err, sizeof err) < 0) {
            printf("error: %s\n", err);
            return 1;
        }
        printf("release_dir=%s\nobjects=%s\nrollback_file=%s\nrollback_nv=%s\nversion=%s\nsecurity_version=%s%u\n",
               b.release_dir, b.objects, b.rollback_file, b.rollback_nv, b.version,
               b.has_security_version ? "" : "absent ", b.security_version);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "tpm-command") == 0) {
        uint8_t cmd[64];
        char hex[129];
        size_t n = tpm_command(which_of(argv[2]), (uint32_t)strtoul(argv[3], NULL, 0), cmd);
        hex_encode(cmd, n, hex);
        puts(hex);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "tpm-response") == 0) {
        size_t n = unhex(argv[4], buf, TPM_MAX_RESPONSE);
        uint32_t rc, attributes = 0;
        uint16_t size = 0;
        uint64_t value = 0;
        int res = tpm_response(which_of(argv[2]), (uint32_t)strtoul(argv[3], NULL, 0), buf, n, &rc, &attributes, &size,
                               &value, err, sizeof err);
        if (res < 0)
            printf("error: %s\n", err);
        else if (res == 1)
            printf("rc 0x%03x\n", rc);
        else
            printf("ok attributes=0x%08x size=%u value=%llu\n", attributes, size, (unsigned long long)value);
        return res != 0;
    }
    if ((argc == 3 && strcmp(argv[1], "tpm-read") == 0) || (argc == 4 && strcmp(argv[1], "tpm-raise") == 0)) {
        struct tpm t;
        uint32_t index = (uint32_t)strtoul(argv[2], NULL, 0);
        uint64_t before, after;
        int defined = 0, res = tpm_open(&t, err, sizeof err);
        if (res == 1 && argc == 3) {
            res = tpm_counter_read(&t, index, &after, err, sizeof err);
            if (res == 1)
                puts("undefined");
            else if (res == 0)
                printf("%llu\n", (unsigned long long)after);
        } else if (res == 1) {
            res = tpm_counter_raise(&t, index, strtoull(argv[3], NULL, 0), &before, &after, &defined, err, sizeof err);
            if (res == 0)
                printf("%llu -> %llu%s\n", (unsigned long long)before, (unsigned long long)after, defined ? " defined" : "");
        } else if (res == 0) {
            puts("no TPM");
        }
        if (res < 0)
            printf("error: %s\n", err);
        tpm_close(&t);
        return res < 0;
    }
    if (argc == 8 && strcmp(argv[1], "fuzz") == 0)
        return fuzz(strtoull(argv[2], NULL, 0), strtol(argv[3], NULL, 0), argv + 4);
    fprintf(stderr, "usage: see the comment at the top of check.c\n");
    return 2;
}
