/*
 * File helpers for the data tests: a private temporary folder, small files
 * written into it and read back, and its removal at the end.
 */
#ifndef MOE_DATA_TEST_FILES_H
#define MOE_DATA_TEST_FILES_H

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* "dir/name" in a static buffer: test paths are short, and each is used
 * before the next call. */
static inline const char *test_path(const char *dir, const char *name) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

/* A fresh folder under /tmp, or exit: nothing can be tested without it. */
static inline void test_make_temp_dir(char out[64]) {
    snprintf(out, 64, "/tmp/moe-data-test-XXXXXX");
    if (!mkdtemp(out)) {
        perror("mkdtemp");
        exit(2);
    }
}

static inline int test_write_file(const char *path, const void *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t wrote = fwrite(bytes, 1, n, f);
    return (fclose(f) == 0 && wrote == n) ? 0 : -1;
}

/* The whole file, malloc'd (plus a NUL so text can be printed); NULL if absent. */
static inline unsigned char *test_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        fclose(f);
        return NULL;
    }
    unsigned char *bytes = malloc((size_t)st.st_size + 1);
    *n = bytes ? fread(bytes, 1, (size_t)st.st_size, f) : 0;
    fclose(f);
    if (bytes) bytes[*n] = 0;
    return bytes;
}

static inline int test_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* Overwrite bytes at `offset` of an existing file (to corrupt a shard). */
static inline int test_patch_file(const char *path, long offset, const void *bytes, size_t n) {
    FILE *f = fopen(path, "r+b");
    if (!f) return -1;
    int ok = fseek(f, offset, SEEK_SET) == 0 && fwrite(bytes, 1, n, f) == n;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

/* rm -r of a folder the test made (files and folders only, no links). */
static inline void test_remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (d) {
        for (struct dirent *e; (e = readdir(d)) != NULL;) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            size_t len = strlen(dir) + 1 + strlen(e->d_name) + 1;
            char *path = malloc(len);
            if (!path) break;
            snprintf(path, len, "%s/%s", dir, e->d_name);
            struct stat st;
            if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
                test_remove_tree(path);
            else
                unlink(path);
            free(path);
        }
        closedir(d);
    }
    rmdir(dir);
}

#endif
