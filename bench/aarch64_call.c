/* Calls one TVM-compiled PrimFunc of an object file without the TVM runtime, so that aarch64
 * code built here runs under qemu-user (bench/arm_int8.py, tests/test_quantize_arm.py).
 *
 *   aarch64_call SPEC
 *
 * SPEC: one line per argument, "PATH CODE BITS NDIM D0 D1 ..." (DLPack type code: 0 int, 1 uint,
 * 2 float). Each argument's bytes are read from PATH; after the call every buffer is written back
 * to PATH.out. The function is the object's `ef_entry` (TVM names its symbol `__tvm_ffi_ef_entry`).
 * The TVM backend hooks the object reaches through function pointers are provided here: parallel
 * loops run their tasks in turn, workspaces come from malloc. Exit status 0 on success, 1 when the
 * function reports an error (printed), 2 on bad input. */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <dlpack/dlpack.h>
#include <tvm/ffi/c_api.h>

typedef struct { void* sync_handle; int32_t num_task; } ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv* env, void* cdata);

extern int (*__TVMBackendParallelLaunch)(ParallelLambda, void*, int);
extern void* (*__TVMBackendAllocWorkspace)(int, int, uint64_t, int, int);
extern int (*__TVMBackendFreeWorkspace)(int, int, void*);
extern int __tvm_ffi_ef_entry(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

static int parallel_launch(ParallelLambda f, void* cdata, int num_task) {
  ParallelEnv env = {NULL, num_task > 0 ? num_task : 1};
  for (int i = 0; i < env.num_task; ++i) {
    int rc = f(i, &env, cdata);
    if (rc != 0) return rc;
  }
  return 0;
}

static void* alloc_workspace(int dev_type, int dev_id, uint64_t size, int code, int bits) {
  return aligned_alloc(64, (size + 63) / 64 * 64);
}

static int free_workspace(int dev_type, int dev_id, void* ptr) {
  free(ptr);
  return 0;
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "%s:", kind);
  for (int i = 0; i < n; ++i) fprintf(stderr, " %s", parts[i] ? parts[i] : "");
  fprintf(stderr, "\n");
}

enum { MAX_ARGS = 16, MAX_DIMS = 8 };

int main(int argc, char** argv) {
  static DLTensor tensors[MAX_ARGS];
  static int64_t shapes[MAX_ARGS][MAX_DIMS];
  static char paths[MAX_ARGS][4096];
  static size_t sizes[MAX_ARGS];
  TVMFFIAny args[MAX_ARGS];
  FILE* spec = argc == 2 ? fopen(argv[1], "r") : NULL;
  if (!spec) return fprintf(stderr, "usage: aarch64_call SPEC\n"), 2;
  int n = 0, code, bits, ndim;
  while (n < MAX_ARGS && fscanf(spec, "%4095s %d %d %d", paths[n], &code, &bits, &ndim) == 4) {
    if (ndim < 1 || ndim > MAX_DIMS) return fprintf(stderr, "%s: ndim %d\n", argv[1], ndim), 2;
    size_t count = 1;
    for (int d = 0; d < ndim; ++d) {
      if (fscanf(spec, "%ld", &shapes[n][d]) != 1) return fprintf(stderr, "%s: short shape\n", argv[1]), 2;
      count *= (size_t)shapes[n][d];
    }
    sizes[n] = count * (size_t)bits / 8;
    void* data = aligned_alloc(64, (sizes[n] + 63) / 64 * 64);
    FILE* f = fopen(paths[n], "rb");
    if (!f || fread(data, 1, sizes[n], f) != sizes[n]) return fprintf(stderr, "%s: short read\n", paths[n]), 2;
    fclose(f);
    tensors[n] = (DLTensor){data, {kDLCPU, 0}, ndim, {(uint8_t)code, (uint8_t)bits, 1}, shapes[n], NULL, 0};
    memset(&args[n], 0, sizeof(args[n]));
    args[n].type_index = kTVMFFIDLTensorPtr;
    args[n].v_ptr = &tensors[n];
    ++n;
  }
  fclose(spec);
  __TVMBackendParallelLaunch = parallel_launch;
  __TVMBackendAllocWorkspace = alloc_workspace;
  __TVMBackendFreeWorkspace = free_workspace;
  TVMFFIAny result;
  memset(&result, 0, sizeof(result));
  if (__tvm_ffi_ef_entry(NULL, args, n, &result) != 0) return 1;
  for (int i = 0; i < n; ++i) {
    char out[4100];
    snprintf(out, sizeof(out), "%s.out", paths[i]);
    FILE* f = fopen(out, "wb");
    if (!f || fwrite(tensors[i].data, 1, sizes[i], f) != sizes[i]) return fprintf(stderr, "%s: write\n", out), 2;
    fclose(f);
  }
  return 0;
}
