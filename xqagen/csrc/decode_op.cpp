// The CUDA kernel of torch.ops.xqagen.decode: the per-call work of xqagen.api.launch_decode in C++.
//
// A Python kernel costs the dispatcher several microseconds per call to box twenty arguments into
// Python objects; this one reads them unboxed.  Per call it builds the geometry key (every
// tensor's shape, strides, dtype and device; every option), and for a geometry seen before it
// rewrites the bound launch's pointer fields, retargets a Hopper launch's tensor maps and calls
// cuLaunchKernelEx on torch's current stream.  A new geometry (or a view that is not 16-byte
// aligned) goes to the Python op xqagen::decode_bind (xqagen.api.bind_for_native), which checks the
// arguments, plans, binds, launches and describes the bound launch.  Each entry points into a Python
// object that decode_bind keeps until a later bind is told (`release`) that this file dropped it.
// No CUDA header is needed: the two driver entry points are looked up in libcuda, and the stream
// comes from c10's device-generic guard.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using LaunchKernelEx = int (*)(void const* config, void* function, void** params, void** extra);
using ReplaceAddress = int (*)(void* tensor_map, void* address);

struct Driver {
  LaunchKernelEx launch_kernel_ex = nullptr;
  ReplaceAddress replace_address = nullptr;

  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(lib != nullptr, "xqagen: cannot open libcuda.so.1: ", dlerror());
    launch_kernel_ex = reinterpret_cast<LaunchKernelEx>(dlsym(lib, "cuLaunchKernelEx"));
    replace_address = reinterpret_cast<ReplaceAddress>(dlsym(lib, "cuTensorMapReplaceAddress"));
    TORCH_CHECK(launch_kernel_ex && replace_address, "xqagen: libcuda lacks cuLaunchKernelEx or cuTensorMapReplaceAddress");
  }
};

Driver const& driver() {
  static Driver const instance;
  return instance;
}

// The pointer fields a call rewrites, in the order of xqagen.api.REWRITTEN_POINTERS; decode_bind
// gives each one's index in the parameter struct read as 64-bit words.
enum Pointer { kQ, kK, kV, kPageTable, kSeqLens, kOut, kSinks, kMask, kQCuSeqLens, kQScalePtr, kKvScalePtr,
               kWorkspace, kSemaphores, kFaults, kNumPointers };

// One bound launch, as decode_bind describes it: addresses inside objects the Python side keeps alive.
struct Entry {
  uint64_t* words;         // the parameter struct as 64-bit words
  char* config;            // the CUlaunchConfig
  int64_t stream_offset;   // of its hStream field
  void* function;          // CUfunction
  void** params;           // the kernel's parameter pointer array
  std::array<int64_t, kNumPointers> word;
  void* k_map;             // a Hopper launch's K and V tensor maps (CUtensorMap), or null
  void* v_map;
  uint64_t k_map_address;  // the addresses they point at now
  uint64_t v_map_address;
  int64_t faults_offset;   // the fault word's byte offset in `semaphores`, or -1
};

// Fields of the description decode_bind returns, in order.
enum Description { kWords, kConfig, kStreamOffset, kFunction, kParams, kKMap, kVMap, kKMapAddress, kVMapAddress,
                   kFaultsOffset, kFirstWord, kDescriptionSize = kFirstWord + kNumPointers };

struct KeyHash {
  size_t operator()(std::vector<int64_t> const& key) const noexcept {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
    for (int64_t v : key) h = (h ^ uint64_t(v)) * 1099511628211ull;
    return size_t(h);
  }
};

// Bound launches by geometry; cleared when full, like the Python side's (an engine has a handful
// of geometries per step).  `mutex` also serialises the rewrite-and-launch of one entry.  Entries
// dropped since the last bind: their `words` addresses, which the next bind lets Python release.
constexpr size_t kMaxEntries = 4096;
std::mutex mutex;
std::unordered_map<std::vector<int64_t>, Entry, KeyHash> entries;
std::vector<int64_t> last_key;
Entry* last_entry = nullptr;  // unordered_map elements keep their address until erased
std::vector<int64_t> released;

void append_tensor(std::vector<int64_t>& key, at::Tensor const& t) {
  key.push_back(t.dim());
  for (int64_t s : t.sizes()) key.push_back(s);
  for (int64_t s : t.strides()) key.push_back(s);
  key.push_back(int64_t(t.scalar_type()));
  key.push_back(int64_t(t.device().type()) << 16 | int64_t(t.device().index() + 1));
}

void append_optional(std::vector<int64_t>& key, std::optional<at::Tensor> const& t) {
  if (t.has_value()) {
    append_tensor(key, *t);
  } else {
    key.push_back(-1);
  }
}

int64_t double_bits(double v) {
  int64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

uint64_t address(std::optional<at::Tensor> const& t) {
  return t.has_value() ? uint64_t(t->data_ptr()) : 0;
}

Entry describe(std::vector<int64_t> const& d) {
  TORCH_CHECK(d.size() == size_t(kDescriptionSize), "xqagen::decode_bind returned ", d.size(), " fields, expected ",
              int(kDescriptionSize));
  Entry e{};
  e.words = reinterpret_cast<uint64_t*>(d[kWords]);
  e.config = reinterpret_cast<char*>(d[kConfig]);
  e.stream_offset = d[kStreamOffset];
  e.function = reinterpret_cast<void*>(d[kFunction]);
  e.params = reinterpret_cast<void**>(d[kParams]);
  for (int i = 0; i < kNumPointers; ++i) e.word[i] = d[kFirstWord + i];
  e.k_map = reinterpret_cast<void*>(d[kKMap]);
  e.v_map = reinterpret_cast<void*>(d[kVMap]);
  e.k_map_address = uint64_t(d[kKMapAddress]);
  e.v_map_address = uint64_t(d[kVMapAddress]);
  e.faults_offset = d[kFaultsOffset];
  return e;
}

void retarget(void* map, uint64_t& current, uint64_t address) {
  if (map == nullptr || address == current) return;
  int const err = driver().replace_address(map, reinterpret_cast<void*>(address));
  TORCH_CHECK(err == 0, "xqagen: cuTensorMapReplaceAddress failed (CUresult ", err, ") for address ", address);
  current = address;
}

void decode_cuda(at::Tensor const& q, at::Tensor const& k_cache, at::Tensor const& v_cache,
                 at::Tensor const& page_table, at::Tensor const& seq_lens, at::Tensor const& out,
                 std::optional<at::Tensor> const& scratch, std::optional<at::Tensor> const& semaphores,
                 std::optional<at::Tensor> const& sinks, std::optional<at::Tensor> const& mask,
                 std::optional<at::Tensor> const& q_scale_tensor, std::optional<at::Tensor> const& kv_scale_tensor,
                 double q_scale, double kv_scale, double rcp_out_scale, int64_t sliding_window,
                 c10::string_view kv_layout, int64_t num_splits, int64_t sm_count, bool enable_pdl,
                 std::optional<at::Tensor> const& q_cu_seq_lens, int64_t q_seq_len, bool fp8_mma) {
  thread_local std::vector<int64_t> key;
  key.clear();
  for (at::Tensor const* t : {&q, &k_cache, &v_cache, &page_table, &seq_lens, &out}) append_tensor(key, *t);
  for (auto const* t : {&scratch, &semaphores, &sinks, &mask, &q_scale_tensor, &kv_scale_tensor, &q_cu_seq_lens}) {
    append_optional(key, *t);
  }
  for (double v : {q_scale, kv_scale, rcp_out_scale}) key.push_back(double_bits(v));
  for (char c : kv_layout) key.push_back(c);
  for (int64_t v : {sliding_window, num_splits, sm_count, int64_t(enable_pdl), q_seq_len, int64_t(fp8_mma)}) {
    key.push_back(v);
  }

  uint64_t const q_ptr = uint64_t(q.data_ptr()), k_ptr = uint64_t(k_cache.data_ptr());
  uint64_t const v_ptr = uint64_t(v_cache.data_ptr()), out_ptr = uint64_t(out.data_ptr());
  uint64_t const scratch_ptr = address(scratch);
  bool const aligned = ((q_ptr | k_ptr | v_ptr | out_ptr | scratch_ptr) & 15) == 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    Entry* entry = key == last_key ? last_entry : nullptr;
    if (entry == nullptr) {
      auto found = entries.find(key);
      if (found != entries.end()) {
        entry = &found->second;
        last_key = key;
        last_entry = entry;
      }
    }
    if (entry != nullptr && aligned) {
      Entry& e = *entry;
      uint64_t* w = e.words;
      w[e.word[kQ]] = q_ptr;
      w[e.word[kK]] = k_ptr;
      w[e.word[kV]] = v_ptr;
      w[e.word[kOut]] = out_ptr;
      w[e.word[kPageTable]] = uint64_t(page_table.data_ptr());
      w[e.word[kSeqLens]] = uint64_t(seq_lens.data_ptr());
      if (sinks.has_value()) w[e.word[kSinks]] = address(sinks);
      if (mask.has_value()) w[e.word[kMask]] = address(mask);
      if (q_cu_seq_lens.has_value()) w[e.word[kQCuSeqLens]] = address(q_cu_seq_lens);
      if (q_scale_tensor.has_value()) w[e.word[kQScalePtr]] = address(q_scale_tensor);
      if (kv_scale_tensor.has_value()) w[e.word[kKvScalePtr]] = address(kv_scale_tensor);
      if (scratch.has_value()) {  // the default workspace's pointers stay as bound
        uint64_t const semaphores_ptr = address(semaphores);
        w[e.word[kWorkspace]] = scratch_ptr;
        w[e.word[kSemaphores]] = semaphores_ptr;
        w[e.word[kFaults]] = e.faults_offset < 0 ? 0 : semaphores_ptr + uint64_t(e.faults_offset);
      }
      retarget(e.k_map, e.k_map_address, k_ptr);
      retarget(e.v_map, e.v_map_address, v_ptr);
      c10::impl::VirtualGuardImpl const guard(c10::DeviceType::CUDA);
      void* const stream = guard.getStream(q.device()).native_handle();
      std::memcpy(e.config + e.stream_offset, &stream, sizeof stream);
      int const err = driver().launch_kernel_ex(e.config, e.function, e.params, nullptr);
      TORCH_CHECK(err == 0, "xqagen: cuLaunchKernelEx failed (CUresult ", err, ")");
      return;
    }
  }
  // A new geometry, or a misaligned view for the checks to report: Python checks, plans, binds
  // and launches, without this lock held (it takes the GIL, which a caller waiting here may hold).
  std::vector<int64_t> release;
  {
    std::lock_guard<std::mutex> lock(mutex);
    release.swap(released);
  }
  static auto const bind = c10::Dispatcher::singleton().findSchemaOrThrow("xqagen::decode_bind", "");
  torch::jit::Stack stack{q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask,
                          q_scale_tensor, kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window,
                          std::string(kv_layout), num_splits, sm_count, enable_pdl, q_cu_seq_lens, q_seq_len,
                          fp8_mma, c10::IValue(release)};
  try {
    bind.callBoxed(stack);
  } catch (...) {  // bad arguments: the entries to release wait for the next bind
    std::lock_guard<std::mutex> lock(mutex);
    released.insert(released.end(), release.begin(), release.end());
    throw;
  }
  Entry const entry = describe(stack.back().toIntVector());
  std::lock_guard<std::mutex> lock(mutex);
  if (entries.size() >= kMaxEntries) {
    for (auto const& [_, dropped] : entries) released.push_back(int64_t(dropped.words));
    entries.clear();
    last_entry = nullptr;
    last_key.clear();
  }
  auto [slot, inserted] = entries.try_emplace(key, entry);
  if (!inserted) {  // bound twice (two threads): keep the later one
    released.push_back(int64_t(slot->second.words));
    slot->second = entry;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(xqagen, CUDA, m) {
  m.impl("decode", &decode_cuda);
}
