/*
 * Resolves one name with the C library's own stub resolver (getaddrinfo), the way an
 * ordinary program does, and prints one JSON line. The tests build it twice, against glibc
 * and against musl, because their stub resolvers walk search lists and handle send errors
 * differently.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static const char *error_name(int code)
{
    switch (code) {
    case EAI_AGAIN:
        return "EAI_AGAIN";
    case EAI_NONAME:
        return "EAI_NONAME";
    case EAI_FAIL:
        return "EAI_FAIL";
    case EAI_SYSTEM:
        return "EAI_SYSTEM";
#ifdef EAI_NODATA
    case EAI_NODATA:
        return "EAI_NODATA";
#endif
    default:
        return "other";
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 64;
    }
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    struct addrinfo *result = NULL;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int code = getaddrinfo(argv[1], NULL, &hints, &result);
    clock_gettime(CLOCK_MONOTONIC, &end);
    long elapsed_ms = (end.tv_sec - start.tv_sec) * 1000 + (end.tv_nsec - start.tv_nsec) / 1000000;
    if (code != 0) {
        printf("{\"ok\":false,\"error\":\"%s\",\"code\":%d,\"elapsed_ms\":%ld}\n",
               error_name(code), code, elapsed_ms);
        return 1;
    }
    printf("{\"ok\":true,\"addresses\":[");
    const char *separator = "";
    for (struct addrinfo *ai = result; ai != NULL; ai = ai->ai_next) {
        char text[INET6_ADDRSTRLEN];
        const void *addr = ai->ai_family == AF_INET
                               ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                               : (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
        if (inet_ntop(ai->ai_family, addr, text, sizeof text) != NULL) {
            printf("%s\"%s\"", separator, text);
            separator = ",";
        }
    }
    printf("],\"elapsed_ms\":%ld}\n", elapsed_ms);
    freeaddrinfo(result);
    return 0;
}
