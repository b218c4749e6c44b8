/* Exact top-k of latent-major pre-activations in one streaming pass (see saelab/saes/native.py).
 *
 * pre is [n, ld] float32, row i = latent i, column r = token r. For every token r in [0, rows), select the k
 * largest pre[i, r] + bias[i] and write them, unsorted, to values[r * k ...] and indices[r * k ...].
 *
 * Each thread owns a range of tokens (columns) and streams every latent row over it, so memory is read once and in
 * order. Each token keeps a buffer of candidates and a threshold (the k-th best so far); a candidate is compared
 * with the threshold, which after the first few hundred latents almost nothing beats, so the inner loop is a
 * vectorised compare of 8 values against 8 thresholds (AVX2; plain C elsewhere). NaN never enters (a NaN
 * pre-activation surfaces as a non-finite loss instead).
 *
 * Ties go to the lower latent: the selection is the k largest under (value descending, latent ascending), a strict
 * total order, so the set and its order in the output depend only on the token's column, never on the thread count
 * or on when a buffer happened to be compacted. Latents arrive in increasing order, so a newcomer equal to the
 * threshold always loses to the kept entry holding it: the streaming test stays a strict ">".
 */
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <pthread.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define TILE 16     /* threads split the tokens in multiples of this */
#ifndef CAPACITY
#define CAPACITY 4  /* candidate buffer per token, in multiples of k */
#endif

/* Whether (va, ia) ranks above (vb, ib): the larger value, and among equal values the lower latent. */
static inline int ranks_above(float va, int64_t ia, float vb, int64_t ib) {
    return va > vb || (va == vb && ia < ib);
}

/* Move the k best of v[0..m) (with their indices) to the front under `ranks_above` (quickselect). The indices are
 * distinct, so the order is strict and the kept set is exactly defined whatever the pivots. */
static void keep_largest(float *v, int64_t *ix, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        const float pivot = v[mid];
        const int64_t pivot_ix = ix[mid];
        int64_t a = lo, b = hi;
        while (a <= b) {
            while (ranks_above(v[a], ix[a], pivot, pivot_ix)) a++;
            while (ranks_above(pivot, pivot_ix, v[b], ix[b])) b--;
            if (a <= b) {
                float tv = v[a];
                v[a] = v[b];
                v[b] = tv;
                int64_t ti = ix[a];
                ix[a] = ix[b];
                ix[b] = ti;
                a++;
                b--;
            }
        }
        if (k - 1 <= b) {
            hi = b;
        } else if (k - 1 >= a) {
            lo = a;
        } else {
            break;
        }
    }
}

/* Shrink a token's buffer to its k largest; returns the smallest kept value, the token's new threshold. */
static float compact(float *v, int64_t *ix, int64_t *count, int64_t k) {
    keep_largest(v, ix, *count, k);
    *count = k;
    float least = v[0];
    for (int64_t j = 1; j < k; j++) least = v[j] < least ? v[j] : least;
    return least;
}

/* Tokens [c0, c1): every latent row streamed left to right over those columns. Each token appends what beats its
 * threshold to a buffer of CAPACITY·k entries; a full buffer is cut back to its k largest, which raises the
 * threshold to their minimum. Returns 3 when a token ends with fewer than k finite candidates (NaN or -inf), so the
 * caller can fall back to torch.topk, which orders NaN first. */
static int select_block(const float *pre, int64_t n, int64_t ld, const float *bias, int64_t c0, int64_t c1,
                        int64_t k, float *values, int64_t *indices, float *bv, int64_t *bi, int64_t *count, float *thr) {
    const int64_t width = c1 - c0, cap = CAPACITY * k;
    int status = 0;
    for (int64_t t = 0; t < width; t++) {
        thr[t] = -INFINITY;
        count[t] = 0;
    }
    for (int64_t i = 0; i < n; i++) {
        const float *row = pre + i * ld + c0;
        const float b = bias[i];
        int64_t t0 = 0;
#ifdef __AVX2__
        const __m256 bias8 = _mm256_set1_ps(b);
        for (; t0 + 8 <= width; t0 += 8) {
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(row + t0), bias8);
            unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_loadu_ps(thr + t0), _CMP_GT_OQ));
            while (mask) {
                const int64_t t = t0 + __builtin_ctz(mask);
                mask &= mask - 1;
                bv[t * cap + count[t]] = row[t] + b;
                bi[t * cap + count[t]] = i;
                if (++count[t] == cap) thr[t] = compact(bv + t * cap, bi + t * cap, count + t, k);
            }
        }
#endif
        for (; t0 < width; t0++) {
            const float v = row[t0] + b;
            if (v > thr[t0]) {
                bv[t0 * cap + count[t0]] = v;
                bi[t0 * cap + count[t0]] = i;
                if (++count[t0] == cap) thr[t0] = compact(bv + t0 * cap, bi + t0 * cap, count + t0, k);
            }
        }
    }
    for (int64_t t = 0; t < width; t++) {
        if (count[t] < k) {
            status = 3;
            break;
        }
        if (count[t] > k) compact(bv + t * cap, bi + t * cap, count + t, k);
        for (int64_t j = 0; j < k; j++) {
            values[(c0 + t) * k + j] = bv[t * cap + j];
            indices[(c0 + t) * k + j] = bi[t * cap + j];
        }
    }
    return status;
}

/* Tokens [c0, c1), with candidate buffers for all of them: a range of tokens as wide as possible keeps each latent
 * row's read long and sequential (blocks of 512 tokens, whose buffers fit in L2, were up to 1.5x slower). */
static int select_columns(const float *pre, int64_t n, int64_t ld, const float *bias, int64_t c0, int64_t c1,
                          int64_t k, float *values, int64_t *indices) {
    const int64_t width = c1 - c0, cap = CAPACITY * k;
    float *bv = malloc(sizeof(float) * width * cap);
    int64_t *bi = malloc(sizeof(int64_t) * width * cap);
    int64_t *count = malloc(sizeof(int64_t) * width);
    float *thr = malloc(sizeof(float) * width);
    int status = (bv == NULL || bi == NULL || count == NULL || thr == NULL);
    if (!status) status = select_block(pre, n, ld, bias, c0, c1, k, values, indices, bv, bi, count, thr);
    free(bv);
    free(bi);
    free(count);
    free(thr);
    return status;
}

typedef struct {
    const float *pre;
    const float *bias;
    float *values;
    int64_t *indices;
    int64_t n, ld, k, c0, c1;
    int status;
} job;

static void *run_job(void *arg) {
    job *jb = (job *)arg;
    jb->status = select_columns(jb->pre, jb->n, jb->ld, jb->bias, jb->c0, jb->c1, jb->k, jb->values, jb->indices);
    return NULL;
}

/* Returns 0 on success, nonzero when memory or threads could not be had (the caller then falls back). */
int saelab_topk_latent_major(const float *pre, int64_t n, int64_t ld, int64_t rows, const float *bias, int64_t k,
                             float *values, int64_t *indices, int64_t n_threads) {
    if (k <= 0 || rows <= 0) return 0;
    if (k > n) return 2;
    int64_t tiles = (rows + TILE - 1) / TILE;  /* threads split the tokens in whole tiles */
    if (n_threads < 1) n_threads = 1;
    if (n_threads > tiles) n_threads = tiles;
    if (n_threads > 64) n_threads = 64;
    job jobs[64];
    pthread_t threads[64];
    int started[64] = {0};
    for (int64_t w = 0; w < n_threads; w++) {
        int64_t c0 = TILE * (tiles * w / n_threads), c1 = TILE * (tiles * (w + 1) / n_threads);
        jobs[w] = (job){pre, bias, values, indices, n, ld, k, c0, c1 < rows ? c1 : rows, 1};
    }
    for (int64_t w = 1; w < n_threads; w++) started[w] = pthread_create(&threads[w], NULL, run_job, &jobs[w]) == 0;
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int64_t w = 1; w < n_threads; w++) {
        if (started[w]) {
            pthread_join(threads[w], NULL);
        } else {
            run_job(&jobs[w]);
        }
        status |= jobs[w].status;
    }
    return status;
}
