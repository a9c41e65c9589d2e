/* Decode attention straight from the paged KV pool: one query token per sequence, all the query heads
 * of a KV head's group at once, keys and values read through the sequence's block table.
 *
 * Why a kernel of our own (engine/native_kernels.py builds it with the machine's C compiler; the engine
 * keeps the PyTorch backend where it cannot): on a CPU, PyTorch attends decodes with batched matmuls
 * that run as hundreds of tiny products (64 sequences x 3 KV heads, 3 query rows each), which do not
 * overlap their memory reads with their arithmetic, and that need every sequence's context copied into
 * one contiguous tensor first (the decode mirror, or a gather in every layer). Here each (sequence, KV
 * head) is one pass over its keys and one over its values, read where they lie in the pool.
 *
 * Numerics: scores, softmax and the weighted sum of values in float32 (bfloat16 products are exact in
 * float32), the output rounded once to the model's dtype (to nearest even). Where the CPU has AVX-512
 * BF16, bfloat16 values are weighted by probabilities rounded to bfloat16, as PyTorch's path rounds them.
 * Each (sequence, KV head) is computed by one thread in one fixed order, so a sequence's result depends
 * neither on the batch it is in nor on the number of threads.
 *
 * Written with GCC's vector extensions (the vector width set below) so that it builds for any CPU with
 * -march=native (the compiler maps the lanes onto AVX-512, AVX2 or NEON); where the CPU has AVX-512
 * BF16, bfloat16 keys and values go through its dot-product instruction instead of being widened. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One build serves one model dtype and head size (engine/native_kernels.py builds what a model needs). */
#if !defined(HEAD_DIM) || !defined(BF16) || HEAD_DIM % 16 || HEAD_DIM > 256
#error "build with -DHEAD_DIM=<a multiple of 16, at most 256> -DBF16=<1 for bfloat16, 0 for float32>"
#endif
#define D HEAD_DIM
#define GROUP_MAX 8     /* query heads per KV head */
#if BF16 && defined(__AVX512BF16__) && HEAD_DIM % 32 == 0
#define USE_DPBF16 1
#include <immintrin.h>
#else
#define USE_DPBF16 0
#endif

/* The machine's own vector width: 16 float32 lanes with AVX-512, else 8 (AVX2, NEON pairs). Wider
 * vectors than the registers build, but the compiler then moves every one through memory: on a 2-core
 * Zen 3 (AVX2) the 16-lane build ran SmolLM2's float32 batch-64 decodes at 4.1 ms per layer. */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define CHUNK LANES     /* keys scored at a time: one vector of scores */
/* Chunks of keys fetched ahead of the one being scored: a sequence's blocks lie anywhere in the pool,
 * and the hardware's prefetcher starts over at every block. Measured on a 2-core Zen 4 (SmolLM2, bf16,
 * throughput.py's workload, one engine alternating libraries run by run): batch-64 decode steps
 * 103-121 ms with 2 chunks against 118-137 ms with none; 4 chunks 112-141 ms; 1 chunk 91-111 against
 * 100-110 ms with 2, and whole runs 17.9-20.3 against 20.1-20.7 s. */
#ifndef KEY_PREFETCH_CHUNKS
#define KEY_PREFETCH_CHUNKS 1
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2)));

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline vf load_f32(const float *p) {
    vf f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float keep_f32(float f) { return f; }

typedef uint16_t bf16;
#if BF16
typedef bf16 elem_t;
#define LOAD load_bf16
#define ROUND round_bf16
#else
typedef float elem_t;
#define LOAD load_f32
#define ROUND keep_f32
#endif

/* Lane-wise "where mask, a, else b" (C has no vector conditional operator). */
static inline vf lane_select(vi mask, vf a, vf b) {
    return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

/* exp(x) for x <= 0 (scores less their maximum), lane-wise, without libm (whose vector variants need
 * -ffast-math, which would also assume there are no infinities): 2^n times a degree-6 polynomial on
 * |r| <= ln2/2, within 2.7 ulp of float32 over [-87, 0] (checked against libm's double exp at every
 * float there). Below -87 it returns exp(-87), about 1.6e-38. */
static inline vf exp_nonpositive(vf x) {
    const vf lo = x - x - 87.0f;
    x = lane_select(x < lo, lo, x);
    const vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;   /* rounded to the nearest integer */
    const vf r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    const vf p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
                   + r * (1.0f / 720))))));
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

static inline void prefetch_rows(const elem_t *pool, int64_t head_base, const int32_t *table, int block_size,
                                 int from, int to) {
    for (int pos = from; pos < to; pos++) {
        const char *row = (const char *)(pool + (head_base + (int64_t)table[pos / block_size] * block_size
                                                 + pos % block_size) * D);
        for (int b = 0; b < D * (int)sizeof(elem_t); b += 64) __builtin_prefetch(row + b);
    }
}

static inline float lane_sum(vf v) {
    float s = 0;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

static inline float lane_max(vf v) {
    float m = v[0];
    for (int l = 1; l < LANES; l++) m = v[l] > m ? v[l] : m;
    return m;
}

/* CHUNK vectors in, one out: lane t of the result is the sum of the lanes of v[t]. Rounds of pairing
 * halves (CHUNK - 1 vector additions in all), instead of a horizontal sum per key. Round h adds, for
 * each pair of vectors, the lanes whose index modulo 2h is below h to those h lanes further on. */
#if LANES == 16
static const vi lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
static const vi hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
static const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
static const vi hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
static const vi lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
static const vi hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
static const vi lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
static const vi hi1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
#else
static const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11};
static const vi hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
static const vi lo2 = {0, 1, 4, 5, 8, 9, 12, 13};
static const vi hi2 = {2, 3, 6, 7, 10, 11, 14, 15};
static const vi lo1 = {0, 2, 4, 6, 8, 10, 12, 14};
static const vi hi1 = {1, 3, 5, 7, 9, 11, 13, 15};
#endif
#define FOLD(u, v, lo, hi) (__builtin_shuffle(u, v, lo) + __builtin_shuffle(u, v, hi))

static inline vf transpose_sum(const vf v[CHUNK]) {
    vf x[4], y[2];
#if LANES == 16
    vf w[8];
    for (int i = 0; i < 8; i++) w[i] = FOLD(v[2 * i], v[2 * i + 1], lo8, hi8);
    for (int i = 0; i < 4; i++) x[i] = FOLD(w[2 * i], w[2 * i + 1], lo4, hi4);
#else
    for (int i = 0; i < 4; i++) x[i] = FOLD(v[2 * i], v[2 * i + 1], lo4, hi4);
#endif
    for (int i = 0; i < 2; i++) y[i] = FOLD(x[2 * i], x[2 * i + 1], lo2, hi2);
    return FOLD(y[0], y[1], lo1, hi1);
}

/* The unscaled dot products of a query row with CHUNK key rows (the first n of them real), one per
 * lane of each of the CHUNK vectors it leaves in dots (transpose_sum finishes them). */
static inline void key_dots(const vf *query, const elem_t *query_raw, const elem_t *const *rows, int n,
                            vf dots[CHUNK]) {
#if USE_DPBF16
    /* bfloat16 pairs straight into float32 sums, with no widening of the keys. */
    (void)query;
    __m512bh qb[D / 32];
    for (int c = 0; c < D / 32; c++) qb[c] = (__m512bh)_mm512_loadu_si512(query_raw + c * 32);
    for (int t = 0; t < CHUNK; t++) {
        __m512 a = _mm512_setzero_ps();
        if (t < n)
            for (int c = 0; c < D / 32; c++)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(rows[t] + c * 32), qb[c]);
        dots[t] = (vf)a;
    }
#else
    (void)query_raw;
    for (int t = 0; t < CHUNK; t++) {
        vf a = {0};
        if (t < n)
            for (int c = 0; c < D / LANES; c++) a += query[c] * LOAD(rows[t] + c * LANES);
        dots[t] = a;
    }
#endif
}

/* The second pass, for a group of G query heads: out = the probabilities (scores: G x chunks vectors)
 * times the value rows, each head's row divided by the sum of its probabilities. */
#if USE_DPBF16
/* Two value rows at a time: their elements interleaved in pairs (an unpack), each pair weighted by the
 * two rows' probabilities rounded to bfloat16 (as PyTorch's path rounds them) in one dot-product
 * instruction. The unpack interleaves within 128-bit lanes, so accumulator dword 4L+m holds element
 * 8L+m (unpacklo) or 8L+4+m (unpackhi) of its 32-element slice; the sums are put back in order at the
 * end. Each row is divided by the sum of its rounded probabilities. */
#define DEFINE_VALUES(G)                                                                                \
static inline void values_##G(const elem_t *values, const int32_t *table, int len, int64_t head_base,   \
                              int block_size, const vf *scores, int chunks, elem_t *out) {              \
    enum { S = D / 32 };  /* 32-element slices of a row */                                              \
    __m512 lo[G][S], hi[G][S], total[G];                                                                \
    for (int j = 0; j < G; j++) {                                                                       \
        total[j] = _mm512_setzero_ps();                                                                 \
        for (int c = 0; c < S; c++) lo[j][c] = hi[j][c] = _mm512_setzero_ps();                          \
    }                                                                                                   \
    int block = 0, offset = 0;                                                                          \
    for (int k = 0; k < chunks; k++) {                                                                  \
        const int n = len - k * CHUNK < CHUNK ? len - k * CHUNK : CHUNK;                                \
        uint32_t pairs[G][CHUNK / 2];                                                                   \
        for (int j = 0; j < G; j++) {                                                                   \
            const __m256bh rounded = _mm512_cvtneps_pbh((__m512)scores[j * chunks + k]);                \
            memcpy(pairs[j], &rounded, sizeof pairs[j]);                                                \
            total[j] = _mm512_add_ps(total[j], (__m512)load_bf16((const bf16 *)pairs[j]));              \
        }                                                                                               \
        for (int t = 0; t < n; t += 2) {                                                                \
            const bf16 *first = values + (head_base + (int64_t)table[block] * block_size + offset) * D; \
            if (++offset == block_size) { block++; offset = 0; }                                        \
            const bf16 *second = first;                                                                 \
            if (t + 1 < n) {                                                                            \
                second = values + (head_base + (int64_t)table[block] * block_size + offset) * D;        \
                if (++offset == block_size) { block++; offset = 0; }                                    \
            }                                                                                           \
            for (int c = 0; c < S; c++) {                                                               \
                const __m512i a = _mm512_loadu_si512(first + c * 32);                                   \
                /* A lone last row pairs with zeros (its probability pair's second half is zero too). */ \
                const __m512i b = t + 1 < n ? _mm512_loadu_si512(second + c * 32) : _mm512_setzero_si512(); \
                const __m512bh pl = (__m512bh)_mm512_unpacklo_epi16(a, b);                              \
                const __m512bh ph = (__m512bh)_mm512_unpackhi_epi16(a, b);                              \
                for (int j = 0; j < G; j++) {                                                           \
                    const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pairs[j][t / 2]);               \
                    lo[j][c] = _mm512_dpbf16_ps(lo[j][c], pl, w);                                       \
                    hi[j][c] = _mm512_dpbf16_ps(hi[j][c], ph, w);                                       \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    for (int j = 0; j < G; j++) {                                                                       \
        const float inverse = 1.0f / _mm512_reduce_add_ps(total[j]);                                    \
        for (int c = 0; c < S; c++) {                                                                   \
            float l[16], h[16];                                                                         \
            _mm512_storeu_ps(l, lo[j][c]);                                                              \
            _mm512_storeu_ps(h, hi[j][c]);                                                              \
            for (int lane = 0; lane < 4; lane++)                                                        \
                for (int m = 0; m < 4; m++) {                                                           \
                    out[j * D + c * 32 + 8 * lane + m] = round_bf16(l[4 * lane + m] * inverse);         \
                    out[j * D + c * 32 + 8 * lane + 4 + m] = round_bf16(h[4 * lane + m] * inverse);     \
                }                                                                                       \
        }                                                                                               \
    }                                                                                                   \
}
#else
/* Row by row in float32, the group's accumulators in registers. */
#define DEFINE_VALUES(G)                                                                                \
static inline void values_##G(const elem_t *values, const int32_t *table, int len, int64_t head_base,   \
                              int block_size, const vf *scores, int chunks, elem_t *out) {              \
    enum { V = D / LANES };                                                                             \
    vf acc[G][V], total[G];                                                                             \
    for (int j = 0; j < G; j++) {                                                                       \
        total[j] = (vf){0};                                                                             \
        for (int k = 0; k < chunks; k++) total[j] += scores[j * chunks + k];                            \
        for (int c = 0; c < V; c++) acc[j][c] = (vf){0};                                                \
    }                                                                                                   \
    int block = 0, offset = 0;                                                                          \
    for (int pos = 0; pos < len; pos++) {                                                               \
        const elem_t *row = values + (head_base + (int64_t)table[block] * block_size + offset) * D;     \
        if (++offset == block_size) { block++; offset = 0; }                                            \
        const float *p = (const float *)scores + (pos / CHUNK) * LANES + pos % CHUNK;                   \
        for (int c = 0; c < V; c++) {                                                                   \
            const vf v = LOAD(row + c * LANES);                                                         \
            for (int j = 0; j < G; j++) acc[j][c] += p[j * chunks * LANES] * v;                         \
        }                                                                                               \
    }                                                                                                   \
    for (int j = 0; j < G; j++) {                                                                       \
        const float inverse = 1.0f / lane_sum(total[j]);                                                \
        for (int c = 0; c < V; c++)                                                                     \
            for (int l = 0; l < LANES; l++) out[j * D + c * LANES + l] = ROUND(acc[j][c][l] * inverse); \
    }                                                                                                   \
}
#endif

/* One (sequence, KV head), for a group of G query heads (fixed at compile time, so that the group's
 * accumulators stay in registers). q: the group's G query rows; out: their G output rows; head_base:
 * the KV head's first row in the pool; scores: scratch of G x chunks vectors. */
#define DEFINE_ONE(G)                                                                                   \
DEFINE_VALUES(G)                                                                                        \
static void one_##G(const elem_t *q, const elem_t *keys, const elem_t *values, const int32_t *table,    \
                    int len, int64_t head_base, int block_size, float scale, elem_t *out, vf *scores) { \
    enum { V = D / LANES };                                                                             \
    const int chunks = (len + CHUNK - 1) / CHUNK;                                                       \
    vf qv[G][V], maxes[G];                                                                              \
    for (int j = 0; j < G; j++) {                                                                       \
        for (int c = 0; c < V; c++) qv[j][c] = LOAD(q + j * D + c * LANES);                             \
        maxes[j] = (vf){0} - __builtin_inff();                                                          \
    }                                                                                                   \
    const elem_t *rows[CHUNK];                                                                          \
    int block = 0, offset = 0;  /* where the next key lies: table[block], offset rows in */             \
    for (int k = 0; k < chunks; k++) {                                                                  \
        const int n = len - k * CHUNK < CHUNK ? len - k * CHUNK : CHUNK;                                \
        for (int t = 0; t < n; t++) {                                                                   \
            rows[t] = keys + (head_base + (int64_t)table[block] * block_size + offset) * D;             \
            if (++offset == block_size) { block++; offset = 0; }                                        \
        }                                                                                               \
        if (KEY_PREFETCH_CHUNKS) {                                                                      \
            const int ahead = (k + 1 + KEY_PREFETCH_CHUNKS) * CHUNK;                                    \
            prefetch_rows(keys, head_base, table, block_size, k == 0 ? CHUNK : ahead - CHUNK,           \
                          ahead < len ? ahead : len);                                                   \
        }                                                                                               \
        for (int j = 0; j < G; j++) {                                                                   \
            vf dots[CHUNK];                                                                             \
            key_dots(qv[j], q + j * D, rows, n, dots);                                                  \
            vf s = transpose_sum(dots) * scale;                                                         \
            for (int t = n; t < CHUNK; t++) s[t] = -__builtin_inff();                                   \
            scores[j * chunks + k] = s;                                                                 \
            maxes[j] = lane_select(s > maxes[j], s, maxes[j]);                                          \
        }                                                                                               \
    }                                                                                                   \
    for (int j = 0; j < G; j++) {                                                                       \
        const float m = lane_max(maxes[j]);                                                             \
        for (int k = 0; k < chunks; k++) {                                                              \
            const vf s = scores[j * chunks + k];                                                        \
            scores[j * chunks + k] = lane_select(s == -__builtin_inff(), (vf){0}, exp_nonpositive(s - m)); \
        }                                                                                               \
    }                                                                                                   \
    values_##G(values, table, len, head_base, block_size, scores, chunks, out);                         \
}

DEFINE_ONE(1) DEFINE_ONE(2) DEFINE_ONE(3) DEFINE_ONE(4) DEFINE_ONE(5) DEFINE_ONE(6) DEFINE_ONE(7) DEFINE_ONE(8)

typedef void (*one_fn)(const elem_t *, const elem_t *, const elem_t *, const int32_t *, int, int64_t, int, float,
                       elem_t *, vf *);
static const one_fn one_by_group[GROUP_MAX + 1] = {0, one_1, one_2, one_3, one_4, one_5, one_6, one_7, one_8};

/* The entry point: q [num_seqs, num_heads, HEAD_DIM], its rows q_stride elements apart; keys and values
 * one layer's pool, [num_kv_heads, num_slots, HEAD_DIM]; tables [num_seqs, width] block numbers; lens
 * [num_seqs] context lengths (each at least 1, at most width * block_size); out [num_seqs, num_heads,
 * HEAD_DIM]. With new_keys (else NULL), each sequence's own new key and value, [num_seqs, num_kv_heads,
 * HEAD_DIM] with rows new_keys_stride and new_values_stride apart, are first written to the pool at
 * slots[seq] (by the thread that then reads them: one copy per row, none of a whole batch). The
 * (sequence, KV head) pairs are shared among num_threads OpenMP threads. Returns 0; -1 for a group size
 * it has no kernel for; -2 when scratch memory could not be had. */
int paged_decode_attention(const elem_t *q, int64_t q_stride, elem_t *keys, elem_t *values, int64_t num_slots,
                           const int32_t *tables, int width, const int32_t *lens, int num_seqs, int num_heads,
                           int num_kv_heads, int block_size, float scale, elem_t *out, int num_threads,
                           const elem_t *new_keys, int64_t new_keys_stride, const elem_t *new_values,
                           int64_t new_values_stride, const int64_t *slots) {
    if (num_kv_heads < 1 || num_heads % num_kv_heads || num_heads / num_kv_heads > GROUP_MAX || block_size < 1)
        return -1;
    const int group = num_heads / num_kv_heads;
    const one_fn one = one_by_group[group];
    int max_len = 1;
    for (int i = 0; i < num_seqs; i++) max_len = lens[i] > max_len ? lens[i] : max_len;
    const size_t scratch = sizeof(vf) * (size_t)group * ((max_len + CHUNK - 1) / CHUNK);
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        vf *scores = aligned_alloc(64, scratch);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < num_seqs * num_kv_heads; item++) {
            if (!scores) continue;
            const int seq = item / num_kv_heads, head = item % num_kv_heads;
            const int64_t first_row = (int64_t)seq * num_heads + (int64_t)head * group;
            if (new_keys) {
                const int64_t row = ((int64_t)head * num_slots + slots[seq]) * D;
                memcpy(keys + row, new_keys + seq * new_keys_stride + (int64_t)head * D, D * sizeof(elem_t));
                memcpy(values + row, new_values + seq * new_values_stride + (int64_t)head * D, D * sizeof(elem_t));
            }
            one(q + seq * q_stride + (int64_t)head * group * D, keys, values, tables + (int64_t)seq * width,
                lens[seq], (int64_t)head * num_slots, block_size, scale, out + first_row * D, scores);
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
