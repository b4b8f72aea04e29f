# CMake toolchain: aarch64 Linux with Debian's cross compilers (g++-aarch64-linux-gnu), the
# binaries run under qemu-user. native/cross/aarch64.sh uses it; by hand:
#   cmake -S . -B build/aarch64 --toolchain native/cross/aarch64-linux-gnu.cmake ...
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER   aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# ctest runs the tests through qemu. The Jetson Orin's Cortex-A78AE is Armv8.2-A with the dot
# product and fp16 but without i8mm or SVE; qemu's cortex-a76 has the same features, so ggml
# picks the kernels and the repacked layouts (Q4_0 4x4, Q8_0 4x4) the Orin would.
set(EDGEMOE_QEMU_CPU cortex-a76 CACHE STRING "qemu-user CPU model the tests run on")
find_program(EDGEMOE_QEMU NAMES qemu-aarch64 qemu-aarch64-static)
if (EDGEMOE_QEMU)
    set(CMAKE_CROSSCOMPILING_EMULATOR "${EDGEMOE_QEMU};-L;/usr/aarch64-linux-gnu;-cpu;${EDGEMOE_QEMU_CPU}")
endif()
