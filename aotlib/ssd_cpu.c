/* The chunked SSD's (Q x Q) work on CPU: the masked decay matrix of each chunk and head,
 * forward, and what its backward needs from the gradient reaching it, each in one pass
 * (aotlib.ssd_chunks.masked_decay and aotlib.ssd_grad). The torch forms build L from
 * sub-chunk decays (a small matmul, segment sums, exps), then mask and scale it, and in
 * the backward multiply, sum over heads and reduce rows and columns, one tensor-wide pass
 * per op; here each (chunk, head) tile is written or read once, while it is in L1.
 *
 * Per chunk of Q steps and head (dA = dt A <= 0, the head's group's C B^T):
 *
 *   L[t, s] = exp(dA_{s+1} + ... + dA_t)  for s <= t,  0 above the diagonal
 *   M = L o tril(C B^T) diag(dt) + diag(D)            (the forward's matrix; the
 *       backward's P is the same with dt = 1 and no D)
 *
 * L is built as `aotlib.ssd_chunks.decay_matrix` builds it: with the chunk cut into
 * sub-chunks of R steps, an entry [t, s] with s in an earlier sub-chunk J than t's I is
 * the product of three decays computed once per chunk (`ChunkDecays`),
 *     L[t, s] = into_t between[I, J] out_s,
 * and only the diagonal (R x R) blocks take exps, of sums taken directly over their own
 * steps (acc[s] += dA_t, in double), never a difference of two longer sums: no
 * cancellation, however negative the sums. (Exps of every entry took 3x as long.)
 *
 * Backward, given dP = dY (dt x)^T per head (the gradient reaching P):
 *   d(C B^T) = tril(sum over the group's heads of dP o L)
 *   Z = dP o L o tril(C B^T),  dcs_t = sum_s Z[t, s] - sum_u Z[u, t]
 * (Z is the gradient reaching L's exponents; aotlib.ssd_grad carries dcs on to dt and A.)
 *
 * Layout: dA, dt, into and out (K, h, Q) (into and out as (h, Q / R, R)) and between
 * (K, h, Q / R, Q / R) with each chunk's part contiguous and chunks `sk` (`sb` for
 * between) floats apart (a block of chunks may be every c-th row of the decays); C B^T
 * (K, g, Q, Q), M and dP (K, h, Q, Q), d(C B^T) (K, g, Q, Q) and dcs (K, h, Q)
 * contiguous; heads h = g hg, group j holding heads j hg .. (j + 1) hg - 1. `out` is
 * out_dt (dt_s times the decay from s to its sub-chunk's end) for M, plain for P.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_math.h"

/* f(..., Q, R) with Q and R as constants in the common cases */
#define SPECIALISED(f, ...)                                                                 \
    do {                                                                                    \
        if (Q == 64 && R == 16) f(__VA_ARGS__, 64, 16);                                     \
        else if (Q == 32 && R == 8) f(__VA_ARGS__, 32, 8);                                  \
        else f(__VA_ARGS__, Q, R);                                                          \
    } while (0)

/* One (chunk, head) tile of L: `start` computes its diagonal blocks, then `row(t)` gives
 * the factors of row t. */
typedef struct {
    const float *into, *out, *between;
    float *ex;     /* (Q, R): the diagonal blocks' exponents, then L there (0 above) */
    float *mask;   /* (R, R): [v <= u] */
    float *ones;   /* (Q,): 1, for a row's sum as a dot product */
    float *across; /* between[I, J(s)] out_s for s before t's sub-chunk I, 0 from I R on */
} Tile;

/* The diagonal blocks of a tile, L[I R + u, I R + v] = exp(dA_{v+1} + ... + dA_u) for
 * v <= u, into T->ex as (Q, R). The sums run a row at a time (acc[v] += dA_u, in double),
 * the exps over the whole (Q, R) at once afterwards: one exp's chain of dependent steps
 * per row, alone, left the core waiting (measured 3x slower). The callers specialise Q
 * and R (64 and 16, 32 and 8: Mamba-2's chunks) so that every loop is whole vectors of a
 * known count: loops of varying length, with their remainders, cost more than the
 * arithmetic. */
static inline void start(Tile *T, const float *dA, const float *into, const float *out,
                         const float *between, const int64_t Q, const int64_t R) {
    T->into = into, T->out = out, T->between = between;
    double acc[R];
    for (int64_t v = 0; v < R; v++) acc[v] = 0.0;
    for (int64_t t = 0; t < Q; t++) {
        int64_t u = t % R;
        double a = dA[t];
        for (int64_t v = 0; v < R; v++) acc[v] = v < u ? acc[v] + a : 0.0;
        for (int64_t v = 0; v < R; v++) T->ex[t * R + v] = (float)acc[v];
    }
    for (int64_t I = 0; I < Q / R; I++) /* a product with 0 or 1: exp_f is finite */
        for (int64_t j = 0; j < R * R; j++)
            T->ex[I * R * R + j] = exp_f(T->ex[I * R * R + j]) * T->mask[j];
}

/* Row t: refreshes T->across at a sub-chunk's first row; returns n0 = I R, where t's
 * sub-chunk I starts: L[t, s] = into_t across[s] for s < n0 (0 from n0 on), and
 * ex[t R + s - n0] for n0 <= s < n0 + R, 0 beyond. */
static inline int64_t row(const Tile *T, int64_t t, const int64_t Q, const int64_t R) {
    int64_t I = t / R, n0 = I * R;
    if (t == n0) { /* a new sub-chunk: the factors between[I, J] out_s of the earlier ones */
        const float *restrict bI = T->between + I * (Q / R), *restrict o = T->out;
        float *restrict x = T->across;
        for (int64_t s = 0; s < Q; s++) x[s] = s < n0 ? bI[s / R] * o[s] : 0.0f;
    }
    return n0;
}

/* n floats on a cache line's boundary (whole vectors never straddle two lines), or NULL */
static float *new_floats(int64_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    return aligned_alloc(64, bytes);
}

static int tile_alloc(Tile *T, int64_t Q, int64_t R) {
    T->ex = new_floats(Q * R);
    T->mask = new_floats(R * R);
    T->ones = new_floats(Q);
    T->across = new_floats(Q);
    if (!T->ex || !T->mask || !T->ones || !T->across) return 1;
    for (int64_t s = 0; s < Q; s++) T->ones[s] = 1.0f;
    for (int64_t u = 0; u < R; u++)
        for (int64_t v = 0; v < R; v++) T->mask[u * R + v] = v <= u;
    return 0;
}

static void tile_free(Tile *T) {
    free(T->ex);
    free(T->mask);
    free(T->ones);
    free(T->across);
}

/* One tile of M: each row of L times C B^T's (the whole row, `across` being 0 from the
 * diagonal block on), then the diagonal block with dt (out_dt holds the earlier
 * columns'), D on the diagonal. */
static inline void m_tile(const Tile *T, const float *restrict cb, const float *restrict w,
                          float d, float *restrict m, const int64_t Q, const int64_t R) {
    for (int64_t t = 0; t < Q; t++) {
        int64_t n0 = row(T, t, Q, R);
        const float *restrict cb_t = cb + t * Q, *restrict x = T->across;
        const float *restrict dg = T->ex + t * R;
        float *restrict m_t = m + t * Q, it = T->into[t];
        for (int64_t s = 0; s < Q; s++) m_t[s] = it * x[s] * cb_t[s];
        float *restrict md = m_t + n0;
        const float *restrict cd = cb_t + n0;
        if (w)
            for (int64_t v = 0; v < R; v++) md[v] = dg[v] * cd[v] * w[n0 + v];
        else
            for (int64_t v = 0; v < R; v++) md[v] = dg[v] * cd[v];
        if (d != 0.0f) m_t[t] += d;
    }
}

/* One head's share of d(C B^T) (added into dcb) and its dcs, from its dP tile: the whole
 * row first (0 from the diagonal block on), then the diagonal block. */
static inline void dm_tile(const Tile *T, const float *restrict cb, const float *restrict dp,
                           float *restrict dcb, float *restrict z, float *restrict col,
                           float *restrict dcs, const int64_t Q, const int64_t R) {
    for (int64_t s = 0; s < Q; s++) col[s] = 0.0f;
    for (int64_t t = 0; t < Q; t++) {
        int64_t n0 = row(T, t, Q, R);
        const float *restrict cb_t = cb + t * Q, *restrict dp_t = dp + t * Q;
        const float *restrict x = T->across, *restrict dg = T->ex + t * R;
        float *restrict dcb_t = dcb + t * Q, it = T->into[t];
        for (int64_t s = 0; s < Q; s++) {
            float v = dp_t[s] * (it * x[s]); /* dP o L */
            dcb_t[s] += v;
            z[s] = v * cb_t[s];
            col[s] += z[s];
        }
        const float *restrict dp_d = dp_t + n0, *restrict cb_d = cb_t + n0;
        float *restrict dcb_d = dcb_t + n0, *restrict z_d = z + n0, *restrict col_d = col + n0;
        for (int64_t v = 0; v < R; v++) {
            float e = dp_d[v] * dg[v]; /* 0 beyond t */
            dcb_d[v] += e;
            z_d[v] = e * cb_d[v];
            col_d[v] += z_d[v];
        }
        dcs[t] = dot_f(z, T->ones, Q); /* row t's sum; columns subtracted below */
    }
    for (int64_t t = 0; t < Q; t++) dcs[t] -= col[t];
}

/* M (K, h, Q, Q) = L o tril(CB) diag(dt) + diag(D); dt NULL: 1 (then `out` is plain), D
 * NULL: 0. */
int ssd_masked_decay(const float *dA, const float *dt, const float *into, const float *out,
                     const float *between, int64_t sk, int64_t sb, const float *CB,
                     const float *D, int64_t K, int64_t h, int64_t g, int64_t Q, int64_t R,
                     float *M) {
    Tile T;
    if (tile_alloc(&T, Q, R)) {
        tile_free(&T);
        return 1;
    }
    int64_t hg = h / g;
    for (int64_t k = 0; k < K; k++)
        for (int64_t i = 0; i < h; i++) {
            int64_t o = k * sk + i * Q;
            const float *bt = between + k * sb + i * (Q / R) * (Q / R);
            SPECIALISED(start, &T, dA + o, into + o, out + o, bt);
            const float *w = dt ? dt + o : NULL, *cb = CB + (k * g + i / hg) * Q * Q;
            float d = D ? D[i] : 0.0f, *m = M + (k * h + i) * Q * Q;
            SPECIALISED(m_tile, &T, cb, w, d, m);
        }
    tile_free(&T);
    return 0;
}

/* dCB (K, g, Q, Q) = tril(sum_group dP o L), dcs (K, h, Q) = Z's row sums - column sums
 * (`out` plain: L without dt) */
int ssd_masked_decay_backward(const float *dA, const float *into, const float *out,
                              const float *between, int64_t sk, int64_t sb, const float *CB,
                              const float *dP, int64_t K, int64_t h, int64_t g, int64_t Q,
                              int64_t R, float *dCB, float *dcs) {
    Tile T;
    float *z = new_floats(Q), *col = new_floats(Q); /* a row of Z; Z's column sums */
    if (tile_alloc(&T, Q, R) || !z || !col) {
        tile_free(&T);
        free(z);
        free(col);
        return 1;
    }
    int64_t hg = h / g;
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < g; j++) {
            const float *cb = CB + (k * g + j) * Q * Q;
            float *dcb = dCB + (k * g + j) * Q * Q;
            memset(dcb, 0, Q * Q * sizeof(float));
            for (int64_t i = j * hg; i < (j + 1) * hg; i++) {
                int64_t o = k * sk + i * Q;
                const float *bt = between + k * sb + i * (Q / R) * (Q / R);
                SPECIALISED(start, &T, dA + o, into + o, out + o, bt);
                const float *dp = dP + (k * h + i) * Q * Q;
                float *d = dcs + (k * h + i) * Q;
                SPECIALISED(dm_tile, &T, cb, dp, dcb, z, col, d);
            }
        }
    tile_free(&T);
    free(z);
    free(col);
    return 0;
}

/* The backward's per-(step, head) dot products over p, around the state terms' matmuls
 * (aotlib.ssd_grad). a (K, Q, h, p) with chunks `sak` and steps `sat` floats apart (x or
 * dY in place), b (K, Q, h, p) contiguous (a matmul's time-major output), w (K, Q, h) and
 * w2 (K, h, Q) (or NULL) with chunks `swk` floats apart, each chunk's part contiguous:
 *
 *   out[k, i, t] = w[k, t, i] w2[k, i, t] <a[k, t, i, :], b[k, t, i, :]>
 *   and with `scale_b`, afterwards b[k, t, i, :] *= w[k, t, i].
 *
 * F dF (w = F, dY and S C) and E dE with d xd (w = E, w2 = dt, x and G B, b scaled by E
 * in place): one pass each instead of four to five tensor-wide ones. */
int ssd_row_dots(const float *a, int64_t sak, int64_t sat, float *b, const float *w,
                 const float *w2, int64_t swk, int scale_b, int64_t K, int64_t Q, int64_t h,
                 int64_t p, float *out) {
    for (int64_t k = 0; k < K; k++)
        for (int64_t t = 0; t < Q; t++)
            for (int64_t i = 0; i < h; i++) {
                const float *restrict a_ = a + k * sak + t * sat + i * p;
                float *restrict b_ = b + ((k * Q + t) * h + i) * p;
                float wt = w[k * swk + t * h + i];
                float s = dot_f(a_, b_, p) * wt;
                if (w2) s *= w2[k * swk + i * Q + t];
                out[(k * h + i) * Q + t] = s;
                if (scale_b)
                    for (int64_t q = 0; q < p; q++) b_[q] *= wt;
            }
    return 0;
}

/* The inputs' gradients at the end of a block's backward, one pass over x, dY and d xd:
 *
 *   d xd = dxd + dxd_h^T            (the state part, time-major, or NULL; and the diagonal
 *                                    blocks' part P^T dY, heads first (K, h, Q, p))
 *   dx = dt d xd + D dY,   ddt_direct[k, i, t] = <x, d xd>,   dD[i] += sum <dY, x>
 *
 * x, dY and dx (K, Q, h, p) with chunks and steps `s.k`, `s.t` floats apart (their own
 * strides: views into the whole tensors); dt (K, h, Q) with chunks `sdk` apart; dD in
 * double (NULL without D). */
int ssd_input_grads(const float *x, int64_t sxk, int64_t sxt, const float *dy, int64_t syk,
                    int64_t syt, const float *dxd, const float *dxd_h, const float *dt,
                    int64_t sdk, const float *D, int64_t K, int64_t Q, int64_t h, int64_t p,
                    float *dx, int64_t sok, int64_t sot, float *ddt, double *dD) {
    float *g = new_floats(p); /* a row of d xd */
    if (!g) return 1;
    for (int64_t k = 0; k < K; k++)
        for (int64_t t = 0; t < Q; t++)
            for (int64_t i = 0; i < h; i++) {
                const float *restrict x_ = x + k * sxk + t * sxt + i * p;
                const float *restrict y_ = dy + k * syk + t * syt + i * p;
                const float *restrict e_ = dxd_h + ((k * h + i) * Q + t) * p;
                float *restrict o_ = dx + k * sok + t * sot + i * p, *restrict g_ = g;
                if (dxd) {
                    const float *restrict s_ = dxd + ((k * Q + t) * h + i) * p;
                    for (int64_t q = 0; q < p; q++) g_[q] = s_[q] + e_[q];
                } else {
                    for (int64_t q = 0; q < p; q++) g_[q] = e_[q];
                }
                float w = dt[k * sdk + i * Q + t], d = D ? D[i] : 0.0f;
                ddt[(k * h + i) * Q + t] = dot_f(x_, g_, p);
                for (int64_t q = 0; q < p; q++) o_[q] = w * g_[q] + d * y_[q];
                if (D) dD[i] += dot_f(y_, x_, p);
            }
    free(g);
    return 0;
}

/* A block's last step for dt and A, one call instead of a dozen small ops (their dispatch
 * was most of their time): per chunk and head, with c_t the gradient reaching the
 * exponent cs_t (`dcs` from ssd_masked_decay_backward, plus F dF, minus E dE, the chunk's
 * last step also + sum_t E dE + W dW; each term NULL when 0),
 *
 *   ddA_k = sum_{t >= k} c_t,   ddt_k = ddt_direct_k + A ddA_k,   dA += sum_k dt_k ddA_k
 *
 * dcs, F dF, E dE and ddt_direct (K, h, Q) and W dW (K, h) contiguous; dt (K, h, Q) and
 * ddt (the output) with chunks `sdk` and `sok` floats apart, each chunk's (h, Q)
 * contiguous; dA (h,) in double, added into. The sums run in double (the chunk's sum of
 * E dE cancels against its terms; in float32 dA was 2.5x as far from float64 as torch's
 * form, measured by tests/test_ssd_kernels.py). */
int ssd_exponent_grads(const float *dcs, const float *FdF, const float *EdE, const float *WdW,
                       const float *dt, int64_t sdk, const float *A, const float *ddt_direct,
                       int64_t K, int64_t h, int64_t Q, float *ddt, int64_t sok, double *dA) {
    for (int64_t k = 0; k < K; k++)
        for (int64_t i = 0; i < h; i++) {
            int64_t o = (k * h + i) * Q;
            const float *w = dt + k * sdk + i * Q;
            float *out = ddt + k * sok + i * Q;
            double last = WdW ? WdW[k * h + i] : 0.0, acc = 0.0, da = 0.0;
            if (EdE)
                for (int64_t t = 0; t < Q; t++) last += EdE[o + t];
            for (int64_t t = Q - 1; t >= 0; t--) {
                double c = dcs[o + t];
                if (FdF) c += FdF[o + t];
                if (EdE) c -= EdE[o + t];
                if (t == Q - 1) c += last;
                acc += c; /* ddA_t, in double: E dE's sum cancels against its terms */
                out[t] = (float)(ddt_direct[o + t] + A[i] * acc);
                da += w[t] * acc;
            }
            dA[i] += da;
        }
    return 0;
}
