/* Resolves a name with the C library's stub resolver and prints one IPv4 address per line:
 * first getaddrinfo (AF_INET), then gethostbyname, each line prefixed by which call found it.
 * Exits 0 when both calls found at least one address, 2 otherwise (the error is printed).
 * dns/tests/kernel.rs builds it with `musl-gcc -static`: musl's resolver sends its queries
 * over UDP with a 512-byte buffer and no EDNS, and musl before 1.2.4 never retries over TCP
 * after TC, so it sees only what a truncated UDP answer carries. */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 1;
    }
    int found_gai = 0, found_ghbn = 0;
    char text[INET_ADDRSTRLEN];

    struct addrinfo hints, *res = NULL, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(argv[1], NULL, &hints, &res);
    if (rc != 0) {
        printf("getaddrinfo error: %s\n", gai_strerror(rc));
    } else {
        for (ai = res; ai; ai = ai->ai_next) {
            struct sockaddr_in *sin = (struct sockaddr_in *)ai->ai_addr;
            inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text);
            printf("getaddrinfo %s\n", text);
            found_gai++;
        }
        freeaddrinfo(res);
    }

    struct hostent *h = gethostbyname(argv[1]);
    if (!h) {
        printf("gethostbyname error: h_errno %d\n", h_errno);
    } else {
        for (char **a = h->h_addr_list; *a; a++) {
            inet_ntop(AF_INET, *a, text, sizeof text);
            printf("gethostbyname %s\n", text);
            found_ghbn++;
        }
    }
    return found_gai > 0 && found_ghbn > 0 ? 0 : 2;
}
