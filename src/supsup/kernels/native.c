/* Bit-packed mask kernels for the CPU (built on first use by supsup/kernels/native.py).
 *
 * Layout: packed [k, R] uint8, row t = task t, bit i of byte j = weight 8j + i (R = ceil(P/8)).
 * Float vectors are padded to 8R entries. Work is split over column blocks of BLK bytes so that
 * the float block being read or written stays in L1 while every task row streams past it.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLK 256 /* bytes per column block: 2,048 floats = 8 KiB */

typedef struct {
    const uint8_t *packed;
    int64_t k, R, n;
    const float *vec;   /* contract: g [n, 8R]; superpose: alpha [n, k]; unpack: weight [8R] or NULL */
    float *out;         /* contract: partial [threads, n, k]; superpose: [n, 8R]; unpack: [k, 8R] */
    int64_t first, last; /* block range [first, last) of this thread */
    int64_t rows0, rows1; /* unpack only: row range of this thread */
} job_t;

static inline uint16_t load16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* sum_j bits(row[j]) . g[8j .. 8j+8) over bytes [j0, j1), j0 a multiple of 8. Groups of 8 bytes
 * (64 weights) whose g is all zero are skipped when live[] is given (live[(j - j0) / 8], e.g. the rows
 * of dead ReLUs). */
static inline float dot_bits(const uint8_t *row, const float *g, const uint8_t *live, int64_t j0, int64_t j1) {
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        if (live && !live[(j - j0) >> 3]) continue;
        a0 = _mm512_mask_add_ps(a0, (__mmask16)load16(row + j), a0, _mm512_loadu_ps(g + 8 * j));
        a1 = _mm512_mask_add_ps(a1, (__mmask16)load16(row + j + 2), a1, _mm512_loadu_ps(g + 8 * j + 16));
        a0 = _mm512_mask_add_ps(a0, (__mmask16)load16(row + j + 4), a0, _mm512_loadu_ps(g + 8 * j + 32));
        a1 = _mm512_mask_add_ps(a1, (__mmask16)load16(row + j + 6), a1, _mm512_loadu_ps(g + 8 * j + 48));
    }
    for (; j + 2 <= j1; j += 2)
        a0 = _mm512_mask_add_ps(a0, (__mmask16)load16(row + j), a0, _mm512_loadu_ps(g + 8 * j));
    if (j < j1)
        a1 = _mm512_mask_add_ps(a1, (__mmask16)row[j], a1, _mm512_maskz_loadu_ps(0xFF, g + 8 * j));
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    float acc[8] = {0};
    for (int64_t j = j0; j < j1; ++j) {
        if (live && !live[(j - j0) >> 3]) { j |= 7; continue; }
        const unsigned v = row[j];
        for (int b = 0; b < 8; ++b) acc[b] += (v >> b & 1u) ? g[8 * j + b] : 0.0f;
    }
    float s = 0;
    for (int b = 0; b < 8; ++b) s += acc[b];
    return s;
#endif
}

/* 1 if any of g[0 .. count) is nonzero (NaN counts as nonzero, so it propagates) */
static inline uint8_t any_nonzero(const float *g, int64_t count) {
    int64_t e = 0;
#ifdef __AVX512F__
    const __m512 zero = _mm512_setzero_ps();
    for (; e + 16 <= count; e += 16)
        if (_mm512_cmp_ps_mask(_mm512_loadu_ps(g + e), zero, _CMP_NEQ_UQ)) return 1;
#endif
    for (; e < count; ++e)
        if (g[e] != 0.0f) return 1;
    return 0;
}

static void *contract_job(void *arg) {
    job_t *J = (job_t *)arg;
    uint8_t live[BLK / 8];
    for (int64_t blk = J->first; blk < J->last; ++blk) {
        const int64_t j0 = blk * BLK, j1 = j0 + BLK < J->R ? j0 + BLK : J->R;
        for (int64_t r = 0; r < J->n; ++r) {
            const float *g = J->vec + r * 8 * J->R;
            /* skip stretches of 64 weights where g is exactly zero (rows of dead ReLUs): exact */
            int any = 0;
            for (int64_t q = 0; q * 8 < j1 - j0; ++q) {
                const int64_t first = 8 * (j0 + 8 * q), count = 8 * (j1 - j0) - 64 * q;
                live[q] = any_nonzero(g + first, count < 64 ? count : 64);
                any |= live[q];
            }
            if (!any) continue;
            float *o = J->out + r * J->k;
            for (int64_t t = 0; t < J->k; ++t) o[t] += dot_bits(J->packed + t * J->R, g, live, j0, j1);
        }
    }
    return NULL;
}

/* mix[8j .. 8j+8) += a * bits(byte) over bytes [j0, j1) */
static inline void axpy_bits(float *mix, const uint8_t *row, float a, int64_t j0, int64_t j1) {
#ifdef __AVX512F__
    const __m512 av = _mm512_set1_ps(a);
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
        __m512 m = _mm512_loadu_ps(mix + 8 * j);
        _mm512_storeu_ps(mix + 8 * j, _mm512_mask_add_ps(m, (__mmask16)load16(row + j), m, av));
    }
    if (j < j1) {
        __m512 m = _mm512_maskz_loadu_ps(0xFF, mix + 8 * j);
        _mm512_mask_storeu_ps(mix + 8 * j, 0xFF, _mm512_mask_add_ps(m, (__mmask16)row[j], m, av));
    }
#else
    for (int64_t j = j0; j < j1; ++j) {
        const unsigned v = row[j];
        for (int b = 0; b < 8; ++b) mix[8 * j + b] += (v >> b & 1u) ? a : 0.0f;
    }
#endif
}

static void *superpose_job(void *arg) {
    job_t *J = (job_t *)arg;
    for (int64_t blk = J->first; blk < J->last; ++blk) {
        const int64_t j0 = blk * BLK, j1 = j0 + BLK < J->R ? j0 + BLK : J->R;
        for (int64_t r = 0; r < J->n; ++r) {
            const float *alpha = J->vec + r * J->k;
            float *mix = J->out + r * 8 * J->R;
            for (int64_t t = 0; t < J->k; ++t)
                if (alpha[t] != 0.0f) axpy_bits(mix, J->packed + t * J->R, alpha[t], j0, j1);
        }
    }
    return NULL;
}

/* out[t, p] = bit p of row t ? w[p] : 0 for p < P (w = 1 when weight is NULL); rows of P floats. */
static void *unpack_job(void *arg) {
    job_t *J = (job_t *)arg;
    const int64_t R = J->R, P = J->n, full = P / 8; /* n carries P here */
    const float *w = J->vec;
    for (int64_t t = J->rows0; t < J->rows1; ++t) {
        const uint8_t *row = J->packed + t * R;
        float *o = J->out + t * P;
        int64_t j = 0;
#ifdef __AVX512F__
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; j + 2 <= full; j += 2) {
            const __mmask16 m = (__mmask16)load16(row + j);
            _mm512_storeu_ps(o + 8 * j, w ? _mm512_maskz_loadu_ps(m, w + 8 * j) : _mm512_maskz_mov_ps(m, one));
        }
#endif
        for (int64_t e = 8 * j; e < P; ++e)
            o[e] = (row[e >> 3] >> (e & 7) & 1u) ? (w ? w[e] : 1.0f) : 0.0f;
    }
    return NULL;
}

static void run_jobs(void *(*fn)(void *), job_t *jobs, int threads) {
    pthread_t tid[64];
    int started[64] = {0};
    for (int i = 1; i < threads; ++i) started[i] = pthread_create(&tid[i], NULL, fn, &jobs[i]) == 0;
    fn(&jobs[0]);
    for (int i = 1; i < threads; ++i) {
        if (started[i]) pthread_join(tid[i], NULL);
        else fn(&jobs[i]); /* no thread: run it here */
    }
}

static int clamp_threads(int threads, int64_t units) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (units < threads) threads = units > 0 ? (int)units : 1;
    return threads;
}

/* out [n, k] = g [n, 8R] contracted with the bits of packed [k, R]. Returns 0, or -1 on allocation failure. */
int ss_contract(const uint8_t *packed, int64_t k, int64_t R, const float *g, int64_t n, float *out, int threads) {
    const int64_t blocks = (R + BLK - 1) / BLK;
    threads = clamp_threads(threads, blocks);
    float *partial = (float *)calloc((size_t)threads * n * k, sizeof(float));
    if (!partial) return -1;
    job_t jobs[64];
    for (int i = 0; i < threads; ++i) {
        job_t J = {packed, k, R, n, g, partial + (size_t)i * n * k, blocks * i / threads,
                   blocks * (i + 1) / threads, 0, 0};
        jobs[i] = J;
    }
    run_jobs(contract_job, jobs, threads);
    for (int64_t e = 0; e < n * k; ++e) {
        float s = 0;
        for (int i = 0; i < threads; ++i) s += partial[(size_t)i * n * k + e];
        out[e] = s;
    }
    free(partial);
    return 0;
}

/* out [n, 8R] = alpha [n, k] @ bits(packed [k, R]); out must be zeroed by the caller. */
int ss_superpose(const uint8_t *packed, int64_t k, int64_t R, const float *alpha, int64_t n, float *out, int threads) {
    const int64_t blocks = (R + BLK - 1) / BLK;
    threads = clamp_threads(threads, blocks);
    job_t jobs[64];
    for (int i = 0; i < threads; ++i) {
        job_t J = {packed, k, R, n, alpha, out, blocks * i / threads, blocks * (i + 1) / threads, 0, 0};
        jobs[i] = J;
    }
    run_jobs(superpose_job, jobs, threads);
    return 0;
}

/* out [k, P] = bits(packed [k, R]) as float, times weight [P] when weight is not NULL. */
int ss_unpack(const uint8_t *packed, int64_t k, int64_t R, int64_t P, const float *weight, float *out, int threads) {
    threads = clamp_threads(threads, k);
    job_t jobs[64];
    for (int i = 0; i < threads; ++i) {
        job_t J = {packed, k, R, P, weight, out, 0, 0, k * i / threads, k * (i + 1) / threads};
        jobs[i] = J;
    }
    run_jobs(unpack_job, jobs, threads);
    return 0;
}
