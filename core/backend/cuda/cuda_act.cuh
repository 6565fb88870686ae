/*
 * The activation functions and their derivatives on the device, shared by
 * the activation ops (cuda_norm_act.cu) and the experts' fused MLP
 * (cuda_ffn.cu). The formulas are those of the CPU (cpu_ops.c).
 */
#ifndef MOE_CUDA_ACT_CUH
#define MOE_CUDA_ACT_CUH

/* GPT-2's GELU: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). */
#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_CUBE 0.044715f

__device__ __forceinline__ float gelu(float x) {
    float u = GELU_SCALE * (x + GELU_CUBE * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float x) {
    float u = GELU_SCALE * (x + GELU_CUBE * x * x * x);
    float th = tanhf(u);
    float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBE * x * x);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x * sigmoidf_(x); }
/* d/dx x s(x) = s + x s (1 - s) */
__device__ __forceinline__ float silu_grad(float x) {
    float s = sigmoidf_(x);
    return s * (1.0f + x * (1.0f - s));
}

#endif
