/*
 * MoE Routing Bench SDK: types shared by the host and every plugin.
 *
 * A plugin includes <moe/router.h> (which includes this file) and nothing
 * else from the project. Everything here is plain C11 with fixed-width
 * integers, so a plugin compiled by any C or C++ compiler links against any
 * host of the same ABI version.
 *
 * ABI evolution rules (see also docs/plugins.md):
 *   - Within one ABI version the host may append fields at the END of the
 *     structs it passes to plugins (moe_context, argument structs); each of
 *     them starts with `struct_size` so a plugin can tell what it was given.
 *   - Anything else (reordering, removing or retyping a field, changing the
 *     meaning of a field or a return code) needs a new versioned symbol, e.g.
 *     moe_router_plugin_v2. The host keeps loading every older version it
 *     lists in MOE_ROUTER_ABI_SUPPORTED by adapting the old table.
 */
#ifndef MOE_ABI_H
#define MOE_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MOE_EXPORT __declspec(dllexport)
#else
#define MOE_EXPORT __attribute__((visibility("default")))
#endif

/* Every entry point returns one of these. On failure the plugin writes a
 * human-readable reason into ctx->msg (the host prefixes the plugin name). */
typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERR_INVALID_ARG = 1, /* a shape, pointer or value the plugin cannot accept */
    MOE_ERR_OPTION = 2,      /* unknown option key, wrong type or bad value */
    MOE_ERR_UNSUPPORTED = 3, /* valid request the plugin does not implement */
    MOE_ERR_NO_MEMORY = 4,
    MOE_ERR_DEVICE = 5,      /* a CUDA call failed */
    MOE_ERR_INTERNAL = 6
} moe_status;

typedef enum moe_device_kind { MOE_DEVICE_CPU = 0, MOE_DEVICE_CUDA = 1 } moe_device_kind;

/* Counter-based RNG key: the host derives one per (seed, step, layer, use).
 * Plugins turn (key, element index) into random numbers with moe/philox.h,
 * so CPU and CUDA draw the same numbers. */
typedef struct moe_rng_key {
    uint64_t seed;
    uint64_t step;
    uint32_t layer;
    uint32_t stream; /* which use: MOE_RNG_STREAM_* */
} moe_rng_key;

enum {
    MOE_RNG_STREAM_DATA = 1,
    MOE_RNG_STREAM_DROPOUT = 2,
    MOE_RNG_STREAM_ROUTER = 3,
    MOE_RNG_STREAM_INIT = 4,
    MOE_RNG_STREAM_USER = 64 /* first value free for plugins' own streams */
};

/* What the host hands to every plugin call. The host owns all memory,
 * streams and handles; a plugin allocates nothing on the hot path. */
typedef struct moe_context {
    uint32_t struct_size;      /* sizeof(moe_context) as the host knows it */
    moe_device_kind device;    /* which implementation table is being called */
    int32_t device_ordinal;    /* CUDA device index, 0 on the CPU */
    void *stream;              /* cudaStream_t on CUDA; NULL on the CPU */
    void *workspace;           /* scratch in the device's memory, 256-byte aligned */
    size_t workspace_bytes;    /* at least what the plugin asked for in its info */
    moe_rng_key rng;           /* key for this (seed, step, layer) */
    int32_t training;          /* 1 in a training step, 0 in evaluation */
    int32_t rank;              /* data-parallel rank of this process */
    int32_t world_size;        /* number of ranks */
    char *msg;                 /* error message buffer, msg_cap bytes, NUL-terminated */
    size_t msg_cap;
    /* Appended within version 1: read it only when struct_size covers it
     * (moe_context_inputs_checked below). 1 when the host itself checks,
     * on the device, every input it passes (finite logits, token ids in
     * [0, vocab_size), in backward its own earlier outputs), and the
     * route_logits a perturbing router writes, and reports a failure after
     * the step with the message the plugin would have written. A plugin may then skip its own input checks: on CUDA those
     * wait for the device once per call, which the host's checks do not.
     * The host sets it only on CUDA; the SDK's CUDA check helpers
     * (moe/router_cuda.cuh) honour it. */
    int32_t inputs_checked;
} moe_context;

/* Whether ctx says the host checks the plugin's inputs (0 for a host built
 * before the field existed). */
static inline int moe_context_inputs_checked(const moe_context *ctx) {
    return ctx->struct_size >= offsetof(moe_context, inputs_checked) + sizeof ctx->inputs_checked &&
           ctx->inputs_checked != 0;
}

/* ---- options: the [router] table (minus `plugin`) as typed key/values ---- */

typedef enum moe_opt_type {
    MOE_OPT_BOOL = 1,
    MOE_OPT_INT = 2,
    MOE_OPT_FLOAT = 3,
    MOE_OPT_STRING = 4
} moe_opt_type;

/* One value as written in the config. `i` holds BOOL (0/1) and INT values. */
typedef struct moe_option {
    const char *key;
    moe_opt_type type;
    int64_t i;
    double f;
    const char *s;
} moe_option;

/* What a plugin accepts. The host prints these in `moehost plugins`.
 * default_value is written as in TOML ("1.0", "true", "uniform").
 * choices is "a|b|c" for strings, NULL otherwise.
 * When min < max, numeric values must lie in [min, max]. */
typedef struct moe_option_spec {
    const char *key;
    moe_opt_type type;
    const char *default_value;
    const char *choices;
    double min, max;
    const char *help;
} moe_option_spec;

/* ---- parameters and buffers a plugin asks the host to own ---- */

typedef enum moe_init_kind {
    MOE_INIT_ZEROS = 0,
    MOE_INIT_CONST = 1,   /* every element = init_value */
    MOE_INIT_NORMAL = 2,  /* N(0, init_value^2) */
    MOE_INIT_UNIFORM = 3  /* U(-init_value, init_value) */
} moe_init_kind;

#define MOE_MAX_TENSOR_DIMS 4
#define MOE_TENSOR_NAME_MAX 32

typedef struct moe_tensor_spec {
    char name[MOE_TENSOR_NAME_MAX];       /* e.g. "w_noise"; unique within the plugin */
    int32_t ndim;
    int64_t shape[MOE_MAX_TENSOR_DIMS];
    moe_init_kind init;
    float init_value;
    int32_t weight_decay;                  /* params only: 1 to apply AdamW decay */
} moe_tensor_spec;

#define MOE_MAX_PLUGIN_TENSORS 8

#ifdef __cplusplus
}
#endif
#endif
