// The sparse fused step of the linear engine (linft/train/sparse_step.py builds and calls it).
//
// For every group g (each group in one thread) and every batch row: draw the row's dropout noise
// (u = lowbias32(unit ^ word) >> 8, as linft/train/linear_draws.py), list the units kept at the smallest
// rate, gather their features once, then for each run of the group (runs sorted by rate, so each one's kept
// units are a sub-list of the previous one's) compute on the kept units only:
//   r_j = s · Σ_k v[k, d_j] φ[k, d_j]          (s = 1/(1-λ), the inverted dropout scale)
//   z   = b + Σ_j r_j Vt[d_j, :],  p = softmax(z),  g = (p - onehot(y)) / B
//   dVt[d_j, :] += r_j g,  db += g,  dv[k, d_j] += s (Vt[d_j, :]·g) φ[k, d_j]
// and after the batch the SGD update of torch.optim.SGD (weight decay added to the gradient, momentum buffer
// started at zero so that its first value is the first gradient), gradients zeroed in the same pass.
// A run whose loss is not finite is marked dead and not updated; dead runs are skipped.
#include <cmath>
#include <cstdint>
#include <cstring>
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
    int64_t G, B, K, Kp, D, C, Cp, H;  // v is (D, Kp), Vt (D, Cp): K and C padded with zeros (Kp to 4, Cp to 8)
    float *v, *Vt, *b, *bv, *bVt, *bb, *gv, *gVt, *gb;
    const int64_t* thr; const float* scale; const float* lr; const float* wd; float momentum;
    uint8_t* live; float* loss;
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

typedef float v8 __attribute__((vector_size(32)));  // GCC/Clang vector extension: 8 floats
static inline v8 ld8(const float* p) { v8 x; std::memcpy(&x, p, sizeof x); return x; }
static inline void st8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }

// A run's kept (row, unit) pairs, for one threshold: positions into the group's kept lists (row-major, units
// ascending), and where each (row, tile of TILE units) starts, so that a run sweeps its parameters tile by tile
// (a tile of v, Vt and their gradients stays in the L1 cache) rather than once per row.
static const int64_t TILE = 256;
struct Pairs { std::vector<int32_t> sel; std::vector<int64_t> ptr; int64_t tiles; };

// The forward and backward of one run on all rows' kept pairs; returns the summed cross-entropy.
// NV > 0: a unit's head row is NV vectors of 8 floats (C <= 8·NV), held in registers; NV = 0: any C (loops).
template <int NV, int KPS>
static double run_rows(const Args& a, int64_t g, int64_t run, int64_t h, const Pairs& P,
                       const int32_t* __restrict__ base, const float* __restrict__ phi,
                       float* __restrict__ r, float* __restrict__ z) {
    const int64_t KP = KPS ? KPS : a.Kp, D = a.D, C = a.C, B = a.B, CP = NV ? 8 * NV : a.Cp, NT = P.tiles;
    const float s = a.scale[h];
    const float* __restrict__ v = a.v + run * D * KP; const float* __restrict__ Vt = a.Vt + run * D * CP;
    const float* b = a.b + run * C;
    float* __restrict__ gv = a.gv + run * D * KP; float* __restrict__ gVt = a.gVt + run * D * CP;
    float* gb = a.gb + run * C;
    const int32_t* __restrict__ sel = P.sel.data();
    for (int64_t i = 0; i < B; ++i)
        for (int64_t c = 0; c < CP; ++c) z[i * CP + c] = c < C ? b[c] : 0.f;
    for (int64_t tt = 0; tt < NT; ++tt)
        for (int64_t i = 0; i < B; ++i) {
            float* __restrict__ zi = z + i * CP;
            v8 acc[2][NV ? NV : 1] = {};  // two partial sums: one chain would wait on the FMA latency
            for (int q = 0; q < NV; ++q) acc[0][q] = ld8(zi + 8 * q);
            for (int64_t e = P.ptr[i * (NT + 1) + tt]; e < P.ptr[i * (NT + 1) + tt + 1]; ++e) {
                const int64_t p = sel[e], d = base[p];
                float dot = 0.f;
                for (int64_t k = 0; k < KP; ++k) dot += v[d * KP + k] * phi[p * KP + k];
                const float re = s * dot;
                r[e] = re;
                const float* __restrict__ Vd = Vt + d * CP;
                if (NV) { for (int q = 0; q < NV; ++q) acc[e & 1][q] += re * ld8(Vd + 8 * q); }
                else { for (int64_t c = 0; c < CP; ++c) zi[c] += re * Vd[c]; }
            }
            for (int q = 0; q < NV; ++q) st8(zi + 8 * q, acc[0][q] + acc[1][q]);
        }
    double lsum = 0.0;
    const float invB = 1.0f / (float)B;
    for (int64_t i = 0; i < B; ++i) {  // softmax; z becomes the logits' gradient (p - onehot) / B
        float* zi = z + i * CP;
        const int64_t y = a.labels[g * B + i];
        float zmax = zi[0];
        for (int64_t c = 1; c < C; ++c) zmax = zi[c] > zmax ? zi[c] : zmax;
        const float zy = zi[y] - zmax;
        double se = 0.0;
        for (int64_t c = 0; c < C; ++c) { zi[c] = std::exp(zi[c] - zmax); se += zi[c]; }
        const float inv = (float)(1.0 / se);
        for (int64_t c = 0; c < C; ++c) { zi[c] = (zi[c] * inv - (c == y)) * invB; gb[c] += zi[c]; }
        for (int64_t c = C; c < CP; ++c) zi[c] = 0.f;
        lsum += std::log(se) - zy;
    }
    for (int64_t tt = 0; tt < NT; ++tt)
        for (int64_t i = 0; i < B; ++i) {
            const float* __restrict__ zi = z + i * CP;
            v8 gz[NV ? NV : 1];
            for (int q = 0; q < NV; ++q) gz[q] = ld8(zi + 8 * q);
            for (int64_t e = P.ptr[i * (NT + 1) + tt]; e < P.ptr[i * (NT + 1) + tt + 1]; ++e) {
                const int64_t p = sel[e], d = base[p];
                const float* __restrict__ Vd = Vt + d * CP; float* __restrict__ gVd = gVt + d * CP;
                const float re = r[e];
                float back = 0.f;
                if (NV) {
                    v8 bk = ld8(Vd) * gz[0];
                    st8(gVd, ld8(gVd) + re * gz[0]);
                    for (int q = 1; q < NV; ++q) { bk += ld8(Vd + 8 * q) * gz[q]; st8(gVd + 8 * q, ld8(gVd + 8 * q) + re * gz[q]); }
                    back = ((bk[0] + bk[1]) + (bk[2] + bk[3])) + ((bk[4] + bk[5]) + (bk[6] + bk[7]));
                } else {
                    for (int64_t c = 0; c < CP; ++c) { back += Vd[c] * zi[c]; gVd[c] += re * zi[c]; }
                }
                back *= s;
                for (int64_t k = 0; k < KP; ++k) gv[d * KP + k] += back * phi[p * KP + k];
            }
        }
    return lsum;
}

// The pairs kept at threshold t (t >= the group's smallest threshold), with their (row, tile) starts.
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

// torch.optim.SGD on one run (momentum buffer started at zero), gradients zeroed; a non-finite loss kills the run.
static void update_run(const Args& a, int64_t run, int64_t h, double loss) {
    const int64_t KP = a.Kp, D = a.D, C = a.C, CP = a.Cp;
    a.loss[run] = (float)loss;
    float* ps[3] = {a.v + run * D * KP, a.Vt + run * D * CP, a.b + run * C};
    float* bs[3] = {a.bv + run * D * KP, a.bVt + run * D * CP, a.bb + run * C};
    float* gs[3] = {a.gv + run * D * KP, a.gVt + run * D * CP, a.gb + run * C};
    const int64_t sizes[3] = {D * KP, D * CP, C};
    const bool ok = std::isfinite((float)loss);
    if (!ok) a.live[run] = 0;
    const float lr = a.lr[h], wd = a.wd[h], m = a.momentum;
    for (int t = 0; t < 3; ++t) {
        float* __restrict__ p = ps[t]; float* __restrict__ buf = bs[t]; float* __restrict__ gr = gs[t];
        if (ok) {
            for (int64_t e = 0; e < sizes[t]; ++e) {
                const float dp = gr[e] + wd * p[e];
                buf[e] = m * buf[e] + dp;
                p[e] -= lr * buf[e];
                gr[e] = 0.f;
            }
        } else {
            std::memset(gr, 0, sizes[t] * sizeof(float));
        }
    }
}

// Scratch of one thread, kept from call to call (no allocation, no page faults in the steady state).
struct Scratch {
    std::vector<uint32_t> u, ukept;
    std::vector<uint8_t> flags;
    std::vector<int64_t> start;
    std::vector<int32_t> base;
    std::vector<float> phi, r, z;
    Pairs pairs;
};

// One group: first every row's noise, kept units (at the smallest rate) and their features; then each run in turn
// over all rows, so that a run's parameters and gradients stay in the core's cache, and its SGD update at once.
template <typename T, int NV, int KPS>
static void group_step(const Args& a, int64_t g) {
    const int64_t K = a.K, KP = KPS ? KPS : a.Kp, D = a.D, H = a.H, B = a.B;
    const T* feats = static_cast<const T*>(a.feats);
    const uint32_t t0 = (uint32_t)a.thr[0];
    thread_local Scratch S;
    S.u.resize(D); S.flags.resize(D + 8); S.start.assign(B + 1, 0);
    S.r.resize(B * D); S.z.resize(B * a.Cp);
    S.base.resize(B * D); S.ukept.resize(B * D); S.phi.resize(B * D * KP);
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
        float* ph = S.phi.data() + KP * S.start[i];
        for (int64_t j = 0; j < nb; ++j) {
            uk[j] = S.u[base[j]];
            for (int64_t k = 0; k < KP; ++k) ph[j * KP + k] = k < K ? load(src, k * D + base[j]) : 0.f;
        }
    }
    int64_t last = -1;
    for (int64_t h = 0; h < H; ++h) {
        const int64_t run = g * H + h;
        if (!a.live[run]) continue;
        if (a.thr[h] != last) {
            select_pairs(S.start, S.base.data(), S.ukept.data(), B, D, (uint32_t)a.thr[h], S.pairs);
            last = a.thr[h];
        }
        const double lsum = run_rows<NV, KPS>(a, g, run, h, S.pairs, S.base.data(), S.phi.data(), S.r.data(),
                                             S.z.data());
        update_run(a, run, h, lsum / (double)B);
    }
}

template <typename T>
static void groups_step(const Args* a, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
        if (a->Cp == 8 && a->Kp == 4) group_step<T, 1, 4>(*a, g);
        else if (a->Cp == 16 && a->Kp == 4) group_step<T, 2, 4>(*a, g);
        else group_step<T, 0, 0>(*a, g);
    }
}

// Groups [g0, g1): the caller runs disjoint ranges in parallel threads (ctypes releases the GIL).
extern "C" int linft_sparse_step(const Args* a, int half, int64_t g0, int64_t g1) {
    if (half) groups_step<uint16_t>(a, g0, g1); else groups_step<float>(a, g0, g1);
    return 0;
}

// Returns the noise of one (word, unit) pair: the test of the kernel's hash against the Python one.
extern "C" uint32_t linft_unit_noise(uint32_t word, uint32_t unit) { return mix(unit ^ word) >> 8; }
