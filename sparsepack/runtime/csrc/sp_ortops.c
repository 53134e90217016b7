/*
 * sp_ortops.c -- onnxruntime custom-op library in plain C, built WITHOUT the
 * onnxruntime headers.
 *
 * Registers, in domain "sparsepack", the op "SparseLowRankDelta":
 *
 *   inputs : x       float32 [..., in]   (any rank >= 1; leading dims = rows)
 *            A       float32 [r, in]     (float16 also accepted; A and B same type)
 *            B       float32 [out, r]    (float16 also accepted)
 *            scale   float32 [] or [1]
 *            values  float32 [nnz]
 *            row_ptr int64   [out + 1]   CSR row pointers of S (out x in) (int32 also accepted;
 *            col_idx int64   [nnz]       CSR column indices of S          row_ptr/col_idx same type)
 *   output : y       float32 [..., out]
 *
 *   y = scale * (x @ A^T) @ B^T + x @ S^T
 *
 * r = 0 and/or nnz = 0 (empty tensors) are accepted.
 *
 * Only the few C API facts we rely on are declared here (see REPORT.md):
 *   - OrtApiBase = { GetApi(uint32_t), GetVersionString(void) }
 *   - OrtApi is a struct of function pointers that onnxruntime only appends to,
 *     so a function is addressed by its ordinal (pointer index) in the struct.
 *   - OrtCustomOp = { uint32_t version; function pointers ... }; onnxruntime reads
 *     the later members only when `version` is high enough.
 *
 * Build: gcc -O3 -march=native -fopenmp-simd -fPIC -shared -o libsp_ortops.so sp_ortops.c
 *   (default kernel: "stream" = A x row by row, prod[k] = val[k] x[ci[k]] in one linear pass,
 *    then B u and the per-row sums of prod 8 output rows at a time)
 *   -DSP_PLAIN      simple reference loops
 *   -DSP_BLOCKED    previous kernel: 8 rows of A at a time, per-row gathers in the sparse part
 *   -DSP_PREFETCH=0 no software prefetch of the adapter at kernel entry
 *   -DSP_OP_VERSION=N  OrtCustomOp.version (default 16; >= 16 needed for error reporting)
 * Needs GCC >= 12 or Clang >= 15 (vector extensions, _Float16).
 * (no -lonnxruntime: every API call goes through the OrtApi table that
 *  onnxruntime hands to RegisterCustomOps / CreateKernel.)
 */
#ifndef SP_TEMPLATE_PASS /* ===== main file; the kernel template is at the end ===== */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------- */
/* Opaque onnxruntime types (pointers only)                                  */
/* ------------------------------------------------------------------------- */
typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;                 /* never dereferenced as a struct */
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

/* enum values (ONNXTensorElementDataType / OrtErrorCode / characteristic / OrtMemType) */
enum { SP_ELEM_UNDEFINED = 0, SP_ELEM_FLOAT = 1, SP_ELEM_INT32 = 6, SP_ELEM_INT64 = 7, SP_ELEM_FLOAT16 = 10 };
enum { SP_ORT_OK = 0, SP_ORT_FAIL = 1, SP_ORT_INVALID_ARGUMENT = 2 };
enum { SP_IO_REQUIRED = 0, SP_IO_OPTIONAL = 1 };
enum { SP_MEMTYPE_DEFAULT = 0 };

/* ------------------------------------------------------------------------- */
/* OrtApi ordinals (index of the function pointer inside struct OrtApi)      */
/* Counted from onnxruntime_c_api.h (ORT_API_VERSION 13 copy, cross-checked  */
/* against an ORT_API_VERSION 30 copy) and validated at run time by          */
/* abi_check.c against libonnxruntime.so 1.32.0.                             */
/* ------------------------------------------------------------------------- */
enum {
  ORD_CreateStatus = 0,
  ORD_GetErrorCode = 1,
  ORD_GetErrorMessage = 2,
  ORD_CreateCustomOpDomain = 26,
  ORD_CustomOpDomain_Add = 27,
  ORD_AddCustomOpDomain = 28,
  ORD_GetTensorMutableData = 51,
  ORD_GetTensorElementType = 60,
  ORD_GetDimensionsCount = 61,
  ORD_GetDimensions = 62,
  ORD_GetTensorShapeElementCount = 64,
  ORD_GetTensorTypeAndShape = 65,
  ORD_KernelContext_GetInputCount = 88,
  ORD_KernelContext_GetOutputCount = 89,
  ORD_KernelContext_GetInput = 90,
  ORD_KernelContext_GetOutput = 91,
  ORD_ReleaseStatus = 93,
  ORD_ReleaseTensorTypeAndShapeInfo = 99,
  ORD_ReleaseCustomOpDomain = 101
};

typedef OrtStatus* (*fn_CreateStatus)(int code, const char* msg);
typedef int (*fn_GetErrorCode)(const OrtStatus*);
typedef const char* (*fn_GetErrorMessage)(const OrtStatus*);
typedef OrtStatus* (*fn_CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);
typedef OrtStatus* (*fn_CustomOpDomain_Add)(OrtCustomOpDomain* d, const void* op);
typedef OrtStatus* (*fn_AddCustomOpDomain)(OrtSessionOptions* o, OrtCustomOpDomain* d);
typedef OrtStatus* (*fn_GetTensorMutableData)(OrtValue* v, void** out);
typedef OrtStatus* (*fn_GetTensorElementType)(const OrtTensorTypeAndShapeInfo*, int* out);
typedef OrtStatus* (*fn_GetDimensionsCount)(const OrtTensorTypeAndShapeInfo*, size_t* out);
typedef OrtStatus* (*fn_GetDimensions)(const OrtTensorTypeAndShapeInfo*, int64_t* dims, size_t n);
typedef OrtStatus* (*fn_GetTensorShapeElementCount)(const OrtTensorTypeAndShapeInfo*, size_t* out);
typedef OrtStatus* (*fn_GetTensorTypeAndShape)(const OrtValue* v, OrtTensorTypeAndShapeInfo** out);
typedef OrtStatus* (*fn_KernelContext_GetInputCount)(const OrtKernelContext*, size_t* out);
typedef OrtStatus* (*fn_KernelContext_GetOutputCount)(const OrtKernelContext*, size_t* out);
typedef OrtStatus* (*fn_KernelContext_GetInput)(const OrtKernelContext*, size_t i, const OrtValue** out);
typedef OrtStatus* (*fn_KernelContext_GetOutput)(OrtKernelContext*, size_t i, const int64_t* dims,
                                                 size_t ndims, OrtValue** out);
typedef void (*fn_ReleaseStatus)(OrtStatus*);
typedef void (*fn_ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo*);
typedef void (*fn_ReleaseCustomOpDomain)(OrtCustomOpDomain*);

/* Fetch ordinal `ord` from the OrtApi table as function type `type`. */
#define API(api, ord, type) ((type)(((void* const*)(const void*)(api))[ORD_##ord]))

/* ------------------------------------------------------------------------- */
/* OrtCustomOp layout (one pointer per member after the uint32 version).     */
/* Members after KernelComputeV2 are only read when version >= 17; we set    */
/* version = SP_OP_VERSION (16 by default) and leave them NULL anyway.       */
/* ------------------------------------------------------------------------- */
#ifndef SP_OP_VERSION
#define SP_OP_VERSION 16
#endif

typedef struct SpCustomOp SpCustomOp;
struct SpCustomOp {
  uint32_t version;                                                      /* v1  */
  void* (*CreateKernel)(const SpCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const SpCustomOp*);
  const char* (*GetExecutionProviderType)(const SpCustomOp*);
  int (*GetInputType)(const SpCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const SpCustomOp*);
  int (*GetOutputType)(const SpCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const SpCustomOp*);
  void (*KernelCompute)(void* kernel, OrtKernelContext*);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const SpCustomOp*, size_t);             /* v8  */
  int (*GetOutputCharacteristic)(const SpCustomOp*, size_t);            /* v8  */
  int (*GetInputMemoryType)(const SpCustomOp*, size_t);                 /* v13 */
  int (*GetVariadicInputMinArity)(const SpCustomOp*);                   /* v14 */
  int (*GetVariadicInputHomogeneity)(const SpCustomOp*);                /* v14 */
  int (*GetVariadicOutputMinArity)(const SpCustomOp*);                  /* v14 */
  int (*GetVariadicOutputHomogeneity)(const SpCustomOp*);               /* v14 */
  OrtStatus* (*CreateKernelV2)(const SpCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel); /* v16 */
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext*);       /* v16 */
  void* InferOutputShapeFn;                                             /* v17 (unused, NULL) */
  void* GetStartVersion;                                                /* v17 (unused, NULL) */
  void* GetEndVersion;                                                  /* v17 (unused, NULL) */
  void* GetMayInplace;                                                  /* v18 (unused, NULL) */
  void* ReleaseMayInplace;                                              /* v18 (unused, NULL) */
  void* GetAliasMap;                                                    /* later (unused, NULL) */
  void* ReleaseAliasMap;                                                /* later (unused, NULL) */
};

/* ------------------------------------------------------------------------- */
/* Kernel                                                                    */
/* ------------------------------------------------------------------------- */
enum { IN_X = 0, IN_A, IN_B, IN_SCALE, IN_VALUES, IN_ROWPTR, IN_COLIDX, N_INPUTS };
#define SP_MAX_RANK 8

typedef struct {
  const OrtApi* api; /* immutable after creation -> Compute is re-entrant */
} SpKernel;

typedef struct {
  void* data;       /* NULL allowed when count == 0 */
  size_t count;
  size_t ndims;
  int64_t dims[SP_MAX_RANK];
  int elem;
} SpTensor;

static OrtStatus* sp_err(const OrtApi* api, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));

static OrtStatus* sp_err(const OrtApi* api, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return API(api, CreateStatus, fn_CreateStatus)(SP_ORT_INVALID_ARGUMENT, buf);
}

#define SP_TRY(expr)                 \
  do {                               \
    OrtStatus* st_ = (expr);         \
    if (st_ != NULL) return st_;     \
  } while (0)

static OrtStatus* sp_get_input(const OrtApi* api, OrtKernelContext* ctx, size_t i, SpTensor* t) {
  const OrtValue* v = NULL;
  OrtTensorTypeAndShapeInfo* info = NULL;
  OrtStatus* st;
  SP_TRY(API(api, KernelContext_GetInput, fn_KernelContext_GetInput)(ctx, i, &v));
  if (v == NULL) return sp_err(api, "SparseLowRankDelta: input %zu is missing", i);
  SP_TRY(API(api, GetTensorTypeAndShape, fn_GetTensorTypeAndShape)(v, &info));
  st = API(api, GetTensorElementType, fn_GetTensorElementType)(info, &t->elem);
  if (!st) st = API(api, GetDimensionsCount, fn_GetDimensionsCount)(info, &t->ndims);
  if (!st && t->ndims > SP_MAX_RANK) st = sp_err(api, "SparseLowRankDelta: input %zu has rank %zu > %d", i, t->ndims, SP_MAX_RANK);
  if (!st) st = API(api, GetDimensions, fn_GetDimensions)(info, t->dims, t->ndims);
  if (!st) st = API(api, GetTensorShapeElementCount, fn_GetTensorShapeElementCount)(info, &t->count);
  API(api, ReleaseTensorTypeAndShapeInfo, fn_ReleaseTensorTypeAndShapeInfo)(info);
  if (st) return st;
  t->data = NULL;
  if (t->count > 0) {
    /* The API takes a non-const OrtValue*; we only read inputs. */
    SP_TRY(API(api, GetTensorMutableData, fn_GetTensorMutableData)((OrtValue*)v, &t->data));
  }
  return NULL;
}

/* ------------------------------------------------------------------------- */
/* Math helpers (type independent)                                           */
/* ------------------------------------------------------------------------- */
/* GCC/Clang generic vectors: 8 floats; unaligned, aliasing-safe load types. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef _Float16 v8hu __attribute__((vector_size(16), aligned(2), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8 ld8(const float* p) { return *(const v8u*)p; }
static inline v8 ld8h(const _Float16* p) { return __builtin_convertvector(*(const v8hu*)p, v8); }
static inline void st8(float* p, v8 v) { *(v8u*)p = v; }

/* float dot product with 4 independent vector accumulators */
static inline float sp_dotf(const float* a, const float* x, int64_t n) {
  v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    s0 += ld8(a + c) * ld8(x + c);
    s1 += ld8(a + c + 8) * ld8(x + c + 8);
    s2 += ld8(a + c + 16) * ld8(x + c + 16);
    s3 += ld8(a + c + 24) * ld8(x + c + 24);
  }
  for (; c + 8 <= n; c += 8) s0 += ld8(a + c) * ld8(x + c);
  v8 s = (s0 + s1) + (s2 + s3);
  float acc = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; c < n; c++) acc += a[c] * x[c];
  return acc;
}

/* acc[0..7] -> one vector whose lane j is the horizontal sum of acc[j]. */
static inline v8 sp_reduce8(const v8 acc[8]) {
  const v8i ev = {0, 8, 2, 10, 4, 12, 6, 14}, od = {1, 9, 3, 11, 5, 13, 7, 15};
  const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  v8 p01 = __builtin_shuffle(acc[0], acc[1], ev) + __builtin_shuffle(acc[0], acc[1], od);
  v8 p23 = __builtin_shuffle(acc[2], acc[3], ev) + __builtin_shuffle(acc[2], acc[3], od);
  v8 p45 = __builtin_shuffle(acc[4], acc[5], ev) + __builtin_shuffle(acc[4], acc[5], od);
  v8 p67 = __builtin_shuffle(acc[6], acc[7], ev) + __builtin_shuffle(acc[6], acc[7], od);
  v8 q03 = __builtin_shuffle(p01, p23, lo2) + __builtin_shuffle(p01, p23, hi2);
  v8 q47 = __builtin_shuffle(p45, p67, lo2) + __builtin_shuffle(p45, p67, hi2);
  return __builtin_shuffle(q03, q47, lo4) + __builtin_shuffle(q03, q47, hi4);
}

static inline void sp_prefetch(const void* p, size_t bytes) {
  const char* c = (const char*)p;
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}
#ifndef SP_PREFETCH
#define SP_PREFETCH 1
#endif

typedef struct {
  int64_t rows, in, out, r, nnz;
  const float *x, *val;
  const void *a, *b, *rp, *ci;
  float scale;
  float* y;
  float* u;    /* scratch, see sp_compute */
  float* bt;
  float* arow;
  float* prod;
} SpArgs;
#define SP_TB 8 /* rows of x processed together when rows > 1 */

/* Instantiate the kernels for A/B in {float, _Float16} x indices in {int64, int32}
 * (this file includes itself with SP_TEMPLATE_PASS defined; see the end). */
#define SP_TEMPLATE_PASS
#define WT float
#define IT int64_t
#define SUF f32_i64
#define LDW8 ld8
#include __FILE__
#define WT float
#define IT int32_t
#define SUF f32_i32
#define LDW8 ld8
#include __FILE__
#define WT _Float16
#define IT int64_t
#define SUF f16_i64
#define LDW8 ld8h
#include __FILE__
#define WT _Float16
#define IT int32_t
#define SUF f16_i32
#define LDW8 ld8h
#include __FILE__
#undef SP_TEMPLATE_PASS

/* short names for the default (float32 / int64) instantiation, used by bench_core.c */
#define sp_delta_fast sp_delta_fast_f32_i64
#define sp_delta_ref sp_delta_ref_f32_i64
#define sp_sparse8 sp_sparse8_f32_i64
#define sp_dot8 sp_dot8_f32_i64
#define sp_prefetch_adapter sp_prefetch_adapter_f32_i64

typedef int (*sp_check_fn)(const void* rp, const void* ci, int64_t out, int64_t nnz, int64_t in, int64_t* where);
typedef void (*sp_run_fn)(const SpArgs*);
typedef void (*sp_prefetch_fn)(const SpArgs*);

static OrtStatus* sp_compute(void* kernel_ptr, OrtKernelContext* ctx) {
  const SpKernel* k = (const SpKernel*)kernel_ptr;
  const OrtApi* api = k->api;
  SpTensor t[N_INPUTS];
  size_t nin = 0;

  SP_TRY(API(api, KernelContext_GetInputCount, fn_KernelContext_GetInputCount)(ctx, &nin));
  if (nin != N_INPUTS) return sp_err(api, "SparseLowRankDelta: expected %d inputs, got %zu", N_INPUTS, nin);
  for (size_t i = 0; i < N_INPUTS; i++) SP_TRY(sp_get_input(api, ctx, i, &t[i]));

  /* ---- types (x, scale, values are declared float32 and checked by onnxruntime) ---- */
  const SpTensor *X = &t[IN_X], *A = &t[IN_A], *B = &t[IN_B], *SC = &t[IN_SCALE];
  const SpTensor *V = &t[IN_VALUES], *RP = &t[IN_ROWPTR], *CI = &t[IN_COLIDX];
  if ((A->elem != SP_ELEM_FLOAT && A->elem != SP_ELEM_FLOAT16) || B->elem != A->elem)
    return sp_err(api, "SparseLowRankDelta: A and B must both be float32 or both float16 (got types %d, %d)",
                  A->elem, B->elem);
  if ((RP->elem != SP_ELEM_INT64 && RP->elem != SP_ELEM_INT32) || CI->elem != RP->elem)
    return sp_err(api, "SparseLowRankDelta: row_ptr and col_idx must both be int64 or both int32 (got types %d, %d)",
                  RP->elem, CI->elem);
  const int half = A->elem == SP_ELEM_FLOAT16, i32 = RP->elem == SP_ELEM_INT32;
  static const sp_check_fn checks[2] = {sp_check_csr_f32_i64, sp_check_csr_f32_i32};
  static const sp_run_fn runs[2][2] = {{sp_delta_f32_i64, sp_delta_f32_i32}, {sp_delta_f16_i64, sp_delta_f16_i32}};
  static const sp_prefetch_fn pfs[2][2] = {{sp_prefetch_adapter_f32_i64, sp_prefetch_adapter_f32_i32},
                                           {sp_prefetch_adapter_f16_i64, sp_prefetch_adapter_f16_i32}};

  /* ---- shapes ---- */
  if (X->ndims < 1) return sp_err(api, "SparseLowRankDelta: x must have rank >= 1");
  const int64_t in = X->dims[X->ndims - 1];
  const int64_t rows = in > 0 ? (int64_t)(X->count / (size_t)in) : 0;
  if (A->ndims != 2) return sp_err(api, "SparseLowRankDelta: A must be 2-D [r, in], got rank %zu", A->ndims);
  if (B->ndims != 2) return sp_err(api, "SparseLowRankDelta: B must be 2-D [out, r], got rank %zu", B->ndims);
  const int64_t r = A->dims[0];
  const int64_t out = B->dims[0];
  if (B->dims[1] != r)
    return sp_err(api, "SparseLowRankDelta: B is [%lld, %lld] but A has r = %lld", (long long)B->dims[0],
                  (long long)B->dims[1], (long long)r);
  if (r > 0 && A->dims[1] != in)
    return sp_err(api, "SparseLowRankDelta: A is [%lld, %lld] but x has in = %lld", (long long)A->dims[0],
                  (long long)A->dims[1], (long long)in);
  if (r > 0 && SC->count != 1)
    return sp_err(api, "SparseLowRankDelta: scale must have exactly one element, got %zu", SC->count);
  if (RP->ndims != 1 || RP->dims[0] != out + 1)
    return sp_err(api, "SparseLowRankDelta: row_ptr must be [out + 1] = [%lld]", (long long)(out + 1));
  if (V->ndims != 1 || CI->ndims != 1 || V->count != CI->count)
    return sp_err(api, "SparseLowRankDelta: values [%zu] and col_idx [%zu] must be 1-D of equal length", V->count,
                  CI->count);
  const int64_t nnz = (int64_t)V->count;

  SpArgs g = {.rows = rows, .in = in, .out = out, .r = r, .nnz = nnz,
              .x = (const float*)X->data, .val = (const float*)V->data,
              .a = A->data, .b = B->data, .rp = RP->data, .ci = CI->data,
              .scale = (r > 0) ? *(const float*)SC->data : 0.0f};
  if (SP_PREFETCH && rows > 0) pfs[half][i32](&g);

  /* ---- CSR validation (O(out + nnz); protects against out-of-bounds reads) ---- */
  int64_t where = 0;
  switch (checks[i32](g.rp, g.ci, out, nnz, in, &where)) {
    case 0: break;
    case 1: return sp_err(api, "SparseLowRankDelta: row_ptr[0] must be 0 and row_ptr[out] must be nnz (%lld)",
                          (long long)nnz);
    case 2: return sp_err(api, "SparseLowRankDelta: row_ptr is not non-decreasing at %lld", (long long)where);
    default: return sp_err(api, "SparseLowRankDelta: col_idx[%lld] out of range [0, %lld)", (long long)where,
                           (long long)in);
  }

  /* ---- output ---- */
  int64_t odims[SP_MAX_RANK];
  for (size_t d = 0; d + 1 < X->ndims; d++) odims[d] = X->dims[d];
  odims[X->ndims - 1] = out;
  OrtValue* yv = NULL;
  SP_TRY(API(api, KernelContext_GetOutput, fn_KernelContext_GetOutput)(ctx, 0, odims, X->ndims, &yv));
  if (rows == 0 || out == 0) return NULL; /* empty output: nothing to write */
  SP_TRY(API(api, GetTensorMutableData, fn_GetTensorMutableData)(yv, (void**)&g.y));
  if (in == 0) { /* x @ anything with an empty inner dim is 0 */
    memset(g.y, 0, sizeof(float) * (size_t)rows * (size_t)out);
    return NULL;
  }

  /* per-call scratch (stack when small): the kernel object holds no mutable state, so
   * concurrent Run() calls on one session are safe */
  /* one workspace (per call: the kernel object holds no mutable state, so concurrent Run()
   * calls on one session are safe):
   *   decode  (rows == 1): u (r) | prod (nnz)
   *   prefill (rows  > 1): U (SP_TB x r) | B^T in 8-row blocks (out x r) | A as float32 (r x in,
   *                        float16 A only) | x^T of a row chunk (in x 8) */
  const size_t work_n = rows == 1 ? (size_t)(r + nnz)
                                  : (size_t)(SP_TB * r + out * r + (half ? r * in : 0) + 8 * in);
  float work_stack[8192];
  float* work = work_n <= 8192 ? work_stack : (float*)malloc(sizeof(float) * work_n);
  if (!work) return API(api, CreateStatus, fn_CreateStatus)(SP_ORT_FAIL, "SparseLowRankDelta: out of memory");
  g.u = work;
  if (rows == 1) {
    g.prod = g.u + r;
  } else {
    g.bt = g.u + SP_TB * r;
    g.arow = g.bt + out * r;
    g.prod = g.arow + (half ? r * in : 0);
  }
  runs[half][i32](&g);
  if (work != work_stack) free(work);
  return NULL;
}

/* ---- OrtCustomOp callbacks ---- */
static OrtStatus* sp_create_kernel_v2(const SpCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                      void** kernel) {
  (void)op;
  (void)info;
  SpKernel* k = (SpKernel*)calloc(1, sizeof(SpKernel));
  if (!k) return API(api, CreateStatus, fn_CreateStatus)(SP_ORT_FAIL, "SparseLowRankDelta: out of memory");
  k->api = api;
  *kernel = k;
  return NULL;
}

static void* sp_create_kernel(const SpCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  void* k = NULL;
  OrtStatus* st = sp_create_kernel_v2(op, api, info, &k);
  if (st) API(api, ReleaseStatus, fn_ReleaseStatus)(st);
  return k;
}

static OrtStatus* sp_compute_v2(void* kernel, OrtKernelContext* ctx) { return sp_compute(kernel, ctx); }

/* Legacy (version < 16) entry point: no way to return an error, so print it and
 * leave the output as allocated (or unallocated). Only used if SP_OP_VERSION < 16. */
static void sp_compute_v1(void* kernel, OrtKernelContext* ctx) {
  const OrtApi* api = ((SpKernel*)kernel)->api;
  OrtStatus* st = sp_compute(kernel, ctx);
  if (st) {
    fprintf(stderr, "[sparsepack] %s\n", API(api, GetErrorMessage, fn_GetErrorMessage)(st));
    API(api, ReleaseStatus, fn_ReleaseStatus)(st);
  }
}

static void sp_destroy(void* kernel) { free(kernel); }
static const char* sp_name(const SpCustomOp* op) { (void)op; return "SparseLowRankDelta"; }
static const char* sp_ep(const SpCustomOp* op) { (void)op; return NULL; /* CPU EP */ }
static int sp_in_type(const SpCustomOp* op, size_t i) {
  (void)op;
  /* A, B (float32|float16) and row_ptr, col_idx (int64|int32) are declared UNDEFINED = "any type"
   * and checked in the kernel; x, scale, values are fixed float32 and checked by onnxruntime. */
  return (i == IN_X || i == IN_SCALE || i == IN_VALUES) ? SP_ELEM_FLOAT : SP_ELEM_UNDEFINED;
}
static size_t sp_in_count(const SpCustomOp* op) { (void)op; return N_INPUTS; }
static int sp_out_type(const SpCustomOp* op, size_t i) { (void)op; (void)i; return SP_ELEM_FLOAT; }
static size_t sp_out_count(const SpCustomOp* op) { (void)op; return 1; }
static int sp_required(const SpCustomOp* op, size_t i) { (void)op; (void)i; return SP_IO_REQUIRED; }
static int sp_memtype(const SpCustomOp* op, size_t i) { (void)op; (void)i; return SP_MEMTYPE_DEFAULT; }
static int sp_one(const SpCustomOp* op) { (void)op; return 1; }

static const SpCustomOp g_op = {
    .version = SP_OP_VERSION,
    .CreateKernel = sp_create_kernel,
    .GetName = sp_name,
    .GetExecutionProviderType = sp_ep,
    .GetInputType = sp_in_type,
    .GetInputTypeCount = sp_in_count,
    .GetOutputType = sp_out_type,
    .GetOutputTypeCount = sp_out_count,
    .KernelCompute = sp_compute_v1,
    .KernelDestroy = sp_destroy,
    .GetInputCharacteristic = sp_required,
    .GetOutputCharacteristic = sp_required,
    .GetInputMemoryType = sp_memtype,
    .GetVariadicInputMinArity = sp_one,
    .GetVariadicInputHomogeneity = sp_one,
    .GetVariadicOutputMinArity = sp_one,
    .GetVariadicOutputHomogeneity = sp_one,
    .CreateKernelV2 = sp_create_kernel_v2,
    .KernelComputeV2 = sp_compute_v2,
};

/* ------------------------------------------------------------------------- */
/* Library entry point                                                       */
/* ------------------------------------------------------------------------- */
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                     const OrtApiBase* base) {
  /* Request the API version the op struct was written for; onnxruntime returns
   * NULL for versions it does not know (e.g. a runtime older than 1.16). */
  const OrtApi* api = base->GetApi(SP_OP_VERSION);
  if (api == NULL) {
    /* Every runtime serves version 1, whose ordinal 0 is CreateStatus. */
    const OrtApi* api1 = base->GetApi(1);
    char msg[200];
    snprintf(msg, sizeof msg, "sparsepack: onnxruntime %s does not provide C API version %d (need >= 1.%d)",
             base->GetVersionString(), SP_OP_VERSION, SP_OP_VERSION);
    if (api1) return API(api1, CreateStatus, fn_CreateStatus)(SP_ORT_FAIL, msg);
    fprintf(stderr, "[sparsepack] %s\n", msg);
    return NULL;
  }
  OrtCustomOpDomain* domain = NULL;
  SP_TRY(API(api, CreateCustomOpDomain, fn_CreateCustomOpDomain)("sparsepack", &domain));
  OrtStatus* st = API(api, CustomOpDomain_Add, fn_CustomOpDomain_Add)(domain, &g_op);
  if (!st) st = API(api, AddCustomOpDomain, fn_AddCustomOpDomain)(options, domain);
  if (st) {
    API(api, ReleaseCustomOpDomain, fn_ReleaseCustomOpDomain)(domain);
    return st;
  }
  /* The domain must outlive every session created from `options`; it is
   * intentionally never released (one small object per registration). */
  return NULL;
}

#else /* ===================== SP_TEMPLATE_PASS: kernels for one (WT, IT) ======================= */
/* Included from above with WT (type of A and B), IT (index type), SUF (name suffix) and
 * LDW8 (load 8 WT as v8) defined.  All inputs are assumed already shape-checked. */
#define SP_CAT2(a, b) a##_##b
#define SP_CAT(a, b) SP_CAT2(a, b)
#define N(name) SP_CAT(name, SUF)

/* sum_i a[i] * b[i]; the simd pragma lets gcc vectorise the reduction without -ffast-math */
static inline float N(sp_dotw)(const WT* restrict a, const float* restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; i++) acc += (float)a[i] * b[i];
  return acc;
}

/* 8 dot products of rows m, m + ld, ..., m + 7 ld (length n) with v. */
static inline v8 N(sp_dot8)(const WT* m, int64_t ld, const float* v, int64_t n) {
  v8 acc[8] = {{0}};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const v8 vv = ld8(v + c);
    for (int j = 0; j < 8; j++) acc[j] += LDW8(m + j * ld + c) * vv;
  }
  v8 res = sp_reduce8(acc);
  for (; c < n; c++)
    for (int j = 0; j < 8; j++) res[j] += (float)m[j * ld + c] * v[c];
  return res;
}

/* Sparse part for 8 consecutive output rows o..o+7: lane j = sum_k val[k] * x[ci[k]] over row o+j.
 * Branch-light on purpose: a per-row variable-length loop mispredicts about once per
 * row (row lengths are random), which at decode shape cost more than the arithmetic.
 * Each row is one masked 8-wide chunk (plus a scalar tail only for rows longer than 8,
 * rare at ~0.6% density).  Lanes past the row end read the next rows' entries, which
 * are valid (validated) indices, and are masked out after the multiply. */
static inline v8 N(sp_sparse8)(const float* xt, const float* val, const IT* rp, const IT* ci, int64_t nnz,
                               int64_t o) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  v8 acc[8];
  v8 extra = {0};
  for (int j = 0; j < 8; j++) {
    const int64_t start = rp[o + j], len = (int64_t)rp[o + j + 1] - start;
    if (__builtin_expect(start + 8 <= nnz, 1)) {
      float g[8];
      for (int l = 0; l < 8; l++) g[l] = xt[ci[start + l]];
      const v8i mask = lane < (v8i){0} + (int32_t)(len < 8 ? len : 8);
      acc[j] = (v8)((v8i)(ld8(val + start) * ld8(g)) & mask);
      for (int64_t k = start + 8; k < start + len; k++) extra[j] += val[k] * xt[ci[k]]; /* rare */
    } else { /* the last rows of the matrix: plain loop */
      acc[j] = (v8){0};
      for (int64_t k = start; k < start + len; k++) extra[j] += val[k] * xt[ci[k]];
    }
  }
  return sp_reduce8(acc) + extra;
}

/* One row of A dotted with x, 4 independent accumulators (A is read as one sequential stream). */
static inline float N(sp_dotv)(const WT* a, const float* x, int64_t n) {
  v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    s0 += LDW8(a + c) * ld8(x + c);
    s1 += LDW8(a + c + 8) * ld8(x + c + 8);
    s2 += LDW8(a + c + 16) * ld8(x + c + 16);
    s3 += LDW8(a + c + 24) * ld8(x + c + 24);
  }
  for (; c + 8 <= n; c += 8) s0 += LDW8(a + c) * ld8(x + c);
  v8 s = (s0 + s1) + (s2 + s3);
  float acc = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; c < n; c++) acc += (float)a[c] * x[c];
  return acc;
}

/* Sparse part, second formulation: prod[k] = val[k] * x[ci[k]] is computed in one
 * linear pass over val/col_idx (streams well from DRAM), then 8 rows at a time are
 * summed from prod (L1-resident) with masked 8-wide loads, no gathers. */
static inline v8 N(sp_segsum8)(const float* prod, const IT* rp, int64_t nnz, int64_t o) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  v8 acc[8];
  v8 extra = {0};
  for (int j = 0; j < 8; j++) {
    const int64_t start = rp[o + j], len = (int64_t)rp[o + j + 1] - start;
    if (__builtin_expect(start + 8 <= nnz, 1)) {
      const v8i mask = lane < (v8i){0} + (int32_t)(len < 8 ? len : 8);
      acc[j] = (v8)((v8i)ld8(prod + start) & mask);
      for (int64_t k = start + 8; k < start + len; k++) extra[j] += prod[k]; /* rare */
    } else {
      acc[j] = (v8){0};
      for (int64_t k = start; k < start + len; k++) extra[j] += prod[k];
    }
  }
  return sp_reduce8(acc) + extra;
}

__attribute__((unused)) static void N(sp_delta_stream)(const SpArgs* g) {
  const WT* a = (const WT*)g->a;
  const WT* b = (const WT*)g->b;
  const IT* rp = (const IT*)g->rp;
  const IT* ci = (const IT*)g->ci;
  const int64_t in = g->in, out = g->out, r = g->r, nnz = g->nnz;
  float* u = g->u;
  float* prod = g->prod;
  for (int64_t t = 0; t < g->rows; t++) {
    const float* xt = g->x + t * in;
    float* yt = g->y + t * out;
    for (int64_t q = 0; q < r; q++) u[q] = g->scale * N(sp_dotv)(a + q * in, xt, in);
    for (int64_t k = 0; k < nnz; k++) prod[k] = g->val[k] * xt[ci[k]];
    int64_t o = 0;
    for (; o + 8 <= out; o += 8) {
      v8 acc = (r > 0) ? N(sp_dot8)(b + o * r, r, u, r) : (v8){0};
      if (nnz > 0) acc += N(sp_segsum8)(prod, rp, nnz, o);
      st8(yt + o, acc);
    }
    for (; o < out; o++) {
      float acc = 0.0f;
      for (int64_t k2 = 0; k2 < r; k2++) acc += (float)b[o * r + k2] * u[k2];
      for (int64_t k = rp[o]; k < (int64_t)rp[o + 1]; k++) acc += prod[k];
      yt[o] = acc;
    }
  }
}

/* 0 = ok, 1 = row_ptr ends wrong, 2 = row_ptr decreasing (at *where), 3 = col_idx out of range (at *where) */
__attribute__((unused)) static int N(sp_check_csr)(const void* rpv, const void* civ, int64_t out, int64_t nnz,
                                                   int64_t in, int64_t* where) {
  const IT* rp = (const IT*)rpv;
  const IT* ci = (const IT*)civ;
  if (rp[0] != 0 || (int64_t)rp[out] != nnz) return 1;
  int bad = 0;
  for (int64_t o = 0; o < out; o++) bad |= rp[o + 1] < rp[o];
  if (bad) {
    for (int64_t o = 0; o < out; o++)
      if (rp[o + 1] < rp[o]) { *where = o; break; }
    return 2;
  }
  uint64_t badc = 0;
  for (int64_t j = 0; j < nnz; j++) badc |= (uint64_t)(int64_t)ci[j] >= (uint64_t)in;
  if (badc) {
    for (int64_t j = 0; j < nnz; j++)
      if ((uint64_t)(int64_t)ci[j] >= (uint64_t)in) { *where = j; break; }
    return 3;
  }
  return 0;
}

/* Software prefetch of the adapter at kernel entry (A, B, CSR arrays). */
__attribute__((unused)) static void N(sp_prefetch_adapter)(const SpArgs* g) {
  if (g->r > 0) {
    sp_prefetch(g->a, sizeof(WT) * (size_t)(g->r * g->in));
    sp_prefetch(g->b, sizeof(WT) * (size_t)(g->out * g->r));
  }
  sp_prefetch(g->rp, sizeof(IT) * (size_t)(g->out + 1));
  if (g->nnz > 0) {
    sp_prefetch(g->ci, sizeof(IT) * (size_t)g->nnz);
    sp_prefetch(g->val, sizeof(float) * (size_t)g->nnz);
  }
}

/* Reference: plain loops.  y[t,:] = B (scale A x[t,:]) + S x[t,:] */
__attribute__((unused)) static void N(sp_delta_ref)(const SpArgs* g) {
  const WT* a = (const WT*)g->a;
  const WT* b = (const WT*)g->b;
  const IT* rp = (const IT*)g->rp;
  const IT* ci = (const IT*)g->ci;
  for (int64_t t = 0; t < g->rows; t++) {
    const float* xt = g->x + t * g->in;
    float* yt = g->y + t * g->out;
    for (int64_t q = 0; q < g->r; q++) g->u[q] = g->scale * N(sp_dotw)(a + q * g->in, xt, g->in);
    for (int64_t o = 0; o < g->out; o++) {
      float acc = 0.0f;
      for (int64_t q = 0; q < g->r; q++) acc += (float)b[o * g->r + q] * g->u[q];
      for (int64_t k = rp[o]; k < (int64_t)rp[o + 1]; k++) acc += g->val[k] * xt[ci[k]];
      yt[o] = acc;
    }
  }
}

/* Blocked: 8 rows of A / 8 output rows at a time. */
__attribute__((unused)) static void N(sp_delta_fast)(const SpArgs* g) {
  const WT* a = (const WT*)g->a;
  const WT* b = (const WT*)g->b;
  const IT* rp = (const IT*)g->rp;
  const IT* ci = (const IT*)g->ci;
  const int64_t in = g->in, out = g->out, r = g->r, nnz = g->nnz;
  float* u = g->u;
  for (int64_t t = 0; t < g->rows; t++) {
    const float* xt = g->x + t * in;
    float* yt = g->y + t * out;
    int64_t q = 0;
    for (; q + 8 <= r; q += 8) st8(u + q, N(sp_dot8)(a + q * in, in, xt, in) * g->scale);
    for (; q < r; q++) u[q] = g->scale * N(sp_dotw)(a + q * in, xt, in);
    int64_t o = 0;
    for (; o + 8 <= out; o += 8) {
      v8 acc = (r > 0) ? N(sp_dot8)(b + o * r, r, u, r) : (v8){0};
      if (nnz > 0) acc += N(sp_sparse8)(xt, g->val, rp, ci, nnz, o);
      st8(yt + o, acc);
    }
    for (; o < out; o++) {
      float acc = 0.0f;
      for (int64_t k2 = 0; k2 < r; k2++) acc += (float)b[o * r + k2] * u[k2];
      for (int64_t k = rp[o]; k < (int64_t)rp[o + 1]; k++) acc += g->val[k] * xt[ci[k]];
      yt[o] = acc;
    }
  }
}

/* rows > 1 (prefill): SP_TB rows of x at a time, so that every row of A and every 8-row
 * block of B is loaded (and for float16 converted) once per chunk instead of once per row. */
__attribute__((unused)) static void N(sp_delta_rows)(const SpArgs* g) {
  const WT* a = (const WT*)g->a;
  const WT* b = (const WT*)g->b;
  const IT* rp = (const IT*)g->rp;
  const IT* ci = (const IT*)g->ci;
  const int64_t in = g->in, out = g->out, r = g->r, nnz = g->nnz;
  float* U = g->u;                       /* [SP_TB][r] */
  float* bt = g->bt;                     /* [out/8][r][8]: B transposed in 8-row blocks */
  const float* af = (const float*)g->a;  /* A as float32 */
  float* xT = g->prod;                   /* [in][8]: x^T of the current row chunk */
  if (sizeof(WT) != sizeof(float)) {     /* float16: convert A once per call */
    for (int64_t i = 0; i < r * in; i++) g->arow[i] = (float)a[i];
    af = g->arow;
  }
  for (int64_t o = 0; o + 8 <= out; o += 8)
    for (int64_t q = 0; q < r; q++)
      for (int j = 0; j < 8; j++) bt[(o * r) + q * 8 + j] = (float)b[(o + j) * r + q];
  for (int64_t t0 = 0; t0 < g->rows; t0 += SP_TB) {
    const int64_t nt = g->rows - t0 < SP_TB ? g->rows - t0 : SP_TB;
    const float* x0 = g->x + t0 * in;
    float* y0 = g->y + t0 * out;
    /* U[t][q] = scale * <A[q,:], x[t,:]> */
    for (int64_t q = 0; q < r; q++)
      for (int64_t t = 0; t < nt; t++) U[t * r + q] = g->scale * sp_dotf(af + q * in, x0 + t * in, in);
    /* y[t, o:o+8] = sum_q U[t][q] * B[o:o+8, q]  (broadcast FMAs on the transposed block) */
    int64_t o = 0;
    for (; o + 8 <= out; o += 8) {
      const float* bo = bt + o * r;
      for (int64_t t = 0; t < nt; t++) {
        v8 acc = {0};
        const float* ut = U + t * r;
        for (int64_t q = 0; q < r; q++) acc += ut[q] * ld8(bo + q * 8);
        st8(y0 + t * out + o, acc);
      }
    }
    for (; o < out; o++)
      for (int64_t t = 0; t < nt; t++) {
        float acc = 0.0f;
        for (int64_t q = 0; q < r; q++) acc += (float)b[o * r + q] * U[t * r + q];
        y0[t * out + o] = acc;
      }
    /* + S x[t,:] for the nt rows at once: with xT[c][t] = x[t][c] (8 lanes = 8 rows),
     * row o of S costs one broadcast-FMA per nonzero for all rows of the chunk. */
    if (nnz > 0) {
      for (int64_t c = 0; c < in; c++)
        for (int t = 0; t < 8; t++) xT[c * 8 + t] = t < nt ? x0[t * in + c] : 0.0f;
      for (o = 0; o < out; o++) {
        v8 acc = {0};
        for (int64_t k = rp[o]; k < (int64_t)rp[o + 1]; k++) acc += g->val[k] * ld8(xT + ci[k] * 8);
        for (int64_t t = 0; t < nt; t++) y0[t * out + o] += acc[t];
      }
    }
  }
}

static void N(sp_delta)(const SpArgs* g) {
#if defined(SP_PLAIN)
  N(sp_delta_ref)(g);
#elif defined(SP_BLOCKED)
  N(sp_delta_fast)(g);
#else
  if (g->rows == 1)
    N(sp_delta_stream)(g); /* decode: one linear pass over the adapter, the fastest at one row (REPORT.md) */
  else
    N(sp_delta_rows)(g); /* prefill: A/B reuse across SP_TB rows */
#endif
}

#undef N
#undef SP_CAT
#undef SP_CAT2
#undef WT
#undef IT
#undef SUF
#undef LDW8
#endif /* SP_TEMPLATE_PASS */
