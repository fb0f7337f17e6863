// pybind11 module pipesd._native: the native core (DP token-batch scheduler, SPSC ring).
#include <pybind11/pybind11.h>
namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
    m.doc() = "PipeSD native core";
    m.attr("__version__") = "0.1.0";
}
