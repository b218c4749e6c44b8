/* Exact top-k of latent-major pre-activations in one streaming pass (see saelab/saes/native.py).
 *
 * pre is [n, ld] float32 or bfloat16, row i = latent i, column r = token r. For every token r in [0, rows), select
 * the k largest pre[i, r] + bias[i] (added in float32) and write them, unsorted, to values[r * k ...] and
 * indices[r * k ...].
 *
 * Each thread owns a range of tokens (columns) and streams every latent row over it, so memory is read once and in
 * order. Each token keeps a buffer of candidates and a threshold (the k-th best so far); a candidate is compared
 * with the threshold, which after the first few hundred latents almost nothing beats, so the inner loop is a
 * vectorised compare of 64 values against 64 thresholds (AVX-512; 8 with AVX2; plain C elsewhere). NaN never enters
 * (a NaN pre-activation surfaces as a non-finite loss instead).
 *
 * What costs time is the first rows, before the thresholds rise: every value enters a buffer there, and a full
 * buffer is cut back to its k best (a selection over CAPACITY·k entries). So the first HEAD_ROWS latents are
 * streamed over tiles of HEAD_TILE tokens, whose buffers stay in L2, and with AVX-512 the cut finds the k-th largest
 * value by quickselect over 16-lane vector partitions and keeps the entries with compresses (4-5x fewer cycles than
 * the scalar quickselect; measured on a 2-core Zen 4, 4,096 tokens: 24,576 bf16 latents, k = 65, 74 -> 29 ms;
 * 4,096 fp32 latents, k = 41, 27 -> 10 ms). With AVX-512 the thresholds also start at lower bounds of each token's
 * k-th largest (`lower_bounds`): from every row, tile by tile, for narrow dictionaries, and from the head rows for
 * wide ones, so that far fewer values enter the buffers (the same measurements: 24 and 7 ms).
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
/* Candidate buffer per token, in multiples of k. With the lower bounds, smaller buffers stay in cache: 3 against 4
 * took 24.1 against 26.9 ms at 24,576 bf16 latents (k = 65) and 6.9 against 7.2 at 4,096 fp32 (k = 41); 2 was 3%
 * faster on the wide bf16 case but 7% slower on the narrow one, 6 and 8 slower on both. */
#define CAPACITY 3
#endif
#ifndef PREFETCH_ROWS
/* Each thread reads a short run of every row, so the hardware prefetcher alone lags: one chunk of 1,366 tokens by
 * 98,304 bf16 latents took 40 ms prefetching nothing ahead, 25-28 ms prefetching 8 rows ahead. */
#define PREFETCH_ROWS 8
#endif
#ifndef HEAD_ROWS
#define HEAD_ROWS 1024
#endif
#ifndef HEAD_TILE
#define HEAD_TILE 256
#endif
#ifndef BOUND_TILE
#define BOUND_TILE 128  /* tokens per tile of `lower_bounds`, used up to BOUND_TILE_VALUES values per tile */
#endif
#ifndef BOUND_Q
#define BOUND_Q 4  /* `lower_bounds` keeps each part's BOUND_Q largest */
#endif
#ifndef BOUND_TILE_VALUES
#define BOUND_TILE_VALUES (1 << 20)
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

#ifndef __AVX512F__
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
#endif

#ifdef __AVX512F__
/* Scratch a compaction of up to `cap` entries needs (bytes): three float buffers for the selection, the kept values,
 * the kept indices and the ties' indices, each with 16 entries of slack for full-vector stores. */
#define SCRATCH_BYTES(cap) ((size_t)((cap) + 16) * (4 * sizeof(float) + 2 * sizeof(int64_t)))

/* The lanes of the 16 entries from i on that lie below n. */
static inline __mmask16 live_lanes(int64_t i, int64_t n) {
    return n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
}

/* The k-th largest of v[0..m) (1 <= k <= m; no NaN: none enters a buffer): quickselect whose partitions split 16
 * values at a time into those above and below the pivot (vector compress), counting the ones equal to it. */
static float kth_largest(const float *v, int64_t m, int64_t k, float *const bufs[3]) {
    const float *src = v;
    int64_t n = m;
    for (;;) {
        if (n <= 16) {
            float a[16];
            for (int64_t i = 0; i < n; i++) {  /* insertion sort, descending */
                float x = src[i];
                int64_t j = i;
                for (; j > 0 && a[j - 1] < x; j--) a[j] = a[j - 1];
                a[j] = x;
            }
            return a[k - 1];
        }
        float lo3 = src[0], mid3 = src[n / 2], hi3 = src[n - 1], t;
        if (lo3 > mid3) { t = lo3; lo3 = mid3; mid3 = t; }
        if (mid3 > hi3) { t = mid3; mid3 = hi3; hi3 = t; }
        if (lo3 > mid3) { mid3 = lo3; }
        const float pivot = mid3;
        float *above = NULL, *below = NULL;
        for (int b = 0; b < 3; b++) {
            if (bufs[b] == src) continue;
            if (above == NULL) above = bufs[b]; else below = bufs[b];
        }
        const __m512 p = _mm512_set1_ps(pivot);
        int64_t na = 0, nb = 0;
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 live = live_lanes(i, n);
            const __m512 x = _mm512_maskz_loadu_ps(live, src + i);
            const __mmask16 ma = _mm512_mask_cmp_ps_mask(live, x, p, _CMP_GT_OQ);
            const __mmask16 mb = _mm512_mask_cmp_ps_mask(live, x, p, _CMP_LT_OQ);
            _mm512_storeu_ps(above + na, _mm512_maskz_compress_ps(ma, x));
            _mm512_storeu_ps(below + nb, _mm512_maskz_compress_ps(mb, x));
            na += __builtin_popcount(ma);
            nb += __builtin_popcount(mb);
        }
        const int64_t equal = n - na - nb;
        if (k <= na) {
            src = above;
            n = na;
        } else if (k <= na + equal) {
            return pivot;
        } else {
            k -= na + equal;
            src = below;
            n = nb;
        }
    }
}

static int ascending(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Shrink a token's buffer to its k largest under `ranks_above`; returns the smallest kept value, the token's new
 * threshold. The k-th largest value tau is found first; the entries above it are kept, and of those equal to it the
 * ones with the lowest latents: the set `keep_largest` keeps, found with vector compares and compresses. */
static float compact(float *v, int64_t *ix, int64_t *count, int64_t k, void *scratch) {
    const int64_t m = *count, room = m + 16;
    float *bufs[3] = {(float *)scratch, (float *)scratch + room, (float *)scratch + 2 * room};
    float *kept_v = (float *)scratch + 3 * room;
    int64_t *kept_i = (int64_t *)(kept_v + room), *ties = kept_i + room;
    const float tau = kth_largest(v, m, k, bufs);
    const __m512 t16 = _mm512_set1_ps(tau);
    int64_t g = 0, e = 0;
    for (int64_t i = 0; i < m; i += 16) {
        const __mmask16 live = live_lanes(i, m);
        const __m512 x = _mm512_maskz_loadu_ps(live, v + i);
        const __mmask16 mg = _mm512_mask_cmp_ps_mask(live, x, t16, _CMP_GT_OQ);
        const __mmask16 me = _mm512_mask_cmp_ps_mask(live, x, t16, _CMP_EQ_OQ);
        const __m512i lo = _mm512_maskz_loadu_epi64((__mmask8)live, ix + i);
        const __m512i hi = _mm512_maskz_loadu_epi64((__mmask8)(live >> 8), ix + i + 8);
        _mm512_storeu_ps(kept_v + g, _mm512_maskz_compress_ps(mg, x));
        _mm512_storeu_si512(kept_i + g, _mm512_maskz_compress_epi64((__mmask8)mg, lo));
        _mm512_storeu_si512(kept_i + g + __builtin_popcount(mg & 0xFF),
                            _mm512_maskz_compress_epi64((__mmask8)(mg >> 8), hi));
        _mm512_storeu_si512(ties + e, _mm512_maskz_compress_epi64((__mmask8)me, lo));
        _mm512_storeu_si512(ties + e + __builtin_popcount(me & 0xFF),
                            _mm512_maskz_compress_epi64((__mmask8)(me >> 8), hi));
        g += __builtin_popcount(mg);
        e += __builtin_popcount(me);
    }
    const int64_t need = k - g;  /* 1 <= need <= e, as tau is the k-th largest */
    if (e > need) qsort(ties, (size_t)e, sizeof(int64_t), ascending);
    for (int64_t j = 0; j < g; j++) {
        v[j] = kept_v[j];
        ix[j] = kept_i[j];
    }
    for (int64_t j = 0; j < need; j++) {
        v[g + j] = tau;
        ix[g + j] = ties[j];
    }
    *count = k;
    return tau;
}
#else
#define SCRATCH_BYTES(cap) ((size_t)0)

/* Shrink a token's buffer to its k largest; returns the smallest kept value, the token's new threshold. */
static float compact(float *v, int64_t *ix, int64_t *count, int64_t k, void *scratch) {
    (void)scratch;
    keep_largest(v, ix, *count, k);
    *count = k;
    float least = v[0];
    for (int64_t j = 1; j < k; j++) least = v[j] < least ? v[j] : least;
    return least;
}
#endif

/* Append (v, i) to token t's buffer of `cap` entries; a full buffer is cut back to its k largest, which raises the
 * token's threshold to their minimum. */
static inline void offer(float *bv, int64_t *bi, int64_t *count, float *thr, int64_t t, int64_t cap, int64_t k,
                         float v, int64_t i, void *scratch) {
    bv[t * cap + count[t]] = v;
    bi[t * cap + count[t]] = i;
    if (++count[t] == cap) thr[t] = compact(bv + t * cap, bi + t * cap, count + t, k, scratch);
}

#ifdef __AVX512F__
static inline __m512 load16(const void *row, int64_t t, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)row + t);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + t));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

/* Offer every set bit of `mask` (tokens t0 + bit) of latent i. */
static inline void offer_mask(unsigned mask, int64_t t0, const void *row, int bf16, float b, int64_t i, float *bv,
                              int64_t *bi, int64_t *count, float *thr, int64_t cap, int64_t k, void *scratch) {
    while (mask) {
        const int64_t t = t0 + __builtin_ctz(mask);
        mask &= mask - 1;
        offer(bv, bi, count, thr, t, cap, k, load1(row, t, bf16) + b, i, scratch);
    }
}

/* Stream latent rows [0, n) of `pre` (row i at pre + i·ld elements; latent id latent0 + i) over tokens [0, width),
 * whose buffers, counts and thresholds are bv/bi/count/thr. Each token appends what beats its threshold to a buffer
 * of CAPACITY·k entries; a full buffer is cut back to its k largest, which raises the threshold to their minimum.
 * Each token appears once per row, so comparing a row's values in blocks of 64 against thresholds read before any
 * of them is offered decides exactly what one-by-one comparison decides. Inlined with a constant `bf16`, so each
 * element type gets its own loop. */
static inline __attribute__((always_inline)) void stream_rows(const void *pre, const int bf16, int64_t n, int64_t ld,
                                                               const float *bias, int64_t latent0, int64_t width,
                                                               int64_t k, float *bv, int64_t *bi, int64_t *count,
                                                               float *thr, void *scratch) {
    const int64_t cap = CAPACITY * k;
    for (int64_t i = 0; i < n; i++) {
        const void *row = (const char *)pre + i * ld * (bf16 ? 2 : 4);
        const float b = bias[i];
        const int64_t latent = latent0 + i;
        int64_t t0 = 0;
#ifdef __AVX512F__
        const __m512 bias16 = _mm512_set1_ps(b);
        const char *ahead = i + PREFETCH_ROWS < n ? (const char *)row + PREFETCH_ROWS * ld * (bf16 ? 2 : 4) : row;
        for (; t0 + 64 <= width; t0 += 64) {
            for (int line = 0; line < (bf16 ? 2 : 4); line++)
                _mm_prefetch(ahead + t0 * (bf16 ? 2 : 4) + 64 * line, _MM_HINT_T0);
            const __mmask16 m0 = _mm512_cmp_ps_mask(_mm512_add_ps(load16(row, t0, bf16), bias16),
                                                    _mm512_loadu_ps(thr + t0), _CMP_GT_OQ);
            const __mmask16 m1 = _mm512_cmp_ps_mask(_mm512_add_ps(load16(row, t0 + 16, bf16), bias16),
                                                    _mm512_loadu_ps(thr + t0 + 16), _CMP_GT_OQ);
            const __mmask16 m2 = _mm512_cmp_ps_mask(_mm512_add_ps(load16(row, t0 + 32, bf16), bias16),
                                                    _mm512_loadu_ps(thr + t0 + 32), _CMP_GT_OQ);
            const __mmask16 m3 = _mm512_cmp_ps_mask(_mm512_add_ps(load16(row, t0 + 48, bf16), bias16),
                                                    _mm512_loadu_ps(thr + t0 + 48), _CMP_GT_OQ);
            if (__builtin_expect((m0 | m1 | m2 | m3) == 0, 1)) continue;
            offer_mask(m0, t0, row, bf16, b, latent, bv, bi, count, thr, cap, k, scratch);
            offer_mask(m1, t0 + 16, row, bf16, b, latent, bv, bi, count, thr, cap, k, scratch);
            offer_mask(m2, t0 + 32, row, bf16, b, latent, bv, bi, count, thr, cap, k, scratch);
            offer_mask(m3, t0 + 48, row, bf16, b, latent, bv, bi, count, thr, cap, k, scratch);
        }
#endif
#ifdef __AVX2__
        const __m256 bias8 = _mm256_set1_ps(b);
        for (; t0 + 8 <= width; t0 += 8) {
            __m256 v = _mm256_add_ps(load8(row, t0, bf16), bias8);
            unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_loadu_ps(thr + t0), _CMP_GT_OQ));
            offer_mask(mask, t0, row, bf16, b, latent, bv, bi, count, thr, cap, k, scratch);
        }
#endif
        for (; t0 < width; t0++) {
            const float v = load1(row, t0, bf16) + b;
            if (v > thr[t0]) offer(bv, bi, count, thr, t0, cap, k, v, latent, scratch);
        }
    }
}

#ifdef __AVX512F__
/* Starting thresholds for tokens [0, width) (a tile) that are already lower bounds of each token's k-th largest
 * value, so the stream inserts little more than its k best instead of every value until the buffers fill.
 *
 * The n latents are split into P = ceil(k / Q) parts (Q = BOUND_Q), and the token's threshold is the least, over the
 * parts, of the part's Q-th largest value: each part then holds Q values at or above it, so at least Q·P >= k values
 * are, and the k-th largest is not below it. The stream's test is a strict ">", so the threshold is set one float
 * below that bound (every value equal to it enters). A part's Q largest are kept per 16 tokens in Q sorted vectors
 * (max / min insertion, so a NaN never enters); the values are read exactly as the stream reads them (the bias added
 * in float32). Q = 4 measured best of 1-8 (2-core Zen 4).
 *
 * It pays where a tile of BOUND_TILE tokens by every latent stays in cache for the stream that rereads it: on a
 * 2-core Zen 4 over 4,096 tokens, 9.9 -> 7.2 ms at 4,096 fp32 latents with k = 41, 15.7 -> 13.6 at 8,192 bf16
 * latents with k = 65; at 16,384 bf16 latents it cost 1 ms, and wider dictionaries keep the head phase, whose long
 * sequential row reads the tiles' short ones cannot match. */
static void lower_bounds(const void *pre, const int bf16, int64_t n, int64_t ld, const float *bias, int64_t width,
                         int64_t k, float *thr) {
    const int64_t parts = (k + BOUND_Q - 1) / BOUND_Q, size = bf16 ? 2 : 4;
    for (int64_t t0 = 0; t0 < width; t0 += 64) {
        __m512 tau[4], best[BOUND_Q][4];
        __mmask16 live[4];
        for (int j = 0; j < 4; j++) {
            tau[j] = _mm512_set1_ps(INFINITY);
            live[j] = t0 + 16 * j < width ? live_lanes(t0 + 16 * j, width) : 0;
        }
        for (int64_t part = 0; part < parts; part++) {
            const int64_t lo = n * part / parts, hi = n * (part + 1) / parts;
            for (int q = 0; q < BOUND_Q; q++)
                for (int j = 0; j < 4; j++) best[q][j] = _mm512_set1_ps(-INFINITY);
            for (int64_t i = lo; i < hi; i++) {
                const char *row = (const char *)pre + i * ld * size;
                if (i + PREFETCH_ROWS < n)
                    for (int line = 0; line < size; line++)
                        _mm_prefetch(row + PREFETCH_ROWS * ld * size + (t0 + 16 * line) * size, _MM_HINT_T0);
                const __m512 b = _mm512_set1_ps(bias[i]);
                for (int j = 0; j < 4; j++) {
                    if (!live[j]) break;
                    const int64_t t = t0 + 16 * j;
                    __m512 v;
                    if (bf16) {
                        const __m256i half = _mm256_maskz_loadu_epi16(live[j], (const uint16_t *)row + t);
                        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
                    } else {
                        v = _mm512_maskz_loadu_ps(live[j], (const float *)row + t);
                    }
                    v = _mm512_add_ps(v, b);
                    /* insertion into the sorted best[.][j]: max(v, a) is a when v is NaN, and min(a, v) is then v
                     * (NaN) again, so a NaN passes down every level and never enters */
                    for (int q = 0; q < BOUND_Q - 1; q++) {
                        const __m512 top = _mm512_max_ps(v, best[q][j]);
                        v = _mm512_min_ps(best[q][j], v);
                        best[q][j] = top;
                    }
                    best[BOUND_Q - 1][j] = _mm512_max_ps(v, best[BOUND_Q - 1][j]);
                }
            }
            for (int j = 0; j < 4; j++) tau[j] = _mm512_min_ps(tau[j], best[BOUND_Q - 1][j]);
        }
        for (int j = 0; j < 4 && live[j]; j++) {
            float bound[16];
            _mm512_storeu_ps(bound, tau[j]);
            for (int l = 0; l < 16 && t0 + 16 * j + l < width; l++)
                thr[t0 + 16 * j + l] = bound[l] == -INFINITY ? -INFINITY : nextafterf(bound[l], -INFINITY);
        }
    }
}
#endif

/* Start tokens [0, width) afresh: empty buffers, thresholds -inf. */
static void reset_tokens(int64_t width, int64_t *count, float *thr) {
    for (int64_t t = 0; t < width; t++) {
        thr[t] = -INFINITY;
        count[t] = 0;
    }
}

/* Write each token's k best (unsorted) to values/indices rows [0, width). Returns 3 when a token ended with fewer
 * than k finite candidates (NaN or -inf), so the caller can fall back to torch.topk, which orders NaN first. */
static int finish_tokens(int64_t width, int64_t k, float *bv, int64_t *bi, int64_t *count, float *values,
                         int64_t *indices, void *scratch) {
    const int64_t cap = CAPACITY * k;
    for (int64_t t = 0; t < width; t++) {
        if (count[t] < k) return 3;
        if (count[t] > k) compact(bv + t * cap, bi + t * cap, count + t, k, scratch);
        for (int64_t j = 0; j < k; j++) {
            values[t * k + j] = bv[t * cap + j];
            indices[t * k + j] = bi[t * cap + j];
        }
    }
    return 0;
}

static void stream_any(const void *pre, int bf16, int64_t n, int64_t ld, const float *bias, int64_t latent0,
                       int64_t width, int64_t k, float *bv, int64_t *bi, int64_t *count, float *thr,
                       void *scratch) {
    if (bf16) {
        stream_rows(pre, 1, n, ld, bias, latent0, width, k, bv, bi, count, thr, scratch);
    } else {
        stream_rows(pre, 0, n, ld, bias, latent0, width, k, bv, bi, count, thr, scratch);
    }
}

/* Tokens [c0, c1): every latent row streamed left to right over those columns, from empty buffers. */
static int select_block(const void *pre, int bf16, int64_t n, int64_t ld, const float *bias, int64_t c0, int64_t c1,
                        int64_t k, float *values, int64_t *indices, float *bv, int64_t *bi, int64_t *count, float *thr,
                        void *scratch) {
    const int64_t width = c1 - c0;
    const int64_t cap = CAPACITY * k, size = bf16 ? 2 : 4, head = n < HEAD_ROWS ? n : HEAD_ROWS;
    const char *base = (const char *)pre + c0 * size;
    reset_tokens(width, count, thr);
#ifdef __AVX512F__
    if (n * BOUND_TILE <= BOUND_TILE_VALUES) {  /* narrow: per tile, lower-bound thresholds, then every row, from L2 */
        for (int64_t t = 0; t < width; t += BOUND_TILE) {
            const int64_t w = width - t < BOUND_TILE ? width - t : BOUND_TILE;
            lower_bounds(base + t * size, bf16, n, ld, bias, w, k, thr + t);
            stream_any(base + t * size, bf16, n, ld, bias, 0, w, k, bv + t * cap, bi + t * cap, count + t, thr + t,
                       scratch);
        }
        return finish_tokens(width, k, bv, bi, count, values + c0 * k, indices + c0 * k, scratch);
    }
#endif
    for (int64_t t = 0; t < width; t += HEAD_TILE) {
        const int64_t w = width - t < HEAD_TILE ? width - t : HEAD_TILE;
#ifdef __AVX512F__  /* bounds from the head rows: fewer of them enter the buffers */
        lower_bounds(base + t * size, bf16, head, ld, bias, w, k, thr + t);
#endif
        stream_any(base + t * size, bf16, head, ld, bias, 0, w, k, bv + t * cap, bi + t * cap, count + t, thr + t,
                   scratch);
    }
    stream_any(base + head * ld * size, bf16, n - head, ld, bias + head, head, width, k, bv, bi, count, thr,
               scratch);
    return finish_tokens(width, k, bv, bi, count, values + c0 * k, indices + c0 * k, scratch);
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
    void *scratch = malloc(SCRATCH_BYTES(cap) + 64);
    int status = (bv == NULL || bi == NULL || count == NULL || thr == NULL || scratch == NULL);
    if (!status) status = select_block(pre, bf16, n, ld, bias, c0, c1, k, values, indices, bv, bi, count, thr, scratch);
    free(scratch);
    free(bv);
    free(bi);
    free(count);
    free(thr);
    return status;
}

/* Run fn on each of `count` jobs of `size` bytes from `jobs`: job 0 on this thread, the others on their own (or here,
 * after it, when a thread cannot be started). Each job's first member is its int status; returns their OR. */
/* The threads a job over `work` units gets: the caller's count, at least 1, at most 64 (the job arrays' size) and at
 * most one per unit (a positive work count). */
static inline int64_t clamp_threads(int64_t n_threads, int64_t work) {
    if (n_threads > 64) n_threads = 64;
    if (n_threads > work) n_threads = work;
    return n_threads < 1 ? 1 : n_threads;
}

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
    n_threads = clamp_threads(n_threads, tiles);
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
 * the two vectors and the bias, never on the batch, the chunk, the thread count or the loop that asked for it. The
 * k best under (score descending, latent ascending) go to values[r * k ...] / indices[r * k ...] in latent order (so
 * the slots, and every sum over them downstream, do not depend on how the candidates were found), and the k-th best
 * score to kth[r]. A NaN score makes the token's values and kth NaN and its indices 0..k-1 (it surfaces as a
 * non-finite loss).
 *
 * Memory, not arithmetic, is what this costs, so both loops read each encoder row once per block of tokens whose
 * inputs stay in cache (XBLOCK bytes): candidates are grouped by latent (a counting sort) and each latent's row is
 * dotted with every token of the block that proposed it; without candidates, each thread streams every row over its
 * share of the block's tokens and keeps each token's best in a buffer, as the top-k above does. Reading rows token
 * by token instead costs c rows per token from memory: 16x more traffic at d = 3,456, c = 256. */

#define LANES 16
#ifndef XBLOCK
#define XBLOCK (8 << 20)
#endif

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

/* exact_dot of four rows a[0..3] with one row b, interleaved so the four sums overlap in the FPU; each is summed in
 * exactly exact_dot's order, so the results are exact_dot's bit for bit. */
static inline void exact_dot4(const float *const a[4], const float *b, int64_t d, float out[4]) {
    float acc[4][LANES] = {{0}};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const float bl = b[i + l];
            acc[0][l] += a[0][i + l] * bl;
            acc[1][l] += a[1][i + l] * bl;
            acc[2][l] += a[2][i + l] * bl;
            acc[3][l] += a[3][i + l] * bl;
        }
    for (int l = 0; i + l < d; l++)
        for (int q = 0; q < 4; q++) acc[q][l] += a[q][i + l] * b[i + l];
    for (int q = 0; q < 4; q++) {
        for (int width = LANES / 2; width > 0; width /= 2)
            for (int l = 0; l < width; l++) acc[q][l] += acc[q][l + width];
        out[q] = acc[q][0];
    }
}

/* One token's k best of m scored latents (score[], latent[] are scratch, reordered) into its output slots. */
static void finish_token(float *score, int64_t *latent, int64_t m, int64_t k, int nan, float *values,
                         int64_t *indices, float *kth, void *scratch) {
    if (nan) {
        for (int64_t j = 0; j < k; j++) {
            values[j] = NAN;
            indices[j] = j;
        }
        *kth = NAN;
        return;
    }
    if (m > k) compact(score, latent, &m, k, scratch);  /* the k best under `ranks_above` to the front */
    for (int64_t j = 1; j < k; j++) {  /* the k kept in latent order (k is small: insertion sort) */
        const float v = score[j];
        const int64_t i = latent[j];
        int64_t q = j;
        for (; q > 0 && latent[q - 1] > i; q--) {
            score[q] = score[q - 1];
            latent[q] = latent[q - 1];
        }
        score[q] = v;
        latent[q] = i;
    }
    float least = score[0];
    for (int64_t j = 0; j < k; j++) {
        least = score[j] < least ? score[j] : least;
        values[j] = score[j];
        indices[j] = latent[j];
    }
    *kth = least;
}

typedef struct {
    int status;
    const float *x, *w, *bias;
    const int64_t *cand, *order, *starts;
    float *score, *values, *kth;
    int64_t *indices;
    int64_t d, c, k, lo, hi, n;
} rescore_job;

/* Candidates: tokens [lo, hi), their scored candidates reduced to the k best. */
static void *select_pairs(void *arg) {
    rescore_job *jb = (rescore_job *)arg;
    const int64_t c = jb->c, k = jb->k;
    float *score = malloc(sizeof(float) * c);
    int64_t *latent = malloc(sizeof(int64_t) * c);
    void *scratch = malloc(SCRATCH_BYTES(c) + 64);
    jb->status = score == NULL || latent == NULL || scratch == NULL;
    for (int64_t r = jb->lo; r < jb->hi && !jb->status; r++) {
        int nan = 0;
        for (int64_t j = 0; j < c; j++) {
            score[j] = jb->score[r * c + j];
            latent[j] = jb->cand[r * c + j];
            nan |= isnan(score[j]);
        }
        finish_token(score, latent, c, k, nan, jb->values + r * k, jb->indices + r * k, jb->kth + r, scratch);
    }
    free(score);
    free(latent);
    free(scratch);
    return NULL;
}

/* Every latent: tokens [lo, hi), each row of w streamed over them, each token's best kept in a buffer of
 * CAPACITY·k (ties to the lower latent: rows arrive in latent order, so a newcomer equal to the threshold loses). */
static void *score_all(void *arg) {
    rescore_job *jb = (rescore_job *)arg;
    const int64_t d = jb->d, k = jb->k, n = jb->n, width = jb->hi - jb->lo, cap = CAPACITY * k;
    float *bv = malloc(sizeof(float) * (width * cap + 1));
    int64_t *bi = malloc(sizeof(int64_t) * (width * cap + 1));
    int64_t *count = calloc(width + 1, sizeof(int64_t));
    float *thr = malloc(sizeof(float) * (width + 1));
    int *nan = calloc(width + 1, sizeof(int));
    void *scratch = malloc(SCRATCH_BYTES(cap) + 64);
    jb->status = bv == NULL || bi == NULL || count == NULL || thr == NULL || nan == NULL || scratch == NULL;
    if (!jb->status) {
        for (int64_t t = 0; t < width; t++) thr[t] = -INFINITY;  /* until the first cut, any finite score enters */
        for (int64_t i = 0; i < n; i++) {
            const float *wi = jb->w + i * d;
            for (int64_t t0 = 0; t0 < width; t0 += 4) {
              float dots[4];
              const float *x0 = jb->x + (jb->lo + t0) * d;
              if (t0 + 4 <= width) {
                  const float *rows[4] = {x0, x0 + d, x0 + 2 * d, x0 + 3 * d};
                  exact_dot4(rows, wi, d, dots);
              } else {
                  for (int64_t q = 0; t0 + q < width; q++) dots[q] = exact_dot(x0 + q * d, wi, d);
              }
              for (int64_t t = t0; t < t0 + 4 && t < width; t++) {
                const float v = dots[t - t0] + jb->bias[i];
                if (isnan(v)) {
                    nan[t] = 1;
                } else if (count[t] < k || v > thr[t]) {
                    offer(bv, bi, count, thr, t, cap, k, v, i, scratch);
                }
              }
            }
        }
        for (int64_t t = 0; t < width; t++) {
            const int64_t r = jb->lo + t;
            finish_token(bv + t * cap, bi + t * cap, count[t], k, nan[t] || count[t] < k, jb->values + r * k,
                         jb->indices + r * k, jb->kth + r, scratch);
        }
    }
    free(bv);
    free(bi);
    free(count);
    free(thr);
    free(nan);
    free(scratch);
    return NULL;
}

/* Split [0, total) into `parts` ranges whose weights (cum[i + 1] - cum[i], or 1 each when cum is NULL) are about
 * equal; bounds[0..parts]. */
static void split(const int64_t *cum, int64_t total, int64_t parts, int64_t *bounds) {
    bounds[0] = 0;
    int64_t i = 0;
    for (int64_t t = 1; t < parts; t++) {
        if (cum == NULL) {
            bounds[t] = total * t / parts;
            continue;
        }
        const int64_t goal = cum[total] * t / parts;
        while (i < total && cum[i] < goal) i++;
        bounds[t] = i;
    }
    bounds[parts] = total;
}

/* ---- The sparse layer's backward, latent by latent -----------------------------------------------------------
 *
 * The selection of a batch grouped by latent (CSR: `order` [B·k] holds flat positions b·k + slot, latent by latent
 * and in token order within a latent; latent i's pairs are order[starts[i] .. starts[i + 1])). For every latent i
 * and each of its pairs (token b, position p), with e_b = rows[b] (a [B, d] float32 matrix):
 *   dots[p] = <e_b, w_i>                    (unless dots is NULL; exact_dot's fixed order)
 *   out_i   = Σ_p coef[p] · e_b             (unless out is NULL; summed in token order, every latent's row written)
 * The decoder's backward needs both over the same rows (the gradient of the output): the value gradient and the
 * weight gradient read each e_b once here, where a sampled product and a per-latent sum read it twice. The
 * encoder's weight gradient is the sum alone (rows = the encoder's input, coef = the pre-activations' gradient).
 * Threads split the latents by pair count; each latent is one thread's, so the result does not depend on the
 * thread count. */

typedef struct {
    int status;
    const float *rows, *w, *bias, *coef;
    const int64_t *order, *starts;
    float *dots, *out;
    int64_t d, k, lo, hi;
} latent_job;

/* A weight gradient's sums need a fixed order, not exact_dot's rounding: fused multiply-adds where the CPU has them
 * (half the instructions; on a 2-core Zen 4 a latent's sum over 4,096 tokens x 32 latents ran 4.5 against 6.5 ms). */
#ifdef __FMA__
#define MULADD(a, b, c) fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((c) + (a) * (b))
#endif

/* For g (1 or 4) rows e[q] of one latent: with `dots`, out[q] = exact_dot(e[q], w); with `sums`, acc = acc + a[0]·e[0]
 * + ... + a[g-1]·e[g-1] (added in that order, element by element; acc taken as 0 when `fresh`): one pass over the rows
 * for both. Always inlined with constant flags, so each combination gets its own vectorised loop. */
static inline __attribute__((always_inline)) void dot_and_sum(const int g, const int dots, const int sums,
                                                              const int fresh, const float *const e[4],
                                                              const float *restrict w, const float a[4],
                                                              float *restrict acc, int64_t d, float out[4]) {
    float part[4][LANES] = {{0}};
    int64_t i = 0;
#define DOT_AND_SUM_STEP(j, l)                                                          \
    do {                                                                                \
        if (dots)                                                                       \
            for (int q = 0; q < g; q++) part[q][l] += e[q][j] * w[j];                   \
        if (sums) {                                                                     \
            float sum = fresh ? 0.0f : acc[j];                                          \
            for (int q = 0; q < g; q++) sum = MULADD(a[q], e[q][j], sum);                     \
            acc[j] = sum;                                                               \
        }                                                                               \
    } while (0)
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) DOT_AND_SUM_STEP(i + l, l);
    for (int l = 0; i + l < d; l++) DOT_AND_SUM_STEP(i + l, l);
#undef DOT_AND_SUM_STEP
    if (dots)
        for (int q = 0; q < g; q++) {
            for (int width = LANES / 2; width > 0; width /= 2)
                for (int l = 0; l < width; l++) part[q][l] += part[q][l + width];
            out[q] = part[q][0];
        }
}

/* dot_and_sum with its flags as constants: dots / sums / fresh select one of the inlined loops. */
static inline __attribute__((always_inline)) void pairs_step(int g, int dots, int sums, int fresh, const float *const e[4], const float *w,
                       const float a[4], float *acc, int64_t d, float out[4]) {
#define PAIRS_CASE(G, D, S, F) \
    if (g == G && dots == D && sums == S && fresh == F) return dot_and_sum(G, D, S, F, e, w, a, acc, d, out)
    PAIRS_CASE(4, 1, 1, 1); PAIRS_CASE(4, 1, 1, 0); PAIRS_CASE(4, 1, 0, 0); PAIRS_CASE(4, 0, 1, 1);
    PAIRS_CASE(4, 0, 1, 0); PAIRS_CASE(1, 1, 1, 1); PAIRS_CASE(1, 1, 1, 0); PAIRS_CASE(1, 1, 0, 0);
    PAIRS_CASE(1, 0, 1, 1); PAIRS_CASE(1, 0, 1, 0);
#undef PAIRS_CASE
}

static void *latent_pass(void *arg) {
    latent_job *jb = (latent_job *)arg;
    const int64_t d = jb->d, k = jb->k;
    for (int64_t i = jb->lo; i < jb->hi; i++) {
        const float *wi = jb->w == NULL ? NULL : jb->w + i * d;
        float *acc = jb->out == NULL ? NULL : jb->out + i * d;
        int fresh = 1;
        for (int64_t p = jb->starts[i]; p < jb->starts[i + 1];) {
            const int g = jb->starts[i + 1] - p >= 4 ? 4 : 1;
            const float *e[4];
            float a[4] = {0}, dots[4];
            for (int q = 0; q < g; q++) {
                e[q] = jb->rows + jb->order[p + q] / k * d;
                if (acc != NULL) a[q] = jb->coef[jb->order[p + q]];
            }
            pairs_step(g, wi != NULL, acc != NULL, acc != NULL && fresh, e, wi, a, acc, d, dots);
            if (wi != NULL)
                for (int q = 0; q < g; q++)
                    jb->dots[jb->order[p + q]] = jb->bias == NULL ? dots[q] : dots[q] + jb->bias[i];
            fresh = 0;
            p += g;
        }
        if (acc != NULL && fresh)
            for (int64_t j = 0; j < d; j++) acc[j] = 0.0f;
    }
    jb->status = 0;
    return NULL;
}

static int latent_pass_threads(const float *rows, const float *w, const float *bias, const float *coef,
                               const int64_t *order, const int64_t *starts, int64_t n, int64_t d, int64_t k,
                               float *dots, float *out, int64_t n_threads) {
    if (n <= 0) return 0;
    n_threads = clamp_threads(n_threads, n);
    latent_job jobs[64];
    int64_t bounds[65];
    split(starts, n, n_threads, bounds);
    for (int64_t t = 0; t < n_threads; t++)
        jobs[t] = (latent_job){1, rows, w, bias, coef, order, starts, dots, out, d, k, bounds[t], bounds[t + 1]};
    return run_all(latent_pass, jobs, sizeof(latent_job), n_threads);
}

int saelab_rescore_topk(const float *x, const float *w, const float *bias, const int64_t *cand, int64_t rows,
                        int64_t n, int64_t d, int64_t c, int64_t k, float *values, int64_t *indices, float *kth,
                        int64_t n_threads) {
    if (rows <= 0 || k <= 0) return 0;
    if (cand == NULL) c = n;
    if (k > c || c > n) return 2;
    n_threads = clamp_threads(n_threads, n);
    if (cand != NULL)
        for (int64_t p = 0; p < rows * c; p++)
            if (cand[p] < 0 || cand[p] >= n) return 4;
    const int64_t block = d * 4 >= XBLOCK ? 1 : XBLOCK / (d * 4);
    rescore_job jobs[64];
    int64_t bounds[65];
    int status = 0;
    if (cand == NULL) {
        for (int64_t r0 = 0; r0 < rows && !status; r0 += block) {
            const int64_t width = rows - r0 < block ? rows - r0 : block;
            const int64_t parts = n_threads < width ? n_threads : width;
            split(NULL, width, parts, bounds);
            for (int64_t t = 0; t < parts; t++)
                jobs[t] = (rescore_job){1, x, w, bias, NULL, NULL, NULL, NULL, values, kth, indices, d, c, k,
                                        r0 + bounds[t], r0 + bounds[t + 1], n};
            status = run_all(score_all, jobs, sizeof(rescore_job), parts);
        }
        return status;
    }
    float *score = malloc(sizeof(float) * rows * c);
    int64_t *starts = malloc(sizeof(int64_t) * (n + 1));
    int64_t *order = malloc(sizeof(int64_t) * (block < rows ? block : rows) * c);
    status = score == NULL || starts == NULL || order == NULL;
    for (int64_t r0 = 0; r0 < rows && !status; r0 += block) {
        const int64_t r1 = rows - r0 < block ? rows : r0 + block;
        /* counting sort of the block's pairs by latent, each latent's pairs in token order */
        for (int64_t i = 0; i <= n; i++) starts[i] = 0;
        for (int64_t p = r0 * c; p < r1 * c; p++) starts[cand[p] + 1]++;
        for (int64_t i = 0; i < n; i++) starts[i + 1] += starts[i];
        for (int64_t p = r0 * c; p < r1 * c; p++) order[starts[cand[p]]++] = p;
        for (int64_t i = n; i > 0; i--) starts[i] = starts[i - 1];
        starts[0] = 0;
        status = latent_pass_threads(x, w, bias, NULL, order, starts, n, d, c, score, NULL, n_threads);
        const int64_t parts = n_threads < r1 - r0 ? n_threads : r1 - r0;
        split(NULL, r1 - r0, parts, bounds);
        for (int64_t t = 0; t < parts && !status; t++)
            jobs[t] = (rescore_job){1, x, w, bias, cand, order, starts, score, values, kth, indices, d, c, k,
                                    r0 + bounds[t], r0 + bounds[t + 1], n};
        if (!status) status = run_all(select_pairs, jobs, sizeof(rescore_job), parts);
    }
    free(score);
    free(starts);
    free(order);
    return status;
}

/* ---- The bf16 filter's weight, and the norms its error bound needs, in one pass ---------------------------------
 *
 * w is [n, d] float32. Writes w16 (unless NULL) = w rounded to bfloat16 (to nearest, ties to even, NaN to a quiet
 * NaN: torch's rounding) and stats[0..2] = the largest over rows of ||w16_j||, ||w_j - w16_j|| and ||w_j||, each
 * squared norm summed in LANES float32 partial sums (relative error below (d / LANES + 1) * 2^-24, which the
 * bound's safety margin covers) and those in double; with `rows` (n x 3 doubles) also each row's three squared
 * norms. In torch the cast and the norms of the cast and of its remainder read w three times. */

static inline uint16_t to_bf16(uint32_t u) {
    const uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;
}

/* The larger of two, a NaN in either sticking (a NaN weight gives a NaN bound: never certified). */
static inline double larger(double a, double b) {
    return isnan(a) || !(b > a) ? (isnan(b) ? b : a) : b;
}

typedef struct {
    int status;
    const float *w;
    uint16_t *w16;
    double *rows;
    int64_t d, lo, hi;
    double stats[3];
} split_job;

/* One element: its bf16 rounding (stored unless out is NULL) and its squares added to lane l of the three sums. */
static inline void split_one(uint32_t u, float acc[3][LANES], int l, uint16_t *out) {
    const uint16_t h = to_bf16(u);
    union { uint32_t u; float f; } full = {u}, back = {(uint32_t)h << 16};
    const float rest = full.f - back.f;  /* exact: the bits rounding dropped */
    acc[0][l] += back.f * back.f;
    acc[1][l] += rest * rest;
    acc[2][l] += full.f * full.f;
    *out = h;
}

static void *run_split(void *arg) {
    split_job *jb = (split_job *)arg;
    const int64_t d = jb->d;
    double best[3] = {0, 0, 0};
    uint16_t *scratch = jb->w16 ? NULL : malloc(sizeof(uint16_t) * (d + 1));
    jb->status = !jb->w16 && scratch == NULL;
    for (int64_t i = jb->lo; i < jb->hi && !jb->status; i++) {
        const uint32_t *row = (const uint32_t *)(jb->w + i * d);
        uint16_t *out = jb->w16 ? jb->w16 + i * d : scratch;  /* a row's worth of scratch when not wanted */
        float acc[3][LANES] = {{0}};
        int64_t j0 = 0;
        for (; j0 + LANES <= d; j0 += LANES)
            for (int l = 0; l < LANES; l++) split_one(row[j0 + l], acc, l, out + j0 + l);
        for (int l = 0; j0 + l < d; l++) split_one(row[j0 + l], acc, l, out + j0 + l);
        for (int q = 0; q < 3; q++) {
            double sum = 0;
            for (int l = 0; l < LANES; l++) sum += acc[q][l];
            best[q] = larger(best[q], sum);
            if (jb->rows) jb->rows[i * 3 + q] = sum;
        }
    }
    for (int q = 0; q < 3; q++) jb->stats[q] = sqrt(best[q]);
    free(scratch);
    return NULL;
}

int saelab_bf16_split(const float *w, int64_t n, int64_t d, uint16_t *w16, double *stats, double *rows,
                      int64_t n_threads) {
    n_threads = clamp_threads(n_threads, n);
    split_job jobs[64];
    for (int64_t t = 0; t < n_threads; t++)
        jobs[t] = (split_job){1, w, w16, rows, d, n * t / n_threads, n * (t + 1) / n_threads, {0, 0, 0}};
    const int status = run_all(run_split, jobs, sizeof(split_job), n_threads);
    for (int q = 0; q < 3; q++) {
        stats[q] = 0;
        for (int64_t t = 0; t < n_threads; t++) stats[q] = larger(stats[q], jobs[t].stats[q]);
    }
    return status;
}

/* ---- The unit-norm decoder constraint, one pass per row ------------------------------------------------------
 *
 * w [n, d] float32, row i = one latent's decoder vector, and g its gradient. Before the optimiser step, the gradient
 * component along each row is removed, g_i <- g_i - (<g_i, w_i> / max(<w_i, w_i>, 1e-30)) w_i; after it, each row is
 * rescaled to unit norm, w_i <- w_i / max(||w_i||, 1e-12). torch spends three passes over the matrices on the first
 * (a dot, a norm, an update) and two on the second; here each row is read once and updated while it is in cache.
 * Every sum is exact_dot's fixed order, so a row's result depends on nothing but the row (not the thread count). */

typedef struct {
    int status;
    float *w, *g;
    int64_t d, lo, hi;
} rows_job;

static void *project_rows(void *arg) {
    rows_job *jb = (rows_job *)arg;
    const int64_t d = jb->d;
    for (int64_t i = jb->lo; i < jb->hi; i++) {
        const float *w = jb->w + i * d;
        float *g = jb->g + i * d;
        float ww = exact_dot(w, w, d);
        ww = ww > 1e-30f ? ww : 1e-30f;
        const float coef = exact_dot(g, w, d) / ww;
        for (int64_t j = 0; j < d; j++) g[j] -= coef * w[j];
    }
    jb->status = 0;
    return NULL;
}

static void *normalize_rows(void *arg) {
    rows_job *jb = (rows_job *)arg;
    const int64_t d = jb->d;
    for (int64_t i = jb->lo; i < jb->hi; i++) {
        float *w = jb->w + i * d;
        float norm = sqrtf(exact_dot(w, w, d));
        norm = norm > 1e-12f ? norm : 1e-12f;
        for (int64_t j = 0; j < d; j++) w[j] /= norm;
    }
    jb->status = 0;
    return NULL;
}

static int run_rows(void *(*fn)(void *), float *w, float *g, int64_t n, int64_t d, int64_t n_threads) {
    if (n <= 0) return 0;
    n_threads = clamp_threads(n_threads, n);
    rows_job jobs[64];
    for (int64_t t = 0; t < n_threads; t++)
        jobs[t] = (rows_job){1, w, g, d, n * t / n_threads, n * (t + 1) / n_threads};
    return run_all(fn, jobs, sizeof(rows_job), n_threads);
}

int saelab_project_rows(float *w, float *g, int64_t n, int64_t d, int64_t n_threads) {
    return run_rows(project_rows, w, g, n, d, n_threads);
}

int saelab_normalize_rows(float *w, int64_t n, int64_t d, int64_t n_threads) {
    return run_rows(normalize_rows, w, NULL, n, d, n_threads);
}

int saelab_latent_pass(const float *rows, const float *w, const float *coef, const int64_t *order,
                       const int64_t *starts, int64_t n, int64_t d, int64_t k, float *dots, float *out,
                       int64_t n_threads) {
    return latent_pass_threads(rows, w, NULL, coef, order, starts, n, d, k, dots, out, n_threads);
}

/* ---- A selection grouped by latent ---------------------------------------------------------------------------
 *
 * indices [total] (int64 latents in [0, n)) -> order [total], the positions latent by latent and in increasing
 * position within a latent (what a stable sort of the indices gives), tokens [total] = order / k, and starts [n + 1].
 * A counting sort: two passes over the indices, where a sort takes log(total) (on a 2-core Zen 4, 131,072 indices:
 * 0.35 ms against 1.9 for the stable sort, bincount and division). Returns 4 when an index lies outside [0, n). */
int saelab_group_by_latent(const int64_t *indices, int64_t total, int64_t n, int64_t k, int64_t *order,
                           int64_t *tokens, int64_t *starts) {
    for (int64_t i = 0; i <= n; i++) starts[i] = 0;
    for (int64_t p = 0; p < total; p++) {
        const int64_t i = indices[p];
        if (i < 0 || i >= n) return 4;
        starts[i + 1]++;
    }
    for (int64_t i = 0; i < n; i++) starts[i + 1] += starts[i];
    for (int64_t p = 0; p < total; p++) {
        const int64_t at = starts[indices[p]]++;
        order[at] = p;
        tokens[at] = p / k;
    }
    for (int64_t i = n; i > 0; i--) starts[i] = starts[i - 1];
    starts[0] = 0;
    return 0;
}

/* ---- The pooled FVU's sums, in one pass -----------------------------------------------------------------------
 *
 * x, xh [rows, d] float32. out[0] = Σ ||xh_t - x_t||², out[1] = Σ ||x_t - mean(x)||² (= Σ ||x_t||² - rows·||mean||²,
 * exact enough in double), both accumulated in double over fixed blocks of FVU_BLOCK rows summed in block order, so
 * the result does not depend on the thread count. One read of each matrix, where torch's composed ops take five
 * passes (on a 2-core Zen 4, 4,096 x 768: 1.7 against 3.1 ms). */

#define FVU_BLOCK 256

typedef struct {
    int status;
    const float *x, *xh;
    double *partial;  /* per block: d column sums, then Σ err², Σ x² */
    int64_t rows, d, lo, hi;  /* blocks [lo, hi) */
} fvu_job;

static void *fvu_blocks(void *arg) {
    fvu_job *jb = (fvu_job *)arg;
    const int64_t d = jb->d;
    double *err = malloc(sizeof(double) * 2 * d);
    jb->status = err == NULL;
    for (int64_t b = jb->lo; b < jb->hi && !jb->status; b++) {
        /* per column, so the loop over a row vectorises; a block's totals are summed column by column at its end */
        double *col = jb->partial + b * (d + 2), *sq = err + d;
        for (int64_t j = 0; j < d; j++) col[j] = err[j] = sq[j] = 0.0;
        const int64_t end = (b + 1) * FVU_BLOCK < jb->rows ? (b + 1) * FVU_BLOCK : jb->rows;
        for (int64_t t = b * FVU_BLOCK; t < end; t++) {
            const float *xt = jb->x + t * d, *ht = jb->xh + t * d;
            for (int64_t j = 0; j < d; j++) {
                const double v = xt[j], e = (double)ht[j] - v;
                col[j] += v;
                err[j] += e * e;
                sq[j] += v * v;
            }
        }
        double err_total = 0.0, sq_total = 0.0;
        for (int64_t j = 0; j < d; j++) {
            err_total += err[j];
            sq_total += sq[j];
        }
        col[d] = err_total;
        col[d + 1] = sq_total;
    }
    free(err);
    return NULL;
}

int saelab_fvu_sums(const float *x, const float *xh, int64_t rows, int64_t d, double *out, int64_t n_threads) {
    out[0] = out[1] = 0.0;
    if (rows <= 0) return 0;
    const int64_t blocks = (rows + FVU_BLOCK - 1) / FVU_BLOCK;
    double *partial = malloc(sizeof(double) * blocks * (d + 2));
    double *col = calloc(d, sizeof(double));
    if (partial == NULL || col == NULL) {
        free(partial);
        free(col);
        return 1;
    }
    n_threads = clamp_threads(n_threads, blocks);
    fvu_job jobs[64];
    for (int64_t t = 0; t < n_threads; t++)
        jobs[t] = (fvu_job){1, x, xh, partial, rows, d, blocks * t / n_threads, blocks * (t + 1) / n_threads};
    int status = run_all(fvu_blocks, jobs, sizeof(fvu_job), n_threads);
    double err = 0.0, sq = 0.0, mean_sq = 0.0;
    for (int64_t b = 0; b < blocks && !status; b++) {
        const double *p = partial + b * (d + 2);
        for (int64_t j = 0; j < d; j++) col[j] += p[j];
        err += p[d];
        sq += p[d + 1];
    }
    for (int64_t j = 0; j < d; j++) mean_sq += col[j] * col[j];
    out[0] = err;
    out[1] = sq - mean_sq / (double)rows;
    free(partial);
    free(col);
    return status;
}
