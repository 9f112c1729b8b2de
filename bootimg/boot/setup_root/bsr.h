/* bootimg-setup-root: shared declarations (see setup_root.c for what the program does). */
#ifndef BSR_H
#define BSR_H

#include <stddef.h>
#include <stdint.h>

#define BSR_PATH_MAX 1024

/* Limits on what is read: everything the program reads is treated as hostile. */
#define MAX_CONF      (64 * 1024)
#define MAX_CMDLINE   (64 * 1024)
#define MAX_RELEASE   (1024 * 1024)
#define MAX_SIG       (16 * 1024)
#define MAX_KEY       (4 * 1024)
#define MAX_KEYS      64
#define JSON_MAX_DEPTH 32

/* -- output and failing closed (util.c) ------------------------------------------------------ */
extern const char *bsr_kmsg;                 /* where FATAL/WARNING lines also go, or NULL */
void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Build the "FATAL" reason; the caller decides how to fail (setup_root undoes mounts first). */
void log_line(int prio, const char *line);
/* A hostile value made printable for one message line: at most 64 bytes, ? for the rest. */
const char *shown(const char *value, char buf[80]);

/* Read a whole regular file (no FIFOs, devices or directories; at most max bytes) into a fresh
 * NUL-terminated buffer. Returns 0, or an errno (EFBIG: too large; EINVAL: not regular). */
int read_file(const char *path, size_t max, char **data, size_t *len);
int write_file(const char *path, const void *data, size_t len, int mode);
int mkdir_p(const char *path, int mode);
int path_join(char *out, size_t size, const char *a, const char *b);
/* Absolute; only [A-Za-z0-9._/-]; no "..", "//" or trailing "/" (safe in mount options and JSON). */
int safe_path(const char *p);
int is_hex64(const char *s);
int is_keyid(const char *s);

/* -- configuration and command line (config.c) ------------------------------------------------ */
struct config {
    char trust[16], fsverity[16], etc[16], var[16], on_failure[16];
    char release[BSR_PATH_MAX];      /* on the physical root, e.g. /bootimg/release */
    char state[BSR_PATH_MAX];        /* on the physical root, e.g. /bootimg/state */
    char objects[BSR_PATH_MAX];      /* on the physical root; "" = RELEASE/objects */
};
/* Parse boot.conf text (KEY=value lines; unknown keys ignored). 0, or -1 with err set. */
int parse_conf(const char *text, size_t len, struct config *c, char *err, size_t errsize);

struct cmdline {
    int n_digest;                    /* composefs.digest= arguments seen */
    char digest_arg[80];             /* the (last) value, shown in errors; truncated */
    int digest_arg_long;             /* the value did not fit digest_arg */
    char release[BSR_PATH_MAX];      /* bootimg.release= (last), "" if none */
    int release_long;                /* bootimg.release= value too long */
};
int parse_cmdline(const char *text, size_t len, struct cmdline *c);
/* "v1-sha256-12:<64 hex>" -> hex; 0 or -1. */
int parse_digest_arg(const char *arg, char hex[65]);

/* -- release.json (json.c) ----------------------------------------------------------------------- */
struct release_info {
    char format[32];
    char kernel_argument[128];
    char root_digest[80];            /* root.digest if present, else "" */
    int n_kernel_argument;           /* how many root.kernel_argument members */
};
/* Strict JSON (RFC 8259, depth limit, no duplicate members where read). 0, or -1 with err. */
int parse_release(const char *text, size_t len, struct release_info *r, char *err, size_t errsize);

/* -- minisign (minisign.c) ----------------------------------------------------------------------- */
struct minisign_key { uint8_t keynum[8]; uint8_t pk[32]; };
struct minisign_sig {
    uint8_t alg[2]; uint8_t keynum[8]; uint8_t sig[64];
    const char *trusted; size_t trusted_len;     /* points into the signature text */
    uint8_t global_sig[64];
};
int b64_decode(const char *in, size_t inlen, uint8_t *out, size_t outsize, size_t *outlen);
int parse_pubkey(const char *text, size_t len, struct minisign_key *k, char *err, size_t errsize);
int parse_signature(const char *text, size_t len, struct minisign_sig *s, char *err, size_t errsize);
/* 0 when both signatures verify with k; -1 otherwise (err says which check failed). */
int minisign_verify(const struct minisign_key *k, const struct minisign_sig *s, const uint8_t *msg, size_t msglen,
                    char *err, size_t errsize);
void keyid_hex(const uint8_t keynum[8], char out[17]);

/* -- hashes (sha256.c, sha512.c) ------------------------------------------------------------------ */
typedef struct { uint32_t h[8]; uint64_t n; uint8_t buf[64]; size_t used; } sha256_ctx;
void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t len);
void sha256_final(sha256_ctx *c, uint8_t out[32]);
void sha256(const void *data, size_t len, uint8_t out[32]);
typedef struct { uint64_t h[8]; uint64_t n; uint8_t buf[128]; size_t used; } sha512_ctx;
void sha512_init(sha512_ctx *c);
void sha512_update(sha512_ctx *c, const void *data, size_t len);
void sha512_final(sha512_ctx *c, uint8_t out[64]);
/* Ed25519 (RFC 8032) verification: SHA-512 + Monocypher's check equation. 0 = valid. */
int ed25519_verify(const uint8_t sig[64], const uint8_t pk[32], const uint8_t *msg, size_t len);

/* -- fs-verity (verity.c) --------------------------------------------------------------------------- */
/* The file's fs-verity SHA-256 digest from the kernel: 0, or an errno (ENODATA: none; EOPNOTSUPP,
 * ENOTTY: no fs-verity here; EINVAL: another algorithm). */
int verity_measure(int fd, const char *path, uint8_t digest[32]);
/* Enable fs-verity (SHA-256, 4096-byte blocks): 0, or an errno (EEXIST: it has it already). */
int verity_enable(int fd, const char *path);
/* The same digest computed in user space from the file's contents: 0 or an errno. */
int verity_digest_fd(int fd, uint8_t digest[32]);
void hex_encode(const uint8_t *in, size_t n, char *out);
#ifdef BOOTIMG_TEST_HOOKS
void verity_test_setup(void);
#endif

/* -- mounts (mounts.c) ------------------------------------------------------------------------------- */
/* EROFS image, read-only: file-backed where the kernel can, else a read-only autoclear loop
 * (*via_loop says which, if not NULL). */
int mount_erofs(const char *image, const char *target, int *via_loop, char *err, size_t errsize);
/* A read-only overlay: lowers (":"-separated meaning), data-only layer, verity mode. */
int mount_overlay_ro(const char *source, const char *const *lowers, int nlowers, const char *datadir,
                     const char *verity, const char *target, char *err, size_t errsize);
int is_mountpoint(const char *path);
int is_readonly_mount(const char *path);

/* -- provisioning (provision.c) ------------------------------------------------------------------------ */
/* Enable fs-verity on every regular file of IMAGES_DIR and OBJECTS_DIR/xx; one summary line. 0 or 1. */
int provision(const char *images, const char *objects, const char *label);

/* -- subcommands -------------------------------------------------------------------------------------- */
int setup_root_main(void);
int mount_image_main(int argc, char **argv);
int provision_main(int argc, char **argv);

#endif
