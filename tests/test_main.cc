// The doctest runner for vmsave_tests. CTest runs each case in its own
// process (doctest_discover_tests), so a case may end the process with
// exit status 77 to report that the environment cannot run it.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
