// The sparse fused step of the linear engine (linft/_kernels/build.py builds it, sparse_step.py calls it).
//
// Everything runs unit by unit. For every group g (each group in one thread) and each chunk of 8 of its runs (SIMD
// lanes: parameters interleaved by run, so a unit's v and head row are vectors over the chunk's runs):
//   forward, unit by unit: the rows that keep unit d (noise u = lowbias32(d ^ row word) >> 8 >= the group's
//     smallest threshold, as linft/train/linear_draws.py; drawn for 16 rows at a time) and their features φ[k, d]
//     are listed once, in the first chunk, and then
//       r = s · Σ_k v[d, k] φ[k, d],  z[row] += r Vt[d, :]      (per lane; s = 1/(1-λ) where kept, else 0)
//     (a lane keeps a pair when u >= its own threshold, so masks are nested across rates);
//   softmax per row, vectorised over the lanes: g = (softmax(z) - onehot(y)) / B, db = Σ_rows g;
//   backward, unit by unit: dVt[d, :] = Σ_rows r g,  dv[d, k] = Σ_rows s (Vt[d, :]·g) φ[k, d], and at once the
//     unit's SGD update (torch.optim.SGD per lane: weight decay added to the gradient, momentum buffer started at
//     zero so that its first value is the first gradient).
// So every parameter is read twice and written once per step, in order; no gradient array exists; the features
// are read once, row segment by row segment, through a small buffer (see Stager). A lane whose loss is not finite
// is marked dead and not updated; dead lanes (and padding lanes) are left as they are. A lane's sums run over its
// kept pairs in an order that does not depend on the other lanes (pairs kept only for another lane add exact
// zeros: chosen, never multiplied by 0, so a non-finite feature stays out of the lanes that drop it), so a run
// computes the same bits in any grid.
//
// The evaluation of a grid (linft_eval, at the end) is here too: the same lanes, the factored form.
//
// Measured alternatives (benchmarks/linear_grid.py, 72 runs at dropout 0.9, one core): row by row with gradient
// arrays and a separate SGD pass, 9.3 ms per step; pairs listed row by row then re-ordered by unit (a counting
// sort), 4.1 ms; listed unit by unit straight from the feature rows, 4.5 ms (a column of 4 KiB-aligned rows falls
// into one cache set); through this buffer, 3.6-4.1 ms. Software prefetching of the rows did not help on that
// machine: the feature reads (about 2 of 10 Mcycles) do not overlap the arithmetic.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <climits>
#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

static inline float load(const float* p, int64_t i) { return p[i]; }

static inline float load(const uint16_t* p, int64_t i) {  // IEEE half -> float, exact
#if defined(__F16C__)
    return _cvtsh_ss(p[i]);
#else
    uint32_t h = p[i], sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, bits;
    if (e == 0) {
        if (m == 0) { bits = sign; }
        else { float f = std::ldexp((float)m, -24); std::memcpy(&bits, &f, 4); bits |= sign; }
    } else if (e == 31) { bits = sign | 0x7f800000u | (m << 13); }
    else { bits = sign | ((e + 112) << 23) | (m << 13); }
    float f; std::memcpy(&f, &bits, 4);
    return f;
#endif
}

struct Args {
    const void* feats; const int64_t* offs; const int64_t* labels; const int64_t* words;
    int64_t G, B, K, D, C, Cp, H;  // H = 8·Q lanes (runs, padded); Cp = C padded to a multiple of 8
    // a group's parameters and momentum buffers per chunk q of 8 runs, lane = run: v (D, K, 8), Vt (D, Cp, 8),
    // b (Cp, 8)
    float *v, *Vt, *b, *bv, *bVt, *bb;
    const int64_t* thr; const float* scale; const float* lr; const float* wd; float momentum;  // per lane (H,)
    uint8_t* live; float* loss;  // (G, H)
};

// The rows (of B) that keep unit d at threshold t, in order, and their noise; out_i and out_u need 16 entries of
// slack. w holds each row's word w' = w ^ (w >> 16): mix's first step, x ^= x >> 16 on x = d ^ w, is d ^ w' for
// every unit d < 2^16 (the caller checks D <= 2^16).
static int64_t kept_rows(uint32_t d, const uint32_t* w, int64_t B, uint32_t t, int32_t* out_i, uint32_t* out_u) {
    int64_t n = 0, i = 0;
#if defined(__AVX512F__)
    const __m512i dv = _mm512_set1_epi32((int)d), tv = _mm512_set1_epi32((int)t);
    const __m512i c1 = _mm512_set1_epi32(0x7feb352d), c2 = _mm512_set1_epi32((int)0x846ca68bU);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (; i + 16 <= B; i += 16) {
        __m512i x = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_loadu_si512(w + i), dv), c1);
        x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15)); x = _mm512_mullo_epi32(x, c2);
        x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
        const __m512i u = _mm512_srli_epi32(x, 8);
        const __mmask16 m = _mm512_cmpge_epu32_mask(u, tv);
        _mm512_storeu_si512(out_i + n, _mm512_maskz_compress_epi32(m, idx));
        _mm512_storeu_si512(out_u + n, _mm512_maskz_compress_epi32(m, u));
        n += __builtin_popcount((unsigned)m);
        idx = _mm512_add_epi32(idx, sixteen);
    }
#elif defined(__AVX2__)
    const __m256i dv = _mm256_set1_epi32((int)d), tv = _mm256_set1_epi32((int)t - 1);  // u >= t: u > t - 1 (t >= 1)
    const __m256i c1 = _mm256_set1_epi32(0x7feb352d), c2 = _mm256_set1_epi32((int)0x846ca68bU);
    for (; i + 8 <= B; i += 8) {
        const __m256i wi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
        __m256i x = _mm256_mullo_epi32(_mm256_xor_si256(wi, dv), c1);
        x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15)); x = _mm256_mullo_epi32(x, c2);
        x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
        const __m256i u = _mm256_srli_epi32(x, 8);  // < 2^24: the signed compare is the unsigned one
        unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(u, tv)));
        uint32_t ub[8];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ub), u);
        for (; bits; bits &= bits - 1) {
            const int j = __builtin_ctz(bits);
            out_i[n] = (int32_t)(i + j); out_u[n] = ub[j]; ++n;
        }
    }
#endif
    for (; i < B; ++i) {  // branch-free compaction
        uint32_t x = (d ^ w[i]) * 0x7feb352dU;
        x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
        const uint32_t u = x >> 8;
        out_i[n] = (int32_t)i; out_u[n] = u;
        n += u >= t;
    }
    return n;
}

typedef float v8 __attribute__((vector_size(32)));  // GCC/Clang vector extension: 8 lanes, one run each
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8 ld8(const float* p) { v8 x; std::memcpy(&x, p, sizeof x); return x; }
static inline void st8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
static inline v8 bc8(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp(x) for x <= 0 on 8 lanes (Cephes' expf: Cody-Waite reduction, degree-6 polynomial, about 1 ulp); values
// below -87.3 give exp(-87.3) (a normal number, below 2^-125), NaN stays NaN.
static inline v8 exp8(v8 x) {
    const v8 lo = bc8(-87.3f), magic = bc8(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
    x = x < lo ? lo : x;
    const v8 n = (x * bc8(1.44269504088896341f) + magic) - magic;
    const v8 r = (x - n * bc8(0.693359375f)) - n * bc8(-2.12194440e-4f);
    v8 y = bc8(1.9875691500e-4f);
    y = y * r + bc8(1.3981999507e-3f); y = y * r + bc8(8.3334519073e-3f); y = y * r + bc8(4.1665795894e-2f);
    y = y * r + bc8(1.6666665459e-1f); y = y * r + bc8(5.0000001201e-1f);
    y = y * (r * r) + r + bc8(1.0f);
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 scale2; std::memcpy(&scale2, &e, sizeof scale2);
    return y * scale2;
}

// Scratch of one thread, kept from call to call (no allocation, no page faults in the steady state).
struct Scratch {
    std::vector<uint32_t> words;
    std::vector<const void*> rows, next_rows;  // the group's feature rows, the next group's
    // the pairs kept at the group's smallest threshold (0) and at a later chunk's threshold (1), unit by unit:
    // where each unit starts, row, noise, features (K per pair)
    std::vector<int64_t> ustart[2]; std::vector<int32_t> prow[2]; std::vector<uint32_t> pu[2];
    std::vector<float> pphi[2];
    std::vector<float> z;
    std::vector<char> stage[2];
    std::vector<v8> acc, gb;  // C++17: allocated at v8's alignment
};

// The features reach the pair lists through a compact buffer: a block of units' columns of every feature row is
// copied there (each row segment read in order, a few segments fetched ahead), so that the column-wise gathers hit
// cache-resident memory (the rows themselves sit 4 KiB multiples apart, and a column of them would fall into one
// cache set). Two buffers: the next block is copied, a slice per unit, while the current one is used (the first
// block of a group while the group before it runs its backward pass). (Measured: the reads cost about the same
// wherever they are placed in the step; the buffer's gain is the cache sets.)
static const int64_t BLOCK_BYTES = 1024;  // of each row segment per block
static const int64_t SEGMENTS_AHEAD = 4;

// Elements of T per row of the buffer: K blocks of BLOCK_BYTES, and 64 bytes more so that its rows fall into
// different cache sets.
template <typename T>
static int64_t stage_pitch(int64_t K) { return (K * BLOCK_BYTES + 64) / (int64_t)sizeof(T); }

// Copies columns [d0, d0 + w) of the K segments of B feature rows into dst (row i, block k at dst[i·pitch + k·W]),
// a slice at a time.
template <typename T>
struct Stager {
    const T* const* rows = nullptr; int64_t B = 0, K = 0, D = 0, d0 = 0, w = 0, W = 0, pitch = 0;
    T* dst = nullptr;
    int64_t done = 0, segs = 0;
    void begin(const T* const* rows_, int64_t B_, int64_t K_, int64_t D_, int64_t d0_, int64_t W_, int64_t pitch_,
               T* dst_) {
        rows = rows_; B = B_; K = K_; D = D_; d0 = d0_; W = W_; w = std::min(W_, D_ - d0_); pitch = pitch_;
        dst = dst_; done = 0; segs = B * K;
    }
    // copy up to part `part + 1` of `parts` of the segments
    void advance(int64_t part, int64_t parts) {
        const int64_t upto = segs * (part + 1) / parts, bytes = w * (int64_t)sizeof(T);
        for (; done < upto; ++done) {
            const int64_t s = done, n = s + SEGMENTS_AHEAD;
            if (n < segs) {
                const char* next = reinterpret_cast<const char*>(rows[n / K] + n % K * D + d0);
                for (int64_t e = 0; e < bytes + 64; e += 64) __builtin_prefetch(next + e);
            }
            std::memcpy(dst + s / K * pitch + s % K * W, rows[s / K] + s % K * D + d0, bytes);
        }
    }
    void finish() { if (done < segs) advance(0, 1); }
};

// The pairs of list 0 with noise >= t, as list 1 (the order within each unit kept).
template <int NK>
static void filter_pairs(Scratch& S, int64_t D, int64_t K_, uint32_t t) {
    const int64_t K = NK ? NK : K_;
    S.ustart[1].resize(D + 1); S.prow[1].resize(S.prow[0].size()); S.pu[1].resize(S.pu[0].size());
    S.pphi[1].resize(S.pphi[0].size());
    int64_t m = 0;
    for (int64_t d = 0; d < D; ++d) {
        S.ustart[1][d] = m;
        for (int64_t e = S.ustart[0][d]; e < S.ustart[0][d + 1]; ++e) {
            if (S.pu[0][e] < t) continue;
            S.prow[1][m] = S.prow[0][e]; S.pu[1][m] = S.pu[0][e];
            for (int64_t k = 0; k < K; ++k) S.pphi[1][m * K + k] = S.pphi[0][e * K + k];
            ++m;
        }
    }
    S.ustart[1][D] = m;
}

// One chunk q of 8 runs of group g over the pairs of list l: forward, softmax, backward and the update. BUILD: list
// 0 is built during the forward pass (the first chunk), from the feature rows at threshold t0. NC > 0: Cp = NC
// classes held in registers; NK > 0: K = NK blocks (a unit's v and its gradient held in registers).
template <typename T, int NC, int NK, bool BUILD>
static void chunk_step(const Args& a, int64_t g, int64_t q, Scratch& S, int l, uint32_t t0, uint32_t tl, bool staged,
                       int64_t next) {
    const int64_t K = NK ? NK : a.K, D = a.D, C = a.C, B = a.B, CP = NC ? NC : a.Cp, Q = a.H / 8;
    const int64_t chunk = g * Q + q;
    float* __restrict__ v = a.v + chunk * D * K * 8; float* __restrict__ Vt = a.Vt + chunk * D * CP * 8;
    float* __restrict__ b = a.b + chunk * CP * 8;
    float* __restrict__ bv = a.bv + chunk * D * K * 8; float* __restrict__ bVt = a.bVt + chunk * D * CP * 8;
    float* __restrict__ bb = a.bb + chunk * CP * 8;
    v8i thr; v8 scale, lr, wd, smc;
    bool uniform = true;  // every live lane keeps every pair of the list (threshold tl): no per-pair test
    for (int j = 0; j < 8; ++j) {
        thr[j] = (int32_t)a.thr[q * 8 + j]; scale[j] = a.scale[q * 8 + j];
        lr[j] = a.lr[q * 8 + j]; wd[j] = a.wd[q * 8 + j];
        smc[j] = a.thr[q * 8 + j] == (int64_t)tl ? scale[j] : 0.0f;
        uniform &= !a.live[g * a.H + q * 8 + j] || a.thr[q * 8 + j] == (int64_t)tl;
    }
    if (BUILD) {
        S.ustart[0].resize(D + 1); S.prow[0].resize(B * D + 16); S.pu[0].resize(B * D + 16);
        S.pphi[0].resize(B * D * K);
    }
    int64_t* __restrict__ us = S.ustart[l].data();
    int32_t* __restrict__ prow = S.prow[l].data();
    uint32_t* __restrict__ pu = S.pu[l].data();
    float* __restrict__ pphi = S.pphi[l].data();
    const T* const* rows = reinterpret_cast<const T* const*>(S.rows.data());
    const int64_t W = BLOCK_BYTES / (int64_t)sizeof(T), pitch = stage_pitch<T>(K);
    T* stage[2] = {reinterpret_cast<T*>(S.stage[0].data()), reinterpret_cast<T*>(S.stage[1].data())};
    Stager<T> stager;
    if (BUILD && !staged) {  // the first block, unless it was copied during the group before
        stager.begin(rows, B, K, D, 0, W, pitch, stage[0]);
        stager.finish();
    }
    float* __restrict__ z = S.z.data();
    for (int64_t i = 0; i < B; ++i)
        for (int64_t c = 0; c < CP; ++c) st8(z + (i * CP + c) * 8, ld8(b + c * 8));
    int64_t m = 0;
    for (int64_t d = 0; d < D; ++d) {  // forward
        if (BUILD) {  // the rows that keep unit d, and their features
            const int64_t d0 = d - d % W, blk = d / W;
            if (d == d0) {  // block blk is complete; start copying the next one
                stager.finish();
                if (d0 + W < D) stager.begin(rows, B, K, D, d0 + W, W, pitch, stage[(blk + 1) % 2]);
            }
            stager.advance(d - d0, std::min(W, D - d0));
            const T* __restrict__ st = stage[blk % 2];
            us[d] = m;
            const int64_t n = kept_rows((uint32_t)d, S.words.data(), B, t0, prow + m, pu + m);
            for (int64_t e = m; e < m + n; ++e)
                for (int64_t k = 0; k < K; ++k) pphi[e * K + k] = load(st, prow[e] * pitch + k * W + d - d0);
            m += n;
            if (d == D - 1) us[D] = m;
        }
        const float* __restrict__ vd = v + d * K * 8; const float* __restrict__ Vd = Vt + d * CP * 8;
        v8 Vr[NC ? NC : 1];
        for (int c = 0; c < NC; ++c) Vr[c] = ld8(Vd + 8 * c);
        const int64_t e1 = BUILD ? m : us[d + 1];
        auto pairs = [&](auto uni) {  // uni: std::true_type when the chunk is uniform (two compiled loops)
            for (int64_t e = us[d]; e < e1; ++e) {
                v8 r = v8{};
                for (int64_t k = 0; k < K; ++k) r += ld8(vd + 8 * k) * pphi[e * K + k];
                if constexpr (decltype(uni)::value) r *= smc;
                else r = (v8i{} + (int32_t)pu[e]) >= thr ? r * scale : v8{};  // chosen: 0·inf would be NaN
                float* __restrict__ zi = z + prow[e] * CP * 8;
                if (NC) { for (int c = 0; c < NC; ++c) st8(zi + 8 * c, ld8(zi + 8 * c) + r * Vr[c]); }
                else { for (int64_t c = 0; c < CP; ++c) st8(zi + 8 * c, ld8(zi + 8 * c) + r * ld8(Vd + 8 * c)); }
            }
        };
        if (uniform) pairs(std::true_type{}); else pairs(std::false_type{});
    }
    // softmax per row, the lanes in parallel; z becomes the logits' gradient (p - onehot) / B
    const v8 invB = bc8(1.0f / (float)B);
    v8* __restrict__ gb = S.gb.data();
    for (int64_t c = 0; c < CP; ++c) gb[c] = v8{};
    double lsum[8] = {0, 0, 0, 0, 0, 0, 0, 0}, prod[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    for (int64_t i = 0; i < B; ++i) {
        float* zi = z + i * CP * 8;
        const int64_t y = a.labels[g * B + i];
        v8 zmax = ld8(zi);
        for (int64_t c = 1; c < C; ++c) { const v8 zc = ld8(zi + 8 * c); zmax = zc > zmax ? zc : zmax; }
        const v8 zy = ld8(zi + 8 * y) - zmax;
        v8 se = v8{};
        for (int64_t c = 0; c < C; ++c) { const v8 p = exp8(ld8(zi + 8 * c) - zmax); st8(zi + 8 * c, p); se += p; }
        const v8 inv = bc8(1.0f) / se;
        for (int64_t c = 0; c < C; ++c) st8(zi + 8 * c, ld8(zi + 8 * c) * inv);
        st8(zi + 8 * y, ld8(zi + 8 * y) - bc8(1.0f));
        for (int64_t c = 0; c < CP; ++c) {
            const v8 gc = c < C ? ld8(zi + 8 * c) * invB : v8{};
            st8(zi + 8 * c, gc);
            gb[c] += gc;
        }
        // the loss -log p_y = log(se) - (z_y - zmax); se is in [1, C] (or not finite), so a product of 16 rows'
        // se stays finite in double and one log serves them
        for (int j = 0; j < 8; ++j) { prod[j] *= (double)se[j]; lsum[j] -= (double)zy[j]; }
        if (i % 16 == 15 || i == B - 1)
            for (int j = 0; j < 8; ++j) { lsum[j] += std::log(prod[j]); prod[j] = 1.0; }
    }
    v8i ok;
    for (int j = 0; j < 8; ++j) {
        const int64_t run = g * a.H + q * 8 + j;
        const float loss = (float)(lsum[j] / (double)B);
        if (a.live[run]) { a.loss[run] = loss; if (!std::isfinite(loss)) a.live[run] = 0; }
        ok[j] = a.live[run] ? -1 : 0;
    }
    const v8 mom = bc8(a.momentum);
    // torch.optim.SGD on n vectors of 8 lanes: buf = m·buf + (grad + wd·p), p -= lr·buf (live lanes only)
    auto update = [&](float* __restrict__ p, float* __restrict__ buf, const v8* grad, int64_t n) {
        for (int64_t j = 0; j < n; ++j) {
            const v8 p0 = ld8(p + 8 * j), b0 = ld8(buf + 8 * j);
            const v8 nb = mom * b0 + (grad[j] + wd * p0);
            st8(buf + 8 * j, ok ? nb : b0);
            st8(p + 8 * j, ok ? p0 - lr * nb : p0);
        }
    };
    v8* __restrict__ acc = S.acc.data();  // dVt[d] (CP vectors), then dv[d] (K vectors)
    if (BUILD && next >= 0)  // the next group's first block, copied during this backward pass
        stager.begin(reinterpret_cast<const T* const*>(S.next_rows.data()), B, K, D, 0, W, pitch, stage[0]);
    for (int64_t d = 0; d < D; ++d) {  // backward and update
        if (BUILD && next >= 0) stager.advance(d, D);
        float* __restrict__ vd = v + d * K * 8; float* __restrict__ Vd = Vt + d * CP * 8;
        v8 Vr[NC ? NC : 1], gV[NC ? NC : 1], gvr[NK ? NK : 1];
        for (int c = 0; c < NC; ++c) { Vr[c] = ld8(Vd + 8 * c); gV[c] = v8{}; }
        if (!NC) for (int64_t c = 0; c < CP; ++c) acc[c] = v8{};
        v8* __restrict__ gv = NK ? gvr : acc + CP;
        for (int64_t k = 0; k < K; ++k) gv[k] = v8{};
        auto pairs = [&](auto uni) {
            for (int64_t e = us[d]; e < us[d + 1]; ++e) {
                const v8i kept = (v8i{} + (int32_t)pu[e]) >= thr;  // (not used by a uniform chunk)
                const float* __restrict__ ph = pphi + e * K;
                v8 r = v8{};
                for (int64_t k = 0; k < K; ++k) r += ld8(vd + 8 * k) * ph[k];
                if constexpr (decltype(uni)::value) r *= smc;
                else r = kept ? r * scale : v8{};
                const float* __restrict__ gz = z + prow[e] * CP * 8;
                v8 back = v8{};
                if (NC) {
                    v8 back2 = v8{};
                    for (int c = 0; c < NC; c += 2) {
                        const v8 g0 = ld8(gz + 8 * c), g1 = ld8(gz + 8 * c + 8);
                        back += Vr[c] * g0; back2 += Vr[c + 1] * g1;
                        gV[c] += r * g0; gV[c + 1] += r * g1;
                    }
                    back += back2;
                } else {
                    for (int64_t c = 0; c < CP; ++c) {
                        const v8 gc = ld8(gz + 8 * c);
                        back += ld8(Vd + 8 * c) * gc;
                        acc[c] += r * gc;
                    }
                }
                if constexpr (decltype(uni)::value) {
                    back *= smc;
                    for (int64_t k = 0; k < K; ++k) gv[k] += back * ph[k];
                } else {  // a lane that drops the pair adds 0·0, whatever its features (a non-finite one
                    // included); a lane that keeps it the same fused multiply-add as above (the same bits in any grid)
                    back = kept ? back * scale : v8{};
                    for (int64_t k = 0; k < K; ++k) gv[k] += back * (kept ? bc8(ph[k]) : v8{});
                }
            }
        };
        if (uniform) pairs(std::true_type{}); else pairs(std::false_type{});
        if (NC) update(Vd, bVt + d * CP * 8, gV, NC);
        else update(Vd, bVt + d * CP * 8, acc, CP);
        update(vd, bv + d * K * 8, gv, K);
    }
    update(b, bb, gb, CP);
}

// One group: its chunks of 8 runs; the first live chunk lists the kept pairs (at the group's smallest threshold)
// with their features, a later chunk with a higher smallest threshold filters them. `next`: the group whose rows
// are fetched during this one (-1: none).
template <typename T, int NC, int NK>
static bool group_step(const Args& a, int64_t g, bool staged, int64_t next) {
    const int64_t K = NK ? NK : a.K, D = a.D, B = a.B, Q = a.H / 8;
    const T* feats = static_cast<const T*>(a.feats);
    const uint32_t t0 = (uint32_t)a.thr[0];
    thread_local Scratch S;
    S.words.resize(B); S.rows.resize(B); S.next_rows.resize(B);
    for (int64_t i = 0; i < B; ++i) {
        S.words[i] = (uint32_t)a.words[g * B + i] ^ ((uint32_t)a.words[g * B + i] >> 16);  // see kept_rows
        S.rows[i] = feats + a.offs[g * B + i];
        if (next >= 0) S.next_rows[i] = feats + a.offs[next * B + i];
    }
    S.z.resize(B * a.Cp * 8); S.acc.resize(a.Cp + K); S.gb.resize(a.Cp);
    for (auto& buf : S.stage) buf.resize(B * stage_pitch<T>(K) * sizeof(T));
    bool built = false;
    int64_t filtered = -1;
    for (int64_t q = 0; q < Q; ++q) {
        int64_t tmin = INT64_MAX;
        for (int j = 0; j < 8; ++j)
            if (a.live[g * a.H + q * 8 + j]) tmin = a.thr[q * 8 + j] < tmin ? a.thr[q * 8 + j] : tmin;
        if (tmin == INT64_MAX) continue;  // no live run in this chunk
        if (!built) {
            chunk_step<T, NC, NK, true>(a, g, q, S, 0, t0, t0, staged, next);
            built = true;
            continue;
        }
        if (tmin != (int64_t)t0 && tmin != filtered) { filter_pairs<NK>(S, D, K, (uint32_t)tmin); filtered = tmin; }
        chunk_step<T, NC, NK, false>(a, g, q, S, tmin == (int64_t)t0 ? 0 : 1, t0, (uint32_t)tmin, false, -1);
    }
    return built && next >= 0;  // the first chunk copied the next group's first block
}

template <typename T, int NC>
static void groups_of(const Args* a, int64_t g0, int64_t g1) {
    bool staged = false;  // whether group g's first block of features was copied during the group before
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t next = g + 1 < g1 ? g + 1 : -1;
        if (a->K == 3) staged = group_step<T, NC, 3>(*a, g, staged, next);  // the paper's K (other K: generic)
        else staged = group_step<T, NC, 0>(*a, g, staged, next);
    }
}

template <typename T>
static void groups_step(const Args* a, int64_t g0, int64_t g1) {
    if (a->Cp == 8) groups_of<T, 8>(a, g0, g1);
    else if (a->Cp == 16) groups_of<T, 16>(a, g0, g1);
    else groups_of<T, 0>(a, g0, g1);
}

// Groups [g0, g1): the caller runs disjoint ranges in parallel threads (ctypes releases the GIL).
extern "C" int linft_sparse_step(const Args* a, int half, int64_t g0, int64_t g1) {
    if (half) groups_step<uint16_t>(a, g0, g1); else groups_step<float>(a, g0, g1);
    return 0;
}

// ---------------------------------------------------------------------------------------------- evaluation
// Predictions of R runs (8 per chunk, lanes = runs, as in the step; any runs: evaluation shares its rows) on n rows:
// logits = b + Σ_d (Σ_k v[d, k] φ[k, d]) Vt[d, :] (the factored form, (K + C)·D multiply-adds per row and run), the
// argmax over the C classes (the first of equal maxima, a NaN taken as the maximum, as torch.argmax). Rows are taken
// a block at a time, units a tile at a time (the tile's features of the block's rows converted once into a compact
// buffer, the chunk's tile of parameters reused by the block's rows), two rows at a time in registers.
struct EvalArgs {
    const void* feats; int64_t n, K, D, C, Cp, R8;  // rows (n, K, D); R8 chunks of 8 runs
    const float *v, *Vt, *b;  // (R8, D, K, 8), (R8, D, Cp, 8), (R8, Cp, 8)
    int32_t* pred;  // (n, 8·R8)
};

static const int64_t EVAL_TILE = 128;  // units per tile

template <typename T, int NC>
static void eval_rows(const EvalArgs& a, int64_t r0, int64_t r1) {
    const int64_t K = a.K, D = a.D, C = a.C, R8 = a.R8;
    const int64_t RB = std::max<int64_t>(2, std::min<int64_t>(64, (256 << 10) / (R8 * NC * 32)) / 2 * 2);
    thread_local std::vector<float> phi, zb;
    phi.resize(RB * K * EVAL_TILE); zb.resize(RB * R8 * NC * 8);
    const T* feats = static_cast<const T*>(a.feats);
    for (int64_t i0 = r0; i0 < r1; i0 += RB) {
        const int64_t nb = std::min(RB, r1 - i0);
        for (int64_t i = 0; i < nb; ++i)
            for (int64_t q = 0; q < R8; ++q)
                for (int c = 0; c < NC; ++c) st8(&zb[((i * R8 + q) * NC + c) * 8], ld8(a.b + (q * NC + c) * 8));
        for (int64_t d0 = 0; d0 < D; d0 += EVAL_TILE) {
            const int64_t w = std::min(EVAL_TILE, D - d0);
            for (int64_t i = 0; i < nb; ++i)  // the tile's features of the block's rows, as float32
                for (int64_t k = 0; k < K; ++k) {
                    const T* src = feats + ((i0 + i) * K + k) * D + d0;
                    float* dst = &phi[(i * K + k) * EVAL_TILE];
                    for (int64_t u = 0; u < w; ++u) dst[u] = load(src, u);
                }
            for (int64_t q = 0; q < R8; ++q) {
                const float* __restrict__ v = a.v + (q * D + d0) * K * 8;
                const float* __restrict__ Vt = a.Vt + (q * D + d0) * NC * 8;
                for (int64_t i = 0; i < nb; i += 2) {
                    const bool two = i + 1 < nb;
                    const float* __restrict__ p0 = &phi[i * K * EVAL_TILE];
                    const float* __restrict__ p1 = two ? p0 + K * EVAL_TILE : p0;
                    float* z0 = &zb[(i * R8 + q) * NC * 8];
                    float* z1 = two ? &zb[((i + 1) * R8 + q) * NC * 8] : z0;
                    v8 za[NC], zc[NC];
                    for (int c = 0; c < NC; ++c) { za[c] = ld8(z0 + 8 * c); zc[c] = two ? ld8(z1 + 8 * c) : v8{}; }
                    for (int64_t u = 0; u < w; ++u) {
                        v8 ra = v8{}, rc = v8{};
                        for (int64_t k = 0; k < K; ++k) {
                            const v8 vk = ld8(v + (u * K + k) * 8);
                            ra += vk * p0[k * EVAL_TILE + u]; rc += vk * p1[k * EVAL_TILE + u];
                        }
                        for (int c = 0; c < NC; ++c) {
                            const v8 Vc = ld8(Vt + (u * NC + c) * 8);
                            za[c] += ra * Vc; zc[c] += rc * Vc;
                        }
                    }
                    for (int c = 0; c < NC; ++c) st8(z0 + 8 * c, za[c]);
                    if (two) for (int c = 0; c < NC; ++c) st8(z1 + 8 * c, zc[c]);
                }
            }
        }
        for (int64_t i = 0; i < nb; ++i)  // argmax per run
            for (int64_t q = 0; q < R8; ++q) {
                const float* z = &zb[(i * R8 + q) * NC * 8];
                for (int l = 0; l < 8; ++l) {
                    int32_t best = 0;
                    float top = z[l];
                    for (int64_t c = 1; c < C; ++c) {
                        const float x = z[c * 8 + l];
                        if (x > top || (std::isnan(x) && !std::isnan(top))) { top = x; best = (int32_t)c; }
                    }
                    a.pred[(i0 + i) * R8 * 8 + q * 8 + l] = best;
                }
            }
    }
}

// Rows [r0, r1): the caller runs disjoint ranges in parallel threads. Returns 1 when the class count is not
// handled here (Cp must be 8 or 16).
extern "C" int linft_eval(const EvalArgs* a, int half, int64_t r0, int64_t r1) {
    if (a->Cp == 8) { if (half) eval_rows<uint16_t, 8>(*a, r0, r1); else eval_rows<float, 8>(*a, r0, r1); }
    else if (a->Cp == 16) { if (half) eval_rows<uint16_t, 16>(*a, r0, r1); else eval_rows<float, 16>(*a, r0, r1); }
    else return 1;
    return 0;
}

// Returns the noise of one (word, unit) pair: the test of the kernel's hash against the Python one.
extern "C" uint32_t linft_unit_noise(uint32_t word, uint32_t unit) { return mix(unit ^ word) >> 8; }

// ---------------------------------------------------------------------------------------------- layout
// The argument structs as the compiler laid them out, field by field, and each struct's size (a row with an empty
// field name): linft/_kernels/abi.py checks its ctypes declarations against this table before any call.
struct Field { const char* type; const char* name; int64_t offset, size; };
#define LINFT_FIELD(T, f) {#T, #f, (int64_t)offsetof(T, f), (int64_t)sizeof(((T*)nullptr)->f)}
#define LINFT_SIZE(T) {#T, "", 0, (int64_t)sizeof(T)}
static const Field LAYOUT[] = {
    LINFT_FIELD(Args, feats), LINFT_FIELD(Args, offs), LINFT_FIELD(Args, labels), LINFT_FIELD(Args, words),
    LINFT_FIELD(Args, G), LINFT_FIELD(Args, B), LINFT_FIELD(Args, K), LINFT_FIELD(Args, D), LINFT_FIELD(Args, C),
    LINFT_FIELD(Args, Cp), LINFT_FIELD(Args, H), LINFT_FIELD(Args, v), LINFT_FIELD(Args, Vt), LINFT_FIELD(Args, b),
    LINFT_FIELD(Args, bv), LINFT_FIELD(Args, bVt), LINFT_FIELD(Args, bb), LINFT_FIELD(Args, thr),
    LINFT_FIELD(Args, scale), LINFT_FIELD(Args, lr), LINFT_FIELD(Args, wd), LINFT_FIELD(Args, momentum),
    LINFT_FIELD(Args, live), LINFT_FIELD(Args, loss), LINFT_SIZE(Args),
    LINFT_FIELD(EvalArgs, feats), LINFT_FIELD(EvalArgs, n), LINFT_FIELD(EvalArgs, K), LINFT_FIELD(EvalArgs, D),
    LINFT_FIELD(EvalArgs, C), LINFT_FIELD(EvalArgs, Cp), LINFT_FIELD(EvalArgs, R8), LINFT_FIELD(EvalArgs, v),
    LINFT_FIELD(EvalArgs, Vt), LINFT_FIELD(EvalArgs, b), LINFT_FIELD(EvalArgs, pred), LINFT_SIZE(EvalArgs),
};

// Row i of the layout table; returns 0 past its end.
extern "C" int linft_layout(int64_t i, const char** type, const char** name, int64_t* offset, int64_t* size) {
    if (i < 0 || i >= (int64_t)(sizeof LAYOUT / sizeof LAYOUT[0])) return 0;
    *type = LAYOUT[i].type; *name = LAYOUT[i].name; *offset = LAYOUT[i].offset; *size = LAYOUT[i].size;
    return 1;
}
