// Host check of the Hopper kernel's hand-built wgmma operands (templates/hopper/mainloop.cuh.j2)
// against what CuTe's TiledMMA partitions produce for the same layouts: descriptor fields (swizzle
// mode, LBO, SBO) and k-step offsets of K, V^T, Q and P, accumulator coordinates, and the register
// order of accumulators and A fragments, for every thread of the warpgroup.  No GPU needed; the
// formulas under "as in the template" mirror the template's.  With a CUDA toolkit's nvcc:
//   nvcc -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -I$(python -c 'import cutlass_library, os; \
//     print(os.path.join(os.path.dirname(cutlass_library.__file__), "source/include"))') \
//     tools/check_gmma_operands.cu -o /tmp/check_gmma_operands && /tmp/check_gmma_operands
// (about 2.5 minutes to build; on the host CuTe's descriptors start at address 0, so starts are
// compared as offsets from each operand's first block).
#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cstdio>
using namespace cute;
static int failures = 0, checks = 0;
#define CHECK(cond, ...) do { ++checks; if (!(cond)) { ++failures; if (failures < 30) { printf("FAIL line %d: ", __LINE__); printf(__VA_ARGS__); printf("\n"); } } } while (0)
template <int Rows> struct PAtom;
template <> struct PAtom<8> { template <class T> using type = GMMA::Layout_MN_INTER_Atom<T>; };
template <> struct PAtom<16> { template <class T> using type = GMMA::Layout_MN_SW32_Atom<T>; };
template <> struct PAtom<32> { template <class T> using type = GMMA::Layout_MN_SW64_Atom<T>; };
GmmaDescriptor D(uint64_t d) { return GmmaDescriptor(d); }

// ---- as in the template ----
template <class Layout>
constexpr GMMA::LayoutType gmma_swizzle() {
  constexpr int b = decltype(Layout{}.layout_a())::num_bits;
  return b == 0 ? GMMA::LayoutType::INTERLEAVE : b == 1 ? GMMA::LayoutType::B32
       : b == 2 ? GMMA::LayoutType::B64 : GMMA::LayoutType::B128;
}
template <class Elem, class Layout, class... Coord>
constexpr int smem_bytes_at(Coord... coord) { return int(Layout{}.layout_b()(coord...)) * int(sizeof(Elem)); }
template <class Elem, class Layout, class... Coord>
int desc_step(Coord... coord) { return smem_bytes_at<Elem, Layout>(coord...) / 16; }
struct Fields { int lt, lbo, sbo; };  // lbo, sbo in bytes
void check_fields(uint64_t d, Fields f, char const* what) {
  CHECK(D(d).bitfield.layout_type_ == f.lt && D(d).bitfield.leading_byte_offset_ == (f.lbo >> 4) &&
        D(d).bitfield.stride_byte_offset_ == (f.sbo >> 4) && D(d).bitfield.base_offset_ == 0,
        "%s: cute lt %d lbo %d sbo %d, hand lt %d lbo %d sbo %d", what, D(d).bitfield.layout_type_,
        D(d).bitfield.leading_byte_offset_, D(d).bitfield.stride_byte_offset_, f.lt, f.lbo >> 4, f.sbo >> 4);
}

template <class MmaElem, int kRowsCta, int kHeadDimPad, int kStages>
void check() {
  constexpr int kKvTile = 64;
  using KVElem = MmaElem;
  using KTileLayout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<KVElem>{}, Shape<Int<kKvTile>, Int<kHeadDimPad>, Int<kStages>>{}, Step<_1, _2, _3>{}));
  using VtTileLayout = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<KVElem>{}, Shape<Int<kHeadDimPad>, Int<kKvTile>, Int<kStages>>{}, Step<_2, _1, _3>{}));
  using QLayout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<MmaElem>{}, Shape<Int<kRowsCta>, Int<kHeadDimPad>>{}));
  using PLayout = decltype(tile_to_shape(typename PAtom<kRowsCta>::template type<MmaElem>{}, Shape<Int<kRowsCta>, Int<kKvTile>>{}, Step<_2, _1>{}));
  using TileMN = Shape<_64, Int<kRowsCta>, _16>;
  using MmaS_SS = decltype(make_tiled_mma(GMMA::ss_op_selector<MmaElem, MmaElem, float, TileMN, GMMA::Major::K, GMMA::Major::K>()));
  using MmaO_SS = decltype(make_tiled_mma(GMMA::ss_op_selector<MmaElem, MmaElem, float, TileMN, GMMA::Major::MN, GMMA::Major::MN>()));
  using MmaS_RS = decltype(make_tiled_mma(GMMA::rs_op_selector<MmaElem, MmaElem, float, TileMN, GMMA::Major::K, GMMA::Major::K>()));
  using MmaO_RS = decltype(make_tiled_mma(GMMA::rs_op_selector<MmaElem, MmaElem, float, TileMN, GMMA::Major::K, GMMA::Major::MN>()));
  printf("rows %d dpad %d %s\n", kRowsCta, kHeadDimPad, is_same_v<MmaElem, half_t> ? "fp16" : "bf16");
  alignas(1024) static MmaElem base[1 << 18];
  Tensor sK = make_tensor(make_smem_ptr(base), KTileLayout{});
  Tensor sVt = make_tensor(make_smem_ptr(base), VtTileLayout{});
  Tensor sQ = make_tensor(make_smem_ptr(base), QLayout{});
  Tensor sP = make_tensor(make_smem_ptr(base), PLayout{});

  // hand-built fields, as the template sets them
  Fields const q{int(gmma_swizzle<QLayout>()), 16, (kRowsCta > 8 ? smem_bytes_at<MmaElem, QLayout>(8, 0) : 0)};
  constexpr auto kPSwizzle = gmma_swizzle<PLayout>();
  constexpr int kStep8 = smem_bytes_at<MmaElem, PLayout>(0, 8);
  Fields const p{int(kPSwizzle), kPSwizzle == GMMA::LayoutType::INTERLEAVE ? kStep8 : 0,
                 kPSwizzle == GMMA::LayoutType::INTERLEAVE ? 0 : kStep8};
  Fields const k{int(gmma_swizzle<KTileLayout>()), 16, smem_bytes_at<KVElem, KTileLayout>(8, 0, 0)};
  Fields const vt{int(gmma_swizzle<VtTileLayout>()), 0, smem_bytes_at<KVElem, VtTileLayout>(0, 8, 0)};

  for (int t = 0; t < 128; ++t) {
    auto q_check = [&](auto mma) {
      Tensor tSrQ = mma.get_thread_slice(t).partition_fragment_B(sQ);
      CHECK(size(tSrQ) == kHeadDimPad / 16, "q size");
      for (int ks = 0; ks < kHeadDimPad / 16; ++ks) {
        check_fields(tSrQ(0, 0, ks), q, "q");
        CHECK(D(tSrQ(0, 0, ks)).bitfield.start_address_ == (desc_step<MmaElem, QLayout>(0, 16 * ks)), "q step %d", ks);
      }
    };
    q_check(MmaS_SS{}); q_check(MmaS_RS{});
    auto p_check = [&](auto mma) {
      Tensor tOrP = mma.get_thread_slice(t).partition_fragment_B(sP);
      CHECK(size(tOrP) == kKvTile / 16, "p size");
      for (int kt = 0; kt < kKvTile / 16; ++kt) {
        check_fields(tOrP(0, 0, kt), p, "p");
        CHECK(D(tOrP(0, 0, kt)).bitfield.start_address_ == (desc_step<MmaElem, PLayout>(0, 16 * kt)), "p step");
      }
    };
    p_check(MmaO_SS{}); p_check(MmaO_RS{});
    for (int stage = 0; stage < kStages; ++stage) {
      Tensor sKs = sK(_, _, stage);
      CHECK(sKs.data().get() == &sK(0, 0, stage), "k stage start");
      Tensor tSrK = MmaS_SS{}.get_thread_slice(t).partition_fragment_A(sKs);
      CHECK(size(tSrK) == kHeadDimPad / 16, "k size");
      for (int ks = 0; ks < kHeadDimPad / 16; ++ks) {
        check_fields(tSrK(0, 0, ks), k, "k");
        CHECK(D(tSrK(0, 0, ks)).bitfield.start_address_ == (desc_step<KVElem, KTileLayout>(0, 16 * ks, 0)), "k step");
      }
      for (int mb = 0; mb < kHeadDimPad / 64; ++mb) {
        Tensor blk = local_tile(sVt(_, _, stage), Shape<_64, Int<kKvTile>>{}, make_coord(mb, 0));
        CHECK(blk.data().get() == &sVt(64 * mb, 0, stage), "vt block start");
        Tensor tOrV = MmaO_SS{}.get_thread_slice(t).partition_fragment_A(blk);
        CHECK(size(tOrV) == kKvTile / 16, "vt size");
        for (int kt = 0; kt < kKvTile / 16; ++kt) {
          check_fields(tOrV(0, 0, kt), vt, "vt");
          CHECK(D(tOrV(0, 0, kt)).bitfield.start_address_ == (desc_step<KVElem, VtTileLayout>(0, 16 * kt, 0)), "vt step");
        }
      }
    }
    // accumulator coordinates (AccCoords) against partition_C of an identity tensor
    using AccLayout = typename MMA_Traits<typename MmaS_RS::Atom::MMA_Op>::CLayout;
    static_assert(is_same_v<AccLayout, typename MMA_Traits<typename MmaO_SS::Atom::MMA_Op>::CLayout>);
    Tensor coords = MmaS_RS{}.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<kRowsCta>>{}));
    Tensor frgC = partition_fragment_C(MmaS_RS{}, Shape<_64, Int<kRowsCta>>{});
    CHECK(size(coords) == kRowsCta / 2 && size(frgC) == kRowsCta / 2, "c size");
    int const m0 = AccLayout{}(t, 0) % 64, n0 = AccLayout{}(t, 0) / 64;
    for (int v = 0; v < kRowsCta / 2; ++v) {
      CHECK(get<0>(coords(v)) == m0 + AccLayout{}(0, v) % 64 && get<1>(coords(v)) == n0 + AccLayout{}(0, v) / 64, "c coord");
      CHECK(&frgC(v) == &frgC(0) + v, "c register order");  // value v is the fma's register v
    }
  }
  // register A fragments (RS): the old code wrote recast<uint32_t>(frag)(r, 0, k) and gemm passed
  // recast<uint32_t>(frag(_, _, k))(r) as fma argument r; the new code passes frag[k][r]
  auto frag_check = [&](auto mma, auto shape) {
    auto frag = make_tensor<MmaElem>(partition_shape_A(decltype(mma){}, shape));
    auto regs = recast<uint32_t>(frag);
    for (int kk = 0; kk < size<2>(frag); ++kk) {
      auto rA = recast<uint32_t>(frag(_, _, kk));
      CHECK(size(rA) == 4, "a regs");
      for (int r = 0; r < 4; ++r) CHECK(&regs(r, 0, kk) == &rA(r) && &rA(r) == &regs(0, 0, 0) + 4 * kk + r, "a reg %d %d", kk, r);
    }
  };
  frag_check(MmaS_RS{}, Shape<_64, _64>{});
  frag_check(MmaO_RS{}, Shape<_64, Int<kKvTile>>{});
}

int main() {
  check<half_t, 8, 64, 2>(); check<bfloat16_t, 16, 128, 4>(); check<half_t, 32, 256, 2>();
  check<bfloat16_t, 8, 192, 3>(); check<half_t, 16, 64, 6>(); check<bfloat16_t, 32, 128, 2>();
  printf("%d checks, %d failures\n", checks, failures);
  return failures != 0;
}
