/*
 * moe-conform internals: what the checks (conform_checks.c), the execution
 * layer (conform_exec.c) and the front end (moe_conform.c) share.
 *
 * The tool drives a router plugin exactly as the host does (core/model/moe.c):
 * it creates instances with moe_router_dims, queries moe_router_info,
 * allocates the declared parameters, buffers and workspace, and calls the
 * device table's forward and backward with a moe_context. Every buffer a
 * plugin may write is followed by a guard zone filled with a pattern; the
 * guards are checked after every call, so a plugin that writes past its
 * workspace or an output is named.
 */
#ifndef MOE_CONFORM_H
#define MOE_CONFORM_H

#include <stdint.h>
#include <stdio.h>

#include "moe/router.h"

#define CF_MAX_OPTS 64
#define CF_MAX_SKIP 32
#define CF_MSG_CAP 1024
#define CF_WHY_CAP 512
/* The host (moe.c) keeps 256 bytes after the workspace; so do we. */
#define CF_GUARD_BYTES 256
#define CF_GUARD_BYTE 0xA5
/* Output poison: an expert index no router writes and a NaN weight, so an
 * entry the plugin never wrote is caught by the invariant checks. */
#define CF_POISON_INDEX 0x5A5A5A5A
#define CF_POISON_BITS 0x7FC05A5Au

/* ---- results ---- */

typedef enum cf_result { CF_PASS = 0, CF_FAIL = 1, CF_SKIP = 2 } cf_result;

/* Rows go to `out` (a pipe to the parent, or stdout's collector) one per
 * line; notes say what is being done, so a crash can be attributed. */
void cf_report_to(FILE *out);
void cf_row(const char *check, cf_result r, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void cf_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- deterministic randomness of the tool (not the plugin's Philox) ---- */

typedef struct cf_rng {
    uint64_t s;
} cf_rng;

cf_rng cf_rng_make(uint64_t seed);
uint64_t cf_rng_next(cf_rng *r);
int cf_rng_int(cf_rng *r, int lo, int hi); /* uniform in [lo, hi] */
float cf_rng_uniform(cf_rng *r, float lo, float hi);
float cf_rng_normal(cf_rng *r);

/* ---- devices: where the plugin's pointers live ---- */

typedef struct cf_device {
    moe_device_kind kind;
    char name[128];
    void *stream; /* cudaStream_t on CUDA, NULL on the CPU */
    void *(*alloc)(size_t bytes);
    void (*release)(void *p);
    int (*h2d)(void *dst, const void *src, size_t bytes);
    int (*d2h)(void *dst, const void *src, size_t bytes);
    int (*sync)(void *stream, char *why, size_t cap); /* 0 ok; -1 with the device's error */
} cf_device;

void cf_device_cpu(cf_device *d);
/* 0 and a ready device; -1 with the reason in why. */
int cf_device_cuda(cf_device *d, char *why, size_t cap);
void cf_device_close(cf_device *d);

#ifdef MOE_CONFORM_CUDA
/* conform_cuda.c: the CUDA runtime behind cf_device_cuda. */
int cf_cuda_open(char *name, size_t name_cap, void **stream, char *why, size_t cap);
void cf_cuda_close(void *stream);
void *cf_cuda_alloc(size_t bytes);
void cf_cuda_free(void *p);
int cf_cuda_h2d(void *dst, const void *src, size_t bytes);
int cf_cuda_d2h(void *dst, const void *src, size_t bytes);
int cf_cuda_sync(void *stream, char *why, size_t cap);
#endif

/* ---- what the user asked for ---- */

typedef struct cf_config {
    const char *path;
    const moe_router_plugin_v1_t *api;
    moe_device_kind device; /* --device */
    moe_option opts[CF_MAX_OPTS];
    int n_opts;
    int quick;
    uint64_t seed;
    const char *skip[CF_MAX_SKIP];
    int n_skip;
} cf_config;

int cf_skipped(const cf_config *cfg, const char *check);

/* ---- an instance, made the way the host makes one ---- */

typedef struct cf_instance {
    const moe_router_plugin_v1_t *api;
    const moe_router_impl *impl; /* the table of dev->kind */
    const cf_device *dev;
    void *state;
    moe_router_dims dims;
    moe_router_info info;
    size_t param_n[MOE_MAX_PLUGIN_TENSORS];
    size_t buffer_n[MOE_MAX_PLUGIN_TENSORS];
    float *params[MOE_MAX_PLUGIN_TENSORS];     /* host values, initialised per spec */
    float *buffers[MOE_MAX_PLUGIN_TENSORS];    /* host values, initialised per spec */
    moe_status create_status;                  /* what create returned */
    char msg[CF_MSG_CAP];                      /* the plugin's message of create/query */
    char why[CF_WHY_CAP];                      /* what went wrong, in our words */
} cf_instance;

enum {
    CF_INST_OK = 0,
    CF_INST_REFUSED = 1,  /* create returned an error */
    CF_INST_QUERY = 2,    /* query failed */
    CF_INST_INFO = 3,     /* the info is unusable (k_out, tensor counts) */
    CF_INST_NO_IMPL = 4,  /* no table for the device */
    CF_INST_NO_MEMORY = 5,
    CF_INST_NOT_APPLICABLE = 6 /* the user's options refuse this shape (see instance_for) */
};

moe_router_dims cf_dims(int E, int K, int d_model, int vocab, int max_tokens, double cf, int layer);
/* Create and query; params and buffers initialised from the specs (params
 * with `seed`). Returns CF_INST_*; on failure `why` says what happened. */
int cf_instance_create(cf_instance *in, const cf_config *cfg, const cf_device *dev, moe_router_dims dims,
                       const moe_option *opts, int n_opts, uint64_t seed);
void cf_instance_destroy(cf_instance *in);
/* C = max(1, ceil(CF * T * min(top_k, k_out) / E)), as the host computes it. */
int cf_capacity(const cf_instance *in, int T);
size_t cf_numel(const moe_tensor_spec *s);

/* ---- one forward or backward call ----
 * All arrays here are host memory; the execution layer copies them to the
 * device, calls the plugin, checks the guards and copies the results back. */

enum {
    CF_VIOL_NONE = 0,
    CF_VIOL_WORKSPACE = 1, /* wrote past its workspace */
    CF_VIOL_OUTPUT = 2,    /* wrote past an output array */
    CF_VIOL_TENSOR = 3,    /* wrote past a parameter, gradient or buffer */
    CF_VIOL_INPUT = 4,     /* modified an input it must only read */
    CF_VIOL_DEVICE = 5     /* a device copy or synchronisation failed */
};

typedef struct cf_call {
    /* inputs */
    int T;
    int capacity;
    int training;
    moe_rng_key key;
    const float *logits;   /* [T,E] */
    const float *x;        /* [T,d] */
    const int32_t *ids;    /* [T] */
    float *buffers[MOE_MAX_PLUGIN_TENSORS]; /* in: before the call; out: after it (forward may update in training) */
    unsigned char ws_fill; /* what the workspace holds before the call */
    int older_host;        /* call as a host older than the `saved` fields (no saved buffer) */
    /* forward outputs, [T,k_out] ([T,E] for route_logits) */
    int32_t *expert;
    float *weight;
    int32_t *slot;         /* with MOE_ROUTER_OWNS_CAPACITY */
    float *route_logits;   /* with MOE_ROUTER_PERTURBS_LOGITS */
    /* backward: dweight and d_route_logits in; dlogits out (overwritten);
     * dx and param_grads hold the values to accumulate into, and the sums after */
    float *dweight;
    float *d_route_logits;
    float *dlogits;
    float *dx;
    float *param_grads[MOE_MAX_PLUGIN_TENSORS];
    /* info.saved_bytes kept from the forward to the backward, as the host
     * keeps it (NULL when the plugin declares none); poisoned at first */
    unsigned char *saved;
    /* what happened */
    moe_status st;
    char msg[CF_MSG_CAP];       /* ctx->msg as the plugin left it */
    int viol;                   /* CF_VIOL_* of the first violation */
    char violation[CF_WHY_CAP]; /* its description */
} cf_call;

/* Allocate the host arrays of a call for T tokens (outputs poisoned),
 * buffers copied from the instance's initial values. */
int cf_call_alloc(cf_call *c, const cf_instance *in, int T);
void cf_call_free(cf_call *c, const cf_instance *in);
void cf_call_reset_buffers(cf_call *c, const cf_instance *in, float *const *from);

moe_status cf_forward(const cf_instance *in, cf_call *c);
moe_status cf_backward(const cf_instance *in, cf_call *c);

/* ---- the checks: one group per child process ---- */

typedef struct cf_group {
    const char *name;
    void (*run)(const cf_config *cfg);
} cf_group;

extern const cf_group cf_groups[];
extern const int cf_n_groups;

#endif
