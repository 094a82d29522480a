/* Bit-packed mask kernels for the CPU (built on first use by supsup/kernels/native.py).
 *
 * Layout ("tiles"): uint32 tiles[C][cap], C = ceil(R / 4) for rows of R = ceil(P / 8) bytes. tiles[c][t] holds
 * bytes 4c .. 4c+3 of task t's packed row (little-endian: bit b is weight 32c + b), so one column of 32
 * weights is contiguous over the tasks and 16 tasks fill one vector. Float vectors are padded to 32C entries.
 *
 * contract: "four Russians" with nibble tables. For a column, T_q[v] = sum of g[32c + 4q + i] over the bits i
 * of v (q = 0..7, v = 0..15): 8 tables of 16 floats, one vector register each. Every 4 mask bits of 16 tasks
 * then cost one in-register look-up (vpermps) and one add instead of 4 masked adds. Columns whose 32 g
 * values are all zero (in rows of dead ReLUs: about half of a hidden layer's) are skipped without reading
 * their bits: exact. The factored contract forms g = (delta x^T) . W column by column instead of reading it.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define NC 4 /* contract: columns per pass over the tasks (their 8 NC tables stay in L1) */
#define NS 8 /* superpose: columns per pass over the tasks (2 NS accumulators in registers) */
#define DIRECT_BELOW 6 /* contract: fewer tasks use masked adds (1M weights, k = 1: 0.25 vs 0.50 ms; equal at 6) */
#define BLOCK_BYTES (1 << 19) /* several right-hand sides: columns per block so that its tiles stay in L2 */

typedef struct {
    const uint32_t *tiles;
    int64_t k, cap, C, n;
    const float *vec; /* contract: g [n, 32C] (factored: the weight [32C]); superpose: alpha [n, k];
                         unpack: weight [32C] or NULL */
    float *out;       /* contract: partial [n, k] of this thread; superpose: [n, 32C]; unpack: [k, P] */
    int64_t first, last; /* column range [first, last) (unpack: task range) of this thread */
    int64_t P;        /* unpack: floats per output row; factored contract: weights per mask */
    int failed;
    const float *delta, *x; /* factored contract: g[o, i] = delta[o] x[i] w[o, i], delta [n, P / in], x [n, in] */
    int64_t fan_in;
    float *scores, *square_avg; /* rmsprop step: updated in place; vec: the weight [P]; out: W ⊙ [s >= 0] */
    const float *grad;          /* rmsprop step: dL/d(W ⊙ M) [K, P]; first, last: a range of the K P entries */
    float alpha, one_minus_alpha, eps, neg_lr;
} job_t;

/* 1 if any of g[0 .. 32) is nonzero (NaN counts as nonzero, so it propagates) */
static inline int live32(const float *g) {
#ifdef __AVX512F__
    const __m512 zero = _mm512_setzero_ps();
    return (_mm512_cmp_ps_mask(_mm512_loadu_ps(g), zero, _CMP_NEQ_UQ) |
            _mm512_cmp_ps_mask(_mm512_loadu_ps(g + 16), zero, _CMP_NEQ_UQ)) != 0;
#else
    for (int e = 0; e < 32; ++e)
        if (g[e] != 0.0f) return 1;
    return 0;
#endif
}

#define COLUMN_BLOCK 256 /* contract: columns whose liveness (factored: whose g, 32 KiB) is found at a time */

/* columns per block: with several right-hand sides few enough that their tiles stay in L2 for the next one */
static int64_t columns_per_block(int64_t cap, int64_t n) {
    const int64_t cols = n == 1 ? COLUMN_BLOCK : BLOCK_BYTES / (4 * cap);
    return cols < NC ? NC : cols > COLUMN_BLOCK ? COLUMN_BLOCK : cols;
}

#ifdef __AVX512F__
/* tables of one column: T[q] lane v = sum of g[4q + i] over the set bits i of v */
static inline void nibble_tables(const float *g, __m512 *T) {
    for (int q = 0; q < 8; ++q) {
        __m512 t = _mm512_maskz_mov_ps(0xAAAA, _mm512_set1_ps(g[4 * q]));
        t = _mm512_mask_add_ps(t, 0xCCCC, t, _mm512_set1_ps(g[4 * q + 1]));
        t = _mm512_mask_add_ps(t, 0xF0F0, t, _mm512_set1_ps(g[4 * q + 2]));
        T[q] = _mm512_mask_add_ps(t, 0xFF00, t, _mm512_set1_ps(g[4 * q + 3]));
    }
}

/* 16 tasks' dwords v of one column -> their 16 partial dot products (vpermps uses the low 4 bits) */
static inline __m512 lookup(__m512i v, const __m512 *T) {
    const __m512 p0 = _mm512_permutexvar_ps(v, T[0]);
    const __m512 p1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), T[1]);
    const __m512 p2 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), T[2]);
    const __m512 p3 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), T[3]);
    const __m512 p4 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), T[4]);
    const __m512 p5 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), T[5]);
    const __m512 p6 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), T[6]);
    const __m512 p7 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), T[7]);
    return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3)),
                         _mm512_add_ps(_mm512_add_ps(p4, p5), _mm512_add_ps(p6, p7)));
}

/* out[t] += sum over the m columns col[0..m) of their dot products, for every task t < k, while the
 * following columns col[m .. m + ahead) are prefetched (each column is a stream of 4k bytes elsewhere, which
 * the hardware prefetcher picks up late and does not follow across a 4 KiB page: 12-20% faster with this) */
static void contract_columns(const job_t *J, const float *const *g, const int64_t *col, int m, int ahead,
                             float *out) {
    __m512 T[8 * NC];
    const uint32_t *src[NC], *next[NC];
    for (int q = 0; q < m; ++q) {
        nibble_tables(g[q], T + 8 * q);
        src[q] = J->tiles + col[q] * J->cap;
    }
    for (int q = 0; q < ahead; ++q) next[q] = J->tiles + col[m + q] * J->cap;
    for (int64_t t = 0; t < J->k; t += 16) {
        const __mmask16 lanes = J->k - t >= 16 ? 0xFFFF : (__mmask16)((1u << (J->k - t)) - 1);
        for (int q = 0; q < ahead; ++q) _mm_prefetch((const char *)(next[q] + t), _MM_HINT_T0);
        __m512 s = lookup(_mm512_maskz_loadu_epi32(lanes, src[0] + t), T);
        for (int q = 1; q < m; ++q)
            s = _mm512_add_ps(s, lookup(_mm512_maskz_loadu_epi32(lanes, src[q] + t), T + 8 * q));
        _mm512_mask_storeu_ps(out + t, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, out + t), s));
    }
}

/* few tasks: masked adds of g straight from each task's dwords over the `count` columns col[..], where
 * building the tables would cost more than it saves */
static void contract_direct(const job_t *J, const float *const *g, const int64_t *col, int64_t count, float *out) {
    for (int64_t t = 0; t < J->k; ++t) {
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t i = 0; i < count; ++i) {
            const uint32_t v = J->tiles[col[i] * J->cap + t];
            a[2 * (i & 1)] = _mm512_mask_add_ps(a[2 * (i & 1)], (__mmask16)v, a[2 * (i & 1)], _mm512_loadu_ps(g[i]));
            a[2 * (i & 1) + 1] = _mm512_mask_add_ps(a[2 * (i & 1) + 1], (__mmask16)(v >> 16), a[2 * (i & 1) + 1],
                                                    _mm512_loadu_ps(g[i] + 16));
        }
        out[t] += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    }
}
#else
/* portable: byte tables (4 x 256 floats per column), one look-up per mask byte */
static void contract_columns(const job_t *J, const float *const *g, const int64_t *col, int m, int ahead,
                             float *out) {
    (void)ahead;
    float T[4][256];
    for (int q = 0; q < m; ++q) {
        const float *gc = g[q];
        for (int b = 0; b < 4; ++b) {
            T[b][0] = 0.0f;
            for (int v = 1; v < 256; ++v) T[b][v] = T[b][v & (v - 1)] + gc[8 * b + __builtin_ctz(v)];
        }
        const uint32_t *src = J->tiles + col[q] * J->cap;
        for (int64_t t = 0; t < J->k; ++t) {
            const uint32_t v = src[t];
            out[t] += (T[0][v & 255] + T[1][v >> 8 & 255]) + (T[2][v >> 16 & 255] + T[3][v >> 24]);
        }
    }
}
#endif

/* the 32 values g[p] = delta[o] x[i] w[p] (p = o in + i) of column c for right-hand side r, 0 past P;
 * returns 0 without reading x or w when the delta of every row the column touches is zero */
static int factored_column(const job_t *J, int64_t r, int64_t c, float *buf) {
    const float *delta = J->delta + r * (J->P / J->fan_in), *x = J->x + r * J->fan_in, *w = J->vec;
    const int64_t in = J->fan_in, p0 = 32 * c, o0 = p0 / in, i0 = p0 % in, valid = J->P - p0 < 32 ? J->P - p0 : 32;
    if (in >= 32) { /* the column lies in rows o0 and (from lane in - i0 on) o0 + 1 */
        const int64_t first = in - i0 < valid ? in - i0 : valid;
        const float d0 = delta[o0], d1 = first < valid ? delta[o0 + 1] : 0.0f;
        if (d0 == 0.0f && d1 == 0.0f) return 0;
#ifdef __AVX512F__
        const uint32_t in_first = first >= 32 ? 0xFFFFFFFFu : (1u << first) - 1;
        const uint32_t in_valid = valid >= 32 ? 0xFFFFFFFFu : (1u << valid) - 1;
        for (int h = 0; h < 2; ++h) {
            const __mmask16 mf = (__mmask16)(in_first >> 16 * h), mv = (__mmask16)(in_valid >> 16 * h);
            __m512 xv = _mm512_maskz_loadu_ps(mf, x + i0 + 16 * h);
            xv = _mm512_mask_loadu_ps(xv, mv & ~mf, x + i0 - in + 16 * h); /* masked-off lanes are not read */
            const __m512 dv = _mm512_mask_blend_ps(mf, _mm512_set1_ps(d1), _mm512_set1_ps(d0));
            const __m512 wv = _mm512_maskz_loadu_ps(mv, w + p0 + 16 * h);
            _mm512_storeu_ps(buf + 16 * h, _mm512_maskz_mul_ps(mv, _mm512_mul_ps(dv, xv), wv));
        }
        return live32(buf);
#endif
    }
    for (int64_t j = 0; j < 32; ++j)
        buf[j] = j < valid ? delta[(p0 + j) / in] * x[(p0 + j) % in] * w[p0 + j] : 0.0f;
    return live32(buf);
}

static void *contract_job(void *arg) {
    job_t *J = (job_t *)arg;
    const int64_t block = columns_per_block(J->cap, J->n);
    const int64_t most = J->last - J->first < block ? J->last - J->first + 1 : block;
    int64_t *live = (int64_t *)malloc(sizeof(int64_t) * (size_t)most);
    const float **g = (const float **)malloc(sizeof(float *) * (size_t)most);
    float *formed = J->delta ? (float *)malloc(sizeof(float) * 32 * (size_t)most) : NULL;
    if (!live || !g || (J->delta && !formed)) {
        J->failed = 1;
    } else {
        for (int64_t c0 = J->first, c1; c0 < J->last; c0 = c1) {
            c1 = J->last - c0 > block ? c0 + block : J->last;
            for (int64_t r = 0; r < J->n; ++r) {
                int64_t count = 0;
                for (int64_t c = c0; c < c1; ++c) {
                    const float *gc = J->delta ? formed + 32 * count : J->vec + (r * J->C + c) * 32;
                    if (J->delta ? factored_column(J, r, c, formed + 32 * count) : live32(gc)) {
                        live[count] = c;
                        g[count++] = gc;
                    }
                }
#ifdef __AVX512F__
                if (J->k < DIRECT_BELOW) {
                    contract_direct(J, g, live, count, J->out + r * J->k);
                    continue;
                }
#endif
                for (int64_t i = 0; i < count; i += NC) {
                    const int m = count - i < NC ? (int)(count - i) : NC;
                    const int ahead = count - i - m < NC ? (int)(count - i - m) : NC;
                    contract_columns(J, g + i, live + i, m, ahead, J->out + r * J->k);
                }
            }
        }
    }
    free(live);
    free(g);
    free(formed);
    return NULL;
}

/* mix[32c .. 32c+32) for the m columns from c, one right-hand side: 2m accumulators in registers */
static void superpose_columns(const job_t *J, const float *alpha, int64_t c, int m, float *mix) {
#ifdef __AVX512F__
    __m512 acc[2 * NS];
    for (int q = 0; q < 2 * m; ++q) acc[q] = _mm512_setzero_ps();
    for (int64_t t = 0; t < J->k; ++t) {
        if (alpha[t] == 0.0f) continue;
        const __m512 a = _mm512_set1_ps(alpha[t]);
        const uint16_t *w = (const uint16_t *)(J->tiles + c * J->cap + t);
        for (int q = 0; q < m; ++q) {
            acc[2 * q] = _mm512_mask_add_ps(acc[2 * q], _load_mask16((__mmask16 *)(w + 2 * q * J->cap)), acc[2 * q], a);
            acc[2 * q + 1] = _mm512_mask_add_ps(acc[2 * q + 1], _load_mask16((__mmask16 *)(w + 2 * q * J->cap + 1)),
                                                acc[2 * q + 1], a);
        }
    }
    for (int q = 0; q < 2 * m; ++q) _mm512_storeu_ps(mix + 32 * c + 16 * q, acc[q]);
#else
    memset(mix + 32 * c, 0, sizeof(float) * 32 * (size_t)m);
    for (int64_t t = 0; t < J->k; ++t) {
        if (alpha[t] == 0.0f) continue;
        for (int q = 0; q < m; ++q) {
            const uint32_t v = J->tiles[(c + q) * J->cap + t];
            float *o = mix + 32 * (c + q);
            for (int b = 0; b < 32; ++b) o[b] += (v >> b & 1u) ? alpha[t] : 0.0f;
        }
    }
#endif
}

static void *superpose_job(void *arg) {
    job_t *J = (job_t *)arg;
    const int64_t block = columns_per_block(J->cap, J->n);
    for (int64_t c0 = J->first, c1; c0 < J->last; c0 = c1) {
        c1 = J->last - c0 > block ? c0 + block : J->last;
        for (int64_t r = 0; r < J->n; ++r)
            for (int64_t c = c0; c < c1; c += NS)
                superpose_columns(J, J->vec + r * J->k, c, c1 - c < NS ? (int)(c1 - c) : NS, J->out + r * 32 * J->C);
    }
    return NULL;
}

/* out[t, p] = bit p of task t ? w[p] : 0 for p < P (w = 1 when weight is NULL), tasks [first, last) */
static void *unpack_job(void *arg) {
    job_t *J = (job_t *)arg;
    const float *w = J->vec;
    const int64_t P = J->P;
    for (int64_t t = J->first; t < J->last; ++t) {
        float *o = J->out + t * P;
        for (int64_t c = 0; c < J->C; ++c) {
            const uint32_t v = J->tiles[c * J->cap + t];
            const int64_t p0 = 32 * c, count = P - p0 < 32 ? P - p0 : 32;
#ifdef __AVX512F__
            const __mmask16 lo = count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
            const __mmask16 hi = count >= 32 ? 0xFFFF : count > 16 ? (__mmask16)((1u << (count - 16)) - 1) : 0;
            const __m512 one = _mm512_set1_ps(1.0f);
            const __m512 a = w ? _mm512_maskz_loadu_ps((__mmask16)v & lo, w + p0)
                               : _mm512_maskz_mov_ps((__mmask16)v, one);
            const __m512 b = w ? _mm512_maskz_loadu_ps((__mmask16)(v >> 16) & hi, w + p0 + 16)
                               : _mm512_maskz_mov_ps((__mmask16)(v >> 16), one);
            _mm512_mask_storeu_ps(o + p0, lo, a);
            _mm512_mask_storeu_ps(o + p0 + 16, hi, b);
#else
            for (int64_t b = 0; b < count; ++b) o[p0 + b] = (v >> b & 1u) ? (w ? w[p0 + b] : 1.0f) : 0.0f;
#endif
        }
    }
    return NULL;
}

static int run_jobs(void *(*fn)(void *), job_t *jobs, int threads) {
    pthread_t tid[64];
    int started[64] = {0}, failed = 0;
    for (int i = 1; i < threads; ++i) started[i] = pthread_create(&tid[i], NULL, fn, &jobs[i]) == 0;
    fn(&jobs[0]);
    for (int i = 1; i < threads; ++i) {
        if (started[i]) pthread_join(tid[i], NULL);
        else fn(&jobs[i]); /* no thread: run it here */
    }
    for (int i = 0; i < threads; ++i) failed |= jobs[i].failed;
    return failed ? -1 : 0;
}

static int clamp_threads(int threads, int64_t units) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (units < threads) threads = units > 0 ? (int)units : 1;
    return threads;
}

static void split(job_t *jobs, int threads, job_t J, int64_t units, float *out, int64_t out_stride) {
    for (int i = 0; i < threads; ++i) {
        jobs[i] = J;
        jobs[i].first = units * i / threads;
        jobs[i].last = units * (i + 1) / threads;
        jobs[i].out = out + (size_t)i * out_stride;
    }
}

static int contract(job_t J, int threads, float *out) {
    const int64_t n = J.n, k = J.k;
    threads = clamp_threads(threads, J.C);
    float *partial = (float *)calloc((size_t)threads * n * k, sizeof(float));
    if (!partial) return -1;
    job_t jobs[64];
    split(jobs, threads, J, J.C, partial, n * k);
    const int status = run_jobs(contract_job, jobs, threads);
    for (int64_t e = 0; e < n * k; ++e) {
        float s = 0;
        for (int i = 0; i < threads; ++i) s += partial[(size_t)i * n * k + e];
        out[e] = s;
    }
    free(partial);
    return status;
}

/* out [n, k] = g [n, 32C] contracted with the bits of tiles [C][cap] (k tasks). Returns 0, or -1 when out of memory. */
int ss_contract(const uint32_t *tiles, int64_t k, int64_t cap, int64_t C, const float *g, int64_t n, float *out,
                int threads) {
    const job_t J = {tiles, k, cap, C, n, g, NULL, 0, 0, 0, 0, NULL, NULL, 0};
    return contract(J, threads, out);
}

/* out [n, k]: row r is delta_r^T (W . M_t) x_r for delta [n, P / in], x [n, in], weight [32C] (zero past P):
 * ss_contract of g_r = delta_r x_r^T . W without forming it; columns on rows whose delta is zero are skipped. */
int ss_contract_factored(const uint32_t *tiles, int64_t k, int64_t cap, int64_t C, const float *delta, const float *x,
                         int64_t fan_in, int64_t P, const float *weight, int64_t n, float *out, int threads) {
    const job_t J = {tiles, k, cap, C, n, weight, NULL, 0, 0, P, 0, delta, x, fan_in};
    return contract(J, threads, out);
}

/* out [n, 32C] = alpha [n, k] @ bits(tiles) (every entry written). */
int ss_superpose(const uint32_t *tiles, int64_t k, int64_t cap, int64_t C, const float *alpha, int64_t n, float *out,
                 int threads) {
    threads = clamp_threads(threads, (C + NS - 1) / NS);
    job_t jobs[64], J = {tiles, k, cap, C, n, alpha, out, 0, 0, 0, 0, NULL, NULL, 0};
    for (int i = 0; i < threads; ++i) { /* column ranges in whole groups of NS */
        jobs[i] = J;
        jobs[i].first = (C + NS - 1) / NS * i / threads * NS;
        jobs[i].last = (C + NS - 1) / NS * (i + 1) / threads * NS;
        if (jobs[i].last > C) jobs[i].last = C;
    }
    return run_jobs(superpose_job, jobs, threads);
}

/* out [k, P] = bits(tiles) as float, times weight [32C] when weight is not NULL. */
int ss_unpack(const uint32_t *tiles, int64_t k, int64_t cap, int64_t C, int64_t P, const float *weight, float *out,
              int threads) {
    threads = clamp_threads(threads, k);
    job_t jobs[64], J = {tiles, k, cap, C, 0, weight, NULL, 0, 0, P, 0, NULL, NULL, 0};
    split(jobs, threads, J, k, out, 0);
    return run_jobs(unpack_job, jobs, threads);
}

/* tiles[c][first + t] = bytes 4c .. 4c+3 of rows [n, R] (zero past R), for t < n. */
void ss_to_tiles(const uint8_t *rows, int64_t n, int64_t R, uint32_t *tiles, int64_t cap, int64_t first) {
    const int64_t C = (R + 3) / 4;
    for (int64_t t0 = 0; t0 < n; t0 += 64) { /* blocks of 64 rows x 64 columns: both sides stay in L1 */
        const int64_t t1 = n - t0 < 64 ? n : t0 + 64;
        for (int64_t c0 = 0; c0 < C; c0 += 64) {
            const int64_t c1 = C - c0 < 64 ? C : c0 + 64;
            for (int64_t c = c0; c < c1; ++c)
                for (int64_t t = t0; t < t1; ++t) {
                    uint32_t v = 0;
                    memcpy(&v, rows + t * R + 4 * c, R - 4 * c < 4 ? (size_t)(R - 4 * c) : 4);
                    tiles[c * cap + first + t] = v;
                }
        }
    }
}

/* rows [k, R] = the first k tasks of tiles [C][cap]. */
void ss_to_rows(const uint32_t *tiles, int64_t k, int64_t cap, int64_t R, uint8_t *rows) {
    const int64_t C = (R + 3) / 4;
    for (int64_t t0 = 0; t0 < k; t0 += 64) {
        const int64_t t1 = k - t0 < 64 ? k : t0 + 64;
        for (int64_t c0 = 0; c0 < C; c0 += 64) {
            const int64_t c1 = C - c0 < 64 ? C : c0 + 64;
            for (int64_t t = t0; t < t1; ++t)
                for (int64_t c = c0; c < c1; ++c) {
                    const uint32_t v = tiles[c * cap + t];
                    memcpy(rows + t * R + 4 * c, &v, R - 4 * c < 4 ? (size_t)(R - 4 * c) : 4);
                }
        }
    }
}

/* out [K, P] = s >= 0 ? w : +0.0 for scores s [K, P] and w [P] (torch.where(s >= 0, w, 0.0); NaN: 0), one pass. */
void ss_threshold_select(const float *s, int64_t K, int64_t P, const float *w, float *out) {
    for (int64_t t = 0; t < K; ++t) {
        const float *st = s + t * P;
        float *o = out + t * P;
        int64_t p = 0;
#ifdef __AVX512F__
        const __m512 zero = _mm512_setzero_ps();
        for (; p + 16 <= P; p += 16)
            _mm512_storeu_ps(o + p, _mm512_maskz_loadu_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(st + p), zero, _CMP_GE_OQ),
                                                          w + p));
#endif
        for (; p < P; ++p) o[p] = st[p] >= 0.0f ? w[p] : 0.0f;
    }
}

/* out [K, P] = keep ? w : +0.0 for bool keep [K, P] and w [P] (torch.where(keep, w, 0.0), one pass). */
void ss_select(const uint8_t *keep, int64_t K, int64_t P, const float *w, float *out) {
    for (int64_t t = 0; t < K; ++t) {
        const uint8_t *m = keep + t * P;
        float *o = out + t * P;
        int64_t p = 0;
#ifdef __AVX512F__
        for (; p + 64 <= P; p += 64) {
            const __m512i b = _mm512_loadu_si512(m + p);
            const __mmask64 bits = _mm512_test_epi8_mask(b, b);
            for (int q = 0; q < 4; ++q)
                _mm512_storeu_ps(o + p + 16 * q, _mm512_maskz_loadu_ps((__mmask16)(bits >> (16 * q)), w + p + 16 * q));
        }
#endif
        for (; p < P; ++p) o[p] = m[p] ? w[p] : 0.0f;
    }
}

/* One RMSprop step (torch.optim.RMSprop: no momentum, not centred, no weight decay) on threshold scores
 * s [K, P], from g = grad ⊙ w (the straight-through gradient of W ⊙ [s >= 0]), then out = W ⊙ [s' >= 0]:
 *   q' = fma((1 - alpha) g, g, alpha q)        (torch's addcmul_ on this build: the same bits)
 *   s' = s + (-lr g) / (sqrt(q') + eps)          (addcdiv_: the same bits for the same denominator)
 * alpha, 1 - alpha, eps and lr as torch rounds them to float. sqrt is correctly rounded here; torch's (MKL's)
 * differs from it in the last bit for some inputs. */
static void *rmsprop_job(void *arg) {
    const job_t *J = (const job_t *)arg;
    const int64_t P = J->P;
    const float *w = J->vec;
    for (int64_t i = J->first; i < J->last;) { /* row segment [i, end) of task i / P */
        const int64_t row = i - i % P, end = row + P < J->last ? row + P : J->last;
        const float *g = J->grad + row;
        float *s = J->scores + row, *q = J->square_avg + row, *o = J->out + row;
        int64_t p = i - row;
        const int64_t n = end - row;
#ifdef __AVX512F__
        const __m512 alpha = _mm512_set1_ps(J->alpha), oma = _mm512_set1_ps(J->one_minus_alpha),
                     eps = _mm512_set1_ps(J->eps), neg_lr = _mm512_set1_ps(J->neg_lr), zero = _mm512_setzero_ps();
        for (; p + 16 <= n; p += 16) {
            const __m512 wv = _mm512_loadu_ps(w + p), gv = _mm512_mul_ps(_mm512_loadu_ps(g + p), wv);
            const __m512 qv = _mm512_fmadd_ps(_mm512_mul_ps(oma, gv), gv, _mm512_mul_ps(_mm512_loadu_ps(q + p), alpha));
            _mm512_storeu_ps(q + p, qv);
            const __m512 sv = _mm512_add_ps(_mm512_loadu_ps(s + p),
                                            _mm512_div_ps(_mm512_mul_ps(neg_lr, gv), _mm512_add_ps(_mm512_sqrt_ps(qv), eps)));
            _mm512_storeu_ps(s + p, sv);
            const __m512 ov = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, zero, _CMP_GE_OQ), wv);
            if (((uintptr_t)(o + p) & 63) == 0) _mm512_stream_ps(o + p, ov); /* no read of the old line */
            else _mm512_storeu_ps(o + p, ov);
        }
#endif
        for (; p < n; ++p) {
            const float gp = g[p] * w[p];
            const float qp = __builtin_fmaf(J->one_minus_alpha * gp, gp, q[p] * J->alpha);
            q[p] = qp;
            const float sp = s[p] + (J->neg_lr * gp) / (__builtin_sqrtf(qp) + J->eps);
            s[p] = sp;
            o[p] = sp >= 0.0f ? w[p] : 0.0f;
        }
        i = end;
    }
#ifdef __AVX512F__
    _mm_sfence(); /* the streamed stores are visible before the job returns */
#endif
    return NULL;
}

/* rmsprop_job over scores, square_avg, grad, out [K, P] and w [P], split over threads by entries. */
void ss_rmsprop_threshold(float *scores, float *square_avg, const float *grad, const float *w, int64_t K, int64_t P,
                          float alpha, float one_minus_alpha, float eps, float lr, float *out, int threads) {
    job_t jobs[64];
    const int64_t n = K * P;
    threads = clamp_threads(threads, n / 4096);
    for (int i = 0; i < threads; ++i) {
        job_t J = {0};
        J.scores = scores, J.square_avg = square_avg, J.grad = grad, J.vec = w, J.out = out, J.P = P;
        J.alpha = alpha, J.one_minus_alpha = one_minus_alpha, J.eps = eps, J.neg_lr = -lr;
        J.first = n * i / threads, J.last = n * (i + 1) / threads;
        jobs[i] = J;
    }
    run_jobs(rmsprop_job, jobs, threads);
}
