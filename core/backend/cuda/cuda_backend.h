/*
 * What the CUDA backend offers beyond the moe_backend table (backend.h):
 * an error query. The ops of the table return nothing, so a failed CUDA or
 * cuBLAS call, or an invalid index met by a kernel (an expert, slot, token
 * id or target out of range), is recorded in the backend, printed to stderr
 * with its file and line, and reported here.
 */
#ifndef MOE_CUDA_BACKEND_H
#define MOE_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "backend/backend.h"

/* Waits for the backend's stream, then reports the first error recorded
 * since the backend was created: 0 when there is none, otherwise -1 with the
 * message (op, file:line, CUDA's text) in msg. Errors stay recorded: a
 * failed CUDA context cannot be trusted afterwards. */
int moe_cuda_backend_check(moe_backend *be, char *msg, size_t cap);

#ifdef __cplusplus
}
#endif

#endif
