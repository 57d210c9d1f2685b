// jcaffe's CPU convolution kernels: XLA FFI handlers that run oneDNN's convolution
// primitives on channels-last (NHWC) activations and Caffe-layout ([O, C/g, kh, kw]) weights.
//
// Three handlers, one per pass, so that XLA can drop the input gradient where nothing needs
// it (a convolution straight on the data):
//   jcaffe_conv_fwd          y[N, OH, OW, O]  = conv(x[N, H, W, C], w)
//   jcaffe_conv_bwd_data     dx[N, H, W, C]   from dy[N, OH, OW, O] and w
//   jcaffe_conv_bwd_weights  dw[O, C/g, kh, kw] from x and dy
// Attributes: stride_h/w, pad_h/w (Caffe's symmetric zero padding; the output size rounds
// down as in Caffe), dilation_h/w (Caffe's: 1 is none), group.
//
// oneDNN picks its own blocked weight layout; the Caffe-layout weights are reordered into it
// on every call (the weights are small next to the activations), and the weight gradient is
// reordered back. Primitives are created once per shape and kept (creating one JIT-compiles
// its kernel); which one runs is deterministic, so runs and resumed runs repeat bit for bit. Calls are serialised: each one already uses every core through OpenMP, and
// two at once would only oversubscribe them.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

struct Geometry {
  int64_t n, h, w, c, o, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw, g;

  std::vector<int64_t> key(int64_t pass) const {
    return {pass, n, h, w, c, o, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw, g};
  }
  memory::desc src(tag t = tag::nhwc) const { return memory::desc({n, c, h, w}, dt::f32, t); }
  memory::desc dst(tag t = tag::nhwc) const {
    return memory::desc({n, o, oh, ow}, dt::f32, t);
  }
  memory::desc weights(tag t) const {
    if (g == 1) return memory::desc({o, c, kh, kw}, dt::f32, t == tag::any ? tag::any : tag::oihw);
    return memory::desc({g, o / g, c / g, kh, kw}, dt::f32, t == tag::any ? tag::any : tag::goihw);
  }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims dilates() const { return {dh - 1, dw - 1}; }  // oneDNN counts the gaps
  memory::dims pad_l() const { return {ph, pw}; }
  // Caffe rounds the output size down; oneDNN wants the right padding that gives exactly
  // that size: (in + pad_l + pad_r - extent) / stride + 1 == out.
  memory::dims pad_r() const {
    return {(oh - 1) * sh + (dh * (kh - 1) + 1) - h - ph, (ow - 1) * sw + (dw * (kw - 1) + 1) - w - pw};
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  // Only the default floating-point math: Caffe's float32 numbers.
  attr.set_fpmath_mode(dnnl::fpmath_mode::strict);
  // Our scratchpad, not oneDNN's: its own is a thread-local buffer sized when a primitive is
  // created, and XLA runs a custom call on whichever of its threads is free, so a primitive
  // created on one thread would run on another thread's (smaller) buffer.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The one scratchpad, grown to the largest any plan needs (calls are serialised, and a
// plan's reorder and convolution run one after the other).
void* ScratchBuffer(size_t need) {
  static std::unique_ptr<void, decltype(&std::free)> buffer(nullptr, &std::free);
  static size_t size = 0;
  if (!buffer || need > size) {
    size_t rounded = std::max<size_t>((need + 4095) / 4096 * 4096, 4096);
    buffer.reset(std::aligned_alloc(4096, rounded));
    if (!buffer) throw dnnl::error(dnnl_out_of_memory, "scratchpad allocation failed");
    size = rounded;
  }
  return buffer.get();
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src(),
      g.weights(tag::any), g.dst(), g.strides(), g.dilates(), g.pad_l(), g.pad_r(), Attr());
}

// One pass of one shape: the primitive, and the reorder between Caffe's weight layout and the
// primitive's (absent when they agree).
struct Plan {
  dnnl::primitive op;
  memory::desc weights;  // the primitive's weight (or weight-gradient) layout
  std::unique_ptr<dnnl::reorder> reorder;
  memory reordered;      // the weights (or their gradient) in the primitive's layout
  memory::desc scratchpad, reorder_scratchpad;  // what each needs of the shared scratchpad
  std::string impl;      // oneDNN's name of the implementation
};

std::mutex& Lock() {
  static std::mutex lock;
  return lock;
}

std::map<std::vector<int64_t>, Plan>& Plans() {
  static std::map<std::vector<int64_t>, Plan> plans;
  return plans;
}

enum Pass : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Runs `plan` once on the given memories (the Caffe-layout weights in `user`).
void Execute(const Plan& plan, Pass pass, dnnl::stream& stream, memory& src, memory& dst,
             memory& user) {
  // The plan's own weight buffer in the kernel's layout (calls are serialised).
  memory weights = plan.reorder ? plan.reordered : user;
  void* buffer = ScratchBuffer(std::max(plan.scratchpad.get_size(),
                                        plan.reorder_scratchpad.get_size()));
  memory scratch(plan.scratchpad, Engine(), buffer);
  auto reorder = [&](memory& from, memory& to) {
    memory rs(plan.reorder_scratchpad, Engine(), buffer);
    plan.reorder->execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                   {DNNL_ARG_SCRATCHPAD, rs}});
  };
  if (plan.reorder && pass != kBackwardWeights) reorder(user, weights);
  if (pass == kForward) {
    plan.op.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (pass == kBackwardData) {
    plan.op.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                             {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    plan.op.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, weights},
                             {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (plan.reorder) reorder(weights, user);
  }
  stream.wait();
}

Plan MakePlan(const Geometry& g, const dnnl::primitive_desc& pd, Pass pass) {
  Plan plan;
  memory::desc user = g.weights(tag::oihw);
  if (pass == kForward) {
    plan.op = dnnl::convolution_forward(dnnl::convolution_forward::primitive_desc(pd.get()));
  } else if (pass == kBackwardData) {
    plan.op = dnnl::convolution_backward_data(
        dnnl::convolution_backward_data::primitive_desc(pd.get()));
  } else {
    plan.op = dnnl::convolution_backward_weights(
        dnnl::convolution_backward_weights::primitive_desc(pd.get()));
  }
  plan.weights = pass == kBackwardWeights ? pd.diff_weights_desc() : pd.weights_desc();
  plan.impl = pd.impl_info_str();
  plan.scratchpad = pd.scratchpad_desc();
  if (plan.weights != user) {
    auto r = pass == kBackwardWeights
                 ? dnnl::reorder::primitive_desc(Engine(), plan.weights, Engine(), user, Attr())
                 : dnnl::reorder::primitive_desc(Engine(), user, Engine(), plan.weights, Attr());
    plan.reorder = std::make_unique<dnnl::reorder>(r);
    plan.reorder_scratchpad = r.scratchpad_desc();
    plan.reordered = memory(plan.weights, Engine());
  }
  return plan;
}

// The plan of a pass and shape: oneDNN's first choice among its implementations (a fixed
// ranking for the machine's ISA). Not the fastest by timing, as cuDNN's benchmark mode picks:
// timings flip between close candidates from run to run, each kernel sums in its own order,
// and a resumed run would then not continue bit-exactly (it gained ~1 % on CIFAR-10 quick).
const Plan& GetPlan(const Geometry& g, Pass pass) {
  auto& plans = Plans();
  auto key = g.key(pass);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  auto fwd = ForwardDesc(g);
  dnnl::primitive_desc pd;
  if (pass == kForward) {
    pd = fwd;
  } else if (pass == kBackwardData) {
    pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.src(), g.weights(tag::any), g.dst(),
        g.strides(), g.dilates(), g.pad_l(), g.pad_r(), fwd, Attr());
  } else {
    pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, g.src(), g.weights(tag::any), g.dst(),
        g.strides(), g.dilates(), g.pad_l(), g.pad_r(), fwd, Attr());
  }
  return plans.emplace(std::move(key), MakePlan(g, pd, pass)).first->second;
}

struct Attrs {
  int64_t sh, sw, ph, pw, dh, dw, g;
};

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
                      ffi::Span<const int64_t> w, const Attrs& a) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[2], w[3], y[1], y[2],
                  a.sh, a.sw, a.ph, a.pw, a.dh, a.dw, a.g};
}

// Runs one pass. `x`, `y` are the activation and output-gradient (or output) buffers, `w` the
// Caffe-layout weights (input for kForward / kBackwardData, output for kBackwardWeights).
ffi::Error Run(Pass pass, const Geometry& g, void* x, void* y, void* w) {
  try {
    std::lock_guard<std::mutex> guard(Lock());
    const Plan& plan = GetPlan(g, pass);
    dnnl::stream stream(Engine());
    memory src(g.src(), Engine(), x), dst(g.dst(), Engine(), y);
    memory user(g.weights(tag::oihw), Engine(), w);
    Execute(plan, pass, stream, src, dst, user);
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph,
                       int64_t pw, int64_t dh, int64_t dw, int64_t g) {
  Geometry geo = MakeGeometry(x.dimensions(), y->dimensions(), w.dimensions(),
                              {sh, sw, ph, pw, dh, dw, g});
  return Run(kForward, geo, x.untyped_data(), y->untyped_data(), w.untyped_data());
}

ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t ph,
                            int64_t pw, int64_t dh, int64_t dw, int64_t g) {
  Geometry geo = MakeGeometry(dx->dimensions(), dy.dimensions(), w.dimensions(),
                              {sh, sw, ph, pw, dh, dw, g});
  return Run(kBackwardData, geo, dx->untyped_data(), dy.untyped_data(), w.untyped_data());
}

ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw_out, int64_t sh, int64_t sw,
                               int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t g) {
  Geometry geo = MakeGeometry(x.dimensions(), dy.dimensions(), dw_out->dimensions(),
                              {sh, sw, ph, pw, dh, dw, g});
  return Run(kBackwardWeights, geo, x.untyped_data(), dy.untyped_data(),
             dw_out->untyped_data());
}

template <typename B>
auto WithAttrs(B binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_h")
      .template Attr<int64_t>("pad_w")
      .template Attr<int64_t>("dilation_h")
      .template Attr<int64_t>("dilation_w")
      .template Attr<int64_t>("group");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcaffe_conv_fwd, ConvForward,
                              WithAttrs(ffi::Ffi::Bind()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcaffe_conv_bwd_data, ConvBackwardData,
                              WithAttrs(ffi::Ffi::Bind()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jcaffe_conv_bwd_weights, ConvBackwardWeights,
                              WithAttrs(ffi::Ffi::Bind()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

// For the Python side: which oneDNN this was built against and runs with ("3.2.0").
extern "C" const char* jcaffe_onednn_version() {
  static std::string version = [] {
    const dnnl_version_t* v = dnnl_version();
    return std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
           std::to_string(v->patch);
  }();
  return version.c_str();
}

// For profiles: one line per plan, "pass shape: implementation".
extern "C" const char* jcaffe_onednn_plans() {
  static const char* names[] = {"forward", "backward_data", "backward_weights"};
  static std::string text;
  std::lock_guard<std::mutex> guard(Lock());
  std::ostringstream out;
  for (const auto& [key, plan] : Plans()) {
    out << names[key[0]] << " n" << key[1] << " " << key[2] << "x" << key[3] << "x" << key[4]
        << " -> " << key[5] << " k" << key[6] << "x" << key[7] << " s" << key[10] << " p"
        << key[12] << " d" << key[14] << " g" << key[16] << ": " << plan.impl << "\n";
  }
  text = out.str();
  return text.c_str();
}
