// The sparse fused step of the linear engine (linft/train/sparse_step.py builds and calls it).
//
// For every group g (each group in one thread): draw every batch row's dropout noise (u = lowbias32(unit ^ word)
// >> 8, as linft/train/linear_draws.py), list the units kept at the group's smallest rate and gather their
// features once. The group's runs are SIMD lanes, 8 per chunk (parameters interleaved by run: a unit's v, head
// row and gradients are vectors over the chunk's runs); a lane keeps a unit when u >= its own threshold (masks
// nested across rates). On the kept (row, unit) pairs only, tile by tile over the units:
//   r = s · Σ_k v[d, k] φ[k, d]          (per lane; s = 1/(1-λ) where kept, else 0)
//   z = b + Σ_d r Vt[d, :],  p = softmax(z),  g = (p - onehot(y)) / B
//   dVt[d, :] += r g,  db += g,  dv[d, k] += s (Vt[d, :]·g) φ[k, d]
// then the SGD update of torch.optim.SGD per lane (weight decay added to the gradient, momentum buffer started
// at zero so that its first value is the first gradient), gradients zeroed in the same pass. A lane whose loss
// is not finite is marked dead and not updated; dead lanes (and the padding lanes) are left as they are.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <climits>
#include <vector>
#if defined(__F16C__)
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
    // a group's parameters per chunk q of 8 runs, lane = run: v (D, K, 8), Vt (D, Cp, 8), b (Cp, 8)
    float *v, *Vt, *b, *bv, *bVt, *bb, *gv, *gVt, *gb;
    const int64_t* thr; const float* scale; const float* lr; const float* wd; float momentum;  // per lane (H,)
    uint8_t* live; float* loss;  // (G, H)
};

// The units of one row kept at threshold t (t >= 1), in order; flags: scratch of D rounded up to 8 bytes.
static int64_t kept_units(const uint32_t* u, int64_t D, uint32_t t, uint8_t* flags, int32_t* out) {
    const int64_t D8 = (D + 7) / 8 * 8;
    for (int64_t d = 0; d < D; ++d) flags[d] = u[d] >= t;
    for (int64_t d = D; d < D8; ++d) flags[d] = 0;
    int64_t n = 0;
    for (int64_t d0 = 0; d0 < D8; d0 += 8) {
        uint64_t w;
        std::memcpy(&w, flags + d0, 8);
        while (w) { out[n++] = (int32_t)(d0 + (__builtin_ctzll(w) >> 3)); w &= w - 1; }
    }
    return n;
}

typedef float v8 __attribute__((vector_size(32)));  // GCC/Clang vector extension: 8 lanes, one run each
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8 ld8(const float* p) { v8 x; std::memcpy(&x, p, sizeof x); return x; }
static inline void st8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
static inline v8 bc8(float x) { return v8{x, x, x, x, x, x, x, x}; }

// A chunk's kept (row, unit) pairs: positions into the group's kept lists (row-major, units ascending), and where
// each (row, tile of TILE units) starts, so that the chunk sweeps its parameters tile by tile.
static const int64_t TILE = 128;
struct Pairs { std::vector<int32_t> sel; std::vector<int64_t> ptr; int64_t tiles; };

static void select_pairs(const std::vector<int64_t>& start, const int32_t* base, const uint32_t* ukept, int64_t B,
                         int64_t D, uint32_t t, Pairs& P) {
    P.tiles = (D + TILE - 1) / TILE;
    P.sel.clear(); P.ptr.assign(B * (P.tiles + 1), 0);
    for (int64_t i = 0; i < B; ++i) {
        int64_t tt = 0;
        P.ptr[i * (P.tiles + 1)] = (int64_t)P.sel.size();
        for (int64_t p = start[i]; p < start[i + 1]; ++p) {
            while (base[p] >= (tt + 1) * TILE) P.ptr[i * (P.tiles + 1) + ++tt] = (int64_t)P.sel.size();
            if (ukept[p] >= t) P.sel.push_back((int32_t)p);
        }
        while (tt < P.tiles) P.ptr[i * (P.tiles + 1) + ++tt] = (int64_t)P.sel.size();
    }
}

// The dropped-out representation of one kept (row, unit) pair for the 8 lanes: r = sm · Σ_k v[d, k] φ[k], with
// sm = the lane's scale where the pair is kept at its threshold, else 0.
static inline v8 kept_r(const float* __restrict__ v, const float* __restrict__ phi, int64_t K, int64_t p, int64_t d,
                        uint32_t u, v8i thr, v8 scale, v8& sm) {
    sm = (v8i{} + (int32_t)u) >= thr ? scale : v8{};
    v8 dot = v8{};
    for (int64_t k = 0; k < K; ++k) dot += ld8(v + (d * K + k) * 8) * phi[p * K + k];
    return dot * sm;
}

// Forward and backward of the 8 runs of chunk q of group g on their kept pairs, gradients accumulated; returns
// nothing, writes each lane's summed cross-entropy to lsum. NC > 0: Cp = NC classes held in registers.
template <int NC>
static void chunk_rows(const Args& a, int64_t g, int64_t q, const Pairs& P, const int32_t* __restrict__ base,
                       const uint32_t* __restrict__ ukept, const float* __restrict__ phi, float* __restrict__ zall,
                       double* lsum) {
    const int64_t K = a.K, D = a.D, C = a.C, B = a.B, CP = NC ? NC : a.Cp, NT = P.tiles, Q = a.H / 8;
    const int64_t chunk = g * Q + q;
    const float* __restrict__ v = a.v + chunk * D * K * 8; const float* __restrict__ Vt = a.Vt + chunk * D * CP * 8;
    const float* b = a.b + chunk * CP * 8;
    float* __restrict__ gv = a.gv + chunk * D * K * 8; float* __restrict__ gVt = a.gVt + chunk * D * CP * 8;
    float* gb = a.gb + chunk * CP * 8;
    v8i thr; v8 scale;
    for (int l = 0; l < 8; ++l) { thr[l] = (int32_t)a.thr[q * 8 + l]; scale[l] = a.scale[q * 8 + l]; }
    const int32_t* __restrict__ sel = P.sel.data();
    for (int64_t i = 0; i < B; ++i)
        for (int64_t c = 0; c < CP; ++c) st8(zall + (i * CP + c) * 8, ld8(b + c * 8));
    for (int64_t tt = 0; tt < NT; ++tt)
        for (int64_t i = 0; i < B; ++i) {
            float* __restrict__ zi = zall + i * CP * 8;
            v8 z[NC ? NC : 1];
            for (int c = 0; c < NC; ++c) z[c] = ld8(zi + 8 * c);
            for (int64_t e = P.ptr[i * (NT + 1) + tt]; e < P.ptr[i * (NT + 1) + tt + 1]; ++e) {
                const int64_t p = sel[e], d = base[p];
                v8 sm;
                const v8 r = kept_r(v, phi, K, p, d, ukept[p], thr, scale, sm);
                const float* __restrict__ Vd = Vt + d * CP * 8;
                if (NC) { for (int c = 0; c < NC; ++c) z[c] += r * ld8(Vd + 8 * c); }
                else { for (int64_t c = 0; c < CP; ++c) st8(zi + 8 * c, ld8(zi + 8 * c) + r * ld8(Vd + 8 * c)); }
            }
            for (int c = 0; c < NC; ++c) st8(zi + 8 * c, z[c]);
        }
    const float invB = 1.0f / (float)B;
    for (int64_t i = 0; i < B; ++i) {  // softmax per lane; zall becomes the logits' gradient (p - onehot) / B
        float* zi = zall + i * CP * 8;
        const int64_t y = a.labels[g * B + i];
        for (int l = 0; l < 8; ++l) {
            float zmax = zi[l];
            for (int64_t c = 1; c < C; ++c) zmax = zi[c * 8 + l] > zmax ? zi[c * 8 + l] : zmax;
            const float zy = zi[y * 8 + l] - zmax;
            double se = 0.0;
            for (int64_t c = 0; c < C; ++c) { zi[c * 8 + l] = std::exp(zi[c * 8 + l] - zmax); se += zi[c * 8 + l]; }
            const float inv = (float)(1.0 / se);
            for (int64_t c = 0; c < C; ++c) zi[c * 8 + l] = (zi[c * 8 + l] * inv - (c == y)) * invB;
            lsum[l] += std::log(se) - zy;
        }
        for (int64_t c = C; c < CP; ++c) st8(zi + 8 * c, v8{});
        for (int64_t c = 0; c < CP; ++c) st8(gb + 8 * c, ld8(gb + 8 * c) + ld8(zi + 8 * c));
    }
    for (int64_t tt = 0; tt < NT; ++tt)
        for (int64_t i = 0; i < B; ++i) {
            const float* __restrict__ zi = zall + i * CP * 8;
            v8 gz[NC ? NC : 1];
            for (int c = 0; c < NC; ++c) gz[c] = ld8(zi + 8 * c);
            for (int64_t e = P.ptr[i * (NT + 1) + tt]; e < P.ptr[i * (NT + 1) + tt + 1]; ++e) {
                const int64_t p = sel[e], d = base[p];
                v8 sm;
                const v8 r = kept_r(v, phi, K, p, d, ukept[p], thr, scale, sm);
                const float* __restrict__ Vd = Vt + d * CP * 8; float* __restrict__ gVd = gVt + d * CP * 8;
                v8 back = v8{};
                if (NC) {
                    for (int c = 0; c < NC; ++c) {
                        back += ld8(Vd + 8 * c) * gz[c];
                        st8(gVd + 8 * c, ld8(gVd + 8 * c) + r * gz[c]);
                    }
                } else {
                    for (int64_t c = 0; c < CP; ++c) {
                        const v8 gc = ld8(zi + 8 * c);
                        back += ld8(Vd + 8 * c) * gc;
                        st8(gVd + 8 * c, ld8(gVd + 8 * c) + r * gc);
                    }
                }
                back *= sm;
                for (int64_t k = 0; k < K; ++k) {
                    float* gvk = gv + (d * K + k) * 8;
                    st8(gvk, ld8(gvk) + back * phi[p * K + k]);
                }
            }
        }
}

// torch.optim.SGD on the 8 runs of a chunk (momentum buffer started at zero), gradients zeroed; a lane whose loss
// is not finite is marked dead and not updated; dead lanes keep their parameters and buffers.
static void update_chunk(const Args& a, int64_t g, int64_t q, const double* lsum) {
    const int64_t K = a.K, D = a.D, CP = a.Cp, Q = a.H / 8, chunk = g * Q + q;
    v8i ok; v8 lr, wd;
    for (int l = 0; l < 8; ++l) {
        const int64_t run = g * a.H + q * 8 + l;
        const float loss = (float)(lsum[l] / (double)a.B);
        if (a.live[run]) { a.loss[run] = loss; if (!std::isfinite(loss)) a.live[run] = 0; }
        ok[l] = a.live[run] ? -1 : 0;
        lr[l] = a.lr[q * 8 + l]; wd[l] = a.wd[q * 8 + l];
    }
    const v8 m = bc8(a.momentum);
    float* ps[3] = {a.v + chunk * D * K * 8, a.Vt + chunk * D * CP * 8, a.b + chunk * CP * 8};
    float* bs[3] = {a.bv + chunk * D * K * 8, a.bVt + chunk * D * CP * 8, a.bb + chunk * CP * 8};
    float* gs[3] = {a.gv + chunk * D * K * 8, a.gVt + chunk * D * CP * 8, a.gb + chunk * CP * 8};
    const int64_t sizes[3] = {D * K, D * CP, CP};
    for (int t = 0; t < 3; ++t)
        for (int64_t e = 0; e < sizes[t]; ++e) {
            float* p = ps[t] + 8 * e; float* buf = bs[t] + 8 * e; float* gr = gs[t] + 8 * e;
            const v8 p0 = ld8(p), b0 = ld8(buf);
            const v8 nb = m * b0 + (ld8(gr) + wd * p0);
            st8(buf, ok ? nb : b0);
            st8(p, ok ? p0 - lr * nb : p0);
            st8(gr, v8{});
        }
}

// Scratch of one thread, kept from call to call (no allocation, no page faults in the steady state).
struct Scratch {
    std::vector<uint32_t> u, ukept;
    std::vector<uint8_t> flags;
    std::vector<int64_t> start;
    std::vector<int32_t> base;
    std::vector<float> phi, zall;
    Pairs pairs;
};

// One group: first every row's noise, kept units (at the smallest threshold) and their features; then each chunk
// of 8 runs over all rows (one SIMD lane per run), and its SGD update.
template <typename T, int NC>
static void group_step(const Args& a, int64_t g) {
    const int64_t K = a.K, D = a.D, B = a.B, Q = a.H / 8;
    const T* feats = static_cast<const T*>(a.feats);
    const uint32_t t0 = (uint32_t)a.thr[0];
    thread_local Scratch S;
    S.u.resize(D); S.flags.resize(D + 8); S.start.assign(B + 1, 0);
    S.base.resize(B * D); S.ukept.resize(B * D); S.phi.resize(B * D * K); S.zall.resize(B * a.Cp * 8);
    for (int64_t i = 0; i < B; ++i) {
        const int64_t row = g * B + i;
        const uint32_t w = (uint32_t)a.words[row];
        if (i + 1 < B) {  // the next row from memory while this one is computed
            const char* next = reinterpret_cast<const char*>(feats + a.offs[row + 1]);
            for (int64_t e = 0; e < K * D * (int64_t)sizeof(T); e += 64) __builtin_prefetch(next + e);
        }
        for (int64_t d = 0; d < D; ++d) S.u[d] = mix((uint32_t)d ^ w) >> 8;
        int32_t* base = S.base.data() + S.start[i];
        const int64_t nb = kept_units(S.u.data(), D, t0, S.flags.data(), base);
        S.start[i + 1] = S.start[i] + nb;
        const T* src = feats + a.offs[row];
        uint32_t* uk = S.ukept.data() + S.start[i];
        float* ph = S.phi.data() + K * S.start[i];
        for (int64_t j = 0; j < nb; ++j) {
            uk[j] = S.u[base[j]];
            for (int64_t k = 0; k < K; ++k) ph[j * K + k] = load(src, k * D + base[j]);
        }
    }
    for (int64_t q = 0; q < Q; ++q) {
        bool any = false;
        int64_t tmin = INT64_MAX;
        for (int l = 0; l < 8; ++l)
            if (a.live[g * a.H + q * 8 + l]) { any = true; tmin = a.thr[q * 8 + l] < tmin ? a.thr[q * 8 + l] : tmin; }
        if (!any) continue;
        select_pairs(S.start, S.base.data(), S.ukept.data(), B, D, (uint32_t)tmin, S.pairs);
        double lsum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        chunk_rows<NC>(a, g, q, S.pairs, S.base.data(), S.ukept.data(), S.phi.data(), S.zall.data(), lsum);
        update_chunk(a, g, q, lsum);
    }
}

template <typename T>
static void groups_step(const Args* a, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
        if (a->Cp == 8) group_step<T, 8>(*a, g);
        else if (a->Cp == 16) group_step<T, 16>(*a, g);
        else group_step<T, 0>(*a, g);
    }
}

// Groups [g0, g1): the caller runs disjoint ranges in parallel threads (ctypes releases the GIL).
extern "C" int linft_sparse_step(const Args* a, int half, int64_t g0, int64_t g1) {
    if (half) groups_step<uint16_t>(a, g0, g1); else groups_step<float>(a, g0, g1);
    return 0;
}

// Returns the noise of one (word, unit) pair: the test of the kernel's hash against the Python one.
extern "C" uint32_t linft_unit_noise(uint32_t word, uint32_t unit) { return mix(unit ^ word) >> 8; }
