// Fault injection for the backing store's reads: a test hook, compiled in only with
// EDGEMOE_FAULT_INJECTION (the test install sets it; release builds leave it out, and then
// every read is untouched and set_plan refuses).
//
// A plan is a comma-separated list of rules, KIND[=ARG]@FIRST[+COUNT], over the reads the
// process makes, numbered from 0 in the order they start:
//   eio@3+2        reads 3 and 4 fail with EIO (a transient fault: the cache retries)
//   eio@0+inf      every read fails with EIO
//   short@0+inf    each read's first pread returns half the bytes (the rest is read on)
//   eof@5          read 5 meets the end of the file early (a truncated file)
//   delay=20@0+10  reads 0..9 are delayed by 20 ms
// COUNT defaults to 1. With --io mmap, eio raises SIGBUS inside the guarded copy, as a
// failing page of a mapping does.
#pragma once

#include <cstdint>
#include <string>

namespace edgemoe::faults {

enum class kind { none = 0, eio, short_read, eof, delay };

struct action {
    kind    k   = kind::none;
    int64_t arg = 0; // delay: milliseconds
};

// true where the hook is compiled in
bool available();

// replaces the plan (nullptr or "" clears it) and restarts the read count; false with *err
// for a malformed plan or a build without the hook
bool set_plan(const char * plan, std::string * err);

// the action for the read that starts now (counts it)
action next_read();

} // namespace edgemoe::faults
