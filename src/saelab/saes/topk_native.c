/* Exact top-k of latent-major pre-activations in one streaming pass (see saelab/saes/native.py).
 *
 * pre is [n, ld] float32 or bfloat16, row i = latent i, column r = token r. For every token r in [0, rows), select
 * the k largest pre[i, r] + bias[i] (added in float32) and write them, unsorted, to values[r * k ...] and
 * indices[r * k ...].
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

/* Element t of a latent row, as float32 (a bfloat16 is the top half of a float32's bits). */
static inline float load1(const void *row, int64_t t, int bf16) {
    if (!bf16) return ((const float *)row)[t];
    union { uint32_t u; float f; } bits = {(uint32_t)((const uint16_t *)row)[t] << 16};
    return bits.f;
}

#ifdef __AVX2__
static inline __m256 load8(const void *row, int64_t t, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)row + t);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + t));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
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
static int select_block(const void *pre, int bf16, int64_t n, int64_t ld, const float *bias, int64_t c0, int64_t c1,
                        int64_t k, float *values, int64_t *indices, float *bv, int64_t *bi, int64_t *count, float *thr) {
    const int64_t width = c1 - c0, cap = CAPACITY * k;
    int status = 0;
    for (int64_t t = 0; t < width; t++) {
        thr[t] = -INFINITY;
        count[t] = 0;
    }
    for (int64_t i = 0; i < n; i++) {
        const void *row = (const char *)pre + (i * ld + c0) * (bf16 ? 2 : 4);
        const float b = bias[i];
        int64_t t0 = 0;
#ifdef __AVX2__
        const __m256 bias8 = _mm256_set1_ps(b);
        for (; t0 + 8 <= width; t0 += 8) {
            __m256 v = _mm256_add_ps(load8(row, t0, bf16), bias8);
            unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_loadu_ps(thr + t0), _CMP_GT_OQ));
            while (mask) {
                const int64_t t = t0 + __builtin_ctz(mask);
                mask &= mask - 1;
                bv[t * cap + count[t]] = load1(row, t, bf16) + b;
                bi[t * cap + count[t]] = i;
                if (++count[t] == cap) thr[t] = compact(bv + t * cap, bi + t * cap, count + t, k);
            }
        }
#endif
        for (; t0 < width; t0++) {
            const float v = load1(row, t0, bf16) + b;
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
static int select_columns(const void *pre, int bf16, int64_t n, int64_t ld, const float *bias, int64_t c0,
                          int64_t c1, int64_t k, float *values, int64_t *indices) {
    const int64_t width = c1 - c0, cap = CAPACITY * k;
    float *bv = malloc(sizeof(float) * width * cap);
    int64_t *bi = malloc(sizeof(int64_t) * width * cap);
    int64_t *count = malloc(sizeof(int64_t) * width);
    float *thr = malloc(sizeof(float) * width);
    int status = (bv == NULL || bi == NULL || count == NULL || thr == NULL);
    if (!status) status = select_block(pre, bf16, n, ld, bias, c0, c1, k, values, indices, bv, bi, count, thr);
    free(bv);
    free(bi);
    free(count);
    free(thr);
    return status;
}

/* Run fn on each of `count` jobs of `size` bytes from `jobs`: job 0 on this thread, the others on their own (or here,
 * after it, when a thread cannot be started). Each job's first member is its int status; returns their OR. */
static int run_all(void *(*fn)(void *), void *jobs, size_t size, int64_t count) {
    pthread_t threads[64];
    int started[64] = {0};
    char *base = jobs;
    for (int64_t w = 1; w < count; w++) started[w] = pthread_create(&threads[w], NULL, fn, base + w * size) == 0;
    fn(base);
    int status = *(int *)base;
    for (int64_t w = 1; w < count; w++) {
        if (started[w]) {
            pthread_join(threads[w], NULL);
        } else {
            fn(base + w * size);
        }
        status |= *(int *)(base + w * size);
    }
    return status;
}

typedef struct {
    int status;
    const void *pre;
    int bf16;
    const float *bias;
    float *values;
    int64_t *indices;
    int64_t n, ld, k, c0, c1;
} job;

static void *run_job(void *arg) {
    job *jb = (job *)arg;
    jb->status = select_columns(jb->pre, jb->bf16, jb->n, jb->ld, jb->bias, jb->c0, jb->c1, jb->k, jb->values,
                                jb->indices);
    return NULL;
}

/* Returns 0 on success, nonzero when memory or threads could not be had (the caller then falls back). */
static int topk_latent_major(const void *pre, int bf16, int64_t n, int64_t ld, int64_t rows, const float *bias,
                             int64_t k, float *values, int64_t *indices, int64_t n_threads) {
    if (k <= 0 || rows <= 0) return 0;
    if (k > n) return 2;
    int64_t tiles = (rows + TILE - 1) / TILE;  /* threads split the tokens in whole tiles */
    if (n_threads < 1) n_threads = 1;
    if (n_threads > tiles) n_threads = tiles;
    if (n_threads > 64) n_threads = 64;
    job jobs[64];
    for (int64_t w = 0; w < n_threads; w++) {
        int64_t c0 = TILE * (tiles * w / n_threads), c1 = TILE * (tiles * (w + 1) / n_threads);
        jobs[w] = (job){1, pre, bf16, bias, values, indices, n, ld, k, c0, c1 < rows ? c1 : rows};
    }
    return run_all(run_job, jobs, sizeof(job), n_threads);
}

int saelab_topk_latent_major(const float *pre, int64_t n, int64_t ld, int64_t rows, const float *bias, int64_t k,
                             float *values, int64_t *indices, int64_t n_threads) {
    return topk_latent_major(pre, 0, n, ld, rows, bias, k, values, indices, n_threads);
}

int saelab_topk_latent_major_bf16(const uint16_t *pre, int64_t n, int64_t ld, int64_t rows, const float *bias,
                                  int64_t k, float *values, int64_t *indices, int64_t n_threads) {
    return topk_latent_major(pre, 1, n, ld, rows, bias, k, values, indices, n_threads);
}

/* ---- Exact scores of candidates, and the k best of them ------------------------------------------------------
 *
 * x is [rows, d], w [n, d], bias [n], cand [rows, c] (latents; NULL = every latent, c = n), all float32 / int64.
 * For each token r: score(j) = dot(x[r], w[j]) + bias[j] for its candidates, summed in one fixed order (LANES
 * partial sums over strided elements, then a fixed pairwise reduction, then the bias), so a score depends only on
 * the two vectors and the bias, never on the batch, the chunk or the thread count. The k best under (score
 * descending, latent ascending) go to values[r * k ...] / indices[r * k ...] in latent order (so the slots, and every
 * sum over them downstream, do not depend on how the candidates were found), and the k-th best score to kth[r].
 * A NaN score makes the token's values and kth NaN (it surfaces as a non-finite loss). */

#define LANES 16

static inline float exact_dot(const float *a, const float *b, int64_t d) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i + l < d; l++) acc[l] += a[i + l] * b[i + l];
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    return acc[0];
}

typedef struct {
    int status;
    const float *x, *w, *bias;
    const int64_t *cand;
    float *values, *kth;
    int64_t *indices;
    int64_t d, c, k, r0, r1;
} rescore_job;

static void *run_rescore(void *arg) {
    rescore_job *jb = (rescore_job *)arg;
    const int64_t c = jb->c, k = jb->k, d = jb->d;
    float *score = malloc(sizeof(float) * c);
    int64_t *latent = malloc(sizeof(int64_t) * c);
    jb->status = score == NULL || latent == NULL;
    for (int64_t r = jb->r0; r < jb->r1 && !jb->status; r++) {
        const float *xr = jb->x + r * d;
        int nan = 0;
        for (int64_t j = 0; j < c; j++) {
            const int64_t i = jb->cand ? jb->cand[r * c + j] : j;
            score[j] = exact_dot(xr, jb->w + i * d, d) + jb->bias[i];
            latent[j] = i;
            nan |= isnan(score[j]);
        }
        keep_largest(score, latent, c, k);
        for (int64_t j = 1; j < k; j++) {  /* the k kept in latent order (k is small: insertion sort) */
            const float v = score[j];
            const int64_t i = latent[j];
            int64_t m = j;
            for (; m > 0 && latent[m - 1] > i; m--) {
                score[m] = score[m - 1];
                latent[m] = latent[m - 1];
            }
            score[m] = v;
            latent[m] = i;
        }
        float least = score[0];
        for (int64_t j = 0; j < k; j++) {
            least = score[j] < least ? score[j] : least;
            jb->values[r * k + j] = nan ? NAN : score[j];
            jb->indices[r * k + j] = latent[j];
        }
        jb->kth[r] = nan ? NAN : least;
    }
    free(score);
    free(latent);
    return NULL;
}

int saelab_rescore_topk(const float *x, const float *w, const float *bias, const int64_t *cand, int64_t rows,
                        int64_t d, int64_t c, int64_t k, float *values, int64_t *indices, float *kth,
                        int64_t n_threads) {
    if (rows <= 0 || k <= 0) return 0;
    if (k > c) return 2;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > rows) n_threads = rows;
    if (n_threads > 64) n_threads = 64;
    rescore_job jobs[64];
    for (int64_t t = 0; t < n_threads; t++)
        jobs[t] = (rescore_job){1, x, w, bias, cand, values, kth, indices, d, c, k, rows * t / n_threads,
                                rows * (t + 1) / n_threads};
    return run_all(run_rescore, jobs, sizeof(rescore_job), n_threads);
}
