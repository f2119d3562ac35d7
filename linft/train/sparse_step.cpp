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

static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

static inline float load(const float* p, int64_t i) { return p[i]; }

static inline float load(const uint16_t* p, int64_t i) {  // IEEE half -> float, exact
    uint32_t h = p[i], sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, bits;
    if (e == 0) {
        if (m == 0) { bits = sign; }
        else { float f = std::ldexp((float)m, -24); std::memcpy(&bits, &f, 4); bits |= sign; }
    } else if (e == 31) { bits = sign | 0x7f800000u | (m << 13); }
    else { bits = sign | ((e + 112) << 23) | (m << 13); }
    float f; std::memcpy(&f, &bits, 4);
    return f;
}

struct Args {
    const void* feats; const int64_t* offs; const int64_t* labels; const int64_t* words;
    int64_t G, B, K, D, C, H;
    float *v, *Vt, *b, *bv, *bVt, *bb, *gv, *gVt, *gb;
    const int64_t* thr; const float* scale; const float* lr; const float* wd; float momentum;
    uint8_t* live; float* loss;
};

template <typename T>
static void group_step(const Args& a, int64_t g) {
    const int64_t K = a.K, D = a.D, C = a.C, H = a.H, B = a.B;
    const T* feats = static_cast<const T*>(a.feats);
    std::vector<uint32_t> u(D);
    std::vector<int32_t> base(D), kept(D);
    std::vector<float> phi(K * D), r(D), z(C);
    std::vector<int32_t> pos(D);  // positions in the base list of the units a run keeps
    std::vector<double> lsum(H, 0.0);
    for (int64_t i = 0; i < B; ++i) {
        const int64_t row = g * B + i;
        const uint32_t w = (uint32_t)a.words[row];
        for (int64_t d = 0; d < D; ++d) u[d] = mix((uint32_t)d ^ w) >> 8;
        int64_t nb = 0;
        const uint32_t t0 = (uint32_t)a.thr[0];
        for (int64_t d = 0; d < D; ++d) { base[nb] = (int32_t)d; nb += u[d] >= t0; }
        const int64_t off = a.offs[row];
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < nb; ++j) phi[k * nb + j] = load(feats, off + k * D + base[j]);
        const int64_t y = a.labels[row];
        int64_t n = 0; int64_t last_thr = -1;
        for (int64_t h = 0; h < H; ++h) {
            const int64_t run = g * H + h;
            if (!a.live[run]) continue;
            if (a.thr[h] != last_thr) {
                n = 0;
                for (int64_t j = 0; j < nb; ++j) { pos[n] = (int32_t)j; n += u[base[j]] >= (uint32_t)a.thr[h]; }
                last_thr = a.thr[h];
            }
            const float s = a.scale[h];
            const float* v = a.v + run * K * D; const float* Vt = a.Vt + run * D * C; const float* b = a.b + run * C;
            float* gv = a.gv + run * K * D; float* gVt = a.gVt + run * D * C; float* gb = a.gb + run * C;
            for (int64_t c = 0; c < C; ++c) z[c] = b[c];
            for (int64_t j = 0; j < n; ++j) {
                const int64_t p = pos[j], d = base[p];
                float acc = 0.f;
                for (int64_t k = 0; k < K; ++k) acc += v[k * D + d] * phi[k * nb + p];
                r[j] = s * acc;
                const float* Vd = Vt + d * C;
                for (int64_t c = 0; c < C; ++c) z[c] += r[j] * Vd[c];
            }
            float zmax = z[0];
            for (int64_t c = 1; c < C; ++c) zmax = z[c] > zmax ? z[c] : zmax;
            const float zy = z[y] - zmax;
            double se = 0.0;
            for (int64_t c = 0; c < C; ++c) { z[c] = std::exp(z[c] - zmax); se += z[c]; }
            lsum[h] += std::log(se) - zy;
            const float inv = (float)(1.0 / se) , invB = 1.0f / (float)B;
            for (int64_t c = 0; c < C; ++c) { z[c] = (z[c] * inv - (c == y)) * invB; gb[c] += z[c]; }
            for (int64_t j = 0; j < n; ++j) {
                const int64_t p = pos[j], d = base[p];
                const float* Vd = Vt + d * C; float* gVd = gVt + d * C;
                float back = 0.f;
                for (int64_t c = 0; c < C; ++c) { back += Vd[c] * z[c]; gVd[c] += r[j] * z[c]; }
                back *= s;
                for (int64_t k = 0; k < K; ++k) gv[k * D + d] += back * phi[k * nb + p];
            }
        }
    }
    for (int64_t h = 0; h < H; ++h) {
        const int64_t run = g * H + h;
        if (!a.live[run]) continue;
        const float l = (float)(lsum[h] / (double)B);
        a.loss[run] = l;
        float* ps[3] = {a.v + run * K * D, a.Vt + run * D * C, a.b + run * C};
        float* bs[3] = {a.bv + run * K * D, a.bVt + run * D * C, a.bb + run * C};
        float* gs[3] = {a.gv + run * K * D, a.gVt + run * D * C, a.gb + run * C};
        const int64_t sizes[3] = {K * D, D * C, C};
        const bool ok = std::isfinite(l);
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
}

// Groups [g0, g1): the caller runs disjoint ranges in parallel threads (ctypes releases the GIL).
extern "C" int linft_sparse_step(const Args* a, int half, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
        if (half) group_step<uint16_t>(*a, g); else group_step<float>(*a, g);
    }
    return 0;
}

// Returns the noise of one (word, unit) pair: the test of the kernel's hash against the Python one.
extern "C" uint32_t linft_unit_noise(uint32_t word, uint32_t unit) { return mix(unit ^ word) >> 8; }
