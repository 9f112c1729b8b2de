/* Anti-rollback (UNECE R156): the device's minimum security version is the maximum of a TPM 2.0
 * NV counter (when the machine has a TPM and the index is defined) and the state file
 * /bootimg/state/rollback on the data partition (decimal; absent = 0). The root setup refuses a
 * release below it; `bless`, run after a good boot, raises both to the booted release's
 * security_version and never lowers them. Nothing else ever raises the minimum. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bsr.h"

int rollback_read_file(const char *path, const char *label, uint64_t *value, char *err, size_t errsize)
{
    char *text;
    size_t len;
    uint32_t v;
    *value = 0;
    int e = read_file(path, 32, &text, &len);
    if (e == ENOENT)
        return 0;
    if (e) {
        snprintf(err, errsize, "cannot read the state file %s: %s", label, e == EFBIG ? "larger than 32 bytes" : strerror(e));
        return -1;
    }
    if (len && text[len - 1] == '\n')
        text[--len] = 0;
    int ok = strlen(text) == len && parse_u32(text, &v) == 0;
    free(text);
    if (!ok) {
        snprintf(err, errsize, "the state file %s is malformed (expected a decimal number 0..4294967295)", label);
        return -1;
    }
    *value = v;
    return 0;
}

int rollback_minimum(const char *path, const char *label, uint32_t nv, struct rollback *rb, char *err,
                     size_t errsize)
{
    struct tpm t;
    memset(rb, 0, sizeof *rb);
    if (rollback_read_file(path, label, &rb->file_value, err, errsize) < 0)
        return -1;
    int r = tpm_open(&t, err, errsize);
    if (r < 0)
        return -1;
    if (r == 1) {
        rb->tpm = 1;
        r = tpm_counter_read(&t, nv, &rb->tpm_value, err, errsize);
        tpm_close(&t);
        if (r < 0)
            return -1;
        rb->tpm_defined = r == 0;
    }
    rb->from_tpm = rb->tpm_defined && rb->tpm_value >= rb->file_value;
    rb->minimum = rb->from_tpm ? rb->tpm_value : rb->file_value;
    return 0;
}

/* -- bless ------------------------------------------------------------------------------------------ */

static void __attribute__((noreturn, format(printf, 1, 2))) bless_failed(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_prefixed(-1, "bootimg: bless failed: ", fmt, ap);
    va_end(ap);
    exit(1);
}

/* The state file: the old value or the new one, never neither. */
static int write_value(const char *path, uint32_t v)
{
    char text[16];
    int n = snprintf(text, sizeof text, "%u\n", v);
    return write_file_atomically(path, text, (size_t)n, 0644);
}

int bless_main(int argc, char **argv)
{
    const char *run = PARAM("BOOTIMG_RUN", "/run/bootimg");
    const char *root = PARAM("BOOTIMG_TEST_ROOT", "");    /* the root after switch-root: "/" */
    char err[512], sb[80], file[BSR_PATH_MAX], sysroot[BSR_PATH_MAX];
    struct booted_info b;
    uint32_t nv;
    if (argc != 1)
        bless_failed("usage: bootimg-setup-root bless");
    if (read_booted(run, &b, err, sizeof err) < 0)
        bless_failed("%s", err);
    if (!b.has_security_version || !b.rollback_file[0] || !b.rollback_nv[0])
        bless_failed("%s/booted.json has no security_version, rollback_file or rollback_nv", run);
    if (!safe_path(b.rollback_file) || strncmp(b.rollback_file, "/sysroot/", 9) != 0)
        bless_failed("%s/booted.json: unsafe rollback_file '%s'", run, shown(b.rollback_file, sb));
    if (parse_nv_index(b.rollback_nv, &nv) < 0)
        bless_failed("%s/booted.json: rollback_nv '%s' is not an NV index", run, shown(b.rollback_nv, sb));
    if (snprintf(file, sizeof file, "%s%s", root, b.rollback_file) >= (int)sizeof file
        || snprintf(sysroot, sizeof sysroot, "%s/sysroot", root) >= (int)sizeof sysroot)
        bless_failed("path too long");
    uint32_t target = b.security_version;
    char what[600];
    int n = 0;

    /* the state file */
    uint64_t before, after;
    if (rollback_read_file(file, b.rollback_file, &before, err, sizeof err) < 0)
        bless_failed("%s", err);
    after = before;
    if (before < target) {
        int back_to_ro = is_readonly_mount(sysroot);
        if (back_to_ro && remount(sysroot, 0) < 0)
            bless_failed("cannot remount %s read-write: %s", sysroot, strerror(errno));
        int e = write_value(file, target);
        if (back_to_ro && remount(sysroot, 1) < 0)
            note("cannot remount %s read-only: %s", sysroot, strerror(errno));
        if (e)
            bless_failed("cannot write the state file %s: %s", b.rollback_file, strerror(e));
        after = target;
    }
    n += snprintf(what + n, sizeof what - (size_t)n, "state file %s %llu -> %llu", b.rollback_file,
                  (unsigned long long)before, (unsigned long long)after);

    /* the TPM's counter */
    struct tpm t;
    int r = tpm_open(&t, err, sizeof err);
    if (r < 0)
        bless_failed("%s", err);
    if (r == 0) {
        snprintf(what + n, sizeof what - (size_t)n, ", no TPM");
    } else {
        int defined;
        r = tpm_counter_raise(&t, nv, target, &before, &after, &defined, err, sizeof err);
        tpm_close(&t);
        if (r < 0)
            bless_failed("%s", err);
        if (after > target)
            bless_failed("TPM NV counter 0x%08x is at %llu, above the booted release's security_version %u "
                         "(a new counter starts at the TPM's highest count): releases below %llu will be refused",
                         nv, (unsigned long long)after, target, (unsigned long long)after);
        snprintf(what + n, sizeof what - (size_t)n, ", TPM NV 0x%08x %llu -> %llu%s", nv, (unsigned long long)before,
                 (unsigned long long)after, defined ? " (defined now)" : "");
    }
    note("bless: rollback minimum %u (release %s): %s", target, b.version[0] ? shown(b.version, sb) : "?", what);
    return 0;
}
