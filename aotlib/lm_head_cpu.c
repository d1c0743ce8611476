/* The softmax cross-entropy of a block of logits on CPU, in place, one row at a time:
 * the fast path of aotlib.models.LinearCrossEntropy's loop (its torch form, five passes
 * over the block, is the reference; tests compare the two). aotlib.native builds it.
 *
 * For each row of logits l (V,) with target t, and scale = 1 / N (the mean over the
 * batch's N rows):
 *   m = max l,  z = sum exp(l - m),  loss += log z + m - l_t,
 *   l <- (exp(l - m) / z - onehot_t) * scale   (the loss's gradient with respect to l).
 * A row (16 KB at V = 4096) stays in L1 through its three sweeps (max, exp and sum,
 * scale), so the block is read and written once. The losses are summed in double.
 */
#include <math.h>
#include <stdint.h>

#include "native_math.h"

int softmax_xent_rows(float *logits, const int64_t *targets, int64_t rows, int64_t V,
                      float scale, double *loss) {
    for (int64_t i = 0; i < rows; i++) {
        float *restrict l = logits + i * V;
        int64_t t = targets[i];
        if (t < 0 || t >= V) return 2;
        float lane[16];
        for (int v = 0; v < 16; v++) lane[v] = -INFINITY;
        int64_t q = 0;
        for (; q + 16 <= V; q += 16)
            for (int v = 0; v < 16; v++) lane[v] = l[q + v] > lane[v] ? l[q + v] : lane[v];
        float m = -INFINITY;
        for (; q < V; q++) m = l[q] > m ? l[q] : m;
        for (int v = 0; v < 16; v++) m = lane[v] > m ? lane[v] : m;
        float picked = l[t];
        for (int v = 0; v < 16; v++) lane[v] = 0.0f;
        q = 0;
        for (; q + 16 <= V; q += 16)
            for (int v = 0; v < 16; v++) {
                float e = exp_f(l[q + v] - m);
                l[q + v] = e;
                lane[v] += e;
            }
        float z = 0.0f;
        for (; q < V; q++) {
            l[q] = exp_f(l[q] - m);
            z += l[q];
        }
        for (int v = 0; v < 16; v++) z += lane[v];
        float inv = scale / z;
        for (q = 0; q < V; q++) l[q] *= inv;
        l[t] -= scale;
        *loss += (double)logf(z) + (double)m - (double)picked;
    }
    return 0;
}
