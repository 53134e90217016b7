/*
 * bench_core.c -- time the SparseLowRankDelta math alone (no onnxruntime), to
 * separate compute / memory traffic from per-node runtime overhead.
 *   gcc -O3 -march=native -fopenmp-simd -o bench_core bench_core.c && ./bench_core
 * Decode shape: T=1, in=out=576, r=16, nnz~1991; 210 distinct adapters ("cold",
 * ~21 MB, streamed like in a model) vs one adapter reused 210x ("hot", cache resident).
 */
#include "sp_ortops.c"

#include <time.h>

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static uint64_t rng_state = 12345;
static double urand(void) {
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(rng_state >> 11) / 9007199254740992.0;
}

typedef struct {
  float *a, *b, *val;
  int64_t *rp, *ci;
  int64_t nnz;
} Ad;

#define NODES 210
#define IN 576
#define OUT 576
#define R 16
#define DENS 0.006

static void make_ad(Ad* d) {
  d->a = malloc(sizeof(float) * R * IN);
  d->b = malloc(sizeof(float) * OUT * R);
  for (int i = 0; i < R * IN; i++) d->a[i] = (float)(urand() - 0.5) * 0.08f;
  for (int i = 0; i < OUT * R; i++) d->b[i] = (float)(urand() - 0.5) * 0.2f;
  d->rp = malloc(sizeof(int64_t) * (OUT + 1));
  d->ci = malloc(sizeof(int64_t) * OUT * IN);
  d->val = malloc(sizeof(float) * OUT * IN);
  int64_t k = 0;
  d->rp[0] = 0;
  for (int o = 0; o < OUT; o++) {
    for (int c = 0; c < IN; c++)
      if (urand() < DENS) { d->ci[k] = c; d->val[k] = (float)(urand() - 0.5) * 0.1f; k++; }
    d->rp[o + 1] = k;
  }
  d->nnz = k;
}

static int validate(const Ad* d) { /* same checks as sp_compute */
  if (d->rp[0] != 0 || d->rp[OUT] != d->nnz) return 1;
  for (int64_t o = 0; o < OUT; o++) if (d->rp[o + 1] < d->rp[o]) return 1;
  uint64_t bad = 0;
  for (int64_t j = 0; j < d->nnz; j++) bad |= (uint64_t)d->ci[j] >= (uint64_t)IN;
  return bad != 0;
}

typedef void (*delta_fn)(const SpArgs*);

/* y = W x for a [576 x 576] row-major W (stand-in for the base model's MatMul; streams 1.3 MB) */
static void gemv(const float* W, const float* x, float* y) {
  for (int o = 0; o + 8 <= OUT; o += 8) st8(y + o, sp_dot8(W + (int64_t)o * IN, IN, x, IN));
}

/* mode: 0 = delta only, 1 = gemv only, 2 = gemv + delta.  pf: software prefetch on/off */
static double t_gemv, t_delta; /* accumulated over all reps of the last run() */
static double run(delta_fn f, Ad* ads, float** Ws, int cold, int mode, int pf, float* x, float* y, float* y2) {
  float u[R];
  double best = 1e30;
  t_gemv = t_delta = 0;
  for (int rep = 0; rep < 9; rep++) {
    double t0 = now_ms();
    for (int i = 0; i < NODES; i++) {
      Ad* d = &ads[cold ? i : 0];
      double tg0 = now_ms();
      if (mode >= 1) gemv(Ws[i], x, y2);
      double tg1 = now_ms();
      t_gemv += tg1 - tg0;
      if (mode >= 10) { /* phase split: bit0 validate, bit1 A x, bit2 B u, bit3 sparse */
        int ph = mode - 10;
        if ((ph & 1) && validate(d)) abort();
        if (ph & 16) { float t = 0; for (int64_t k = 0; k < d->nnz; k++) t += d->val[k]; y[1] += t; }
        if (ph & 2) { st8(u, sp_dot8(d->a, IN, x, IN)); st8(u + 8, sp_dot8(d->a + 8 * IN, IN, x, IN)); }
        if (ph & 4) for (int o = 0; o < OUT; o += 8) st8(y + o, sp_dot8(d->b + o * R, R, u, R));
        if (ph & 8) for (int o = 0; o < OUT; o += 8) st8(y + o, sp_sparse8(x, d->val, d->rp, d->ci, d->nnz, o));
      } else if (mode == 3) { /* just read the adapter's bytes sequentially (lower bound for any kernel) */
        v8 acc = {0};
        for (int k = 0; k < R * IN; k += 8) acc += ld8(d->a + k);
        for (int k = 0; k < OUT * R; k += 8) acc += ld8(d->b + k);
        for (int64_t k = 0; k + 8 <= d->nnz; k += 8) acc += ld8(d->val + k);
        for (int64_t k = 0; k + 8 <= d->nnz; k += 8) acc += ld8((const float*)d->ci + 2 * k) + ld8((const float*)d->ci + 2 * k + 8);
        for (int64_t k = 0; k + 8 <= OUT; k += 8) acc += ld8((const float*)d->rp + 2 * k) + ld8((const float*)d->rp + 2 * k + 8);
        y[0] = acc[0] + acc[5];
      } else if (mode != 1) {
        SpArgs g = {.rows = 1, .in = IN, .out = OUT, .r = R, .nnz = d->nnz, .x = x, .val = d->val, .a = d->a,
                    .b = d->b, .rp = d->rp, .ci = d->ci, .scale = 0.5f, .y = y, .u = u};
        if (pf) sp_prefetch_adapter(&g);
        if (validate(d)) abort();
        f(&g);
      }
      t_delta += now_ms() - tg1;
      x[i % IN] += (y[0] + y2[0]) * 1e-9f; /* keep a dependency */
    }
    double dt = now_ms() - t0;
    if (dt < best) best = dt;
  }
  return best;
}

int main(int argc, char** argv) {
  Ad* ads = malloc(sizeof(Ad) * NODES);
  for (int i = 0; i < NODES; i++) make_ad(&ads[i]);
  float* x = malloc(sizeof(float) * IN);
  float* y = malloc(sizeof(float) * OUT);
  for (int i = 0; i < IN; i++) x[i] = (float)(urand() - 0.5);
  /* big buffer to flush caches between cold runs is not needed: 210 adapters ~21 MB > L2 */
  printf("nnz(adapter 0) = %lld; bytes/adapter ~ %lld KB\n", (long long)ads[0].nnz,
         (long long)((R * IN * 4 + OUT * R * 4 + ads[0].nnz * 12 + (OUT + 1) * 8) / 1024));
  float** Ws = malloc(sizeof(float*) * NODES);
  for (int i = 0; i < NODES; i++) {
    Ws[i] = malloc(sizeof(float) * IN * OUT);
    for (int k = 0; k < IN * OUT; k++) Ws[i][k] = (float)(urand() - 0.5) * 0.07f;
  }
  float* y2 = calloc(OUT, sizeof(float));
  if (argc > 1) { /* single configuration, for `perf stat`: ./bench_core MODE [cold] */
    int mode = atoi(argv[1]), cold = argc > 2 ? atoi(argv[2]) : 1;
    double t = run(sp_delta_fast, ads, Ws, cold, mode, 0, x, y, y2);
    printf("mode %d cold %d: %.3f ms   [inside: gemv %.2f us/node, delta %.2f us/node]\n", mode, cold, t,
           t_gemv * 1e3 / (9 * NODES), t_delta * 1e3 / (9 * NODES));
    return 0;
  }
  double g = run(sp_delta_fast, ads, Ws, 1, 1, 0, x, y, y2);
  printf("gemv only (210 distinct 576x576 W, 278 MB)         : %7.3f ms\n", g);
  double rd = run(sp_delta_fast, ads, Ws, 1, 3, 0, x, y, y2);
  printf("gemv + sequential read of adapter bytes               : %7.3f ms (+%6.2f us/node over gemv)\n", rd,
         (rd - g) * 1e3 / NODES);
  const char* phn[] = {"", "validate", "A.x", "", "B.u", "", "", "", "sparse"};
  for (int ph = 1; ph <= 8; ph <<= 1) {
    double t = run(sp_delta_fast, ads, Ws, 1, 10 + ph, 0, x, y, y2);
    printf("gemv + phase %-8s alone                            : %7.3f ms (+%6.2f us/node over gemv)\n", phn[ph], t,
           (t - g) * 1e3 / NODES);
  }
  int combos[] = {9, 25, 15, 31, 6, 14};
  const char* cn[] = {"validate+sparse", "validate+touch val+sparse", "all 4", "all 4 + touch val", "A.x+B.u", "A.x+B.u+sparse"};
  for (int c = 0; c < 6; c++) {
    double t = run(sp_delta_fast, ads, Ws, 1, 10 + combos[c], 0, x, y, y2);
    printf("gemv + %-28s: %7.3f ms (+%6.2f us/node over gemv)\n", cn[c], t, (t - g) * 1e3 / NODES);
  }
  const char* nm[2] = {"plain", "fast"};
  delta_fn fs[2] = {sp_delta_ref, sp_delta_fast};
  for (int v = 0; v < 2; v++)
    for (int pf = 0; pf < 2; pf++) {
      double hot = run(fs[v], ads, Ws, 0, 0, pf, x, y, y2);
      double cold = run(fs[v], ads, Ws, 1, 0, pf, x, y, y2);
      double both = run(fs[v], ads, Ws, 1, 2, pf, x, y, y2);
      printf("%-5s prefetch=%d | delta only: hot %6.2f us/node, cold %6.2f us/node | gemv+delta: %7.3f ms "
             "(+%6.2f us/node over gemv)\n",
             nm[v], pf, hot * 1e3 / NODES, cold * 1e3 / NODES, both, (both - g) * 1e3 / NODES);
    }
  /* raw streaming read bandwidth over the same 21 MB (sum of A and B floats) */
  double best = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 15; rep++) {
    double t0 = now_ms();
    v8 acc = {0};
    for (int i = 0; i < NODES; i++) {
      for (int k = 0; k < R * IN; k += 8) acc += ld8(ads[i].a + k);
      for (int k = 0; k < OUT * R; k += 8) acc += ld8(ads[i].b + k);
    }
    sink += acc[0];
    double dt = now_ms() - t0;
    if (dt < best) best = dt;
  }
  printf("stream-read A+B of 210 adapters (%.1f MB): %.3f ms = %.1f GB/s\n", NODES * 2.0 * R * IN * 4 / 1e6, best,
         NODES * 2.0 * R * IN * 4 / 1e6 / best);
  return 0;
}
