// C++ kernels for the sparse TopK step on XLA:CPU, called through the XLA FFI.
//
// XLA:CPU's own top_k and scatter-add are single-threaded loops; these do the same work
// with SIMD and all cores. Each kernel has a pure-JAX twin in saejax/sae.py that is the
// reference (and the path on GPU/TPU); tests/test_cpu_kernels.py checks they agree.
//
//   SaejaxTopK        x [B, N], bias [N] -> values [B, k], idx [B, k]: each row's k largest
//                     x[b] + bias, in descending order, ties to the lower index (as lax.top_k
//                     of x + bias; the sum is formed here, so x + bias is never stored).
//   SaejaxGatherRows  w [B, k], idx [B, k], table [N, D] -> out [B, D]:
//                     out[b] = sum_i w[b, i] * table[idx[b, i]]
//   SaejaxRowDots     g [B, D], idx [B, k], table [N, D] -> out [B, k]:
//                     out[b, i] = <g[b], table[idx[b, i]]>
//   SaejaxScatterRows w [B, k], idx [B, k], rows [B, D] -> out [N, D] (or [D, N] with
//                     transposed=1), wsum [N]:
//                     out[j] = sum over (b, i) with idx[b, i] = j of w[b, i] * rows[b],
//                     wsum[j] = the same sum of w[b, i]. Entries are bucketed by j first
//                     (a counting sort), so each output row is written by one thread, in a
//                     fixed order: the result does not depend on the thread count.
//   SaejaxTransposeBF16 / SaejaxTransposeF32  x [M, N] -> out [N, M] = xᵀ, in memory. XLA
//                     folds its own transposes into the dot that reads them, and then runs
//                     a bf16 weight gradient (a dot contracting the batch axis of both
//                     operands) with float32 operands; a dot reading this opaque result
//                     keeps its bf16 operands (saejax/core/sae.py, _weight_grad).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(bounds[t], bounds[t + 1]) for every t, one thread each (the first on the caller).
template <typename Body>
void RunRanges(const std::vector<int64_t>& bounds, Body body) {
  std::vector<std::thread> workers;
  for (size_t t = 1; t + 1 < bounds.size(); ++t) {
    if (bounds[t] < bounds[t + 1]) workers.emplace_back(body, bounds[t], bounds[t + 1]);
  }
  if (bounds[0] < bounds[1]) body(bounds[0], bounds[1]);
  for (auto& w : workers) w.join();
}

// Runs body(begin, end) over [0, n) split into `threads` contiguous chunks.
template <typename Body>
void ParallelFor(int64_t n, int64_t threads, Body body) {
  threads = std::max<int64_t>(1, std::min(threads, n));
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<int64_t> bounds(threads + 1);
  for (int64_t t = 0; t <= threads; ++t) bounds[t] = std::min(n, t * chunk);
  RunRanges(bounds, body);
}

struct Item {
  float value;
  int32_t index;
};

// a ranks before b: larger value, or equal value and lower index.
inline bool RanksBefore(const Item& a, const Item& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// The k best of one row. heap holds k items with the worst at heap[0]
// (std heap functions keep the "largest" under the comparator at the front).
void TopKRow(const float* x, const float* bias, int64_t n, int64_t k, std::vector<Item>& heap,
             float* out_values, int32_t* out_index) {
  heap.resize(k);
  for (int64_t j = 0; j < k; ++j) heap[j] = {x[j] + bias[j], static_cast<int32_t>(j)};
  std::make_heap(heap.begin(), heap.end(), RanksBefore);
  float worst = heap.front().value;
  auto offer = [&](int64_t j) {
    // a later index never displaces an equal value: strictly greater only
    const float value = x[j] + bias[j];
    if (value > worst) {
      std::pop_heap(heap.begin(), heap.end(), RanksBefore);
      heap.back() = {value, static_cast<int32_t>(j)};
      std::push_heap(heap.begin(), heap.end(), RanksBefore);
      worst = heap.front().value;
    }
  };
  int64_t j = k;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    const __m512 value = _mm512_add_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(bias + j));
    __mmask16 above = _mm512_cmp_ps_mask(value, _mm512_set1_ps(worst), _CMP_GT_OQ);
    while (above) {
      offer(j + __builtin_ctz(above));
      above &= above - 1;
    }
  }
#elif defined(__AVX2__)
  for (; j + 8 <= n; j += 8) {
    const __m256 value = _mm256_add_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(bias + j));
    int above = _mm256_movemask_ps(_mm256_cmp_ps(value, _mm256_set1_ps(worst), _CMP_GT_OQ));
    while (above) {
      offer(j + __builtin_ctz(above));
      above &= above - 1;
    }
  }
#endif
  for (; j < n; ++j) offer(j);
  std::sort(heap.begin(), heap.end(), RanksBefore);
  for (int64_t i = 0; i < k; ++i) {
    out_values[i] = heap[i].value;
    out_index[i] = heap[i].index;
  }
}

// <a, b> over d floats, in 16 independent lanes so that the compiler vectorises it.
inline float Dot(const float* a, const float* b, int64_t d) {
  float lanes[16] = {0.0f};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] += a[c + l] * b[c + l];
  }
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) total += lanes[l];
  for (; c < d; ++c) total += a[c] * b[c];
  return total;
}

ffi::Error CheckIndices(const int32_t* idx, int64_t count, int64_t n) {
  for (int64_t m = 0; m < count; ++m) {
    if (idx[m] < 0 || idx[m] >= n) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "saejax kernel: latent index " + std::to_string(idx[m]) +
                            " out of range [0, " + std::to_string(n) + ")");
    }
  }
  return ffi::Error::Success();
}

ffi::Error TopKImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> index,
                    int64_t k, int64_t threads) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("SaejaxTopK: x must be [B, N]");
  const int64_t rows = dims[0], n = dims[1];
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("SaejaxTopK: need 1 <= k <= N");
  if (bias.element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument("SaejaxTopK: bias must be [N]");
  const float* data = x.typed_data();
  const float* shift = bias.typed_data();
  float* out_values = values->typed_data();
  int32_t* out_index = index->typed_data();
  ParallelFor(rows, threads, [&](int64_t begin, int64_t end) {
    std::vector<Item> heap;
    for (int64_t b = begin; b < end; ++b)
      TopKRow(data + b * n, shift, n, k, heap, out_values + b * k, out_index + b * k);
  });
  return ffi::Error::Success();
}

ffi::Error GatherRowsImpl(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> idx,
                          ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out,
                          int64_t threads) {
  const int64_t rows = w.dimensions()[0], k = w.dimensions()[1];
  const int64_t n = table.dimensions()[0], d = table.dimensions()[1];
  if (auto err = CheckIndices(idx.typed_data(), rows * k, n); err.failure()) return err;
  const float* weights = w.typed_data();
  const int32_t* index = idx.typed_data();
  const float* tab = table.typed_data();
  float* result = out->typed_data();
  ParallelFor(rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* o = result + b * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t i = 0; i < k; ++i) {
        const float a = weights[b * k + i];
        const float* r = tab + static_cast<int64_t>(index[b * k + i]) * d;
        for (int64_t c = 0; c < d; ++c) o[c] += a * r[c];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error RowDotsImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S32> idx,
                       ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out,
                       int64_t threads) {
  const int64_t rows = idx.dimensions()[0], k = idx.dimensions()[1];
  const int64_t n = table.dimensions()[0], d = table.dimensions()[1];
  if (auto err = CheckIndices(idx.typed_data(), rows * k, n); err.failure()) return err;
  const float* grad = g.typed_data();
  const int32_t* index = idx.typed_data();
  const float* tab = table.typed_data();
  float* result = out->typed_data();
  ParallelFor(rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* gb = grad + b * d;
      for (int64_t i = 0; i < k; ++i) {
        result[b * k + i] = Dot(gb, tab + static_cast<int64_t>(index[b * k + i]) * d, d);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ScatterRowsImpl(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> idx,
                           ffi::Buffer<ffi::F32> rows_in, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> wsum, int64_t threads, int64_t transposed) {
  const int64_t rows = w.dimensions()[0], k = w.dimensions()[1];
  const int64_t d = rows_in.dimensions()[1];
  const int64_t n = wsum->dimensions()[0];
  if (out->element_count() != static_cast<size_t>(n * d))
    return ffi::Error::InvalidArgument("SaejaxScatterRows: out must be [N, D] or [D, N]");
  const int64_t count = rows * k;
  const int32_t* index = idx.typed_data();
  if (auto err = CheckIndices(index, count, n); err.failure()) return err;
  const float* weights = w.typed_data();
  const float* src = rows_in.typed_data();
  float* result = out->typed_data();
  float* sums = wsum->typed_data();

  // bucket the entries by latent, keeping their (b, i) order inside a bucket
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t m = 0; m < count; ++m) ++start[index[m] + 1];
  for (int64_t j = 0; j < n; ++j) start[j + 1] += start[j];
  std::vector<int32_t> order(count);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t m = 0; m < count; ++m) order[fill[index[m]]++] = static_cast<int32_t>(m);
  }
  // split the latents so each thread gets about the same work (its entries + its rows)
  threads = std::max<int64_t>(1, std::min(threads, n));
  std::vector<int64_t> bounds(threads + 1, n);
  bounds[0] = 0;
  {
    const int64_t total = count + n;
    int64_t t = 1;
    for (int64_t j = 0; j < n && t < threads; ++j) {
      if (start[j + 1] + (j + 1) >= total * t / threads) {
        // transposed output: whole blocks of 16 latents per thread (full cache lines)
        const int64_t bound = transposed ? std::min(n, (j + 16) / 16 * 16) : j + 1;
        if (bound > bounds[t - 1]) bounds[t++] = bound;
      }
    }
  }
  // one latent's row, accumulated in `acc` (a row of out, or a buffer when transposed)
  auto accumulate = [&](int64_t j, float* acc) {
    float total = 0.0f;
    if (start[j] == start[j + 1]) {
      std::memset(acc, 0, sizeof(float) * d);
    }
    for (int64_t p = start[j]; p < start[j + 1]; ++p) {
      const int64_t m = order[p];
      const float a = weights[m];
      const float* r = src + (m / k) * d;
      if (p == start[j]) {
        for (int64_t c = 0; c < d; ++c) acc[c] = a * r[c];
      } else {
        for (int64_t c = 0; c < d; ++c) acc[c] += a * r[c];
      }
      total += a;
    }
    sums[j] = total;
  };
  auto work = [&](int64_t begin, int64_t end) {
    if (!transposed) {
      for (int64_t j = begin; j < end; ++j) accumulate(j, result + j * d);
      return;
    }
    // [D, N]: 16 latents at a time into a buffer, then each of out's D rows gets one
    // contiguous run of 16 values (a full cache line when aligned)
    constexpr int64_t kBlock = 16;
    std::vector<float> block(kBlock * d);
    for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
      const int64_t width = std::min(kBlock, end - j0);
      for (int64_t l = 0; l < width; ++l) accumulate(j0 + l, block.data() + l * d);
      for (int64_t c = 0; c < d; ++c) {
        float* row = result + c * n + j0;
        for (int64_t l = 0; l < width; ++l) row[l] = block[l * d + c];
      }
    }
  };
  RunRanges(bounds, work);
  return ffi::Error::Success();
}

// out = xᵀ for x [M, N], in 32 x 32 tiles (both reads and writes stay in cache lines),
// rows of tiles split over the threads.
template <typename T>
void TransposeTiles(const T* x, T* out, int64_t m, int64_t n, int64_t threads) {
  constexpr int64_t kTile = 32;
  const int64_t tiles = (m + kTile - 1) / kTile;
  ParallelFor(tiles, threads, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t i0 = ti * kTile, i1 = std::min(m, i0 + kTile);
      for (int64_t j0 = 0; j0 < n; j0 += kTile) {
        const int64_t j1 = std::min(n, j0 + kTile);
        for (int64_t j = j0; j < j1; ++j) {
          for (int64_t i = i0; i < i1; ++i) out[j * m + i] = x[i * n + j];
        }
      }
    }
  });
}

ffi::Error TransposeBF16Impl(ffi::Buffer<ffi::BF16> x, ffi::ResultBuffer<ffi::BF16> out,
                             int64_t threads) {
  if (x.dimensions().size() != 2) return ffi::Error::InvalidArgument("transpose: x must be 2-d");
  // bf16 values are moved as their 16 bits
  TransposeTiles(reinterpret_cast<const uint16_t*>(x.untyped_data()),
                 reinterpret_cast<uint16_t*>(out->untyped_data()), x.dimensions()[0],
                 x.dimensions()[1], threads);
  return ffi::Error::Success();
}

ffi::Error TransposeF32Impl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out,
                            int64_t threads) {
  if (x.dimensions().size() != 2) return ffi::Error::InvalidArgument("transpose: x must be 2-d");
  TransposeTiles(x.typed_data(), out->typed_data(), x.dimensions()[0], x.dimensions()[1],
                 threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaejaxTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("threads"));

// (per-row data, idx [B, k], table [N, D]) -> one result: the gather and the row dots
static auto TableLookupBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("threads");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaejaxGatherRows, GatherRowsImpl, TableLookupBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaejaxRowDots, RowDotsImpl, TableLookupBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaejaxScatterRows, ScatterRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaejaxTransposeBF16, TransposeBF16Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaejaxTransposeF32, TransposeF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));
