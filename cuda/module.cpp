// fastnn._cuda: pybind11 bindings of the CUDA entry points (cuda/ops.h) and the runtime queries behind
// fastnn.cuda_is_available() and fastnn.info(). Compiled by the host compiler; fastnn/_gpu.py validates
// every argument before it gets here, and C++ exceptions (CUDA failures) become RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cuda_build_config.h"
#include "ops.h"

namespace py = pybind11;
using namespace fastnn::cuda;

namespace {

// (count, reason): count 0 with the runtime's reason when there is no driver or no device. Never throws.
py::tuple device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it, so it does not surface in a later check
    return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(n, n ? "" : "no CUDA device");
}

py::dict device_properties(int device) {
  cudaDeviceProp p{};
  const cudaError_t err = cudaGetDeviceProperties(&p, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fastnn: cudaGetDeviceProperties(") + std::to_string(device) +
                             ") failed: " + cudaGetErrorString(err));
  }
  int smem_optin = 0;
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  py::dict d;
  d["name"] = std::string(p.name);
  d["compute_capability"] = py::make_tuple(p.major, p.minor);
  d["multiprocessors"] = p.multiProcessorCount;
  d["total_memory"] = static_cast<long long>(p.totalGlobalMem);
  d["shared_memory_per_block_optin"] = smem_optin;
  return d;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) cudaGetLastError();
  return v;  // 0 when no driver is installed
}

py::dict build_info() {
  py::dict d;
  d["cuda_compiler_version"] = FASTNN_CUDA_COMPILER_VERSION;
  d["cuda_runtime_version"] = CUDART_VERSION;  // the runtime linked in (statically)
  d["cuda_architectures"] = FASTNN_CUDA_ARCHITECTURES;
  d["cuda_flags"] = FASTNN_CUDA_FLAGS;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastnn CUDA kernels (device pointers as ints; use the fastnn functions, not this module)";
  m.def("build_info", &build_info);
  m.def("device_count", &device_count);
  m.def("device_properties", &device_properties, py::arg("device"));
  m.def("driver_version", &driver_version);

  m.def("relu", &relu, py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("n"),
        py::arg("stream"), py::arg("variant"));
  m.def("relu_backward", &relu_backward, py::arg("device"), py::arg("dtype"), py::arg("g"), py::arg("x"),
        py::arg("dx"), py::arg("n"), py::arg("stream"), py::arg("variant"));
  m.def("softmax", &softmax, py::arg("device"), py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("rows"),
        py::arg("cols"), py::arg("log"), py::arg("stream"), py::arg("variant"));
  m.def("softmax_backward", &softmax_backward, py::arg("device"), py::arg("dtype"), py::arg("g"), py::arg("y"),
        py::arg("dx"), py::arg("rows"), py::arg("cols"), py::arg("log"), py::arg("stream"), py::arg("variant"));
  m.def("cross_entropy", &cross_entropy, py::arg("device"), py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("grad"), py::arg("row_loss"), py::arg("rows"), py::arg("cols"), py::arg("grad_scale"),
        py::arg("ignore_index"), py::arg("stream"), py::arg("variant"));
  m.def("gemm", &gemm, py::arg("device"), py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("a_off"), py::arg("b_off"), py::arg("batch"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("a_rs"), py::arg("a_cs"), py::arg("b_rs"), py::arg("b_cs"), py::arg("bias"), py::arg("relu"),
        py::arg("stream"), py::arg("variant"));
  m.def("sdpa", &sdpa, py::arg("device"), py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("q_off"), py::arg("k_off"), py::arg("v_off"), py::arg("nbatch"), py::arg("L"),
        py::arg("S"), py::arg("E"), py::arg("Ev"), py::arg("q_rs"), py::arg("k_rs"), py::arg("v_rs"),
        py::arg("mask"), py::arg("mask_kind"), py::arg("m_off"), py::arg("m_rs"), py::arg("m_cs"),
        py::arg("causal"), py::arg("scale"), py::arg("lse"), py::arg("stream"), py::arg("variant"),
        py::arg("dropout") = false, py::arg("drop_threshold") = 0u, py::arg("keep_scale") = 1.0f,
        py::arg("seed") = uint64_t(0), py::arg("offset") = 0u);
  m.def("adam", &adam, py::arg("device"), py::arg("dtype"), py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("max_exp_avg_sq"), py::arg("n"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step_size"), py::arg("bc2_sqrt"),
        py::arg("decoupled"), py::arg("maximize"), py::arg("stream"), py::arg("variant"));
}
