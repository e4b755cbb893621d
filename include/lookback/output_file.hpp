// Where lookback writes an output, and how. Every writer of the library
// follows these rules: write_output below, write_npy (lookback/npy.hpp) and
// save_checkpoint (lookback/checkpoint.hpp); the CLI's --out and --lse too.
//
//   "-"                  standard output (binary data included).
//   a regular file, or   replaced atomically: the bytes go to a temporary
//   a path not there     PATH.tmp.XXXXXX in the same folder, which is fsynced
//                        and renamed over PATH, then the folder is fsynced.
//                        PATH holds its old contents or all the new ones,
//                        never a part. A replaced file keeps its permissions;
//                        a new one gets 0666 less the umask.
//   a symbolic link      its target is replaced as above (the temporary sits
//                        beside the target) and the link stays a link; a
//                        dangling link's target is created.
//   a device node, FIFO  written in place: opened for writing without
//   or socket            truncation, no temporary, never replaced (so
//                        /dev/null stays a device, and a FIFO's reader gets
//                        the bytes; a FIFO with no reader waits for one, as
//                        a shell's > does). Not atomic: an error midway
//                        leaves what was written.
//   ""                   lookback::Error (kInvalidArgument).
//
// Failures are lookback::Error (kIo) naming the path; a failed atomic write
// deletes its temporary and leaves the path as it was. docs/checkpoint.md
// says what a process killed mid-write leaves behind.
#pragma once

#include <cstddef>
#include <span>
#include <string>

namespace lookback {

// Writes `bytes` to the output `path` by the rules above.
void write_output(const std::string& path, std::span<const std::byte> bytes);

}  // namespace lookback
