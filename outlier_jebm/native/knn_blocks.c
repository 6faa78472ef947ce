/*
 * Fused nearest-column search for latent_knn / latent_knn_cos (see outlier_jebm/native/__init__.py).
 *
 * For queries Q (B, Z) and a reference matrix W (Z, R') packed in strips of 16 columns
 * (P[s][k][j] = W[k][16 s + j]), each search t looks at key_t = (Q W) * scale_t + shift_t per
 * column and returns, per query row, the m columns with the smallest keys (unordered).
 *
 * The product is never written out to memory. A 6-row by 16-column register tile runs over
 * Z with AVX2 FMAs; the products of one 64-column block go to a small buffer in L1, and each
 * row's smallest key per search is taken from it. A block whose minimum beats the worst of
 * the row's m kept blocks has its keys stored in that one's place. The m smallest keys of a
 * row lie in the m blocks with the smallest minima, so at the end the m smallest keys among
 * the kept blocks are the answer (up to ties). Reference columns are walked in chunks that
 * stay in L2 while every row tile of the call passes over them.
 *
 * Plain C with intrinsics, built by the package on first use with the system compiler;
 * the torch search in scoring.py computes the same thing wherever this is not available.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 6
#define STRIP 16
#define BLOCK 64
#define MAX_SEARCHES 2

int jebm_knn_abi(void) { return 4; }

/* Whether this build splits rows between OpenMP threads itself (else the caller splits them). */
int jebm_knn_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int jebm_knn_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static inline float hmin8(__m256 v) {
    __m128 a = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_min_ps(a, _mm_movehl_ps(a, a));
    a = _mm_min_ss(a, _mm_shuffle_ps(a, a, 1));
    return _mm_cvtss_f32(a);
}

/* One 8-column vector of keys: product * scale + shift (sc NULL: scale 1, an add off the FMA pipes). */
static inline __m256 key8(const float *d, const float *sc, const float *sh) {
    return sc ? _mm256_fmadd_ps(_mm256_load_ps(d), _mm256_loadu_ps(sc), _mm256_loadu_ps(sh))
              : _mm256_add_ps(_mm256_load_ps(d), _mm256_loadu_ps(sh));
}

/* One search's kept blocks for one row. */
typedef struct {
    float *minima;   /* m */
    int64_t *ids;    /* m block ids */
    float *keys;     /* m * BLOCK */
    int64_t count;
    int64_t worst;   /* index of the largest kept minimum once count == m */
} kept_t;

static void keep(kept_t *s, int64_t m, float v, int64_t id, const float *dots, const float *sc, const float *sh) {
    int64_t at;
    if (s->count < m) {
        at = s->count++;
    } else {
        if (!(v < s->minima[s->worst])) return;
        at = s->worst;
    }
    s->minima[at] = v;
    s->ids[at] = id;
    for (int j = 0; j < BLOCK; j += 8)  /* the same arithmetic as block_min */
        _mm256_storeu_ps(s->keys + at * BLOCK + j, key8(dots + j, sc ? sc + j : NULL, sh + j));
    if (s->count == m) {
        int64_t w = 0;
        for (int64_t j = 1; j < m; j++)
            if (s->minima[j] > s->minima[w]) w = j;
        s->worst = w;
    }
}

#define FMA_ROW(i)                                         \
    do {                                                   \
        __m256 a = _mm256_broadcast_ss(q + i);             \
        c##i##0 = _mm256_fmadd_ps(a, w0, c##i##0);         \
        c##i##1 = _mm256_fmadd_ps(a, w1, c##i##1);         \
    } while (0)

#define STORE_ROW(i)                                                          \
    do {                                                                      \
        _mm256_store_ps(dots + i * BLOCK + strip * STRIP, c##i##0);           \
        _mm256_store_ps(dots + i * BLOCK + strip * STRIP + 8, c##i##1);       \
    } while (0)

/* The products of a tile of 6 rows with one 64-column block: dots[row][64]. */
static void tile_block(const float *qt, const float *P, int64_t Z, int64_t col0, float *dots) {
    for (int strip = 0; strip < BLOCK / STRIP; strip++) {
        const float *w = P + (col0 / STRIP + strip) * Z * STRIP;
        __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
        __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
        __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
        __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
        __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
        __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
        const float *q = qt;
        for (int64_t k = 0; k < Z; k++, w += STRIP, q += TILE) {
            __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
            FMA_ROW(0); FMA_ROW(1); FMA_ROW(2); FMA_ROW(3); FMA_ROW(4); FMA_ROW(5);
        }
        STORE_ROW(0); STORE_ROW(1); STORE_ROW(2); STORE_ROW(3); STORE_ROW(4); STORE_ROW(5);
    }
}

/* The smallest key of a row's 64-column block. */
static inline float block_min(const float *d, const float *sc, const float *sh) {
    __m256 a0 = _mm256_min_ps(key8(d, sc, sh), key8(d + 8, sc ? sc + 8 : NULL, sh + 8));
    __m256 a1 = _mm256_min_ps(key8(d + 16, sc ? sc + 16 : NULL, sh + 16), key8(d + 24, sc ? sc + 24 : NULL, sh + 24));
    __m256 a2 = _mm256_min_ps(key8(d + 32, sc ? sc + 32 : NULL, sh + 32), key8(d + 40, sc ? sc + 40 : NULL, sh + 40));
    __m256 a3 = _mm256_min_ps(key8(d + 48, sc ? sc + 48 : NULL, sh + 48), key8(d + 56, sc ? sc + 56 : NULL, sh + 56));
    return hmin8(_mm256_min_ps(_mm256_min_ps(a0, a1), _mm256_min_ps(a2, a3)));
}

/* The search for rows [0, B) of Q, on the calling thread. */
static int search_rows(const float *Q, int64_t B, int64_t Z, const float *P, int64_t Rp,
                       const float *scale, const float *shift, int64_t T, int64_t unit, int64_t m,
                       int64_t chunk, int64_t *out) {
    if (B == 0) return 0;
    int64_t nblocks = Rp / BLOCK, per_chunk = chunk / BLOCK > 0 ? chunk / BLOCK : 1;
    int64_t states = B * T;
    float *minima = malloc(sizeof(float) * states * m);
    int64_t *ids = malloc(sizeof(int64_t) * states * m);
    float *kept_keys = malloc(sizeof(float) * states * m * BLOCK);
    kept_t *kept = calloc(states, sizeof(kept_t));
    float *qt = aligned_alloc(32, sizeof(float) * ((Z * TILE + 7) / 8 * 8));
    float *dots = aligned_alloc(32, sizeof(float) * TILE * BLOCK);
    float *best = malloc(sizeof(float) * m); /* the final selection's keys (heap: m is the caller's) */
    int rc = 0;
    if (!minima || !ids || !kept_keys || !kept || !qt || !dots || !best) { rc = 2; goto done; }
    for (int64_t s = 0; s < states; s++) {
        kept[s].minima = minima + s * m;
        kept[s].ids = ids + s * m;
        kept[s].keys = kept_keys + s * m * BLOCK;
    }
    for (int64_t b0 = 0; b0 < nblocks; b0 += per_chunk) {
        int64_t b1 = b0 + per_chunk < nblocks ? b0 + per_chunk : nblocks;
        for (int64_t r0 = 0; r0 < B; r0 += TILE) {
            int64_t rows = B - r0 < TILE ? B - r0 : TILE;
            for (int64_t k = 0; k < Z; k++)
                for (int64_t i = 0; i < TILE; i++)
                    qt[k * TILE + i] = i < rows ? Q[(r0 + i) * Z + k] : 0.0f;
            for (int64_t b = b0; b < b1; b++) {
                tile_block(qt, P, Z, b * BLOCK, dots);
                for (int64_t t = 0; t < T; t++) {
                    const float *sc = (unit >> t) & 1 ? NULL : scale + t * Rp + b * BLOCK;
                    const float *sh = shift + t * Rp + b * BLOCK;
                    for (int64_t i = 0; i < rows; i++) {
                        kept_t *s = &kept[(r0 + i) * T + t];
                        float v = block_min(dots + i * BLOCK, sc, sh);
                        if (s->count < m || v < s->minima[s->worst])
                            keep(s, m, v, b, dots + i * BLOCK, sc, sh);
                    }
                }
            }
        }
    }
    /* the m smallest keys among each row's kept blocks */
    for (int64_t s = 0; s < states; s++) {
        kept_t *st = &kept[s];
        int64_t *dst = out + s * m, n = st->count * BLOCK, filled = 0, worst = 0;
        for (int64_t j = 0; j < n; j++) {
            float v = st->keys[j];
            int64_t col = st->ids[j / BLOCK] * BLOCK + j % BLOCK;
            if (filled < m) {
                best[filled] = v;
                dst[filled++] = col;
                if (filled == m)
                    for (int64_t u = 1; u < m; u++)
                        if (best[u] > best[worst]) worst = u;
            } else if (v < best[worst]) {
                best[worst] = v;
                dst[worst] = col;
                worst = 0;
                for (int64_t u = 1; u < m; u++)
                    if (best[u] > best[worst]) worst = u;
            }
        }
        for (; filled < m; filled++) dst[filled] = 0; /* fewer than m kept columns: cannot happen for m <= R' */
    }
done:
    free(minima); free(ids); free(kept_keys); free(kept); free(qt); free(dots); free(best);
    return rc;
}

/*
 * Q (B, Z) row-major; P packed (R'/16, Z, 16); scale, shift (T, R'); R' a multiple of 64.
 * out (B, T, m): column indices. chunk: reference columns per pass (rounded to blocks).
 * threads: how many OpenMP threads share the rows (ignored in a build without OpenMP). Built
 * with -fopenmp, this runs on the OpenMP runtime torch has already loaded (libgomp.so.1), so
 * torch's idle workers do the work instead of spinning against separate threads.
 * Returns 0, or 1 for bad arguments, 2 when memory runs out.
 */
int jebm_knn_candidates(const float *Q, int64_t B, int64_t Z, const float *P, int64_t Rp,
                        const float *scale, const float *shift, int64_t T, int64_t unit, int64_t m,
                        int64_t chunk, int64_t threads, int64_t *out) {
    if (B < 0 || Z < 1 || Rp < BLOCK || Rp % BLOCK || T < 1 || T > MAX_SEARCHES || m < 1 || m > Rp)
        return 1;
    int64_t tiles = (B + TILE - 1) / TILE;
    int64_t parts = threads < tiles ? threads : tiles;
    if (parts <= 1) return search_rows(Q, B, Z, P, Rp, scale, shift, T, unit, m, chunk, out);
    int64_t per = (tiles + parts - 1) / parts * TILE;
    int rc = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(max : rc)
#endif
    for (int64_t p = 0; p < parts; p++) {
        int64_t s = p * per, e = s + per < B ? s + per : B;
        if (s < e) {
            int r = search_rows(Q + s * Z, e - s, Z, P, Rp, scale, shift, T, unit, m, chunk, out + s * T * m);
            rc = r > rc ? r : rc;
        }
    }
    return rc;
}
