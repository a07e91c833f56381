/* The fused merge loops behind fedmerge/merging/fused.py: one pass over a block per call.
 *
 * Compiled on first use by fedmerge/merging/native.py (which documents the flags) and
 * called through ctypes. Inputs are "sources": src[0] is the reference θ_ref, src[1..K]
 * the experts θ_k, each a flat array of m elements in its stored dtype, bf16[j] != 0
 * where src[j] holds bfloat16 bit patterns (uint16), else float32. τ_k = float32(θ_k) −
 * float32(θ_ref) is formed tile by tile (TILE elements: K float32 rows stay in L1) and all
 * of a pass's work is done on the tile. Every operation is one IEEE float32 operation in
 * the torch kernels' order (built with -ffp-contract=off, no fast-math), so the results
 * are bit-identical to theirs. bfloat16 is narrowed by round-to-nearest-even exactly as
 * torch's .to(torch.bfloat16) (NaN -> 0x7FC0).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define TILE 512
#define ABS_BITS 0x7FFFFFFFu
#define INF_BITS 0x7F800000u /* |x| bit patterns at or above this: Inf or NaN */

static inline uint32_t bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float from_bits(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

#define GAMMA 0x9E3779B97F4A7C15ull /* SplitMix64's Weyl increment */

/* steps[i] = (first + i + 1)·γ (mod 2⁶⁴): entry first+i's SplitMix64 step, the same for
 * every stream, so a tile computes it once for all K experts. */
static void fill_steps(uint64_t *steps, int64_t first, int n) {
    for (int i = 0; i < n; i++) steps[i] = (uint64_t)(first + i + 1) * GAMMA;
}

/* Is the entry with SplitMix64 step `step` of stream `key` kept? (fedmerge/merging/dropmask.py) */
static inline int keep_step(uint64_t key, uint64_t step, uint64_t limit) {
    uint64_t z = key + step;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 11) < limit;
}

/* dst[:n] = float32(src[s:s+n]) */
static void widen(const void *src, int bf16, int64_t s, int n, float *restrict dst) {
    if (bf16) {
        const uint16_t *h = (const uint16_t *)src + s;
        for (int i = 0; i < n; i++) dst[i] = from_bits((uint32_t)h[i] << 16);
    } else {
        memcpy(dst, (const float *)src + s, (size_t)n * sizeof(float));
    }
}

/* out[:n] = float32(x[s+i]) − b[i]; returns the largest |τ| bit pattern (>= INF_BITS: not finite) */
static uint32_t tau(const void *x, int bf16, int64_t s, int n, const float *restrict b,
                    float *restrict out) {
    uint32_t worst = 0;
    if (bf16) {
        const uint16_t *h = (const uint16_t *)x + s;
        for (int i = 0; i < n; i++) {
            float t = from_bits((uint32_t)h[i] << 16) - b[i];
            out[i] = t;
            worst = umax(worst, bits(t) & ABS_BITS);
        }
    } else {
        const float *f = (const float *)x + s;
        for (int i = 0; i < n; i++) {
            float t = f[i] - b[i];
            out[i] = t;
            worst = umax(worst, bits(t) & ABS_BITS);
        }
    }
    return worst;
}

/* out[s+i] = v[i] in out's dtype; returns the largest stored |value| on the float32 bit scale */
static uint32_t put(void *out, int bf16, int64_t s, int n, const float *restrict v) {
    uint32_t worst = 0;
    if (bf16) {
        uint16_t *o = (uint16_t *)out + s;
        for (int i = 0; i < n; i++) {
            uint32_t b = bits(v[i]);
            uint16_t h = (uint16_t)((b + ((b >> 16) & 1u) + 0x7FFFu) >> 16);
            h = v[i] != v[i] ? (uint16_t)0x7FC0 : h;
            o[i] = h;
            worst = umax(worst, (uint32_t)(h & 0x7FFFu) << 16);
        }
    } else {
        float *o = (float *)out + s;
        for (int i = 0; i < n; i++) {
            o[i] = v[i];
            worst = umax(worst, bits(v[i]) & ABS_BITS);
        }
    }
    return worst;
}

/* DARE on one τ tile row[:n] (steps: its entries' SplitMix64 steps): × keep (1 or 0, as
 * tau.mul_(mask)), then ÷ density when nonzero. limit < 0 keeps everything (no DARE). */
static void drop(float *restrict row, int n, uint64_t key, const uint64_t *restrict steps,
                 int64_t limit, float density) {
    if (limit < 0) return;
    for (int i = 0; i < n; i++) row[i] = row[i] * (keep_step(key, steps[i], (uint64_t)limit) ? 1.0f : 0.0f);
    if (density != 0.0f)
        for (int i = 0; i < n; i++) row[i] = row[i] / density;
}

/* DARE's keep masks out (K, m), 0/1 bytes, of entries start..start+m−1 */
void keep_mask(const uint64_t *keys, int64_t K, int64_t start, int64_t m, uint64_t limit,
               uint8_t *out) {
    uint64_t steps[TILE];
    for (int64_t s = 0; s < m; s += TILE) {
        int n = (int)imin(TILE, m - s);
        fill_steps(steps, start + s, n);
        for (int64_t k = 0; k < K; k++) {
            uint8_t *o = out + k * m + s;
            for (int i = 0; i < n; i++) o[i] = (uint8_t)keep_step(keys[k], steps[i], limit);
        }
    }
}

/* θ_ref + λ·(Σ_k w_k τ'_k [÷ total when nonzero]) into out: the in-order sum of the torch
 * kernel; τ' = τ after DARE's drop (limit >= 0). Returns 0 if a value is not finite. */
int mix_block(const void *const *src, const int32_t *bf16, int64_t K, int64_t m,
              const uint64_t *keys, int64_t first, int64_t limit, float density,
              const float *w, float total, float lam, void *out, int32_t out_bf16) {
    float b[TILE], acc[TILE], t[TILE];
    uint64_t steps[TILE];
    uint32_t worst = 0;
    for (int64_t s = 0; s < m; s += TILE) {
        int n = (int)imin(TILE, m - s);
        widen(src[0], bf16[0], s, n, b);
        if (limit >= 0) fill_steps(steps, first + s, n);
        worst = umax(worst, tau(src[1], bf16[1], s, n, b, acc));
        drop(acc, n, keys[0], steps, limit, density);
        float w0 = w[0];
        for (int i = 0; i < n; i++) acc[i] = acc[i] * w0;
        for (int64_t k = 1; k < K; k++) {
            worst = umax(worst, tau(src[k + 1], bf16[k + 1], s, n, b, t));
            drop(t, n, keys[k], steps, limit, density);
            float wk = w[k];
            for (int i = 0; i < n; i++) acc[i] += t[i] * wk;
        }
        if (K == 1)
            for (int i = 0; i < n; i++) acc[i] += 0.0f; /* torch sums one row as 0 + t */
        if (total != 0.0f)
            for (int i = 0; i < n; i++) acc[i] = acc[i] / total;
        for (int i = 0; i < n; i++) acc[i] = acc[i] * lam + b[i];
        worst = umax(worst, put(out, out_bf16, s, n, acc));
    }
    return worst < INF_BITS;
}

/* One expert's tile for TIES: row[i] = w_k · trim_t(drop(τ_k[i])) and elected[i] += row[i];
 * returns the largest |τ| bit pattern. `bf16` and `dare` (0: none, 1: × keep, 2: × keep
 * then ÷ density) are constants where it is called, so each variant is its own simple
 * loop that the compiler vectorizes. trim: copysign(threshold(|τ|), τ); steps[i]: the
 * SplitMix64 step of the tile's entry i (shared by the experts' streams). */
static inline uint32_t weigh(const void *x, const int bf16, int64_t s, int n,
                             const float *restrict b, const int dare, uint64_t key,
                             const uint64_t *restrict steps, uint64_t limit, float density,
                             float tk, float wk, float *restrict row, float *restrict elected) {
    const uint16_t *h = (const uint16_t *)x + s;
    const float *f = (const float *)x + s;
    uint32_t worst = 0;
    for (int i = 0; i < n; i++) {
        float t = (bf16 ? from_bits((uint32_t)h[i] << 16) : f[i]) - b[i];
        worst = umax(worst, bits(t) & ABS_BITS);
        if (dare) t = t * (keep_step(key, steps[i], limit) ? 1.0f : 0.0f);
        if (dare == 2) t = t / density;
        float kept = from_bits(bits(t) & ABS_BITS) >= tk ? t : from_bits(bits(t) & 0x80000000u);
        row[i] = kept * wk;
        elected[i] += row[i];
    }
    return worst;
}

/* TIES on one block: DARE's drop (limit >= 0), trim at thr (K,) (0: keep all), weigh by w,
 * elect the sign of the in-order sum, disjoint sum (÷ the agreeing weights when normalize;
 * low = min(w) if positive, else 0), θ_ref + λ·merged into out: the operations of
 * sparsify.elect_and_combine. In-order sums start from −0.0, the identity of IEEE addition
 * (−0 + x = x for every x), and one row sums as 0 + t, as torch's. Returns 0 if an input or
 * output value is not finite, −1 if out of memory. */
int ties_block(const void *const *src, const int32_t *bf16, int64_t K, int64_t m,
               const uint64_t *keys, int64_t first, int64_t limit, float density,
               const float *thr, const float *w, int32_t normalize, float low, float lam,
               void *out, int32_t out_bf16) {
    float b[TILE], elected[TILE], merged[TILE], divisor[TILE];
    uint64_t steps[TILE];
    float (*wt)[TILE] = malloc((size_t)K * sizeof *wt); /* K weighted τ rows of a tile */
    if (!wt) return -1;
    const int dare = limit < 0 ? 0 : density != 0.0f ? 2 : 1;
    const uint64_t lim = (uint64_t)limit;
    uint32_t worst = 0;
    for (int64_t s = 0; s < m; s += TILE) {
        int n = (int)imin(TILE, m - s);
        widen(src[0], bf16[0], s, n, b);
        for (int i = 0; i < n; i++) elected[i] = merged[i] = divisor[i] = -0.0f;
        if (dare) fill_steps(steps, first + s, n);
        for (int64_t k = 0; k < K; k++) {
            const void *x = src[k + 1];
            float tk = thr[k], wk = w[k], *row = wt[k];
#define WEIGH(B, D) weigh(x, B, s, n, b, D, keys[k], steps, lim, density, tk, wk, row, elected)
            uint32_t most = bf16[k + 1] ? (dare == 0 ? WEIGH(1, 0) : dare == 1 ? WEIGH(1, 1) : WEIGH(1, 2))
                                        : (dare == 0 ? WEIGH(0, 0) : dare == 1 ? WEIGH(0, 1) : WEIGH(0, 2));
#undef WEIGH
            worst = umax(worst, most);
        }
        for (int i = 0; i < n; i++) /* copysign(1, Σ), one row as 0 + t */
            elected[i] = from_bits(0x3F800000u | (bits(K == 1 ? elected[i] + 0.0f : elected[i]) & 0x80000000u));
        for (int64_t k = 0; k < K; k++) {
            float wk = w[k], *row = wt[k];
            for (int i = 0; i < n; i++) {
                float a = row[i] * elected[i];
                a = a < 0.0f ? 0.0f : a; /* clamp(min=0) keeps −0.0 */
                merged[i] += a;
                divisor[i] += wk * (a > 0.0f ? 1.0f : 0.0f); /* w_k · sign(a) */
            }
        }
        if (K == 1)
            for (int i = 0; i < n; i++) {
                merged[i] += 0.0f;
                divisor[i] += 0.0f;
            }
        if (normalize && low > 0.0f) { /* clamp(min=low): a zero divisor merges ±0 anyway */
            for (int i = 0; i < n; i++) merged[i] = merged[i] / (divisor[i] < low ? low : divisor[i]);
        } else if (normalize) { /* a zero divisor (no expert agrees) becomes 1 */
            for (int i = 0; i < n; i++)
                merged[i] = merged[i] / (divisor[i] == 0.0f ? 1.0f : divisor[i]);
        }
        for (int i = 0; i < n; i++) merged[i] = merged[i] * elected[i] * lam + b[i];
        worst = umax(worst, put(out, out_bf16, s, n, merged));
    }
    free(wt);
    return worst < INF_BITS;
}

/* Histogram one digit of the float32 bit patterns of |τ_k| into hist (K, 2^16): level 0 the
 * top 16 bits of every |τ_k|, level 1 the low 16 bits of those whose top 16 bits equal
 * prefix[k] (non-negative floats order like their bit patterns: two levels find the exact
 * k-th smallest). */
void radix_count(const void *const *src, const int32_t *bf16, int64_t K, int64_t m,
                 const int64_t *prefix, int32_t level, int64_t *hist) {
    float b[TILE], t[TILE];
    for (int64_t s = 0; s < m; s += TILE) {
        int n = (int)imin(TILE, m - s);
        widen(src[0], bf16[0], s, n, b);
        for (int64_t k = 0; k < K; k++) {
            int64_t *h = hist + (k << 16);
            tau(src[k + 1], bf16[k + 1], s, n, b, t);
            if (level == 0) {
                for (int i = 0; i < n; i++) h[(bits(t[i]) & ABS_BITS) >> 16] += 1;
            } else {
                uint32_t p = (uint32_t)prefix[k];
                for (int i = 0; i < n; i++) {
                    uint32_t a = bits(t[i]) & ABS_BITS;
                    if ((a >> 16) == p) h[a & 0xFFFFu] += 1;
                }
            }
        }
    }
}

/* The float32 bit patterns of |τ_k| of `runs` runs of `run` elements, starting at
 * starts[r], into out (K, runs·run): a sample of the block's magnitudes in one call */
void magnitude_runs(const void *const *src, const int32_t *bf16, int64_t K, int64_t m,
                    const int64_t *starts, int64_t runs, int64_t run, uint32_t *out) {
    float b[TILE], t[TILE];
    for (int64_t r = 0; r < runs; r++) {
        int64_t first = starts[r], stop = first + run < m ? first + run : m;
        for (int64_t s = first; s < stop; s += TILE) {
            int n = (int)imin(TILE, stop - s);
            widen(src[0], bf16[0], s, n, b);
            for (int64_t k = 0; k < K; k++) {
                uint32_t *o = out + k * runs * run + r * run + (s - first);
                tau(src[k + 1], bf16[k + 1], s, n, b, t);
                for (int i = 0; i < n; i++) o[i] = bits(t[i]) & ABS_BITS;
            }
        }
    }
}

/* One expert's tile for bracket_count: with a = the |τ_k[i]| bit patterns, adds to cnt (5) the
 * counts of a < lo, a == lo, a == c, a == hi and of lo < a < c, and appends the a strictly
 * inside (lo, hi) other than c to out[*j:] (at most cap kept, *j counts all; past cap it
 * exceeds cap). AVX-512: 16 entries at a time, appended by one compress and one store. */
static inline void classify(const void *x, const int bf16, int64_t s, int n, const float *restrict b,
                            const uint32_t lo, const uint32_t c, const uint32_t hi, int64_t *cnt,
                            uint32_t *restrict out, int64_t cap, int64_t *j) {
    const uint16_t *h = (const uint16_t *)x + s;
    const float *f = (const float *)x + s;
    int64_t below = 0, at_lo = 0, at_c = 0, at_hi = 0, under = 0, at = *j;
    int i = 0;
#ifdef __AVX512F__
    const __m512i vlo = _mm512_set1_epi32((int)lo), vc = _mm512_set1_epi32((int)c),
                  vhi = _mm512_set1_epi32((int)hi), mag = _mm512_set1_epi32(0x7FFFFFFF);
    for (; i + 16 <= n; i += 16) {
        __m512 v = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                              _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(h + i))), 16))
                        : _mm512_loadu_ps(f + i);
        __m512i a = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(v, _mm512_loadu_ps(b + i))), mag);
        __mmask16 lt_lo = _mm512_cmplt_epu32_mask(a, vlo), lt_c = _mm512_cmplt_epu32_mask(a, vc),
                  lt_hi = _mm512_cmplt_epu32_mask(a, vhi), eq_c = _mm512_cmpeq_epu32_mask(a, vc),
                  gt_lo = _mm512_cmpgt_epu32_mask(a, vlo);
        __mmask16 keep = gt_lo & lt_hi & (__mmask16)~eq_c;
        below += __builtin_popcount(lt_lo);
        at_lo += __builtin_popcount((__mmask16)~(lt_lo | gt_lo));
        at_c += __builtin_popcount(eq_c);
        at_hi += __builtin_popcount(_mm512_cmpeq_epu32_mask(a, vhi));
        under += __builtin_popcount(gt_lo & lt_c);
        /* compress in a register, then a plain store of all 16 lanes (the slack past the
         * kept ones is overwritten later), with or without any kept: a compressing store
         * to memory is microcoded on AMD Zen 4 (~100 cycles) and a branch on `keep` is
         * mispredicted often; the two took 2/3 of this loop's time */
        if (at + 16 <= cap) _mm512_storeu_si512(out + at, _mm512_maskz_compress_epi32(keep, a));
        else if (keep && at <= cap) at = cap + 1; /* from here on counted, not kept */
        at += __builtin_popcount(keep);
    }
#endif
    for (; i < n; i++) {
        float t = (bf16 ? from_bits((uint32_t)h[i] << 16) : f[i]) - b[i];
        uint32_t a = bits(t) & ABS_BITS;
        below += a < lo, at_lo += a == lo, at_c += a == c, at_hi += a == hi;
        under += (a > lo) & (a < c);
        if (a > lo && a < hi && a != c) {
            if (at < cap) out[at] = a;
            at++;
        }
    }
    cnt[0] += below, cnt[1] += at_lo, cnt[2] += at_c, cnt[3] += at_hi, cnt[4] += under;
    *j = at;
}

/* Per expert k, with bit patterns lo < c < hi = edges[k] (K, 3): add to counts[k] (K, 5) the
 * numbers of |τ_k| below lo, equal to lo, to c and to hi (ties are counted, not stored) and
 * strictly between lo and c, and copy those strictly between lo and hi other than c to
 * buf[k, stored[k]:] (buf (K, cap); stored counts them all, and exceeds cap where not all
 * were kept). */
void bracket_count(const void *const *src, const int32_t *bf16, int64_t K, int64_t m,
                   const int64_t *edges, int64_t *counts, uint32_t *buf, int64_t cap,
                   int64_t *stored) {
    float b[TILE];
    for (int64_t s = 0; s < m; s += TILE) {
        int n = (int)imin(TILE, m - s);
        widen(src[0], bf16[0], s, n, b);
        for (int64_t k = 0; k < K; k++) {
            const int64_t *e = edges + 3 * k;
            const uint32_t lo = (uint32_t)e[0], c = (uint32_t)e[1], hi = (uint32_t)e[2];
            if (bf16[k + 1])
                classify(src[k + 1], 1, s, n, b, lo, c, hi, counts + 5 * k, buf + k * cap, cap, stored + k);
            else
                classify(src[k + 1], 0, s, n, b, lo, c, hi, counts + 5 * k, buf + k * cap, cap, stored + k);
        }
    }
}
