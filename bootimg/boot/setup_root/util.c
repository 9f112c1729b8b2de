/* Output lines, bounded file reads and path checks. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bsr.h"

const char *bsr_kmsg;

/* One line to stderr (the unit sends it to the journal and the console) and, for FATAL and
 * WARNING lines, to the kernel log with its priority. */
void log_line(int prio, const char *line)
{
    dprintf(2, "%s\n", line);
    if (prio >= 0 && bsr_kmsg) {
        int fd = open(bsr_kmsg, O_WRONLY | O_APPEND | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd >= 0) {
            dprintf(fd, "<%d>%s\n", prio, line);
            close(fd);
        }
    }
}

void log_prefixed(int prio, const char *prefix, const char *fmt, va_list ap)
{
    char line[2048];
    int n = snprintf(line, sizeof line, "%s", prefix);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    log_line(prio, line);
}

void note(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_prefixed(-1, "bootimg: ", fmt, ap);
    va_end(ap);
}

void warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_prefixed(3, "bootimg: WARNING: ", fmt, ap);
    va_end(ap);
}

const char *shown(const char *value, char buf[80])
{
    size_t i = 0;
    for (; value[i] && i < 64; i++)
        buf[i] = (value[i] >= 0x20 && value[i] < 0x7f) ? value[i] : '?';
    if (value[i]) {
        memcpy(buf + i, "...", 3);
        i += 3;
    }
    buf[i] = 0;
    return buf;
}

int read_file(const char *path, size_t max, char **data, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return errno;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        close(fd);
        return e;
    }
    size_t cap = st.st_size > 0 && (size_t)st.st_size < max ? (size_t)st.st_size + 1 : (max < 4096 ? max + 1 : 4096);
    char *buf = malloc(cap + 1), *grown;
    size_t n = 0;
    if (!buf) {
        close(fd);
        return ENOMEM;
    }
    for (;;) {           /* procfs files report size 0: read to EOF, one byte past the limit */
        if (n == cap) {
            cap = cap * 2 > max + 1 ? max + 1 : cap * 2;
            if (!(grown = realloc(buf, cap + 1))) {
                free(buf);
                close(fd);
                return ENOMEM;
            }
            buf = grown;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return e;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > max) {
            free(buf);
            close(fd);
            return EFBIG;
        }
    }
    close(fd);
    buf[n] = 0;
    *data = buf;
    *len = n;
    return 0;
}

int write_file(const char *path, const void *data, size_t len, int mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return errno;
    const char *p = data;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            close(fd);
            return e;
        }
        p += w;
        len -= (size_t)w;
    }
    return close(fd) < 0 ? errno : 0;
}

int write_file_atomically(const char *path, const void *data, size_t len, int mode)
{
    char tmp[BSR_PATH_MAX], dir[BSR_PATH_MAX];
    if (path_join(tmp, sizeof tmp, path, ".tmp") < 0 || path_join(dir, sizeof dir, path, "") < 0)
        return ENAMETOOLONG;
    *strrchr(dir, '/') = 0;
    int e = mkdir_p(dir, 0755);
    if (e)
        return e;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return errno;
    if (write(fd, data, len) != (ssize_t)len || fsync(fd) < 0) {
        e = errno ? errno : EIO;
        close(fd);
        unlink(tmp);
        return e;
    }
    if (close(fd) < 0 || rename(tmp, path) < 0) {
        e = errno;
        unlink(tmp);
        return e;
    }
    return fsync_path(dir, 1);
}

int mkdir_p(const char *path, int mode)
{
    char buf[BSR_PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf)
        return ENAMETOOLONG;
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, (mode_t)mode) < 0) {
                struct stat st;
                int e = errno;
                if (e != EEXIST || stat(buf, &st) < 0 || !S_ISDIR(st.st_mode))
                    return e == EEXIST ? ENOTDIR : e;
            }
            *p = c;
            if (!c)
                return 0;
        }
    }
}

int path_join(char *out, size_t size, const char *a, const char *b)
{
    int n = snprintf(out, size, "%s%s", a, b);
    return (n < 0 || (size_t)n >= size) ? -1 : 0;
}

int safe_path(const char *p)
{
    size_t n = strlen(p);
    if (n == 0 || p[0] != '/' || n >= BSR_PATH_MAX / 2)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_'
              || c == '/' || c == '-'))
            return 0;
        if (c == '/' && (p[i + 1] == '/' || (i > 0 && p[i + 1] == 0)))
            return 0;
        if (c == '/' && p[i + 1] == '.' && p[i + 2] == '.' && (p[i + 3] == '/' || p[i + 3] == 0))
            return 0;
    }
    return 1;
}

int is_hex64(const char *s)
{
    for (int i = 0; i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return s[64] == 0;
}

int is_keyid(const char *s)
{
    for (int i = 0; i < 16; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'A' && s[i] <= 'F')))
            return 0;
    return s[16] == 0;
}

void hex_encode(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = 0;
}

int parse_u32(const char *s, uint32_t *v)
{
    uint64_t x = 0;
    size_t n = 0;
    for (; s[n] >= '0' && s[n] <= '9'; n++) {
        x = x * 10 + (uint64_t)(s[n] - '0');
        if (x > 0xffffffffu)
            return -1;
    }
    if (n == 0 || s[n] || (s[0] == '0' && n > 1))
        return -1;
    *v = (uint32_t)x;
    return 0;
}

int fsync_path(const char *path, int directory)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | (directory ? O_DIRECTORY : 0));
    if (fd < 0)
        return errno;
    int e = fsync(fd) < 0 ? errno : 0;
    close(fd);
    return e;
}

#ifdef BOOTIMG_TEST_HOOKS
const char *test_param(const char *name, const char *def)
{
    const char *v = getenv(name);
    return v && *v ? v : def;
}
#endif
