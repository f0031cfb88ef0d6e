/* Preloaded after the ASan runtime into the one lua5.4 process under test:
 * removes LD_PRELOAD from the environment so that the processes the specs
 * start (nginx, curl, openssl, sh, a second lua5.4 on the normal build) run
 * as usual. The sanitizers cover the busted process and the module it loads. */
#include <stdlib.h>

__attribute__((constructor)) static void enos_unpreload(void) {
  unsetenv("LD_PRELOAD");
}
