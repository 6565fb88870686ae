/*
 * Finding and loading router plugins.
 *
 * `router.plugin = "softk"` is looked up as softk.so in, in order:
 *   1. each folder of $MOE_PLUGIN_PATH (colon-separated);
 *   2. lib/moe/plugins beside the running program (the build tree's
 *      build/bin/../lib/moe/plugins, or an install prefix's bin/../lib/...);
 *   3. the build tree's plugin folder, then the install prefix's, as
 *      configured by CMake.
 * A value containing '/' or ending in ".so" is taken as a path.
 */
#ifndef MOE_PLUGIN_LOADER_H
#define MOE_PLUGIN_LOADER_H

#include <stddef.h>

#include "moe/router.h"

#define MOE_ROUTER_ABI_SUPPORTED "1"
#define MOE_PATH_MAX 1024
#define MOE_MAX_SEARCH_DIRS 16

typedef struct moe_router_lib {
    char path[MOE_PATH_MAX];
    void *handle;
    const moe_router_plugin_v1_t *api;
    int abi_version;             /* the version whose symbol was used */
} moe_router_lib;

/* The folders searched, in order; returns how many. */
int moe_plugin_search_dirs(char dirs[][MOE_PATH_MAX], int max);

/* Resolve and load a plugin. 0 ok; -1 with a message naming the file, what
 * is wrong and what to do. */
int moe_router_lib_open(moe_router_lib *lib, const char *name_or_path, char *err, size_t errcap);
/* Load a given .so file (no search). */
int moe_router_lib_open_file(moe_router_lib *lib, const char *path, char *err, size_t errcap);
void moe_router_lib_close(moe_router_lib *lib);

#endif
