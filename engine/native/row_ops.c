/* The small row-wise steps of a Llama layer, each one pass over its rows: RMSNorm (after the residual
 * add that precedes it), SiLU-and-multiply, and the rotary embedding of the query and key heads.
 *
 * Why (engine/native_kernels.py builds this with paged_decode_attention.c): PyTorch runs each of these as
 * a chain of whole-tensor ops (RMSNorm alone is an upcast, a square, a mean, an rsqrt and two products),
 * every one a pass over memory and a trip through the dispatcher, for tensors of a few dozen rows in a
 * decode step.
 *
 * Numerics follow what PyTorch computes op by op, rounding to the model's dtype (to nearest even)
 * wherever an op of the PyTorch path would: the residual add rounded, then RMSNorm in float32, h times
 * 1 / sqrt(mean of squares + eps), then times the weight; SiLU rounded before the product; the rotary
 * terms rounded before they are added. What differs: the sum of squares is taken in double and the
 * inverse square root rounded correctly (PyTorch's float32 one was up to 2 units off on a Zen 3), and
 * exp's last bits. So a float32 norm can differ from PyTorch's by a few units in the last place, a
 * bfloat16 result rarely by one. Products are never fused with the additions that follow them (a fused
 * multiply-add rounds once where PyTorch rounds twice). */
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(BF16)
#error "build with -DBF16=<1 for bfloat16, 0 for float32>"
#endif

/* Rows are shared among threads only when there are enough of them to repay waking the threads. */
#define PARALLEL_MIN_ELEMENTS 65536

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if BF16
typedef uint16_t elem_t;
#define GET(p) from_bf16(p)
#define PUT(f) to_bf16(f)
#else
typedef float elem_t;
#define GET(p) (p)
#define PUT(f) (f)
#endif

/* exp(x) for x <= 0, within a few ulp (the polynomial of paged_decode_attention.c, scalar here: the
 * compiler vectorizes the loops that call it, where no-trapping-math lets it compute both sides of a
 * select: without it the SiLU loop stayed scalar, 5x slower than PyTorch's). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
                    + r * (1.0f / 720))))));
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* x * sigmoid(x): x / (1 + exp(-x)) for x >= 0, and x exp(x) / (1 + exp(x)) below, so that exp is taken
 * only of -|x|. Below -87 the result is under 1e-35 in magnitude: -0, as PyTorch's is from about -89 on.
 * Branch-free, so that the loop calling it vectorizes. */
static inline float silu(float x) {
    const float e = exp_nonpositive(x < 0 ? x : -x);
    const float y = (x < 0 ? x * e : x) / (1.0f + e);
    return x < -87.0f ? -0.0f : y;
}

/* rows x hidden. With residual (else NULL): h += residual first (rounded, and kept in h: the residual
 * stream). Then out = RMSNorm(h) * weight (weight in float32). residual rows lie residual_stride apart;
 * h and out are contiguous. */
void rms_norm(elem_t *h, const elem_t *residual, int64_t residual_stride, const float *weight, elem_t *out,
              int rows, int hidden, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if ((int64_t)rows * hidden >= PARALLEL_MIN_ELEMENTS)
    for (int r = 0; r < rows; r++) {
        elem_t *row = h + (int64_t)r * hidden;
        if (residual) {
            const elem_t *add = residual + (int64_t)r * residual_stride;
            for (int i = 0; i < hidden; i++) row[i] = PUT(GET(row[i]) + GET(add[i]));
        }
        /* The sum of squares in double: as close to exact as PyTorch's float32 sum is, whatever order
         * either adds in, so the two differ by PyTorch's rounding error alone (one float32 unit at most
         * in the normalized rows measured, against up to four with a float32 sum). Eight partial sums,
         * so that the loop vectorizes without reordering any one of them. */
        double partial[8] = {0};
        int i = 0;
        for (; i + 8 <= hidden; i += 8)
            for (int l = 0; l < 8; l++) {
                const double v = GET(row[i + l]);
                partial[l] += v * v;
            }
        double sum = 0;
        for (; i < hidden; i++) sum += (double)GET(row[i]) * GET(row[i]);
        for (int l = 0; l < 8; l++) sum += partial[l];
        const float inverse = 1.0f / sqrtf((float)(sum / hidden) + eps);
        elem_t *o = out + (int64_t)r * hidden;
        for (int j = 0; j < hidden; j++) o[j] = PUT((GET(row[j]) * inverse) * weight[j]);
    }
}

/* gate_up [rows, 2 * inter] (gate then up, rows stride apart) -> out [rows, inter] = SiLU(gate) * up. */
void silu_mul(const elem_t *gate_up, int64_t stride, elem_t *out, int rows, int inter, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if ((int64_t)rows * inter >= PARALLEL_MIN_ELEMENTS)
    for (int r = 0; r < rows; r++) {
        const elem_t *gate = gate_up + (int64_t)r * stride, *up = gate + inter;
        elem_t *o = out + (int64_t)r * inter;
        for (int i = 0; i < inter; i++) o[i] = PUT(GET(PUT(silu(GET(gate[i])))) * GET(up[i]));
    }
}

/* In place, the first `heads` heads of head_dim (even, at most 512) elements of each of the rows (stride
 * apart): x * cos + rotate_half(x) * signed_sin, cos and signed_sin [rows, head_dim] (the row's
 * position's). */
void rotary(elem_t *x, int64_t stride, int rows, int heads, int head_dim, const elem_t *cos,
            const elem_t *signed_sin, int num_threads) {
    const int half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if ((int64_t)rows * heads * head_dim >= PARALLEL_MIN_ELEMENTS)
    for (int r = 0; r < rows; r++) {
        const elem_t *c = cos + (int64_t)r * head_dim, *s = signed_sin + (int64_t)r * head_dim;
        for (int h = 0; h < heads; h++) {
            elem_t *v = x + (int64_t)r * stride + (int64_t)h * head_dim;
            float rotated[512];
            for (int i = 0; i < half; i++) {
                rotated[i] = GET(v[i + half]);
                rotated[i + half] = GET(v[i]);
            }
            for (int i = 0; i < head_dim; i++)
                v[i] = PUT(GET(PUT(GET(v[i]) * GET(c[i]))) + GET(PUT(rotated[i] * GET(s[i]))));
        }
    }
}
