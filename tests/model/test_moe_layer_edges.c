/*
 * test_moe_layer_edges: contracts of the MoE layer API beyond the training
 * path that TinyMoE exercises (the model never calls these).
 *
 *   eval_backward   moe_layer_backward after moe_layer_forward(training = 0)
 *                   must return the gradient of THAT forward. noisy_topk
 *                   with learned noise routes on l' = l in evaluation, so
 *                   dW_noise must be 0 and dx must not carry the noise path.
 *                   softk (which ignores the flag) is the control.
 *   T_above_max     moe_layer_forward with T > cfg.max_tokens must return
 *                   -1 with a message, not write past the activation
 *                   buffers sized for max_tokens (run in a child process so
 *                   a crash is reported as a failure, not the end of the
 *                   test program).
 */
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "layer_harness.h"

static void test_T_above_max(void) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        lcase lc = {"T_above_max", "softk", NOOPT, LIN, 0, GELU, 1, 0, 0, 1.0, 2, MAX_T, 1, 0.1f, 0.05f, PROBE_FULL, -1};
        harness h;
        if (h_open(&h, &lc, 3) != 0) _exit(3);
        int T = MAX_T + 1;
        float *x = calloc((size_t)T * h.d, sizeof(float)), *y = calloc((size_t)T * h.d, sizeof(float));
        int32_t *ids = calloc((size_t)T, sizeof(int32_t));
        for (int i = 0; i < T * h.d; ++i) x[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
        char err[1024] = "";
        double aux = 0.0;
        int rc = moe_layer_forward(&h.L, x, ids, T, 1, h.key, NULL, y, &aux, err, sizeof err);
        if (rc == 0) fprintf(stderr, "  T_above_max: forward with T = %d > max_tokens = %d returned 0\n", T, MAX_T);
        else fprintf(stderr, "  T_above_max: refused: %s\n", err);
        free(x);
        free(y);
        free(ids);
        h_close(&h);
        _exit(rc == -1 && err[0] != '\0' ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "T_above_max: moe_layer_forward with T > max_tokens must return -1 with a message (child %s %d)",
              WIFEXITED(status) ? "exited with" : "killed by signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
}

static void test_eval_backward(void) {
    static const lcase cases[] = {
        {"eval_backward softk (control)", "softk", NOOPT, LIN, 0, GELU, 1, 0, 0, 2.0, 2, 12, 0, 0.1f, 0.05f,
         PROBE_FULL, 0},
        {"eval_backward noisy_topk learned", "noisy_topk", OPT_B("learned", 1), LIN, 0, GELU, 1, 0, 0, 2.0, 2, 12, 0,
         0.1f, 0.05f, PROBE_FULL, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        harness h;
        if (h_open(&h, &cases[i], 70 + i) == 0) gradcheck(&h);
        h_close(&h);
    }
}

int main(void) {
    test_T_above_max(); /* first: fork before anything else has run */
    test_eval_backward();
    return moe_test_summary("test_model_moe_layer_edges");
}
