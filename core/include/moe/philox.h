/*
 * Philox4x32-10 counter-based random numbers (Salmon et al., SC'11).
 *
 * A draw is a pure function of (key, element index): the CPU and CUDA paths
 * of a plugin get the same numbers for the same element, whatever the thread
 * layout, and a resumed run draws what the uninterrupted one drew.
 *
 * Mapping from the host's moe_rng_key: Philox key = seed (64 bits, with the
 * stream mixed into the high word); counter = (block lo, block hi, step, layer)
 * where block = element / 4 and the 4 outputs of a block serve elements
 * 4*block .. 4*block+3.
 */
#ifndef MOE_PHILOX_H
#define MOE_PHILOX_H

#include <math.h>
#include <stdint.h>
#include "abi.h"

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD static inline
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_u32x4 { uint32_t v[4]; } moe_u32x4;

MOE_HD void moe_philox_mulhilo(uint32_t a, uint32_t b, uint32_t *hi, uint32_t *lo) {
    uint64_t p = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(p >> 32);
    *lo = (uint32_t)p;
}

/* The raw generator: 10 rounds over a 128-bit counter with a 64-bit key. */
MOE_HD moe_u32x4 moe_philox4x32_10(moe_u32x4 ctr, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        uint32_t hi0, lo0, hi1, lo1;
        moe_philox_mulhilo(0xD2511F53u, ctr.v[0], &hi0, &lo0);
        moe_philox_mulhilo(0xCD9E8D57u, ctr.v[2], &hi1, &lo1);
        moe_u32x4 next;
        next.v[0] = hi1 ^ ctr.v[1] ^ k0;
        next.v[1] = lo1;
        next.v[2] = hi0 ^ ctr.v[3] ^ k1;
        next.v[3] = lo0;
        ctr = next;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return ctr;
}

/* The four 32-bit words of block `block` for this key. */
MOE_HD moe_u32x4 moe_rng_block(moe_rng_key key, uint64_t block) {
    moe_u32x4 ctr;
    ctr.v[0] = (uint32_t)block;
    ctr.v[1] = (uint32_t)(block >> 32);
    ctr.v[2] = (uint32_t)key.step;
    ctr.v[3] = key.layer;
    uint32_t k0 = (uint32_t)key.seed;
    uint32_t k1 = (uint32_t)(key.seed >> 32) ^ (key.stream * 0x85EBCA6Bu);
    return moe_philox4x32_10(ctr, k0, k1);
}

/* Uniform in (0, 1]: 24 random bits, never 0 so log() is safe. */
MOE_HD float moe_u32_to_unit(uint32_t x) {
    return (float)((x >> 8) + 1u) * (1.0f / 16777216.0f);
}

/* The 32-bit word for one element. */
MOE_HD uint32_t moe_rng_u32(moe_rng_key key, uint64_t element) {
    moe_u32x4 b = moe_rng_block(key, element >> 2);
    return b.v[element & 3u];
}

/* Uniform in (0, 1] for one element. */
MOE_HD float moe_rng_uniform(moe_rng_key key, uint64_t element) {
    return moe_u32_to_unit(moe_rng_u32(key, element));
}

/* Standard normal for one element: Box-Muller on the element's block; words
 * (0,1) give elements 4b and 4b+1, words (2,3) give 4b+2 and 4b+3. Computed
 * in double so the CPU and CUDA math libraries agree to the float result in
 * all but the rarest cases. */
MOE_HD float moe_rng_normal(moe_rng_key key, uint64_t element) {
    moe_u32x4 b = moe_rng_block(key, element >> 2);
    unsigned lane = (unsigned)(element & 3u);
    unsigned pair = lane >> 1;
    double u1 = (double)moe_u32_to_unit(b.v[2 * pair]);
    double u2 = (double)moe_u32_to_unit(b.v[2 * pair + 1]);
    double r = sqrt(-2.0 * log(u1));
    double theta = 6.283185307179586 * u2;
    return (float)((lane & 1u) ? r * sin(theta) : r * cos(theta));
}

#ifdef __cplusplus
}
#endif
#endif
