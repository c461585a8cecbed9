/*
 * A static UDP tool for the Docker end-to-end tests (built with gcc -static
 * into a FROM-scratch image).
 *
 *   udp recv PORT
 *       Prints "from IP:PORT" for every datagram, one line each, flushed at
 *       once: the test reads the source address the application sees from
 *       the container's log.
 *   udp send DST_IP PORT SPORT COUNT INTERVAL_MS
 *       Sends COUNT datagrams to DST_IP:PORT from one fixed source port,
 *       one every INTERVAL_MS; bounded by COUNT, then exits.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int recv_loop(int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("udp recv");
        return 1;
    }
    printf("listening on udp/%d\n", port);
    fflush(stdout);
    for (;;) {
        char buf[2048];
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (n < 0)
            continue;
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &from.sin_addr, ip, sizeof ip);
        printf("from %s:%d\n", ip, ntohs(from.sin_port));
        fflush(stdout);
    }
}

static int send_loop(const char *dst, int port, int sport, long count, long interval_ms) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = htons(sport)};
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || inet_pton(AF_INET, dst, &to.sin_addr) != 1 ||
        bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
        perror("udp send");
        return 1;
    }
    struct timespec gap = {.tv_sec = interval_ms / 1000, .tv_nsec = (interval_ms % 1000) * 1000000};
    for (long seq = 0; seq < count; seq++) {
        char msg[64];
        int len = snprintf(msg, sizeof msg, "stalewatch-docker %ld", seq);
        /* Errors (ICMP refusals reported on the socket) do not stop the stream. */
        sendto(fd, msg, len, 0, (struct sockaddr *)&to, sizeof to);
        nanosleep(&gap, NULL);
    }
    return 0;
}

/* As PID 1 of a container a process ignores SIGTERM unless it handles it:
 * without this, every stop waits out Docker's 10 s grace period. */
static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    if (argc == 3 && strcmp(argv[1], "recv") == 0)
        return recv_loop(atoi(argv[2]));
    if (argc == 7 && strcmp(argv[1], "send") == 0)
        return send_loop(argv[2], atoi(argv[3]), atoi(argv[4]), atol(argv[5]), atol(argv[6]));
    fprintf(stderr, "usage: udp recv PORT | udp send DST_IP PORT SPORT COUNT INTERVAL_MS\n");
    return 2;
}
