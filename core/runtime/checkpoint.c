#include "runtime/checkpoint.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/fsutil.h"

#define CKPT_MAGIC "MOECKPT"
#define CKPT_VERSION 1u

static void put_u32(FILE *f, uint32_t v) { fwrite(&v, 4, 1, f); }
static void put_u64(FILE *f, uint64_t v) { fwrite(&v, 8, 1, f); }
static void put_f64(FILE *f, double v) { fwrite(&v, 8, 1, f); }

/* Copy a backend buffer to the file through a host staging buffer. */
static void put_tensor(FILE *f, moe_backend *be, const float *src, size_t n) {
    float *host = malloc((n ? n : 1) * sizeof(float));
    be->to_host(be, host, src, n * sizeof(float));
    fwrite(host, sizeof(float), n, f);
    free(host);
}

int moe_checkpoint_save(const char *path, const moe_model *m, const moe_progress *p, char *err, size_t errcap) {
    FILE *f = moe_atomic_open(path, err, errcap);
    if (!f) return -1;
    fwrite(CKPT_MAGIC, 1, 8, f); /* includes the terminating NUL */
    put_u32(f, CKPT_VERSION);
    put_u32(f, 0);
    put_u64(f, p->step);
    put_u64(f, moe_params_layout_hash(&m->params) ^ (moe_params_layout_hash(&m->buffers) * 31u));
    put_u64(f, m->params.total);
    put_u64(f, m->buffers.total);
    put_u64(f, p->tokens_seen);
    put_f64(f, p->train_seconds);
    put_f64(f, p->best_val_loss);
    put_u64(f, p->best_step);
    put_tensor(f, m->be, m->params.values, m->params.total);
    put_tensor(f, m->be, m->params.adam_m, m->params.total);
    put_tensor(f, m->be, m->params.adam_v, m->params.total);
    put_tensor(f, m->be, m->buffers.values, m->buffers.total);
    return moe_atomic_commit(f, path, err, errcap);
}

static int get(FILE *f, void *dst, size_t bytes) { return fread(dst, 1, bytes, f) == bytes; }

static int get_tensor(FILE *f, moe_backend *be, float *dst, size_t n) {
    float *host = malloc((n ? n : 1) * sizeof(float));
    int ok = host && get(f, host, n * sizeof(float));
    if (ok) be->from_host(be, dst, host, n * sizeof(float));
    free(host);
    return ok;
}

int moe_checkpoint_load(const char *path, moe_model *m, moe_progress *p, char *err, size_t errcap) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errcap, "cannot open checkpoint '%s': %s", path, strerror(errno));
        return -1;
    }
    char magic[8];
    uint32_t version = 0, reserved;
    uint64_t hash = 0, n_params = 0, n_buffers = 0;
    int ok = get(f, magic, 8) && memcmp(magic, CKPT_MAGIC, 8) == 0;
    if (!ok) {
        snprintf(err, errcap, "'%s' is not a moehost checkpoint (bad magic)", path);
        fclose(f);
        return -1;
    }
    ok = get(f, &version, 4) && get(f, &reserved, 4) && get(f, &p->step, 8) && get(f, &hash, 8) &&
         get(f, &n_params, 8) && get(f, &n_buffers, 8) && get(f, &p->tokens_seen, 8) &&
         get(f, &p->train_seconds, 8) && get(f, &p->best_val_loss, 8) && get(f, &p->best_step, 8);
    if (!ok || version != CKPT_VERSION) {
        snprintf(err, errcap, "'%s': truncated header or unsupported version %u (this moehost writes %u)", path,
                 version, CKPT_VERSION);
        fclose(f);
        return -1;
    }
    uint64_t want = moe_params_layout_hash(&m->params) ^ (moe_params_layout_hash(&m->buffers) * 31u);
    if (hash != want || n_params != m->params.total || n_buffers != m->buffers.total) {
        snprintf(err, errcap,
                 "checkpoint '%s' was written for a different model (%llu parameters, this config builds %zu); "
                 "resume with the config the run started with (its config.toml), or start a new run.name",
                 path, (unsigned long long)n_params, m->params.total);
        fclose(f);
        return -1;
    }
    ok = get_tensor(f, m->be, m->params.values, n_params) && get_tensor(f, m->be, m->params.adam_m, n_params) &&
         get_tensor(f, m->be, m->params.adam_v, n_params) && get_tensor(f, m->be, m->buffers.values, n_buffers);
    fclose(f);
    if (!ok) {
        snprintf(err, errcap, "checkpoint '%s' is truncated; it cannot be resumed", path);
        return -1;
    }
    return 0;
}
