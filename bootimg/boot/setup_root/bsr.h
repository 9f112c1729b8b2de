/* bootimg-setup-root: shared declarations (see setup_root.c for what the program does). */
#ifndef BSR_H
#define BSR_H

#include <stdarg.h>
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
/* PREFIX + the formatted message as one log_line. */
void log_prefixed(int prio, const char *prefix, const char *fmt, va_list ap);
/* A hostile value made printable for one message line: at most 64 bytes, ? for the rest. */
const char *shown(const char *value, char buf[80]);

/* Read a whole regular file (no FIFOs, devices or directories; at most max bytes) into a fresh
 * NUL-terminated buffer. Returns 0, or an errno (EFBIG: too large; EINVAL: not regular). */
int read_file(const char *path, size_t max, char **data, size_t *len);
int write_file(const char *path, const void *data, size_t len, int mode);
/* temp + fsync + rename + fsync of the directory (made if missing): the old content or the new
 * one, never neither. 0 or an errno. */
int write_file_atomically(const char *path, const void *data, size_t len, int mode);
int mkdir_p(const char *path, int mode);
int path_join(char *out, size_t size, const char *a, const char *b);
/* Absolute; only [A-Za-z0-9._/-]; no "..", "//" or trailing "/" (safe in mount options and JSON). */
int safe_path(const char *p);
int is_hex64(const char *s);
int is_keyid(const char *s);
/* Canonical decimal 0..4294967295 (no sign, no leading zeros): 0, or -1. */
int parse_u32(const char *s, uint32_t *v);
/* fsync a file's or directory's contents: 0 or an errno. */
int fsync_path(const char *path, int directory);
#ifdef BOOTIMG_TEST_HOOKS
/* Test builds: a value from the environment, else the default (release builds read no environment). */
const char *test_param(const char *name, const char *def);
#define PARAM(name, def) test_param(name, def)
#else
#define PARAM(name, def) (def)
#endif

/* -- configuration and command line (config.c) ------------------------------------------------ */
#define ROLLBACK_NV_DEFAULT 0x01500016u
struct config {
    char trust[16], fsverity[16], etc[16], var[16], on_failure[16];
    char release[BSR_PATH_MAX];      /* on the physical root, e.g. /bootimg/release */
    char releases[BSR_PATH_MAX];     /* "" = the single-release layout; else e.g. /bootimg/releases */
    char state[BSR_PATH_MAX];        /* on the physical root, e.g. /bootimg/state */
    char objects[BSR_PATH_MAX];      /* on the physical root; "" = RELEASE/objects */
    char rollback_nv[16];            /* "" = ROLLBACK_NV_DEFAULT */
};
/* Parse boot.conf text (KEY=value lines; unknown keys ignored). 0, or -1 with err set. */
int parse_conf(const char *text, size_t len, struct config *c, char *err, size_t errsize);

struct cmdline {
    int n_digest;                    /* composefs.digest= arguments seen */
    char digest_arg[80];             /* the (last) value, shown in errors; truncated */
    int digest_arg_long;             /* the value did not fit digest_arg */
    char release[BSR_PATH_MAX];      /* bootimg.release= (last), "" if none */
    int release_long;                /* bootimg.release= value too long */
    int n_secver;                    /* bootimg.security_version= arguments seen */
    char secver[16];                 /* the (last) value; "" if too long */
};
int parse_cmdline(const char *text, size_t len, struct cmdline *c);
/* Is release (a path) a direct child of the releases directory, not hidden (".name")? */
int release_in(const char *releases, const char *release);
/* An NV index handle "0x01XXXXXX" (TPM_HT_NV_INDEX): 0, or -1. */
int parse_nv_index(const char *s, uint32_t *index);
/* "v1-sha256-12:<64 hex>" -> hex; 0 or -1. */
int parse_digest_arg(const char *arg, char hex[65]);

/* -- JSON: release.json and booted.json (json.c) -------------------------------------------------- */
enum { JSON_STRING = 1, JSON_U32, JSON_OBJECT };
struct json_field {
    const char *parent;              /* NULL: a member of the top-level object; else a JSON_OBJECT field's name */
    const char *name;
    int type;
    int multi;                       /* repeated members are counted (the caller decides), else refused */
    char *str;                       /* JSON_STRING: the decoded value ("" when it does not fit size) */
    size_t size;
    uint32_t *num;                   /* JSON_U32: an integer 0..4294967295 */
    int count;                       /* how many times the member was seen */
};
/* Strict JSON (RFC 8259, UTF-8, depth limit) of one object; the members named in f are extracted
 * (each of its type, no duplicates unless multi). 0, or -1 with err. */
int json_extract(const char *text, size_t len, struct json_field *f, int nf, char *err, size_t errsize);

struct release_info {
    char format[32];
    char version[64];                /* "" if absent or too long */
    char kernel_argument[128];
    char root_digest[80];            /* root.digest if present, else "" */
    int n_kernel_argument;           /* how many root.kernel_argument members */
    uint32_t security_version;       /* 0 if absent */
    int has_security_version;
};
int parse_release(const char *text, size_t len, struct release_info *r, char *err, size_t errsize);

/* What bless and mount-image read from /run/bootimg/booted.json (paths as seen after switch-root). */
struct booted_info {
    char release_dir[BSR_PATH_MAX], objects[BSR_PATH_MAX], rollback_file[BSR_PATH_MAX], rollback_nv[16];
    char version[64];
    uint32_t security_version;
    int has_security_version;
};
/* Read and parse RUN/booted.json: 0, or -1 with err. */
int read_booted(const char *run, struct booted_info *b, char *err, size_t errsize);

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
/* Remount read-only or read-write, keeping the mount's other flags. 0 or -1 (errno). */
int remount(const char *path, int readonly);

/* -- provisioning (provision.c) ------------------------------------------------------------------------ */
/* Enable fs-verity on every regular file of each IMAGES dir and of OBJECTS_DIR/xx; one summary line. 0 or 1. */
int provision(const char *const *images, int nimages, const char *objects, const char *label);

/* -- TPM 2.0 NV counter (tpm.c) ------------------------------------------------------------------------- */
#define TPM_MAX_RESPONSE 4096
enum { TPM_NV_READ_PUBLIC, TPM_NV_READ, TPM_NV_INCREMENT, TPM_NV_DEFINE_SPACE };
/* The command bytes (at most 64) of one of the above for an NV index. */
size_t tpm_command(int which, uint32_t index, uint8_t out[64]);
/* Unmarshal a response to `which` for index: 0 (TPM_RC_SUCCESS; for NV_ReadPublic *attributes and
 * *size, for NV_Read *value), 1 (the TPM answered with an error: *rc), -1 (malformed: err). */
int tpm_response(int which, uint32_t index, const uint8_t *r, size_t n, uint32_t *rc, uint32_t *attributes,
                 uint16_t *size, uint64_t *value, char *err, size_t errsize);
struct tpm { int fd; char path[BSR_PATH_MAX]; };
/* 1 opened, 0 no TPM on this machine, -1 error (err). */
int tpm_open(struct tpm *t, char *err, size_t errsize);
void tpm_close(struct tpm *t);
/* The counter: 0 (*value; 0 when never incremented), 1 (the index is not defined), -1 (err). */
int tpm_counter_read(struct tpm *t, uint32_t index, uint64_t *value, char *err, size_t errsize);
/* Raise the counter to at least target, defining it when missing: 0 (*before: 0 when it was
 * undefined or never incremented; *after; *defined: it was defined now), or -1 (err). */
int tpm_counter_raise(struct tpm *t, uint32_t index, uint64_t target, uint64_t *before, uint64_t *after,
                      int *defined, char *err, size_t errsize);

/* -- anti-rollback (rollback.c) -------------------------------------------------------------------------- */
struct rollback {
    int tpm;                         /* a TPM is present */
    int tpm_defined;                 /* the NV index exists */
    uint64_t tpm_value, file_value, minimum;
    int from_tpm;                    /* the minimum is the TPM's (else the state file's) */
};
/* The device's minimum: max(TPM NV counter, the state file at path, named label in messages).
 * 0, or -1 with err. */
int rollback_minimum(const char *path, const char *label, uint32_t nv, struct rollback *rb, char *err,
                     size_t errsize);
/* The state file's value: 0 (absent = 0), or -1 with err. */
int rollback_read_file(const char *path, const char *label, uint64_t *value, char *err, size_t errsize);

/* -- subcommands -------------------------------------------------------------------------------------- */
int setup_root_main(void);
int mount_image_main(int argc, char **argv);
int provision_main(int argc, char **argv);
int bless_main(int argc, char **argv);

#endif
