/* The root setup (run by bootimg-root.service in the initramfs; docs/boot-design.md steps 1-8):
 * find the release (bootimg.release=, a direct child of BOOTIMG_RELEASES when several releases
 * share one object store), authenticate the root digest (signed release.json or sealed
 * composefs.digest=), refuse a release below the device's rollback minimum, check the root
 * image's fs-verity digest, mount EROFS + the composefs overlay with verity=require at /sysroot,
 * apply the /etc and /var policy, keep the physical root at /sysroot/sysroot, write
 * /run/bootimg/booted.json.
 *
 * Fail closed: every failure prints ONE line "bootimg: FATAL: <reason>" (stderr and /dev/kmsg),
 * undoes every mount this run made (the physical root goes back to /sysroot) and exits 1.
 * SIGTERM, SIGINT and SIGHUP are held back and end the run the same way at the next step. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "bsr.h"

static const char *SYSROOT, *RUN;
static const char *step = "start";
static char mounted[8][BSR_PATH_MAX];    /* mount points this run made, in order */
static int nmounted;
static char phys[BSR_PATH_MAX];          /* where the physical root is, once moved */
static char run_phys[BSR_PATH_MAX];
static int remounted_rw;
static sigset_t held;

static void undo(void)
{
    /* Put things back as sysroot.mount left them: the physical root at SYSROOT, nothing else. */
    if (phys[0] && strcmp(phys, run_phys) != 0 && mount(phys, run_phys, NULL, MS_MOVE, NULL) == 0)
        snprintf(phys, sizeof phys, "%s", run_phys);
    while (nmounted > 0) {
        const char *m = mounted[--nmounted];
        if (umount2(m, 0) < 0 && umount2(m, MNT_DETACH) < 0)
            note("cannot unmount %s: %s", m, strerror(errno));
    }
    if (phys[0]) {
        if (mount(phys, SYSROOT, NULL, MS_MOVE, NULL) < 0)
            note("cannot move the physical root back to %s: %s", SYSROOT, strerror(errno));
        phys[0] = 0;
    }
    if (remounted_rw) {
        remount(SYSROOT, 1);
        remounted_rw = 0;
    }
}

static void __attribute__((noreturn, format(printf, 1, 2))) fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_prefixed(2, "bootimg: FATAL: ", fmt, ap);
    va_end(ap);
    undo();
    exit(1);
}

/* A held-back signal ends the run here, failing closed like any other failure. */
static void checkpoint(void)
{
    sigset_t pending;
    if (sigpending(&pending) == 0)
        for (int s = 1; s < 32; s++)
            if (sigismember(&held, s) && sigismember(&pending, s))
                fatal("interrupted by signal %d (%s) in step %s", s, strsignal(s), step);
}

static void pushed(const char *m)
{
    snprintf(mounted[nmounted++], BSR_PATH_MAX, "%s", m);
}

static void join(char *out, const char *a, const char *b)
{
    if (path_join(out, BSR_PATH_MAX, a, b) < 0)
        fatal("path too long: %s%s", a, b);
}

static int is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static int pub_filter(const struct dirent *d)
{
    size_t n = strlen(d->d_name);
    char id[17];
    if (n != 20 || strcmp(d->d_name + 16, ".pub") != 0)
        return 0;                          /* keys are installed as KEYID.pub */
    memcpy(id, d->d_name, 16);
    id[16] = 0;
    return is_keyid(id);
}

/* Step 3, signed: the release.json that a trusted key signed (both signatures), its digest. */
static void authenticate_signed(const char *rel, const char *release, const char *keys_dir, char keyid[17],
                                char digest[65], const char *cmd_hex, struct release_info *info)
{
    char p[BSR_PATH_MAX], err[256], sb[80];
    char *json, *sigtext;
    size_t json_len, sig_len;
    join(p, rel, "/release.json");
    if (!is_file(p))
        fatal("release %s has no release.json", release);
    int e = read_file(p, MAX_RELEASE, &json, &json_len);
    if (e)
        fatal("cannot read release.json of %s: %s", release, e == EFBIG ? "larger than 1 MiB" : strerror(e));
    join(p, rel, "/release.json.minisig");
    if (!is_file(p))
        fatal("release %s is not signed (no release.json.minisig)", release);
    e = read_file(p, MAX_SIG, &sigtext, &sig_len);
    if (e)
        fatal("cannot read release.json.minisig of %s: %s", release, e == EFBIG ? "larger than 16 KiB" : strerror(e));
    /* Private copies of what is checked, for the record (what is parsed is what was verified). */
    char c1[BSR_PATH_MAX], c2[BSR_PATH_MAX];
    join(c1, RUN, "/release.json");
    join(c2, RUN, "/release.json.minisig");
    if (write_file(c1, json, json_len, 0644) || write_file(c2, sigtext, sig_len, 0644))
        fatal("cannot copy release.json and its signature to %s", RUN);

    struct dirent **names = NULL;
    int nkeys = scandir(keys_dir, &names, pub_filter, alphasort);
    if (nkeys <= 0)
        fatal("no trusted keys in %s", keys_dir);
    struct minisign_sig sig;
    if (parse_signature(sigtext, sig_len, &sig, err, sizeof err) < 0)
        fatal("release.json.minisig of %s: %s", release, err);
    int tried = 0;
    keyid[0] = 0;
    for (int i = 0; i < nkeys && i < MAX_KEYS; i++) {
        char kp[BSR_PATH_MAX], *ktext;
        size_t klen;
        struct minisign_key key;
        if (snprintf(kp, sizeof kp, "%s/%s", keys_dir, names[i]->d_name) >= (int)sizeof kp)
            fatal("path too long: %s", keys_dir);
        if (!is_file(kp))
            continue;
        tried++;
        if ((e = read_file(kp, MAX_KEY, &ktext, &klen)) != 0) {
            note("trusted key %s: %s", names[i]->d_name, strerror(e));
            continue;
        }
        int ok = parse_pubkey(ktext, klen, &key, err, sizeof err);
        free(ktext);
        if (ok < 0) {
            note("trusted key %s: %s", names[i]->d_name, err);
            continue;
        }
        char id[17];
        keyid_hex(key.keynum, id);
        if (memcmp(id, names[i]->d_name, 16) != 0) {
            note("trusted key %s: its key id is %s", names[i]->d_name, id);
            continue;
        }
        if (minisign_verify(&key, &sig, (const uint8_t *)json, json_len, err, sizeof err) == 0) {
            memcpy(keyid, id, 17);
            break;
        }
    }
    for (int i = 0; i < nkeys; i++)
        free(names[i]);
    free(names);
    if (tried == 0)
        fatal("no trusted keys in %s", keys_dir);
    if (!keyid[0])
        fatal("release.json of %s is not signed by a trusted key (%d tried)", release, tried);

    if (parse_release(json, json_len, info, err, sizeof err) < 0)
        fatal("signed release.json is not valid JSON: %s", err);
    if (strcmp(info->format, "bootimg-release/1") != 0)
        fatal("signed release.json is not a bootimg-release/1 description");
    if (info->n_kernel_argument != 1)
        fatal("signed release.json has %d root kernel arguments, expected 1", info->n_kernel_argument);
    if (strncmp(info->kernel_argument, "composefs.digest=", 17) != 0 || parse_digest_arg(info->kernel_argument + 17, digest) < 0)
        fatal("signed release.json has no valid root digest (composefs.digest=v1-sha256-12:<hex>): '%s'",
              shown(info->kernel_argument, sb));
    if (info->root_digest[0] && strcmp(info->root_digest, digest) != 0)
        fatal("signed release.json: root.digest disagrees with root.kernel_argument");
    if (cmd_hex[0] && strcmp(cmd_hex, digest) != 0)
        fatal("composefs.digest= on the kernel command line disagrees with the signed release.json");
    free(json);
    free(sigtext);
}

static int visible(const struct dirent *d)
{
    return d->d_name[0] != '.';
}

/* The images/ directories of every release under dir (provisioning covers them all). */
static int release_images(const char *dir, char ***out)
{
    struct dirent **names = NULL;
    int n = scandir(dir, &names, visible, alphasort), k = 0;
    char p[BSR_PATH_MAX];
    *out = n > 0 ? calloc((size_t)n, sizeof **out) : NULL;
    for (int i = 0; i < n; i++) {
        if (*out && snprintf(p, sizeof p, "%s/%s/images", dir, names[i]->d_name) < (int)sizeof p && is_dir(p))
            (*out)[k++] = strdup(p);
        free(names[i]);
    }
    free(names);
    if (n < 0 || (n > 0 && !*out))
        fatal("cannot list the releases in %s: %s", dir, strerror(n < 0 ? errno : ENOMEM));
    for (int i = 0; i < k; i++)
        if (!(*out)[i])
            fatal("out of memory");
    return k;
}

/* A version for messages and booted.json: the signed one when it is a plain word, else the
 * release directory's name. */
static const char *release_version(const struct release_info *info, const char *release)
{
    const char *v = info->version;
    size_t n = strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+~-");
    return n && !v[n] ? v : strrchr(release, '/') + 1;
}

/* The root is an overlay, backed by no block device: systemd's gpt-auto generator finds the
 * boot disk (and mounts its ESP at /efi, where bless and `bootimg install` need it) through
 * /run/systemd/volatile-root, the link systemd-volatile-root, ostree-prepare-root and
 * composefs-setup-root make to the device of the physical root. Not fatal: the root is verified
 * either way. */
static void volatile_root(const char *phys)
{
    const char *link = PARAM("BOOTIMG_VOLATILE_ROOT", "/run/systemd/volatile-root");
    struct stat st;
    char dev[64], dir[BSR_PATH_MAX];
    if (stat(phys, &st) < 0 || major(st.st_dev) == 0)
        return;                                   /* not on a block device (tmpfs, tests) */
    snprintf(dev, sizeof dev, "/dev/block/%u:%u", major(st.st_dev), minor(st.st_dev));
    snprintf(dir, sizeof dir, "%s", link);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir)
        *slash = 0;
    if (mkdir_p(dir, 0755) != 0 || (symlink(dev, link) < 0 && errno != EEXIST))
        warn("cannot link %s to %s (the ESP will not be mounted at /efi): %s", link, dev, strerror(errno));
}

/* 32 lowercase hex digits and a newline: what systemd writes to /etc/machine-id. */
static int valid_machine_id(const char *s, size_t n)
{
    if (n != 33 || s[32] != '\n')
        return 0;
    for (int i = 0; i < 32; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

/* One machine ID per device: with a transient /etc and a persistent /var, an image without its
 * own /etc/machine-id would get a new random one at every boot, and journald would file every
 * boot's journal under a new /var/log/journal/ID (earlier boots out of journalctl's sight, and
 * never vacuumed). The ID is kept in STATE/machine-id on the data partition, made on the first
 * boot (random, a version 4 UUID as systemd makes them) and written into the transient /etc. */
static void persist_machine_id(const char *phys, const char *state, const char *sys_etc)
{
    char etc_id[BSR_PATH_MAX], kept[BSR_PATH_MAX], *data = NULL;
    size_t n = 0;
    join(etc_id, sys_etc, "/machine-id");
    if (read_file(etc_id, 64, &data, &n) == 0) {
        int own = valid_machine_id(data, n);
        free(data);
        if (own)
            return;                               /* the image brings its own */
    }
    if (snprintf(kept, sizeof kept, "%s%s/machine-id", phys, state) >= (int)sizeof kept)
        return;
    char id[33];
    data = NULL;
    if (read_file(kept, 64, &data, &n) == 0 && valid_machine_id(data, n)) {
        memcpy(id, data, 33);
    } else {
        unsigned char r[16];
        int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (fd < 0 || read(fd, r, sizeof r) != (ssize_t)sizeof r) {
            if (fd >= 0)
                close(fd);
            free(data);
            warn("cannot make a machine ID: no random bytes");
            return;
        }
        close(fd);
        r[6] = (r[6] & 0x0f) | 0x40;             /* version 4 */
        r[8] = (r[8] & 0x3f) | 0x80;             /* RFC 4122 variant */
        for (int i = 0; i < 16; i++)
            snprintf(id + 2 * i, 3, "%02x", r[i]);
        id[32] = '\n';
        int e = write_file_atomically(kept, id, 33, 0444);
        if (e)
            warn("cannot keep the machine ID in %s: %s", kept, strerror(e));
        else
            note("machine ID made for this device, kept in %s/machine-id", state);
    }
    free(data);
    unlink(etc_id);
    int e = write_file(etc_id, id, 33, 0444);
    if (e)
        warn("cannot write %s: %s", etc_id, strerror(e));
}

static double ms_since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) * 1e3 + (double)(t.tv_nsec - t0->tv_nsec) / 1e6;
}

int setup_root_main(void)
{
    struct timespec t_start, t_rb;
    clock_gettime(CLOCK_MONOTONIC, &t_start);
    const char *conf_path = PARAM("BOOTIMG_CONF", "/etc/bootimg/boot.conf");
    const char *cmdline_path = PARAM("BOOTIMG_CMDLINE", "/proc/cmdline");
    const char *keys_dir = PARAM("BOOTIMG_KEYS_DIR", "/etc/bootimg/keys");
    SYSROOT = PARAM("BOOTIMG_SYSROOT", "/sysroot");
    RUN = PARAM("BOOTIMG_RUN", "/run/bootimg");
    bsr_kmsg = PARAM("BOOTIMG_KMSG", "/dev/kmsg");
    char sb[80], err[256], p[BSR_PATH_MAX];
    int e;

    umask(022);
    sigemptyset(&held);
    sigaddset(&held, SIGTERM);
    sigaddset(&held, SIGINT);
    sigaddset(&held, SIGHUP);
    sigprocmask(SIG_BLOCK, &held, NULL);

    /* -- configuration */
    step = "configuration";
    if (!safe_path(SYSROOT))
        fatal("unsafe path '%s'", shown(SYSROOT, sb));
    if (!safe_path(RUN))
        fatal("unsafe path '%s'", shown(RUN, sb));
    join(run_phys, RUN, "/phys");
    join(p, RUN, "/booted.json");
    unlink(p);                  /* a record of an earlier run must not outlive a failing one */
    struct config cf;
    char *text;
    size_t len;
    e = read_file(conf_path, MAX_CONF, &text, &len);
    if (e == ENOENT)
        fatal("configuration %s is missing", conf_path);
    if (e)
        fatal("cannot read configuration %s: %s", conf_path, e == EFBIG ? "larger than 64 KiB" : strerror(e));
    if (parse_conf(text, len, &cf, err, sizeof err) < 0)
        fatal("%s: %s", conf_path, err);
    free(text);
#define ONE_OF(field, key, a, b) \
    if (strcmp(cf.field, a) != 0 && strcmp(cf.field, b) != 0) \
        fatal("%s: " key " is '%s', not " a " or " b, conf_path, shown(cf.field, sb))
    ONE_OF(trust, "BOOTIMG_TRUST", "signed", "sealed");
    ONE_OF(fsverity, "BOOTIMG_FSVERITY", "required", "optional");
    ONE_OF(etc, "BOOTIMG_ETC", "transient", "readonly");
    ONE_OF(var, "BOOTIMG_VAR", "persistent", "transient");
    ONE_OF(on_failure, "BOOTIMG_ON_FAILURE", "reboot", "emergency");
#undef ONE_OF
    if (!cf.release[0])
        snprintf(cf.release, sizeof cf.release, "/bootimg/release");
    if (!cf.state[0])
        snprintf(cf.state, sizeof cf.state, "/bootimg/state");
    if (!safe_path(cf.state))
        fatal("%s: unsafe BOOTIMG_STATE '%s'", conf_path, shown(cf.state, sb));
    if (cf.objects[0] && !safe_path(cf.objects))
        fatal("%s: unsafe BOOTIMG_OBJECTS '%s'", conf_path, shown(cf.objects, sb));
    if (cf.releases[0] && !safe_path(cf.releases))
        fatal("%s: unsafe BOOTIMG_RELEASES '%s'", conf_path, shown(cf.releases, sb));
    uint32_t nv = ROLLBACK_NV_DEFAULT;
    if (cf.rollback_nv[0] && parse_nv_index(cf.rollback_nv, &nv) < 0)
        fatal("%s: BOOTIMG_ROLLBACK_NV '%s' is not an NV index (0x01xxxxxx)", conf_path, shown(cf.rollback_nv, sb));
    int signed_trust = strcmp(cf.trust, "signed") == 0, required = strcmp(cf.fsverity, "required") == 0;

    /* -- kernel command line */
    step = "kernel command line";
    struct cmdline cl;
    e = read_file(cmdline_path, MAX_CMDLINE, &text, &len);
    if (e)
        fatal("cannot read %s: %s", cmdline_path, e == EFBIG ? "larger than 64 KiB" : strerror(e));
    if (parse_cmdline(text, len, &cl) < 0)
        fatal("%s contains a NUL byte", cmdline_path);
    free(text);
    char cmd_hex[65] = "";
    if (cl.n_digest > 1)
        fatal("composefs.digest= is given %d times on the kernel command line", cl.n_digest);
    if (cl.n_digest == 1 && (cl.digest_arg_long || parse_digest_arg(cl.digest_arg, cmd_hex) < 0))
        fatal("malformed kernel argument composefs.digest=%s (expected v1-sha256-12:<64 hex digits>)",
              shown(cl.digest_arg, sb));
    uint32_t cmd_secver = 0;
    if (cl.n_secver > 1)
        fatal("bootimg.security_version= is given %d times on the kernel command line", cl.n_secver);
    if (cl.n_secver == 1 && parse_u32(cl.secver, &cmd_secver) < 0)
        fatal("malformed kernel argument bootimg.security_version=%s (expected a decimal number 0..4294967295)",
              shown(cl.secver, sb));
    if (cl.release_long)
        fatal("unsafe release path (bootimg.release= is too long)");
    if (cl.release[0])
        snprintf(cf.release, sizeof cf.release, "%s", cl.release);
    else if (cf.releases[0])
        fatal("no bootimg.release= on the kernel command line (which release of %s to boot)", cf.releases);
    checkpoint();

    /* -- 1. find the release directory on the physical root */
    step = "1 (find the release)";
    const char *release = cf.release;
    if (!safe_path(release))
        fatal("unsafe release path '%s'", shown(release, sb));
    if (cf.releases[0] && !release_in(cf.releases, release))
        fatal("bootimg.release=%s is not a release of %s", release, cf.releases);
    char rel[BSR_PATH_MAX], image[BSR_PATH_MAX], objects_rel[BSR_PATH_MAX], objects[BSR_PATH_MAX];
    join(rel, SYSROOT, release);
    join(image, rel, "/images/root.cfs");
    if (cf.objects[0])
        join(objects_rel, cf.objects, "");
    else
        join(objects_rel, release, "/objects");
    join(objects, SYSROOT, objects_rel);
    if (!is_dir(rel))
        fatal("no release directory %s on the root partition", release);
    if (!is_file(image))
        fatal("release %s has no root image images/root.cfs", release);
    if (!is_dir(objects)) {
        if (cf.objects[0])
            fatal("no object store %s on the root partition", cf.objects);
        fatal("release %s has no objects/ directory", release);
    }

    /* -- 2. provision fs-verity once (the first boot of a freshly written partition; on a
     * production ECU the updater does it when it installs a release) */
    step = "2 (provision fs-verity)";
    char marker[BSR_PATH_MAX], state[BSR_PATH_MAX];
    join(state, SYSROOT, cf.state);
    join(marker, state, "/.provisioned");
    int provisioned = 1, provisioned_now = 0;
    struct stat st;
    if (lstat(marker, &st) < 0) {
        int back_to_ro = 0;
        if (is_readonly_mount(SYSROOT)) {
            if (remount(SYSROOT, 0) < 0)
                fatal("cannot remount the physical root read-write for provisioning: %s", strerror(errno));
            remounted_rw = back_to_ro = 1;
        }
        char images[BSR_PATH_MAX], all[BSR_PATH_MAX], **dirs = NULL;
        const char *one[1] = {images};
        int ndirs = 1;
        join(images, rel, "/images");
        if (cf.releases[0]) {
            note("provisioning: enabling fs-verity on the releases in %s and the object store (first boot)",
                 cf.releases);
            join(all, SYSROOT, cf.releases);
            ndirs = release_images(all, &dirs);
        } else {
            note("provisioning: enabling fs-verity on release %s (first boot)", release);
        }
        int res = provision(dirs ? (const char *const *)dirs : one, ndirs, objects, cf.releases[0] ? all : rel);
        for (int i = 0; dirs && i < ndirs; i++)
            free(dirs[i]);
        free(dirs);
        if (res == 0) {
            if (mkdir_p(state, 0755) || write_file(marker, "", 0, 0644))
                fatal("cannot create %s/.provisioned on the root partition", cf.state);
            provisioned_now = 1;
        } else {
            if (required)
                fatal("cannot enable fs-verity on release %s (provisioning failed)", release);
            provisioned = 0;
            warn("fs-verity could not be enabled on release %s (fsverity: optional, development only)", release);
        }
        if (back_to_ro) {
            if (remount(SYSROOT, 1) < 0)
                note("cannot remount the physical root read-only: %s", strerror(errno));
            remounted_rw = 0;
        }
        checkpoint();
    }
    int var_persistent = strcmp(cf.var, "persistent") == 0;
    if (var_persistent && is_readonly_mount(SYSROOT)) {
        note("remounting the physical root read-write for the persistent /var");
        if (remount(SYSROOT, 0) < 0)
            fatal("cannot remount the physical root read-write for /var: %s", strerror(errno));
        remounted_rw = 1;
    }

    /* -- 3. authenticate the expected root digest */
    step = "3 (authenticate the root digest)";
    if ((e = mkdir_p(RUN, 0755)) != 0)
        fatal("cannot create %s: %s", RUN, strerror(e));
    char keyid[17] = "", digest[65];
    struct release_info info;
    memset(&info, 0, sizeof info);
    if (signed_trust) {
        authenticate_signed(rel, release, keys_dir, keyid, digest, cmd_hex, &info);
    } else {
        if (!cmd_hex[0])
            fatal("no composefs.digest= on the kernel command line (trust profile sealed)");
        memcpy(digest, cmd_hex, 65);
    }
    checkpoint();

    /* -- 3b. anti-rollback: the release's security version against the device's minimum */
    step = "3b (anti-rollback)";
    uint32_t secver = signed_trust ? info.security_version : cmd_secver;
    const char *version = release_version(&info, release);
    if (signed_trust && cl.n_secver && cmd_secver != secver)
        fatal("bootimg.security_version=%u on the kernel command line disagrees with the signed release.json (%u)",
              cmd_secver, secver);
    char rb_file[BSR_PATH_MAX], rb_label[BSR_PATH_MAX];
    struct rollback rb;
    join(rb_label, cf.state, "/rollback");
    join(rb_file, SYSROOT, rb_label);
    clock_gettime(CLOCK_MONOTONIC, &t_rb);
    if (rollback_minimum(rb_file, rb_label, nv, &rb, err, sizeof err) < 0)
        fatal("cannot read this device's rollback minimum: %s", err);
    double rb_ms = ms_since(&t_rb);
    if (secver < rb.minimum) {
        char store[BSR_PATH_MAX + 32];
        if (rb.from_tpm)
            snprintf(store, sizeof store, "TPM NV 0x%08x", nv);
        else
            snprintf(store, sizeof store, "state file %s", rb_label);
        fatal("release %s has security_version %u, below this device's minimum %llu (%s)", version, secver,
              (unsigned long long)rb.minimum, store);
    }
    checkpoint();

    /* -- 4. the root image must have that fs-verity digest */
    step = "4 (measure the root image)";
    const char *verity = "require";
    uint8_t got[32];
    char got_hex[65];
    int fd = open(image, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0)
        fatal("cannot open root image %s/images/root.cfs: %s", release, strerror(errno));
    if ((e = verity_measure(fd, image, got)) == 0) {
        hex_encode(got, 32, got_hex);
        if (strcmp(got_hex, digest) != 0)
            fatal("root image %s/images/root.cfs has fs-verity digest 'sha256:%s', expected sha256:%s", release,
                  got_hex, digest);
        if (!provisioned)
            verity = NULL;
    } else {
        if (required)
            fatal("root image %s/images/root.cfs has no fs-verity: %s", release, strerror(e));
        /* Development only: the kernel or filesystem lacks fs-verity. The image itself is still
         * authenticated (digest computed in user space); the files it points at are not. */
        if ((e = verity_digest_fd(fd, got)) != 0)
            fatal("cannot compute the digest of root image %s/images/root.cfs: %s", release, strerror(e));
        hex_encode(got, 32, got_hex);
        if (strcmp(got_hex, digest) != 0)
            fatal("root image %s/images/root.cfs has digest 'sha256:%s', expected sha256:%s", release, got_hex,
                  digest);
        verity = NULL;
    }
    checkpoint();
    if (!verity) {
        warn("****************************************************************************");
        warn("fs-verity is NOT available: mounting the root WITHOUT verity=require.");
        warn("File contents are NOT verified at runtime (fsverity: optional, development only).");
        warn("****************************************************************************");
    }

    /* -- 5. the image, the physical root aside, the composefs overlay at SYSROOT */
    step = "5 (mount the root)";
    char meta[BSR_PATH_MAX];
    join(meta, RUN, "/meta");
    if (mkdir_p(meta, 0755) || mkdir_p(run_phys, 0755))
        fatal("cannot create mount points under %s", RUN);
    /* A mount under a shared parent cannot be moved; systemd makes the real root shared again
     * after switch-root. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        fatal("cannot make the mount tree private: %s", strerror(errno));
    /* the measured file itself: /proc/self/fd of the descriptor measured above */
    char fdpath[64];
    snprintf(fdpath, sizeof fdpath, "/proc/self/fd/%d", fd);
    int via_loop;
    if (mount_erofs(fdpath, meta, &via_loop, err, sizeof err) < 0)
        fatal("cannot mount the root image (erofs): %s", err);
    close(fd);
    pushed(meta);
    if (mount(SYSROOT, run_phys, NULL, MS_MOVE, NULL) < 0)
        fatal("cannot move the physical root to %s: %s", run_phys, strerror(errno));
    snprintf(phys, sizeof phys, "%s", run_phys);
    char store[BSR_PATH_MAX];
    join(store, phys, objects_rel);
    const char *lowers[1] = {meta};
    if (mount_overlay_ro("composefs", lowers, 1, store, verity, SYSROOT, err, sizeof err) < 0)
        fatal("cannot mount the composefs root (overlay ro,metacopy=on,redirect_dir=on%s): %s",
              verity ? ",verity=require" : "", err);
    pushed(SYSROOT);
    static const char *const needed[] = {"/etc", "/var", "/sysroot"};
    for (int i = 0; i < 3; i++) {
        join(p, SYSROOT, needed[i]);
        if (!is_dir(p))
            fatal("the root image has no %s directory (a mount point)", needed[i]);
    }
    checkpoint();

    /* -- 6. /etc, /var and /tmp */
    step = "6 (/etc, /var and /tmp)";
    char sys_etc[BSR_PATH_MAX], sys_var[BSR_PATH_MAX];
    join(sys_etc, SYSROOT, "/etc");
    join(sys_var, SYSROOT, "/var");
    if (strcmp(cf.etc, "transient") == 0) {
        char tmp[BSR_PATH_MAX], upper[BSR_PATH_MAX], work[BSR_PATH_MAX], opts[4 * BSR_PATH_MAX];
        join(tmp, RUN, "/etc");
        if (mkdir_p(tmp, 0755))
            fatal("cannot create %s", tmp);
        if (mount("bootimg-etc", tmp, "tmpfs", 0, "mode=0755") < 0)
            fatal("cannot mount a tmpfs for the transient /etc: %s", strerror(errno));
        pushed(tmp);
        join(upper, tmp, "/upper");
        join(work, tmp, "/work");
        if (mkdir(upper, 0755) < 0 || mkdir(work, 0755) < 0)
            fatal("cannot create the /etc overlay directories");
        snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", sys_etc, upper, work);
        if (mount("bootimg-etc", sys_etc, "overlay", 0, opts) < 0)
            fatal("cannot mount the transient /etc overlay: %s", strerror(errno));
        pushed(sys_etc);
    }
    if (var_persistent) {
        char var[BSR_PATH_MAX];
        if (snprintf(var, sizeof var, "%s%s/var", phys, cf.state) >= (int)sizeof var)
            fatal("path too long: %s%s/var", phys, cf.state);
        if (mkdir_p(var, 0755))
            fatal("cannot create %s/var on the root partition", cf.state);
        if (mount(var, sys_var, NULL, MS_BIND, NULL) < 0)
            fatal("cannot bind the persistent /var: %s", strerror(errno));
    } else if (mount("bootimg-var", sys_var, "tmpfs", 0, "mode=0755") < 0) {
        fatal("cannot mount the transient /var: %s", strerror(errno));
    }
    pushed(sys_var);
    if (var_persistent && strcmp(cf.etc, "transient") == 0)
        persist_machine_id(phys, cf.state, sys_etc);
    /* /tmp is a tmpfs (what systemd's tmp.mount makes) over the read-only image: systemd 252
     * builds a service's private /dev (PrivateDevices=, every boot-time container) in /tmp and
     * puts PrivateTmp= directories there. A root image without a /tmp directory gets none. */
    const char *tmp_mount = "image";
    char sys_tmp[BSR_PATH_MAX];
    struct stat tst;
    join(sys_tmp, SYSROOT, "/tmp");
    if (lstat(sys_tmp, &tst) == 0 && S_ISDIR(tst.st_mode)) {
        if (mount("bootimg-tmp", sys_tmp, "tmpfs", MS_NOSUID | MS_NODEV | MS_STRICTATIME,
                  "mode=1777,size=50%,nr_inodes=1m") < 0)
            fatal("cannot mount the /tmp tmpfs: %s", strerror(errno));
        pushed(sys_tmp);
        tmp_mount = "tmpfs";
    }
    checkpoint();

    /* -- 7. keep the physical root reachable at /sysroot/sysroot */
    step = "7 (physical root)";
    join(p, SYSROOT, "/sysroot");
    if (mount(phys, p, NULL, MS_MOVE, NULL) < 0)
        fatal("cannot move the physical root to /sysroot: %s", strerror(errno));
    snprintf(phys, sizeof phys, "%s", p);
    volatile_root(phys);

    /* -- 8. record what was booted (every value is checked: safe paths, hex, fixed words) */
    step = "8 (booted.json)";
    char out[10 * BSR_PATH_MAX], key_json[24];
    if (keyid[0])
        snprintf(key_json, sizeof key_json, "\"%s\"", keyid);
    else
        snprintf(key_json, sizeof key_json, "null");
    int n = snprintf(out, sizeof out,
                     "{\"digest\": \"%s\", \"trust\": \"%s\", \"key\": %s, \"verity\": \"%s\", \"fsverity\": \"%s\", "
                     "\"release\": \"%s\", \"image\": \"%s/images/root.cfs\", \"provisioned_now\": %s, "
                     "\"on_failure\": \"%s\", \"mounts\": {\"/\": \"composefs\", \"/etc\": \"%s\", \"/var\": \"%s\", "
                     "\"/tmp\": \"%s\", \"/sysroot\": \"physical\"}, \"release_dir\": \"/sysroot%s\", \"objects\": \"/sysroot%s\", "
                     "\"version\": \"%s\", \"security_version\": %u, \"rollback_minimum\": %llu, \"rollback_store\": \"%s\", "
                     "\"rollback_nv\": \"0x%08x\", \"rollback_file\": \"/sysroot%s\"}\n",
                     digest, cf.trust, key_json, verity ? "require" : "none", cf.fsverity, release, release,
                     provisioned_now ? "true" : "false", cf.on_failure, cf.etc, cf.var, tmp_mount, release, objects_rel,
                     version, secver, (unsigned long long)rb.minimum, rb.tpm ? "tpm" : "file", nv, rb_label);
    join(p, RUN, "/booted.json");
    if (n < 0 || (size_t)n >= sizeof out || write_file(p, out, (size_t)n, 0644))
        fatal("cannot write %s", p);
    checkpoint();
    note("root %s mounted (trust %s%s%s, verity %s, /etc %s, /var %s, erofs %s) in %.1f ms, the rollback "
         "check (%s) %.2f ms of it", digest, cf.trust, keyid[0] ? ", key " : "", keyid, verity ? "require" : "none",
         cf.etc, cf.var, via_loop ? "on a loop device" : "file-backed", ms_since(&t_start), rb.tpm ? "TPM" : "file",
         rb_ms);
    return 0;
}
