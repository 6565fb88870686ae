/* realpath() is XSI. */
#define _DEFAULT_SOURCE
#include "runtime/plugin_loader.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef MOE_BUILD_PLUGIN_DIR
#define MOE_BUILD_PLUGIN_DIR ""
#endif
#ifndef MOE_INSTALL_PLUGIN_DIR
#define MOE_INSTALL_PLUGIN_DIR ""
#endif

/* Newer ABI versions we probe for only to say "this plugin is too new". */
#define MOE_ROUTER_ABI_PROBE_MAX 16

static int add_dir(char dirs[][MOE_PATH_MAX], int n, int max, const char *d) {
    if (n >= max || !d || !*d) return n;
    for (int i = 0; i < n; ++i)
        if (strcmp(dirs[i], d) == 0) return n;
    snprintf(dirs[n], MOE_PATH_MAX, "%s", d);
    return n + 1;
}

int moe_plugin_search_dirs(char dirs[][MOE_PATH_MAX], int max) {
    int n = 0;
    const char *env = getenv("MOE_PLUGIN_PATH");
    if (env) {
        char buf[4096];
        snprintf(buf, sizeof buf, "%s", env);
        for (char *save = NULL, *tok = strtok_r(buf, ":", &save); tok; tok = strtok_r(NULL, ":", &save))
            n = add_dir(dirs, n, max, tok);
    }
    /* Beside the program: works for the build tree and any install prefix. */
    char exe[MOE_PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            char d[MOE_PATH_MAX + 32];
            snprintf(d, sizeof d, "%s/../lib/moe/plugins", exe);
            char real[MOE_PATH_MAX];
            if (realpath(d, real)) n = add_dir(dirs, n, max, real);
        }
    }
    n = add_dir(dirs, n, max, MOE_BUILD_PLUGIN_DIR);
    n = add_dir(dirs, n, max, MOE_INSTALL_PLUGIN_DIR);
    return n;
}

static int is_path(const char *s) {
    size_t n = strlen(s);
    return strchr(s, '/') != NULL || (n > 3 && strcmp(s + n - 3, ".so") == 0);
}

int moe_router_lib_open_file(moe_router_lib *lib, const char *path, char *err, size_t errcap) {
    memset(lib, 0, sizeof *lib);
    snprintf(lib->path, sizeof lib->path, "%s", path);
    if (access(path, R_OK) != 0) {
        snprintf(err, errcap, "router plugin file '%s' does not exist or is not readable", path);
        return -1;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(err, errcap, "cannot load router plugin '%s': %s", path, dlerror());
        return -1;
    }
    moe_router_plugin_v1_fn fn = (moe_router_plugin_v1_fn)dlsym(h, MOE_ROUTER_SYMBOL_V1);
    if (!fn) {
        /* Say which version it does implement, if any. */
        for (int v = MOE_ROUTER_ABI_PROBE_MAX; v >= 2; --v) {
            char sym[64];
            snprintf(sym, sizeof sym, "moe_router_plugin_v%d", v);
            if (dlsym(h, sym)) {
                snprintf(err, errcap,
                         "'%s' implements router ABI version %d (symbol %s); this moehost supports "
                         "version %s. Rebuild the plugin against this SDK, or use a newer moehost",
                         path, v, sym, MOE_ROUTER_ABI_SUPPORTED);
                dlclose(h);
                return -1;
            }
        }
        snprintf(err, errcap,
                 "'%s' exports no '%s' symbol: it is not a router plugin for this moehost "
                 "(a plugin defines `MOE_EXPORT const struct moe_router_plugin_v1 *moe_router_plugin_v1(void)`; "
                 "see docs/plugins.md)",
                 path, MOE_ROUTER_SYMBOL_V1);
        dlclose(h);
        return -1;
    }
    const moe_router_plugin_v1_t *api = fn();
    if (!api) {
        snprintf(err, errcap, "'%s': %s() returned NULL", path, MOE_ROUTER_SYMBOL_V1);
        dlclose(h);
        return -1;
    }
    if (api->abi_version != MOE_ROUTER_ABI_VERSION) {
        snprintf(err, errcap,
                 "'%s': its table says router ABI version %u under the symbol %s; this moehost "
                 "supports version %s. Rebuild the plugin against this SDK",
                 path, api->abi_version, MOE_ROUTER_SYMBOL_V1, MOE_ROUTER_ABI_SUPPORTED);
        dlclose(h);
        return -1;
    }
    if (api->struct_size < sizeof(moe_router_plugin_v1_t)) {
        snprintf(err, errcap,
                 "'%s': its plugin table is %u bytes, smaller than the %zu of router ABI version 1; "
                 "rebuild the plugin against this SDK",
                 path, api->struct_size, sizeof(moe_router_plugin_v1_t));
        dlclose(h);
        return -1;
    }
    if (!api->name || !api->create || !api->destroy || !api->query || (!api->cpu && !api->cuda)) {
        snprintf(err, errcap,
                 "'%s': incomplete plugin table (name, create, destroy, query and at least one of "
                 "cpu/cuda are required)",
                 path);
        dlclose(h);
        return -1;
    }
    lib->handle = h;
    lib->api = api;
    lib->abi_version = MOE_ROUTER_ABI_VERSION;
    return 0;
}

int moe_router_lib_open(moe_router_lib *lib, const char *name_or_path, char *err, size_t errcap) {
    if (!name_or_path || !*name_or_path) {
        snprintf(err, errcap, "router.plugin is empty; name a router (`moehost plugins` lists them)");
        return -1;
    }
    if (is_path(name_or_path)) return moe_router_lib_open_file(lib, name_or_path, err, errcap);

    char dirs[MOE_MAX_SEARCH_DIRS][MOE_PATH_MAX];
    int n = moe_plugin_search_dirs(dirs, MOE_MAX_SEARCH_DIRS);
    if (strlen(name_or_path) > 255) {
        snprintf(err, errcap, "router.plugin name is too long (%zu characters)", strlen(name_or_path));
        return -1;
    }
    for (int i = 0; i < n; ++i) {
        char path[MOE_PATH_MAX + 300];
        snprintf(path, sizeof path, "%.1023s/%.255s.so", dirs[i], name_or_path);
        if (access(path, F_OK) == 0) return moe_router_lib_open_file(lib, path, err, errcap);
    }
    size_t used = (size_t)snprintf(err, errcap, "router plugin '%s' not found; looked for %s.so in:",
                                   name_or_path, name_or_path);
    for (int i = 0; i < n && used < errcap; ++i)
        used += (size_t)snprintf(err + used, errcap - used, " %s%s", dirs[i], i + 1 < n ? "," : "");
    if (used < errcap)
        snprintf(err + used, errcap - used,
                 ". Check the name (`moehost plugins` lists what is found), set MOE_PLUGIN_PATH, "
                 "or give the path to the .so");
    return -1;
}

void moe_router_lib_close(moe_router_lib *lib) {
    if (lib->handle) dlclose(lib->handle);
    memset(lib, 0, sizeof *lib);
}
