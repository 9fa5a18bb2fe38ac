/* LD_PRELOAD shim for bench/receive_rate.py: DCMTK storescp made durable the way the node is.
 *
 * storescp has no fsync option: it writes each received instance with fopen/fwrite/fclose and answers the
 * C-STORE right after fclose. With this shim preloaded, each fclose of a file that was opened for writing
 * first flushes and fsyncs the file, and after closing it fsyncs the file's folder (the new directory
 * entry), so the instance is on disk before storescp answers: the node's guarantee (file and folder entry
 * fsynced before Success), in C, with nothing else changed. The bench's figure for it is measured, where
 * its "storescp with the node's durable write added" line is an estimate.
 *
 * If FSYNC_ON_CLOSE_COUNT names a file, one byte is appended to it for each file made durable, so the
 * bench can check that the shim was in effect for every instance.
 *
 * Build: cc -shared -fPIC -O2 -o fsync_on_close.so fsync_on_close.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TRACKED 64

static struct {
    FILE *file;
    char folder[4096];
} tracked[TRACKED];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int writes(const char *mode) {
    return mode && (strchr(mode, 'w') || strchr(mode, 'a') || strchr(mode, '+'));
}

static void track(FILE *file, const char *path, const char *mode) {
    char copy[4096];
    if (!file || !path || !writes(mode))
        return;
    strncpy(copy, path, sizeof copy - 1);
    copy[sizeof copy - 1] = '\0';
    pthread_mutex_lock(&lock);
    for (int i = 0; i < TRACKED; i++) {
        if (!tracked[i].file) {
            tracked[i].file = file;
            strncpy(tracked[i].folder, dirname(copy), sizeof tracked[i].folder - 1);
            tracked[i].folder[sizeof tracked[i].folder - 1] = '\0';
            break;
        }
    }
    pthread_mutex_unlock(&lock);
}

typedef FILE *(*fopen_fn)(const char *, const char *);

static FILE *open_tracked(fopen_fn *real, const char *symbol, const char *path, const char *mode) {
    if (!*real)
        *real = (fopen_fn) dlsym(RTLD_NEXT, symbol);
    FILE *file = (*real)(path, mode);
    track(file, path, mode);
    return file;
}

FILE *fopen(const char *path, const char *mode) {
    static fopen_fn real;
    return open_tracked(&real, "fopen", path, mode);
}

FILE *fopen64(const char *path, const char *mode) {
    static fopen_fn real;
    return open_tracked(&real, "fopen64", path, mode);
}

static void count(void) {
    const char *path = getenv("FSYNC_ON_CLOSE_COUNT");
    if (!path)
        return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd >= 0) {
        if (write(fd, "+", 1) < 0) { /* the count is a check, not the durability: ignore */ }
        close(fd);
    }
}

int fclose(FILE *file) {
    static int (*real)(FILE *);
    char folder[4096];
    int found = 0;
    if (!real)
        real = (int (*)(FILE *)) dlsym(RTLD_NEXT, "fclose");
    pthread_mutex_lock(&lock);
    for (int i = 0; i < TRACKED; i++) {
        if (tracked[i].file == file) {
            memcpy(folder, tracked[i].folder, sizeof folder);
            tracked[i].file = NULL;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    int failed = 0;
    if (found)
        failed = fflush(file) != 0 || fsync(fileno(file)) != 0;
    int rc = real(file);
    if (found && !failed) {
        int fd = open(folder, O_RDONLY | O_DIRECTORY);
        if (fd < 0 || fsync(fd) != 0)
            failed = 1;
        if (fd >= 0)
            close(fd);
        if (!failed)
            count();
    }
    return failed ? EOF : rc;
}
