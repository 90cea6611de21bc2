// ap_fixed parity harness for hwgen/fixed.py (driven by tests/test_fixed_parity.py).
//
// The conversions are the real C++ ap_fixed headers shipped with hls4ml
// (templates/vivado/ap_types), compiled for C simulation. The test generates
// "cases.inc" (one row of 28 function pointers per source/target format), compiles
// this file once per part of the table and caches the binaries under
// .hwgen-cache/apfixed/ keyed by a hash of everything that goes into them.
//
// Protocol: argv[1] is a binary input file holding, for each group in order, an
// int64 count n followed by n 8-byte inputs (doubles for FROM_DOUBLE groups,
// int64 source codes for FROM_FIXED groups). For each group and each of its 28
// (quantization, overflow) pairs, in QUANT_MODES x OVERFLOW_MODES order, the
// harness writes n int64 stored integers (sign-extended for ap_fixed,
// zero-extended for ap_ufixed) to stdout.
#include <ap_fixed.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

template <int W, int I, bool S, ap_q_mode Q, ap_o_mode O>
struct fx;
template <int W, int I, ap_q_mode Q, ap_o_mode O>
struct fx<W, I, true, Q, O> {
  typedef ap_fixed<W, I, Q, O> type;
  static int64_t bits(const type& v) { return (int64_t)v.V.to_int64(); }
};
template <int W, int I, ap_q_mode Q, ap_o_mode O>
struct fx<W, I, false, Q, O> {
  typedef ap_ufixed<W, I, Q, O> type;
  static int64_t bits(const type& v) { return (int64_t)v.V.to_uint64(); }
};

typedef void (*conv_fn)(const void*, int64_t*, long);

// ap_[u]fixed<W,I,Q,O> v = (double)x;
template <int W, int I, bool S, ap_q_mode Q, ap_o_mode O>
void from_double(const void* in, int64_t* out, long n) {
  const double* x = static_cast<const double*>(in);
  for (long i = 0; i < n; ++i) {
    typename fx<W, I, S, Q, O>::type v = x[i];
    out[i] = fx<W, I, S, Q, O>::bits(v);
  }
}

// ap_[u]fixed<W,I,Q,O> v = ap_[u]fixed<W1,I1>(bits = code);
template <int W1, int I1, bool S1, int W, int I, bool S, ap_q_mode Q, ap_o_mode O>
void from_fixed(const void* in, int64_t* out, long n) {
  const int64_t* c = static_cast<const int64_t*>(in);
  for (long i = 0; i < n; ++i) {
    typename fx<W1, I1, S1, AP_TRN, AP_WRAP>::type src;
    src.V = (ap_slong)c[i];
    typename fx<W, I, S, Q, O>::type v = src;
    out[i] = fx<W, I, S, Q, O>::bits(v);
  }
}

struct Group {
  conv_fn fn[28];
};

// cases.inc (generated) defines: static const Group GROUPS[] = {{{&from_double<...>, ...28}}, ...};
// with the 28 entries of each row in QUANT_MODES x OVERFLOW_MODES order (quantization outermost).
#include "cases.inc"

static const long NGROUPS = sizeof(GROUPS) / sizeof(GROUPS[0]);

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s INPUT.bin > OUTPUT.bin\n", argv[0]);
    return 2;
  }
  FILE* f = fopen(argv[1], "rb");
  if (!f) {
    perror(argv[1]);
    return 2;
  }
  static char obuf[1 << 20];
  setvbuf(stdout, obuf, _IOFBF, sizeof(obuf));
  std::vector<int64_t> in, out;
  for (long g = 0; g < NGROUPS; ++g) {
    int64_t n = 0;
    if (fread(&n, sizeof(n), 1, f) != 1 || n < 0) {
      fprintf(stderr, "input ended before group %ld of %ld\n", g, NGROUPS);
      return 3;
    }
    in.resize(n);
    out.resize(n);
    if (fread(in.data(), sizeof(int64_t), n, f) != (size_t)n) {
      fprintf(stderr, "input truncated in group %ld\n", g);
      return 3;
    }
    for (int m = 0; m < 28; ++m) {
      GROUPS[g].fn[m](in.data(), out.data(), (long)n);
      if (fwrite(out.data(), sizeof(int64_t), n, stdout) != (size_t)n) {
        perror("write");
        return 4;
      }
    }
  }
  char extra;
  if (fread(&extra, 1, 1, f) == 1) {
    fprintf(stderr, "input has data beyond the %ld groups\n", NGROUPS);
    return 3;
  }
  fflush(stdout);
  return 0;
}
