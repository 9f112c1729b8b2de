/* demo-wait: the example containers' long-running "service".
 *
 * Usage: demo-wait [--notify] [NAME]
 * Prints "NAME: running", tells systemd it is ready when --notify is given (sd_notify
 * protocol: "READY=1" as one datagram to $NOTIFY_SOCKET, an abstract socket when it starts
 * with '@'), then waits for a signal. Static, so a container needs nothing else to run it. */
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <stdlib.h>
#include <unistd.h>

static int notify_ready(const char *name)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    char msg[256];
    size_t len;
    int fd, n;

    if (!path || !*path || strlen(path) >= sizeof(sa.sun_path))
        return -1;
    memcpy(sa.sun_path, path, strlen(path));
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = '\0';
    len = offsetof(struct sockaddr_un, sun_path) + strlen(path);
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    n = snprintf(msg, sizeof msg, "READY=1\nSTATUS=%s running\n", name);
    n = (int)sendto(fd, msg, (size_t)n, 0, (struct sockaddr *)&sa, (socklen_t)len);
    close(fd);
    return n < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    int notify = 0;
    const char *name = "demo";

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--notify") == 0)
            notify = 1;
        else
            name = argv[i];
    }
    printf("%s: running\n", name);
    fflush(stdout);
    if (notify && notify_ready(name) != 0) {
        fprintf(stderr, "%s: cannot notify systemd (NOTIFY_SOCKET=%s)\n", name,
                getenv("NOTIFY_SOCKET") ? getenv("NOTIFY_SOCKET") : "");
        return 1;
    }
    for (;;)
        pause();
}
