# Locate the torch that the build's Python interpreter imports, without
# find_package(Torch): torch's own CMake config demands cuDNN, cuBLAS and NVTX
# headers that a plain CUDA toolkit may lack, and we need none of them.
#
# Sets: TORCH_VERSION, TORCH_INCLUDE_DIRS, TORCH_LIBRARY_DIR, TORCH_CXX11_ABI,
#       TORCH_CUDA_VERSION ("" for a CPU build of torch).
function(pyserve_find_torch)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, torch; from torch.utils import cpp_extension as c; \
print(torch.__version__); \
print(';'.join(c.include_paths())); \
print(os.path.join(os.path.dirname(torch.__file__), 'lib')); \
print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); \
print(torch.version.cuda or '')"
    OUTPUT_VARIABLE _out
    ERROR_VARIABLE _err
    RESULT_VARIABLE _rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "pyserve: cannot import torch with ${Python_EXECUTABLE}: ${_err}")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  # The include list itself contains ';', so pick lines from the end.
  list(LENGTH _lines _n)
  math(EXPR _last "${_n} - 1")
  list(GET _lines 0 _version)
  list(GET _lines ${_last} _cuda)
  math(EXPR _i "${_last} - 1")
  list(GET _lines ${_i} _abi)
  math(EXPR _i "${_last} - 2")
  list(GET _lines ${_i} _libdir)
  list(SUBLIST _lines 1 ${_i} _includes)
  # A CPU build of torch prints an empty last line, which strip removed.
  if(NOT _cuda MATCHES "^[0-9.]+$")
    set(_cuda "")
  endif()
  set(TORCH_VERSION "${_version}" PARENT_SCOPE)
  set(TORCH_INCLUDE_DIRS "${_includes}" PARENT_SCOPE)
  set(TORCH_LIBRARY_DIR "${_libdir}" PARENT_SCOPE)
  set(TORCH_CXX11_ABI "${_abi}" PARENT_SCOPE)
  set(TORCH_CUDA_VERSION "${_cuda}" PARENT_SCOPE)
endfunction()

# Link a target against torch's CPU libraries (and CUDA ones when asked).
function(pyserve_link_torch target with_cuda)
  target_include_directories(${target} SYSTEM PRIVATE ${TORCH_INCLUDE_DIRS})
  target_compile_definitions(${target} PRIVATE
    _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI}
    TORCH_EXTENSION_NAME=_C)
  set(_libs c10 torch_cpu torch)
  if(with_cuda)
    list(APPEND _libs c10_cuda torch_cuda)
  endif()
  foreach(_lib ${_libs})
    find_library(_path_${_lib} NAMES ${_lib} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(${target} PRIVATE "${_path_${_lib}}")
  endforeach()
endfunction()
