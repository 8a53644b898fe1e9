#pragma once

// Named crash points for crash-safety tests. In builds with UPGRADED_CRASH_POINTS (the default
// for every build type but Release), reaching the point named by the environment variable
// UPGRADED_CRASH_AT kills the process with SIGKILL, exactly as a power cut or OOM kill would
// interrupt it. Release builds compile the points away.

namespace upgraded {

// Pause points widen a race window on purpose, so that a test can act inside it (cancel a job
// before its point of no return, kill a process mid-way): UPGRADED_PAUSE_AT=name:milliseconds
// sleeps that long each time `name` is reached.
#ifdef UPGRADED_CRASH_POINTS
void crash_point(const char* name);
void pause_point(const char* name);
#else
inline void crash_point(const char*) {}
inline void pause_point(const char*) {}
#endif

}  // namespace upgraded
