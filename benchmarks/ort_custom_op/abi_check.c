/*
 * abi_check.c -- validate the hand-counted OrtApi ordinals against the real
 * libonnxruntime.so shipped in the PyPI wheel, by calling harmless functions
 * and checking that results are self-consistent.
 *
 *   gcc -O1 -o abi_check abi_check.c -ldl && ./abi_check /path/to/libonnxruntime.so.1.32.0
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct {
  const OrtApi* (*GetApi)(uint32_t);
  const char* (*GetVersionString)(void);
} OrtApiBase;

#define F(api, ord, type) ((type)(((void* const*)(const void*)(api))[ord]))

static int fails = 0;
#define CHECK(cond, ...)                        \
  do {                                          \
    if (cond) {                                 \
      printf("  ok   : " __VA_ARGS__);          \
    } else {                                    \
      printf("  FAIL : " __VA_ARGS__);          \
      fails++;                                  \
    }                                           \
    printf("\n");                               \
  } while (0)

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "libonnxruntime.so";
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) { printf("dlopen failed: %s\n", dlerror()); return 2; }
  const OrtApiBase* (*get_base)(void) = (const OrtApiBase* (*)(void))dlsym(h, "OrtGetApiBase");
  if (!get_base) { printf("no OrtGetApiBase\n"); return 2; }
  const OrtApiBase* base = get_base();
  const char* ver = base->GetVersionString();
  printf("OrtApiBase.GetVersionString() = \"%s\"\n", ver);

  /* highest API version served */
  uint32_t maxv = 0;
  for (uint32_t v = 1; v < 100 && base->GetApi(v); v++) maxv = v; /* stops at the first NULL */
  printf("GetApi(v) non-NULL for max v = %u; GetApi(1) %s, GetApi(13) %s, GetApi(16) %s, GetApi(%u) %s\n", maxv,
         base->GetApi(1) ? "ok" : "NULL", base->GetApi(13) ? "ok" : "NULL", base->GetApi(16) ? "ok" : "NULL",
         maxv + 1, base->GetApi(maxv + 1) ? "ok" : "NULL");
  const OrtApi* api = base->GetApi(16);
  CHECK(base->GetApi(1) == api && base->GetApi(maxv) == api, "GetApi returns the same table for all versions");

  /* 0 CreateStatus, 1 GetErrorCode, 2 GetErrorMessage, 93 ReleaseStatus */
  OrtStatus* st = F(api, 0, OrtStatus* (*)(int, const char*))(2, "hello-ordinal");
  int code = F(api, 1, int (*)(const OrtStatus*))(st);
  const char* msg = F(api, 2, const char* (*)(const OrtStatus*))(st);
  CHECK(code == 2 && strcmp(msg, "hello-ordinal") == 0, "[0] CreateStatus / [1] GetErrorCode=%d / [2] GetErrorMessage=\"%s\"", code, msg);
  F(api, 93, void (*)(OrtStatus*))(st);
  CHECK(1, "[93] ReleaseStatus returned");

  /* 125 GetAvailableProviders, 126 ReleaseAvailableProviders */
  char** provs = NULL;
  int nprov = 0;
  st = F(api, 125, OrtStatus* (*)(char***, int*))(&provs, &nprov);
  CHECK(st == NULL && nprov >= 1 && provs && strstr(provs[nprov - 1], "ExecutionProvider"),
        "[125] GetAvailableProviders -> %d providers, last=\"%s\"", nprov, (st || !provs) ? "?" : provs[nprov - 1]);
  st = F(api, 126, OrtStatus* (*)(char**, int))(provs, nprov);
  CHECK(st == NULL, "[126] ReleaseAvailableProviders");

  /* 69 CreateCpuMemoryInfo, 71 MemoryInfoGetName, 72 MemoryInfoGetId, 94 ReleaseMemoryInfo */
  void* mi = NULL;
  st = F(api, 69, OrtStatus* (*)(int, int, void**))(1 /*OrtArenaAllocator*/, 0 /*OrtMemTypeDefault*/, &mi);
  const char* mname = NULL;
  int mid = -1;
  if (!st) st = F(api, 71, OrtStatus* (*)(const void*, const char**))(mi, &mname);
  if (!st) st = F(api, 72, OrtStatus* (*)(const void*, int*))(mi, &mid);
  CHECK(st == NULL && mname && strcmp(mname, "Cpu") == 0 && mid == 0,
        "[69] CreateCpuMemoryInfo / [71] MemoryInfoGetName=\"%s\" / [72] MemoryInfoGetId=%d", mname ? mname : "?", mid);
  F(api, 94, void (*)(void*))(mi);

  /* 57 CreateTensorTypeAndShapeInfo, 58 SetTensorElementType, 59 SetDimensions, 60 GetTensorElementType,
     61 GetDimensionsCount, 62 GetDimensions, 64 GetTensorShapeElementCount, 99 ReleaseTensorTypeAndShapeInfo */
  void* ti = NULL;
  int64_t dims_in[3] = {2, 3, 5}, dims_out[3] = {0, 0, 0};
  int et = -1;
  size_t nd = 0, cnt = 0;
  st = F(api, 57, OrtStatus* (*)(void**))(&ti);
  if (!st) st = F(api, 58, OrtStatus* (*)(void*, int))(ti, 7);
  if (!st) st = F(api, 59, OrtStatus* (*)(void*, const int64_t*, size_t))(ti, dims_in, 3);
  if (!st) st = F(api, 60, OrtStatus* (*)(const void*, int*))(ti, &et);
  if (!st) st = F(api, 61, OrtStatus* (*)(const void*, size_t*))(ti, &nd);
  if (!st) st = F(api, 62, OrtStatus* (*)(const void*, int64_t*, size_t))(ti, dims_out, 3);
  if (!st) st = F(api, 64, OrtStatus* (*)(const void*, size_t*))(ti, &cnt);
  CHECK(st == NULL && et == 7 && nd == 3 && dims_out[0] == 2 && dims_out[1] == 3 && dims_out[2] == 5 && cnt == 30,
        "[57..64] type/shape info: elem=%d ndims=%zu dims=[%lld,%lld,%lld] count=%zu", et, nd,
        (long long)dims_out[0], (long long)dims_out[1], (long long)dims_out[2], cnt);
  F(api, 99, void (*)(void*))(ti);

  /* 78 GetAllocatorWithDefaultOptions, 48 CreateTensorAsOrtValue, 50 IsTensor, 51 GetTensorMutableData,
     65 GetTensorTypeAndShape, 96 ReleaseValue ; also an EMPTY tensor */
  void* alloc = NULL;
  st = F(api, 78, OrtStatus* (*)(void**))(&alloc);
  for (int empty = 0; empty < 2 && !st; empty++) {
    int64_t shp[2] = {4, empty ? 0 : 6};
    void* val = NULL;
    int is_t = -1;
    void* data = (void*)1;
    st = F(api, 48, OrtStatus* (*)(void*, const int64_t*, size_t, int, void**))(alloc, shp, 2, 1, &val);
    if (!st) st = F(api, 50, OrtStatus* (*)(const void*, int*))(val, &is_t);
    if (!st) st = F(api, 51, OrtStatus* (*)(void*, void**))(val, &data);
    if (!st && !empty) memset(data, 0, 24 * sizeof(float)); /* must be writable */
    void* ti2 = NULL;
    cnt = 99;
    if (!st) st = F(api, 65, OrtStatus* (*)(const void*, void**))(val, &ti2);
    if (!st) st = F(api, 64, OrtStatus* (*)(const void*, size_t*))(ti2, &cnt);
    F(api, 99, void (*)(void*))(ti2);
    CHECK(st == NULL && is_t == 1 && cnt == (size_t)(4 * shp[1]),
          "[78] allocator / [48] CreateTensorAsOrtValue [4,%lld] / [50] IsTensor=%d / [51] data=%p / [65] count=%zu",
          (long long)shp[1], is_t, data, cnt);
    F(api, 96, void (*)(void*))(val);
  }

  /* 10 CreateSessionOptions, 24 SetIntraOpNumThreads, 26 CreateCustomOpDomain, 28 AddCustomOpDomain,
     100 ReleaseSessionOptions, 101 ReleaseCustomOpDomain */
  void *so = NULL, *dom = NULL;
  st = F(api, 10, OrtStatus* (*)(void**))(&so);
  if (!st) st = F(api, 24, OrtStatus* (*)(void*, int))(so, 1);
  if (!st) st = F(api, 26, OrtStatus* (*)(const char*, void**))("abi.check", &dom);
  if (!st) st = F(api, 28, OrtStatus* (*)(void*, void*))(so, dom);
  CHECK(st == NULL && so && dom, "[10] CreateSessionOptions / [24] SetIntraOpNumThreads / [26] CreateCustomOpDomain / [28] AddCustomOpDomain");
  /* negative check: SetSessionExecutionMode with an invalid enum value must return an error status
     (ORT does not validate SetIntraOpNumThreads(-5) at call time, so that one cannot be used) */
  OrtStatus* st2 = F(api, 13, OrtStatus* (*)(void*, int))(so, 7);
  CHECK(st2 != NULL, "[13] SetSessionExecutionMode(7) rejected: \"%s\"",
        st2 ? F(api, 2, const char* (*)(const OrtStatus*))(st2) : "(accepted)");
  if (st2) F(api, 93, void (*)(OrtStatus*))(st2);
  F(api, 100, void (*)(void*))(so);
  F(api, 101, void (*)(void*))(dom);
  CHECK(1, "[100] ReleaseSessionOptions / [101] ReleaseCustomOpDomain returned");
  if (st) printf("status: %s\n", F(api, 2, const char* (*)(const OrtStatus*))(st));

  printf("%s (%d failures)\n", fails ? "ABI CHECK FAILED" : "ABI CHECK PASSED", fails);
  return fails ? 1 : 0;
}
