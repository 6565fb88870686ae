/*
 * File-system helpers for results that must never be lost or half-written:
 * atomic replacement (write a temporary beside the target, flush it to disk,
 * rename over the target, flush the folder) and recursive mkdir.
 */
#ifndef MOE_FSUTIL_H
#define MOE_FSUTIL_H

#include <stddef.h>
#include <stdio.h>

/* mkdir -p. 0 ok, -1 + err. */
int moe_mkdirs(const char *path, char *err, size_t errcap);

/* Begin an atomic write of `path`: returns a FILE* on "<path>.tmp". */
FILE *moe_atomic_open(const char *path, char *err, size_t errcap);
/* Flush, fsync, close and rename the temporary over `path`. 0 ok, -1 + err
 * (the temporary is removed and `path` keeps its previous content). */
int moe_atomic_commit(FILE *f, const char *path, char *err, size_t errcap);

/* Whether a regular file exists. */
int moe_file_exists(const char *path);

#endif
